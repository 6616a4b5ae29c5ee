"""Temporal quality of a video model's output (issue 24 item 4): warping error, flicker in static
regions, the seam check at segment starts, and PSNR against ground truth.

Every function takes clips as # (T, H, W, 3) uint8 RGB arrays (any integer or float array in the
0..255 range works) and returns figures in uint8 levels (0..255) or, for :func:`psnr`, decibels.
Flow comes from :class:`vsr_ddp.models.flow.FlowEstimator` (OpenCV DIS unless given another);
:func:`pair_flows` computes it once so that several outputs are judged on the same motion.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .models.flow import FlowEstimator, occlusion_mask, warp


def pair_flows(reference: np.ndarray, estimator: FlowEstimator | None = None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each consecutive pair (t, t+1) of ``reference`` # (T, H, W, 3): the flow t+1 -> t,
    # (2, H, W) float32 on frame t+1's grid (pixel x of frame t+1 shows at x + flow(x) in frame t),
    and where it is trustworthy, # (H, W) bool: :func:`occlusion_mask`'s forward-backward check,
    pixels whose source lies outside frame t excluded. T - 1 entries."""
    est = estimator or FlowEstimator()
    out = []
    for t in range(len(reference) - 1):
        nxt_to_cur, cur_to_nxt = est.pair(np.ascontiguousarray(reference[t + 1]),
                                          np.ascontiguousarray(reference[t]))
        out.append((nxt_to_cur.cpu(), occlusion_mask(nxt_to_cur, cur_to_nxt).cpu()))
    return out


def warping_error(frames: np.ndarray, flow: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  flow_source: np.ndarray | None = None, estimator: FlowEstimator | None = None) -> float:
    """Flow-compensated frame-to-frame difference, in uint8 levels (0 = every visible pixel moves
    exactly along the flow; lower is steadier).

    For each consecutive pair of ``frames`` # (T, H, W, 3): frame t is warped (bilinear, backward)
    onto frame t+1's grid with the flow t+1 -> t; the absolute difference to frame t+1 is averaged
    over the 3 channels and over the pixels visible in both frames (the occlusion mask); the result
    is the mean over the T - 1 pairs (each pair weighs the same).

    The flow is, in order of preference: ``flow`` (from :func:`pair_flows`, computed once and
    shared between outputs), else estimated on ``flow_source`` (frames of the same size, e.g. the
    ground truth: the motion then does not depend on the output's own artefacts, which is the
    better choice when a reference exists), else on ``frames`` themselves.
    """
    frames = np.asarray(frames)
    if len(frames) < 2:
        raise ValueError("warping_error needs at least 2 frames")
    if flow is None:
        src = frames if flow_source is None else np.asarray(flow_source)
        if src.shape[:3] != frames.shape[:3]:
            raise ValueError(f"flow_source {src.shape} is not the size of the frames {frames.shape}")
        flow = pair_flows(src, estimator)
    if len(flow) != len(frames) - 1:
        raise ValueError(f"{len(flow)} flows for {len(frames)} frames (need one per consecutive pair)")
    errors = []
    for t, (f, mask) in enumerate(flow):
        cur = torch.from_numpy(np.ascontiguousarray(frames[t])).permute(2, 0, 1).float()
        nxt = torch.from_numpy(np.ascontiguousarray(frames[t + 1])).permute(2, 0, 1).float()
        diff = (warp(cur, f.float()) - nxt).abs().mean(0)  # (H, W)
        if not bool(mask.any()):
            continue
        errors.append(float(diff[mask].mean()))
    if not errors:
        raise ValueError("warping_error: no pixel is visible in both frames of any pair")
    return float(np.mean(errors))


def static_mask(reference: np.ndarray, threshold: float = 4.0) -> np.ndarray:
    """Pixels that stand still in the reference clip # (T, H, W, 3): # (H, W) bool, True where
    every channel's range over the clip (max - min, uint8 levels) is below ``threshold``."""
    ref = np.asarray(reference, dtype=np.float32)
    return (ref.max(0) - ref.min(0)).max(-1) < threshold


def flicker(frames: np.ndarray, mask: np.ndarray) -> float:
    """Flicker in static regions, in uint8 levels: the temporal standard deviation of each pixel
    and channel over the clip # (T, H, W, 3) (population, ddof=0), averaged over the 3 channels and
    the pixels of ``mask`` # (H, W) bool (from :func:`static_mask` on the ground truth). 0 = the
    output holds still where the scene does."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("flicker: the static mask is empty")
    std = np.asarray(frames, dtype=np.float64).std(axis=0).mean(-1)  # (H, W)
    return float(std[mask].mean())


def seams(segmented: np.ndarray, whole: np.ndarray, starts) -> dict[int, int]:
    """The seam check: for each segment start frame s, the largest absolute difference (uint8
    levels, over pixels and channels) between frame s of a run made in segments and the same frame
    of a whole-video run. 0 = the segment starts exactly as the whole run does."""
    a, b = np.asarray(segmented), np.asarray(whole)
    if a.shape != b.shape:
        raise ValueError(f"seams: segmented {a.shape} and whole {b.shape} differ in shape")
    return {int(s): int(np.abs(a[s].astype(np.int32) - b[s].astype(np.int32)).max()) for s in starts}


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio against the ground truth, in dB: 10 log10(255^2 / MSE), the MSE
    over every pixel, channel and frame of the clip together; inf for identical clips."""
    a, b = np.asarray(frames, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: frames {a.shape} and reference {b.shape} differ in shape")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
