"""The temporal model contract of job=upscale: video super-resolution models that look at
neighbouring frames (EDVR's window of ±2 frames), carry a state from frame to frame (AnimeSR, the
BasicVSR family's forward pass) or both.

A temporal model declares its :class:`Reach`; the planner gives each runner segment the context
that reach asks for (``plan.plan_units`` with ``context=(before, after)``, ``align``), the job
feeds the segment's whole read range in order and keeps only the outputs of the frames the
segment owns: context frames are read and fed, their outputs are discarded, never blended. The
edge rule (the first frame stands in for the frames before it, the last for those after it)
applies only where a read range starts or ends, which for a segment with enough context is the
video's true first or last frame.

A model whose reach is ``exact`` makes, from a segment read with enough context (``before`` past
frames; for a recurrent model, from frame 0), the very frames of a whole-video run, so segment
boundaries are invisible. A recurrent model read from a later frame starts from a fresh state:
``job.warmup`` frames fed before the first owned frame stand in for the unbounded past, and the
difference they leave at the segment's first owned frame falls as the warm-up grows.

Batch-joint models (whose outputs depend on which frames share a batch, so chunks can never
match a whole-video run) would need a crossfade over overlapping segments; that mode is not
implemented: such a model is refused (``exact=False`` with ``recurrent=False``).

Per-frame models (everything spandrel loads) do not use this module: :func:`load_temporal`
returns None for them and job=upscale works frame by frame as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Reach:
    """What a temporal model needs around the frames it makes.

    before: past frames an output depends on directly (a window model's left half; 0 for a
        purely recurrent one).
    after: future frames that must have been fed before a frame's output can be made.
    recurrent: a state is carried from frame to frame, so ``before`` is effectively unbounded:
        a warm-up of ``job.warmup`` frames stands in for the past.
    exact: a segment given enough context makes exactly the frames of a whole-video run (for a
        recurrent model: one read from frame 0).
    align: segment starts must be multiples of this (a model that works in groups of frames).
    """

    before: int
    after: int
    recurrent: bool
    exact: bool
    align: int = 1

    def __post_init__(self):
        if self.before < 0 or self.after < 0 or self.align < 1:
            raise ValueError(f"bad reach {self}: before and after must be >= 0, align >= 1")

    def context(self, warmup: int) -> tuple[int, int]:
        """(frames read before a segment's first owned frame, frames read after its last)."""
        return max(self.before, warmup if self.recurrent else 0), self.after


@runtime_checkable
class TemporalModel(Protocol):
    """The streaming protocol every temporal model implements.

    ``feed`` takes the next frames of a read range, in order, # (B, H, W, 3) uint8, and returns
    the outputs # (B', H*scale, W*scale, 3) uint8 of every frame whose ``after`` neighbours have
    now been fed, in order (maybe none). ``last=True``: the read range ends with these frames:
    the outputs still owed come too, the last frame standing in for its missing next neighbours
    (and, after :meth:`start`, the first frame for its missing previous ones). Feeding a range in
    pieces of any size gives the same outputs as feeding it in one call.
    """

    scale: int
    reach: Reach

    def to(self, device, dtype): ...

    def start(self) -> None:
        """Forget any state: the next frame fed is the first of a read range."""

    def feed(self, frames: np.ndarray, last: bool) -> np.ndarray: ...


def load_temporal(path: str | Path, device) -> TemporalModel | None:
    """A temporal model for a checkpoint this project knows as one (today: AnimeSR), on
    ``device``; None for any other checkpoint (the per-frame path, through spandrel)."""
    try:
        from .animesr import load_animesr, looks_like_animesr
    except ImportError:  # the module is optional: without it every checkpoint is per-frame
        return None
    from .sr import load_state_dict

    if not looks_like_animesr(load_state_dict(Path(path))):
        return None
    return load_animesr(path, device)
