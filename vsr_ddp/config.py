"""Typed settings, one dataclass per config group, checked before any work.

    python -m vsr_ddp job=upscale input=clip.mp4 output=out job.model=lanczos job.scale=2

Hydra composes the YAML (``conf/``), which is the one home of every default; the dataclasses here
say what each key is and what it may be, and have no defaults of their own. :func:`check` turns
the composed config into :class:`Settings` on every rank before anything else happens (no probe,
no model load, no file made): a wrong value, a misspelt key or a key left ``???`` stops the run
with one line that names the key, the value and what is allowed (exit status 2). Hydra's own
checks come first (``job.modle=x`` on the command line); a key added with ``+`` is caught here.

:func:`check_paths` then refuses an ``output`` that is, or holds, a file the run reads: an input
video, the input folder (a single input's own folder too), a keyframe or prompt folder, or a model
file (issue 22: ``output=`` the input folder replaced the source videos).
"""
from __future__ import annotations

import difflib
import os
import types
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A setting that cannot work: the message is the one line the user sees."""


CONFIG_ERROR = 2  # the exit status of a run stopped by a configuration error


def reads(**meta) -> Any:
    """A key naming a file or folder the run reads: the output may never be (or hold) it."""
    return field(metadata={"reads": True, **meta})


def _allowed(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _need(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_show(value)}: must be {allowed}")


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # as typed: job.scale=0, not 0.0
    return str(value) if not isinstance(value, str) or value else "''"


def _rational(value, key: str) -> Fraction:
    """``2``, ``5/2``, ``2.5``, ``60000/1001`` -> an exact positive Fraction."""
    try:
        r = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        r = None
    _need(r is not None and r > 0, key, value, "a positive number or fraction (2, 5/2, 2.5, 60000/1001)")
    return r


def config_dir() -> str:
    """conf/ lives at the top of the repository; a built wheel carries it as vsr_ddp/conf
    (setup.cfg's package_dir). The installed copy first, then the checkout's."""
    here = Path(__file__).resolve().parent
    for d in (here / "conf", here.parent / "conf"):
        if (d / "config.yaml").is_file():
            return str(d)
    raise SystemExit(f"error: vsr_ddp's conf/ is in neither {here / 'conf'} nor {here.parent / 'conf'}: "
                     "reinstall vsr_ddp")


def shipped(file: str, key: str | None = None) -> Any:
    """A default as the shipped YAML has it (plain Python, not resolved): ``shipped("config",
    "work.lease_timeout_s")``, ``shipped("ebsynth/default")``, ``shipped("job/propagate", "guides")``.
    For what runs outside a job's composed config (``python -m vsr_ddp.status``, benchmarks,
    tests) and needs the value a run would have: the YAML stays its one home."""
    path = Path(config_dir()) / f"{file}.yaml"
    node = OmegaConf.load(path)
    if key is not None:
        node = OmegaConf.select(node, key, default=KeyError, throw_on_missing=False)
        if node is KeyError:
            raise KeyError(f"{key}: not in {path}")
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


# -- the groups --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    unit: Literal["segment", "video"]
    claim: Literal["dynamic", "strided"]
    lease_timeout_s: float
    segment_frames: int
    overlap: int
    reader: Literal["auto", "pyav", "decord"]
    read_chunk: int
    queue_depth: int
    shard_index: int
    num_shards: int
    bundle_frames: int | str = "auto"
    keep_shards: bool = False

    def __post_init__(self):
        if self.bundle_frames != "auto":
            try:
                frames = int(self.bundle_frames)
            except (TypeError, ValueError):
                frames = 0
            _need(frames >= 1 and str(frames) == str(self.bundle_frames).strip(), "work.bundle_frames",
                  self.bundle_frames, "auto or a whole number of frames, at least 1")
        # leases are renewed every tenth of the timeout, and a network filesystem shows a renewal late
        _need(self.lease_timeout_s >= 10, "work.lease_timeout_s", self.lease_timeout_s,
              "at least 10 (seconds)")
        for key in ("segment_frames", "read_chunk", "queue_depth", "num_shards"):
            _need(getattr(self, key) >= 1, f"work.{key}", getattr(self, key), "at least 1")
        _need(self.overlap >= 0, "work.overlap", self.overlap, "0 or more")
        _need(0 <= self.shard_index < self.num_shards, "work.shard_index", self.shard_index,
              f"in [0, {self.num_shards - 1}] (work.num_shards={self.num_shards})")


@dataclass(frozen=True)
class Decode:
    deinterlace: Literal["auto", "on", "off"]


@dataclass(frozen=True)
class Encode:
    codec: Literal["auto", "libx264", "libx265", "h264_nvenc", "hevc_nvenc"]
    format: Literal["h264", "hevc"]
    crf: int
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                    "veryslow", "placebo"]
    pix_fmt: str

    def __post_init__(self):
        _need(0 <= self.crf <= 51, "encode.crf", self.crf, "in [0, 51] (x264's scale)")


@dataclass(frozen=True)
class DistSettings:
    backend: Literal["auto", "nccl", "gloo"]
    timeout_min: float

    def __post_init__(self):
        _need(self.timeout_min > 0, "dist.timeout_min", self.timeout_min, "positive (minutes)")


@dataclass(frozen=True)
class Log:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"]
    progress: bool
    every_s: float
    dir: Optional[str]

    def __post_init__(self):
        _need(self.every_s > 0, "log.every_s", self.every_s, "positive (seconds)")


# -- the jobs ---------------------------------------------------------------------------------------

PRECISIONS = Literal["auto", "fp32", "fp16", "bf16"]
DIS_PRESETS = Literal["ultrafast", "fast", "medium"]


@dataclass(frozen=True)
class FlashVSR:
    """``job.flashvsr``: FlashVSR's settings (job.model=flashvsr; vsr_ddp.models.flashvsr)."""

    dir: Optional[str] = reads()
    version: Union[str, float]
    mode: Literal["tiny", "full"]
    attention: Literal["sparse", "dense"]
    sparse_ratio: float
    kv_ratio: float
    local_range: int
    seed: int
    tile: int
    tile_overlap: int

    def __post_init__(self):
        # the command line's job.flashvsr.version=1.0 arrives as the float 1.0
        version = f"{self.version:.1f}" if isinstance(self.version, float) else str(self.version)
        _need(version in ("1.1", "1.0"), "job.flashvsr.version", self.version,
              "1.1 (FlashVSR-v1.1) or 1.0 (FlashVSR v1)")
        object.__setattr__(self, "version", version)
        _need(self.sparse_ratio > 0, "job.flashvsr.sparse_ratio", self.sparse_ratio,
              "positive (the examples: 2.0)")
        _need(self.kv_ratio >= 1, "job.flashvsr.kv_ratio", self.kv_ratio,
              "at least 1 (cached frame pairs: int(kv_ratio); the examples: 3.0)")
        _need(self.local_range >= 1, "job.flashvsr.local_range", self.local_range,
              "at least 1 (blocks; the examples: 11)")
        # a tile smaller than one block of 8 x 8 tokens (32 LR pixels, x4 = 128) is padded to it anyway
        _need(self.tile == 0 or self.tile >= 32, "job.flashvsr.tile", self.tile,
              "0 (whole frames) or at least 32 (LR pixels per tile side)")
        _need(self.tile_overlap >= 0 and (self.tile == 0 or self.tile_overlap < self.tile),
              "job.flashvsr.tile_overlap", self.tile_overlap,
              "0 or more and less than job.flashvsr.tile" + (f"={self.tile}" if self.tile else ""))

    @classmethod
    def from_values(cls, values: Mapping) -> "FlashVSR":
        """The checked settings of a ``job.flashvsr`` group (a dict or the composed config node)."""
        if not isinstance(values, Mapping):
            values = OmegaConf.to_container(values, resolve=True)
        _need(isinstance(values, Mapping), "job.flashvsr", values, "a group of settings")
        return cls(**_build(cls, values, "job.flashvsr."))


