"""Inputs -> probed videos -> work units. Pure bookkeeping: no torch, no decoding of pixels.

Every rank computes the same plan from the same probe results, so "which rank owns which
unit" needs no communication.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm")


class InputError(ValueError):
    """An input that cannot be processed; the message is the one-line reason users see."""


class SkipVideo(InputError):
    """Raised by a job's ``plan_video`` to leave an input out on purpose (sim2real: no prompt for
    it). The run reports it ``skipped`` with the message as the reason, and the exit status stays 0."""


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learned about one input file."""

    path: str
    frames: int
    fps: Fraction
    width: int
    height: int
    codec: str
    # One dict per stream: {"index": container stream index, "codec": name}
    audio: tuple = ()
    subtitles: tuple = ()
    color: dict = field(default_factory=dict)  # colorspace / primaries / trc tags, when set

    @property
    def stem(self) -> str:
        return Path(self.path).stem

    @property
    def duration(self) -> float:
        return float(self.frames / self.fps)

    def to_json(self) -> dict:
        d = asdict(self)
        d["fps"] = f"{self.fps.numerator}/{self.fps.denominator}"
        return d


@dataclass(frozen=True)
class Unit:
    """One shard's worth of work: owned frames [start, end) of one video, read with context."""

    video: int  # index into the plan's video list
    seg_idx: int
    start: int
    end: int
    read_start: int
    read_end: int

    @property
    def key(self) -> str:
        return f"segment_{self.seg_idx:04d}"

    @property
    def frames(self) -> int:
        return self.end - self.start


@dataclass
class Plan:
    videos: list  # VideoInfo per input that probed fine, in input order
    failed: dict  # input path -> reason, for inputs that did not probe
    units: list
    inputs: list = field(default_factory=list)  # every input path (str), in input order
    skipped: dict = field(default_factory=dict)  # input path -> reason, for inputs a job left out (SkipVideo)

    def units_of(self, video: int) -> list:
        return [u for u in self.units if u.video == video]

    def units_for_rank(self, rank: int, world: int) -> list:
        """Rank-strided claim over the global unit order (videos, then segments)."""
        return self.units[rank::world]


