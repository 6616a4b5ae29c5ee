"""Shared builders for test inputs: tiny Real-ESRGAN models and synthetic clips.

Everything is generated locally and deterministically: models come from seeded
random weights, clips are encoded by the ffmpeg binary bundled with imageio-ffmpeg
(never a system ffmpeg, so every machine encodes alike). A plain sequential PyAV decode
is the reference; the production reader (seeks, frames counted by timestamp; or decord) is
checked against it.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()

# --- Tiny Real-ESRGAN architectures (copies of basicsr / Real-ESRGAN modules) ---
# Attribute names must match upstream exactly: they become the state-dict keys
# that spandrel uses to detect the architecture.


class ResidualDenseBlock(nn.Module):
    """basicsr ResidualDenseBlock: 5 densely connected convs, 0.2 residual scaling."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class RRDB(nn.Module):
    """basicsr Residual-in-Residual Dense Block."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """basicsr RRDBNet (RealESRGAN_x4plus / x2plus), tiny by default.

    The trunk always upsamples x4; scale 2 and 1 pixel-unshuffle the input first (by
    2 and 4) exactly as upstream, so conv_first sees 12 / 48 input channels - that is
    how spandrel infers the scale. num_grow_ch stays 32 (upstream's value) because
    spandrel 0.4.2 hard-codes gc=32 and cannot load anything else.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4,
                 num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 32):
        super().__init__()
        self.scale = scale
        num_in_ch *= {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, sH, sW)
        feat = F.pixel_unshuffle(x, 4 // self.scale) if self.scale != 4 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN SRVGGNetCompact (realesr-animevideov3 / realesr-general-x4v3).

    Layer order in `body` matters: spandrel detects this arch by body.0 and body.1
    weights (so only act_type='prelu' is recognisable) and reads the scale from the
    last conv's channel count.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 8,
                 num_conv: int = 2, upscale: int = 4, act_type: str = "prelu"):
        super().__init__()
        self.upscale = upscale
        act = {"relu": lambda: nn.ReLU(inplace=True), "prelu": lambda: nn.PReLU(num_parameters=num_feat),
               "leakyrelu": lambda: nn.LeakyReLU(negative_slope=0.1, inplace=True)}[act_type]
        layers = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), act()]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), act()]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, sH, sW)
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


