"""FRESCO's self-attention processor, installed through diffusers' own hook
(``unet.set_attn_processor``), and the per-step state it shares with the decoder hooks."""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from .guidance import Guidance


class FrescoControl:
    """State shared by the FRESCO processors and decoder hooks of one UNet. The pipeline sets it
    before each UNet call; with everything off the processors are plain SDPA attention."""

    def __init__(self):
        self.frames = 1  # frames per CFG half: hidden states come as (chunk * frames, L, C)
        self.cross_frame = False
        self.spatial = False
        self.temporal = False
        self.store = False  # reference pass: keep each processor's self-attention input
        self.stored: dict[str, torch.Tensor] = {}
        self.guidance: Guidance | None = None
        self.spatial_scale = 0.2  # FRESCO's intraattn_scale_factor
        self.spatial_bias = 0.0  # FRESCO's intraattn_bias
        self.temporal_scale = 0.2  # FRESCO's interattn_scale_factor
        # decoder blocks
        self.capture: dict[int, torch.Tensor] | None = None  # block index -> input, on the reference pass
        self.optimize = False
        self.opt_layers: tuple = (0, 1, 2, 3)
        self.correlations: dict[int, torch.Tensor] = {}  # block index -> (B, L, L) float32
        self.opt: dict = {}  # optimize_feature keyword arguments
        self.calls: Counter = Counter()  # which parts ran, for logs and tests

    def reset(self) -> None:
        self.cross_frame = self.spatial = self.temporal = self.store = self.optimize = False
        self.stored, self.correlations, self.capture, self.guidance = {}, {}, None, None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # (B, L, h*d) -> (B, h, L, d)
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _shared_tokens(x: torch.Tensor, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """Cross-frame keys/values: the tokens ``mask`` selects across the whole batch, given to every
    frame. # (chunk * F, L, C), (F, L) bool -> (chunk * F, M, C)."""
    b, n, c = x.shape
    chunk = b // frames
    picked = x.view(chunk, frames * n, c)[:, mask.flatten()]  # (chunk, M, C)
    return picked[:, None].expand(chunk, frames, -1, c).reshape(b, -1, c)


def temporal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, path: tuple,
                       frames: int, heads: int, scale: float) -> torch.Tensor:
    """FRESCO's flow-guided attention (from FLATTEN): each token attends to the tokens on its
    trajectory in the other frames.

    query, key: # (chunk * F, L, C) projections of the self-attention input; value: (chunk * F,
    heads, L, d), the output of the spatial attention. Returns (chunk * F, heads, L, d).
    """
    fwd, bwd, mask = path  # (F, 1, L), (F, 1, L), (L, 1, F, F)
    b, n, c = query.shape
    chunk, d = b // frames, c // heads

    def along(x):  # (chunk * F, L, C) -> (chunk * L, heads, F, d), trajectory-major
        idx = fwd.view(1, frames, n, 1).expand(chunk, -1, -1, c)
        x = torch.gather(x.reshape(chunk, frames, n, c), 2, idx)
        return x.permute(0, 2, 1, 3).reshape(chunk * n, frames, heads, d).transpose(1, 2)

    v = value.transpose(1, 2).reshape(b, n, c)
    out = F.scaled_dot_product_attention(along(query), along(key) * scale, along(v),
                                         attn_mask=mask.repeat(chunk, 1, 1, 1))  # (chunk * L, heads, F, d)
    out = out.transpose(1, 2).reshape(chunk, n, frames, c).permute(0, 2, 1, 3)  # (chunk, F, L, C)
    out = torch.gather(out, 2, bwd.view(1, frames, n, 1).expand(chunk, -1, -1, c))  # back to token order
    return out.reshape(b, n, heads, d).transpose(1, 2)


class FrescoAttnProcessor:
    """Self-attention with FRESCO's guidance (``AttnProcessor2_0`` otherwise): install with
    ``unet.set_attn_processor({...})`` (:func:`install_fresco_processors`)."""

    def __init__(self, control: FrescoControl, name: str):
        self.control = control
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        c = self.control
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        b, n, _ = hidden_states.shape  # (B, L, C) with B = chunk * frames
        cross = encoder_hidden_states is not None
        if attention_mask is not None:
            src_len = encoder_hidden_states.shape[1] if cross else n
            attention_mask = attn.prepare_attention_mask(attention_mask, src_len, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else \
                encoder_hidden_states
        else:
            context = hidden_states
            if c.store:
                c.stored[self.name] = hidden_states.detach()
                c.calls["store"] += 1

        q_proj = attn.to_q(hidden_states)  # (B, L, C)
        k_proj = attn.to_k(context)
        v_proj = attn.to_v(context)
        heads = attn.heads
        frames = c.frames
        guide = c.guidance
        key, value = k_proj, v_proj
        if not cross and c.cross_frame and guide is not None and n in guide.masks and b % frames == 0:
            key = _shared_tokens(k_proj, guide.masks[n], frames)
            value = _shared_tokens(v_proj, guide.masks[n], frames)
            c.calls["cross_frame"] += 1
        query = _split_heads(q_proj, heads)
        key = _split_heads(key, heads)
        value = _split_heads(value, heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        ref = c.stored.get(self.name)
        if not cross and c.spatial and ref is not None and ref.shape == hidden_states.shape:
            # Spatial-guided attention: re-express each query through the input frame's own
            # self-similarity, so the new frame keeps the input's layout.
            q_ref = _split_heads(attn.to_q(ref), heads)
            k_ref = _split_heads(attn.to_k(ref), heads)
            bias = None
            if c.spatial_bias:
                bias = torch.eye(n, dtype=query.dtype, device=query.device) * c.spatial_bias
            query = F.scaled_dot_product_attention(q_ref, k_ref * c.spatial_scale, query, attn_mask=bias)
            c.calls["spatial"] += 1

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)  # (B, heads, L, d)
        if not cross and c.temporal and guide is not None and n in guide.paths and b % frames == 0:
            out = temporal_attention(q_proj, k_proj, out, guide.paths[n], frames, heads, c.temporal_scale)
            c.calls["temporal"] += 1

        out = out.transpose(1, 2).reshape(b, n, -1).to(q_proj.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def fresco_levels(unet) -> list[int]:
    """The last two decoder levels (``up_blocks``), where FRESCO guides the attention."""
    n = len(unet.up_blocks)
    levels = [i for i in (n - 2, n - 1) if i >= 0 and getattr(unet.up_blocks[i], "attentions", None)]
    if len(levels) != 2:
        raise ValueError("FRESCO needs a UNet whose last two decoder levels have attention "
                         "(CrossAttnUpBlock2D, as Stable Diffusion 1.5's)")
    return levels


def install_fresco_processors(unet, control: FrescoControl) -> list[str]:
    """``FrescoAttnProcessor`` on the self-attention (attn1) of the last two decoder levels,
    ``AttnProcessor2_0`` (SDPA) everywhere else. Returns the names given FRESCO processors."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    prefixes = tuple(f"up_blocks.{i}." for i in fresco_levels(unet))
    plain = AttnProcessor2_0()
    procs, fresco = {}, []
    for name in unet.attn_processors:
        if name.startswith(prefixes) and ".attn1." in name:
            procs[name] = FrescoAttnProcessor(control, name)
            fresco.append(name)
        else:
            procs[name] = plain
    unet.set_attn_processor(procs)
    return fresco
