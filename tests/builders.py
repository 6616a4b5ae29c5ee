"""Shared builders for test inputs: tiny Real-ESRGAN models and synthetic clips.

Everything here is generated locally and deterministically: models come from
seeded random weights, clips are encoded by the ffmpeg binary bundled with
imageio-ffmpeg (never a system ffmpeg, so every machine encodes the same way).
PyAV is used as the independent reference decoder, so tests of the decord-based
production reader are not checked against decord itself.
"""

from __future__ import annotations

import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterator

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
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


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

    The trunk always upsamples x4; scale 2 and 1 are obtained by pixel-unshuffling
    the input first (by 2 and 4), exactly as upstream, so conv_first sees 12 / 48
    input channels - that channel count is how spandrel infers the scale.
    num_grow_ch stays 32 (upstream's value): spandrel 0.4.2 hard-codes gc=32 and
    fails to load any other value; shrink num_feat/num_block instead.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4,
                 num_feat: int = 8, num_block: int = 1, num_grow_ch: int = 32):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, not {scale}")
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
    """Real-ESRGAN SRVGGNetCompact (realesr-animevideov3 / realesr-general-x4v3)."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 8,
                 num_conv: int = 2, upscale: int = 4, act_type: str = "prelu"):
        super().__init__()
        self.upscale = upscale

        acts = {"relu": lambda: nn.ReLU(inplace=True), "prelu": lambda: nn.PReLU(num_parameters=num_feat),
                "leakyrelu": lambda: nn.LeakyReLU(negative_slope=0.1, inplace=True)}
        act = acts[act_type]
        # body indices matter: spandrel detects this arch by body.0/body.1 weights
        # (so only 'prelu' models are recognisable) and reads upscale from the last conv.
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), act()]
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
def _calibrate(model: nn.Module, last: nn.Conv2d, mean: float, std: float) -> None:
    """Rescale `last` so outputs on a fixed random batch have the given mean/std.

    Default PyTorch init shrinks activations layer by layer, so raw random nets
    output near-constant images; calibrating the final conv makes outputs depend
    visibly on the input while staying roughly inside [-0.5, 1.5].
    """
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1234))  # (B, 3, H, W)
    compact = isinstance(model, SRVGGNetCompact)

    def out() -> torch.Tensor:  # for Compact, only the residual on top of nearest-upsampling
        y = model(x)
        return y - F.interpolate(x, scale_factor=model.upscale, mode="nearest") if compact else y

    y = out()
    # std around per-channel means: the bias only shifts channels, it can't add detail
    last.weight.mul_(std / (y - y.mean(dim=(0, 2, 3), keepdim=True)).std().clamp_min(1e-8))
    shift = out().mean(dim=(0, 2, 3)) - mean
    # PixelShuffle maps conv channels c*s*s .. c*s*s+s*s-1 to output channel c
    last.bias.sub_(shift.repeat_interleave(model.upscale ** 2) if compact else shift)


def _build(cls, seed: int, **kw) -> nn.Module:
    # fork_rng keeps the caller's global torch RNG untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kw).eval()


def _save(model: nn.Module, path: str | Path, wrapper_key: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))  # safetensors releases are bare state dicts
    else:
        torch.save({wrapper_key: state}, path)
    return path


def make_rrdbnet(scale: int = 4, seed: int = 0, **kw) -> RRDBNet:
    """Deterministic tiny RRDBNet; outputs have mean ~0.5, std ~0.15 on [0,1] input."""
    model = _build(RRDBNet, seed, scale=scale, **kw)
    _calibrate(model, model.conv_last, mean=0.5, std=0.15)
    return model


def make_srvgg(scale: int = 4, seed: int = 0, **kw) -> SRVGGNetCompact:
    """Deterministic tiny SRVGGNetCompact: nearest-upsampled input + a small (std 0.05) residual.

    Because the residual is small the output still resembles the input, so e.g. the
    frame-index code survives inference through this model.
    """
    model = _build(SRVGGNetCompact, seed, upscale=scale, **kw)
    _calibrate(model, model.body[-1], mean=0.0, std=0.05)
    return model


def save_rrdbnet(path: str | Path, scale: int = 4, seed: int = 0, **kw) -> Path:
    """Save a tiny RRDBNet as RealESRGAN_x{scale}plus.pth does: {"params_ema": state_dict}."""
    return _save(make_rrdbnet(scale, seed, **kw), path, "params_ema")


def save_srvgg(path: str | Path, scale: int = 4, seed: int = 0, **kw) -> Path:
    """Save a tiny SRVGGNetCompact as realesr-animevideov3.pth does: {"params": state_dict}."""
    return _save(make_srvgg(scale, seed, **kw), path, "params")


# --- Frame-index code ---
# 12 bits as 2 rows x 6 columns of black/white blocks filling the top third of the
# frame. A 12-bit single row would be 5 px wide at 64 px; this grid gives W/6 x H/6
# blocks (10.7x8 px at 64x48), which survive 4:2:0 chroma, H.264 and any upscaling.
INDEX_BITS, _COLS = 12, 6


def _cell(k: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of bit k's block, in pixels of an h x w frame."""
    r, c = divmod(k, _COLS)
    return round(r * h / 6), round((r + 1) * h / 6), round(c * w / _COLS), round((c + 1) * w / _COLS)


