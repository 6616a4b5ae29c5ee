"""Footage as users have it: phone rotation, variable frame rate, interlacing, 10 bits, audio
with a known onset, subtitles, natural camera motion with a cut."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .clips import iter_frames
from .common import _run_ffmpeg


def make_rotated(src: str | Path, dst: str | Path, degrees: int) -> Path:
    """``src`` with a display matrix that turns it ``degrees`` counter-clockwise, stream copied, as
    phones record (a portrait phone clip: stored landscape, rotation 270 = 90 clockwise)."""
    _run_ffmpeg(["-display_rotation:v:0", str(degrees), "-i", str(src), "-c", "copy", str(dst)])
    return Path(dst)


def make_vfr(path: str | Path, parts=((30, "30"), (15, "10")), size: tuple[int, int] = (64, 48),
             audio: bool = True) -> tuple[Path, list[Fraction]]:
    """A variable-frame-rate clip as phones and screen recorders write: ``parts`` of (frames, fps)
    one after the other (default: 30 frames at 30 fps, then 15 at 10 fps), index-coded frames,
    and a sine of the whole duration. Returns (path, every frame's intended time in seconds)."""
    times, t = [], Fraction(0)
    for n, fps in parts:
        for _ in range(n):
            times.append(t)
            t += 1 / Fraction(fps)
    total = sum(n for n, _ in parts)
    # frame N is shown at times[N]: setpts from a piecewise expression, kept as is (fps_mode passthrough)
    expr, offset, first = [], Fraction(0), 0
    for n, fps in parts:
        expr.append((first, first + n, offset, Fraction(fps)))
        offset += n / Fraction(fps)
        first += n
    setpts = "0"
    for a, b, off, fps in reversed(expr):
        at = f"{off.numerator}/{off.denominator}+(N-{a})*{fps.denominator}/{fps.numerator}"
        setpts = f"if(lt(N,{b}),({at}),{setpts})"
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size[0]}x{size[1]}", "-framerate", "30",
            "-i", "-"]
    maps, opts = ["-map", "0:v"], []
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
        maps += ["-map", "1:a"]
        opts += ["-c:a", "aac", "-af", f"atrim=end_sample={round(t * 48000)}"]
    opts += ["-vf", f"setpts='({setpts})/TB'", "-fps_mode", "passthrough", "-enc_time_base", "1/90000",
             "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "12", "-crf", "20", "-preset", "veryfast",
             "-video_track_timescale", "90000"]
    _run_ffmpeg([*args, *maps, *opts, str(path)], iter_frames(total, size))
    return Path(path), times


