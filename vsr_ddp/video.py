"""Video I/O: frame-exact reads of [start, end), shard encoding, and the final merge.

All encoding goes through the ffmpeg binary that imageio-ffmpeg ships (it has libx264,
libx265 and NVENC), driven with argument lists over pipes; no system ffmpeg is assumed.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import io
import logging
import math
import os
import re
import struct
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .plan import VideoInfo
from .atomic import TMP_SUFFIX, commit, tmp_path

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
    :meth:`close` has checked ffmpeg's exit status; flushed to disk first (``durable``), unless
    it is a bundled clip's, remuxed to its output at once and removed.
    """

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, encode, color: dict | None = None,
                 gpu: int | None = None, sar: Fraction = Fraction(1), deep: bool = False,
                 writer: str | None = None, durable: bool = True):
        self.path = Path(path)
        self.durable = durable
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
        if self.durable:
            commit(self.tmp, self.path)
        else:
            os.replace(self.tmp, self.path)
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


def merge(shards: list[tuple[Path, int, int]], info: VideoInfo, out: Path, writer: str | None = None,
          checksums: list[str | None] | None = None) -> dict:
    """Join shards ``(path, first frame, frame count)``, in frame order, into ``out`` without
    re-encoding, each frame at its input time (n / fps, or the input's timestamp for variable
    rate), with the input's audio and subtitles; atomic, faststart, checked as a player sees it.
    Returns ``{"shard_bytes": bytes read from the shards, "output_bytes": size of out}``.

    Not ffmpeg's concat demuxer: it starts each shard where the previous one's duration ends,
    and a shard's B-frame delay depends on how many frames it holds (x264 gives a 1- or 2-frame
    shard none, longer ones two), so shards with other delays shifted the timeline and players
    repeated frames. Here each packet's presentation time comes from its absolute frame index,
    and its decode time from its place in the joined stream less the reorder delay (see
    :func:`_shard_packets`).

    One pass over the data: each shard is read once, into memory (a shard is one segment, so
    memory stays flat in the video's length), hashed there against ``checksums`` (sha256 hex per
    shard, or None: not checked) and demuxed from that copy; its packets, the input's audio
    (copied as it is where mp4 takes the codec) and the converted extras go, interleaved by
    time, through libavformat's mp4 muxer into the one output file. Only what mp4 cannot copy
    (audio to AAC, text subtitles to mov_text, cover art to PNG; small next to the video) is
    converted first by one ffmpeg call into a side file that never holds the video. Faststart
    without a second rewrite: the muxer reserves room for the index at the start of the file
    (``moov_size``) and writes it there at the end; only if the reservation proves too small is
    the merge done again with the muxer's ``+faststart`` (the shards read again, the file moved
    once more), with a warning. The timeline is checked on the timestamps as they are written
    and then on the finished file's index (its moov box), not by reading its media data again.
    The input is still demuxed once for its audio, as before (in mp4/mov inputs the demuxer
    skips the video's bytes; in interleaved containers such as mkv it reads past them).
    """
    timeline = Timeline(info)
    out = Path(out)
    tmp = tmp_path(out, writer)
    # the converted streams: named like one of out's temporary files, so that the cleanup of
    # an interrupted merge (atomic.partials(out)) removes it too
    side = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX) + ".streams" + TMP_SUFFIX)
    try:
        sources = _side_streams(info, side)
        estimate = _moov_estimate(info, sources, side)
        try:
            stats = _mux(tmp, shards, info, timeline, sources, side, checksums, {"moov_size": str(estimate)})
        except _MoovTooSmall as e:
            log.warning("%s: the index outgrew the %d bytes reserved for it at the start of the file (%s); "
                        "writing the file again with +faststart", out.name, estimate, e)
            stats = _mux(tmp, shards, info, timeline, sources, side, checksums, {"movflags": "+faststart"})
        check_index(tmp, info)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        side.unlink(missing_ok=True)
    commit(tmp, out)
    stats["output_bytes"] = out.stat().st_size
    return stats


class _MoovTooSmall(Exception):
    pass


