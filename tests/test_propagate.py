"""job=propagate: PatchMatch on a case with a known answer, flow helpers, blending, propagation
quality on generated footage with real motion, keyframe errors, and a 2-rank run from the
command line."""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from builders import Gate, gated, make_clip, read_frames, sidecars, unit_point, wait_until
from conftest import ROOT, job_cmd, job_env, read_report, run_job
from omegaconf import OmegaConf

from vsr_ddp import shards
from vsr_ddp.jobs.propagate import PropagateJob, key_units
from vsr_ddp.models.blend import histogram_preserving_blend, poisson_fuse
from vsr_ddp.models.ebsynth import Guide, GuideWeights, SynthParams, synthesize
from vsr_ddp.models.flow import FlowError, FlowEstimator, fill_holes, occlusion_mask, warp
from vsr_ddp.models.propagation import Propagator
from vsr_ddp.plan import InputError, VideoInfo

W, H = 128, 96
# CPU settings for the tests: EbSynth's algorithm, fewer iterations (see conf/job/propagate.yaml)
FAST = SynthParams.shipped(search_vote_iters=2, patchmatch_iters=1, max_jump=4)


@contextlib.contextmanager
def one_thread():
    """Two OpenMP threads on a busy 2-core machine are slower than one for these small ops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def smooth_noise(rng, h, w, cell):
    """(h, w, 3) float32 in 0..1: random values on a grid of ``cell`` px, bicubic in between."""
    gh, gw = h // cell + 3, w // cell + 3
    return cv2.resize(rng.random((gh, gw, 3)).astype(np.float32), (gw * cell, gh * cell),
                      interpolation=cv2.INTER_CUBIC)[:h, :w]


def shapes_clip(n: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: a textured background panning 2 px/frame, a textured disc moving
    right-down and a textured box moving left-up over it (occlusions and disocclusions)."""
    rng = np.random.default_rng(seed)
    bh, bw = H + 4 * n, W + 4 * n
    bg = (smooth_noise(rng, bh, bw, 8) * 0.6 + smooth_noise(rng, bh, bw, 2) * 0.4) * 255
    disc = (smooth_noise(rng, H, W, 4) * 0.5 + 0.5 * np.array([1.0, 0.3, 0.2])) * 255
    box = (smooth_noise(rng, H, W, 3) * 0.5 + 0.5 * np.array([0.2, 0.4, 1.0])) * 255
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for t in range(n):
        f = bg[t:t + H, 2 * t:2 * t + W].copy()
        inside = (yy - 40 - t) ** 2 + (xx - 30 - 3 * t) ** 2 < 18 ** 2
        f[inside] = np.roll(disc, (t, 3 * t), (0, 1))[inside]
        inside = (np.abs(yy - 55 + t) < 14) & (np.abs(xx - 95 + 2 * t) < 16)
        f[inside] = np.roll(box, (-t, -2 * t), (0, 1))[inside]
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(out)


def pan_clip(n: int) -> np.ndarray:
    """(n, H, W, 3) uint8: a crop of skimage's astronaut panning 3 px right, 1 px down per frame."""
    data = pytest.importorskip("skimage.data")
    img = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    return np.stack([img[60 + t:60 + t + H, 40 + 3 * t:40 + 3 * t + W] for t in range(n)])


def stylize(frame: np.ndarray) -> np.ndarray:
    """A known style: colour matrix, per-channel curves, darkened edges. (H, W, 3) uint8 -> same."""
    x = frame.astype(np.float32) / 255
    m = np.array([[0.9, 0.3, -0.1], [0.1, 0.6, 0.3], [-0.2, 0.3, 1.0]], np.float32)
    x = np.clip(x @ m.T, 0, 1)
    x = np.stack([x[..., 0] ** 0.6, np.sin(x[..., 1] * np.pi / 2), x[..., 2] ** 1.5], -1)
    g = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255, (0, 0), 1)
    edges = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
    x *= (1 - np.clip(edges * 1.5, 0, 0.8))[..., None]
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float64) - b) ** 2)))


def chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()


# --- PatchMatch, voting, uniformity -------------------------------------------------------------

