"""The Wan 2.1 VAE decoder that FlashVSR's "full" pipeline decodes the DiT's latents with (instead of the
tiny conditional decoder of ``decoder.py``): vsr_ddp's own code, written from FlashVSR's
``diffsynth/models/wan_video_vae.py`` (OpenImagingLab/FlashVSR, Apache-2.0; itself Wan 2.1's VAE).

Only the decoder: the full pipeline never encodes (FlashVSR's example sets ``vae.model.encoder`` and
``vae.model.conv1`` to None after loading). Every parameter has the name it has in the published
``Wan2.1_VAE.pth``: a ``torch.save`` of the raw state dict of Wan's ``WanVAE_`` (no prefix; DiffSynth's
converter also unwraps a ``model_state`` key and then adds its own ``model.`` prefix, which is not in
the file; float32, about 508 MB), 194 tensors, 126,892,531 parameters: ``encoder.*`` (84 tensors,
53,595,872), ``conv1.*`` (the encoder's quant conv: 2, 1,056), ``conv2.*`` (the post-quant 1x1x1
conv: 2, 272) and ``decoder.*`` (106, 73,295,331); the decoder loads 108 tensors, 73,295,603
parameters. :func:`load_wan_vae_decoder` loads ``conv2.*`` and ``decoder.*`` strictly and ignores
``encoder.*`` and ``conv1.*``; any other key, a missing one or a wrong shape is a one-line ModelError.

Layout (dim 96, z_dim 16, channel multipliers 1, 2, 4, 4, two residual blocks per level plus one):
``decoder.conv1`` (causal 3x3x3, 16 -> 384), ``decoder.middle`` (residual block, single-head
attention per frame, residual block), ``decoder.upsamples.0..14`` (four levels of three residual
blocks; after the first three levels a ``Resample`` at index 3, 7, 11: nearest-exact x2 in space and
a 3x3 conv halving the channels, and for the first two also ``time_conv``, a causal (3, 1, 1) conv to
twice the channels whose halves become two consecutive frames), ``decoder.head`` (RMS norm, SiLU,
causal 3x3x3 conv to RGB). Residual blocks are ``residual.{0,2,3,6}`` (norm, conv, norm, conv) and a
``shortcut`` 1x1x1 conv where the channel count changes (``upsamples.4``).

How the full pipeline decodes (``FlashVSRFullPipeline.__call__`` -> ``WanVideoVAE.decode``): all the
DiT's latents at the end, not streamed; un-normalised first, ``z / (1 / std) + mean`` per channel with
the constants below (cast to the latents' dtype); then ``conv2`` and the decoder one latent frame at a
time with a feature cache; the result clamped to [-1, 1]. The first latent frame gives one frame,
every later one four: T latent frames -> 4T - 3 frames, 8x the latent height and width (FlashVSR
feeds 8n + 1 input frames, the DiT makes 2n latent frames, the VAE gives 8n - 3 frames). Spatial
tiling is optional there (``tiled=True``, tiles of 60x104 latents with stride 30x52 blended by linear
ramps); FlashVSR's example runs it untiled. :meth:`WanVAEDecoder.decode_tiled` does the same.

The feature cache: every temporal convolution is causal (2 frames of zeros in front of the clip), so
a decoder fed the latents in chunks, each convolution given the last 2 input frames of the previous
chunk, equals one causal pass over the clip. The one exception, Wan's first-frame rule: the temporal
upsampling (``time_conv``) skips the clip's first frame (it stays one frame, not two) and runs as a
causal convolution over the frames after it, its zero padding in front of the second frame. Here the
cache is a dict from module to its last input frames (:meth:`WanVAEDecoder.feed`), so chunks of any
size give the same frames as the original's one-frame-at-a-time loop.

Arithmetic as the original: RMS norms in the working dtype (diffusers' AutoencoderKLWan upcasts them
to float32 for half types; the original does not), the nearest-exact upsampling in float32.
tests/test_flashvsr_vae.py checks this against diffusers' AutoencoderKLWan in float32 (a tiny
configuration of the published layout: equal bit for bit when fed one latent frame at a time, to
~4e-6 in larger chunks, where the convolutions sum in another order).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..sr import read_weights
from .decoder import _load_strict, _tensors

# the latent normalisation of Wan 2.1 (WanVideoVAE.mean / .std): the DiT works on (z - mean) / std
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
Z_DIM = 16
BASE_DIM = 96
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_UPSAMPLE = (True, True, False)   # reverse of the encoder's temperal_downsample (F, T, T)
SPATIAL_UP = 8                            # output pixels per latent pixel
TIME_UP = 4                               # output frames per latent frame (after the first)
CACHE_T = 2                               # past frames a causal 3-tap convolution needs

Cache = dict  # module -> its last input frames (B, C, CACHE_T, H, W); a Resample -> True once started


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution that sees only the present and the past: the temporal padding (2 * padding_t)
    goes in front; spatial padding is symmetric. With a ``cache``, the frames in front are the last
    ones of the previous chunk (zeros at the clip's start), so chunked calls equal one call over the
    clip. Parameters ``weight`` and ``bias`` as in nn.Conv3d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.front = 2 * pt
        self._spatial = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        if self.front and cache is not None:
            past = cache.get(self)
            if past is None:  # the clip's start: zeros, as the padding would be
                past = x.new_zeros(*x.shape[:2], self.front, *x.shape[3:])
            x = torch.cat([past, x], dim=2)
            cache[self] = x[:, :, -self.front:].clone()  # a copy: the chunk's buffer can go
            return super().forward(F.pad(x, self._spatial))
        return super().forward(F.pad(x, (*self._spatial, self.front, 0)))


class RMSNorm(nn.Module):
    """Wan's RMS norm over the channel axis: x / |x|_2 * sqrt(C) * gamma, in the input's dtype.
    ``gamma`` is (C, 1, 1, 1) for video tensors and (C, 1, 1) for frames (``images``), as in the file."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...)
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-exact x2 in height and width, computed in float32 (the original's bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, 2H, 2W)
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class ResidualBlock(nn.Module):
    """norm, SiLU, causal 3x3x3 conv, norm, SiLU, causal 3x3x3 conv, plus the input (through a
    1x1x1 ``shortcut`` conv where the channel count changes). ``residual.{0,2,3,6}`` as in the file
    (index 5 is the original's dropout, an identity at inference)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:  # (B, C, T, H, W)
        r = self.residual
        h = self.shortcut(x)
        x = r[2](r[1](r[0](x)), cache)
        x = r[6](r[5](r[4](r[3](x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing, so no cache):
    ``norm`` (frame RMS norm), ``to_qkv`` and ``proj`` 1x1 conv2ds, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        identity = x
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # (B*T, 1, H*W, C) each
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


class Resample(nn.Module):
    """Upsampling between decoder levels: ``resample`` = (nearest-exact x2, 3x3 conv to dim // 2)
    on each frame; with ``temporal``, first ``time_conv``, a causal (3, 1, 1) conv to 2 * dim
    channels whose two halves become two consecutive frames (first half first). The clip's first
    frame skips it (Wan's rule: one frame, not two), and ``time_conv`` runs causally over the frames
    after it, zeros in front of the second."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:  # (B, C, T, H, W)
        if self.time_conv is not None:
            head = None
            if self not in cache:  # the clip's first frame passes through once
                cache[self] = True
                head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2]:
                y = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                b, c2, t, h, w = y.shape
                y = y.reshape(b, 2, c2 // 2, t, h, w)
                x = torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c2 // 2, 2 * t, h, w)
            if head is not None:
                x = torch.cat([head, x], dim=2)
        b, c, t, h, w = x.shape
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*T, C/2, 2H, 2W)
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class Decoder3d(nn.Module):
    """Wan 2.1's video decoder: latents (B, z_dim, T, h, w) after ``conv2`` to RGB (B, 3, T', 8h, 8w),
    T' = 4T - 3 over a whole clip. Module names as in the file (``conv1``, ``middle``, ``upsamples``,
    ``head``)."""

    def __init__(self, dim: int = BASE_DIM, z_dim: int = Z_DIM, dim_mult=DIM_MULT,
                 num_res_blocks: int = NUM_RES_BLOCKS, temporal_upsample=TEMPORAL_UPSAMPLE):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous Resample halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, temporal=bool(temporal_upsample[i])))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:  # (B, z, T, h, w)
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)  # (B, 3, T', H, W)


