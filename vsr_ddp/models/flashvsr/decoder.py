"""FlashVSR's two small networks around the DiT: the low-quality projector (``LQ_proj_in``), which turns
the bicubic-upscaled input frames into tokens added to the DiT's first block, and the tiny conditional
decoder (``TCDecoder``), which turns the DiT's latents back into frames with the same input frames as
a condition (it replaces the Wan VAE's decoder in the "tiny" pipeline).

Written from the original (OpenImagingLab/FlashVSR, Apache-2.0: examples/WanVSR/utils/utils.py,
examples/WanVSR/utils/TCDecoder.py, diffsynth/pipelines/flashvsr_tiny.py) with the module and
parameter names of the published files, so that they load strictly:

* ``LQ_proj_in.ckpt``: ``torch.save`` of a raw state dict (no wrapper key, no ``module.`` prefix;
  reported to be bf16 in v1.1); 8 tensors, 287,845,888 parameters for the 1.3B release::

      conv1.weight (2048, 768, 4, 3, 3)  conv1.bias (2048,)  norm1.gamma (2048, 1, 1, 1)
      conv2.weight (3072, 2048, 4, 3, 3) conv2.bias (3072,)  norm2.gamma (3072, 1, 1, 1)
      linear_layers.0.weight (1536, 3072) linear_layers.0.bias (1536,)

  (the original builds it with in_dim=3, out_dim=1536, layer_num=1 and loads it with strict=True).
* ``TCDecoder.ckpt``: ``torch.save`` of a raw state dict, fp32; 66 tensors, 45,338,371 parameters:
  ``decoder.N.*`` for the 27-layer stack below (channels 512/256/128/128, 16 + 768 input channels).
  The original loads it with strict=False; the published file has exactly these keys (a
  third-party port, xocialize/mlx-flashvsr-swift, loads all 66 tensors of v1.1's file into them).

Both files are the same layout in FlashVSR v1 and v1.1. What differs is the projector's temporal
cache: v1.1 (``Causal_LQ4x_Proj``) carries the last frames of one chunk into the next (a causal
convolution over the whole clip); v1 (``Buffer_LQ4x_Proj``) pads each 4-frame group with its own
last frames, so that groups are independent. ``LQProjector(causal=...)`` does either.

Frame bookkeeping of the tiny pipeline (F = 8n + 1 input frames, bicubic-upscaled x4 to H x W,
multiples of 128): the projector gives 2n token frames of (H/16)(W/16) tokens; the DiT makes 2n
latent frames of (H/8, W/8); the decoder, conditioned on the first 8n - 3 input frames, gives
8n - 3 frames of H x W (4 per latent frame, less the first 3). Both networks stream: the projector
is fed 1 frame, then 4 at a time; the decoder keeps per-layer memory across calls.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..sr import ModelError, read_weights, shapes_of, state_mismatch

# the projector: space-to-channel unshuffle of each frame, then two causal 3-D convolutions
LQ_UNSHUFFLE = 16                 # (3, H, W) -> (3 * 16 * 16, H/16, W/16): the DiT's token grid
LQ_HIDDEN = (2048, 3072)
LQ_KERNEL = (4, 3, 3)             # time, height, width
LQ_STRIDE_T = 2                   # each convolution halves the frame rate: 4 input frames -> 1 token frame
LQ_GROUP = 4                      # input frames per token frame
LQ_LEAD = 3                       # first-frame copies put before a clip: 4k + 1 frames -> k + 1 groups

# the decoder: the condition is unshuffled 4 x 8 x 8 (time, height, width) onto the latent grid
COND_SHUFFLE = (4, 8, 8)
COND_CHANNELS = 3 * 4 * 8 * 8     # 768
DECODER_CHANNELS = (512, 256, 128, 128)
LATENT_CHANNELS = 16
FRAMES_TO_TRIM = 3                # the decoder's first call drops the first 3 of its 4T frames
DECODER_TIME_UP = (1, 2, 2)       # TimeGrow strides of the three stages: 4 frames per latent frame


def space_time_to_channels(x: torch.Tensor, ff: int, hh: int, ww: int) -> torch.Tensor:
    """The original's PixelShuffle3d (an unshuffle): (B, C, T*ff, H*hh, W*ww) -> (B, C*ff*hh*ww, T, H, W),
    the output channel index being ((c * ff + i) * hh + j) * ww + k for the input pixel
    (c, t*ff + i, y*hh + j, x*ww + k). The decoder unshuffles its LQ condition with (4, 8, 8) and the
    projector each frame with (1, 16, 16)."""
    b, c, t, h, w = x.shape
    if t % ff or h % hh or w % ww:
        raise ValueError(f"space_time_to_channels: {tuple(x.shape)} is not divisible by ({ff}, {hh}, {ww})")
    x = x.reshape(b, c, t // ff, ff, h // hh, hh, w // ww, ww)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, C, ff, hh, ww, T, H, W)
    return x.reshape(b, c * ff * hh * ww, t // ff, h // hh, w // ww)


# ----------------------------------------------------------------------------------------------
# The low-quality projector
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Wan's RMS norm over the channel axis: x / |x|_2 * sqrt(C) * gamma, gamma of shape (C, 1, 1, 1)
    as in the published file."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        return F.normalize(x, dim=1) * self.scale * self.gamma


class CausalConv3d(nn.Conv3d):
    """A (4, 3, 3) convolution with stride (2, 1, 1) that sees only the present and the past: the
    spatial borders are replicated here; in time it is a valid convolution over what the caller
    gives it, and :meth:`LQProjector.feed` gives it the frames that precede a chunk (``front`` = 2 of
    them, kernel minus stride), or, at the start of a clip, ``front`` copies of the first frame (the
    original's replicate padding). The parameters are ``weight`` and ``bias`` as in nn.Conv3d."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, LQ_KERNEL, stride=(LQ_STRIDE_T, 1, 1), padding=0)
        self.front = LQ_KERNEL[0] - LQ_STRIDE_T

    @staticmethod
    def outputs(frames: int) -> int:
        """How many output frames ``frames`` input frames give (the windows that fit)."""
        return (frames - LQ_KERNEL[0]) // LQ_STRIDE_T + 1 if frames >= LQ_KERNEL[0] else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C', outputs(T), H, W)
        ph, pw = LQ_KERNEL[1] // 2, LQ_KERNEL[2] // 2
        return super().forward(F.pad(x, (pw, pw, ph, ph, 0, 0), mode="replicate"))


class LQProjector(nn.Module):
    """FlashVSR's ``LQ_proj_in``: input frames (B, in_dim, F, H, W) in [-1, 1], H and W multiples of
    16, to ``layer_num`` token tensors (B, f * H/16 * W/16, out_dim), one per DiT block they are added
    to (the published file has one: the first block). Each token frame stands for 4 input frames.

    It streams: :meth:`reset`, then :meth:`feed` the frames of a clip in order, in chunks of any
    size (frames that do not complete a token frame wait for the next call); the tokens equal one
    call over the whole clip, with either cache. A clip of 4k + 1 frames gives k token
    frames: the first frame is repeated 3 times in front (the original's convention), which makes
    k + 1 groups of 4, and the first group only primes the convolutions.

    ``causal`` (FlashVSR v1.1, ``Causal_LQ4x_Proj``): both convolutions run over the whole clip,
    causally: the first one replicate-pads the clip's first frame twice in front, the second one
    starts at the first group's output. ``causal=False`` (FlashVSR v1, ``Buffer_LQ4x_Proj``): each
    group of 4 frames is computed alone, each convolution padded in front with the last 2 frames of
    its own input (the original passes them as its "cache")."""

    def __init__(self, in_dim: int = 3, out_dim: int = 1536, layer_num: int = 1,
                 hidden: tuple[int, int] = LQ_HIDDEN, causal: bool = True):
        super().__init__()
        self.in_dim = in_dim
        self.causal = causal
        self.conv1 = CausalConv3d(in_dim * LQ_UNSHUFFLE * LQ_UNSHUFFLE, hidden[0])
        self.norm1 = RMSNorm(hidden[0])
        self.conv2 = CausalConv3d(hidden[0], hidden[1])
        self.norm2 = RMSNorm(hidden[1])
        self.linear_layers = nn.ModuleList(nn.Linear(hidden[1], out_dim) for _ in range(layer_num))
        self.reset()

    def reset(self) -> None:
        """Forget the clip: the next frame fed is a clip's first."""
        self._started = False
        self._pending_in = None   # (B, C0, t, h, w) unshuffled input frames not yet fully consumed
        self._pending_mid = None  # (B, C1, t, h, w) conv1 outputs not yet fully consumed (causal)
        self._primed = False      # the first group (3 copies + frame 0) is done (causal=False)

    def forward(self, video: torch.Tensor) -> list[torch.Tensor] | None:
        """A whole clip (B, in_dim, 4k + 1, H, W): :meth:`reset`, then :meth:`feed` it all."""
        self.reset()
        return self.feed(video)

    def feed(self, frames: torch.Tensor) -> list[torch.Tensor] | None:
        """The next frames of the clip, (B, in_dim, F, H, W). Returns the tokens of every token frame
        these frames complete, ``layer_num`` tensors (B, n * H/16 * W/16, out_dim), or None when they
        complete none (the first call of a clip, as in the original)."""
        if frames.ndim != 5 or frames.shape[1] != self.in_dim:
            raise ValueError(f"LQProjector.feed takes (B, {self.in_dim}, F, H, W) frames, not "
                             f"{tuple(frames.shape)}")
        if frames.shape[-1] % LQ_UNSHUFFLE or frames.shape[-2] % LQ_UNSHUFFLE:
            raise ValueError(f"LQProjector.feed: H and W must be multiples of {LQ_UNSHUFFLE}, not "
                             f"{frames.shape[-2]}x{frames.shape[-1]}")
        if frames.shape[2] == 0:
            return None
        x = space_time_to_channels(frames, 1, LQ_UNSHUFFLE, LQ_UNSHUFFLE)  # (B, C0, F, h, w)
        if not self._started:
            x = torch.cat([x[:, :, :1].expand(-1, -1, LQ_LEAD, -1, -1), x], dim=2)
            self._started = True
        y = self._feed_causal(x) if self.causal else self._feed_groups(x)
        if y is None:
            return None
        b, c = y.shape[:2]
        tokens = y.permute(0, 2, 3, 4, 1).reshape(b, -1, c)  # (B, f * h * w, C2): frame, row, column
        return [linear(tokens) for linear in self.linear_layers]

    @staticmethod
    def _take(pending: torch.Tensor | None, x: torch.Tensor, front: int | None):
        """Append ``x`` to what a convolution has pending (at a clip's start, ``front`` copies of the
        first frame instead); returns the frames its next windows cover, how many windows, and
        what stays pending (the frames from the first window not taken yet)."""
        if pending is None:
            buf = x if front is None else torch.cat([x[:, :, :1].expand(-1, -1, front, -1, -1), x], dim=2)
        else:
            buf = torch.cat([pending, x], dim=2)
        n = CausalConv3d.outputs(buf.shape[2])
        used = buf[:, :, :LQ_STRIDE_T * (n - 1) + LQ_KERNEL[0]] if n else None
        return used, n, buf[:, :, LQ_STRIDE_T * n:].clone()  # a copy: the chunk's buffer can go

    def _feed_causal(self, x: torch.Tensor) -> torch.Tensor | None:  # (B, C0, t, h, w)
        used, n, self._pending_in = self._take(self._pending_in, x,
                                               self.conv1.front if self._pending_in is None else None)
        if not n:
            return None
        y = F.silu(self.norm1(self.conv1(used)))  # (B, C1, n, h, w)
        # conv2 has no padding: its first window starts at the first group's conv1 outputs
        used, n, self._pending_mid = self._take(self._pending_mid, y, None)
        if not n:
            return None
        return F.silu(self.norm2(self.conv2(used)))  # (B, C2, n, h, w)

    def _feed_groups(self, x: torch.Tensor) -> torch.Tensor | None:  # (B, C0, t, h, w)
        buf = x if self._pending_in is None else torch.cat([self._pending_in, x], dim=2)
        groups = buf.shape[2] // LQ_GROUP
        self._pending_in = buf[:, :, groups * LQ_GROUP:].clone()
        outs = []
        for g in range(groups):
            if not self._primed:  # the first group only primes the original's cache: no token
                self._primed = True
                continue
            grp = buf[:, :, g * LQ_GROUP:(g + 1) * LQ_GROUP]
            y = F.silu(self.norm1(self.conv1(torch.cat([grp[:, :, -self.conv1.front:], grp], dim=2))))
            outs.append(F.silu(self.norm2(self.conv2(torch.cat([y[:, :, -self.conv2.front:], y], dim=2)))))
        return torch.cat(outs, dim=2) if outs else None


# ----------------------------------------------------------------------------------------------
# The tiny conditional decoder
# ----------------------------------------------------------------------------------------------

class SoftClamp(nn.Module):
    """3 * tanh(x / 3): keeps the decoder's input within (-3, 3) (TAEHV's Clamp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


def _identity_conv(c: int) -> nn.Conv2d:
    """A bias-free 3x3 convolution that starts as the identity (the "deepening" layers FlashVSR adds
    after the decoder's outer ReLUs; their trained weights come from the file)."""
    conv = _conv3x3(c, c, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight)
    return conv


class MemBlock(nn.Module):
    """relu(conv(cat(x_t, past)) + x_t): a residual block that also sees ``past``, its own input at
    the previous frame (zeros at a clip's first frame). ``conv`` is conv-relu-conv-relu-conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * channels, channels), nn.ReLU(inplace=True),
                                  _conv3x3(channels, channels), nn.ReLU(inplace=True),
                                  _conv3x3(channels, channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) both
        return self.act(self.conv(torch.cat([x, past], dim=1)) + x)


class TimeGrow(nn.Module):
    """One frame -> ``stride`` frames: a 1x1 convolution to stride * C channels, whose channel blocks
    are the new frames in order."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B*T, C, H, W) -> (B*T*stride, C, H, W)
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TCDecoder(nn.Module):
    """FlashVSR's tiny conditional decoder (a widened, deepened TAEHV decoder): latents
    (B, latent_channels, T, h, w) and the LQ condition (B, 3, 4T, 8h, 8w) in [-1, 1] to frames
    (B, 3, 4T, 8h, 8w) in about [-1, 1] (the pipeline's ``x * 2 - 1`` of TAEHV's [0, 1] output), less
    the first 3 frames on a stream's first call.

    ``decoder`` is the original's stack, index for index (the published keys are ``decoder.N.*``)::

        0 SoftClamp  1 conv(in, c0)  2 ReLU  3 identity conv(c0)  4 ReLU
        5-7 MemBlock(c0)   8 Upsample x2  9 TimeGrow(c0, 1)   10 conv(c0, c1, no bias)
        11-13 MemBlock(c1) 14 Upsample x2 15 TimeGrow(c1, 2)  16 conv(c1, c2, no bias)
        17-19 MemBlock(c2) 20 Upsample x2 21 TimeGrow(c2, 2)  22 conv(c2, c3, no bias)
        23 ReLU  24 identity conv(c3)  25 ReLU  26 conv(c3, 3)

    with in = latent_channels + 768, the condition unshuffled 4 x 8 x 8 onto the latent grid and put
    in front of the latent channels.

    It streams: :meth:`reset`, then :meth:`decode` the latents of a video in order, in chunks of any
    number of frames, each with its condition frames; the frames equal one call over the whole
    video. The original decodes frame by frame (each MemBlock remembering its previous input); this
    runs each layer over a pass of frames at once with the same memory, ``frames_per_pass`` latent
    frames at a time (4 output frames each at full size: the memory bound)."""

    def __init__(self, channels: tuple[int, int, int, int] = DECODER_CHANNELS,
                 latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.latent_channels = latent_channels
        self.in_channels = latent_channels + COND_CHANNELS
        self.frames_to_trim = FRAMES_TO_TRIM
        g0, g1, g2 = DECODER_TIME_UP
        self.decoder = nn.Sequential(
            SoftClamp(), _conv3x3(self.in_channels, c0), nn.ReLU(inplace=True), _identity_conv(c0),
            nn.ReLU(inplace=True),
            MemBlock(c0), MemBlock(c0), MemBlock(c0), nn.Upsample(scale_factor=2), TimeGrow(c0, g0),
            _conv3x3(c0, c1, bias=False),
            MemBlock(c1), MemBlock(c1), MemBlock(c1), nn.Upsample(scale_factor=2), TimeGrow(c1, g1),
            _conv3x3(c1, c2, bias=False),
            MemBlock(c2), MemBlock(c2), MemBlock(c2), nn.Upsample(scale_factor=2), TimeGrow(c2, g2),
            _conv3x3(c2, c3, bias=False),
            nn.ReLU(inplace=True), _identity_conv(c3), nn.ReLU(inplace=True), _conv3x3(c3, 3),
        )
        self.reset()

    def reset(self) -> None:
        """Forget the video: the next call decodes its first frames (and trims 3)."""
        self._memory: dict[int, torch.Tensor] = {}  # MemBlock index -> (B, 1, C, H, W) its last input

    def forward(self, latents: torch.Tensor, cond: torch.Tensor,
                frames_per_pass: int | None = 1) -> torch.Tensor:
        """A whole video: :meth:`reset`, then :meth:`decode`."""
        self.reset()
        return self.decode(latents, cond, frames_per_pass)

    def decode(self, latents: torch.Tensor, cond: torch.Tensor,
               frames_per_pass: int | None = 1) -> torch.Tensor:
        """latents (B, latent_channels, T, h, w); cond (B, 3, F, 8h, 8w), the LQ frames these latents
        stand for: 4T - 3 of them on a stream's first call (the first is then repeated 3 times in
        front, as the original pads its condition), 4T on later calls. Returns (B, 3, 4T, 8h, 8w),
        4T - 3 frames on the first call. ``frames_per_pass``: latent frames per pass (None: all at
        once)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"TCDecoder.decode takes (B, {self.latent_channels}, T, h, w) latents, not "
                             f"{tuple(latents.shape)}")
        b, _, t, h, w = latents.shape
        ff, hh, ww = COND_SHUFFLE
        first = not self._memory
        if cond.ndim != 5 or cond.shape[:2] != (b, 3) or cond.shape[-2:] != (h * hh, w * ww):
            raise ValueError(f"TCDecoder.decode: the condition must be (B, 3, F, {h * hh}, {w * ww}) for "
                             f"latents {tuple(latents.shape)}, not {tuple(cond.shape)}")
        need = ff * t - FRAMES_TO_TRIM if first else ff * t
        if cond.shape[2] != need:
            raise ValueError(f"TCDecoder.decode: {t} latent frames need {need} condition frames ("
                             f"{ff * t - FRAMES_TO_TRIM} on a stream's first call, then {ff} per latent "
                             f"frame), not {cond.shape[2]}")
        if first:  # the original pads its condition to a multiple of 4 with copies of frame 0
            cond = torch.cat([cond[:, :, :1].expand(-1, -1, FRAMES_TO_TRIM, -1, -1), cond], dim=2)
        x = torch.cat([space_time_to_channels(cond, ff, hh, ww).to(latents.dtype), latents], dim=1)
        x = x.transpose(1, 2)  # (B, T, C, h, w)
        step = t if frames_per_pass is None else max(1, frames_per_pass)
        y = torch.cat([self._run(x[:, s:s + step]) for s in range(0, t, step)], dim=1)  # (B, 4T, 3, H, W)
        if first:
            y = y[:, self.frames_to_trim:]
        return y.transpose(1, 2).mul(2).sub(1)  # (B, 3, 4T, H, W)

    def _run(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C, h, w) -> (B, 4T, 3, 8h, 8w)
        b, t = x.shape[:2]
        y = x.reshape(b * t, *x.shape[2:])
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                cur = y.reshape(b, t, *y.shape[1:])
                before = self._memory.get(i)
                if before is None:
                    before = torch.zeros_like(cur[:, :1])
                past = torch.cat([before, cur[:, :-1]], dim=1).reshape(y.shape)
                self._memory[i] = cur[:, -1:].clone()
                y = layer(y, past)
            else:
                y = layer(y)
                if isinstance(layer, TimeGrow):
                    t *= layer.stride
        return y.reshape(b, t, *y.shape[1:])


# ----------------------------------------------------------------------------------------------
# Loading the published files
# ----------------------------------------------------------------------------------------------

def _read(path: Path, what: str) -> dict:
    """A state dict from ``path`` without unpickling code (sr.read_weights), checked to be one."""
    # the published files are raw state dicts: no wrapper key, no prefix
    return _tensors(read_weights(path, f"FlashVSR {what}"), path, what)


def _tensors(state, path: Path, what: str) -> dict:
    """``state`` if it is a non-empty {name: tensor} dict, else a one-line ModelError naming the file."""
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelError(f"FlashVSR {what}: {path} is not a state dict of tensors")
    return state


def _load_strict(build, state: dict, path: Path, what: str) -> nn.Module:
    """``build()`` with ``state`` loaded strictly, in fp32 on the CPU, after a check that names the file
    and the first missing, unexpected and mis-shaped keys in one line. The network is built on the
    meta device and takes the file's tensors (no second copy of 300M parameters, no wasted init)."""
    with torch.device("meta"):
        net = build()
    why = state_mismatch(shapes_of(net), shapes_of(state))
    if why:
        raise ModelError(f"FlashVSR {what}: {path} does not fit ({why})")
    net.load_state_dict(state, strict=True, assign=True)
    return net.float().eval().requires_grad_(False)


def _lq_shape(state: dict) -> dict:
    """LQProjector's sizes read from a state dict (the published ones where they cannot be read);
    the strict check then still sees every key and shape."""
    try:
        c0 = int(state["conv1.weight"].shape[1])
        layers = len({k.split(".")[1] for k in state if k.startswith("linear_layers.")})
        if c0 % (LQ_UNSHUFFLE * LQ_UNSHUFFLE) or layers < 1:
            return {}
        return {"in_dim": c0 // (LQ_UNSHUFFLE * LQ_UNSHUFFLE),
                "out_dim": int(state["linear_layers.0.weight"].shape[0]), "layer_num": layers,
                "hidden": (int(state["conv1.weight"].shape[0]), int(state["conv2.weight"].shape[0]))}
    except (KeyError, IndexError, AttributeError):
        return {}


def _decoder_shape(state: dict) -> dict:
    """TCDecoder's sizes read from a state dict (the published ones where they cannot be read)."""
    try:
        latent = int(state["decoder.1.weight"].shape[1]) - COND_CHANNELS
        channels = tuple(int(state[f"decoder.{i}.weight"].shape[0]) for i in (1, 10, 16, 22))
        return {"channels": channels, "latent_channels": latent} if latent >= 1 else {}
    except (KeyError, IndexError, AttributeError):
        return {}


def load_lq_proj(path, causal: bool = True) -> LQProjector:
    """The LQ projector from ``LQ_proj_in.ckpt`` (or a .safetensors of the same keys), strictly, on
    the CPU in fp32 (v1.1's file is reported to be bf16), in eval mode. ``causal``: True for
    FlashVSR v1.1's file (Causal_LQ4x_Proj), False for v1's (Buffer_LQ4x_Proj); the files cannot
    tell. A file that does not fit raises a one-line ModelError (a ValueError) naming it."""
    path = Path(path)
    state = _read(path, "LQ projector")
    shape = _lq_shape(state)
    return _load_strict(lambda: LQProjector(causal=causal, **shape), state, path, "LQ projector")


def load_tcdecoder(path) -> TCDecoder:
    """The tiny conditional decoder from ``TCDecoder.ckpt`` (or a .safetensors of the same keys),
    strictly, on the CPU in fp32, in eval mode. A file that does not fit raises a one-line
    ModelError (a ValueError) naming it."""
    path = Path(path)
    state = _read(path, "TCDecoder")
    shape = _decoder_shape(state)
    return _load_strict(lambda: TCDecoder(**shape), state, path, "TCDecoder")