def test_patchmatch_finds_a_known_shift():
    """Target = a shifted crop of the source: the true NNF is that shift, the vote its style."""
    rng = np.random.default_rng(1)
    big = smooth_noise(rng, 90, 110, 2) * 255
    src = chw(big[:64, :80])
    dy, dx = 9, -6
    tgt = chw(big[10 + dy:10 + dy + 64, 10 + dx:10 + dx + 80])   # target (y, x) = source (y+10+dy, x+10+dx)
    style = 255 - src
    with one_thread():
        res = synthesize(style, [Guide(src, tgt, 1.0)],
                         SynthParams.shipped(uniformity=0, search_vote_iters=2, patchmatch_iters=2))
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(80), indexing="ij")
    ty, tx = yy + 10 + dy, xx + 10 + dx
    # source and target patches fully inside their images (EbSynth clamps reads at the edges)
    inside = (ty >= 2) & (ty < 62) & (tx >= 2) & (tx < 78) & (yy >= 2) & (yy < 62) & (xx >= 2) & (xx < 78)
    hit = (res.nnf[0] == ty) & (res.nnf[1] == tx)
    assert hit[inside].float().mean() > 0.97
    assert (res.image - (255 - tgt)).abs()[:, inside].mean() < 3
    assert res.error[inside].median() < 1.0


def test_uniformity_spreads_the_source_patches():
    """Every target patch matches one small source region best: without the uniformity term the
    NNF piles onto it; with EbSynth's default weight the overused patches get expensive and most
    matches move to the slightly worse rest of the source."""
    src = torch.full((3, 48, 64), 140.0)
    src[:, :, :8] = 128                              # the best region: 1/8 of the source
    tgt = torch.full((3, 48, 64), 128.0)
    style = torch.full((3, 48, 64), 100.0)          # flat: no style term, only the guide and uniformity

    def in_best_region(uniformity):
        with one_thread():
            res = synthesize(style, [Guide(src, tgt, 1.0)],
                             SynthParams.shipped(uniformity=uniformity, search_vote_iters=2,
                                                 patchmatch_iters=2))
        return float((res.nnf[1] < 6).float().mean())   # patch centres wholly inside it

    assert in_best_region(0) > 0.9
    assert in_best_region(3500) < 0.5


# --- Flow, warping, holes, blending ----------------------------------------------------------------

def test_dis_flow_warp_and_occlusion():
    rng = np.random.default_rng(3)
    big = (smooth_noise(rng, 70, 90, 3) * 255).astype(np.uint8)
    a, b = big[:64, 4:84], big[:64, :80]            # b is a shifted 4 px right: a(x) = b(x + 4)
    flow = FlowEstimator()
    flow.setup()
    ab, ba = flow.pair(a, b)
    assert ab.shape == (2, 64, 80)
    assert abs(float(ab[0, 8:-8, 8:-8].median()) - 4) < 0.5 and abs(float(ab[1, 8:-8, 8:-8].median())) < 0.5
    valid = occlusion_mask(ab, ba)
    assert valid[:, :60].float().mean() > 0.9       # a's right edge leaves b: occluded
    assert valid[:, -2:].float().mean() < 0.5
    back = warp(chw(b), ab)
    assert (back - chw(a))[:, 8:-8, 8:-8].abs().mean() < 4
    holes = torch.ones(64, 80, dtype=torch.bool)
    holes[20:30, 30:50] = False
    filled = fill_holes(chw(a) * holes, holes)
    assert torch.equal(filled[:, holes], (chw(a) * holes)[:, holes])
    assert filled[:, ~holes].min() > 0              # filled from around, not left black


def test_raft_weights_load_and_bad_weights(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), path)
    flow = FlowEstimator(weights=str(path), raft_iters=1)
    flow.setup()
    assert flow.kind == "raft_small"
    frames = (np.random.default_rng(0).random((2, 36, 44, 3)) * 255).astype(np.uint8)
    with one_thread():                               # enlarged to 128 px inside: RAFT's minimum
        ab, ba = flow.pair(frames[0], frames[1])
    assert ab.shape == ba.shape == (2, 36, 44) and torch.isfinite(ab).all()
    # large frames are reduced for RAFT (its correlation volume grows with pixels squared), the
    # flow comes back at the frame's size
    seen, raft = [], flow.raft
    flow.raft = lambda x, y, **kw: seen.append(tuple(x.shape[-2:])) or raft(x, y, **kw)
    big = (np.random.default_rng(1).random((2, 144, 256, 3)) * 255).astype(np.uint8)
    with one_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("vsr_ddp.models.flow.RAFT_MAX_SIDE", 200)
        ab, ba = flow.pair(big[0], big[1])
    assert seen == [(128, 232)]  # 144x256 x 8/9: the short side stays at RAFT's 128, sides divisible by 8
    assert ab.shape == ba.shape == (2, 144, 256) and torch.isfinite(ab).all()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FlowError, match="junk.pth"):
        FlowEstimator(weights=str(tmp_path / "junk.pth")).setup()
    with pytest.raises(FlowError, match="does not exist"):
        FlowEstimator(weights=str(tmp_path / "missing.pth")).setup()