def _side_streams(info: VideoInfo, side: Path) -> list[tuple[str, int]]:
    """Where each output stream after the video comes from, in output order: ``("input", stream
    index)`` for audio copied from the input, ``("side", stream index)`` for one converted into
    ``side`` by ffmpeg here (audio mp4 cannot copy, text subtitles, cover art).

    Every audio track is kept, in order, with its language and title; one mp4 cannot copy is
    re-encoded to AAC. Text subtitles become mov_text. Bitmap subtitles (DVD, PGS, DVB) are
    dropped with a warning: mp4 has no place players read them from, and turning pictures into
    text is OCR. Cover art goes into mp4's ``covr`` tag, which holds PNG, JPEG and BMP; another
    picture format is converted to PNG. Cover art goes through the side file even when it is
    copied as it is: ffmpeg then tells a picture mp4 cannot hold (a damaged one) before the
    merge, which drops it with a warning rather than losing the video and its sound."""
    audio_maps, extras, names = [], [], []
    sources: list = []
    for a in info.audio:
        if a["codec"] in MP4_AUDIO_COPY:
            sources.append(("input", a["index"]))
        else:
            log.info("%s: audio stream %d is %s, re-encoding it to AAC for mp4",
                     info.path, a["index"], a["codec"])
            n = len(audio_maps) // 6
            audio_maps += ["-map", f"0:{a['index']}", f"-c:a:{n}", "aac", f"-b:a:{n}", "192k"]
            sources.append(("side", n))
    n_sub, n_pic = 0, 0
    for s in info.subtitles:
        if s["codec"] in TEXT_SUBTITLES:
            extras += ["-map", f"0:{s['index']}", f"-c:s:{n_sub}", "mov_text"]
            names.append(_stream_name("subtitle", s))
            n_sub += 1
        else:
            log.warning("%s: %s is a bitmap format mp4 cannot hold; dropped",
                        info.path, _stream_name("subtitle", s))
    for c in info.covers:
        extras += ["-map", f"0:{c['index']}", f"-c:v:{n_pic}", "copy" if c["codec"] in MP4_COVERS else "png",
                   f"-disposition:v:{n_pic}", "attached_pic"]
        names.append(_stream_name("cover art", c))
        n_pic += 1
    if not audio_maps and not extras:
        return sources
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", info.path]
    tail = ["-f", "mp4", str(side)]
    error = _run_mux(cmd + audio_maps + extras + tail)
    if error and extras and (not audio_maps or _run_mux(cmd + audio_maps + tail) is None):
        # A subtitle or picture ffmpeg cannot convert (a damaged cover, say) must not cost
        # the video and its sound.
        log.warning("%s: %s could not be written to mp4 (%s); dropped",
                    info.path, ", ".join(names), error[-1])
        side.unlink(missing_ok=True)
        error, extras = None, []
    if error:
        raise EncodeError(f"merge failed: {' | '.join(error[-3:])}")
    # the side file's streams in order: converted audio, then subtitles, then pictures
    extra_count = n_sub + n_pic if extras else 0
    first = len(audio_maps) // 6
    return sources + [("side", first + k) for k in range(extra_count)]


def _moov_estimate(info: VideoInfo, sources: list[tuple[str, int]], side: Path) -> int:
    """Bytes to reserve for the moov box at the start of the output: per sample the worst case of
    its table entries (stts 8, ctts 8, stsz 4, co64 8, stsc 12, stss 4, sdtp 1 bytes for video;
    the same less ctts/stss for audio and subtitles), plus the pictures (the covr tag is in the
    moov), all times 1.25, plus 128 KiB for headers and tags. Input audio that is copied is
    counted from its index where the container has one, else from its duration and the shortest
    packet among its first ones (a few KiB of the input's start)."""
    import av

    samples, pictures = 0, 0
    copied = [i for kind, i in sources if kind == "input"]
    if copied:
        with av.open(info.path) as c:
            duration = max(Fraction(c.duration or 0, 1_000_000), info.time_of(info.frames) + info.start)
            want = [c.streams[i] for i in copied]
            for s in c.streams:
                if s not in want:
                    s.discard = av.stream.Discard.all
            shortest: dict[int, Fraction] = {}
            seen = 0
            for pkt in c.demux(want):
                if pkt.duration and pkt.stream.index in copied:
                    d = pkt.duration * pkt.time_base
                    shortest[pkt.stream.index] = min(shortest.get(pkt.stream.index, d), d)
                seen += 1
                if seen >= 50 * len(want):
                    break
            for s in want:
                rate = 1 / shortest[s.index] if s.index in shortest else 400  # 2.5 ms: Opus's shortest
                samples += max(s.frames, math.ceil(duration * rate))
    if any(kind == "side" for kind, _ in sources) and side.exists():
        with av.open(str(side)) as c:  # small: the converted streams only
            for pkt in c.demux():
                if pkt.stream.disposition & av.stream.Disposition.attached_pic:
                    pictures += pkt.size
                elif pkt.size:
                    samples += 1
    return math.ceil(1.25 * (45 * info.frames + 40 * samples + pictures) + 128 * 1024)


