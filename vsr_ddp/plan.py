"""Inputs -> probed videos -> work units. Pure bookkeeping: no torch, no decoding of pixels.

Every rank computes the same plan from the same probe results, so "which rank owns which
unit" needs no communication.
"""
from __future__ import annotations

import bisect
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
    """What the probe learned about one input file.

    ``width`` x ``height`` is the picture as players show it: a display rotation is applied when
    frames are read (``rotation``), so a phone's portrait clip is taller than wide here.
    """

    path: str
    frames: int
    fps: Fraction  # exact for constant rate; the average rate (frames / duration) for variable rate
    width: int
    height: int
    codec: str
    # One dict per stream: {"index": container stream index, "codec": name, "language": tag or None}
    audio: tuple = ()
    subtitles: tuple = ()
    covers: tuple = ()  # cover art: pictures attached to the file (attached_pic), listed as video streams
    stream: int = 0  # container index of the video stream the job reads (never cover art)
    color: dict = field(default_factory=dict)  # colorspace / primaries / trc tags, when set
    # Variable frame rate only: each frame's presentation time in ``time_base`` ticks of the
    # stream, in frame order, plus the end of the last frame (frames + 1 entries). Empty for
    # constant rate, where frame n is at n / fps.
    timestamps: tuple = ()
    time_base: Fraction = Fraction(1, 90_000)
    start: Fraction = Fraction(0)  # seconds from the container's start to the first frame (audio sync)
    rotation: int = 0  # degrees counter-clockwise that players turn the stored picture: 0, 90, 180, 270
    sar: Fraction = Fraction(1)  # sample (pixel) aspect ratio of the picture as shown (after rotation)
    interlaced: bool = False  # the stream flags its frames as interlaced (fields, not progressive)
    pix_fmt: str = "yuv420p"  # of the decoded stream (yuv420p10le: 10-bit)
    bit_depth: int = 8
    rel: str = ""  # its path below the input folder, without extension: the output's (inputs.py)

    @property
    def stem(self) -> str:
        return Path(self.path).stem

    @property
    def vfr(self) -> bool:
        return bool(self.timestamps)

    def time_of(self, n: int) -> Fraction:
        """Seconds from frame 0 to frame ``n`` (0 <= n <= frames; ``frames``: the end of the last)."""
        if self.timestamps:
            return (self.timestamps[n] - self.timestamps[0]) * self.time_base
        return n / self.fps

    def frame_at(self, seconds: float) -> int:
        """The frame boundary nearest to ``seconds`` after frame 0, in [0, frames]."""
        if not self.timestamps:
            return min(self.frames, max(0, round(Fraction(seconds) * self.fps)))
        ticks = self.timestamps[0] + Fraction(seconds) / self.time_base
        i = bisect.bisect_left(self.timestamps, ticks)
        if i > 0 and (i > self.frames or ticks - self.timestamps[i - 1] <= self.timestamps[i] - ticks):
            i -= 1
        return min(self.frames, i)

    @property
    def duration(self) -> float:
        return float(self.time_of(self.frames))

    def to_json(self) -> dict:
        d = asdict(self)
        del d["timestamps"]  # one per frame: the probe finds them again, the manifest says vfr
        d["vfr"] = self.vfr
        for key in ("fps", "time_base", "start", "sar"):
            d[key] = f"{d[key].numerator}/{d[key].denominator}"
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
    # The output frames this unit makes, when they are not its owned frames one for one
    # (job=interpolate makes a retimed range); None: the owned range itself.
    out_start: int | None = None
    out_end: int | None = None
    # A bundle: the whole-video units of several short videos (``video`` is the first's), made
    # one after the other under the name ``bundle`` (shards.bundle_key). Empty for a segment.
    parts: tuple = ()
    bundle: str = ""

    @property
    def key(self) -> str:
        return self.bundle or f"segment_{self.seg_idx:04d}"

    @property
    def clips(self) -> tuple:
        """The plan indices of a bundle's videos; () for a segment."""
        return tuple(p.video for p in self.parts)

    @property
    def frames(self) -> int:
        return self.end - self.start

    @property
    def out_range(self) -> tuple[int, int]:
        return (self.start, self.end) if self.out_start is None else (self.out_start, self.out_end)

    @property
    def out_frames(self) -> int:
        a, b = self.out_range
        return b - a


