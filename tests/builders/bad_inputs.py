"""Inputs that must fail with a clear one-line reason: empty, not a video, audio only, truncated,
corrupt, a video stream with no frames; and the shortest video that must not fail (one frame)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .clips import make_clip
from .common import _run_ffmpeg

# --- Bad inputs ---


def make_zero_byte(path: str | Path) -> Path:
    """An empty file."""
    Path(path).write_bytes(b"")
    return Path(path)


def make_not_a_video(path: str | Path) -> Path:
    """Plain text under a video name (e.g. 'notes.mp4')."""
    Path(path).write_text("this is not a video, just text with a .mp4 name\n" * 20)
    return Path(path)


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An .mp4 whose only stream is AAC audio."""
    _run_ffmpeg(["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
                 "-c:a", "aac", str(path)])
    return Path(path)


def make_zero_frames(path: str | Path, size: tuple[int, int] = (64, 48), fps: str = "30",
                     audio: bool = False) -> Path:
    """An .mp4/.mov whose H.264 video track has no samples: the header names the stream (codec,
    size) and there is not a single frame, as a recorder killed before its first frame leaves;
    with ``audio``, one second of AAC beside it (a camera that never started, a microphone that did).

    ffmpeg's mov muxer leaves an empty track out of a plain mp4 (that file would have no video
    stream at all); a fragmented one (``empty_moov``) writes every track into the header up front,
    so the track stays, with zero samples and no fragments. (ffmpeg cannot write or read a Matroska
    file with an empty track: that one is "not a readable video".)
    """
    path, (w, h) = Path(path), size
    frag = ["-movflags", "+frag_keyframe+empty_moov"]
    video = path.with_name(path.stem + ".video-only" + path.suffix) if audio else path
    _run_ffmpeg(["-f", "lavfi", "-i", f"color=c=gray:size={w}x{h}:rate={fps}", "-frames:v", "0",
                 "-c:v", "libx264", "-pix_fmt", "yuv420p", *frag, str(video)])
    if audio:  # libx264 opens only on its first frame, so the empty track is made alone, then copied
        sine = "sine=frequency=440:sample_rate=48000:duration=1"
        try:
            _run_ffmpeg(["-i", str(video), "-f", "lavfi", "-i", sine, "-map", "0:v", "-map", "1:a",
                         "-c:v", "copy", "-c:a", "aac", *frag, str(path)])
        finally:
            video.unlink(missing_ok=True)
    return path


def make_one_frame(path: str | Path, size: tuple[int, int] = (64, 48), fps: str = "30000/1001",
                   audio: bool = True, seed: int = 0) -> Path:
    """A valid clip of exactly one frame (index code 0; with audio, one frame's duration of it):
    the shortest input every job must take, not fail."""
    return make_clip(path, frames=1, size=size, fps=fps, audio=audio, seed=seed)


def make_truncated(src: str | Path, dst: str | Path, keep: float = 0.4) -> Path:
    """Copy the first `keep` fraction of src's bytes.

    MP4/MOV are remuxed with +faststart first: with the moov (index) before the data
    the cut file still opens and lists every frame, but the data runs out part way
    (ffmpeg's default moov-last MP4 would not open at all). Matroska/WebM/AVI already
    keep their headers at the front. With B-frames the last decodable frame can follow
    a gap (its B-frames were cut off), and where the cut lands decides whether PyAV
    stops cleanly or raises InvalidDataError.
    """
    src, dst = Path(src), Path(dst)
    if src.suffix.lower() in (".mp4", ".mov"):
        _run_ffmpeg(["-i", str(src), "-map", "0", "-c", "copy", "-movflags", "+faststart", str(dst)])
        src = dst
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _mdat_payload(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the first top-level ISO-BMFF 'mdat' box's payload, or None."""
    pos = 0
    while pos + 8 <= len(data):
        size, header = int.from_bytes(data[pos:pos + 4], "big"), 8
        if size == 1:  # 64-bit largesize follows the type
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        size = size or len(data) - pos  # 0 means "to end of file"
        if size < header:
            return None
        if data[pos + 4:pos + 8] == b"mdat":
            return pos + header, min(pos + size, len(data))
        pos += size
    return None


def make_corrupt(src: str | Path, dst: str | Path, span: tuple[float, float] = (0.4, 0.6),
                 seed: int = 0) -> Path:
    """Copy src with a `span` fraction of its media payload overwritten by seeded random bytes.

    For MP4/MOV the span is relative to the mdat payload, so the index stays intact and
    only sample data is garbage (H.264 decoding then raises InvalidDataError); for other
    containers it is relative to the whole file (Matroska/WebM demuxers resync and
    silently drop the frames in the span).
    """
    data = bytearray(Path(src).read_bytes())
    start, end = _mdat_payload(data) or (0, len(data))
    a, b = start + int((end - start) * span[0]), start + int((end - start) * span[1])
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


# --- A checkpoint that runs code when unpickled ---


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears exactly when the
    file's pickle was run as code (``torch.load(weights_only=False)``, ``pickle.load``).
    ``builtins.open`` is importable in every process, so the payload cannot fail for want of
    this module: a loader that unpickles code does create the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_code_checkpoint(path: str | Path, marker: str | Path) -> Path:
    """A torch.save file that looks like weights (a state dict of tensors under the usual keys)
    but also holds an object whose unpickling creates ``marker``: the checkpoint a user may be
    handed as ``evil.pth``, ``flownet.pkl`` or ``raft_large.pth``. A loader that reads weights
    only refuses it; one that unpickles code runs the payload."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"conv_first.weight": torch.zeros(4, 3, 3, 3), "conv_first.bias": torch.zeros(4),
             "payload": _Payload(Path(marker))}
    torch.save({"params_ema": state, "state_dict": state, **state}, str(path))
    return path