@dataclass(frozen=True)
class Upscale:
    name: str
    model: str = reads()  # also a name: lanczos, default, realesrgan-x4plus ...
    models_dir: Optional[str]
    scale: Optional[float]
    outscale: Optional[float]
    tile: int
    tile_pad: int
    precision: PRECISIONS
    batch_size: int
    compile: bool
    spans: list
    fallback: Literal["lanczos", "bicubic"]
    calibrate: bool
    preview: bool
    warmup: Union[int, Literal["auto"]]
    flashvsr: dict
    unit: Literal["segment", "video"]
    segment_frames: int

    def __post_init__(self):
        _need(self.warmup == "auto" or self.warmup >= 0, "job.warmup", self.warmup,
              "auto (the model's own) or 0 or more (frames)")
        flashvsr = FlashVSR.from_values(self.flashvsr)
        if self.model == "flashvsr":
            if not flashvsr.dir:
                raise ConfigError("job.model=flashvsr needs job.flashvsr.dir=... (the folder of FlashVSR's "
                                  "published files: diffusion_pytorch_model_streaming_dmd.safetensors, "
                                  "LQ_proj_in.ckpt, TCDecoder.ckpt, posi_prompt.pth)")
        for key in ("scale", "outscale"):
            value = getattr(self, key)
            _need(value is None or value > 0, f"job.{key}", value, "positive, or null")
        _need(self.tile >= 0, "job.tile", self.tile, "0 (whole frames) or a tile size in pixels")
        _need(self.tile_pad >= 0, "job.tile_pad", self.tile_pad, "0 or more")
        _need(self.batch_size >= 1, "job.batch_size", self.batch_size, "at least 1")


