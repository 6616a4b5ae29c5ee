"""job=sim2real: FRESCO keyframe translation (SD 1.5 + ControlNet), then EbSynth-style propagation.

    torchrun --standalone --nproc_per_node=8 -m vsr_ddp job=sim2real input=/data/sim_videos \\
        output=/data/real job.prompts=/data/prompts job.base_model=/models/sd15 \\
        job.controlnet=/models/control_canny job.control=canny

Inputs as FRESCO-based Sim2Real batch scripts take them: a folder of videos and a folder of
prompts matched by file stem (``car_01.mp4`` <-> ``car_01.txt``). A video without a prompt is
skipped (``skipped`` in run_report.json) and the batch goes on. Beside a prompt, an optional
``<stem>.yaml`` or ``<stem>.json`` overrides this video's settings (:data:`OVERRIDES`), e.g.
``{"strength": 0.6, "seed": 3, "negative_prompt": "blurry"}``.

Each rank loads the models once; videos go to the ranks whole (one unit per video, claimed by
whichever rank is free).
Per video: frames resized to the working size (short side ``job.short_side``, multiples of 64),
keyframes chosen and translated by FRESCO (:mod:`vsr_ddp.models.fresco`), every frame filled in
from the translated keys by job=propagate's engine (:mod:`vsr_ddp.models.propagation`) at the
working size, then resized back to the input's size; the runner's merge keeps the input's frame
rate and audio. A video is read in passes (frame differences, keyframes, then one key interval at
a time), so memory holds the keyframes and one interval, not the video.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..models import fresco
from ..models.ebsynth import SynthParams
from ..models.propagation import Propagator, key_intervals, propagate_interval
from ..plan import InputError, SkipVideo, Unit, VideoInfo
from .base import Job, fingerprint

log = logging.getLogger(__name__)

OVERRIDE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class VideoOptions:
    """What one video is translated with: the job's config, then its override file. No defaults
    here: conf/job/sim2real.yaml is their one home."""

    prompt: str
    negative_prompt: str
    added_prompt: str
    strength: float
    steps: int
    seed: int
    guidance_scale: float
    cond_scale: float
    min_interval: int
    max_interval: int


# keys an override file may set (the prompt itself comes from <stem>.txt)
OVERRIDES = tuple(f.name for f in fields(VideoOptions) if f.name != "prompt")


def _read_overrides(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text) if text.strip() else {}
        else:
            import yaml  # PyYAML comes with Hydra

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - any parse error is the same to the user
        raise InputError(f"{path}: cannot parse ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings ({', '.join(OVERRIDES)})")
    unknown = sorted(set(data) - set(OVERRIDES))
    if unknown:
        raise InputError(f"{path}: unknown setting(s) {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(OVERRIDES)})")
    return data


class Sim2RealJob(Job):
    name = "sim2real"  # whole videos, read in pieces of its own (unit_pieces, process_piece)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = torch.device(device)
        given = cfg.get("prompts") not in (None, "", "???")
        self.prompts = Path(str(cfg.prompts)).expanduser() if given else None
        self.pipe: fresco.FrescoPipeline | None = None
        self.maps: fresco.ControlMaps | None = None
        self.propagator: Propagator | None = None
        self.dtype = self._dtype(str(cfg.precision))

    def _dtype(self, precision: str) -> torch.dtype:
        table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if precision == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        if precision not in table:
            raise ValueError(f"job.precision must be auto, fp32, fp16 or bf16, not {precision!r}")
        return table[precision]

    # -- once per rank --------------------------------------------------------------------------
    def setup(self) -> None:
        """Check every path first (one-line errors naming what to put where), then load once."""
        c = self.cfg
        if self.prompts is None or not self.prompts.is_dir():
            raise ValueError(f"job.prompts={c.get('prompts')}: give a folder with one <video stem>.txt "
                             f"prompt per video (car_01.mp4 <-> car_01.txt)")
        missing = lambda v: v in (None, "", "???")  # noqa: E731
        if missing(c.get("base_model")) or missing(c.get("controlnet")):
            raise ValueError(f"job.base_model and job.controlnet are required: {fresco.SD15_HINT}; "
                             f"{fresco.CONTROLNET_HINT}")
        fresco.check_model_paths(c.base_model, c.controlnet, c.base_model_config, c.controlnet_config, c.vae)
        self.maps = fresco.ControlMaps(str(c.control), c.annotator, self.device, int(c.canny_low),
                                       int(c.canny_high))
        self.settings_for(self.options_from_config(""))  # bad FRESCO settings fail here, not per video
        self.pipe = fresco.FrescoPipeline.from_local(
            c.base_model, c.controlnet, base_model_config=c.base_model_config,
            controlnet_config=c.controlnet_config, vae=c.vae, device=self.device,
            dtype=self.dtype)
        self.pipe.set_memory_options(vae_tiling=bool(c.vae_tiling), vae_slicing=bool(c.vae_slicing))
        if c.freeu:
            self.pipe.unet.enable_freeu(s1=1.0, s2=1.0, b1=1.2, b2=1.5)  # FRESCO's use_freeu values
        self.propagator = Propagator(SynthParams.from_config(c.ebsynth), poisson=bool(c.poisson),
                                     device=self.device)

    def tag(self) -> str:
        return "sim2real"

    def settings(self) -> dict:
        c = self.cfg
        paths = ("base_model", "controlnet", "base_model_config", "controlnet_config", "vae", "annotator")
        # digest: the <path>:<hash> form these entries have always had, a model file's too
        models = {k: fingerprint(str(c[k]), digest=True) for k in paths if c.get(k) not in (None, "")}
        return {"job": self.name, "models": models, "control": str(c.control), "precision": str(self.dtype),
                "short_side": int(c.short_side), "canny": [c.canny_low, c.canny_high],
                "fresco": self.settings_for(self.options_from_config("")).to_dict(),
                "defaults": {k: v for k, v in vars(self.options_from_config("")).items() if k != "prompt"},
                "freeu": bool(c.freeu), "propagation": self.propagation_settings()}

    def unit_settings(self, info: VideoInfo, unit: Unit) -> dict:
        """This video's prompt and overrides: editing them redoes this video alone."""
        return asdict(self.video_options(info.stem))

    def propagation_settings(self) -> dict:
        return {"ebsynth": SynthParams.from_config(self.cfg.ebsynth).to_dict(),
                "poisson": bool(self.cfg.poisson)}

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    # -- planning -------------------------------------------------------------------------------
    def options_from_config(self, prompt: str) -> VideoOptions:
        c = self.cfg
        return VideoOptions(
            prompt=prompt, negative_prompt=str(c.negative_prompt), added_prompt=str(c.added_prompt),
            strength=float(c.strength), steps=int(c.steps), seed=int(c.seed),
            guidance_scale=float(c.guidance_scale), cond_scale=float(c.cond_scale),
            min_interval=int(c.keyframes.min_interval),
            max_interval=int(c.keyframes.max_interval))

    def video_options(self, stem: str) -> VideoOptions:
        """The prompt of ``<stem>`` and its overrides; SkipVideo when it has no prompt."""
        prompt_file = self.prompts / f"{stem}.txt"
        if not prompt_file.is_file():
            raise SkipVideo(f"no prompt: {prompt_file} does not exist")
        prompt = prompt_file.read_text(encoding="utf-8").strip()
        if not prompt:
            raise InputError(f"{prompt_file}: the prompt is empty")
        opts = self.options_from_config(prompt)
        found = [f for f in (self.prompts / f"{stem}{s}" for s in OVERRIDE_SUFFIXES) if f.is_file()]
        if len(found) > 1:
            raise InputError(f"{stem}: more than one override file ({', '.join(f.name for f in found)}); "
                             f"keep one")
        if found:
            data = _read_overrides(found[0])
            try:
                opts = replace(opts, **{k: type(getattr(opts, k))(v) for k, v in data.items()})
            except (TypeError, ValueError) as e:
                raise InputError(f"{found[0]}: {e}") from None
        if not 0 < opts.strength <= 1:
            raise InputError(f"{stem}: strength must be in (0, 1], not {opts.strength}")
        if opts.steps < 1:
            raise InputError(f"{stem}: steps must be >= 1, not {opts.steps}")
        if not 1 <= opts.min_interval <= opts.max_interval:
            raise InputError(f"{stem}: keyframe intervals need 1 <= min_interval <= max_interval")
        return opts

    def settings_for(self, opts: VideoOptions) -> fresco.FrescoSettings:
        s = fresco.FrescoSettings.from_config({
            **self.cfg.fresco, "steps": opts.steps, "strength": opts.strength,
            "guidance_scale": opts.guidance_scale, "cond_scale": opts.cond_scale, "seed": opts.seed,
            "batch_size": self.cfg.batch_size})
        if s.batch_size < 3:
            raise ValueError(f"job.batch_size must be >= 3 (two reference keys + one new), "
                             f"not {s.batch_size}")
        return s

    def plan_video(self, info: VideoInfo, vi: int) -> list[Unit]:
        """One unit per video (FRESCO's batches share references across the whole video)."""
        self.video_options(info.stem)
        return [Unit(video=vi, seg_idx=0, start=0, end=info.frames, read_start=0, read_end=info.frames)]

    # -- one video ------------------------------------------------------------------------------
    def unit_pieces(self, read: Callable[[int, int], Iterator[np.ndarray]], unit: Unit,
                    info: VideoInfo) -> Iterator[tuple]:
        """The video's inputs, in the runner's decode thread: ("keys", options, keys, keyframes),
        then ("interval", a, b, frames a..b) for every key interval. ``read(start, end)`` yields
        (n, H, W, 3) uint8 chunks; the video is read three times (FRESCO's frame differences, the
        keyframes, the intervals) and never held whole: at most the keyframes and the intervals
        queued for the model stage, at the working size."""
        if (unit.start, unit.end) != (0, info.frames):
            raise RuntimeError(f"sim2real units are whole videos, not [{unit.start}, {unit.end})")
        opts = self.video_options(info.stem)
        size = fresco.work_size(info.width, info.height, int(self.cfg.short_side))

        def frames(end: int, only: set | None = None) -> Iterator[tuple[int, np.ndarray]]:
            i = 0  # (index, (h, w, 3) uint8 at the working size), frames [0, end) or those in ``only``
            for chunk in read(0, end):
                for f in chunk:
                    if only is None or i in only:
                        yield i, fresco.resize_frames(f[None], size)[0]
                    i += 1

        total = info.frames
        diffs = (fresco.frame_differences(f for _, f in frames(total))
                 if opts.min_interval != opts.max_interval else None)
        keys = fresco.select_keyframes(total, opts.min_interval, opts.max_interval, diffs)
        log.info("%s: %d frames at %dx%d, %d keyframes %s", info.stem, total, *size, len(keys), keys)
        yield "keys", opts, keys, dict(frames(keys[-1] + 1, set(keys)))
        for a, b, interval in key_intervals((f for _, f in frames(total)), keys, total):
            yield "interval", a, b, interval

    def seconds_per_frame(self, frames: np.ndarray, info: VideoInfo) -> float:
        """job.calibrate: the propagation part, timed as for job=propagate at the working size (two
        EbSynth syntheses a frame). The keyframes' SD 1.5 translation comes on top (logged)."""
        size = fresco.work_size(info.width, info.height, int(self.cfg.short_side))
        pair = frames[:2] if len(frames) > 1 else np.concatenate([frames, frames])
        pair = fresco.resize_frames(pair, size)
        t0 = time.perf_counter()
        self.propagator(pair, pair[0], None)
        seconds = 2 * (time.perf_counter() - t0)
        log.warning("job.calibrate times sim2real's propagation only (%.1f s a frame at %dx%d); the "
                    "keyframes' SD 1.5 translation (%d steps a batch) comes on top", seconds, *size,
                    int(self.cfg.steps))
        return seconds

    def process_piece(self, piece: tuple, unit: Unit, info: VideoInfo) -> np.ndarray:
        """The model stage: translate the keyframes (no frames out yet), then each interval's owned
        frames, propagated from its keys and resized back: # (b - a, H, W, 3) uint8."""
        if piece[0] == "keys":
            _, opts, keys, keyframes = piece
            embeds = self.pipe.encode_prompt(opts.prompt + opts.added_prompt, opts.negative_prompt)
            self.styled = self.pipe.translate(keyframes, keys, embeds, self.settings_for(opts),
                                              control_maps=self.maps)
            return np.empty((0, info.height, info.width, 3), np.uint8)
        _, a, b, interval = piece
        owned = propagate_interval(interval, a, b, self.styled, info.frames, self.propagator)
        return fresco.resize_frames(owned, (info.width, info.height))
