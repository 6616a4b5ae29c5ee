"""Footage as users have it: phone rotation, variable frame rate, interlacing, 10 bits, audio
with a known onset, subtitles, natural camera motion with a cut; the streams beside the video
(audio tracks in several languages, cover art, DVD image subtitles)."""
from __future__ import annotations

import tempfile
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


# --- Streams beside the video: several audio tracks, cover art, image subtitles ---

def make_audio_tracks(path: str | Path, frames: int = 20, size: tuple[int, int] = (64, 48), fps: str = "25",
                      tracks: tuple = (("eng", 440, "aac"), ("deu", 880, "aac"))) -> Path:
    """An index-coded clip with one audio track per ``(language, tone Hz, codec)``, each a sine of
    the clip's length tagged with its ISO 639-2 language (as a film with dubs carries them);
    container from the suffix (.mkv takes ``libopus``, ``flac``, ``libvorbis``, ... too)."""
    seconds = Fraction(frames) / Fraction(fps)
    w, h = size
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", fps, "-i", "-"]
    maps = ["-map", "0:v"]
    opts = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "12", "-crf", "20", "-preset", "veryfast"]
    for n, (language, tone, codec) in enumerate(tracks):
        args += ["-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=48000"]
        maps += ["-map", f"{n + 1}:a"]
        opts += [f"-c:a:{n}", codec, f"-filter:a:{n}", f"atrim=end_sample={round(seconds * 48000)}",
                 f"-metadata:s:a:{n}", f"language={language}"]
    _run_ffmpeg([*args, *maps, *opts, str(path)], iter_frames(frames, size))
    return Path(path)


def with_cover(src: str | Path, dst: str | Path, size: tuple[int, int] = (32, 32), fmt: str = "png",
               damaged: bool = False) -> Path:
    """``src``'s streams, copied, plus cover art (``fmt``: png, jpeg or gif) as music videos and
    ripped films carry it: in an .mp4 an ``attached_pic`` stream (written as the ``covr`` tag), in
    an .mkv an image attachment; either way a demuxer lists it as one more video stream of one
    picture. ``damaged`` (.mkv): the attachment is seeded random bytes under the format's name,
    a picture no decoder reads."""
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        cover = Path(tmp) / f"cover.{'jpg' if fmt == 'jpeg' else fmt}"
        if damaged:
            cover.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        else:
            _run_ffmpeg(["-f", "lavfi", "-i", f"testsrc=size={size[0]}x{size[1]}", "-frames:v", "1",
                         "-update", "1", str(cover)])
        if dst.suffix.lower() == ".mkv":
            _run_ffmpeg(["-i", str(src), "-map", "0", "-c", "copy", "-attach", str(cover),
                         "-metadata:s:t", f"mimetype=image/{fmt}", "-metadata:s:t", f"filename={cover.name}",
                         str(dst)])
        else:
            with av.open(str(src)) as c:
                k = len(c.streams.video)  # the cover comes after the source's video streams
            _run_ffmpeg(["-i", str(src), "-i", str(cover), "-map", "0", "-map", "1", "-c", "copy",
                         f"-disposition:v:{k}", "attached_pic", str(dst)])
    return dst


def _spu_rle_line(row: np.ndarray) -> bytes:
    """One line of a DVD subpicture, 2-bit colours run-length coded in nibbles, byte-aligned."""
    nibbles, x = [], 0
    while x < len(row):
        n = 1
        while x + n < len(row) and row[x + n] == row[x] and n < 255:
            n += 1
        v = (n << 2) | int(row[x])  # 4, 8, 12 or 16 bits: the length's leading zeros say which
        width = 1 if n < 4 else 2 if n < 16 else 3 if n < 64 else 4
        nibbles += [(v >> (4 * k)) & 15 for k in reversed(range(width))]
        x += n
    nibbles += [0] * (len(nibbles) % 2)
    return bytes((a << 4) | b for a, b in zip(nibbles[::2], nibbles[1::2]))


