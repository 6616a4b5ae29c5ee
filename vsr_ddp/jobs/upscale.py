"""job=upscale: Real-ESRGAN-family super-resolution (any checkpoint spandrel loads) or
classical lanczos/bicubic, frame by frame; optionally the model only inside ``job.spans``.
A temporal model (vsr_ddp.models.temporal: AnimeSR, FlashVSR with job.model=flashvsr) is fed each
unit's read range in order instead, its context frames' outputs discarded; a batch-joint (window)
model runs the windows of a global grid over the unit's read range, their overlaps crossfaded
(temporal.Crossfade)."""
from __future__ import annotations

import inspect
import logging
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, FlashVSR
from ..models import temporal
from ..models.sr import CLASSICAL, Upscaler, model_path, pick_dtype
from ..plan import Unit, VideoInfo, plan_units
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
    name = "upscale"  # makes frames chunk by chunk (process); reads context only for a temporal model
    deep_frames = True  # takes uint16 frames too (a 10-bit input to a 10-bit output)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.upscaler: Upscaler | None = None
        self.fallback: Upscaler | None = None
        self.spans: list[tuple[int, int]] | None = None  # frame ranges for the model, this video
        self.temporal: temporal.TemporalModel | None = None  # a model of the temporal contract
        self.temporal_path: Path | None = None

    def setup(self) -> None:
        c = self.cfg
        self.flashvsr: FlashVSR | None = None
        if str(c.model) == "flashvsr":
            self.flashvsr = FlashVSR.from_values(c.flashvsr)
            path = Path(self.flashvsr.dir).expanduser()
            self.temporal = self._load_flashvsr(path)
        elif str(c.model) not in CLASSICAL:
            path = model_path(str(c.model), c.models_dir)
            if path.is_file():
                self.temporal = temporal.load_temporal(path, self.device)
        if self.temporal is not None:
            self._setup_temporal(path)
            return
        self.upscaler = Upscaler(str(c.model), device=self.device, scale=c.scale, outscale=c.outscale,
                                 tile=c.tile, tile_pad=c.tile_pad, precision=c.precision,
                                 batch_size=c.batch_size, compile=c.compile,
                                 models_dir=c.models_dir)
        if c.spans:  # job.fallback: lanczos or bicubic (config.check)
            # Same final size as the model's output, so the two kinds of frame splice seamlessly.
            self.fallback = Upscaler(str(c.fallback), device=self.device,
                                     scale=self.upscaler.outscale or self.upscaler.scale)

    def _load_flashvsr(self, folder: Path):
        """FlashVSR's tiny pipeline from job.flashvsr.dir, in the precision job.precision picks on
        this device (auto: bf16 on CUDA, as the original runs; fp32 on the CPU), in job.flashvsr.tile's
        spatial tiles where it is set. A missing or ill-fitting file: load_flashvsr's one-line
        ValueError (exit 2 before any work)."""
        from ..models.flashvsr.pipeline import FlashVSRTiny, load_flashvsr

        o = self.flashvsr
        dtype = pick_dtype(self.cfg.precision, self.device, FlashVSRTiny.supports_half, True)
        return load_flashvsr(folder, self.device, dtype, version=o.version, mode=o.mode,
                             attention=o.attention, sparse_ratio=o.sparse_ratio, kv_ratio=o.kv_ratio,
                             local_range=o.local_range, seed=o.seed, tile=o.tile,
                             tile_overlap=o.tile_overlap)

    def _setup_temporal(self, path: Path) -> None:
        """A temporal model: what it cannot do refused before any work; its units read context."""
        c, model = self.cfg, self.temporal
        for key, value, ok in (("tile", c.tile, not c.tile), ("spans", list(c.spans), not c.spans),
                               ("outscale", c.outscale, not c.outscale or float(c.outscale) == model.scale)):
            if not ok:
                raise ConfigError(f"job.{key}={value}: not supported with the temporal model {path} "
                                  f"(whole frames, every frame, at the model's own scale)")
        if c.scale and float(c.scale) != model.scale:
            raise ConfigError(f"job.scale={c.scale} but {path} is a x{model.scale} model")
        reach = model.reach
        if reach.window is not None:
            if reach.recurrent or not 0 < reach.crossfade < reach.window:
                raise ConfigError(f"job.model={path}: a window model (reach {reach}) needs 0 < crossfade < "
                                  f"window and no recurrent state")
        elif not reach.exact and not reach.recurrent:
            raise ConfigError(f"job.model={path}: a batch-joint model (reach {reach}) must declare its "
                              f"window and crossfade (the crossfade mode, vsr_ddp.models.temporal)")
        # as upscale picks a per-frame model's: fp16 on CUDA for auto (AnimeSR is conv only; FlashVSR
        # says supports_half=False: bf16), fp32 on the CPU
        self.dtype = pick_dtype(c.precision, self.device, getattr(model, "supports_half", True), True)
        model.to(self.device, self.dtype)
        self.temporal_path = path
        # job.warmup=auto: the model's own number (16 where it names none: AnimeSR, default-temporal)
        warmup = int(getattr(model, "default_warmup", 16)) if c.warmup == "auto" else int(c.warmup)
        self.warmup = -(-warmup // reach.align) * reach.align  # read starts stay on the model's grid
        # a model whose noise or positions follow the frame's place in the video (FlashVSR) is told
        # where each read range starts
        start = getattr(model, "start", None)  # a window model has none
        self._absolute = start is not None and "first_frame" in inspect.signature(start).parameters
        self._fade: temporal.Crossfade | None = None  # a window model's unit in progress
        self.reads_context = True  # each unit's read range, context included (Job.read_range)
        # uint16 frames of a >8-bit video go in and come out where the model says it takes them
        # (AnimeSR does); a window model's crossfade rounds to uint8
        self.deep_frames = bool(getattr(model, "deep_frames", False)) and reach.window is None

    def tag(self) -> str:
        if self.temporal is not None:
            return f"{self.temporal.scale:g}x"
        s = self.upscaler.outscale or self.upscaler.scale
        return f"{s:g}x"

    def settings(self) -> dict:
        c, up = self.cfg, self.upscaler
        if self.temporal is not None:
            reach = asdict(self.temporal.reach)
            if reach["window"] is None:  # a streaming model's settings as before the crossfade mode
                del reach["window"], reach["crossfade"]
            out = {"job": self.name, "model": fingerprint(self.temporal_path), "scale": self.temporal.scale,
                   "outscale": None, "dtype": str(self.dtype), "reach": reach,
                   "warmup": self.warmup}  # the resolved number: AnimeSR's runs keep warmup 16
            if self.flashvsr is not None:  # every option changes pixels; the folder is in "model"
                out["flashvsr"] = {k: v for k, v in asdict(self.flashvsr).items() if k != "dir"}
            return out
        model = str(c.model) if up.path is None else fingerprint(up.path)
        return {"job": self.name, "model": model, "scale": up.scale, "outscale": up.outscale,
                # tiling and precision change pixels only at noise level, but they do change them
                "tile": c.tile, "tile_pad": c.tile_pad, "dtype": str(up.dtype),
                "spans": list(c.spans),
                "fallback": str(c.fallback) if c.spans else None}

    def plan_video(self, info: VideoInfo, video_index: int) -> list[Unit] | None:
        """A temporal model's segments: context from its reach and job.warmup, starts aligned; a
        window model's segments read every window of the grid that covers their owned frames;
        per-frame models get the runner's segments."""
        if self.temporal is None:
            return None
        reach = self.temporal.reach
        if reach.window is not None:
            units = plan_units([info], self.cfg.unit, self.cfg.segment_frames, 0, first_index=video_index,
                               context=(0, 0), align=reach.align)
            return [replace(u, **dict(zip(("read_start", "read_end"), temporal.window_read_range(
                u.start, u.end, info.frames, reach.window, reach.crossfade)))) for u in units]
        units = plan_units([info], self.cfg.unit, self.cfg.segment_frames, 0, first_index=video_index,
                           context=reach.context(self.warmup), align=reach.align)
        # A model whose first step takes a window of frames (FlashVSR: 25) pads a shorter read range
        # at its end, and every output of that step depends on the padding: such a range reads its
        # whole first window where the video has it.
        first = int(getattr(self.temporal, "first_window", 0))
        return [replace(u, read_end=min(info.frames, max(u.read_end, u.read_start + first))) for u in units]

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        if self.temporal is not None:
            return width * self.temporal.scale, height * self.temporal.scale
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
        if self.temporal is not None:
            sr = self._whole(lr[None])[0]
        else:
            sr = self.upscaler(lr[None])[0]
        path = write_preview(lr, sr, output.with_name(output.stem + ".preview.png"),
                             sar=info.sar)
        return {"preview": str(path)}

    def begin(self, info: VideoInfo, unit: Unit, progress) -> None:
        """Before each unit of ``info``: the model's spans of this video; a temporal model's fresh
        state and the unit's read range and owned frames."""
        self.spans = span_frames(self.cfg.spans, info) if self.fallback else None
        if self.temporal is not None:
            self._fed = self._made = unit.read_start  # next frame to feed, next output to come
            self._read_end, self._owned = unit.read_end, (unit.start, unit.end)
            if self.temporal.reach.window is not None:
                self._fade = temporal.Crossfade(self.temporal, info.frames, unit.start, unit.end)
            elif self._absolute:
                self.temporal.start(first_frame=unit.read_start)
            else:
                self.temporal.start()

    def _whole(self, frames: np.ndarray) -> np.ndarray:
        """A temporal model's outputs for ``frames`` as one read range (a window model: one window)."""
        if self.temporal.reach.window is not None:
            return self.temporal.run(frames[:self.temporal.reach.window])
        self.temporal.start()
        return self.temporal.feed(frames, last=True)

    def seconds_per_frame(self, frames: np.ndarray, info: VideoInfo) -> float:
        if self.temporal is None:
            return super().seconds_per_frame(frames, info)
        import time

        if self.temporal.reach.window is not None:
            frames = frames[:self.temporal.reach.window]
        self._whole(frames)  # warm-up
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            self._whole(frames)
        sync()
        return (time.perf_counter() - t0) / (3 * len(frames))

    def process(self, frames: np.ndarray, first: int) -> np.ndarray:
        """# (B, H, W, 3) uint8, absolute frame index of frames[0] -> (B, H', W', 3) uint8.
        A temporal model: the next frames of the read range -> the outputs of owned frames made
        so far (context frames' outputs are dropped; maybe none)."""
        if self.temporal is not None:
            return self._feed(frames, first)
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

    def _feed(self, frames: np.ndarray, first: int) -> np.ndarray:
        if first != self._fed:
            raise RuntimeError(f"frames from {first} fed where frame {self._fed} comes next")
        self._fed += len(frames)
        last = self._fed == self._read_end
        if self._fade is not None:
            out = self._fade.feed(frames)
            if last and not self._fade.done:
                raise RuntimeError(f"the unit's read range ended at frame {self._fed} before frame "
                                   f"{self._fade.next_out} was made")
            return out
        out = self.temporal.feed(frames, last=last)
        made, self._made = self._made, self._made + len(out)  # absolute index of out[0]
        if self._made > self._fed or (last and self._made != self._read_end):
            raise RuntimeError(f"the temporal model made outputs up to frame {self._made} with frames up to "
                               f"{self._fed} fed{' (the last)' if last else ''}")
        lo, hi = self._owned
        return out[min(len(out), max(0, lo - made)):max(0, min(len(out), hi - made))]