@dataclass(frozen=True)
class Interpolate:
    name: str
    model: str = reads()  # also rife-hdv3, flow, blend
    factor: Union[int, float, str]
    fps: Union[None, int, float, str]
    scale: float
    scene_threshold: float
    vfr: Literal["error", "cfr"]
    batch_size: int
    precision: PRECISIONS
    flow_weights: Optional[str] = reads()
    flow_preset: DIS_PRESETS
    segment_frames: int
    models_dir: Optional[str]
    seed: int = 0

    def __post_init__(self):
        if self.fps in (None, ""):
            _rational(self.factor, "job.factor")
        else:
            _rational(self.fps, "job.fps")
        _need(self.scale > 0, "job.scale", self.scale, "positive (RIFE's flow scale: 1.0, 0.5 for 4K)")
        _need(0 <= self.scene_threshold <= 1, "job.scene_threshold", self.scene_threshold,
              "in [0, 1] (an SSIM; 0 turns detection off)")
        _need(self.batch_size >= 1, "job.batch_size", self.batch_size, "at least 1")


def _subtree(cls_path: str, values: Mapping, key: str) -> None:
    """Check a subtree that a model's own dataclass reads (job.ebsynth, job.guides, job.fresco)."""
    module, _, name = cls_path.rpartition(".")
    import importlib

    cls = getattr(importlib.import_module(module), name)
    known = [f.name for f in fields(cls)]
    for k in values:
        if k not in known:
            raise ConfigError(_unknown(f"{key}.{k}", [f"{key}.{n}" for n in known]))
    try:
        cls.from_config(values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


@dataclass(frozen=True)
class Propagate:
    name: str
    keys: str = reads()
    keys_layout: Literal["auto", "flat", "per_video"]
    input: str
    ebsynth: dict
    guides: dict
    flow_weights: Optional[str] = reads()
    flow_preset: DIS_PRESETS
    raft_iters: int
    poisson: bool
    calibrate: bool

    def __post_init__(self):
        _subtree("vsr_ddp.models.ebsynth.SynthParams", self.ebsynth, "job.ebsynth")
        _subtree("vsr_ddp.models.ebsynth.GuideWeights", self.guides, "job.guides")
        _need(self.raft_iters >= 1, "job.raft_iters", self.raft_iters, "at least 1")


@dataclass(frozen=True)
class Sim2Real:
    name: str
    prompts: str = reads()
    base_model: str = reads()
    base_model_config: Optional[str] = reads()
    controlnet: str = reads()
    controlnet_config: Optional[str] = reads()
    vae: Optional[str] = reads()
    control: Literal["canny", "hed", "depth"]
    annotator: Optional[str] = reads()
    canny_low: int
    canny_high: int
    added_prompt: str
    negative_prompt: str
    short_side: int
    steps: int
    strength: float
    guidance_scale: float
    cond_scale: float
    seed: int
    batch_size: int
    precision: PRECISIONS
    vae_tiling: bool
    vae_slicing: bool
    freeu: bool
    keyframes: dict
    fresco: dict
    ebsynth: dict
    poisson: bool
    calibrate: bool

    def __post_init__(self):
        _subtree("vsr_ddp.models.ebsynth.SynthParams", self.ebsynth, "job.ebsynth")
        for k in self.keyframes:
            if k not in ("min_interval", "max_interval"):
                raise ConfigError(_unknown(f"job.keyframes.{k}", ["job.keyframes.min_interval",
                                                                  "job.keyframes.max_interval"]))
        lo, hi = self.keyframes.get("min_interval"), self.keyframes.get("max_interval")
        _need(isinstance(lo, int) and lo >= 1, "job.keyframes.min_interval", lo, "an integer >= 1")
        _need(isinstance(hi, int) and hi >= lo, "job.keyframes.max_interval", hi,
              f"an integer >= job.keyframes.min_interval ({lo})")
        _need(self.short_side >= 64 and self.short_side % 64 == 0, "job.short_side", self.short_side,
              "a multiple of 64 (512 for SD 1.5)")
        _need(self.steps >= 1, "job.steps", self.steps, "at least 1")
        _need(0 < self.strength <= 1, "job.strength", self.strength, "in (0, 1]")
        _need(self.batch_size >= 1, "job.batch_size", self.batch_size, "at least 1")
        _need(0 <= self.canny_low <= self.canny_high, "job.canny_low", self.canny_low,
              f"in [0, job.canny_high ({self.canny_high})]")


JOB_SETTINGS = {"upscale": Upscale, "interpolate": Interpolate, "propagate": Propagate, "sim2real": Sim2Real}


@dataclass(frozen=True)
class Settings:
    """Everything a run reads from its config, checked."""

    input: str = reads()
    output: str
    dry_run: bool
    device: Literal["auto", "cuda", "cpu"]
    models_dir: str
    work: Work
    decode: Decode
    encode: Encode
    dist: DistSettings
    log: Log
    # The job's keys, checked against its dataclass above (JOB_SETTINGS); ``job_cfg`` is the same
    # subtree as Hydra composed it, which the job reads.
    job: Any = None
    job_cfg: Any = None


GROUPS = {"work": Work, "decode": Decode, "encode": Encode, "dist": DistSettings, "log": Log}


# -- reading a config into the dataclasses ----------------------------------------------------------

def _unknown(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(known)})"
    return f"{key}: no such setting{hint}"


WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
         dict: "a group of settings"}


def _convert(tp, value, key: str):
    """``value`` as type ``tp``, or a ConfigError naming the key, the value and what it may be."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        names = [WORDS.get(o, str(o)) for o in options if o is not type(None)]
        allowed = " or ".join(dict.fromkeys(names)) + (", or null" if type(None) in options else "")
        raise ConfigError(f"{key}={_show(value)}: must be {allowed}")
    if origin is Literal:
        choices = get_args(tp)
        _need(value in choices and not isinstance(value, bool), key, value, _allowed(choices))
        return value
    if tp is bool:
        _need(isinstance(value, bool), key, value, WORDS[bool])
        return value
    if tp is int:
        _need(isinstance(value, int) and not isinstance(value, bool), key, value, WORDS[int])
        return value
    if tp is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, WORDS[float])
        return float(value)
    if tp is str:
        _need(isinstance(value, str), key, value, WORDS[str])
        return value
    if tp is list:
        _need(isinstance(value, list), key, value, "a list, e.g. '[a, b]'")
        return value
    if tp is dict:
        _need(isinstance(value, dict), key, value, "a group of settings")
        return value
    raise TypeError(f"{key}: no rule for type {tp}")


def _build(cls, values: Mapping, prefix: str):
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name not in ("job", "job_cfg")]
    for k in values:
        if k not in names and not (cls is Settings and k == "job"):
            raise ConfigError(_unknown(prefix + str(k), [prefix + n for n in names]))
    kwargs = {}
    for name in names:
        key = prefix + name
        if name not in values:
            raise ConfigError(f"{key} is missing from the config")
        value = values[name]
        if value == "???":
            raise ConfigError(f"{key} is not set: give {key}=... on the command line")
        if name in GROUPS and cls is Settings:
            _need(isinstance(value, dict), key, value, "a group of settings")
            kwargs[name] = GROUPS[name](**_build(GROUPS[name], value, key + "."))
        else:
            kwargs[name] = _convert(hints[name], value, key)
    return kwargs


def check(cfg: DictConfig) -> Settings:
    """The composed config as :class:`Settings`; ConfigError (one line) for anything wrong."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:  # an interpolation that cannot be resolved
        raise ConfigError(str(e).splitlines()[0]) from None
    job_values = values.get("job")
    if not isinstance(job_values, dict) or "name" not in job_values:
        raise ConfigError("job: choose a job: job=upscale, interpolate, propagate or sim2real")
    groups = _build(Settings, values, "")
    name = job_values["name"]
    if name in JOB_SETTINGS:
        job = JOB_SETTINGS[name](**_build(JOB_SETTINGS[name], job_values, "job."))
    else:
        from .jobs import JOBS  # a job registered in code (tests): its keys are its own business

        if name not in JOBS:
            raise ConfigError(f"job={name}: no such job ({_allowed(sorted(JOB_SETTINGS))})")
        job = None
    return Settings(**groups, job=job, job_cfg=cfg.job)


