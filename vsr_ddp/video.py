"""Video I/O: frame-exact reads of [start, end), shard encoding, and the final merge.

All encoding goes through the ffmpeg binary that imageio-ffmpeg ships (it has libx264,
libx265 and NVENC), driven with argument lists over pipes; no system ffmpeg is assumed.
"""
from __future__ import annotations

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
from .shards import commit, tmp_path

log = logging.getLogger(__name__)

# Audio codecs an .mp4 carries as they are; anything else is re-encoded to AAC.
MP4_AUDIO_COPY = {"aac", "mp3", "ac3", "eac3", "alac", "opus"}
# Text subtitles become mov_text (the only subtitle codec mp4 takes); bitmap ones are dropped.
TEXT_SUBTITLES = {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"}
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
    docs/benchmarks.md). Containers where decord's index is not trustworthy (.avi) always go
    through PyAV, and the log says so.
    """

    def __init__(self, info: VideoInfo, backend: str = "auto", chunk: int = 8):
        self.info = info
        self.chunk = chunk
        suffix = Path(info.path).suffix.lower()
        if backend == "auto":
            backend = "pyav"
        elif backend == "decord" and suffix not in DECORD_CONTAINERS:
            log.info("%s: reading with PyAV (decord's seeking is not frame-exact for %s)", info.path, suffix)
            backend = "pyav"
        if backend not in ("decord", "pyav"):
            raise ValueError(f"work.reader must be auto, decord or pyav, not {backend!r}")
        self.backend = backend

    def read(self, start: int, end: int) -> Iterator[np.ndarray]:
        """Yield # (n, H, W, 3) uint8 chunks covering exactly frames [start, end)."""
        if not 0 <= start < end <= self.info.frames:
            raise ValueError(f"bad frame range [{start}, {end}) for {self.info.frames} frames")
        got = start
        vr = self._open_decord() if self.backend == "decord" else None
        if vr is not None:
            try:
                for chunk in self._read_decord(vr, start, end):
                    got += len(chunk)
                    yield chunk
            except DecodeError as e:
                # decord also fails on some sound files (it rejects frame sizes whose rows it pads,
                # e.g. 48x64 portrait: "from_size == to_size"): PyAV goes on from the same frame,
                # and a really damaged stream fails there too.
                log.warning("%s: decord failed at frame %d (%s); reading on with PyAV", self.info.path, got, e)
                self.backend = "pyav"
        if got < end:
            for chunk in self._read_pyav(got, end):
                got += len(chunk)
                yield chunk
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
            raise DecodeError(f"truncated or corrupt: decoding failed near frame {s} ({_first_line(e)})") from None

    def _read_pyav(self, start: int, end: int) -> Iterator[np.ndarray]:
        """Seek to the keyframe before ``start`` and count frames by timestamp; a gap in the
        timestamps is an error, never a silently shorter or shifted range."""
        import av

        fps = self.info.fps
        try:
            container = av.open(self.info.path)
        except av.error.FFmpegError as e:
            raise DecodeError(f"cannot open the video: {_first_line(e)}") from None
        with container:
            vs = container.streams.video[0]
            vs.thread_type = "AUTO"
            tb = vs.time_base
            t0 = vs.start_time or 0
            if start > 0:
                container.seek(int(t0 + (Fraction(start) / fps) / tb), stream=vs, backward=True)
            buf, expected = [], start
            try:
                for pos, frame in enumerate(container.decode(vs)):
                    if frame.pts is None:
                        if start > 0:
                            raise DecodeError("frames carry no timestamps: a range cannot be read exactly "
                                              "(use work.unit=video)")
                        idx = pos  # decoding from the very start: counting is exact
                    else:
                        idx = round((frame.pts - t0) * tb * fps)
                    if idx < expected:
                        continue
                    if idx > expected:
                        raise DecodeError(f"truncated or corrupt: frames [{expected}, {idx}) are missing from the stream")
                    buf.append(frame.to_ndarray(format="rgb24"))
                    expected += 1
                    if len(buf) == self.chunk or expected == end:
                        yield np.stack(buf)
                        buf = []
                    if expected == end:
                        break
            except av.error.FFmpegError as e:
                raise DecodeError(f"truncated or corrupt: decoding failed at frame {expected} ({_first_line(e)})") from None
            if buf:
                yield np.stack(buf)


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
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60).returncode == 0
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


