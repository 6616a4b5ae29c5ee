"""Inputs that must fail with a clear one-line reason: empty, not a video, audio only, truncated,
corrupt."""
from __future__ import annotations

from pathlib import Path

import numpy as np

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