@torch.no_grad()
def _seeded(cls, seed: int, last, mean: float, std: float, **kw) -> nn.Module:
    """Build cls with seeded default init, then recondition the conv last(model).

    Raw random nets give near-constant outputs (default init shrinks activations) plus
    a fixed per-channel / per-subpixel bias pattern. So: zero the bias, make the output
    luma-dominant, and rescale so a fixed random batch has the requested mean/std.
    Outputs then vary visibly with the input and stay roughly within [-0.5, 1.5].
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = cls(**kw).eval()
    conv = last(model)
    conv.bias.zero_()
    # PixelShuffle makes output channel c from conv channels c*s*s .. c*s*s+s*s-1, so
    # this view is (colour, subpixel, in, kh, kw) for both archs. Mostly shared weights
    # across colours: independent per-pixel colour noise is what yuv420p's chroma
    # subsampling destroys, which would swamp pipeline-vs-reference comparisons.
    w = conv.weight.view(3, -1, *conv.weight.shape[1:])
    w.copy_(w.mean(0, keepdim=True) + 0.2 * (w - w.mean(0, keepdim=True)))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1234))  # (B, 3, H, W)
    compact = isinstance(model, SRVGGNetCompact)

    def out() -> torch.Tensor:  # for Compact, only the residual over nearest-upsampling
        y = model(x)
        return y - F.interpolate(x, scale_factor=model.upscale, mode="nearest") if compact else y

    conv.weight.mul_(std / out().std().clamp_min(1e-8))
    conv.bias.add_(mean - out().mean())
    return model


def make_rrdbnet(scale: int = 4, seed: int = 0, **kw) -> RRDBNet:
    """Deterministic tiny RRDBNet; outputs have mean ~0.5, std ~0.15 for [0, 1] input."""
    return _seeded(RRDBNet, seed, lambda m: m.conv_last, 0.5, 0.15, scale=scale, **kw)


def make_srvgg(scale: int = 4, seed: int = 0, **kw) -> SRVGGNetCompact:
    """Deterministic tiny SRVGGNetCompact: nearest upsampling + a small (std 0.05) residual,
    so its output still resembles the input (the frame-index code survives it)."""
    return _seeded(SRVGGNetCompact, seed, lambda m: m.body[-1], 0.0, 0.05, upscale=scale, **kw)


def _save(model: nn.Module, path: str | Path, wrapper_key: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":  # safetensors releases are bare state dicts
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({wrapper_key: state}, path)
    return path


def save_rrdbnet(path: str | Path, scale: int = 4, seed: int = 0, **kw) -> Path:
    """Save make_rrdbnet() as RealESRGAN_x4plus.pth / x2plus.pth are: {"params_ema": state_dict}."""
    return _save(make_rrdbnet(scale, seed, **kw), path, "params_ema")


def save_srvgg(path: str | Path, scale: int = 4, seed: int = 0, **kw) -> Path:
    """Save make_srvgg() as realesr-animevideov3.pth is: {"params": state_dict}."""
    return _save(make_srvgg(scale, seed, **kw), path, "params")


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


def _run_ffmpeg(args: list[str], frames: Iterable[np.ndarray] = ()) -> None:
    """Run the bundled ffmpeg, streaming frames (rgb24) to its stdin; raise on failure."""
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args]
    # stderr goes to a file, not a pipe, so a chatty ffmpeg cannot deadlock our writes
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for frame in frames:
                proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:  # ffmpeg quit early; its exit code and stderr say why
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait()
        if rc:
            err.seek(0)
            raise RuntimeError(f"ffmpeg exited {rc}: {cmd}\n{err.read().decode(errors='replace')}")


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
        setpts = f"if(lt(N,{b}),({off.numerator}/{off.denominator}+(N-{a})*{fps.denominator}/{fps.numerator}),{setpts})"
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size[0]}x{size[1]}", "-framerate", "30", "-i", "-"]
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


def make_interlaced(path: str | Path, frames: int = 24, size: tuple[int, int] = (64, 48), fps: str = "25") -> Path:
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
    raw = subprocess.run(cmd + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
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


# --- Tiny Stable Diffusion 1.5 + ControlNet (job=sim2real) ---
# SD 1.5's layout at toy sizes: four UNet levels (CrossAttn x3 + plain down, plain + CrossAttn x3
# up, so the last two decoder levels where FRESCO works have self-attention), an 8x VAE, a CLIP
# text encoder and tokenizer, DDPM with SD 1.5's schedule. Saved with save_pretrained and loaded
# by the job through the same code as the real weights. diffusers/transformers import lazily.


def _clip_byte_chars() -> list[str]:
    """CLIP's byte -> printable unicode table (GPT-2's bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def save_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """A CLIP tokenizer from a vocab.json and merges.txt written here: every byte, every byte at a
    word end, a few merges, the two special tokens (518 entries)."""
    import json

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _clip_byte_chars()
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = ["c a", "ca r</w>", "r e", "re d</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    return folder


def tiny_sd15_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)