@dataclass
class Plan:
    videos: list  # VideoInfo per input that probed fine, in input order
    failed: dict  # input path -> reason, for inputs that did not probe
    units: list
    skipped: dict = field(default_factory=dict)  # input path -> reason, for inputs a job left out (SkipVideo)

    def units_of(self, video: int) -> list:
        """The units of one video (a bundle counts for each of its clips)."""
        if getattr(self, "_by_video", None) is None or self._by_video[0] is not self.units:
            index: dict = {}
            for u in self.units:
                for vi in (u.clips or (u.video,)):
                    index.setdefault(vi, []).append(u)
            self._by_video = (self.units, index)
        return self._by_video[1].get(video, [])

    def units_for_rank(self, rank: int, world: int) -> list:
        """Rank-strided claim over the global unit order (videos, then segments)."""
        return strided(self.units, rank, world)


def strided(items, index: int, count: int) -> list:
    """Share ``index`` of ``count`` of ``items``: ``items[index::count]``, i.e. item ``i`` goes to
    share ``i % count``. The one rule of every fixed assignment: units to ranks
    (``work.claim=strided``), inputs to probe per rank, inputs to job-array tasks
    (``work.shard_index`` / ``work.num_shards``)."""
    return list(items)[index::count]


def list_inputs(input_path: str | Path, shard_index: int = 0, num_shards: int = 1, exclude=()) -> list:
    """Every input (:class:`vsr_ddp.inputs.Input`: ``path``, output name ``rel``, size, mtime),
    sorted by ``rel``: a video file, the videos of a folder tree (``exclude``: folders left out,
    the output folder among them), or the paths of a list file. See :func:`vsr_ddp.inputs.list_inputs`.

    With ``num_shards > 1`` only this share is kept (:func:`shard_inputs`), before anything
    is probed: a Slurm job array splits a folder without its tasks talking to each other.
    """
    from .inputs import list_inputs as _list_inputs

    return _list_inputs(input_path, shard_index, num_shards, exclude)


def _videos_in(folder: Path, exclude=()):
    """The videos of ``folder`` and below, as found (a generator of Inputs; stop at will)."""
    from .inputs import walk

    return walk(folder, exclude)