# -- what the run reads, and where it writes ---------------------------------------------------------

def read_paths(settings: Settings) -> list[tuple[str, Path]]:
    """(key, path) of every file or folder the settings name for reading, that exists."""
    found = [("input", Path(settings.input).expanduser())]
    if settings.job is not None:
        for f in fields(settings.job):
            value = getattr(settings.job, f.name)
            if f.metadata.get("reads") and isinstance(value, str) and value:
                found.append((f"job.{f.name}", Path(value).expanduser()))
        if isinstance(settings.job, Upscale) and settings.job.model == "flashvsr":
            found.append(("job.flashvsr.dir", Path(str(settings.job.flashvsr["dir"])).expanduser()))
    return [(k, p) for k, p in found if p.exists()]


def _same(a: Path, b: Path) -> bool:
    """One file or folder, by identity where both exist (symlinks, ``..``, hard links and
    case-insensitive file systems alike), else by the resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _within(path: Path, folder: Path) -> bool:
    """Is ``path`` ``folder`` or anywhere below it?"""
    p = Path(os.path.realpath(path))
    return any(_same(q, folder) for q in (p, *p.parents) if q.exists()) or \
        p.is_relative_to(Path(os.path.realpath(folder)))


def check_paths(settings: Settings) -> None:
    """Refuse an output that would write over, move or delete what the run reads.

    Final videos are ``<output>/<relative path>/<stem>.mp4``, so the output may not be an input
    video, the input folder (a folder inside it is fine: the listing leaves the output out), a
    single input video's own folder, a keyframe or prompt folder, or a model file; and the input
    may not sit inside the output's work folder, which runs clean up.
    """
    from .plan import VIDEO_EXTENSIONS, InputError, check_input
    from .shards import WORK_DIR

    try:
        check_input(settings.input, exclude=[settings.output])
    except InputError as e:
        raise ConfigError(str(e)) from None
    output = Path(settings.output).expanduser()
    problem = None
    for key, path in read_paths(settings):
        what = f"{key}={path}"
        if _same(output, path):
            problem = f"it is {what}"
        elif key == "input" and path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file() \
                and _same(output, path.parent):
            problem = f"it is the folder of {what}: the output video would replace it"
        elif key == "input" and _within(path, output / WORK_DIR):
            problem = f"{what} is inside its work folder {output / WORK_DIR}"
        if problem:
            raise ConfigError(f"output={output}: {problem}; a run never writes over what it reads: "
                              f"choose another output folder")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output={output}: not a folder")
    existing = next((p for p in (output, *output.absolute().parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output={output}: cannot write there (permission denied on {existing})")
