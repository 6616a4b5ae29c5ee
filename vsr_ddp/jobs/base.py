"""What the runner needs from a job."""
from __future__ import annotations

import hashlib
import json
from typing import Protocol

import numpy as np


class Job(Protocol):
    """A streaming job (``streaming = True``) gets chunks of frames through :meth:`process`, in
    order, decode and encode overlapped; a whole-unit job gets the unit's entire read range
    through ``process_unit(frames, unit, info) -> owned frames`` (or, to hold less than a unit,
    reads it itself: ``unit_pieces(read, unit, info)`` yields pieces in the decode stage and
    ``process_piece(piece, unit, info)`` turns each into the next owned frames in the model stage)
    and may cut its own units with
    ``plan_video(info, video_index) -> list[Unit]`` (raising plan.InputError to reject a video).
    A job whose units depend on per-video inputs (a prompt file, keyframe images) may give
    ``unit_settings(info, unit) -> dict``: they join that unit's signature only, so editing one
    video's inputs redoes that video's shards (for keyframes: the intervals that use the key), not all.
    """

    name: str
    streaming: bool
    uses_context: bool  # True: frames outside the owned range are passed in as context

    def setup(self) -> None:
        """Load models, once per rank, before any work. Raise for a missing model file."""

    def tag(self) -> str:
        """Work-folder tag: ``<stem>_<tag>`` (e.g. ``4x``)."""

    def settings(self) -> dict:
        """Everything that changes the pixels of every video; shards made with other settings are
        redone."""

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Frame size this job makes from frames of ``width`` x ``height``."""

    def begin(self, info) -> None:
        """Called before each unit, with the VideoInfo of its video."""

    def process(self, frames: np.ndarray, first: int) -> np.ndarray:
        """# (B, H, W, 3) uint8, absolute index of frames[0] -> (B, H', W', 3) uint8."""


def signature(settings: dict) -> str:
    """A short stable hash of a job's settings, stored in every sidecar."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
