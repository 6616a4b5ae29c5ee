"""job=upscale: Real-ESRGAN-family super-resolution (any checkpoint spandrel loads) or
classical lanczos/bicubic, frame by frame; optionally the model only inside ``job.spans``."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from ..models.sr import Upscaler
from ..plan import Unit, VideoInfo
from .base import Job, fingerprint

log = logging.getLogger(__name__)


def parse_time(text: str) -> float:
    """'1:02:03.5', '2:03', '93.5' -> seconds."""
    parts = str(text).strip().split(":")
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
        raise ValueError(f"job.spans: cannot read the time {text!r} (use H:MM:SS, M:SS or seconds)")
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + float(p)
    return seconds


def span_frames(spans, info: VideoInfo) -> list[tuple[int, int]]:
    """Time ranges ("0:01:00-0:01:30") -> frame ranges [a, b) of this video, edges snapped to
    the nearest frame boundary (not to segment boundaries)."""
    out = []
    for span in spans or ():
        a, sep, b = str(span).partition("-")
        if not sep:
            raise ValueError(f"job.spans: {span!r} is not a range like 0:01:00-0:01:30")
        t0, t1 = parse_time(a), parse_time(b)
        if t1 <= t0:
            raise ValueError(f"job.spans: {span!r} ends before it starts")
        f0, f1 = info.frame_at(t0), info.frame_at(t1)
        if f1 > f0:
            out.append((f0, f1))
    return out


class UpscaleJob(Job):
    name = "upscale"  # makes frames chunk by chunk (process); single-image SR reads no context
    deep_frames = True  # takes uint16 frames too (a 10-bit input to a 10-bit output)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.upscaler: Upscaler | None = None
        self.fallback: Upscaler | None = None
        self.spans: list[tuple[int, int]] | None = None  # frame ranges for the model, this video

    def setup(self) -> None:
        c = self.cfg
        self.upscaler = Upscaler(str(c.model), device=self.device, scale=c.scale, outscale=c.outscale,
                                 tile=c.tile, tile_pad=c.tile_pad, precision=c.precision,
                                 batch_size=c.batch_size, compile=c.compile,
                                 models_dir=c.models_dir)
        if c.spans:  # job.fallback: lanczos or bicubic (config.check)
            # Same final size as the model's output, so the two kinds of frame splice seamlessly.
            self.fallback = Upscaler(str(c.fallback), device=self.device,
                                     scale=self.upscaler.outscale or self.upscaler.scale)

    def tag(self) -> str:
        s = self.upscaler.outscale or self.upscaler.scale
        return f"{s:g}x"

    def settings(self) -> dict:
        c, up = self.cfg, self.upscaler
        model = str(c.model) if up.path is None else fingerprint(up.path)
        return {"job": self.name, "model": model, "scale": up.scale, "outscale": up.outscale,
                # tiling and precision change pixels only at noise level, but they do change them
                "tile": c.tile, "tile_pad": c.tile_pad, "dtype": str(up.dtype),
                "spans": list(c.spans),
                "fallback": str(c.fallback) if c.spans else None}

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return self.upscaler.output_size(width, height)

    def finish_video(self, info: VideoInfo, output: Path, reader) -> dict:
        """With ``job.preview=true``: ``<stem>.preview.png`` beside the video, the middle frame's
        input crop, its bicubic upscale and the model's output side by side, at the video's
        display aspect. ``reader``: a FrameReader of the input, as the units read it."""
        if not self.cfg.preview:
            return {}
        from ..preview import write_preview

        mid = info.frames // 2
        lr = next(iter(reader.read(mid, mid + 1)))[0]  # (H, W, 3) uint8, display orientation
        path = write_preview(lr, self.upscaler(lr[None])[0], output.with_name(output.stem + ".preview.png"),
                             sar=info.sar)
        return {"preview": str(path)}

    def begin(self, info: VideoInfo, unit: Unit, progress) -> None:
        """Before each unit of ``info``: the model's spans of this video."""
        self.spans = span_frames(self.cfg.spans, info) if self.fallback else None

    def process(self, frames: np.ndarray, first: int) -> np.ndarray:
        """# (B, H, W, 3) uint8, absolute frame index of frames[0] -> (B, H', W', 3) uint8."""
        if self.spans is None:
            return self.upscaler(frames)
        idx = np.arange(first, first + len(frames))
        use_model = np.zeros(len(frames), bool)
        for a, b in self.spans:
            use_model |= (idx >= a) & (idx < b)
        # consecutive runs of the same choice, in order
        cuts = [0, *(np.flatnonzero(np.diff(use_model.astype(np.int8))) + 1), len(frames)]
        parts = [(self.upscaler if use_model[a] else self.fallback)(frames[a:b])
                 for a, b in zip(cuts, cuts[1:])]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
