"""The Wan 2.1 DiT backbone as FlashVSR runs it (OpenImagingLab/FlashVSR, Apache-2.0), with dense
self-attention: vsr_ddp's own code, written from FlashVSR's ``diffsynth/models/wan_video_dit.py``.

What FlashVSR's DiT is: Wan 2.1 T2V 1.3B (dim 1536, 30 blocks of 12 heads, ffn 8960, 16 latent
channels in and out, patch (1, 2, 2), a 4096-wide T5 prompt embedding, a 256-wide sinusoidal time
embedding), distilled to one step at timestep 1000. Every parameter has the name it has in the
published ``diffusion_pytorch_model_streaming_dmd.safetensors`` (Wan's / DiffSynth's own layout:
``blocks.N.self_attn.q.weight``, ``blocks.N.modulation``, ``head.head.weight``, ... with no prefix;
DiffSynth loads it through its ``from_civitai`` converter, which passes the keys through unchanged),
so :func:`load_dit` loads it strictly. The module has no buffers: the 3-D RoPE tables are computed
per call (they are cheap, and a complex or float64 buffer would be mangled by ``Module.to(dtype)``).

Arithmetic as FlashVSR's code does it, so that its weights see the numbers they were distilled with:
the sinusoidal time embedding and the RoPE rotation in float64 (cast back to the model's dtype), the
q/k RMSNorms in float32 over the whole width (all heads together), LayerNorms and the modulation in
the model's dtype. Two deliberate differences, neither of which changes a result FlashVSR produces:
the head's modulation adds the time embedding per batch row (FlashVSR's broadcasting is right only
for batch 1, the one it runs), and the RoPE split of a head is checked (``head_dim // 3`` even, true
of 128) instead of failing later in a reshape. Checked once against FlashVSR's own modules (its
self-attention swapped for the dense SDPA path of its own ``flash_attention``): equal bit for bit in
float32 and bfloat16, head dims 32 and 128; tests/test_flashvsr_dit.py checks it against diffusers.

Self-attention goes through one hook, :data:`SelfAttentionFn` (``WanDiT(config, attention=...)`` or
:meth:`WanDiT.set_attention`): dense scaled-dot-product attention by default; FlashVSR's
locality-constrained block-sparse attention (``vsr_ddp.models.flashvsr.sparse``) plugs in there.
The streaming path (FlashVSR's ``is_stream``): :meth:`WanDiT.stream_step` runs one step of latent
frames against a :class:`KVCache` that holds, per block, the RoPE-rotated keys and values of the last
``kv_len`` frame pairs of earlier steps; each block attends from the step's tokens to the cached
tokens followed by its own (the hook gets q of the step, k and v of cache + step), then the cache
keeps the newest pairs (the original's rule: more than kv_len pairs -> drop the oldest one). The
prompt is fixed, so its cross-attention keys/values are computed once (:meth:`WanDiT.context_kv`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..sr import shapes_of, state_mismatch

# q, k, v: (B, L, C) with C = num_heads * head_dim, RoPE already applied; grid: the (f, h, w) token
# grid of the L = f * h * w tokens, in that order. Returns (B, L, C), the heads concatenated.
SelfAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, "tuple[int, int, int]"],
                           torch.Tensor]

ROPE_THETA = 10000.0
TIME_PERIOD = 10000.0


@dataclass(frozen=True)
class DiTConfig:
    """The backbone's shape; the defaults are Wan 2.1 T2V 1.3B, FlashVSR's published DiT."""

    dim: int = 1536
    in_dim: int = 16           # latent channels in
    out_dim: int = 16          # latent channels out
    ffn_dim: int = 8960
    text_dim: int = 4096       # width of the prompt embedding (umT5-XXL)
    freq_dim: int = 256        # width of the sinusoidal time embedding
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"DiTConfig.patch_size must be 3 positive sizes, not {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        d = self.head_dim
        if d % 2 or (d // 3) % 2:
            # FlashVSR gives h and w d // 3 rotary channels each (Wan's own code 2 * (d // 6): the same
            # whenever d // 3 is even) and t the rest; odd counts cannot be rotated in pairs.
            raise ValueError(f"DiTConfig: head_dim {d} must be even with head_dim // 3 even (3-D RoPE split)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Rotary channels of one head given to frame, row and column position: (44, 42, 42) for 128."""
        d = self.head_dim
        return d - 2 * (d // 3), d // 3, d // 3


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                    grid: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Full softmax attention of every query over every key (the grid is not needed):
    q (B, Lq, C), k and v (B, Lk, C) -> (B, Lq, C)."""
    b, lq, c = q.shape
    q = q.view(b, lq, num_heads, -1).transpose(1, 2)           # (B, H, Lq, D)
    k = k.view(b, k.shape[1], num_heads, -1).transpose(1, 2)   # (B, H, Lk, D)
    v = v.view(b, v.shape[1], num_heads, -1).transpose(1, 2)   # (B, H, Lk, D)
    out = F.scaled_dot_product_attention(q, k, v)               # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(b, lq, c)


def sinusoidal_embedding(dim: int, timestep: torch.Tensor) -> torch.Tensor:
    """(B,) timesteps -> (B, dim): [cos | sin] of t * 10000^(-i / (dim/2)), computed in float64 as
    FlashVSR does (float32 would put an error of ~1e-4 into the phase at t = 1000)."""
    half = dim // 2
    freqs = torch.pow(TIME_PERIOD, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    phase = torch.outer(timestep.to(torch.float64), freqs)      # (B, dim/2)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)


def rope_angles(config: DiTConfig, grid: tuple[int, int, int], frame_offset: int = 0,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (L, 1, head_dim/2) float64, of the rotation angle of every channel pair of
    every token of an (f, h, w) grid, tokens in (f, h, w) order: the first pairs turn with the
    frame index (plus ``frame_offset``: a streamed chunk's place in the video), the next with the
    row, the last with the column, each axis with its own frequency ladder theta^(-2i / d_axis)."""
    f, h, w = grid
    parts = []
    for d_axis, n, start in zip(config.rope_dims, (f, h, w), (frame_offset, 0, 0)):
        freqs = 1.0 / ROPE_THETA ** (torch.arange(0, d_axis, 2, dtype=torch.float64, device=device) / d_axis)
        pos = torch.arange(start, start + n, dtype=torch.float64, device=device)
        parts.append(torch.outer(pos, freqs))                     # (n, d_axis/2)
    pf, ph, pw = parts
    angles = torch.cat([
        pf[:, None, None, :].expand(f, h, w, -1),
        ph[None, :, None, :].expand(f, h, w, -1),
        pw[None, None, :, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)  # (L, 1, D/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], num_heads: int) -> torch.Tensor:
    """Rotate each (even, odd) channel pair of every head of x (B, L, C) by its angle, in float64
    (FlashVSR multiplies by complex128 unit phasors: the same products)."""
    cos, sin = rope                                              # (L, 1, D/2)
    b, seq, c = x.shape
    pairs = x.to(torch.float64).view(b, seq, num_heads, -1, 2)   # (B, L, H, D/2, 2)
    re, im = pairs.unbind(-1)
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.view(b, seq, c).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis (all heads together), in float32, then the gain."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SelfAttention(nn.Module):
    """Self-attention over the video tokens: q/k RMSNorm, 3-D RoPE on q and k, then the attention
    hook (dense by default)."""

    def __init__(self, dim: int, num_heads: int, eps: float, attention: SelfAttentionFn):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.attention = attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                grid: tuple[int, int, int]) -> torch.Tensor:
        return self.stream(x, rope, grid, None)[0]

    def stream(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int],
               past: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming step: the step's tokens x (B, L, C) attend to ``past`` keys/values
        (B, Lp, C) (RoPE already applied at their own positions; None at a stream's start) followed
        by their own. Returns the output (B, L, C) and the keys and values (B, Lp + L, C) seen."""
        q = apply_rope(self.norm_q(self.q(x)), rope, self.num_heads)  # (B, L, C)
        k = apply_rope(self.norm_k(self.k(x)), rope, self.num_heads)  # (B, L, C)
        v = self.v(x)                                                 # (B, L, C)
        if past is not None:
            k = torch.cat([past[0], k], dim=1)                        # (B, Lp + L, C)
            v = torch.cat([past[1], v], dim=1)                        # (B, Lp + L, C)
        return self.o(self.attention(q, k, v, self.num_heads, grid)), k, v


class CrossAttention(nn.Module):
    """Attention of the video tokens to the embedded prompt (no RoPE). FlashVSR's prompt is fixed,
    so its keys and values (:meth:`context_kv`) can be computed once and kept."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, S, C), already through the model's text_embedding -> k, v (B, S, C)."""
        return self.norm_k(self.k(context)), self.v(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, L, C); context (B, S, C) embedded, or its :meth:`context_kv` given as ``kv``."""
        k, v = self.context_kv(context) if kv is None else kv
        return self.o(dense_attention(self.norm_q(self.q(x)), k, v, self.num_heads))


class DiTBlock(nn.Module):
    """One Wan block: time-modulated self-attention, cross-attention to the prompt, time-modulated
    MLP. ``modulation`` (1, 6, C) plus the block-independent t_mod gives shift/scale/gate of each."""

    def __init__(self, config: DiTConfig, attention: SelfAttentionFn):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.self_attn = SelfAttention(dim, config.num_heads, eps, attention)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)  # before self-attention
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)  # before the MLP
        self.norm3 = nn.LayerNorm(dim, eps=eps)                            # before cross-attention
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t_mod: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
        """x (B, L, C); context (B, S, C) embedded; t_mod (B, 6, C)."""
        mod = self.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod  # (B, 6, C)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.chunk(6, dim=1)  # each (B, 1, C)
        x = x + gate_sa * self.self_attn(self.norm1(x) * (1 + scale_sa) + shift_sa, rope, grid)
        x = x + self.cross_attn(self.norm3(x), context)
        return x + gate_ff * self.ffn(self.norm2(x) * (1 + scale_ff) + shift_ff)

    def stream(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor], t_mod: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int],
               past: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` of one streaming step (see :meth:`SelfAttention.stream`), with the
        prompt's cross-attention keys/values precomputed. Returns x and the keys/values seen."""
        mod = self.modulation.to(dtype=t_mod.dtype, device=t_mod.device) + t_mod  # (B, 6, C)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.chunk(6, dim=1)  # each (B, 1, C)
        y, k, v = self.self_attn.stream(self.norm1(x) * (1 + scale_sa) + shift_sa, rope, grid, past)
        x = x + gate_sa * y
        x = x + self.cross_attn(self.norm3(x), None, kv=context_kv)
        return x + gate_ff * self.ffn(self.norm2(x) * (1 + scale_ff) + shift_ff), k, v


class Head(nn.Module):
    """Final modulated LayerNorm and the projection of each token to its patch of output latents."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, L, C), t (B, C) the time embedding (not the projection) -> (B, L, out*pt*ph*pw)."""
        mod = self.modulation.to(dtype=t.dtype, device=t.device) + t.unsqueeze(1)  # (B, 2, C)
        shift, scale = mod.chunk(2, dim=1)                                         # each (B, 1, C)
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """The backbone: latents (B, in_dim, F, H, W), timestep (B,), prompt embedding (B, S, text_dim)
    -> (B, out_dim, F, H, W), the flow prediction (FlashVSR's one step: ``latents - output``)."""

    def __init__(self, config: DiTConfig | None = None, attention: SelfAttentionFn = dense_attention):
        super().__init__()
        self.config = config = config or DiTConfig()
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config, attention) for _ in range(config.num_layers))
        self.head = Head(config)

    def set_attention(self, attention: SelfAttentionFn) -> None:
        """Route every block's self-attention through ``attention`` (e.g. FlashVSR's block-sparse one)."""
        for block in self.blocks:
            block.self_attn.attention = attention

    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or a scalar -> t (B, C) for the head and t_mod (B, 6, C) for the blocks."""
        dtype = self.time_embedding[0].weight.dtype
        timestep = torch.as_tensor(timestep, device=self.time_embedding[0].weight.device).reshape(-1)
        t = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, timestep).to(dtype))  # (B, C)
        return t, self.time_projection(t).unflatten(1, (6, self.config.dim))                    # (B, 6, C)

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """The prompt embedding (B, S, text_dim) -> (B, S, C), what every cross-attention reads."""
        return self.text_embedding(context)

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, in_dim, F, H, W) -> tokens (B, f*h*w, C) in (f, h, w) order, and the grid (f, h, w)."""
        shape = tuple(x.shape[2:])
        if x.ndim != 5 or any(s % p for s, p in zip(shape, self.config.patch_size)):
            raise ValueError(f"WanDiT takes latents (B, {self.config.in_dim}, F, H, W) with F, H, W "
                             f"multiples of the patch {self.config.patch_size}, not {tuple(x.shape)}")
        x = self.patch_embedding(x)                                  # (B, C, f, h, w)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid                    # (B, L, C)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, f*h*w, pt*ph*pw*out) -> (B, out, f*pt, h*ph, w*pw); each token's channels are its
        patch's voxels in (pt, ph, pw) order with the output channel fastest."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, -1)              # (B, f, h, w, pt, ph, pw, out)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                        # (B, out, f, pt, h, ph, w, pw)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                lq_latents: Sequence[torch.Tensor] | None = None, frame_offset: int = 0) -> torch.Tensor:
        """x (B, in_dim, F, H, W); timestep (B,) or a scalar (FlashVSR: 1000); context (B, S, text_dim).
        ``lq_latents``: FlashVSR's LQ projector output, one (B, L, C) tensor per leading block, added to
        the tokens just before that block. ``frame_offset``: the RoPE frame index of the first latent
        frame. Returns (B, out_dim, F, H, W)."""
        t, t_mod = self.embed_time(timestep)                          # (B, C), (B, 6, C)
        context = self.embed_context(context)                         # (B, S, C)
        tokens, grid = self.patchify(x)                               # (B, L, C)
        rope = rope_angles(self.config, grid, frame_offset, device=tokens.device)
        for i, block in enumerate(self.blocks):
            if lq_latents is not None and i < len(lq_latents):
                tokens = tokens + lq_latents[i]
            tokens = block(tokens, context, t_mod, rope, grid)
        return self.unpatchify(self.head(tokens, t), grid)

    def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prompt embedding (B, S, text_dim) -> every block's cross-attention keys/values
        (B, S, C): FlashVSR's prompt is fixed, so a stream computes them once (``init_cross_kv``)."""
        emb = self.embed_context(context)                             # (B, S, C)
        return [block.cross_attn.context_kv(emb) for block in self.blocks]

    def stream_step(self, x: torch.Tensor, t: torch.Tensor, t_mod: torch.Tensor,
                    context_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], cache: KVCache,
                    lq_latents: Sequence[torch.Tensor] | None = None, frame_offset: int = 0) -> torch.Tensor:
        """One step of FlashVSR's streaming forward (``model_fn_wan_video`` with ``is_stream``).

        x (B, in_dim, F, H, W): the step's latent frames (F even: whole frame pairs; 6 at a stream's
        start, 2 after in the original); t, t_mod: :meth:`embed_time` of the timestep; context_kv:
        :meth:`context_kv` of the prompt; cache: the blocks' keys/values of earlier steps, updated
        here; lq_latents as in :meth:`forward`; frame_offset: the RoPE frame index of x's first frame
        (its index in the stream). Every block's self-attention sees the cached pairs then the step's
        own (all of them: no causal mask inside a step). Returns (B, out_dim, F, H, W)."""
        tokens, grid = self.patchify(x)                               # (B, L, C)
        f, h, w = grid
        if f % 2:
            raise ValueError(f"stream_step takes whole latent frame pairs, not {f} frames")
        rope = rope_angles(self.config, grid, frame_offset, device=tokens.device)
        for i, block in enumerate(self.blocks):
            if lq_latents is not None and i < len(lq_latents):
                tokens = tokens + lq_latents[i]
            tokens, k, v = block.stream(tokens, context_kv[i], t_mod, rope, grid, cache.layers[i])
            cache.keep(i, k, v, 2 * h * w)
        return self.unpatchify(self.head(tokens, t), grid)