def encoder_args(encode, fps: Fraction, gpu: int | None = None) -> list[str]:
    """ffmpeg output options for a shard; every shard of a video gets the same ones, which is
    what lets the merge concatenate them without re-encoding. ``gpu``: the CUDA device whose
    NVENC encodes (each rank its own; ffmpeg would put every rank's encoder on GPU 0)."""
    codec = encode["codec"]
    if codec == "auto":
        raise ValueError("encode.codec=auto must be resolved (resolve_codec) before encoding")
    crf = int(encode["crf"]) + CRF_OFFSET.get(codec, 0)
    preset = str(encode["preset"])
    args = ["-c:v", codec, "-pix_fmt", encode.get("pix_fmt", "yuv420p")]
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
    """Pipes # (n, H, W, 3) uint8 frames into ffmpeg, which writes one encoded shard.

    The shard is written under a temporary name and only appears under ``path`` when
    :meth:`close` has checked ffmpeg's exit status.
    """

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, encode, color: dict | None = None,
                 gpu: int | None = None):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self.size = (width, height)
        self.frames = 0
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0", "-an"]
        cmd += encoder_args(encode, fps, gpu)
        # Tag the input's colour description: pixels go out in the matrix they were decoded
        # with, so the same tags keep them meaning the same colours.
        for key, value in (color or {}).items():
            cmd += [f"-{key}", value]
        cmd += ["-f", "mp4", str(self.tmp)]
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)

    def _error(self, what: str) -> EncodeError:
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
        err = EncodeError(f"{what}: {' | '.join(tail) or 'no message'}")
        rc = self._proc.returncode
        err.signal = -rc if rc is not None and rc < 0 else None
        return err

    def write(self, frames: np.ndarray) -> None:
        n, h, w, c = frames.shape  # (n, H, W, 3) uint8
        if (w, h) != self.size or c != 3 or frames.dtype != np.uint8:
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

def _concat_line(path: Path) -> str:
    # concat demuxer quoting: inside '...', a quote is written as '\''
    return "file '" + str(path).replace("'", "'\\''") + "'\n"


def merge(shards: list[Path], info: VideoInfo, out: Path, list_file: Path) -> None:
    """Concatenate shards (already in frame order) without re-encoding, mux the input's audio
    and subtitles, and write ``out`` atomically with faststart."""
    list_file.write_text("".join(_concat_line(p.name) for p in shards), encoding="utf-8")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
           "-f", "concat", "-safe", "0", "-i", str(list_file), "-i", info.path, "-map", "0:v:0"]
    codecs = ["-c:v", "copy"]
    for n, a in enumerate(info.audio):
        cmd += ["-map", f"1:{a['index']}"]
        if a["codec"] in MP4_AUDIO_COPY:
            codecs += [f"-c:a:{n}", "copy"]
        else:
            log.info("%s: audio stream %d is %s, re-encoding it to AAC for mp4", info.path, a["index"], a["codec"])
            codecs += [f"-c:a:{n}", "aac", f"-b:a:{n}", "192k"]
    n_sub = 0
    for s in info.subtitles:
        if s["codec"] in TEXT_SUBTITLES:
            cmd += ["-map", f"1:{s['index']}"]
            codecs += [f"-c:s:{n_sub}", "mov_text"]
            n_sub += 1
        else:
            log.warning("%s: subtitle stream %d (%s) is a bitmap format mp4 cannot hold; dropped",
                        info.path, s["index"], s["codec"])
    tmp = tmp_path(out)
    cmd += codecs + ["-movflags", "+faststart", "-video_track_timescale", str(timescale(info.fps)),
                     "-f", "mp4", str(tmp)]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=list_file.parent)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise EncodeError(f"merge failed: {' | '.join(tail)}")
    try:
        frames = count_frames(tmp)
        if frames != info.frames:
            raise EncodeError(f"merged video has {frames} frames, expected {info.frames}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, out)


def count_frames(path: Path) -> int:
    """Frame count from the container's sample table (no decoding)."""
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        return vs.frames or sum(1 for p in c.demux(vs) if p.size)

