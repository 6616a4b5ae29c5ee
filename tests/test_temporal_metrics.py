"""The temporal quality metrics on small clips whose answers are known by construction."""
import math

import cv2
import numpy as np
import pytest
import torch

from vsr_ddp.temporal_metrics import flicker, pair_flows, psnr, seams, static_mask, warping_error

H, W, T, STEP = 48, 64, 5, 2  # frame size, frames, pan in whole pixels per frame


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture (coarse noise, bicubic-enlarged): DIS finds its motion reliably."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 4 + 1, w // 4 + 1, 3)).astype(np.float32) * 255
    big = cv2.resize(coarse, ((w // 4 + 1) * 4, (h // 4 + 1) * 4), interpolation=cv2.INTER_CUBIC)
    return np.clip(big[:h, :w], 0, 255).astype(np.uint8)


def pan() -> np.ndarray:
    """Frame t is the window at x = STEP * t of a wider texture: content moves left STEP px a frame."""
    big = texture(H, W + STEP * T)
    return np.stack([big[:, STEP * t:STEP * t + W] for t in range(T)])


def noisy(clip: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(clip + rng.normal(0, sigma, clip.shape), 0, 255).astype(np.uint8)


def exact_flows(n: int) -> list:
    """The true flow t+1 -> t of :func:`pan`: pixel x of frame t+1 is pixel x + STEP of frame t,
    visible in frame t where x + STEP < W."""
    f = torch.zeros(2, H, W)
    f[0] = STEP
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[:, :W - STEP] = True
    return [(f, mask)] * n


def test_warping_error_is_zero_along_the_true_motion_of_a_pan():
    clip = pan()
    assert warping_error(clip, flow=exact_flows(T - 1)) == pytest.approx(0, abs=1e-4)


def test_warping_error_with_estimated_flow_is_small_for_a_pan_and_large_with_noise():
    clip = pan()
    flows = pair_flows(clip)
    # the occlusion mask drops the STEP columns that enter at the right edge
    for _, mask in flows:
        assert not mask[:, W - STEP:].any()
    clean = warping_error(clip, flow=flows)
    assert clean < 1.0
    assert warping_error(clip) == pytest.approx(clean)  # flow estimated on the frames themselves
    shaken = noisy(clip, 8)
    # noise of sigma 8 per frame: |a - b| of two independent ones averages 2 * 8 / sqrt(pi) = 9.0
    assert warping_error(shaken, flow_source=clip) > 6
    assert warping_error(shaken, flow=exact_flows(T - 1)) > 6


def test_flicker_is_zero_on_a_static_clip_and_the_noise_level_with_noise():
    still = np.repeat(texture(H, W)[None], T, axis=0)
    mask = static_mask(still)
    assert mask.all()
    assert flicker(still, mask) == 0
    # Gaussian noise of sigma 4: the population std over 5 frames averages about 4 * 0.94
    assert 2.5 < flicker(noisy(still, 4), mask) < 4.5


def test_static_mask_excludes_moving_pixels():
    clip = np.repeat(texture(H, W)[None], T, axis=0)
    clip[:, :, W // 2:] = pan()[:, :, W // 2:]  # the right half pans, the left half stands still
    mask = static_mask(clip, threshold=4)
    assert mask[:, :W // 2].all()
    assert mask[:, W // 2:].mean() < 0.2  # a smooth texture leaves a few pixels nearly unchanged
    left = np.zeros((H, W), bool)
    left[:, :W // 2] = True
    assert flicker(clip, left) == 0
    right = ~left
    assert flicker(clip, right) > 5


def test_seams_zero_for_identical_runs_and_finds_a_planted_difference():
    whole = np.stack([texture(H, W, seed=s) for s in range(8)])
    assert seams(whole.copy(), whole, [0, 4]) == {0: 0, 4: 0}
    whole[4, 10, 20, 1] = 100
    segmented = whole.copy()
    segmented[4, 10, 20, 1] = 63   # 37 levels below the whole run's, at a segment start
    segmented[4, 30, 40, 0] = whole[4, 30, 40, 0] ^ 1  # a smaller difference in the same frame
    segmented[5, 0, 0, 0] = whole[5, 0, 0, 0] ^ 255   # not a segment start: not reported
    assert seams(segmented, whole, [0, 4]) == {0: 0, 4: 37}


def test_psnr_known_values():
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    assert psnr(a, a) == math.inf
    b = a + np.uint8(5)  # MSE 25
    assert psnr(b, a) == pytest.approx(10 * math.log10(255 ** 2 / 25))


def test_bench_temporal_runs_on_a_tiny_clip():
    from vsr_ddp.bench import bench_temporal, temporal_table

    r = bench_temporal(size=(64, 36), frames=6, segment=3, warmup=16)
    # warm-up 16 > every start: each segment is read from frame 0, so it equals the whole run
    assert r["seams W=16"]["per_start"] == {0: 0, 3: 0} and r["seams W=16"]["max_any_frame"] == 0
    assert r["seams W=0"]["per_start"][0] == 0 and r["seams W=0"]["per_start"][3] > 0
    assert r["ground truth"]["flicker_static"] == 0 and r["static_share"] >= 0.25
    assert "random weights" in temporal_table(r)