class KVCache:
    """The streaming self-attention memory of every block: keys and values (B, L, C), RoPE applied,
    of the last ``kv_len`` latent frame pairs of the steps run so far (tokens in (f, h, w) order,
    oldest pair first). After each step a block's cache is what it attended to, less the oldest
    pair when that holds more than kv_len pairs: the original's rule (FlashVSR's ``pre_cache_k/v``
    with ``kv_len = int(kv_ratio)``), which at inference keeps exactly kv_len pairs (the first step
    brings 3, each later one adds 1 and drops 1), so the cache's size is bounded."""

    def __init__(self, num_layers: int, kv_len: int = 3):
        if kv_len < 1:
            raise ValueError(f"KVCache: kv_len must be >= 1, not {kv_len}")
        self.kv_len = kv_len
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def reset(self) -> None:
        """Forget everything: the next step is a stream's first."""
        self.layers = [None] * len(self.layers)

    def keep(self, i: int, k: torch.Tensor, v: torch.Tensor, pair_tokens: int) -> None:
        """Store block i's keys/values (B, L, C) of this step (cache + step), trimmed by the rule."""
        if k.shape[1] % pair_tokens:
            raise ValueError(f"KVCache: {k.shape[1]} tokens are not whole frame pairs of {pair_tokens}")
        if k.shape[1] // pair_tokens > self.kv_len:
            k, v = k[:, pair_tokens:], v[:, pair_tokens:]
        # copies: the step's larger tensors can be freed
        self.layers[i] = (k.contiguous().clone(), v.contiguous().clone())

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for kv in self.layers if kv is not None for t in kv)