def _shard_packets(shards, info: VideoInfo, timeline: Timeline, checksums, stats: dict):
    """The joined video's packets, retimed, in decode order, one shard in memory at a time:
    each shard file is read once, its bytes checked against its checksum, then demuxed.

    A packet of frame n (absolute) is presented at ``timeline.at(n)`` (plus the input's start
    offset, added by the caller) and decoded at ``timeline.at(k - delay)``, k its place in the
    joined stream: the delay is the first shard's B-frame delay (from its first packet; every
    shard has the same encoder settings, and the first is a full segment unless the video is
    short). A later shard with a larger delay (or one that would decode a frame after showing it)
    raises :class:`_NeedDelay`, and the caller starts over with the larger delay: the one case
    where the shards are read twice, and only when the first shard is shorter than a B-frame
    group (a video shorter than a few frames' segment)."""
    import av

    tb = Fraction(1, timeline.scale)
    decoded, delay, extradata = 0, None, None
    for i, (shard, start, frames) in enumerate(shards):
        shard = Path(shard)
        data = shard.read_bytes()
        stats["shard_bytes"] += len(data)
        want = checksums[i] if checksums else None
        if want is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != want:
                raise EncodeError(f"{shard.name}: its bytes do not match the checksum its sidecar records "
                                  f"(sha256 {got[:12]}..., recorded {want[:12]}...)")
        with av.open(io.BytesIO(data)) as c:
            vs = c.streams.video[0]
            if extradata is None:
                extradata = vs.codec_context.extradata
                delay = stats["delay"]
                yield "template", vs
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
                if count == 0 and pkt.dts is not None:  # this shard's own B-frame delay
                    own = round(((vs.start_time or 0) - pkt.dts) * vs.time_base * info.fps)
                    if own > delay and decoded:
                        raise _NeedDelay(own)
                    delay = max(delay, own)
                local = round((pkt.pts - t0) * shard_tb * info.fps)  # shards are written at constant rate
                frame = start + local
                if not 0 <= local < frames:
                    raise EncodeError(f"{shard.name}: a packet at frame {local} does not fit its "
                                      f"{frames}-frame range (decode position {decoded}, delay {delay})")
                if frame < decoded - delay:
                    raise _NeedDelay(decoded - frame)
                pkt.time_base = tb
                pkt.pts = timeline.at(frame)
                pkt.dts = timeline.at(decoded - delay)
                pkt.duration = timeline.at(frame + 1) - timeline.at(frame)
                yield frame, pkt
                decoded += 1
                count += 1
            if count != frames:
                raise EncodeError(f"{shard.name} holds {count} frames, its sidecar says {frames}")


class _NeedDelay(Exception):
    def __init__(self, delay: int):
        super().__init__(delay)
        self.delay = delay


def _mux(tmp: Path, shards, info: VideoInfo, timeline: Timeline, sources: list[tuple[str, int]], side: Path,
         checksums, options: dict, delay: int = 0) -> dict:
    """Write ``tmp`` in one pass (see merge); returns the stats. Retries with a larger reorder
    delay when a later shard needs one (rare: the codec headers give it)."""
    try:
        return _mux_once(tmp, shards, info, timeline, sources, side, checksums, options, delay)
    except _NeedDelay as e:
        log.info("a shard decodes %d frame(s) ahead; writing the merge again with that delay", e.delay)
        return _mux(tmp, shards, info, timeline, sources, side, checksums, options, max(e.delay, delay + 1))