def save_tiny_sd15(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers Stable Diffusion 1.5 folder with tiny random components (about 1 MB)."""
    import json

    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tok = save_tiny_clip_tokenizer(folder / "tokenizer")
    n_vocab = len(json.loads((tok / "vocab.json").read_text(encoding="utf-8")))
    tiny_sd15_unet(seed).save_pretrained(folder / "unet")
    torch.manual_seed(seed + 1)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=64).save_pretrained(folder / "vae")
    torch.manual_seed(seed + 2)
    text = CLIPTextConfig(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=n_vocab - 2,
                          eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, clip_sample=False).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}, indent=2), encoding="utf-8")
    return folder


def save_tiny_controlnet(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers ControlNet folder made with ControlNetModel.from_unet of the tiny UNet; its
    condition embedding downsamples 8x like SD 1.5's."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 3)
    cn = ControlNetModel.from_unet(tiny_sd15_unet(seed), conditioning_embedding_out_channels=(4, 8, 8, 16))
    cn.save_pretrained(folder)
    return Path(folder)


# --- Original (LDM / CompVis) single-file checkpoints ---
# Written from the diffusers folders above by renaming keys the way the original training code names
# them (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*, control_model.*),
# so that diffusers' from_single_file has a real original-format file to convert back.

_LDM_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_LDM_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_parts(name: str, table) -> str:
    import re

    for new, old in table:
        name = re.sub(rf"(^|\.){re.escape(new)}\.", rf"\g<1>{old}.", name)
    return name


def unet_to_ldm(state: dict, config: dict, controlnet: bool = False) -> dict:
    """A diffusers UNet2DConditionModel (or ControlNetModel) state dict in LDM's names: input_blocks,
    middle_block, output_blocks; for a ControlNet also zero_convs, middle_block_out, input_hint_block."""
    import re

    per = config["layers_per_block"] + 1  # LDM entries per level: the resnets, then the resampler
    up_attn = [t.startswith("CrossAttn") for t in config.get("up_block_types", ())]
    out = {}
    for key, value in state.items():
        block = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\."
                         r"(.*)", key)
        mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        top = next((t for t in _LDM_UNET_TOP if key.startswith(t + ".")), None)
        if top:
            new = _LDM_UNET_TOP[top] + key[len(top):]
        elif block:
            side, b, part, j, rest = block[1], int(block[2]), block[3], int(block[4]), block[5]
            if side == "down" and part == "downsamplers":
                new = f"input_blocks.{1 + b * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
            elif side == "down":
                new = f"input_blocks.{1 + b * per + j}.{0 if part == 'resnets' else 1}.{rest}"
            elif part == "upsamplers":  # after the level's attention, if it has one
                new = f"output_blocks.{b * per + per - 1}.{2 if up_attn[b] else 1}.{rest}"
            else:
                new = f"output_blocks.{b * per + j}.{0 if part == 'resnets' else 1}.{rest}"
            new = _rename_parts(new, _LDM_RESNET) if part == "resnets" else new
        elif mid:
            new = f"middle_block.{2 * int(mid[2]) if mid[1] == 'resnets' else 1}.{mid[3]}"
            new = _rename_parts(new, _LDM_RESNET) if mid[1] == "resnets" else new
        elif controlnet and key.startswith("controlnet_down_blocks."):
            new = re.sub(r"^controlnet_down_blocks\.(\d+)\.", r"zero_convs.\1.0.", key)
        elif controlnet and key.startswith("controlnet_mid_block."):
            new = key.replace("controlnet_mid_block.", "middle_block_out.0.")
        elif controlnet and key.startswith("controlnet_cond_embedding."):
            rest = key.removeprefix("controlnet_cond_embedding.")
            hint = re.match(r"blocks\.(\d+)\.(.*)", rest)
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest.removeprefix("conv_in.")
            elif rest.startswith("conv_out."):
                new = "input_hint_block.14." + rest.removeprefix("conv_out.")
            else:
                new = f"input_hint_block.{2 * (int(hint[1]) + 1)}.{hint[2]}"
        else:
            raise KeyError(f"no LDM name for {key}")
        out[new] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in LDM's names (decoder levels counted from the bottom,
    mid-block attention as 1x1 convolutions)."""
    import re

    n = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", lambda m: (
            f"decoder.up.{n - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}."), new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = _rename_parts(new.replace("mid_block.attentions.0.", "mid.attn_1."), (
                ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                ("to_out.0", "proj_out")))
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[new] = value
    return out


def _folder_weights(folder: Path) -> tuple[dict, dict]:
    import json

    from safetensors.torch import load_file

    return (load_file(str(next(folder.glob("*.safetensors")))),
            json.loads((folder / "config.json").read_text(encoding="utf-8")))


def save_sd15_single_file(sd_folder: str | Path, path: str | Path) -> Path:
    """One original-format SD 1.5 checkpoint (like v1-5-pruned-emaonly.safetensors) from a diffusers
    folder."""
    from safetensors.torch import save_file

    sd_folder = Path(sd_folder)
    unet, unet_cfg = _folder_weights(sd_folder / "unet")
    vae, vae_cfg = _folder_weights(sd_folder / "vae")
    text, _ = _folder_weights(sd_folder / "text_encoder")
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet, unet_cfg).items()}
    state.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae, vae_cfg).items()})
    clip = "cond_stage_model.transformer."  # + the HF names; transformers >= 5.6 drops "text_model."
    state.update({clip + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def save_controlnet_single_file(cn_folder: str | Path, path: str | Path,
                                prefix: str = "control_model.") -> Path:
    """An original-format ControlNet checkpoint (control_sd15_canny style keys; ``prefix=""`` for the
    files that hold the control model alone)."""
    from safetensors.torch import save_file

    state, cfg = _folder_weights(Path(cn_folder))
    ldm = unet_to_ldm(state, cfg, controlnet=True)
    save_file({prefix + k: v.contiguous() for k, v in ldm.items()}, str(path))
    return Path(path)


def copy_configs_only(folder: str | Path, dest: str | Path) -> Path:
    """A copy of a diffusers folder without its weights: what job.base_model_config and
    job.controlnet_config need."""
    import shutil

    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return Path(dest)


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
