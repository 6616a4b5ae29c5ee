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

Batch-joint models (a diffusion or transformer VSR whose every output depends on the whole window
of frames processed with it, so chunks can never match each other) use the crossfade mode: the
model declares ``Reach.window`` (L) and ``Reach.crossfade`` (o, 0 < o < L) and implements the
window protocol (:class:`WindowModel`). Its windows lie on one global grid per video, window j
covering frames [j*(L-o), j*(L-o)+L) clipped to the video (the last one, the first to reach the
video's end, may be shorter); a frame's output is the weighted sum of the outputs of the windows
covering it, each window's weight a linear ramp across its overlaps (:func:`window_weight`),
normalised to sum 1, rounded once to uint8. A segment reads exactly the windows that overlap its
owned frames (:func:`window_read_range`) and :class:`Crossfade` blends them, so segments equal
the whole-video run bit for bit; the windows straddling a segment boundary run in both segments
(one, or two where the boundary falls inside an overlap; at most ceil((L-1)/(L-o))).

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
    window: L, for a batch-joint model of the window protocol (:class:`WindowModel`): it makes
        L frames at a time, each output depending on all L; None for a streaming model.
    crossfade: o, the frames consecutive windows share (0 < o < L, checked by job=upscale),
        blended by a linear ramp.
    """

    before: int
    after: int
    recurrent: bool
    exact: bool
    align: int = 1
    window: int | None = None
    crossfade: int = 0

    def __post_init__(self):
        if self.before < 0 or self.after < 0 or self.align < 1:
            raise ValueError(f"bad reach {self}: before and after must be >= 0, align >= 1")
        if (self.window is not None and self.window < 1) or self.crossfade < 0:
            raise ValueError(f"bad reach {self}: window must be None or >= 1, crossfade >= 0")

    def context(self, warmup: int) -> tuple[int, int]:
        """(frames read before a segment's first owned frame, frames read after its last). The
        frames before are rounded up to a multiple of ``align``: segment starts are multiples of
        it, so read starts (a start less the frames before, or frame 0) are too, and a model that
        works on a grid of frame groups (FlashVSR's steps of 8) meets the whole run's grid."""
        before = max(self.before, warmup if self.recurrent else 0)
        return -(-before // self.align) * self.align, self.after


@runtime_checkable
class TemporalModel(Protocol):
    """The streaming protocol every temporal model implements.

    ``feed`` takes the next frames of a read range, in order, # (B, H, W, 3) uint8, and returns
    the outputs # (B', H*scale, W*scale, 3) uint8 of every frame whose ``after`` neighbours have
    now been fed, in order (maybe none). ``last=True``: the read range ends with these frames:
    the outputs still owed come too, the last frame standing in for its missing next neighbours
    (and, after :meth:`start`, the first frame for its missing previous ones). Feeding a range in
    pieces of any size gives the same outputs as feeding it in one call. A model whose
    ``deep_frames`` is True also takes # uint16 frames of a >8-bit video and returns uint16
    (job=upscale then keeps them to the encoder).

    Optional, read with ``getattr``: ``default_warmup`` (job.warmup=auto's number; 16 where absent),
    ``first_window`` (a range shorter than it is padded at its end, so job=upscale reads at least
    that many frames from a read start where the video has them), ``supports_half`` (False: bf16,
    not fp16, for job.precision=auto on CUDA), and a ``first_frame`` parameter of :meth:`start`
    (job=upscale then passes each unit's read_start: FlashVSR draws its noise by absolute frame).
    """

    scale: int
    reach: Reach

    def to(self, device, dtype): ...

    def start(self) -> None:
        """Forget any state: the next frame fed is the first of a read range."""

    def feed(self, frames: np.ndarray, last: bool) -> np.ndarray: ...


@runtime_checkable
class WindowModel(Protocol):
    """The window protocol of a batch-joint model (``reach.window`` set): ``run`` takes the
    frames of one window of the global grid # (L', H, W, 3) uint8, L' <= L (shorter only for a
    video's last window), and returns their outputs # (L', H*scale, W*scale, 3) uint8, every
    output depending on all L' frames. Each call is independent: no state between windows.
    job=upscale blends the windows' overlaps (:class:`Crossfade`)."""

    scale: int
    reach: Reach

    def to(self, device, dtype): ...

    def run(self, frames: np.ndarray) -> np.ndarray: ...


def window_count(n: int, window: int, crossfade: int) -> int:
    """Windows of the grid over a video of ``n`` frames: up to the first that reaches its end."""
    return 1 + max(0, -(-(n - window) // (window - crossfade)))


def window_span(j: int, n: int, window: int, crossfade: int) -> tuple[int, int]:
    """Frames [start, end) of window ``j`` of the grid, clipped to the video."""
    start = j * (window - crossfade)
    return start, min(n, start + window)


def windows_over(start: int, end: int, n: int, window: int, crossfade: int) -> range:
    """The windows of the grid that cover any frame of [start, end)."""
    step = window - crossfade
    first = max(0, (start - window) // step + 1)  # the first whose end passes start
    return range(first, min(window_count(n, window, crossfade), (end - 1) // step + 1))


def window_read_range(start: int, end: int, n: int, window: int, crossfade: int) -> tuple[int, int]:
    """The frames a unit owning [start, end) reads: every window that covers one of them."""
    js = windows_over(start, end, n, window, crossfade)
    return window_span(js[0], n, window, crossfade)[0], window_span(js[-1], n, window, crossfade)[1]


def window_weight(j: int, t: int, n: int, window: int, crossfade: int) -> float:
    """Weight of window ``j``'s output in frame ``t``'s: each window's ramp, 1 inside it and, in
    its overlap of o frames with the next window (k = 0..o-1 there), (o-k)/(o+1) for it and
    (k+1)/(o+1) for the next; the ramps of the windows covering ``t`` normalised to sum 1 (they
    already do unless o > L/2, where three windows may cover a frame). No ramp at the video's ends."""
    count, o = window_count(n, window, crossfade), crossfade

    def ramp(i):
        s, r = i * (window - crossfade), 1.0
        if i > 0:
            r = min(r, (t - s + 1) / (o + 1))
        if i < count - 1:
            r = min(r, (s + window - t) / (o + 1))
        return r

    return ramp(j) / sum(ramp(i) for i in windows_over(t, t + 1, n, window, crossfade))


class Crossfade:
    """One unit's frames through a :class:`WindowModel`: fed the unit's read range
    (:func:`window_read_range`) in order, in chunks of any size, it runs each window of the grid
    once its frames are in (holding at most L input frames), and returns the unit's owned frames
    [start, end) as they are complete (every window covering them run), in order, blended."""

    def __init__(self, model: WindowModel, n: int, start: int, end: int):
        self.model, self.n, self.start, self.end = model, n, start, end
        self.L, self.o = model.reach.window, model.reach.crossfade
        self.js = windows_over(start, end, n, self.L, self.o)
        self.j = self.js[0]  # the next window to run
        self.held = []  # its input frames so far, (H, W, 3) each
        self.acc = {}  # owned frame -> float32 weighted sum of the windows run so far
        self.next_out = start  # the next owned frame to return

    @property
    def done(self) -> bool:
        return self.next_out == self.end

    def feed(self, frames: np.ndarray) -> np.ndarray:
        outs, i = [], 0
        while i < len(frames):
            if self.j >= self.js.stop:
                raise RuntimeError(f"frames fed past the last window of the unit [{self.start}, {self.end})")
            s, e = window_span(self.j, self.n, self.L, self.o)
            take = min(len(frames) - i, e - s - len(self.held))
            self.held += list(frames[i:i + take])
            i += take
            if len(self.held) == e - s:
                outs += self._run(s, e)
        if not outs:
            h, w = frames.shape[1:3]
            return np.empty((0, h * self.model.scale, w * self.model.scale, 3), np.uint8)
        return np.stack(outs)

    def _run(self, s: int, e: int) -> list[np.ndarray]:
        out = self.model.run(np.stack(self.held))
        if len(out) != e - s:
            raise RuntimeError(f"the window model made {len(out)} frames for a window of {e - s}")
        for t in range(max(s, self.start), min(e, self.end)):
            w = window_weight(self.j, t, self.n, self.L, self.o)
            term = out[t - s].astype(np.float32) * np.float32(w)
            self.acc[t] = term if t not in self.acc else self.acc[t] + term
        self.j += 1
        last = self.j >= window_count(self.n, self.L, self.o)
        nxt = e if last else window_span(self.j, self.n, self.L, self.o)[0]
        self.held = self.held[nxt - s:] if not last else []
        made = []
        while self.next_out < min(nxt, self.end):
            made.append(np.clip(np.rint(self.acc.pop(self.next_out)), 0, 255).astype(np.uint8))
            self.next_out += 1
        return made


def load_temporal(path: str | Path, device) -> TemporalModel | WindowModel | None:
    """A temporal model for a checkpoint this project knows as one (today: AnimeSR), on
    ``device``; None for any other checkpoint (the per-frame path, through spandrel)."""
    try:
        from .animesr import load_animesr, looks_like_animesr
    except ImportError:  # the module is optional: without it every checkpoint is per-frame
        return None
    from .sr import load_state_dict

    state = load_state_dict(Path(path))
    if not looks_like_animesr(state):
        return None
    return load_animesr(path, device, state=state)  # the file is read once