def _mux_once(tmp, shards, info, timeline, sources, side, checksums, options, delay) -> dict:
    import av

    tmp.unlink(missing_ok=True)
    stats = {"shard_bytes": 0, "delay": delay}
    video = _shard_packets(shards, info, timeline, checksums, stats)
    inputs, out = [], None
    try:
        _, template = next(video)
        out = av.open(str(tmp), "w", format="mp4",
                      options={"video_track_timescale": str(timeline.scale), **options})
        ostream = out.add_stream_from_template(template)
        ostream.time_base = Fraction(1, timeline.scale)
        if template.codec_context.name == "hevc":
            # Apple's players want HEVC tagged hvc1 (libavformat's mp4 default is hev1)
            ostream.codec_context.codec_tag = "hvc1"
        src = av.open(info.path) if any(k == "input" for k, _ in sources) else None
        sc = av.open(str(side)) if any(k == "side" for k, _ in sources) else None
        inputs = [c for c in (src, sc) if c is not None]
        wanted = {id(src): [], id(sc): []}
        for kind, index in sources:  # output streams in order: video, audio tracks, subtitles, pictures
            c = src if kind == "input" else sc
            s = c.streams[index]
            o = out.add_stream_from_template(s)
            o.time_base = s.time_base
            o.metadata.update({k: v for k, v in s.metadata.items() if k.lower() in ("language", "title")})
            if s.disposition & av.stream.Disposition.attached_pic:
                o.disposition = av.stream.Disposition.attached_pic
            wanted[id(c)].append((s, o))
        feeds = [_video_feed(video, ostream, info, timeline)]
        if src is not None:  # the input's own timestamps, less its start (as ffmpeg reads it)
            feeds.append(_copied(src, wanted[id(src)], Fraction(src.start_time or 0, 1_000_000)))
        if sc is not None:  # ffmpeg already took the input's start off
            feeds.append(_copied(sc, wanted[id(sc)], Fraction(0)))
        # interleaved by time here (one shard in memory at a time); the muxer's own interleaving
        # (av_interleaved_write_frame) then only reorders within its small window
        for _, pkt in heapq.merge(*feeds, key=lambda x: x[0]):
            out.mux(pkt)
    except BaseException as e:
        if out is not None:
            try:
                out.close()
            except Exception:
                pass
        if isinstance(e, av.error.FFmpegError):
            raise EncodeError(f"merge failed: {_first_line(e)}") from None
        raise
    finally:
        video.close()
        for c in inputs:
            c.close()
    try:
        out.close()  # the trailer: the index, into the room reserved at the start
    except av.error.FFmpegError as e:
        if "moov_size" in options:  # libavformat: "reserved_moov_size is too small"
            raise _MoovTooSmall(_first_line(e)) from None
        raise EncodeError(f"merge failed: {_first_line(e)}") from None
    del stats["delay"]
    return stats


def _video_feed(video, ostream, info: VideoInfo, timeline: Timeline):
    """(decode time in seconds, packet) of the joined video, moved to the input's start offset;
    the timestamp check while writing: every frame of the timeline shown once, none outside it."""
    offset = round(info.start * timeline.scale)  # the input's video starts this long after its audio
    tb = Fraction(1, timeline.scale)
    seen = bytearray(info.frames)
    for frame, pkt in video:
        if not 0 <= frame < info.frames or seen[frame]:
            raise EncodeError(f"merged video has frame {frame} twice or outside its {info.frames} frames")
        seen[frame] = 1
        pkt.pts += offset
        pkt.dts += offset
        pkt.stream = ostream
        yield pkt.dts * tb, pkt
    if sum(seen) != info.frames:
        raise EncodeError(f"merged video has {sum(seen)} timed frames, expected {info.frames}")


def _copied(container, pairs, start: Fraction):
    """(time in seconds, packet) of the given streams of ``container``, retargeted to the output
    streams and moved ``start`` seconds earlier, in the container's order."""
    import av

    keep = {s.index: (s, o, round(start / s.time_base)) for s, o in pairs}
    for s in container.streams:
        if s.index not in keep:
            s.discard = av.stream.Discard.all  # mp4: the demuxer then skips those samples' bytes altogether
    for pkt in container.demux([s for s, _ in pairs]):
        if pkt.stream.index not in keep or (not pkt.size and pkt.dts is None):
            continue
        s, o, shift = keep[pkt.stream.index]
        if pkt.pts is not None:
            pkt.pts -= shift
        if pkt.dts is not None:
            pkt.dts -= shift
        t = pkt.dts if pkt.dts is not None else pkt.pts
        if s.disposition & av.stream.Disposition.attached_pic:
            pkt.pts = pkt.dts = None
        pkt.stream = o
        yield (-math.inf if t is None or s.disposition & av.stream.Disposition.attached_pic
               else t * s.time_base), pkt


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


def check_timeline(path: Path, info: VideoInfo) -> None:
    """Raise unless ``path`` shows what a decoder should: ``info.frames`` frames, frame n at the
    input's time for frame n, the first at the input's start offset, and, at constant rate,
    every frame lasting one frame (a longer one is what makes players repeat frames).

    Reads every packet of the video (any container); :func:`check_index` asks the same of an
    mp4's index alone."""
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        tb = vs.time_base
        packets = [(p.pts, p.duration) for p in c.demux(vs) if p.size and p.pts is not None]
    _check_packets(packets, tb, info)


def check_index(path: Path, info: VideoInfo) -> None:
    """:func:`check_timeline` on an mp4's index (its moov box: sample durations, composition
    offsets, edit list), which is what players time frames by; the media data is not read."""
    packets, tb = _index_timeline(Path(path))
    _check_packets(packets, tb, info)