def dvd_subtitle_packet(bitmap: np.ndarray, x: int, y: int, seconds: float) -> bytes:
    """A DVD subpicture unit (SPU, codec dvd_subtitle) showing ``bitmap`` (H, W) of colour indices
    0..3 (0 transparent) at (x, y) for ``seconds``: RLE fields (even lines, then odd), then two
    control sequences, "show" and "hide". ffmpeg decodes these but cannot encode them from text."""
    h, w = bitmap.shape
    top = b"".join(_spu_rle_line(bitmap[r]) for r in range(0, h, 2))
    bottom = b"".join(_spu_rle_line(bitmap[r]) for r in range(1, h, 2))
    x2, y2 = x + w - 1, y + h - 1
    show_cmds = bytes([0x01,  # start display
                       0x03, 0x32, 0x10,  # palette entries of colours 3, 2, 1, 0
                       0x04, 0xFF, 0xF0,  # contrast (alpha): colour 0 transparent, the others opaque
                       0x05, x >> 4, ((x & 15) << 4) | (x2 >> 8), x2 & 255,
                       y >> 4, ((y & 15) << 4) | (y2 >> 8), y2 & 255,
                       0x06, *(4).to_bytes(2, "big"), *(4 + len(top)).to_bytes(2, "big"),  # field offsets
                       0xFF])
    show_at = 4 + len(top) + len(bottom)
    hide_at = show_at + 4 + len(show_cmds)
    delay = round(seconds * 90_000 / 1024)  # control sequence dates are in 1024/90 kHz ticks
    body = (top + bottom + (0).to_bytes(2, "big") + hide_at.to_bytes(2, "big") + show_cmds
            + delay.to_bytes(2, "big") + hide_at.to_bytes(2, "big") + bytes([0x02, 0xFF]))
    return (4 + len(body)).to_bytes(2, "big") + show_at.to_bytes(2, "big") + body


def with_image_subtitles(src: str | Path, dst: str | Path, cues: tuple = ((0.1, 0.3), (0.5, 0.7)),
                         language: str = "fre") -> Path:
    """``src``'s streams, copied, plus a DVD (bitmap) subtitle track in an .mkv: one boxed bar per
    ``(start s, end s)`` cue, as a DVD rip carries them. The packets are built here
    (:func:`dvd_subtitle_packet`) and muxed with PyAV; ffmpeg then copies everything together."""
    with av.open(str(src)) as c:
        w, h = c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height
    bitmap = np.zeros((max(4, h // 6), max(8, w // 2)), np.uint8)  # (H, W) colour indices
    bitmap[1:-1, 1:-1] = 1
    bitmap[2:-2, 3:-3] = 2
    tb = Fraction(1, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        subs = Path(tmp) / "subs.mkv"
        with av.open(str(subs), "w") as out:
            s = out.add_stream("dvdsub")
            s.codec_context.extradata = (f"size: {w}x{h}\npalette: 000000, ffffff, 808080, ff0000, 00ff00, "
                                         f"0000ff, ffff00, 00ffff, ff00ff, 404040, c0c0c0, 800000, 008000, "
                                         f"000080, 808000, 008080\n").encode()
            s.time_base = tb
            s.metadata["language"] = language
            x, y = (w - bitmap.shape[1]) // 2, h - bitmap.shape[0] - 2  # centred near the bottom
            for start, end in cues:
                pkt = av.Packet(dvd_subtitle_packet(bitmap, x, y, end - start))
                pkt.stream, pkt.time_base = s, tb
                pkt.pts = pkt.dts = round(Fraction(start) / tb)
                pkt.duration = round(Fraction(end - start) / tb)
                out.mux(pkt)
        _run_ffmpeg(["-i", str(src), "-i", str(subs), "-map", "0", "-map", "1", "-c", "copy", str(dst)])
    return Path(dst)


def stream_list(path: str | Path) -> list[dict]:
    """What a player lists in a file: per stream its type, codec, language, whether it is an
    attached picture (cover art), and for video its size and decoded frame count."""
    out = []
    with av.open(str(path)) as c:
        for s in c.streams:
            cc = s.codec_context
            entry = {"index": s.index, "type": s.type, "codec": cc.name if cc else None,
                     "language": s.metadata.get("language"),
                     "attached_pic": bool(s.disposition & av.stream.Disposition.attached_pic)}
            if s.type == "video":
                entry.update(width=cc.width, height=cc.height)
            out.append(entry)
    for entry in out:
        if entry["type"] == "video" and not entry["attached_pic"]:
            with av.open(str(path)) as c:
                entry["frames"] = sum(1 for _ in c.decode(c.streams[entry["index"]]))
    return out


def audio_tones(path: str | Path) -> list[float]:
    """The loudest frequency (Hz) of each audio track, in stream order: which tone went where."""
    tones = []
    with av.open(str(path)) as c:
        for a in c.streams.audio:
            x = np.concatenate([f.to_ndarray().astype(np.float64).reshape(-1, f.samples)[0]
                                for f in c.decode(a)])  # (samples,) first channel
            spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
            tones.append(float(np.argmax(spectrum) * a.codec_context.sample_rate / len(x)))
            c.seek(0)
    return tones