def check_input(input_path: str | Path, exclude=()) -> Path:
    """``input`` as a path, or InputError when it is neither a video file, nor a folder with a video
    somewhere below, nor a readable list file. Cheap, as it runs before any work on every rank:
    a folder is walked only up to its first video, a list file is opened, not read."""
    from .inputs import check_list_file

    p = Path(input_path).expanduser()
    if p.is_dir():
        if next(_videos_in(p, exclude), None) is None:
            raise InputError(f"{p}: no videos ({' '.join(VIDEO_EXTENSIONS)}) in this folder")
        return p
    if p.is_file():
        if p.suffix.lower() not in VIDEO_EXTENSIONS:
            check_list_file(p)
        return p
    if p.exists():
        raise InputError(f"{p}: neither a file nor a folder")
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
    return strided(inputs, shard_index, num_shards)


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
    """Streams, exact frame rate, size and the true frame count of one file, and how a player
    shows it (rotation, pixel aspect), whether its frames are interlaced, and, for variable frame
    rate, every frame's timestamp.

    Raises InputError with a one-line reason for anything that is not a readable video.
    """
    import av  # PyAV: container-level probing without an ffprobe binary

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise InputError(f"not a readable video "
                         f"({e.__class__.__name__}: {getattr(e, 'strerror', None) or e})")
    with container:
        # Cover art (a music video's poster, a ripped film's cover.jpg) is listed as one more
        # video stream of one picture, and the mp4 and Matroska demuxers may put it anywhere.
        covers = [s for s in container.streams.video if _attached_pic(s)]
        vstreams = [s for s in container.streams.video
                    if s.codec_context is not None and not _attached_pic(s)]
        if not vstreams:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            art = ", only cover art" if covers else ""
            raise InputError(f"no video stream{art} (streams: {', '.join(kinds)})")
        vs = vstreams[0]
        cc = vs.codec_context
        if not cc.width or not cc.height:
            raise InputError("video stream has no frame size")
        fps = _pick_fps(vs)
        frames, times = _frame_times(container, vs, fps)
        if frames <= 0:
            raise InputError("video stream has no frames")
        if times:
            fps = Fraction(frames) / ((times[-1] - times[0]) * vs.time_base)
        first_pts = times[0] if times else vs.start_time
        start = Fraction(0)
        if first_pts is not None and container.start_time is not None:
            start = max(Fraction(0), first_pts * vs.time_base - Fraction(container.start_time, 1_000_000))
        audio = tuple(_stream_entry(s) for s in container.streams.audio)
        subs = tuple(_stream_entry(s) for s in container.streams.subtitles)
        cover_art = tuple(_stream_entry(s) for s in covers)
        stream = vs.index
        color = {}
        for key, attr in (("colorspace", "colorspace"), ("color_primaries", "color_primaries"),
                          ("color_trc", "color_trc")):
            value = getattr(cc, attr, None)
            name = getattr(value, "name", value)
            # PyAV >= 14: ffmpeg's numbers (2: unspecified)
            if isinstance(name, int) and name not in (0, 2, 3):
                color[key] = str(name)
            elif isinstance(name, str) and name.lower() not in ("unspecified", "reserved", "unknown", ""):
                color[key] = name.lower()
        sar = Fraction(vs.sample_aspect_ratio or cc.sample_aspect_ratio or 1)
        width, height, codec, time_base = cc.width, cc.height, cc.name, Fraction(vs.time_base)
        field_interlaced = _interlaced_field_order(cc)
    rotation, interlaced, pix_fmt = _first_frame(path, stream)
    if rotation in (90, 270):
        width, height, sar = height, width, 1 / sar
    return VideoInfo(path=str(path), frames=int(frames), fps=fps.limit_denominator(1_000_000), width=width,
                     height=height, codec=codec, audio=audio, subtitles=subs, covers=cover_art,
                     stream=stream, color=color, timestamps=tuple(times or ()), time_base=time_base,
                     start=start,
                     rotation=rotation, sar=sar, interlaced=interlaced or field_interlaced, pix_fmt=pix_fmt,
                     bit_depth=_bit_depth(pix_fmt))