def encode_index(frame: np.ndarray, idx: int) -> np.ndarray:
    """Paint `idx` (MSB first, white = 1) into the top band of `frame` in place; returns it.

    frame: (H, W, 3) uint8
    """
    if not 0 <= idx < 2 ** INDEX_BITS:
        raise ValueError(f"index {idx} does not fit in {INDEX_BITS} bits")
    h, w = frame.shape[:2]
    for k in range(INDEX_BITS):
        y0, y1, x0, x1 = _cell(k, h, w)
        frame[y0:y1, x0:x1] = 255 if (idx >> (INDEX_BITS - 1 - k)) & 1 else 0
    return frame


def decode_indices(frames) -> list[int]:
    """Read the index code back from frames of any size (same aspect ratio as encoded).

    frames: (N, H, W, 3) uint8 array or iterable of (H, W, 3). Each bit is the mean of
    the central half (per axis) of its block, thresholded at 128: ringing and
    deblocking live at block edges, so the centre stays clean.
    """
    out = []
    for f in frames:
        h, w = f.shape[:2]
        idx = 0
        for k in range(INDEX_BITS):
            y0, y1, x0, x1 = _cell(k, h, w)
            qy, qx = (y1 - y0) // 4, (x1 - x0) // 4
            idx = (idx << 1) | int(f[y0 + qy:y1 - qy, x0 + qx:x1 - qx].mean() >= 128)
        out.append(idx)
    return out