def _check_packets(packets: list[tuple[int, int]], tb: Fraction, info: VideoInfo) -> None:
    """The checks of check_timeline on (pts, duration) pairs in decode order, in ``tb`` ticks."""
    timeline = Timeline(info)
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


def _boxes(data: bytes, pos: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO BMFF boxes in data[pos:end]."""
    end = len(data) if end is None else end
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1:
            size, head = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < head:
            raise EncodeError(f"damaged mp4 box {kind!r} at {pos}")
        yield kind, pos + head, pos + size
        pos += size


def top_level_boxes(path: Path) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of an mp4's top-level boxes, read from their headers only."""
    found = []
    with open(path, "rb") as f:
        pos, end = 0, f.seek(0, 2)
        while pos + 8 <= end:
            f.seek(pos)
            head = f.read(16)
            size, kind = struct.unpack_from(">I4s", head)
            if size == 1:
                size = struct.unpack_from(">Q", head, 8)[0]
            elif size == 0:
                size = end - pos
            if size < 8:
                break
            found.append((kind, pos, size))
            pos += size
    return found


def _index_timeline(path: Path) -> tuple[list[tuple[int, int]], Fraction]:
    """(pts, duration) of the first video track's samples in decode order, and its time base,
    as libavformat's mov demuxer presents them: from stts, ctts and the edit list of the moov."""
    boxes = {kind: (offset, size) for kind, offset, size in top_level_boxes(path)}
    if b"moov" not in boxes:
        raise EncodeError(f"{path.name}: no moov box")
    offset, size = boxes[b"moov"]
    with open(path, "rb") as f:
        f.seek(offset)
        moov = f.read(size)
    movie_scale = None
    for kind, a, b in _boxes(moov, 8):
        if kind == b"mvhd":
            version = moov[a]
            movie_scale = struct.unpack_from(">I", moov, a + (20 if version == 1 else 12))[0]
        if kind != b"trak":
            continue
        trak = {k: (x, y) for k, x, y in _boxes(moov, a, b)}
        mdia = {k: (x, y) for k, x, y in _boxes(moov, *trak[b"mdia"])}
        hdlr = mdia[b"hdlr"][0]
        if moov[hdlr + 8:hdlr + 12] != b"vide":
            continue
        mdhd = mdia[b"mdhd"][0]
        scale = struct.unpack_from(">I", moov, mdhd + (20 if moov[mdhd] == 1 else 12))[0]
        minf = {k: (x, y) for k, x, y in _boxes(moov, *mdia[b"minf"])}
        stbl = {k: (x, y) for k, x, y in _boxes(moov, *minf[b"stbl"])}
        durations: list[int] = []
        a2 = stbl[b"stts"][0]
        for i in range(struct.unpack_from(">I", moov, a2 + 4)[0]):
            count, delta = struct.unpack_from(">II", moov, a2 + 8 + 8 * i)
            durations += [delta] * count
        offsets = [0] * len(durations)
        if b"ctts" in stbl:
            a2 = stbl[b"ctts"][0]
            fmt = ">Ii" if moov[a2] == 1 else ">II"
            k = 0
            for i in range(struct.unpack_from(">I", moov, a2 + 4)[0]):
                count, value = struct.unpack_from(fmt, moov, a2 + 8 + 8 * i)
                offsets[k:k + count] = [value] * count
                k += count
        shift = 0  # the edit list: an empty edit delays the track, a media time skips into it
        if b"edts" in trak:
            for kind2, x, _ in _boxes(moov, *trak[b"edts"]):
                if kind2 != b"elst":
                    continue
                version = moov[x]
                fmt, step = (">Qq", 20) if version == 1 else (">Ii", 12)
                for i in range(struct.unpack_from(">I", moov, x + 4)[0]):
                    edit, media = struct.unpack_from(fmt, moov, x + 8 + step * i)
                    if media == -1:
                        shift += edit * scale // (movie_scale or scale)
                    else:
                        shift -= media
                        break
        dts, packets = 0, []
        for d, o in zip(durations, offsets):
            packets.append((dts + o + shift, d))
            dts += d
        return packets, Fraction(1, scale)
    raise EncodeError(f"{path.name}: no video track in its index")


def output_sar(info: VideoInfo, width: int, height: int) -> Fraction:
    """The pixel aspect that shows ``width`` x ``height`` frames at the input's display aspect."""
    return (info.sar * info.width * height / (info.height * width)).limit_denominator(65535)