def _constant_rate(times: list[int], time_base: Fraction, fps: Fraction) -> bool:
    """Whether sorted timestamps are frame n at t0 + n / fps, each within half a frame (the
    rounding a container's time base imposes: mkv keeps milliseconds)."""
    a, b = time_base.numerator * fps.numerator, time_base.denominator * fps.denominator
    t0 = times[0]
    return all((2 * (t - t0) * a + b) // (2 * b) == n for n, t in enumerate(times))


def _frame_times(container, vs, fps: Fraction) -> tuple[int, list | None]:
    """(frame count, timestamps): timestamps only for variable frame rate (see VideoInfo).

    mp4/mov hold a sample table: its decode times tell a constant rate without reading any
    frame data. Otherwise (mkv, webm, avi, or rates that vary) the packets are read, not decoded.
    """
    tb = vs.time_base
    if vs.frames > 0:
        entries = vs.index_entries
        if len(entries) == vs.frames and _constant_rate([e.timestamp for e in entries], tb, fps):
            return vs.frames, None
    pts, ends, untimed = [], [], 0
    for pkt in container.demux(vs):
        if not pkt.size:
            continue
        if pkt.pts is None:
            untimed += 1
        else:
            pts.append(pkt.pts)
            ends.append(pkt.pts + (pkt.duration or 0))
    count = len(pts) + untimed
    if untimed or not pts:
        return count, None  # AVI's B-frames carry no timestamps: counted, read from the start
    pts.sort()
    if _constant_rate(pts, tb, fps) or len(set(pts)) != len(pts):
        return count, None
    end = max(ends)
    if end <= pts[-1]:  # no durations: the last frame lasts as long as the one before it
        end = pts[-1] + (pts[-1] - pts[-2] if len(pts) > 1 else max(1, round(1 / (fps * tb))))
    return count, pts + [end]


def _attached_pic(stream) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _stream_entry(stream) -> dict:
    """What the merge needs of a stream it carries over: container index, codec, language tag."""
    cc = stream.codec_context
    return {"index": stream.index, "codec": cc.name if cc is not None else "unknown",
            "language": stream.metadata.get("language")}


def _first_frame(path: Path, stream: int = 0) -> tuple[int, bool, str]:
    """(display rotation, interlaced, pixel format) from the first decoded frame of the video
    stream at container index ``stream``: the display matrix and the interlace flag are per-frame
    side data in ffmpeg."""
    import av

    try:
        with av.open(str(path)) as container:
            vs = container.streams[stream]
            for frame in container.decode(vs):
                rotation = round(frame.rotation or 0) % 360
                if rotation % 90:
                    raise InputError(f"display rotation of {rotation} degrees "
                                     f"(only multiples of 90 are supported)")
                return rotation, bool(frame.interlaced_frame), frame.format.name
    except av.error.FFmpegError as e:
        raise InputError(f"cannot decode its first frame ({e.__class__.__name__}: {e})") from None
    raise InputError("video stream has no decodable frames")


def _interlaced_field_order(cc) -> bool:
    order = str(getattr(cc, "field_order", "") or "").lower()
    return order in ("tt", "bb", "tb", "bt")


def _bit_depth(pix_fmt: str) -> int:
    for depth in (16, 14, 12, 10, 9):
        if f"p{depth}" in pix_fmt or pix_fmt.endswith(f"{depth}le") or pix_fmt.endswith(f"{depth}be"):
            return depth
    return 8


def plan_units(videos: list[VideoInfo], unit: str, segment_frames: int, overlap: int,
               first_index: int = 0, context: tuple[int, int] | None = None, align: int = 1) -> list[Unit]:
    """Cut every video into units. ``unit=video``: one unit per video; ``segment``: owned
    ranges of ``segment_frames`` frames, each read with ``overlap`` context frames per side.
    ``videos[k]`` is the plan's video ``first_index + k``.

    ``context=(before, after)``: asymmetric context in place of ``overlap`` (a temporal model's
    reach and warm-up, see vsr_ddp.models.temporal); ``align``: segment starts are multiples of
    it (``segment_frames`` rounded up to one)."""
    if unit not in ("video", "segment"):
        raise ValueError(f"work.unit must be 'video' or 'segment', not {unit!r}")
    if unit == "segment" and segment_frames < 1:
        raise ValueError("work.segment_frames must be >= 1")
    if overlap < 0:
        raise ValueError("work.overlap must be >= 0")
    before, after = (overlap, overlap) if context is None else context
    if before < 0 or after < 0 or align < 1:
        raise ValueError(f"context {context} and align {align}: must be >= 0 and >= 1")
    units = []
    for vi, info in enumerate(videos, first_index):
        n = info.frames
        step = n if unit == "video" else math.ceil(segment_frames / align) * align
        for seg_idx in range(math.ceil(n / step)):
            start, end = seg_idx * step, min(n, (seg_idx + 1) * step)
            units.append(Unit(video=vi, seg_idx=seg_idx, start=start, end=end,
                              read_start=max(0, start - before), read_end=min(n, end + after)))
    return units


BUNDLE_CUT = 32  # a bundle also ends after a clip whose path hashes to 0 modulo this (see bundle_units)


def bundle_units(units: list[Unit], videos: list[VideoInfo], bundle_frames: int, key_of) -> list[Unit]:
    """Put the videos that are one unit each (short clips, or ``work.unit=video``) into bundles:
    runs of consecutive such videos of at most ``bundle_frames`` frames in all (a longer video is
    a bundle of its own). Videos cut into segments keep their units. ``key_of(rels)`` names a
    bundle from its clips' relative paths (shards.bundle_key).

    A bundle also ends after any clip whose relative path hashes to 0 modulo BUNDLE_CUT, so its
    boundaries depend on the clips near it only: a clip added to (or removed from) the folder
    changes one or two bundles, and a relaunch finds the other bundles' records where they were."""
    import hashlib

    count: dict[int, int] = {}
    for u in units:
        count[u.video] = count.get(u.video, 0) + 1
    out: list[Unit] = []
    run: list[Unit] = []
    frames = 0

    def close() -> None:
        nonlocal run, frames
        if run:
            rels = [videos[p.video].rel or videos[p.video].stem for p in run]
            total = sum(p.frames for p in run)
            out.append(Unit(video=run[0].video, seg_idx=0, start=0, end=total, read_start=0, read_end=total,
                            out_start=0, out_end=sum(p.out_frames for p in run), parts=tuple(run),
                            bundle=key_of(rels)))
        run, frames = [], 0

    for u in units:
        if count[u.video] > 1:
            close()
            out.append(u)
            continue
        if run and frames + u.frames > bundle_frames:
            close()
        run.append(u)
        frames += u.frames
        rel = videos[u.video].rel or videos[u.video].stem
        if int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8], 16) % BUNDLE_CUT == 0:
            close()
    close()
    return out


