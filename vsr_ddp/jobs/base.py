"""The Job contract: every hook the runner calls, in the order of a run, with its default.

A job is a small class that subclasses :class:`Job` (so the defaults below apply) and overrides
what it needs; it never touches files. Reading this class and one job file tells a job's whole life:

    once per rank     setup() -> settings(), tag()
    job.calibrate     begin() on the first video's first unit -> seconds_per_frame()
    per video         plan_video() -> units; output_info(); output_size()
    per unit          unit_settings(); begin(info, unit, progress) makes the unit's state;
                      unit_pieces() in the decode thread, process_piece() in the model stage,
                      for each piece; unit_counts()
    per merged video  finish_video()

How a job makes frames is told by the hook it overrides; the runner has one code path (pieces
in, owned frames out):
- override :meth:`process` (upscale): chunks of frames in order, each with its first index —
  the default pieces are the chunks of the frames read;
- override :meth:`process_unit` (propagate): all the frames read for the unit in one array —
  the default piece is that array;
- override :meth:`unit_pieces` and :meth:`process_piece` (sim2real, interpolate): pieces of the
  job's own making, for jobs that hold less than a unit.

The frames read for a unit are its owned frames ``[start, end)``, or, for a job that declares
``reads_context = True``, its read range ``[read_start, read_end)`` (the context its plan gave it:
work.overlap for the runner's segments, or what the job's own ``plan_video`` says) —
:meth:`Job.read_range`, the rule the runner follows too.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..plan import Unit, VideoInfo

Read = Callable[[int, int], Iterator[np.ndarray]]  # FrameReader.read: [start, end) -> (n, H, W, 3) chunks
Progress = Callable[[float], None]  # frames of the unit as good as finished (see Job.begin)


def fingerprint(path, digest: bool = False) -> str:
    """What a model file's settings entry says of it: ``<resolved path>:<size>:<mtime>`` (mtime in
    whole seconds), so replacing the file redoes the shards made with it. A folder: its resolved
    path and 16 hex digits of a hash over ``<relative path>:<size>:<mtime>`` of every file in it.
    ``digest``: a file's line hashed the same way too (``<path>:<hash>``, sim2real's form for
    any model path, kept so its finished shards stay valid)."""
    path = Path(path).expanduser().resolve()
    if path.is_file() and not digest:
        st = path.stat()
        return f"{path}:{st.st_size}:{int(st.st_mtime)}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{path}:{h.hexdigest()[:16]}"


class Job:
    name: str = "job"
    reads_context: bool = False  # True: the unit's read range, context included, is read (read_range)
    deep_frames: bool = False  # True: takes uint16 frames of a >8-bit video (a 10-bit output keeps them)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._overrides("process") and cls._overrides("process_unit"):
            raise TypeError(f"{cls.__name__} overrides both process and process_unit: a job makes "
                            f"frames one way (see vsr_ddp.jobs.base)")

    @classmethod
    def _overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Job, hook)

    # -- once per rank ----------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models, once per rank, before any work. Raise for a missing model file."""

    def settings(self) -> dict:
        """Everything that changes the pixels of every video; shards made with other settings are
        redone. Model files enter as :func:`fingerprint`."""
        raise NotImplementedError(f"job={self.name} must say its settings")

    def tag(self) -> str:
        """Work-folder tag: ``<stem>_<tag>`` (e.g. ``4x``)."""
        raise NotImplementedError(f"job={self.name} must say its work-folder tag")

    def seconds_per_frame(self, frames: np.ndarray, info: VideoInfo) -> float:
        """job.calibrate, after :meth:`begin` on the first unit of ``info``: seconds this rank
        needs per output frame of ``info``, measured on a few of its first frames # (B, H, W, 3).
        Default (jobs that override :meth:`process`): one warm-up and three timed calls of it."""
        if not self._overrides("process"):
            raise NotImplementedError(f"job.calibrate cannot time job={self.name} yet")
        self.process(frames, 0)  # warm-up: allocations, autotuning
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            self.process(frames, 0)
        sync()
        return (time.perf_counter() - t0) / (3 * len(frames))

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

    def begin(self, info: VideoInfo, unit: Unit, progress: Progress) -> None:
        """Before each unit (``info``: its video): make the unit's state here (counts, frames
        carried across pieces), not on its first piece. ``progress(frames_done)``: a job whose
        frames only come out at the end of a long unit (propagate) keeps it for the unit and calls
        it with how many of the unit's frames it has as good as finished, so the bar and the rank
        logs move within seconds. Written frames count anyway; others ignore it."""

    def read_range(self, unit: Unit) -> tuple[int, int]:
        """The frames read for ``unit``: its read range for a job that ``reads_context``, else its
        owned frames."""
        return (unit.read_start, unit.read_end) if self.reads_context else (unit.start, unit.end)

    def unit_pieces(self, read: Read, unit: Unit, info: VideoInfo) -> Iterator:
        """Decode stage: what the model stage gets, piece by piece. Default: (first frame index,
        chunk) pairs for a job that overrides :meth:`process`; all the frames read as one array
        for one that overrides :meth:`process_unit`."""
        start, end = self.read_range(unit)
        if self._overrides("process_unit"):
            yield np.concatenate(list(read(start, end)))  # (T, H, W, 3)
        elif self._overrides("process"):
            for chunk in read(start, end):  # (n, H, W, 3)
                yield start, chunk
                start += len(chunk)
        else:
            raise NotImplementedError(f"job={self.name} overrides none of process, process_unit, "
                                      f"unit_pieces and process_piece: it makes no frames")

    def process_piece(self, piece, unit: Unit, info: VideoInfo) -> np.ndarray:
        """Model stage: a piece -> the next output frames of the unit, in order (maybe none)."""
        if self._overrides("process_unit"):
            out = self.process_unit(piece, unit, info)
            if len(out) != unit.out_frames:
                raise RuntimeError(f"{self.name} made {len(out)} frames for {unit.out_frames}")
            return out
        first, frames = piece
        return self.process(frames, first)

    def process(self, frames: np.ndarray, first: int) -> np.ndarray:
        """Chunk by chunk: # (B, H, W, 3), absolute index of frames[0] -> (B, H', W', 3); a job that
        reads context returns the owned frames' outputs made so far (upscale's temporal models)."""
        raise NotImplementedError(f"job={self.name} does not make frames chunk by chunk")

    def process_unit(self, frames: np.ndarray, unit: Unit, info: VideoInfo) -> np.ndarray:
        """Whole unit: # (T, H, W, 3) frames read -> (unit.out_frames, H', W', 3) owned frames."""
        raise NotImplementedError(f"job={self.name} does not make a unit's frames in one call")

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