def iter_frames(n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> Iterator[np.ndarray]:
    """Yield n synthetic frames (H, W, 3) uint8 with the index code and moving texture.

    size is (width, height). Below the code band a seeded texture (a few random
    sinusoids + mild noise, periodic so it can be rolled) drifts 2 px right and
    1 px down per frame, giving the encoder real motion to predict.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tex = np.full((h, w, 3), 128.0, np.float32)  # (H, W, 3) float
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.integers(1, 4, size=2)  # integer cycles -> seamless roll
            tex[..., c] += rng.uniform(15, 30) * np.sin(
                2 * np.pi * (fx * xx / w + fy * yy / h) + rng.uniform(0, 2 * np.pi))
    tex += rng.normal(0, 6, tex.shape)
    tex = np.clip(tex, 0, 255).astype(np.uint8)
    for i in range(n):
        frame = np.roll(tex, (i, 2 * i), axis=(0, 1))
        yield encode_index(frame, i)


def synth_frames(n: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """The exact frames make_clip encodes: (N, H, W, 3) uint8."""
    return np.stack(list(iter_frames(n, size, seed)))


# --- Clips ---
# per container: (video codec, audio codec, subtitle codec or None)
_CONTAINERS = {
    ".mp4": ("libx264", "aac", "mov_text"),
    ".mov": ("libx264", "aac", "mov_text"),
    ".mkv": ("libx264", "aac", "subrip"),
    ".webm": ("libvpx-vp9", "libopus", "webvtt"),
    # Xvid-style AVI: mpeg4 without B-frames (AVI has no B-frame timestamps); PCM audio
    # because AVI cannot signal encoder delay, so MP3 would decode ~1.3 frames too long
    ".avi": ("mpeg4", "pcm_s16le", None),
}
SUBTITLE_TEXTS = ("First test cue", "Second test cue")


def _run_ffmpeg(args: list[str], stdin_frames: Iterator[np.ndarray] | None = None) -> None:
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args]
    if stdin_frames is None:
        res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        err, rc = res.stderr, res.returncode
    else:
        # stderr to a file, not a pipe: a chatty ffmpeg can't deadlock our writes
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf)
            try:
                for frame in stdin_frames:
                    proc.stdin.write(np.ascontiguousarray(frame).tobytes())
            finally:
                proc.stdin.close()
                rc = proc.wait()
            errf.seek(0)
            err = errf.read().decode(errors="replace")
    if rc != 0:
        raise RuntimeError(f"ffmpeg failed ({rc}): {' '.join(cmd)}\n{err}")


def make_clip(path: str | Path, frames: int = 48, size: tuple[int, int] = (64, 48),
              fps: str | int | Fraction = "30000/1001", audio: bool = True,
              subtitles: bool = False, codec: str | None = None,
              audio_codec: str | None = None, *, crf: int = 20, gop: int = 12,
              seed: int = 0, faststart: bool = False) -> Path:
    """Encode synth_frames(frames, size, seed) into a real file; container from the suffix.

    codec/audio_codec None pick the container's default (_CONTAINERS). size is
    (width, height) and must be even for yuv420p. gop=12 gives several keyframes
    and libx264's default B-frames stay on, so seeking is non-trivial. The audio is a
    440 Hz sine trimmed to exactly round(frames / fps * 48000) samples. Subtitles
    carry SUBTITLE_TEXTS as two cues inside the clip's duration.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _CONTAINERS:
        raise ValueError(f"unsupported container {ext!r}")
    w, h = size
    if w % 2 or h % 2:
        raise ValueError("yuv420p needs even width and height")
    fps = Fraction(str(fps))
    vcodec, acodec, scodec = _CONTAINERS[ext]
    vcodec, acodec = codec or vcodec, audio_codec or acodec
    duration = frames / fps
    path.parent.mkdir(parents=True, exist_ok=True)

    inputs = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(fps), "-i", "-"]
    maps, opts = ["-map", "0:v"], ["-c:v", vcodec, "-pix_fmt", "yuv420p", "-g", str(gop)]
    if vcodec in ("libx264", "libx265"):
        opts += ["-crf", str(crf), "-preset", "veryfast"]
    elif vcodec == "libvpx-vp9":
        opts += ["-crf", "30", "-b:v", "0", "-deadline", "realtime", "-cpu-used", "8"]
    elif vcodec == "mpeg4":
        opts += ["-q:v", "3"]
    if audio:
        n_samples = round(duration * 48000)
        inputs += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
        maps += ["-map", "1:a"]
        opts += ["-c:a", acodec, "-af", f"atrim=end_sample={n_samples}"]
    tmpdir = tempfile.TemporaryDirectory()
    if subtitles:
        if scodec is None:
            raise ValueError(f"{ext} cannot carry text subtitles")
        srt = Path(tmpdir.name) / "cues.srt"
        srt.write_text(_srt([(0.0, 0.4 * float(duration)), (0.5 * float(duration), 0.9 * float(duration))]))
        inputs += ["-i", str(srt)]
        maps += ["-map", f"{1 + audio}:s"]
        opts += ["-c:s", scodec]
    if faststart and ext in (".mp4", ".mov"):
        opts += ["-movflags", "+faststart"]
    with tmpdir:
        _run_ffmpeg([*inputs, *maps, *opts, str(path)], iter_frames(frames, size, seed))
    return path