def format_plan(plan: Plan, world: int, claim: str = "dynamic") -> str:
    """The dry-run text: the units and frame ranges, per rank when claims are strided."""
    lines = [f"{len(plan.videos)} video(s), {len(plan.units)} unit(s), {world} rank(s)"]
    for info in plan.videos:
        lines.append(f"  {info.path}: {info.frames} frames, {info.width}x{info.height}, "
                     f"{info.fps.numerator}/{info.fps.denominator} fps, audio {len(info.audio)}, "
                     f"subtitles {len(info.subtitles)}")
    for path, reason in plan.failed.items():
        lines.append(f"  {path}: FAILED: {reason}")
    for path, reason in plan.skipped.items():
        lines.append(f"  {path}: SKIPPED: {reason}")

    def unit_lines(units):
        return [f"  {plan.videos[p.video].stem} {p.key}: owns [{p.start}, {p.end}) "
                f"reads [{p.read_start}, {p.read_end})" + (f" ({u.key})" if u.parts else "")
                for u in units for p in (u.parts or (u,))]

    if claim == "strided":
        for rank in range(world):
            mine = plan.units_for_rank(rank, world)
            lines.append(f"rank {rank}: {len(mine)} unit(s), {sum(u.frames for u in mine)} frames")
            lines += unit_lines(mine)
    else:
        lines.append(f"units, claimed in this order by whichever rank is free: {len(plan.units)} unit(s), "
                     f"{sum(u.frames for u in plan.units)} frames")
        lines += unit_lines(plan.units)
    return "\n".join(lines)