def test_blending_helpers():
    rng = np.random.default_rng(4)
    a = (smooth_noise(rng, 32, 40, 2) * 100).astype(np.float32)
    b = (smooth_noise(rng, 32, 40, 2) * 100).astype(np.float32)
    assert np.allclose(histogram_preserving_blend(a, b, 1.0), a, atol=1e-3)
    mix = histogram_preserving_blend(a, b, 0.5)
    assert mix.std() > 0.9 * min(a.std(), b.std()) > (0.5 * a + 0.5 * b).std()   # contrast kept
    assert np.allclose(poisson_fuse(a, a), a, atol=1e-2)
    fused = poisson_fuse(a, a + 10)                  # gradients of a, colours of a + 10: a + 10
    assert np.allclose(fused, a + 10, atol=1e-2)


# --- Quality ------------------------------------------------------------------------------------

def flow_warp(frames: np.ndarray, key: int, target: int, flow: FlowEstimator) -> np.ndarray:
    """The baseline: the key's style carried to ``target`` by flow alone (flows composed, one sample)."""
    step = 1 if key > target else -1
    disp = torch.zeros(2, H, W)                      # target -> current frame, on target's grid
    for cur in range(target, key, step):
        f, _ = flow.pair(frames[cur], frames[cur + step])
        disp = disp + warp(f, disp)
    out = warp(chw(stylize(frames[key])), disp).permute(1, 2, 0).numpy()
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("content", ["shapes", "pan"])
def test_propagation_beats_copying_and_warping_the_nearest_key(content):
    frames = shapes_clip(7) if content == "shapes" else pan_clip(7)
    styled = np.stack([stylize(f) for f in frames])
    flow = FlowEstimator()
    flow.setup()
    with one_thread():
        out = Propagator(FAST, GuideWeights.shipped(), flow)(frames, styled[0], styled[-1])
    assert out.shape == (6, H, W, 3) and np.array_equal(out[0], styled[0])
    ours, near, warped = [], [], []
    for t in range(1, 6):
        key = 0 if t < 3 else 6
        ours.append(psnr(out[t], styled[t]))
        near.append(psnr(styled[key], styled[t]))
        warped.append(psnr(flow_warp(frames, key, t, flow), styled[t]))
    ours, near, warped = np.mean(ours), np.mean(near), np.mean(warped)
    print(f"{content}: propagated {ours:.2f} dB, nearest key {near:.2f} dB, flow-warped key {warped:.2f} dB")
    assert ours >= near + 3
    assert ours > warped


def test_single_sided_units_and_poisson():
    frames = shapes_clip(4, seed=5)[:, :48, :64].copy()
    styled = np.stack([stylize(f) for f in frames])
    with one_thread():
        prop = Propagator(SynthParams.shipped(search_vote_iters=1, patchmatch_iters=1, max_jump=2),
                          poisson=True)
        before = prop(frames, None, styled[-1])          # [0, 3) from the key at 3
        after = prop(frames, styled[0], None)            # [0, 4) from the key at 0
        both = prop(frames, styled[0], styled[-1])
    assert before.shape == (3, 48, 64, 3) and after.shape == (4, 48, 64, 3) and both.shape == (3, 48, 64, 3)
    assert np.array_equal(after[0], styled[0]) and np.array_equal(both[0], styled[0])
    for out, t in ((before[1], 1), (after[2], 2), (both[1], 1), (both[2], 2)):
        assert psnr(out, styled[t]) > psnr(styled[0 if t < 2 else 3], styled[t]) + 3


# --- Keyframes ------------------------------------------------------------------------------------

def make_job(keys, tmp_path: Path, **over) -> PropagateJob:
    cfg = OmegaConf.create({"name": "propagate", "keys": str(keys), "keys_layout": "auto",
                            "input": str(tmp_path / "v.mp4"),
                            "ebsynth": {"patch_size": 5, "uniformity": 3500, "pyramid_levels": -1,
                                        "search_vote_iters": 1, "patchmatch_iters": 1, "max_jump": 2,
                                        "style_weight": 1.0, "seed": 0},
                            "guides": {"color": 6.0, "edge": 0.5, "temporal": 0.5, "position": 2.0},
                            "flow_weights": None, "flow_preset": "medium", "raft_iters": 12, "poisson": False,
                            **over})
    return PropagateJob(cfg, torch.device("cpu"))


