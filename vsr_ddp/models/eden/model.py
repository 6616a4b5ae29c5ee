"""The EDEN network (Zhang et al., "EDEN: Enhanced Diffusion for High-quality Large-motion Video
Frame Interpolation", CVPR 2025; github.com/bbldCVer/EDEN), written for vsr_ddp.

Same math and the same state-dict key names as the original ``src/models/EDEN.py`` (so its
published ``eden.pt`` loads strictly), attention through ``scaled_dot_product_attention``.

Shapes: two conditioning frames of H x W (multiples of 2 * patch) give ph x pw = H/p x W/p patch
tokens each; the latent being denoised (and decoded) has (ph/2) x (pw/2) tokens of ``latent_dim``.

* conditioning: each frame is normalised on its own (mean, unbiased std), patchified by two
  convolutions (one for the DiT, one for the decoder), plus a fixed 2-D sin-cos position embedding,
  layer-normed. The output frame is un-normalised with the two frames' averaged mean and std.
* DiT: the noisy latent tokens (``proj_in`` + position embedding) run through blocks of
  adaLN-modulated self-attention, temporal attention (each latent token attends over itself and the
  2x2 patch tokens of both frames under it) and an adaLN-modulated MLP. One modulation (shift,
  scale, gate for attention and MLP) for all blocks, from the timestep embedding plus the embedding
  of the start-end "difference" (the normalised cosine similarity of the frames).
* decoder: the latent tokens (``proj_token``) are upsampled 2x bicubically to patch resolution;
  these tokens attend jointly with the latent tokens, then temporally over the two frames' decoder
  tokens at the same position, then an MLP; ``unpatchify`` maps tokens to p x p x 3 pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # the original builds every LayerNorm with partial(nn.LayerNorm, eps=1e-6)
FREQ_DIM = 256  # the timestep embedder's sinusoid width (DiT's)


@dataclass(frozen=True)
class EdenConfig:
    hidden_dim: int = 768
    latent_dim: int = 16
    patch_size: int = 16
    dit_depth: int = 12
    decoder_depth: int = 4
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    in_dim: int = 3
    out_dim: int = 3

    @property
    def multiple(self) -> int:
        """Frame sizes the network takes are multiples of this (latent tokens are 2x2 patches)."""
        return 2 * self.patch_size


def config_from_shapes(shapes: dict, num_heads: int | None = None) -> EdenConfig:
    """The configuration a state dict's {key: shape} was made with (KeyError where a key the
    reading needs is absent). ``num_heads`` is not in the shapes: hidden_dim // 64 unless given."""
    hidden, latent = shapes["proj_in.weight"]
    _, in_dim, patch, _ = shapes["patch_cond_dit.weight"]
    final = shapes["unpatchify.3.weight"][0]
    mlp = shapes["dit_blocks.0.mlp.fc1.weight"][0]

    def depth(prefix: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix + ".")})

    return EdenConfig(hidden_dim=hidden, latent_dim=latent, patch_size=patch, dit_depth=depth("dit_blocks"),
                      decoder_depth=depth("decoder_blocks"),
                      num_heads=num_heads or max(1, hidden // 64), mlp_ratio=mlp / hidden,
                      qkv_bias="dit_blocks.0.self_attn.qkv.bias" in shapes, in_dim=in_dim,
                      out_dim=final // (patch * patch))


# ---------------------------------------------------------------------------------------------
# fixed embeddings


def _sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M, dim): sin then cos of pos * 10000^(-k / (dim/2)), k < dim/2 (MAE's, in float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat((out.sin(), out.cos()), dim=1)


@lru_cache(maxsize=32)
def _pos_embedding_cpu(ph: int, pw: int, scale: int, dim: int) -> torch.Tensor:
    gh, gw = ph // scale, pw // scale
    # the original's interpolation scale: rows span [0, 16), columns [0, 28) at any resolution
    rows = torch.arange(gh, dtype=torch.float32) / (ph / 16)
    cols = torch.arange(gw, dtype=torch.float32) / (pw / 28)
    col_of = cols[None, :].expand(gh, gw).reshape(-1)
    row_of = rows[:, None].expand(gh, gw).reshape(-1)
    # tokens in raster order; the first half of the channels encodes the column, the second the row
    emb = torch.cat((_sincos(dim // 2, col_of), _sincos(dim // 2, row_of)), dim=1)
    return emb.float().unsqueeze(0)


def pos_embedding(ph: int, pw: int, scale: int, dim: int, device=None) -> torch.Tensor:
    """(1, (ph//scale) * (pw//scale), dim) sin-cos position embedding of a ph x pw token grid seen
    at 1/scale (scale 1: the patch tokens, 2: the latent tokens)."""
    return _pos_embedding_cpu(ph, pw, scale, dim).to(device)


def timestep_frequencies(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """(N, dim): cos then sin of t * max_period^(-k / (dim/2)) (DiT's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat((args.cos(), args.sin()), dim=-1)
    if dim % 2:
        emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_dim: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(),
                                 nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------------------------------------
# blocks


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``qkv`` and ``proj`` (both biased only with qkv_bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _group_2x2(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, ph*pw, D) patch tokens -> (B, ph/2 * pw/2, 4, D): the 2x2 patches under each latent token
    (row-major inside the group)."""
    b, n, d = x.shape
    x = x.view(b, ph // 2, 2, pw // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n // 4, 4, d)


class TemporalAttention(nn.Module):
    """Each token attends over a short sequence: the frame-0 tokens at its place, itself, the
    frame-1 tokens at its place (1 + 1 + 1, or 4 + 1 + 4 when the frames' tokens are at twice its
    resolution); only its own output (the middle of the sequence) is kept. Only the middle query is
    computed: the other positions' outputs are discarded by the original too."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
        b, n, d = x.shape
        if x0.shape[1] != n:
            seq = torch.cat((_group_2x2(x0, ph, pw), x[:, :, None], _group_2x2(x1, ph, pw)), dim=2)
        else:
            seq = torch.stack((x0, x, x1), dim=2)
        seq = seq.reshape(b * n, seq.shape[2], d)
        w, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(x.reshape(b * n, 1, d), w[:d], None if bias is None else bias[:d])
        k, v = F.linear(seq, w[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(*(_heads(t, self.num_heads) for t in (q, k, v)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Block(nn.Module):
    """The parts (and state-dict keys) the DiT and decoder blocks share: self-attention, temporal
    attention to the two frames' tokens, an MLP, each after its layer norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False):
        super().__init__()
        self.norm_self_attn = nn.LayerNorm(dim, eps=LN_EPS)
        self.self_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.norm_temp_attn = nn.LayerNorm(dim, eps=LN_EPS)
        self.temp_attn = TemporalAttention(dim, num_heads, qkv_bias)
        self.norm_mlp = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_ratio)


class DiTBlock(_Block):

    def forward(self, x, tokens0, tokens1, ph: int, pw: int, modulations: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulations.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.self_attn(modulate(self.norm_self_attn(x), shift_msa, scale_msa))
        x = x + self.temp_attn(self.norm_temp_attn(x), tokens0, tokens1, ph, pw)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm_mlp(x), shift_mlp, scale_mlp))


class DecoderBlock(_Block):
    """The original's VAEBlock(is_encoder=False, add_attn_decoder=True, add_attn_type="temporal_attn")."""

    def forward(self, query, recon, tokens0, tokens1, ph: int, pw: int) -> torch.Tensor:
        n = recon.shape[1]
        x = torch.cat((recon, query), dim=1)
        y = (x + self.self_attn(self.norm_self_attn(x)))[:, :n]
        y = y + self.temp_attn(self.norm_temp_attn(y), tokens0, tokens1, ph, pw)
        return y + self.mlp(self.norm_mlp(y))


# ---------------------------------------------------------------------------------------------
# the network


@dataclass
class Condition:
    """What the two conditioning frames give, once per pair (the original keeps it on the module)."""
    dit0: torch.Tensor  # (B, ph*pw, D) frame-0 tokens for the DiT
    dit1: torch.Tensor
    dec0: torch.Tensor  # (B, ph*pw, D) frame-0 tokens for the decoder
    dec1: torch.Tensor
    mean: torch.Tensor  # (B, 1, 1, 1) the frames' averaged mean and std (to un-normalise the output)
    std: torch.Tensor
    ph: int
    pw: int


def normalise_frames(cond_frames: torch.Tensor, eps: float = 1e-8):
    """cond_frames (2B, C, H, W), the B first frames then the B second frames -> (each frame minus
    its mean over C, H, W over its unbiased std + eps, the pairs' averaged means, averaged stds)."""
    flat = cond_frames.flatten(1)
    mean = flat.mean(dim=1)[:, None, None, None]
    std = flat.std(dim=1)[:, None, None, None] + eps
    m0, m1 = mean.chunk(2)
    s0, s1 = std.chunk(2)
    return (cond_frames - mean) / std, (m0 + m1) / 2, (s0 + s1) / 2


class Eden(nn.Module):
    """EDEN's DiT and decoder; ``engine.py`` adds the sampler around them (``midpoint``)."""

    def __init__(self, config: EdenConfig = EdenConfig()):
        super().__init__()
        c = self.config = config
        d, p = c.hidden_dim, c.patch_size
        self.proj_in = nn.Linear(c.latent_dim, d)
        self.patch_cond_dit = nn.Conv2d(c.in_dim, d, kernel_size=p, stride=p)
        self.norm_cond_dit = nn.LayerNorm(d, eps=LN_EPS)
        self.dit_blocks = nn.ModuleList(DiTBlock(d, c.num_heads, c.mlp_ratio, c.qkv_bias)
                                        for _ in range(c.dit_depth))
        self.norm_out = nn.LayerNorm(d, eps=LN_EPS)
        self.proj_out = nn.Linear(d, 2 * c.latent_dim)  # the second half (a variance head) is unused
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.difference_embedder = nn.Linear(1, d)
        self.denoise_timestep_embedder = TimestepEmbedder(d)
        self.patch_cond_dec = nn.Conv2d(c.in_dim, d, kernel_size=p, stride=p)
        self.norm_cond_dec = nn.LayerNorm(d, eps=LN_EPS)
        self.proj_token = nn.Linear(c.latent_dim, d)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(d, c.num_heads, c.mlp_ratio, c.qkv_bias)
                                            for _ in range(c.decoder_depth))
        final = p * p * c.out_dim
        self.unpatchify = nn.Sequential(nn.LayerNorm(d, eps=LN_EPS), nn.Linear(d, final), nn.GELU(),
                                        nn.Linear(final, final))

    def condition(self, cond_frames: torch.Tensor) -> Condition:
        """cond_frames (2B, C, H, W): the B first frames then the B second frames, H and W multiples
        of ``config.multiple``."""
        p, d = self.config.patch_size, self.config.hidden_dim
        h, w = cond_frames.shape[-2:]
        if h % self.config.multiple or w % self.config.multiple:
            raise ValueError(f"EDEN takes frames whose sides are multiples of {self.config.multiple}, "
                             f"not {w}x{h}")
        ph, pw = h // p, w // p
        x, mean, std = normalise_frames(cond_frames)
        pos = pos_embedding(ph, pw, 1, d, x.device)
        dit = self.norm_cond_dit(self.patch_cond_dit(x).flatten(2).transpose(1, 2) + pos)
        dec = self.norm_cond_dec(self.patch_cond_dec(x).flatten(2).transpose(1, 2) + pos)
        dit0, dit1 = dit.chunk(2)
        dec0, dec1 = dec.chunk(2)
        return Condition(dit0, dit1, dec0, dec1, mean, std, ph, pw)

    def modulations(self, t: torch.Tensor, difference: torch.Tensor) -> torch.Tensor:
        """(B, 6 * hidden): the adaLN shift/scale/gate of all DiT blocks, from t (B,) and the
        difference (B, 1)."""
        emb = self.denoise_timestep_embedder(t) + self.difference_embedder(difference)
        return self.adaLN_modulation(emb)

    def denoise(self, latents: torch.Tensor, t: torch.Tensor, cond: Condition,
                difference: torch.Tensor) -> torch.Tensor:
        """The velocity at time t (B,) of latents (B, ph/2 * pw/2, latent_dim)."""
        mods = self.modulations(t, difference)
        x = self.proj_in(latents) + pos_embedding(cond.ph, cond.pw, 2, self.config.hidden_dim, latents.device)
        for blk in self.dit_blocks:
            x = blk(x, cond.dit0, cond.dit1, cond.ph, cond.pw, mods)
        return self.proj_out(self.norm_out(x))[..., :self.config.latent_dim]

    def decode(self, latents: torch.Tensor, cond: Condition) -> torch.Tensor:
        """(B, out_dim, H, W) frames of (un-scaled) latents (B, ph/2 * pw/2, latent_dim)."""
        ph, pw, d, p = cond.ph, cond.pw, self.config.hidden_dim, self.config.patch_size
        query = self.proj_token(latents)
        b = query.shape[0]
        grid = query.transpose(1, 2).reshape(b, d, ph // 2, pw // 2)
        recon = F.interpolate(grid, scale_factor=2.0, mode="bicubic", align_corners=False)
        recon = recon.flatten(2).transpose(1, 2) + pos_embedding(ph, pw, 1, d, latents.device)
        query = query + pos_embedding(ph, pw, 2, d, latents.device)
        for blk in self.decoder_blocks:
            recon = blk(query, recon, cond.dec0, cond.dec1, ph, pw)
        pix = self.unpatchify(recon)  # (B, ph*pw, p*p*C): (p1 p2 c) inside each patch
        c = self.config.out_dim
        pix = pix.view(b, ph, pw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, ph * p, pw * p)
        return pix * cond.std + cond.mean


def parameter_counts(model: Eden) -> dict:
    """{part: parameters}: patch encoder (both patch convolutions and their norms), DiT (its blocks,
    projections, modulation and embedders), decoder (its blocks, token projection, unpatchify)."""
    parts = {"patch": ("patch_cond_dit", "norm_cond_dit", "patch_cond_dec", "norm_cond_dec"),
             "dit": ("proj_in", "dit_blocks", "norm_out", "proj_out", "adaLN_modulation",
                     "difference_embedder", "denoise_timestep_embedder"),
             "decoder": ("proj_token", "decoder_blocks", "unpatchify")}
    counts = {k: 0 for k in parts}
    for name, prm in model.named_parameters():
        top = name.split(".")[0]
        part = next(k for k, tops in parts.items() if top in tops)
        counts[part] += prm.numel()
    return counts