def make_plan(cfg, ctx, job, output: Path, run: str, key_of, dry_run: bool = False) -> Plan:
    """The launch's plan, the same on every rank: inputs listed once (rank 0, one scan), probed
    only when new or changed since the manifest (``<output>/.vsr_ddp/manifest.jsonl``; each rank
    probes a share of those and appends to a part of it), cut into units by the job (or into
    ``work.*`` segments), short videos bundled. Rank 0 writes the probed list to a file every rank
    reads (``runs/<run>.plan.jsonl``): no per-video objects are gathered to every rank, except in
    a dry run, which writes nothing."""
    import json
    import logging
    from dataclasses import replace

    from . import shards
    from .inputs import Input, Manifest, info_from_json, info_to_json, list_inputs as list_all

    log = logging.getLogger(__name__)
    w = cfg.work
    output = Path(output)
    inputs, manifest, todo = [], None, None
    if ctx.is_main:
        inputs = list_all(cfg.input, w.shard_index, w.num_shards, exclude=[output])
        manifest = Manifest.load(shards.manifest_path(output))
        todo = [i for i in inputs if i.missing is None and manifest.lookup(i) is None]
        log.info("%d input(s) listed, %d to probe (new or changed since the manifest)", len(inputs),
                 len(todo))
    todo_file = shards.todo_file(output, run)
    if dry_run:
        todo = ctx.all_gather_object(todo)[0]
    else:  # the new files, for every rank to probe a share of: through a file, not gathered
        if ctx.is_main:
            todo_file.parent.mkdir(parents=True, exist_ok=True)
            with open(todo_file, "w", encoding="utf-8") as f:
                f.writelines(json.dumps([i.path, i.rel, i.size, i.mtime_ns]) + "\n" for i in todo)
        ctx.barrier()
        with open(todo_file, encoding="utf-8") as f:
            todo = [Input(*json.loads(line)) for n, line in enumerate(f) if n % ctx.world == ctx.rank]
    probed = []
    for inp in (strided(todo, ctx.rank, ctx.world) if dry_run else todo):
        try:
            probed.append((inp, replace(probe(inp.path), rel=inp.rel)))
        except InputError as e:
            probed.append((inp, str(e)))
        except OSError as e:
            probed.append((inp, f"cannot read ({e.strerror or e})"))
    plan_file = shards.plan_file(output, run)
    if dry_run:
        gathered = [p for part in ctx.all_gather_object(probed) for p in part]
    else:
        Manifest.append(shards.manifest_part(output, run, ctx.rank), probed)
        ctx.barrier()
    lines = None
    if ctx.is_main:
        if dry_run:
            fresh = {inp.path: res for inp, res in gathered}
        else:
            parts = [shards.manifest_part(output, run, r) for r in range(ctx.world)]
            todo_file.unlink(missing_ok=True)
            manifest = Manifest.compact(shards.manifest_path(output), [p for p in parts if p.exists()],
                                        keep={i.path for i in inputs} if w.num_shards == 1 else None)
            fresh = {}
        lines = []
        for inp in inputs:
            res = (inp.missing or fresh.get(inp.path) or manifest.lookup(inp)
                   or "not probed (its file changed as the run started)")
            lines.append({"path": inp.path, "error": res} if isinstance(res, str)
                         else {"path": inp.path, "info": info_to_json(res)})
        if not dry_run:
            plan_file.parent.mkdir(parents=True, exist_ok=True)
            with open(plan_file, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
    if dry_run:
        lines = ctx.all_gather_object(lines)[0]
    else:
        ctx.barrier()
        with open(plan_file, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
    videos, failed, skipped, units = [], {}, {}, []
    for line in lines:
        if "error" in line:
            failed[line["path"]] = line["error"]
            if ctx.is_main:
                log.error("%s: %s", line["path"], line["error"])
            continue
        info = info_from_json(line["info"])
        # The job may cut its own units (key intervals, whole videos, retimed segments) and
        # reject a video (missing keys, say) with a reason of its own; else work.* segments.
        try:
            mine = job.plan_video(info, len(videos))
            if mine is None:
                mine = plan_units([info], w.unit, w.segment_frames, w.overlap, first_index=len(videos))
            units += mine
            videos.append(info)
        except SkipVideo as e:  # left out on purpose (no prompt for it, say): not a failure
            skipped[info.path] = str(e)
            log.warning("%s: skipped: %s", info.path, e)
        except InputError as e:
            failed[info.path] = str(e)
            log.error("%s: %s", info.path, e)
    bundle = w.segment_frames if w.bundle_frames == "auto" else int(w.bundle_frames)
    units = bundle_units(units, videos, bundle, key_of)
    log.info("plan: %d video(s), %d unit(s), %d failed to probe", len(videos), len(units), len(failed))
    return Plan(videos=videos, failed=failed, units=units, skipped=skipped)