def _srt(spans: list[tuple[float, float]]) -> str:
    def ts(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
    return "".join(f"{i + 1}\n{ts(a)} --> {ts(b)}\n{text}\n\n"
                   for i, ((a, b), text) in enumerate(zip(spans, SUBTITLE_TEXTS)))


def read_frames(path: str | Path) -> np.ndarray:
    """Reference sequential decode of the first video stream with PyAV: (N, H, W, 3) uint8."""
    with av.open(str(path)) as container:
        if not container.streams.video:  # PyAV itself would raise a bare IndexError
            raise ValueError(f"{path}: no video stream")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames) if frames else np.empty((0, 0, 0, 3), np.uint8)


def probe_streams(path: str | Path) -> dict:
    """Decode everything with PyAV and report what a test needs to compare against.

    Keys: frames (decoded count), fps (Fraction or None), width, height,
    audio_duration (seconds of decoded samples, None without audio; AAC decodes up to
    one 1024-sample frame long because the end padding is not trimmed),
    audio_declared_duration (the container's stream duration where it has one),
    subtitle_streams (count), video_codec, audio_codec.
    """
    info = {"frames": 0, "fps": None, "width": None, "height": None, "audio_duration": None,
            "audio_declared_duration": None, "subtitle_streams": 0, "video_codec": None,
            "audio_codec": None}
    # one pass per stream type: decode(stream) only demuxes what it needs
    with av.open(str(path)) as container:
        info["subtitle_streams"] = len(container.streams.subtitles)
        has_audio = bool(container.streams.audio)
        if container.streams.video:
            v = container.streams.video[0]
            info.update(fps=v.average_rate or v.guessed_rate, width=v.width,
                        height=v.height, video_codec=v.codec_context.name)
            info["frames"] = sum(1 for _ in container.decode(v))
    if has_audio:
        with av.open(str(path)) as container:
            a = container.streams.audio[0]
            info["audio_codec"] = a.codec_context.name
            samples = sum(f.samples for f in container.decode(a))
            info["audio_duration"] = samples / a.codec_context.sample_rate
            if a.duration is not None:  # MP4 edit lists declare the exact, untrimmed length
                info["audio_declared_duration"] = float(a.duration * a.time_base)
    return info


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
    path = Path(path)
    _run_ffmpeg(["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
                 "-c:a", "aac", str(path)])
    return path


def make_truncated(src: str | Path, dst: str | Path, keep: float = 0.4) -> Path:
    """Copy the first `keep` fraction of src's bytes.

    MP4/MOV are first remuxed with +faststart so the moov (index) sits before the
    media data: the truncated file still opens and advertises every frame, but the
    sample data runs out part way. MKV/WebM/AVI keep their headers up front anyway.
    """
    src, dst = Path(src), Path(dst)
    if src.suffix.lower() in (".mp4", ".mov"):
        _run_ffmpeg(["-i", str(src), "-map", "0", "-c", "copy", "-movflags", "+faststart", str(dst)])
        data = dst.read_bytes()
    else:
        data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _mdat_payload(data: bytes) -> tuple[int, int] | None:
    """(start, end) of the first top-level ISO-BMFF mdat box payload, or None."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        header = 8
        if size == 1:
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:
            size = len(data) - pos
        if size < header:
            return None
        if kind == b"mdat":
            return pos + header, min(pos + size, len(data))
        pos += size
    return None


def make_corrupt(src: str | Path, dst: str | Path, span: tuple[float, float] = (0.4, 0.6),
                 seed: int = 0) -> Path:
    """Copy src with the `span` fraction of its media payload overwritten by seeded random bytes.

    For MP4/MOV the span is relative to the mdat payload, so the container index stays
    intact and only frame data is garbage; for other containers it is relative to the
    whole file.
    """
    data = bytearray(Path(src).read_bytes())
    start, end = _mdat_payload(data) or (0, len(data))
    a, b = start + int((end - start) * span[0]), start + int((end - start) * span[1])
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(bytes(data))
    return Path(dst)
