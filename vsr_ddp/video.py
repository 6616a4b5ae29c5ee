"""Video I/O: frame-exact reads of [start, end), shard encoding, and the final merge.

All encoding goes through the ffmpeg binary that imageio-ffmpeg ships (it has libx264,
libx265 and NVENC), driven with argument lists over pipes; no system ffmpeg is assumed.
"""
from __future__ import annotations

import bisect
import functools
import logging
import math
import re
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .plan import VideoInfo
from .atomic import commit, tmp_path

log = logging.getLogger(__name__)

# Audio codecs an .mp4 carries as they are; anything else is re-encoded to AAC.
MP4_AUDIO_COPY = {"aac", "mp3", "ac3", "eac3", "alac", "opus"}
# Text subtitles become mov_text (the only subtitle codec mp4 takes); bitmap ones are dropped.
TEXT_SUBTITLES = {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"}
# Cover art formats mp4's covr tag holds; another picture is converted to PNG.
MP4_COVERS = {"png", "mjpeg", "bmp"}
# Containers where decord's random access was seen to be frame-exact (tests/test_video.py checks
# both readers against a sequential decode). Not .avi: H.264 with B-frames in AVI carries no
# timestamps, and decord then returns the wrong frames on seeks without any error.
DECORD_CONTAINERS = {".mp4", ".mov", ".m4v", ".mkv", ".webm"}


class DecodeError(RuntimeError):
    pass


class EncodeError(RuntimeError):
    """``signal``: the number of the signal that killed the encoder, when one did."""

    signal: int | None = None


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def timescale(fps: Fraction) -> int:
    """An mp4 track timescale in which every frame lasts a whole number of ticks.

    With the muxer's default the frame durations of 30000/1001 video get rounded, and
    concatenated shards drift by a frame over long runs.
    """
    return fps.numerator * max(1, math.ceil(90_000 / fps.numerator))


def even_size(width: int, height: int) -> tuple[int, int]:
    """yuv420p needs even sides; odd outputs get one replicated row/column."""
    return width + width % 2, height + height % 2


def pad_even(frames: np.ndarray) -> np.ndarray:
    """# (N, H, W, 3) uint8 -> (N, H', W', 3) with H', W' even, edge pixels replicated."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


# -- reading ----------------------------------------------------------------------------------

class FrameReader:
    """Frame-exact reads of any [start, end) of one video, in chunks, with flat memory.

    ``auto`` is PyAV: it decodes when asked, in the caller's thread, so a read holds one chunk
    however slow its consumer. decord (``work.reader=decord``) seeks by its own keyframe index,
    but its decoder thread runs ahead of a consumer slower than itself (a model, say) and keeps
    every frame it decoded: 2.8 GB after 600 frames of 720p read at 80 frames/s (PyAV: 143 MB;
    docs/benchmarks.md). Containers where decord's index is not trustworthy (.avi), variable
    frame rate (frames are found by their timestamps) and deinterlacing always go through PyAV.

    Frames come out as players show them: the stream's display rotation applied (ffmpeg's
    autorotate), and deinterlaced with bwdif when ``deinterlace`` is true. ``deep``: uint16 frames
    (rgb48, full 16-bit scale) for a video of more than 8 bits whose output keeps them; else uint8.
    """

    # Library defaults for direct callers (benchmarks, tests); a run passes work.reader / work.read_chunk.
    def __init__(self, info: VideoInfo, backend: str = "auto", chunk: int = 8, deinterlace: bool = False,
                 deep: bool = False):
        self.info = info
        self.chunk = chunk
        self.deinterlace = deinterlace
        self.deep = deep
        suffix = Path(info.path).suffix.lower()
        if backend not in ("auto", "decord", "pyav"):
            raise ValueError(f"work.reader must be auto, decord or pyav, not {backend!r}")
        if backend == "decord":
            why = (f"decord's seeking is not frame-exact for {suffix}" if suffix not in DECORD_CONTAINERS else
                   "cover art beside the video: decord picks a stream by its own rule" if info.covers else
                   "variable frame rate: frames are found by timestamp" if info.vfr else
                   "deinterlacing" if deinterlace else
                   f"{info.bit_depth}-bit frames" if deep else None)
            if why:
                log.info("%s: reading with PyAV (%s)", info.path, why)
                backend = "pyav"
        self.backend = "pyav" if backend == "auto" else backend

    def read(self, start: int, end: int) -> Iterator[np.ndarray]:
        """Yield # (n, H, W, 3) uint8 (uint16 when ``deep``) chunks covering exactly frames
        [start, end), in display orientation."""
        if not 0 <= start < end <= self.info.frames:
            raise ValueError(f"bad frame range [{start}, {end}) for {self.info.frames} frames")
        turns = self.info.rotation // 90
        got = start
        vr = self._open_decord() if self.backend == "decord" else None
        if vr is not None:
            try:
                for chunk in self._read_decord(vr, start, end):
                    got += len(chunk)
                    yield _rotate(chunk, turns)
            except DecodeError as e:
                # decord also fails on some sound files (it rejects frame sizes whose rows it pads,
                # e.g. 48x64 portrait: "from_size == to_size"): PyAV goes on from the same frame,
                # and a really damaged stream fails there too.
                log.warning("%s: decord failed at frame %d (%s); reading on with PyAV",
                            self.info.path, got, e)
                self.backend = "pyav"
        if got < end:
            for chunk in self._read_pyav(got, end):
                got += len(chunk)
                yield _rotate(chunk, turns)
        if got != end:
            raise DecodeError(f"truncated or corrupt: decoded frames [{start}, {got}) of [{start}, {end}); "
                              f"the container declares {self.info.frames} frames")

    def _open_decord(self):
        import decord

        try:
            return decord.VideoReader(self.info.path, ctx=decord.cpu(0), num_threads=1)
        except (decord.DECORDError, RuntimeError) as e:
            # decord scans every packet when it opens a file and gives up on the first bad one
            # (a truncated mp4, say); PyAV decodes what is there, and the count check decides.
            log.warning("%s: decord cannot open it (%s); reading with PyAV", self.info.path, _first_line(e))
            self.backend = "pyav"
            return None

    def _read_decord(self, vr, start: int, end: int) -> Iterator[np.ndarray]:
        import decord

        if len(vr) < end:
            raise DecodeError(f"truncated or corrupt: {len(vr)} decodable frames, the container declares "
                              f"{self.info.frames}")
        s = start
        try:
            for s in range(start, end, self.chunk):
                yield vr.get_batch(list(range(s, min(end, s + self.chunk)))).asnumpy()  # (n, H, W, 3) uint8
        except decord.DECORDError as e:
            raise DecodeError(f"truncated or corrupt: decoding failed near frame {s} "
                              f"({_first_line(e)})") from None

    def _read_pyav(self, start: int, end: int) -> Iterator[np.ndarray]:
        """# (n, H, W, 3) uint8 chunks of [start, end) as stored (not yet rotated).

        bwdif makes frame k from frames k - 1, k and k + 1, so a deinterlaced range is decoded
        one frame wider on each side: every segment then gets the frames a whole-video pass makes."""
        lo, hi = (max(0, start - 1), min(self.info.frames, end + 1)) if self.deinterlace else (start, end)
        frames = self._pyav_frames(lo, hi)
        if self.deinterlace:
            frames = _bwdif(frames, self.info)
        buf, idx = [], lo
        for idx, frame in enumerate(frames, lo):
            if idx < start:
                continue
            buf.append(frame.to_ndarray(format="rgb48le" if self.deep else "rgb24"))
            if len(buf) == self.chunk or idx == end - 1:
                yield np.stack(buf)
                buf = []
            if idx == end - 1:
                return

    def _pyav_frames(self, start: int, end: int):
        """Decoded av.VideoFrames of [start, end): seek to the keyframe before ``start``, then
        find each frame's index by its timestamp. A gap in the timestamps is an error, never a
        silently shorter or shifted range."""
        import av

        info = self.info
        try:
            container = av.open(info.path)
        except av.error.FFmpegError as e:
            raise DecodeError(f"cannot open the video: {_first_line(e)}") from None
        with container:
            vs = container.streams[info.stream]  # the probe's video stream, not cover art
            vs.thread_type = "AUTO"
            tb = vs.time_base
            t0 = info.timestamps[0] if info.vfr else (vs.start_time or 0)
            if start > 0:
                target = info.timestamps[start] if info.vfr else int(t0 + (Fraction(start) / info.fps) / tb)
                container.seek(target, stream=vs, backward=True)
            expected = start
            try:
                for pos, frame in enumerate(container.decode(vs)):
                    if frame.pts is None:
                        if start > 0:
                            raise DecodeError("frames carry no timestamps: a range cannot be read exactly "
                                              "(use work.unit=video)")
                        idx = pos  # decoding from the very start: counting is exact
                    elif info.vfr:
                        idx = bisect.bisect_left(info.timestamps, frame.pts, 0, info.frames)
                        if idx < info.frames and info.timestamps[idx] != frame.pts:
                            raise DecodeError(f"frame at timestamp {frame.pts} is not in the probe's index")
                    else:
                        idx = round((frame.pts - t0) * tb * info.fps)
                    if idx < expected:
                        continue
                    if idx > expected:
                        raise DecodeError(f"truncated or corrupt: frames [{expected}, {idx}) "
                                          f"are missing from the stream")
                    yield frame
                    expected += 1
                    if expected == end:
                        return
            except av.error.FFmpegError as e:
                raise DecodeError(f"truncated or corrupt: decoding failed at frame {expected} "
                                  f"({_first_line(e)})") from None


def _rotate(chunk: np.ndarray, turns: int) -> np.ndarray:
    """# (n, H, W, 3) as stored -> as displayed: ``turns`` quarter turns counter-clockwise, as
    the display matrix asks (np.rot90 turns counter-clockwise from axis 1 towards axis 2)."""
    return np.ascontiguousarray(np.rot90(chunk, turns, axes=(1, 2))) if turns % 4 else chunk


def _bwdif(frames, info: VideoInfo):
    """av.VideoFrames in -> the same number deinterlaced, in order (bwdif ``send_frame``: one
    frame per frame, field order from the stream). Frames the stream flags as progressive pass
    through unless ``decode.deinterlace=on`` (``deint=all`` whenever this runs on a video the
    probe did not flag)."""
    import av

    graph = None
    for frame in frames:
        if graph is None:
            graph = av.filter.Graph()
            src = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                   time_base=frame.time_base or Fraction(1, 90_000))
            deint = "interlaced" if info.interlaced else "all"
            bwdif = graph.add("bwdif", f"mode=send_frame:parity=auto:deint={deint}")
            sink = graph.add("buffersink")
            src.link_to(bwdif)
            bwdif.link_to(sink)
            graph.configure()
        graph.push(frame)
        yield from _pull_all(graph)
    if graph is not None:
        graph.push(None)
        yield from _pull_all(graph)


def _pull_all(graph):
    import av

    while True:
        try:
            yield graph.pull()
        except (BlockingIOError, av.error.EOFError):
            return
        except av.error.FFmpegError as e:
            if getattr(e, "errno", None) == 11:  # EAGAIN: the filter wants the next frame first
                return
            raise


def _first_line(e: BaseException) -> str:
    """The useful part of a decoder's message: decord prefixes each with a timestamp and
    its source location ("[19:07:37] /github/workspace/src/...cc:218: Check failed: ...")."""
    text = str(e).strip()
    if not text:
        return e.__class__.__name__
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text.splitlines()[0])
    return text.replace("Check failed: ", "")[:160]


# -- writing shards ---------------------------------------------------------------------------

# x264's preset names, and the NVENC preset of about the same speed/quality trade.
NVENC_PRESETS = {"ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p3",
                 "medium": "p4", "slow": "p5", "slower": "p6", "veryslow": "p7"}
# encode.crf is on x264's scale; x265 reaches the same quality about 5 higher (its default 28
# matches x264's 23), NVENC's constant-quality -cq about where x264's crf is.
CRF_OFFSET = {"libx264": 0, "libx265": 5, "h264_nvenc": 0, "hevc_nvenc": 0}
# NVENC's largest frame side (NV_ENC_CAPS_WIDTH_MAX), and the software encoder of the same format.
NVENC_MAX_SIDE = {"h264_nvenc": 4096, "hevc_nvenc": 8192}
SOFTWARE_CODEC = {"h264_nvenc": "libx264", "hevc_nvenc": "libx265"}


@functools.lru_cache(maxsize=None)
def encoder_works(codec: str) -> bool:
    """Whether this ffmpeg can really encode with ``codec`` here: NVENC is compiled into the
    imageio-ffmpeg binary but needs an NVIDIA GPU and driver, which only a trial tells."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
           "-i", "color=black:size=256x256:duration=0.1", "-frames:v", "2", "-c:v", codec, "-f", "null", "-"]
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolve_codec(codec: str, fmt: str = "h264", cuda: bool = False) -> str:
    """``auto`` -> h264_nvenc / hevc_nvenc on a GPU whose encoder works, else libx264 / libx265."""
    if codec != "auto":
        return codec
    if fmt not in ("h264", "hevc"):
        raise ValueError(f"encode.format must be h264 or hevc, not {fmt!r}")
    hw = f"{fmt}_nvenc"
    if cuda and encoder_works(hw):
        return hw
    return "libx264" if fmt == "h264" else "libx265"


