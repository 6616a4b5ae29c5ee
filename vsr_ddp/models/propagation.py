"""Keyframe propagation: the engine both job=propagate and job=sim2real run between two keys.

Between keys a < b, frames a+1..b-1 are synthesized forward from a and backward from b (optical
flow, Rerender's guides, EbSynth, :mod:`.ebsynth`) and blended (:mod:`.blend`); before the first
key only the first key is carried (backward), after the last key only the last one (forward).
No files and no runner here: the jobs decide where frames and keys come from.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .blend import IntervalBlender
from .ebsynth import GuideWeights, SynthParams, propagate
from .flow import FlowEstimator, occlusion_mask


class Propagator:
    """Flow + guides + EbSynth + blending for one key interval."""

    def __init__(self, params: SynthParams, weights: GuideWeights | None = None,
                 flow: FlowEstimator | None = None, poisson: bool = False,
                 device: torch.device = torch.device("cpu")):
        # job=sim2real has no job.guides: it carries its keys with job=propagate's shipped weights
        self.params, self.weights, self.poisson = params, weights or GuideWeights.shipped(), poisson
        self.device = torch.device(device)
        self.flow = flow or FlowEstimator(device=self.device)

    def _pass(self, key: np.ndarray, frames: np.ndarray, order: list[int]):
        """Propagate ``key`` (the style of frames[order[0]]) to frames[order[1:]], in that order.
        Yields (output, error) per target frame."""
        def flow_to_prev(i: int):
            cur, prev = order[i + 1], order[i]
            to_prev, to_cur = self.flow.pair(frames[cur], frames[prev])
            return to_prev, occlusion_mask(to_prev, to_cur)

        targets = [frames[j] for j in order[1:]]
        return propagate(key, frames[order[0]], targets, flow_to_prev, self.params, self.weights, self.device)

    def __call__(self, frames: np.ndarray, left: np.ndarray | None, right: np.ndarray | None,
                 on_progress: Callable[[float], None] | None = None) -> np.ndarray:
        """frames: (T, H, W, 3) uint8 RGB. ``left`` is the key of frames[0], ``right`` of frames[-1]
        (either may be None). Returns the owned frames: (T - 1 if right else T, H, W, 3) uint8 -
        the left key itself, then the synthesized frames; the right key's frame is not included.
        ``on_progress(fraction)`` after each synthesis: the share of this interval's work done."""
        t = len(frames)
        if left is None and right is None:
            raise ValueError("an interval needs at least one key")
        fwd = list(range(t)) if right is None else list(range(t - 1))
        bwd = [] if right is None else list(range(t - 1, -1 if left is None else 0, -1))
        total = max(1, (len(fwd) - 1 if left is not None else 0) + max(0, len(bwd) - 1))
        done = [0]

        def counted(results):  # the syntheses of one pass, reported as they finish
            for r in results:
                done[0] += 1
                if on_progress is not None:
                    on_progress(done[0] / total)
                yield r

        if right is None:                                   # after the last key: forward only
            outs = [o for o, _ in counted(self._pass(left, frames, fwd))]
            return np.stack([left, *outs])
        # backward from the right key first: kept (with errors) for the blend
        back = list(counted(self._pass(right, frames, bwd)))[::-1]
        if left is None:                                    # before the first key: backward only
            return np.stack([o for o, _ in back])
        blend = IntervalBlender(t - 2, poisson=self.poisson, patch=self.params.patch_size)
        out = [left]
        for (fo, fe), (bo, be) in zip(counted(self._pass(left, frames, fwd)), back):
            out.append(blend(fo, bo, fe, be))
        return np.stack(out)


def key_intervals(frames: Iterable[np.ndarray], keys: list[int], total: int
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Cut a stream of ``total`` frames at the keys: (a, b, frames a..b) for neighbouring keys a < b
    (frame b included: the right key's own frame), then (a, total, frames a..total-1) after the
    last key. Holds one interval at a time."""
    if not keys or keys[0] != 0 or keys[-1] >= total:
        raise ValueError(f"keyframes {keys} do not start at frame 0 or go beyond {total} frames")
    bounds = keys + [total]
    j, buf, n = 0, [], 0
    for i, f in enumerate(frames):
        buf.append(f)
        n = i + 1
        if i == bounds[j + 1]:
            yield bounds[j], i, np.stack(buf)
            buf, j = [f], j + 1
    if n != total:
        raise RuntimeError(f"read {n} frames, the video has {total}")
    yield bounds[j], total, np.stack(buf)


def propagate_interval(frames: np.ndarray, a: int, b: int, styled: dict[int, np.ndarray], total: int,
                       propagator: Propagator) -> np.ndarray:
    """Owned frames [a, b) from the keys: synthesized forward from key a and backward from key b and
    blended; after the last key (b == total) carried forward from it.
    frames: a..b, or a..total-1 -> # (b - a, H, W, 3) uint8."""
    if b - a == 1:
        return styled[a][None]
    return propagator(frames, styled[a], styled[b] if b < total else None)


def propagate_keys(frames: np.ndarray, styled: dict[int, np.ndarray], propagator: Propagator) -> np.ndarray:
    """Every frame of an in-memory clip from its keys, interval by interval as job=sim2real does.
    # (T, H, W, 3) uint8 + {key: (H, W, 3) uint8} -> (T, H, W, 3) uint8."""
    t = len(frames)
    return np.concatenate([propagate_interval(part, a, b, styled, t, propagator)
                           for a, b, part in key_intervals(frames, sorted(styled), t)])