class WanVAEDecoder(nn.Module):
    """The decoding half of Wan 2.1's VAE as FlashVSR's full pipeline uses it: ``conv2`` (post-quant
    1x1x1 conv) and ``decoder``, named as in ``Wan2.1_VAE.pth``. No buffers: the state dict is
    exactly the file's decoder keys.

    :meth:`decode` takes the DiT's normalised latents (B, 16, T, h, w) and gives frames
    (B, 3, 4T - 3, 8h, 8w) in [-1, 1]. :meth:`feed` streams: a fresh ``cache = {}`` per clip, then
    the latent frames in order, in chunks of any size; each call gives the frames of its latents
    (1 + 4(n - 1) for the clip's first chunk of n, 4n after)."""

    def __init__(self, dim: int = BASE_DIM, z_dim: int = Z_DIM, dim_mult=DIM_MULT,
                 num_res_blocks: int = NUM_RES_BLOCKS, temporal_upsample=TEMPORAL_UPSAMPLE):
        super().__init__()
        self.z_dim = z_dim
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, tuple(dim_mult), num_res_blocks, tuple(temporal_upsample))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's latents to the VAE's: z / (1 / std) + mean per channel, as the original computes
        it (its scale is [mean, 1 / std], cast to the latents' dtype)."""
        if self.z_dim != len(LATENT_MEAN):
            raise ValueError(f"WanVAEDecoder.denormalize: the Wan 2.1 constants are for {len(LATENT_MEAN)} "
                             f"latent channels, this decoder has {self.z_dim}")
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN).to(latents).view(shape)
        inv_std = (1.0 / torch.tensor(LATENT_STD)).to(latents).view(shape)
        return latents / inv_std + mean

    def _check(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"WanVAEDecoder takes latents (B, {self.z_dim}, T, h, w), not "
                             f"{tuple(latents.shape)}")
        return latents.to(self.conv2.weight)

    def feed(self, latents: torch.Tensor, cache: Cache, denormalize: bool = True) -> torch.Tensor:
        """The next latent frames of a clip (B, z, n, h, w) -> their frames (B, 3, n', 8h, 8w) in
        [-1, 1]; ``cache`` ({} at the clip's start) carries the causal state between calls."""
        z = self._check(latents)
        if denormalize:
            z = self.denormalize(z)
        if z.shape[2] == 0:
            return z.new_zeros(z.shape[0], 3, 0, z.shape[3] * SPATIAL_UP, z.shape[4] * SPATIAL_UP)
        return self.decoder(self.conv2(z), cache).clamp_(-1, 1)

    def decode(self, latents: torch.Tensor, chunk: int = 1, denormalize: bool = True) -> torch.Tensor:
        """A whole clip (B, z, T, h, w) -> (B, 3, 4T - 3, 8h, 8w) in [-1, 1], the latent frames fed
        ``chunk`` at a time (1: the original's loop; more is faster and gives the same frames)."""
        z = self._check(latents)
        if chunk < 1:
            raise ValueError(f"WanVAEDecoder.decode: chunk must be >= 1, not {chunk}")
        cache: Cache = {}
        outs = [self.feed(z[:, :, :1], cache, denormalize)]
        outs += [self.feed(z[:, :, s:s + chunk], cache, denormalize) for s in range(1, z.shape[2], chunk)]
        return torch.cat(outs, dim=2)

    def decode_tiled(self, latents: torch.Tensor, tile: tuple[int, int] = (60, 104),
                     stride: tuple[int, int] = (30, 52), chunk: int = 1,
                     denormalize: bool = True) -> torch.Tensor:
        """:meth:`decode` in overlapping spatial tiles of ``tile`` latents every ``stride`` (the
        original's ``tiled_decode`` with the pipeline's defaults): each tile weighted by linear ramps
        over the overlap (none at the frame's borders), the weighted sum divided by the weights, then
        clamped. Less memory than one pass; not bit-equal to it (each tile pads its own borders)."""
        z = self._check(latents)
        _, _, t, h, w = z.shape
        (th, tw), (sh, sw) = tile, stride
        tasks = [(y, x) for y in range(0, h, sh) if not (y - sh >= 0 and y - sh + th >= h)
                 for x in range(0, w, sw) if not (x - sw >= 0 and x - sw + tw >= w)]
        out = t * TIME_UP - (TIME_UP - 1)
        # accumulated in float32 (the original: in the latents' dtype, on the CPU)
        values = torch.zeros(z.shape[0], 3, out, h * SPATIAL_UP, w * SPATIAL_UP, device=z.device)
        weight = torch.zeros(1, 1, out, h * SPATIAL_UP, w * SPATIAL_UP, device=z.device)
        for y, x in tasks:
            part = self.decode(z[:, :, :, y:y + th, x:x + tw], chunk, denormalize)  # (B, 3, T', H', W')
            ph, pw = part.shape[-2:]
            ramp_h = _ramp(ph, y == 0, y + th >= h, (th - sh) * SPATIAL_UP)
            ramp_w = _ramp(pw, x == 0, x + tw >= w, (tw - sw) * SPATIAL_UP)
            mask = torch.minimum(ramp_h[:, None], ramp_w[None, :]).to(z.device)  # (H', W')
            ys, xs = y * SPATIAL_UP, x * SPATIAL_UP
            values[:, :, :, ys:ys + ph, xs:xs + pw] += part * mask
            weight[:, :, :, ys:ys + ph, xs:xs + pw] += mask
        return (values / weight).clamp_(-1, 1).to(z.dtype)