def encoder_for_size(encode: dict, width: int, height: int) -> dict:
    """``encode`` for frames of width x height: NVENC takes at most 4096 (H.264) or 8192 (HEVC)
    pixels a side, so a larger video (x4 of 1080p) goes to libx264 / libx265. It depends on the
    size alone, so every shard of a video, on any rank, gets the same encoder."""
    limit = NVENC_MAX_SIDE.get(encode["codec"])
    if limit and max(width, height) > limit:
        return {**encode, "codec": SOFTWARE_CODEC[encode["codec"]]}
    return encode


def pick_pix_fmt(encode: dict, bit_depth: int) -> dict:
    """``encode`` with ``pix_fmt: auto`` resolved for a video of ``bit_depth`` bits: 8-bit 4:2:0
    (browser-playable) except HEVC of a deeper input, which keeps 10 bits (NVENC: p010le)."""
    if encode.get("pix_fmt", "auto") != "auto":
        return encode
    if bit_depth > 8 and encode["codec"] in ("libx265", "hevc_nvenc"):
        return {**encode, "pix_fmt": "p010le" if encode["codec"] == "hevc_nvenc" else "yuv420p10le"}
    return {**encode, "pix_fmt": "yuv420p"}


def pix_fmt_depth(pix_fmt: str) -> int:
    """Bits per sample of an output pixel format (p010le, yuv420p10le: 10)."""
    import av

    try:
        return max(c.bits for c in av.VideoFormat(pix_fmt).components)
    except (ValueError, av.error.FFmpegError):
        return 8