def make_interlaced(path: str | Path, frames: int = 24, size: tuple[int, int] = (64, 48),
                    fps: str = "25") -> Path:
    """A top-field-first interlaced clip (DVD, broadcast): each frame's two fields are taken 1/50 s
    apart from a moving picture, so a progressive read shows combing on every moving edge; coded
    as interlaced H.264 (field order flagged in the stream)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]

    def picture(t: float) -> np.ndarray:  # a bright bar sweeping right: (H, W, 3) uint8
        x0 = (t * 40) % w
        bar = ((xx - x0) % w < w // 4).astype(np.uint8) * 200 + 30
        return np.repeat(bar[..., None], 3, axis=2).astype(np.uint8)

    def woven():
        for n in range(frames):
            top, bottom = picture(n / float(Fraction(fps))), picture((n + 0.5) / float(Fraction(fps)))
            frame = top.copy()
            frame[1::2] = bottom[1::2]
            yield frame

    _run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", fps, "-i", "-",
                 "-vf", "setfield=tff", "-c:v", "libx264", "-flags", "+ilme+ildct", "-x264-params", "tff=1",
                 "-pix_fmt", "yuv420p", "-crf", "12", "-preset", "veryfast", str(path)], woven())
    return Path(path)


def make_ten_bit_ramp(path: str | Path, frames: int = 6, size: tuple[int, int] = (1024, 16)) -> Path:
    """A 10-bit HEVC clip (yuv420p10le) of a slow grey ramp: 1,024 levels across the frame, four
    times what 8 bits hold, so an 8-bit stage anywhere shows as lost levels."""
    w, h = size
    ramp = np.linspace(0, 65535, w).astype(np.uint16)  # (W,) 16-bit scale
    frame = np.repeat(np.repeat(ramp[None, :, None], h, axis=0), 3, axis=2)  # (H, W, 3) uint16
    _run_ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb48le", "-s", f"{w}x{h}", "-framerate", "25", "-i", "-",
                 "-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error:lossless=1",
                 "-preset", "ultrafast", str(path)], (frame for _ in range(frames)))
    return Path(path)


def luma_levels(path: str | Path) -> tuple[str, int]:
    """(pixel format, how many distinct luma values the first frame has), decoded natively."""
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        fmt = frame.format.name
        plane = frame.planes[0]
        dtype = np.uint16 if "10" in fmt else np.uint8
        y = np.frombuffer(bytes(plane), dtype).reshape(plane.height, -1)[:, :plane.width]
        return fmt, len(np.unique(y))


def with_beep(src: str | Path, dst: str | Path, onset: float, seconds: float, audio_codec: str = "aac",
              video_delay: float = 0.0) -> Path:
    """``src``'s video with an audio track that is silent, then a 1 kHz tone from ``onset`` s (audio
    time) to ``seconds``: where the tone starts in the output tells its sync. ``video_delay``: the
    video starts this long after the audio (a start offset in the container)."""
    beep = f"aevalsrc=if(gte(t\\,{onset})\\,0.5*sin(2*PI*1000*t)\\,0):s=48000:d={seconds}"
    _run_ffmpeg(["-itsoffset", str(video_delay), "-i", str(src), "-f", "lavfi", "-i", beep, "-map", "0:v",
                 "-map", "1:a", "-c:v", "copy", "-c:a", audio_codec, str(dst)])
    return Path(dst)


def audio_onset(path: str | Path) -> float:
    """Seconds (on the file's own timeline) at which the first audio stream gets loud."""
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        for frame in c.decode(a):
            x = frame.to_ndarray().astype(np.float64)
            x = x.reshape(-1, x.shape[-1]).mean(axis=0) if x.ndim > 1 else x  # (samples,)
            if x.dtype.kind == "i" or np.abs(x).max() > 1.5:
                x = x / 32768
            loud = np.flatnonzero(np.abs(x) > 0.1)
            if len(loud):
                return float(frame.pts * frame.time_base) + loud[0] / frame.sample_rate
    raise ValueError(f"{path}: the audio never gets loud")


def subtitle_cues(path: str | Path) -> list[tuple[float, float, str]]:
    """(start s, end s, text) of each cue of the first subtitle stream."""
    cues = []
    with av.open(str(path)) as c:
        s = c.streams.subtitles[0]
        for pkt in c.demux(s):
            if pkt.pts is None or not pkt.size:
                continue
            data = bytes(pkt)
            if s.codec_context.name == "mov_text":  # a 16-bit length, the text, then style boxes
                data = data[2:2 + int.from_bytes(data[:2], "big")]
            text = data.decode("utf-8", "replace")
            if not text:  # mov_text marks the gap between two cues with an empty sample
                continue
            start = float(pkt.pts * pkt.time_base)
            cues.append((round(start, 3), round(start + float(pkt.duration * pkt.time_base), 3), text))
    return cues


def pan_frames(frames: int, size: tuple[int, int] = (160, 96), cut_at: int | None = None,
               step: float = 1.7) -> np.ndarray:
    """Natural motion: a camera panning (``step`` px a frame, sub-pixel) and slowly zooming over
    scikit-image's astronaut photograph; from ``cut_at`` on, a hard cut to the coffee photograph,
    panning too. (N, H, W, 3) uint8."""
    import cv2
    import skimage.data

    w, h = size
    scenes = (skimage.data.astronaut(), skimage.data.coffee())
    out = []
    for n in range(frames):
        k = n if cut_at is None or n < cut_at else n - cut_at
        photo = scenes[0] if cut_at is None or n < cut_at else scenes[1]
        zoom = 1.6 * (1 + 0.004 * k)  # photo pixels per output pixel shrink: a slow zoom in
        m = np.float32([[1 / zoom, 0, -(60 + step * k)], [0, 1 / zoom, -(80 + 0.6 * step * k)]])
        m[:, 2] /= zoom
        out.append(cv2.warpAffine(photo, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)