def _ramp(n: int, at_start: bool, at_end: bool, border: int) -> torch.Tensor:
    """The original's build_1d_mask: ones, rising (1..border) / border over the first ``border``
    entries and falling over the last ``border``, except at the frame's own edges. The tiles are
    chosen so that one that is not at an edge is longer than ``border``."""
    m = torch.ones(n)
    if border > 0:
        up = (torch.arange(border) + 1) / border
        if not at_start:
            m[:border] = up
        if not at_end:
            m[-border:] = torch.flip(up, dims=(0,))
    return m


# ----------------------------------------------------------------------------------------------
# Loading Wan2.1_VAE.pth
# ----------------------------------------------------------------------------------------------

ENCODER_PREFIXES = ("encoder.", "conv1.")  # in the file, not used by the decoder


def _read(path: Path) -> dict:
    """The file's state dict without unpickling code (sr.read_weights), unwrapped from a
    ``model_state`` key as the original's converter does."""
    state = read_weights(path, "FlashVSR Wan VAE")
    if isinstance(state, dict) and isinstance(state.get("model_state"), dict):
        state = state["model_state"]
    return _tensors(state, path, "Wan VAE")


def _decoder_shape(state: dict) -> dict:
    """WanVAEDecoder's sizes read from the state dict (the published ones where they cannot be read);
    the strict check then still sees every key and shape."""
    try:
        z_dim = int(state["conv2.weight"].shape[0])
        dim = int(state["decoder.conv1.weight"].shape[0]) // DIM_MULT[-1]
        # the first Resample follows the first level's num_res_blocks + 1 residual blocks
        first = min(int(k.split(".")[2]) for k in state
                    if k.startswith("decoder.upsamples.") and ".resample." in k)
        if z_dim < 1 or dim < 1 or first < 1:
            return {}
        return {"dim": dim, "z_dim": z_dim, "num_res_blocks": first - 1}
    except (KeyError, IndexError, AttributeError, ValueError):
        return {}


def load_wan_vae_decoder(path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> WanVAEDecoder:
    """The Wan 2.1 VAE decoder from ``Wan2.1_VAE.pth`` (or a .safetensors of the same keys), in
    eval mode on ``device`` in ``dtype`` (FlashVSR runs it in bfloat16). Loads ``conv2.*`` and
    ``decoder.*`` strictly; the encoder's keys (``encoder.*``, ``conv1.*``) are skipped, as the
    original drops the encoder after loading. A file that does not fit raises a one-line ModelError
    (a ValueError) naming it and the first missing, unexpected and mis-shaped keys."""
    path = Path(path)
    state = {k: v for k, v in _read(path).items() if not k.startswith(ENCODER_PREFIXES)}
    shape = _decoder_shape(state)
    net = _load_strict(lambda: WanVAEDecoder(**shape), state, path, "Wan VAE")
    return net.to(device=device, dtype=dtype)