def encoder_args(encode, fps: Fraction, gpu: int | None = None) -> list[str]:
    """ffmpeg output options for a shard; every shard of a video gets the same ones, which is
    what lets the merge concatenate them without re-encoding. ``gpu``: the CUDA device whose
    NVENC encodes (each rank its own; ffmpeg would put every rank's encoder on GPU 0)."""
    codec = encode["codec"]
    if codec == "auto":
        raise ValueError("encode.codec=auto must be resolved (resolve_codec) before encoding")
    crf = int(encode["crf"]) + CRF_OFFSET.get(codec, 0)
    preset = str(encode["preset"])
    pix_fmt = encode.get("pix_fmt", "yuv420p")
    args = ["-c:v", codec, "-pix_fmt", "yuv420p" if pix_fmt == "auto" else pix_fmt]
    if codec in ("libx264", "libx265"):
        args += ["-preset", preset, "-crf", str(crf)]
        if codec == "libx265":
            args += ["-tag:v", "hvc1", "-x265-params", "log-level=error"]
    elif codec.endswith("_nvenc"):
        args += ["-preset", NVENC_PRESETS.get(preset, preset), "-tune", "hq", "-rc", "vbr", "-cq", str(crf),
                 "-b:v", "0"]
        if gpu is not None:
            args += ["-gpu", str(gpu)]
        if codec == "hevc_nvenc":
            args += ["-tag:v", "hvc1"]
    else:
        args += ["-q:v", str(crf)]
    return args + ["-video_track_timescale", str(timescale(fps))]


