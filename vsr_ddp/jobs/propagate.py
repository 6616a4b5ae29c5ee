"""job=propagate: carry stylized keyframes through a video, EbSynth-style (Rerender's blender).

    torchrun --standalone --nproc_per_node=8 -m vsr_ddp job=propagate input=shot.mp4 output=out job.keys=keys/

``job.keys`` is a folder of PNG/JPG keyframes named by their 0-based frame index (``12.png``,
``00012.png``), each the size of the video. For a folder of videos, each video's keys live in
``job.keys/<video stem>/``. A work unit is one key interval: between keys a < b, frames a+1..b-1
are synthesized forward from a and backward from b, then blended; frames before the first key
take the first key only, frames after the last key the last key only; a key frame's output is
the key itself. Intervals are independent, so one long video spreads over the ranks. The engine
(:class:`vsr_ddp.models.propagation.Propagator`) is shared with job=sim2real; this module holds
the keyframe files and the units.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..models.ebsynth import GuideWeights, SynthParams
from ..models.flow import FlowEstimator
from ..models.propagation import Propagator
from ..plan import InputError, Unit, VideoInfo
from .base import Job, Progress, fingerprint

log = logging.getLogger(__name__)

KEY_EXTENSIONS = (".png", ".jpg", ".jpeg")


# --- Keyframes -----------------------------------------------------------------------------------

def find_keys(folder: Path) -> dict[int, Path]:
    """Frame index -> keyframe file of one video's key folder. Other files are ignored; an
    image whose name is not a frame index, or two files for one frame, are errors."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no keyframe folder here (job.keys: PNG/JPG named by frame index, "
                         f"e.g. 00012.png; for a folder of videos, one subfolder per video stem)")
    keys: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix.lower() not in KEY_EXTENSIONS:
            continue
        if not re.fullmatch(r"\d+", f.stem):
            raise InputError(f"{f}: a keyframe's name must be its 0-based frame index (12.png, 00012.png)")
        idx = int(f.stem)
        if idx in keys:
            raise InputError(f"{f}: frame {idx} has two keyframes ({keys[idx].name} and {f.name})")
        keys[idx] = f
    if not keys:
        raise InputError(f"{folder}: no keyframes (PNG/JPG named by 0-based frame index, e.g. 00012.png)")
    return dict(sorted(keys.items()))


def check_keys(keys: dict[int, Path], info: VideoInfo) -> None:
    """Every key within the video and of the video's size (image headers only)."""
    from PIL import Image

    for idx, path in keys.items():
        if idx >= info.frames:
            raise InputError(f"{path}: frame {idx} is beyond the video "
                             f"({info.frames} frames, 0..{info.frames - 1})")
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:  # noqa: BLE001 - any decoder complaint means the same to the user
            raise InputError(f"{path}: not a readable image ({e.__class__.__name__})") from None
        if (w, h) != (info.width, info.height):
            raise InputError(f"{path}: keyframe is {w}x{h}, the video is {info.width}x{info.height}")