def write_key(path: Path, w: int = 64, h: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def test_key_units_cover_the_video():
    units = key_units([3, 9], 16, video=0)
    ranges = [(u.start, u.end, u.read_start, u.read_end) for u in units]
    assert ranges == [(0, 3, 0, 4), (3, 9, 3, 10), (9, 16, 9, 16)]
    units = key_units([0, 15], 16, video=2)
    assert [(u.start, u.end, u.read_end) for u in units] == [(0, 15, 16), (15, 16, 16)]
    assert units[0].video == 2


@pytest.mark.parametrize("case, message", [
    ("misnamed", r"key_a\.png: a keyframe's name must be its 0-based frame index"),
    ("duplicate", r"/4\.png: frame 4 has two keyframes \(00004\.png and 4\.png\)"),
    ("beyond", r"00030\.png: frame 30 is beyond the video \(20 frames"),
    ("size", r"00004\.png: keyframe is 32x48, the video is 64x48"),
    ("unreadable", r"00004\.png: not a readable image"),
    ("empty", r"no keyframes"),
    ("missing", r"no keyframe folder"),
])
def test_bad_keys_are_input_errors_naming_the_file(tmp_path, case, message):
    keys = tmp_path / "keys"
    keys.mkdir()
    write_key(keys / "00000.png")
    (keys / "notes.txt").write_text("ignored")
    if case == "misnamed":
        write_key(keys / "key_a.png")
    elif case == "duplicate":
        write_key(keys / "4.png")
        write_key(keys / "00004.png")
    elif case == "beyond":
        write_key(keys / "00030.png")
    elif case == "size":
        write_key(keys / "00004.png", w=32)
    elif case == "unreadable":
        (keys / "00004.png").write_bytes(b"not a png")
    elif case == "empty":
        (keys / "00000.png").unlink()
    job = make_job(keys if case != "missing" else tmp_path / "nokeys", tmp_path)
    info = VideoInfo(path=str(tmp_path / "v.mp4"), frames=20, fps=Fraction(25), width=64, height=48,
                     codec="h264")
    with pytest.raises(InputError, match=message) as err:
        job.plan_video(info, 0)
    assert "\n" not in str(err.value)


def test_keys_layout_follows_the_input(tmp_path):
    write_key(tmp_path / "keys" / "clip" / "00002.png")
    (tmp_path / "videos").mkdir()
    info = VideoInfo(path=str(tmp_path / "videos" / "clip.mp4"), frames=8, fps=Fraction(25), width=64,
                     height=48, codec="h264")
    folder_job = make_job(tmp_path / "keys", tmp_path, input=str(tmp_path / "videos"))
    assert folder_job.per_video and [u.start for u in folder_job.plan_video(info, 0)] == [0, 2]
    file_job = make_job(tmp_path / "keys" / "clip", tmp_path, input=str(tmp_path / "videos" / "clip.mp4"))
    assert not file_job.per_video and [u.end for u in file_job.plan_video(info, 0)] == [2, 8]


FAST_CLI = ["job.ebsynth.search_vote_iters=1", "job.ebsynth.patchmatch_iters=1", "job.ebsynth.max_jump=2"]


# --- End to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_from_the_command_line(tmp_path):
    """A folder of two videos: one with keys in three intervals (before, between and after its
    keys), one whose keys are misnamed; the first comes out right, the second is reported."""
    videos = tmp_path / "videos"
    good = make_clip(videos / "good.mp4", frames=16, size=(64, 48), fps="25")
    make_clip(videos / "bad.mp4", frames=8, size=(64, 48), fps="25", seed=1)
    src = read_frames(good)
    styled = {k: stylize(src[k]) for k in (3, 9)}
    for k, img in styled.items():
        (tmp_path / "keys" / "good").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "keys" / "good" / f"{k:05d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    write_key(tmp_path / "keys" / "bad" / "first.png")
    out = tmp_path / "out"
    proc = run_job(["job=propagate", f"input={videos}", f"output={out}", f"job.keys={tmp_path / 'keys'}",
                    *FAST_CLI, "device=cpu", "log.progress=false", "work.keep_shards=true"],
                   nproc=2, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = {Path(v["input"]).stem: v for v in read_report(out)["videos"]}
    assert report["good"]["status"] == "ok", report
    assert report["bad"]["status"] == "failed" and "first.png" in report["bad"]["reason"]
    assert not (out / "bad.mp4").exists()
    result = read_frames(out / "good.mp4")
    assert result.shape == (16, 48, 64, 3)
    for k, img in styled.items():                    # keys come back as given, up to H.264 at crf 18
        assert psnr(result[k], img) > 30
    sides = sidecars(out)  # good.mp4's, kept (work.keep_shards=true)
    assert len(sides) == 3

    # Restyle key 9 and run again: the two intervals that use it are redone, [0, 3) is kept.
    before = {p.name: p.read_text() for p in sides}
    restyled = 255 - styled[9]
    cv2.imwrite(str(tmp_path / "keys" / "good" / "00009.png"), cv2.cvtColor(restyled, cv2.COLOR_RGB2BGR))
    run_job(["job=propagate", f"input={videos / 'good.mp4'}", f"output={out}",
             f"job.keys={tmp_path / 'keys'}",
             "job.keys_layout=per_video", *FAST_CLI, "device=cpu", "log.progress=false",
             "work.keep_shards=true"])
    after = {p.name: p.read_text() for p in sides}
    kept = [n for n in before if before[n] == after[n]]
    assert kept == [sides[0].name], kept  # segment_0000 is [0, 3)
    result = read_frames(out / "good.mp4")
    assert psnr(result[9], restyled) > 30 and psnr(result[3], styled[3]) > 30


def one_keyed_video(tmp_path: Path, size: tuple[int, int], frames: int) -> Path:
    """``<tmp>/videos/v.mp4`` with one stylized key for frame 0 in ``<tmp>/keys/v/``: a single
    forward-only unit. Returns the videos folder."""
    videos, keys = tmp_path / "videos", tmp_path / "keys" / "v"
    src = read_frames(make_clip(videos / "v.mp4", frames=frames, size=size, fps="25", audio=False))
    keys.mkdir(parents=True)
    cv2.imwrite(str(keys / "00000.png"), cv2.cvtColor(stylize(src[0]), cv2.COLOR_RGB2BGR))
    return videos


@pytest.mark.slow
def test_a_long_unit_shows_progress_and_a_stop_signal_ends_it_within_seconds(tmp_path):
    """A unit that takes minutes, made so by holding it in the middle (gated:
    tests/builders/gated_main.py holds it once EbSynth has reported its first frames): its frames
    are counted as they are synthesized, so the rank's log shows frames while the unit is
    unfinished; then SIGTERM: the rank leaves within 30 s, as Slurm's USR2-then-TERM two minutes
    before the limit needs, with 128 + 15 and no shard, partial or whole (the stop is checked
    between EbSynth passes: the unit is abandoned, not finished)."""
    videos, out = one_keyed_video(tmp_path, size=(64, 48), frames=12), tmp_path / "out"
    gate = Gate(tmp_path / "gate")
    gate.open(unit_point("v", 0))  # the unit starts ...
    gate.hold(f"{unit_point('v', 0)}-progress")  # ... and stops at its first progress report
    cmd = gated(job_cmd(["job=propagate", f"input={videos}", f"output={out}", f"job.keys={tmp_path / 'keys'}",
                         *FAST_CLI, "device=cpu", "log.progress=false", "log.every_s=1"]))
    proc = subprocess.Popen(cmd, env=gate.env(job_env()), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    log = out / ".vsr_ddp" / "logs" / "rank0.log"
    # progress inside the unit: "this rank N frames" with N > 0 while no shard is finished
    moving = re.compile(r"this rank [1-9]\d* frames \([\d.]+ frames/s\); all ranks \d+/12 frames, ETA \d")
    try:
        wait_until("progress inside the unit", lambda: f"{unit_point('v', 0)}-progress" in gate.reached()
                   and log.exists() and moving.search(log.read_text()) is not None, [proc])
        assert not sidecars(out) and not shards.bundle_sidecars(out)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        proc.kill()
    elapsed = time.monotonic() - t0
    assert status == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    assert elapsed < 30, f"the rank took {elapsed:.1f} s to stop"
    # the unit is v.mp4 alone (a bundle of one clip): no clip shard, bundle record or partial file
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and (
        p.suffix in (".partial", ".mp4") or p.name.startswith(("segment_", "clip_")))]
    assert leftovers == [], leftovers
    assert not shards.bundle_sidecars(out)
    assert not (out / "v.mp4").exists()


def test_calibrate_estimates_a_propagate_run_before_it_starts(tmp_path):
    """dry_run=true job.calibrate=true times one EbSynth synthesis on the video's own frames and
    prints an estimate for the whole run (EbSynth at its default settings), writing nothing."""
    videos, out = one_keyed_video(tmp_path, size=(64, 48), frames=10), tmp_path / "out"
    proc = run_job(["job=propagate", f"input={videos}", f"output={out}", f"job.keys={tmp_path / 'keys'}",
                    "device=cpu", "dry_run=true", "job.calibrate=true"])
    m = re.search(r"estimate: about (.+) on 1 CPU rank \(model ([\d.]+)-[\d.]+ frames/s per rank at 64x48",
                  proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(2)) > 0 and not (out / "v.mp4").exists()