class ShardWriter:
    """Pipes # (n, H, W, 3) uint8 frames (uint16 with ``deep``: rgb48, for 10-bit output) into
    ffmpeg, which writes one encoded shard.

    The shard is written under a temporary name and only appears under ``path`` when
    :meth:`close` has checked ffmpeg's exit status.
    """

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, encode, color: dict | None = None,
                 gpu: int | None = None, sar: Fraction = Fraction(1), deep: bool = False,
                 writer: str | None = None):
        self.path = Path(path)
        self.dtype = np.uint16 if deep else np.uint8
        self.tmp = tmp_path(self.path, writer)  # this writer's own temporary name
        self.size = (width, height)
        self.frames = 0
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb48le" if deep else "rgb24", "-s", f"{width}x{height}",
               "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0", "-an"]
        cmd += encoder_args(encode, fps, gpu)
        # Tag the input's colour description: pixels go out in the matrix they were decoded
        # with, so the same tags keep them meaning the same colours. ffmpeg takes primaries and
        # transfer from the frames (setparams), not from output options, for raw RGB input.
        color = color or {}
        filters = []
        if sar != 1:  # anamorphic (a DVD's 720x576 shown 16:9): the pixels keep their shape
            filters.append(f"setsar=r={sar.numerator}/{sar.denominator}"
                           f":max={max(sar.numerator, sar.denominator, 100)}")
        tags = [f"{key}={color[key]}" for key in ("color_primaries", "color_trc") if key in color]
        if tags:
            filters.append("setparams=" + ":".join(tags))
        if filters:
            cmd += ["-vf", ",".join(filters)]
        if "colorspace" in color:
            cmd += ["-colorspace", color["colorspace"]]
        cmd += ["-f", "mp4", str(self.tmp)]
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self._stderr)

    def _error(self, what: str) -> EncodeError:
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
        err = EncodeError(f"{what}: {' | '.join(tail) or 'no message'}")
        rc = self._proc.returncode
        err.signal = -rc if rc is not None and rc < 0 else None
        return err

    def write(self, frames: np.ndarray) -> None:
        n, h, w, c = frames.shape  # (n, H, W, 3) uint8 or uint16
        if (w, h) != self.size or c != 3 or frames.dtype != self.dtype:
            raise EncodeError(f"frame batch {frames.shape} {frames.dtype} does not match {self.size}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).data)
        except (BrokenPipeError, OSError):
            self._proc.wait()
            raise self._error(f"encoder exited with status {self._proc.returncode}") from None
        self.frames += n

    def close(self) -> None:
        """Finish the shard and commit it under its final name."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        rc = self._proc.wait()
        if rc != 0:
            raise self._error(f"encoder exited with status {rc}")
        commit(self.tmp, self.path)
        self._stderr.close()

    def abort(self) -> None:
        """Stop the encoder and remove the partial shard."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        self._stderr.close()
        self.tmp.unlink(missing_ok=True)


# -- merging ----------------------------------------------------------------------------------

class Timeline:
    """Where each frame of a video is shown, in integer ticks of ``scale`` per second.

    Constant rate: frame n at n / fps (``timescale(fps)`` makes that a whole number of ticks).
    Variable rate: the input's own timestamps, in its stream's time base. Indices below 0 (decode
    times before the first frame, for B-frame delay) go on at the first frame's spacing.
    """

    def __init__(self, info: VideoInfo):
        self.fps = info.fps
        if info.vfr:
            self.scale = info.time_base.denominator
            t0, k = info.timestamps[0], info.time_base.numerator
            self._ticks = [(t - t0) * k for t in info.timestamps]  # frames + 1 entries: the end too
            self.step = self._ticks[1]
        else:
            self.scale = timescale(info.fps)
            self._ticks = None
            self.step = self.scale * info.fps.denominator // info.fps.numerator  # ticks per frame

    def at(self, n: int) -> int:
        return n * self.step if self._ticks is None or n < 0 else self._ticks[n]


def merge(shards: list[tuple[Path, int, int]], info: VideoInfo, out: Path, writer: str | None = None) -> None:
    """Join shards ``(path, first frame, frame count)``, in frame order, into ``out`` without
    re-encoding, each frame at its input time (n / fps, or the input's timestamp for variable
    rate), with the input's audio and subtitles; atomic, faststart, checked as a player sees it.

    Not ffmpeg's concat demuxer: it starts each shard where the previous one's duration ends,
    and a shard's B-frame delay depends on how many frames it holds (x264 gives a 1- or 2-frame
    shard none, longer ones two), so shards with other delays shifted the timeline and players
    repeated frames. Here each packet's presentation time comes from its absolute frame index,
    and its decode time from its place in the joined stream less the largest delay of any shard.
    """
    timeline = Timeline(info)
    delay = max(_reorder_delay(path, info.fps) for path, _, _ in shards)
    # 1. The joined, retimed video, written by libavformat's mp4 muxer from our timestamps: it
    #    keeps both (NUT over a pipe would not: it stores no decode times and guesses the first ones).
    joined = tmp_path(shards[0][0].with_name("joined.mp4"), writer)
    tmp = tmp_path(out, writer)
    try:
        codec = _write_joined(joined, shards, info, timeline, delay)
        # 2. ffmpeg copies it beside the input's audio, subtitles and cover art into the final mp4.
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
        if info.start:  # the input's first frame comes this long after its audio starts
            cmd += ["-itsoffset", f"{float(info.start):.6f}"]
        cmd += ["-i", str(joined), "-i", info.path, "-map", "0:v:0", "-c:v:0", "copy"]
        if codec == "hevc":  # Apple's players want HEVC tagged hvc1 (ffmpeg's mp4 default is hev1)
            cmd += ["-tag:v:0", "hvc1"]
        audio, extras, names = _input_streams(info)
        tail = ["-movflags", "+faststart", "-video_track_timescale", str(timeline.scale),
                "-f", "mp4", str(tmp)]
        error = _run_mux(cmd + audio + extras + tail)
        if error and extras and _run_mux(cmd + audio + tail) is None:
            # A subtitle or picture ffmpeg cannot convert (a damaged cover, say) must not cost
            # the video and its sound.
            log.warning("%s: %s could not be written to mp4 (%s); dropped",
                        info.path, ", ".join(names), error[-1])
            error = None
        if error:
            raise EncodeError(f"merge failed: {' | '.join(error[-3:])}")
        check_timeline(tmp, info)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        joined.unlink(missing_ok=True)
    commit(tmp, out)


def _input_streams(info: VideoInfo) -> tuple[list[str], list[str], list[str]]:
    """ffmpeg output options that carry the input's (ffmpeg input 1) streams into the final mp4,
    after its video: (every audio track, the text subtitles and cover art, those extras' names).

    Every audio track is kept, in order, with its language and title (ffmpeg copies each mapped
    stream's tags); one mp4 cannot copy is re-encoded to AAC. Text subtitles become mov_text.
    Bitmap subtitles (DVD, PGS, DVB) are dropped with a warning: mp4 has no place players read
    them from, and turning pictures into text is OCR. Cover art goes into mp4's ``covr`` tag,
    which holds PNG, JPEG and BMP; another picture format is converted to PNG."""
    audio, extras, names = [], [], []
    for n, a in enumerate(info.audio):
        audio += ["-map", f"1:{a['index']}"]
        if a["codec"] in MP4_AUDIO_COPY:
            audio += [f"-c:a:{n}", "copy"]
        else:
            log.info("%s: audio stream %d is %s, re-encoding it to AAC for mp4",
                     info.path, a["index"], a["codec"])
            audio += [f"-c:a:{n}", "aac", f"-b:a:{n}", "192k"]
    n_sub = 0
    for s in info.subtitles:
        if s["codec"] in TEXT_SUBTITLES:
            extras += ["-map", f"1:{s['index']}", f"-c:s:{n_sub}", "mov_text"]
            names.append(_stream_name("subtitle", s))
            n_sub += 1
        else:
            log.warning("%s: %s is a bitmap format mp4 cannot hold; dropped",
                        info.path, _stream_name("subtitle", s))
    for k, c in enumerate(info.covers, 1):  # v:0 is the video
        extras += ["-map", f"1:{c['index']}", f"-c:v:{k}", "copy" if c["codec"] in MP4_COVERS else "png",
                   f"-disposition:v:{k}", "attached_pic"]
        names.append(_stream_name("cover art", c))
    return audio, extras, names


def _stream_name(kind: str, stream: dict) -> str:
    """``subtitle stream 3 (dvdsub, fre)``: how logs name a stream of the input."""
    what = ", ".join(x for x in (stream["codec"], stream.get("language")) if x)
    return f"{kind} stream {stream['index']} ({what})"


def _run_mux(cmd: list[str]) -> list[str] | None:
    """Run ffmpeg; None when it succeeded, else what it said, line by line, without the
    ``[mp4 @ 0x55d0c0a1b2c0] `` prefixes (at least one line)."""
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode == 0:
        return None
    lines = [re.sub(r"^(\[[^]]* @ 0x[0-9a-f]+\] )+", "", line) for line in
             proc.stderr.decode("utf-8", "replace").strip().splitlines()]
    return [line for line in lines if line] or [f"ffmpeg exited with status {proc.returncode}"]


def _reorder_delay(path: Path, fps: Fraction) -> int:
    """Frames by which a shard's first decode time precedes its first frame (its B-frame delay)."""
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        for pkt in c.demux(vs):
            if pkt.size and pkt.dts is not None:
                return max(0, round(((vs.start_time or 0) - pkt.dts) * vs.time_base * fps))
    raise EncodeError(f"{path.name}: shard has no video packets")


def _write_joined(path: Path, shards: list[tuple[Path, int, int]], info: VideoInfo, timeline: Timeline,
                  delay: int) -> str:
    """Every packet of every shard, in decode order, into one mp4, retimed (see merge). Returns
    the codec's name."""
    import av

    tb = Fraction(1, timeline.scale)
    ostream, extradata = None, None
    decoded = 0  # packets written so far: the decode position in the joined stream
    with av.open(str(path), "w", format="mp4",
                 options={"video_track_timescale": str(timeline.scale)}) as joined:
        for shard, start, frames in shards:
            with av.open(str(shard)) as c:
                vs = c.streams.video[0]
                if ostream is None:
                    ostream, extradata = joined.add_stream_from_template(vs), vs.codec_context.extradata
                    ostream.time_base = tb
                elif vs.codec_context.extradata != extradata:
                    # One set of codec headers serves the joined stream: a shard encoded with other
                    # parameters would decode as garbage.
                    raise EncodeError(f"{shard.name} was encoded with other codec parameters "
                                      f"than the first shard")
                t0, shard_tb = vs.start_time or 0, vs.time_base
                count = 0
                for pkt in c.demux(vs):
                    if not pkt.size:
                        continue
                    local = round((pkt.pts - t0) * shard_tb * info.fps)  # shards are written at constant rate
                    frame = start + local
                    if not 0 <= local < frames or frame < decoded - delay:
                        raise EncodeError(f"{shard.name}: a packet at frame {local} does not fit its "
                                          f"{frames}-frame range (decode position {decoded}, delay {delay})")
                    pkt.stream = ostream
                    pkt.time_base = tb
                    pkt.pts = timeline.at(frame)
                    pkt.dts = timeline.at(decoded - delay)
                    pkt.duration = timeline.at(frame + 1) - timeline.at(frame)
                    joined.mux(pkt)
                    decoded += 1
                    count += 1
                if count != frames:
                    raise EncodeError(f"{shard.name} holds {count} frames, its sidecar says {frames}")
        return ostream.codec_context.name


def check_timeline(path: Path, info: VideoInfo) -> None:
    """Raise unless ``path`` shows what a decoder should: ``info.frames`` frames, frame n at the
    input's time for frame n, the first at the input's start offset, and, at constant rate,
    every frame lasting one frame (a longer one is what makes players repeat frames)."""
    import av

    timeline = Timeline(info)
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        tb = vs.time_base
        packets = [(p.pts, p.duration) for p in c.demux(vs) if p.size and p.pts is not None]
    if len(packets) != info.frames:
        raise EncodeError(f"merged video has {len(packets)} timed frames, expected {info.frames}")
    pts = sorted(p for p, _ in packets)
    scale = Fraction(1, timeline.scale)
    for n, p in enumerate(pts):
        if (p - pts[0]) * tb != timeline.at(n) * scale:
            raise EncodeError(f"merged video shows frame {n} at {float((p - pts[0]) * tb):.6f} s, "
                              f"expected {float(timeline.at(n) * scale):.6f} s")
    if abs(pts[0] * tb - info.start) > Fraction(1, 1000):
        raise EncodeError(f"merged video starts at {float(pts[0] * tb):.6f} s, the input's video at "
                          f"{float(info.start):.6f} s")
    if not info.vfr:
        for n, (_, duration) in enumerate(packets):
            if duration * tb != 1 / info.fps:
                raise EncodeError(f"merged video's frame {n} (decode order) lasts "
                                  f"{float(duration * tb):.6f} s, "
                                  f"not one frame ({float(1 / info.fps):.6f} s)")


def output_sar(info: VideoInfo, width: int, height: int) -> Fraction:
    """The pixel aspect that shows ``width`` x ``height`` frames at the input's display aspect."""
    return (info.sar * info.width * height / (info.height * width)).limit_denominator(65535)