def list_inputs(input_path: str | Path, shard_index: int = 0, num_shards: int = 1) -> list[Path]:
    """A file, or the videos of a folder (by extension, sorted, not recursive).

    With ``num_shards > 1`` only this share is kept (:func:`shard_inputs`), before anything
    is probed: a Slurm job array splits a folder without its tasks talking to each other.
    """
    p = Path(input_path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
        if not files:
            raise InputError(f"{p}: no videos ({' '.join(VIDEO_EXTENSIONS)}) in this folder")
        return shard_inputs(files, shard_index, num_shards)
    if p.is_file():
        return shard_inputs([p], shard_index, num_shards)
    raise InputError(f"{p}: no such file or folder")


def shard_inputs(inputs: list, shard_index: int = 0, num_shards: int = 1) -> list:
    """Share ``shard_index`` of ``num_shards`` (``work.shard_index`` / ``work.num_shards``):
    ``inputs[shard_index::num_shards]`` of the sorted list, the same on every task and rerun.
    A share may be empty (more array tasks than videos); that run has nothing to do."""
    if num_shards < 1:
        raise ValueError(f"work.num_shards must be >= 1, not {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"work.shard_index must be in [0, {num_shards - 1}] (work.num_shards={num_shards}), "
                         f"not {shard_index}")
    return list(inputs)[shard_index::num_shards]


def report_name(shard_index: int = 0, num_shards: int = 1) -> str:
    """``run_report.json``, or ``run_report.<i>-of-<n>.json`` for one share of a job array, so
    that the tasks of an array can share one output folder without clobbering the report."""
    return "run_report.json" if num_shards == 1 else f"run_report.{shard_index}-of-{num_shards}.json"


def _pick_fps(stream) -> Fraction:
    avg, guessed = stream.average_rate, stream.guessed_rate
    # guessed_rate (ffmpeg's r_frame_rate) is exact for constant-rate video (30000/1001, not
    # 2997/100); average_rate is frames/duration and is the honest answer for variable rate.
    if guessed and (not avg or abs(float(guessed) / float(avg) - 1) < 0.01):
        return Fraction(guessed.numerator, guessed.denominator).limit_denominator(1_000_000)
    if avg:
        return Fraction(avg.numerator, avg.denominator).limit_denominator(1_000_000)
    raise InputError("no frame rate in the video stream")


def probe(path: str | Path) -> VideoInfo:
    """Streams, exact frame rate, size and the true frame count of one file.

    Raises InputError with a one-line reason for anything that is not a readable video.
    """
    import av  # PyAV: container-level probing without an ffprobe binary

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise InputError(f"not a readable video ({e.__class__.__name__}: {getattr(e, 'strerror', None) or e})")
    with container:
        vstreams = [s for s in container.streams.video if s.codec_context is not None]
        if not vstreams:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise InputError(f"no video stream (streams: {', '.join(kinds)})")
        vs = vstreams[0]
        cc = vs.codec_context
        if not cc.width or not cc.height:
            raise InputError("video stream has no frame size")
        fps = _pick_fps(vs)
        frames = vs.frames
        if frames <= 0:
            # Containers without a sample table (mkv, webm, avi) do not store the count; count
            # packets, which demuxes but does not decode.
            frames = sum(1 for pkt in container.demux(vs) if pkt.size)
        if frames <= 0:
            raise InputError("video stream has no frames")
        audio = tuple({"index": s.index, "codec": s.codec_context.name} for s in container.streams.audio)
        subs = tuple({"index": s.index, "codec": s.codec_context.name if s.codec_context else "unknown"}
                     for s in container.streams.subtitles)
        color = {}
        for key, attr in (("colorspace", "colorspace"), ("color_primaries", "color_primaries"),
                          ("color_trc", "color_trc")):
            value = getattr(cc, attr, None)
            name = getattr(value, "name", value)
            if isinstance(name, str) and name.lower() not in ("unspecified", "reserved", "unknown", ""):
                color[key] = name.lower()
        return VideoInfo(path=str(path), frames=int(frames), fps=fps, width=cc.width, height=cc.height,
                         codec=cc.name, audio=audio, subtitles=subs, color=color)


def plan_units(videos: list[VideoInfo], unit: str, segment_frames: int, overlap: int) -> list[Unit]:
    """Cut every video into units. ``unit=video``: one unit per video; ``segment``: owned
    ranges of ``segment_frames`` frames, each read with ``overlap`` context frames per side."""
    if unit not in ("video", "segment"):
        raise ValueError(f"work.unit must be 'video' or 'segment', not {unit!r}")
    if unit == "segment" and segment_frames < 1:
        raise ValueError("work.segment_frames must be >= 1")
    if overlap < 0:
        raise ValueError("work.overlap must be >= 0")
    units = []
    for vi, info in enumerate(videos):
        n = info.frames
        step = n if unit == "video" else segment_frames
        for seg_idx in range(math.ceil(n / step)):
            start, end = seg_idx * step, min(n, (seg_idx + 1) * step)
            units.append(Unit(video=vi, seg_idx=seg_idx, start=start, end=end,
                              read_start=max(0, start - overlap), read_end=min(n, end + overlap)))
    return units


def format_plan(plan: Plan, world: int) -> str:
    """The dry-run text: per rank, its units and frame ranges."""
    lines = [f"{len(plan.videos)} video(s), {len(plan.units)} unit(s), {world} rank(s)"]
    for info in plan.videos:
        lines.append(f"  {info.path}: {info.frames} frames, {info.width}x{info.height}, "
                     f"{info.fps.numerator}/{info.fps.denominator} fps, audio {len(info.audio)}, "
                     f"subtitles {len(info.subtitles)}")
    for path, reason in plan.failed.items():
        lines.append(f"  {path}: FAILED: {reason}")
    for path, reason in plan.skipped.items():
        lines.append(f"  {path}: SKIPPED: {reason}")
    for rank in range(world):
        mine = plan.units_for_rank(rank, world)
        frames = sum(u.frames for u in mine)
        lines.append(f"rank {rank}: {len(mine)} unit(s), {frames} frames")
        for u in mine:
            lines.append(f"  {plan.videos[u.video].stem} {u.key}: owns [{u.start}, {u.end}) "
                         f"reads [{u.read_start}, {u.read_end})")
    return "\n".join(lines)