class DiTLoadError(ValueError):
    """A weights file that is not a DiT of the asked-for shape: one line naming the file."""


def check_shapes(model: nn.Module, shapes: dict, path) -> None:
    """Raise DiTLoadError unless ``shapes`` ({key: shape}) are exactly the model's parameters."""
    why = state_mismatch(shapes_of(model), shapes)
    if why:
        raise DiTLoadError(f"{path}: not a Wan DiT of {_describe(model.config)} ({why})")


def _describe(c: DiTConfig) -> str:
    return (f"dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads, ffn {c.ffn_dim}, "
            f"in/out {c.in_dim}/{c.out_dim}, patch {c.patch_size}, text {c.text_dim}, freq {c.freq_dim}")


HEAD_DIM = 128
"""Every Wan 2.1 DiT's attention head width (1.3B: 1536 / 12, 14B: 5120 / 40): the head count is the
one shape a weights file cannot show (q, k and v are (dim, dim) whatever it is)."""


def config_from_shapes(shapes: dict, path="the weights") -> DiTConfig:
    """The DiTConfig of a file's tensor shapes ({key: shape}, the safetensors header): width, latent
    channels in and out, patch, ffn, prompt and time embedding widths, block count, and
    ``num_heads = dim // 128`` (:data:`HEAD_DIM`; a width under 128 gets one head). Raises
    DiTLoadError, one line naming the file, when the keys that carry them are absent."""
    try:
        dim, in_dim, *patch = shapes["patch_embedding.weight"]               # (dim, in, pt, ph, pw)
        text_dim = shapes["text_embedding.0.weight"][1]                      # (dim, text_dim)
        freq_dim = shapes["time_embedding.0.weight"][1]                      # (dim, freq_dim)
        ffn_dim = shapes["blocks.0.ffn.0.weight"][0]                         # (ffn, dim)
        head_out = shapes["head.head.weight"][0]                             # (out * pt*ph*pw, dim)
    except (KeyError, ValueError, IndexError):
        raise DiTLoadError(f"{path}: not a Wan DiT (no patch_embedding / text_embedding / time_embedding "
                           f"/ blocks.0.ffn / head.head weights to read its shape from)") from None
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    voxels = math.prod(patch) if len(patch) == 3 else 0
    if not voxels or head_out % voxels:
        raise DiTLoadError(f"{path}: not a Wan DiT (patch {tuple(patch)}, head rows {head_out})")
    try:
        return DiTConfig(dim=int(dim), in_dim=int(in_dim), out_dim=int(head_out // voxels),
                         ffn_dim=int(ffn_dim), text_dim=int(text_dim), freq_dim=int(freq_dim),
                         num_heads=max(1, int(dim) // HEAD_DIM), num_layers=layers,
                         patch_size=tuple(int(p) for p in patch))
    except ValueError as e:  # a width that is not whole heads of 128
        raise DiTLoadError(f"{path}: not a Wan DiT of heads of {HEAD_DIM} ({e})") from None


def read_shapes(path) -> dict:
    """{key: shape} from a safetensors file's header (no tensor read); DiTLoadError if unreadable."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DiTLoadError(f"{path}: cannot read it as a safetensors file ({first})") from None


def load_dit(path, config: DiTConfig | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None, attention: SelfAttentionFn = dense_attention) -> WanDiT:
    """WanDiT from a safetensors file with the published key names (FlashVSR's
    ``diffusion_pytorch_model_streaming_dmd.safetensors`` with the default config), loaded strictly.
    The header is checked first (no tensor is read from a file that does not fit); then the model
    is built on the meta device and takes the file's tensors as they are (no second copy), in the
    file's dtype unless ``dtype`` is given. Raises DiTLoadError (a ValueError), one line naming the
    file, for an unreadable file or missing / unexpected / mis-shaped keys."""
    path = Path(path)
    shapes = read_shapes(path)
    config = config or DiTConfig()
    with torch.device("meta"):
        model = WanDiT(config, attention=attention)
    check_shapes(model, shapes, path)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path), device="cpu"), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
