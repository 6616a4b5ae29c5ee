"""The Job contract: every hook the runner calls, in the order of a run, with its default.

A job is a small class that subclasses :class:`Job` (so the defaults below apply) and overrides
what it needs; it never touches files. Reading this class and one job file tells a job's whole life:

    once per rank     setup() -> settings(), tag()
    per video         plan_video() -> units; output_info(); output_size()
    per unit          unit_settings(); begin(); unit_pieces() in the decode thread,
                      process_piece() in the model stage, for each piece; unit_counts()
    per merged video  finish_video()

Three ways to make frames, one code path in the runner (pieces in, owned frames out):
- streaming jobs (``streaming = True``: upscale) take chunks of frames in order through
  :meth:`process` — the default pieces are the read range's chunks;
- whole-unit jobs (propagate) take the unit's entire read range through :meth:`process_unit`
  — the default piece is that range in one array;
- jobs that hold less than a unit (sim2real, interpolate) override :meth:`unit_pieces` and
  :meth:`process_piece` themselves.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from ..plan import Unit, VideoInfo

Read = Callable[[int, int], Iterator[np.ndarray]]  # FrameReader.read: [start, end) -> (n, H, W, 3) chunks


class Job(Protocol):
    name: str
    streaming: bool = True  # frames in order through process(); False: process_unit or own pieces
    uses_context: bool = False  # True: the read range (owned frames plus work.overlap) is passed in
    deep_frames: bool = False  # True: takes uint16 frames of a >8-bit video (a 10-bit output keeps them)

    def progress(self, frames_done: float) -> None:
        """The runner sets this before each unit: a job whose frames only come out at the end of a
        long unit (propagate) calls it with how many of the unit's frames it has as good as
        finished, so the bar and the rank logs move within seconds. Written frames count anyway."""

    # -- once per rank ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models, once per rank, before any work. Raise for a missing model file."""

    def settings(self) -> dict:
        """Everything that changes the pixels of every video; shards made with other settings are
        redone."""
        ...

    def tag(self) -> str:
        """Work-folder tag: ``<stem>_<tag>`` (e.g. ``4x``)."""
        ...

    # -- per video --------------------------------------------------------------------------------
    def plan_video(self, info: VideoInfo, video_index: int) -> list[Unit] | None:
        """The units of one video, or None for the runner's segments (work.unit, segment_frames,
        overlap). Raise plan.InputError to fail the video, plan.SkipVideo to leave it out."""
        return None

    def output_info(self, info: VideoInfo) -> VideoInfo:
        """The output's frame count and timeline (a retiming job changes them); default the input's."""
        return info

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Frame size this job makes from frames of ``width`` x ``height``."""
        return width, height

    # -- per unit ---------------------------------------------------------------------------------
    def unit_settings(self, info: VideoInfo, unit: Unit) -> dict:
        """What this unit alone depends on (a prompt file, two keyframes): it joins this unit's
        signature only, so editing one video's inputs redoes that video's shards, not all."""
        return {}

    def begin(self, info: VideoInfo) -> None:
        """Called before each unit, with the VideoInfo of its video."""

    def unit_pieces(self, read: Read, unit: Unit, info: VideoInfo) -> Iterator:
        """Decode stage: what the model stage gets, piece by piece. Default: (first frame index,
        chunk) pairs for streaming jobs; the whole read range as one array otherwise."""
        start, end = (unit.read_start, unit.read_end) if self.uses_context else (unit.start, unit.end)
        if self.streaming:
            for chunk in read(start, end):  # (n, H, W, 3)
                yield start, chunk
                start += len(chunk)
        else:
            yield np.concatenate(list(read(start, end)))  # (T, H, W, 3)

    def process_piece(self, piece, unit: Unit, info: VideoInfo) -> np.ndarray:
        """Model stage: a piece -> the next output frames of the unit, in order (maybe none)."""
        if self.streaming:
            first, frames = piece
            return self.process(frames, first)
        out = self.process_unit(piece, unit, info)
        if len(out) != unit.out_frames:
            raise RuntimeError(f"{self.name} made {len(out)} frames for {unit.out_frames}")
        return out

    def process(self, frames: np.ndarray, first: int) -> np.ndarray:
        """Streaming jobs: # (B, H, W, 3), absolute index of frames[0] -> (B, H', W', 3)."""
        raise NotImplementedError(f"job={self.name} is not a streaming job")

    def process_unit(self, frames: np.ndarray, unit: Unit, info: VideoInfo) -> np.ndarray:
        """Whole-unit jobs: # (T, H, W, 3) read range -> (unit.out_frames, H', W', 3) owned frames."""
        raise NotImplementedError(f"job={self.name} makes frames piece by piece or streaming")

    def seconds_per_frame(self, frames: np.ndarray, info: VideoInfo) -> float:
        """job.calibrate: seconds this rank needs per output frame of ``info``, measured on a few
        of its first frames # (B, H, W, 3). Default (streaming jobs): one warm-up and three timed
        calls of :meth:`process`."""
        if not self.streaming:
            raise NotImplementedError(f"job.calibrate cannot time job={self.name} yet")
        self.process(frames, 0)  # warm-up: allocations, autotuning
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            self.process(frames, 0)
        sync()
        return (time.perf_counter() - t0) / (3 * len(frames))

    def unit_counts(self) -> dict:
        """What the job counted in the unit just made (scene cuts, ...): into its sidecar and,
        summed per video, the run report."""
        return {}

    # -- per merged video -------------------------------------------------------------------------
    def finish_video(self, info: VideoInfo, output: Path, reader) -> dict:
        """After a video is merged (``reader``: a FrameReader of the input): extra report fields,
        e.g. upscale's side-by-side preview."""
        return {}


def signature(settings: dict) -> str:
    """A short stable hash of a job's settings, stored in every sidecar."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