def read_key(path: Path) -> np.ndarray:
    """# (H, W, 3) uint8 RGB (alpha dropped, grey expanded)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def key_units(keys: list[int], frames: int, video: int) -> list[Unit]:
    """One unit per key interval. Keys k0 < ... < kn: [0, k0) reading [0, k0 + 1) when k0 > 0;
    [ki, ki+1) reading [ki, ki+1 + 1) (the right key's source frame too); [kn, N) reading [kn, N)."""
    bounds = ([0] if keys[0] > 0 else []) + list(keys) + [frames]
    units = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        read_end = b + 1 if b in keys else b
        units.append(Unit(video=video, seg_idx=i, start=a, end=b, read_start=a, read_end=read_end))
    return units


# --- The job -------------------------------------------------------------------------------------

class PropagateJob(Job):
    name = "propagate"     # makes a unit's frames in one call (process_unit)
    reads_context = True   # the right key's source frame is read beyond the owned range

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = torch.device(device)
        c = cfg
        self.params = SynthParams.from_config(c.ebsynth)
        self.weights = GuideWeights.from_config(c.guides)
        keys = c["keys"]  # not c.keys: that is DictConfig's own method
        if not keys:
            raise ValueError("job.keys: give the folder of stylized keyframes (PNG/JPG named by frame index)")
        self.keys_root = Path(str(keys)).expanduser()
        self.per_video = self._per_video(c)
        self.flow = FlowEstimator(c.flow_weights or None, device=self.device,
                                  dis_preset=str(c.flow_preset), raft_iters=int(c.raft_iters))
        self.propagator: Propagator | None = None
        self.keys: dict[str, dict[int, Path]] = {}     # video path -> its keys
        self.progress: Progress = lambda frames_done: None  # the unit's, from begin

    @staticmethod
    def _per_video(c) -> bool:
        layout = str(c.keys_layout)  # auto, flat or per_video (config.check)
        if layout != "auto":
            return layout == "per_video"
        # auto: a folder input keeps each video's keys in <keys>/<stem>/, a single file in <keys>
        inp = c.input
        return bool(inp) and Path(str(inp)).expanduser().is_dir()

    def setup(self) -> None:
        if not self.keys_root.is_dir():
            raise FileNotFoundError(f"job.keys: {self.keys_root} is not a folder")
        self.flow.setup()
        self.propagator = Propagator(self.params, self.weights, self.flow, bool(self.cfg.poisson),
                                     self.device)

    def tag(self) -> str:
        return "prop"

    def settings(self) -> dict:
        c = self.cfg
        flow = "dis:" + str(c.flow_preset)
        if c.flow_weights:
            flow = f"raft:{fingerprint(str(c.flow_weights))}:{c.raft_iters}"
        return {"job": self.name, "synth": self.params.to_dict(), "guides": asdict(self.weights),
                "poisson": bool(c.poisson), "flow": flow, "per_video": self.per_video}

    def unit_settings(self, info: VideoInfo, unit: Unit) -> dict:
        """The bytes of the keys this interval starts and ends at (what process_unit reads):
        editing one key redoes the two intervals that use it, adding one splits its interval."""
        keys = self.video_keys(info)
        used = [i for i in (unit.start, unit.end) if i in keys and i < info.frames]
        return {"keys": {i: hashlib.sha256(keys[i].read_bytes()).hexdigest()[:16] for i in used}}

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def video_keys(self, info: VideoInfo) -> dict[int, Path]:
        if info.path not in self.keys:
            folder = self.keys_root / info.stem if self.per_video else self.keys_root
            keys = find_keys(folder)
            check_keys(keys, info)
            self.keys[info.path] = keys
        return self.keys[info.path]

    def plan_video(self, info: VideoInfo, vi: int) -> list[Unit]:
        """Units = key intervals (independent of work.unit); raises InputError for bad keys."""
        return key_units(list(self.video_keys(info)), info.frames, vi)

    def begin(self, info: VideoInfo, unit: Unit, progress: Progress) -> None:
        self.video_keys(info)
        self.progress = progress  # EbSynth's share done, told while process_unit runs

    def seconds_per_frame(self, frames: np.ndarray, info: VideoInfo) -> float:
        """job.calibrate: one EbSynth synthesis timed (frames[1] from frames[0] as its own key); a
        frame between two keys takes two, one from each side, and a blend."""
        pair = frames[:2] if len(frames) > 1 else np.concatenate([frames, frames])
        t0 = time.perf_counter()
        self.propagator(pair, pair[0], None)
        return 2 * (time.perf_counter() - t0)

    def process_unit(self, frames: np.ndarray, unit: Unit, info: VideoInfo) -> np.ndarray:
        """# (T, H, W, 3) uint8 of [read_start, read_end) -> (end - start, H, W, 3) uint8."""
        keys = self.video_keys(info)
        expected = unit.read_end - unit.read_start
        if len(frames) != expected:
            raise RuntimeError(f"read {len(frames)} frames for [{unit.read_start}, {unit.read_end}), "
                               f"expected {expected}")
        left = read_key(keys[unit.start]) if unit.start in keys else None
        right = read_key(keys[unit.end]) if unit.end in keys and unit.end < info.frames else None
        for key, idx in ((left, unit.start), (right, unit.end)):
            if key is not None and key.shape != frames.shape[1:]:
                raise InputError(f"{keys[idx]}: keyframe is {key.shape[1]}x{key.shape[0]}, "
                                 f"the video is {frames.shape[2]}x{frames.shape[1]}")
        out = self.propagator(frames, left, right,
                              on_progress=lambda share: self.progress(share * unit.frames))
        if len(out) != unit.frames:
            raise RuntimeError(f"made {len(out)} frames for [{unit.start}, {unit.end})")
        return out
