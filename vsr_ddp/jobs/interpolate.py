"""job=interpolate: frame interpolation to an exact output frame rate.

    torchrun --standalone --nproc_per_node=8 -m vsr_ddp job=interpolate input=/data/videos output=/data/out \\
        job.model=rife-hdv3 job.factor=2
    python -m vsr_ddp job=interpolate input=clip.mp4 output=out job.model=flow job.fps=60000/1001

The timing rule is models/interpolation.py's: output frame n sits at n / fps_out, shows source
position n * fps_in / fps_out, and the output lasts as long as the input. A unit owns source frames
[start, end), reads one frame of right context (so the pair across its end is made exactly once,
by it), and makes the output frames whose source position falls in [start, end). Between the two
frames of a scene cut the earlier frame is repeated (no morphing): the cut happens at the later
frame's time, as in vs-rife and SVFI. A pair of identical source frames (a held frame) needs no
model call.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..models import interpolation as interp
from ..models.interpolation import InterpolationError
from ..models.sr import pick_dtype
from ..plan import InputError, Unit, VideoInfo
from .base import Job, Progress, fingerprint

log = logging.getLogger(__name__)


class InterpolateJob(Job):
    name = "interpolate"  # reads its unit itself, piece by piece (unit_pieces / process_piece)
    reads_context = True  # one source frame past the owned range (plan_video)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.engine = None
        self.factor = None if cfg.fps not in (None, "") else interp.parse_rational(cfg.factor)
        self.fps = None if self.factor is not None else interp.parse_rational(cfg.fps)
        self.threshold = float(cfg.scene_threshold)
        self.counts = {"scene_cuts": 0, "held_frames": 0, "interpolated_frames": 0}
        self.model_file: Path | None = None

    # -- once per rank ----------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.cfg
        model = str(c.model)
        precision = str(c.precision)  # one of auto, fp32, fp16, bf16 (config.check)
        # RIFE's dtype, as upscale picks its model's: fp16 on CUDA for auto, fp32 on the CPU
        dtype = pick_dtype(precision, self.device, supports_half=True, supports_bf16=True)
        if model == "blend":
            self.engine = interp.Blend()
        elif model == "flow":
            self.engine = interp.FlowInterp(self.device, c.flow_weights, c.flow_preset)
        else:
            from ..models.rife import CheckpointError

            self.model_file = self._rife_file(model)
            self.engine = interp.Eden.load(self.model_file, self.device, dtype, int(c.seed))
            if self.engine is None:  # not an EDEN checkpoint (by its keys): RIFE's loader says what it is
                try:
                    self.engine = interp.Rife(self.model_file, self.device, float(c.scale), dtype)
                except CheckpointError as e:  # unreadable, or neither RIFE HDv3 nor a Practical-RIFE 4.x
                    raise InterpolationError(f"job.model: {e}") from None
            log.info("job.model: %s is %s", self.model_file, self.engine.description)
        if self.engine.midpoint_only and self.factor is not None:
            self._check_midpoints(self.factor, f"job.factor={self.factor}")

    def _rife_file(self, model: str) -> Path:
        """The checkpoint ``job.model`` names: the fetched ``rife-hdv3``, or a file that exists
        (what it is, the loader tells)."""
        from ..models import published

        if model == "rife-hdv3":
            try:
                path = published.weights_path(model, published.models_dir(self.cfg.models_dir))
            except FileNotFoundError as e:
                raise InterpolationError(f"job.model: {e}") from None
        else:
            path = Path(model).expanduser()
            if not path.is_file():
                raise InterpolationError(f"job.model: {path} does not exist (rife-hdv3, a RIFE flownet.pkl, "
                                         f"an EDEN eden.pt, flow or blend)")
        return path

    def _check_midpoints(self, ratio: Fraction, what: str) -> None:
        """A midpoint model reaches times k / 2**m only: the output/input rate ratio's numerator
        (in lowest terms) must be a power of two (2, 4, 8, 1/2, 4/3 ...)."""
        q = ratio.numerator
        if q & (q - 1):
            raise InterpolationError(
                f"{what} needs frames at thirds or fifths of a frame interval, which {self.cfg.model} (a "
                f"midpoint model: 2x, 4x, 8x) cannot make exactly; use job.model=flow or blend, a "
                f"Practical-RIFE 4.x flownet.pkl (any t), or a power-of-two factor")

    @property
    def _seeded(self) -> bool:
        return getattr(self.engine, "seeded", False)

    def tag(self) -> str:
        rate = f"x{self.factor}" if self.factor is not None else f"{self.fps}fps"
        return rate.replace("/", "-")

    def settings(self) -> dict:
        model = str(self.cfg.model) if self.model_file is None else fingerprint(self.model_file)
        return {"job": self.name, "model": model, "factor": str(self.factor), "fps": str(self.fps),
                "scale": float(self.cfg.scale), "scene_threshold": self.threshold,
                "vfr": str(self.cfg.vfr), **({"seed": int(self.cfg.seed)} if self._seeded else {}),
                "dtype": str(getattr(self.engine, "dtype", "float32")),
                "flow_weights": str(self.cfg.flow_weights),
                "flow_preset": str(self.cfg.flow_preset)}

    # -- planning ---------------------------------------------------------------------------------
    def fps_out(self, info: VideoInfo) -> Fraction:
        return self.fps if self.fps is not None else info.fps * self.factor

    def output_info(self, info: VideoInfo) -> VideoInfo:
        """The output timeline: constant rate fps_out, as many frames as fit in the input's duration."""
        fps = self.fps_out(info)
        return replace(info, frames=interp.output_count(info.frames, info.fps, fps), fps=fps, timestamps=())

    def plan_video(self, info: VideoInfo, video_index: int) -> list[Unit]:
        if info.vfr and self.cfg.vfr == "error":
            raise InputError(f"variable frame rate (average {float(info.fps):.3f} fps): retiming needs a "
                             f"constant rate; job.vfr=cfr treats it as constant at its average rate")
        fps_out = self.fps_out(info)
        if self.engine.midpoint_only and self.fps is not None:
            try:
                self._check_midpoints(fps_out / info.fps, f"job.fps={self.fps} from {info.fps} fps")
            except InterpolationError as e:
                raise InputError(str(e)) from None
        n, n_out = info.frames, interp.output_count(info.frames, info.fps, fps_out)
        segment_frames = int(self.cfg.segment_frames)
        units = []
        for seg_idx, start in enumerate(range(0, n, segment_frames)):
            end = min(n, start + segment_frames)
            a = min(n_out, interp.first_output_at_or_after(start, info.fps, fps_out))
            b = n_out if end == n else min(n_out, interp.first_output_at_or_after(end, info.fps, fps_out))
            if b == a:
                raise InputError(f"segment [{start}, {end}) would make no output frame at {fps_out} fps: "
                                 f"set work.segment_frames to at least {segment_frames * 2}")
            units.append(Unit(video=video_index, seg_idx=seg_idx, start=start, end=end, read_start=start,
                              read_end=min(n, end + 1), out_start=a, out_end=b))
        return units

    # -- one unit ---------------------------------------------------------------------------------
    def begin(self, info: VideoInfo, unit: Unit, progress: Progress) -> None:
        """The unit's state: its counts, the frames carried across pieces, the next output frame."""
        self.counts = dict.fromkeys(self.counts, 0)
        self._frames = {}  # source index -> (H, W, 3) uint8: the last frame carried across pieces
        self._cuts = {}  # source index i -> whether (i, i + 1) is a scene cut
        self._next_out = unit.out_range[0]

    def unit_counts(self) -> dict:
        return dict(self.counts)

    def unit_pieces(self, read: Callable, unit: Unit, info: VideoInfo) -> Iterator:
        """Decode stage: chunks of the read range, each with its first source index."""
        first = unit.read_start
        for chunk in read(unit.read_start, unit.read_end):  # (n, H, W, 3) uint8
            yield first, chunk
            first += len(chunk)

    def process_piece(self, piece, unit: Unit, info: VideoInfo) -> np.ndarray:
        """Model stage: the output frames whose source position lies before the newest frame of
        this piece (the pair they need is complete), in order; after :meth:`begin` on the unit."""
        first, chunk = piece
        frames = self._frames
        for k, frame in enumerate(chunk):
            frames[first + k] = frame
        newest = first + len(chunk) - 1
        fps_in, fps_out = info.fps, self.fps_out(info)
        out_end = unit.out_range[1]
        slots, pairs = [], []  # slots: a frame, or an index into pairs
        while self._next_out < out_end:
            i, t = interp.source_of(self._next_out, info.frames, fps_in, fps_out)
            if t == 0:
                if i > newest:
                    break
                slots.append(frames[i])
            else:
                if i + 1 > newest:
                    break
                a, b = frames[i], frames[i + 1]
                if np.array_equal(a, b):
                    self.counts["held_frames"] += 1
                    slots.append(a)
                elif self._is_cut(i, a, b):
                    # the new shot starts at frame i + 1's time, not before: every position in
                    # (i, i + 1) still belongs to the earlier shot, so it repeats frame i
                    slots.append(a)
                else:
                    pairs.append((a, b, t, i))
                    slots.append(len(pairs) - 1)
            self._next_out += 1
        made = self._run(pairs)
        for key in [k for k in frames if k < newest]:  # only the newest frame is needed again
            del frames[key]
        if not slots:
            return np.empty((0, *chunk.shape[1:]), np.uint8)
        return np.stack([made[s] if isinstance(s, int) else s for s in slots])  # (n, H, W, 3) uint8

    def _is_cut(self, i: int, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether source frames i and i + 1 are a scene cut (asked once per pair, however many
        output frames fall between them)."""
        if self.threshold <= 0:
            return False
        if i not in self._cuts:
            self._cuts[i] = interp.similarity(interp.thumbnail(a), interp.thumbnail(b)) < self.threshold
            self.counts["scene_cuts"] += self._cuts[i]
        return self._cuts[i]

    def _run(self, pairs: list) -> list:
        """The engine over the pairs, job.batch_size at a time: a list of (H, W, 3) uint8."""
        out = []
        batch = int(self.cfg.batch_size)
        for s in range(0, len(pairs), batch):
            part = pairs[s:s + batch]
            a = np.stack([p[0] for p in part])
            b = np.stack([p[1] for p in part])
            ts = [p[2] for p in part]
            # a sampling engine (EDEN) draws each pair's noise from its source index: the same
            # frames whichever rank, unit or rerun makes the pair
            out.extend(self.engine(a, b, ts, keys=[p[3] for p in part]) if self._seeded
                       else self.engine(a, b, ts))
        self.counts["interpolated_frames"] += len(pairs)
        return out
