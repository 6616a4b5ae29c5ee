"""Synthetic clips whose frames carry their own index (the frame-index code), and the reference
readers: a plain sequential PyAV decode, ffmpeg's default decode, per-frame timestamps."""
from __future__ import annotations

import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from .common import FFMPEG, _run_ffmpeg

# --- Frame-index code ---
# 12 bits as 2 rows x 6 columns of black/white blocks filling the top third of the
# frame. A single 12-bit row would be 5 px wide at 64 px; this grid gives W/6 x H/6
# blocks (10.7x8 px at 64x48) that survive 4:2:0 chroma, H.264 and any upscaling.
INDEX_BITS, _COLS = 12, 6


def _cell(k: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of bit k's block in an h x w frame."""
    r, c = divmod(k, _COLS)
    return round(r * h / 6), round((r + 1) * h / 6), round(c * w / _COLS), round((c + 1) * w / _COLS)


def encode_index(frame: np.ndarray, idx: int) -> np.ndarray:
    """Paint idx (MSB first, white = 1) into the top band of frame, in place; returns frame.

    frame: (H, W, 3) uint8
    """
    if not 0 <= idx < 2 ** INDEX_BITS:
        raise ValueError(f"index {idx} does not fit in {INDEX_BITS} bits")
    for k in range(INDEX_BITS):
        y0, y1, x0, x1 = _cell(k, *frame.shape[:2])
        frame[y0:y1, x0:x1] = 255 if (idx >> (INDEX_BITS - 1 - k)) & 1 else 0
    return frame


def decode_indices(frames: Iterable[np.ndarray]) -> list[int]:
    """Read the index code back from frames of any size (same aspect ratio as encoded).

    frames: (N, H, W, 3) uint8, or an iterable of (H, W, 3). Each bit is the mean of
    the central half (per axis) of its block, thresholded at 128: ringing and
    deblocking live at block edges, the centre stays clean.
    """
    out = []
    for f in frames:
        idx = 0
        for k in range(INDEX_BITS):
            y0, y1, x0, x1 = _cell(k, *f.shape[:2])
            qy, qx = (y1 - y0) // 4, (x1 - x0) // 4
            idx = (idx << 1) | int(f[y0 + qy:y1 - qy, x0 + qx:x1 - qx].mean() >= 128)
        out.append(idx)
    return out


def iter_frames(n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> Iterator[np.ndarray]:
    """Yield n frames (H, W, 3) uint8: index code on top of a moving seeded texture.

    size is (width, height). The texture (random sinusoids with whole cycles across
    the frame, so rolling it is seamless, plus mild noise) drifts 2 px right and 1 px
    down per frame, giving the encoder real motion to predict.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = np.full((h, w, 3), 128.0, np.float32)  # (H, W, 3) float32
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.integers(1, 4, size=2)
            phase = 2 * np.pi * (fx * xx / w + fy * yy / h) + rng.uniform(0, 2 * np.pi)
            tex[..., c] += rng.uniform(15, 30) * np.sin(phase)
    tex = np.clip(tex + rng.normal(0, 6, tex.shape), 0, 255).astype(np.uint8)
    for i in range(n):
        yield encode_index(np.roll(tex, (i, 2 * i), axis=(0, 1)), i)


def synth_frames(n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """The exact frames make_clip encodes: (N, H, W, 3) uint8."""
    return np.stack(list(iter_frames(n, size, seed)))


# --- Clips ---
# per container: (video codec, audio codec, text-subtitle codec or None)
_CONTAINERS = {
    ".mp4": ("libx264", "aac", "mov_text"),
    ".mov": ("libx264", "aac", "mov_text"),
    ".mkv": ("libx264", "aac", "subrip"),
    ".webm": ("libvpx-vp9", "libopus", "webvtt"),
    # Xvid-style AVI: mpeg4 has no B-frames by default (AVI stores no B-frame pts); PCM
    # because AVI cannot signal encoder delay, so MP3 would decode >1 frame too long
    ".avi": ("mpeg4", "pcm_s16le", None),
}
_VIDEO_OPTS = {"libvpx-vp9": ["-crf", "30", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8"],
               "mpeg4": ["-q:v", "3"]}
SUBTITLE_TEXTS = ("First test cue", "Second test cue")


def _srt_time(t: float) -> str:
    ms = round(t * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def make_clip(path: str | Path, frames: int = 48, size: tuple[int, int] = (64, 48),
              fps: str | int | Fraction = "30000/1001", audio: bool = True,
              subtitles: bool = False, codec: str | None = None,
              audio_codec: str | None = None, *, crf: int = 20, gop: int = 12,
              seed: int = 0, faststart: bool = False, pix_fmt: str = "yuv420p",
              video_opts: tuple = ()) -> Path:
    """Encode synth_frames(frames, size, seed) into a real file; container from the suffix.

    codec / audio_codec None pick the container's default (_CONTAINERS); size is
    (width, height), even for yuv420p. gop=12 gives several keyframes and libx264's
    default B-frames stay on, so seeking is non-trivial. Audio is a 440 Hz sine of
    exactly round(frames / fps * 48000) samples; subtitles are two cues carrying
    SUBTITLE_TEXTS (not possible in .avi). ``video_opts`` go after the codec options
    (``("-vf", "setsar=64/45")``, interlacing flags, ...).
    """
    path, fps = Path(path), Fraction(str(fps))
    ext, (w, h) = path.suffix.lower(), size
    if ext not in _CONTAINERS or w % 2 or h % 2 or not 0 < frames <= 2 ** INDEX_BITS:
        raise ValueError(f"need .mp4/.mov/.mkv/.webm/.avi, even size, 1..4096 frames: {path} {size} {frames}")
    vcodec, acodec, scodec = _CONTAINERS[ext]
    vcodec, acodec = codec or vcodec, audio_codec or acodec
    seconds = float(frames / fps)
    path.parent.mkdir(parents=True, exist_ok=True)

    inputs = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "-"]
    maps = ["-map", "0:v"]
    opts = ["-c:v", vcodec, "-pix_fmt", pix_fmt, "-g", str(gop),
            *_VIDEO_OPTS.get(vcodec, ["-crf", str(crf), "-preset", "veryfast"]), *video_opts]
    if audio:  # atrim by sample count: exact length, independent of lavfi frame size
        inputs += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
        maps += ["-map", "1:a"]
        opts += ["-c:a", acodec, "-af", f"atrim=end_sample={round(frames / fps * 48000)}"]
    if faststart and ext in (".mp4", ".mov"):
        opts += ["-movflags", "+faststart"]
    with tempfile.TemporaryDirectory() as tmp:
        if subtitles:
            if scodec is None:
                raise ValueError(f"{ext} cannot carry text subtitles")
            srt = Path(tmp) / "cues.srt"
            spans = [(0.0, 0.4 * seconds), (0.5 * seconds, 0.9 * seconds)]
            srt.write_text("".join(f"{i + 1}\n{_srt_time(a)} --> {_srt_time(b)}\n{text}\n\n"
                                   for i, ((a, b), text) in enumerate(zip(spans, SUBTITLE_TEXTS))))
            inputs += ["-i", str(srt)]
            maps += ["-map", f"{1 + audio}:s"]
            opts += ["-c:s", scodec]
        _run_ffmpeg([*inputs, *maps, *opts, str(path)], iter_frames(frames, size, seed))
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """Reference sequential decode of the first video stream with PyAV: (N, H, W, 3) uint8."""
    with av.open(str(path)) as container:
        if not container.streams.video:  # PyAV alone would raise a bare IndexError
            raise ValueError(f"{path}: no video stream")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames) if frames else np.empty((0, 0, 0, 3), np.uint8)


def probe_streams(path: str | Path) -> dict:
    """Fully decode video and audio with PyAV; decode errors propagate (InvalidDataError).

    Keys: frames (decoded count), fps (Fraction), width, height, video_codec, audio_codec,
    audio_duration (decoded samples / rate: AAC runs up to one 1024-sample frame long, its
    end padding is not trimmed), audio_declared_duration (stream duration: exact in MP4,
    None in Matroska/AVI), subtitles (stream count). Absent streams give None / 0.
    """
    info = dict(frames=0, fps=None, width=None, height=None, video_codec=None, audio_codec=None,
                audio_duration=None, audio_declared_duration=None, subtitles=0)
    # one pass per stream keeps each loop trivial; test clips are tiny
    with av.open(str(path)) as container:
        info["subtitles"] = len(container.streams.subtitles)
        has_audio = bool(container.streams.audio)
        if container.streams.video:
            v = container.streams.video[0]
            info.update(fps=v.average_rate or v.guessed_rate, width=v.width, height=v.height,
                        video_codec=v.codec_context.name, frames=sum(1 for _ in container.decode(v)))
    if has_audio:
        with av.open(str(path)) as container:
            a = container.streams.audio[0]
            samples = sum(f.samples for f in container.decode(a))
            rate = a.codec_context.sample_rate
            info.update(audio_codec=a.codec_context.name, audio_duration=samples / rate)
            if a.duration is not None:
                info["audio_declared_duration"] = float(a.duration * a.time_base)
    return info


def ffmpeg_decode(path: str | Path, *vf: str) -> np.ndarray:
    """What a user's ffmpeg makes of a file: its default decode (autorotate on, constant-rate
    output at the stream's rate, so mistimed frames come out repeated or dropped) to raw rgb24.
    ``vf``: filters to add (``bwdif``, ...). (N, H, W, 3) uint8."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        w, h, rot = vs.codec_context.width, vs.codec_context.height, 0
        for frame in c.decode(vs):
            rot = round(frame.rotation or 0) % 180
            break
    if rot == 90:
        w, h = h, w
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path)]
    if vf:
        cmd += ["-vf", ",".join(vf)]
    raw = subprocess.run(cmd + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                         check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)


def frame_times(path: str | Path) -> tuple[list[Fraction], list[int]]:
    """A player's view, frame by frame (PyAV decode): each frame's time in seconds and its index code."""
    times, frames = [], []
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        for frame in c.decode(vs):
            times.append(frame.pts * frame.time_base)
            frames.append(frame.to_ndarray(format="rgb24"))
    return times, decode_indices(frames)


def encode_frames(path: str | Path, frames: np.ndarray, fps: str, audio: bool = False, crf: int = 8) -> Path:
    """(N, H, W, 3) uint8 -> an H.264 file at ``fps`` (near-lossless by default), optional sine audio."""
    n, h, w, _ = frames.shape
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", fps, "-i", "-"]
    maps, opts = ["-map", "0:v"], []
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
        maps += ["-map", "1:a"]
        opts += ["-c:a", "aac", "-af", f"atrim=end_sample={round(n / Fraction(fps) * 48000)}"]
    _run_ffmpeg([*args, *maps, *opts, "-c:v", "libx264", "-pix_fmt", "yuv444p", "-crf", str(crf),
                 "-preset", "veryfast", str(path)], iter(frames))
    return Path(path)
