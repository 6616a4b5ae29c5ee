"""FlashVSR's streaming "tiny" inference (OpenImagingLab/FlashVSR, Apache-2.0:
``diffsynth/pipelines/flashvsr_tiny.py`` and ``examples/WanVSR/infer_flashvsr_tiny.py``), as
vsr_ddp's own code: LR frames in, x4 frames out, as a stream (the temporal model protocol of
vsr_ddp.models.temporal: :meth:`FlashVSRTiny.start`, :meth:`FlashVSRTiny.feed`).

What one read range goes through, as the original does it:

1. input preparation: each LR frame is upscaled x4 with PIL's bicubic (a = -0.5, horizontal pass,
   rounding to 8 bits, vertical pass, rounding: what ``Image.resize(BICUBIC)`` computes), scaled to
   [-1, 1], and the range is padded at its end with copies of its last frame (below);
2. the LQ projector (``decoder.LQProjector``) turns the upscaled frames into tokens, one token frame
   per 4 input frames, added to the DiT's tokens before its first block;
3. the DiT (``dit.WanDiT``) makes one denoising step at timestep 1000 from Gaussian noise with the
   fixed prompt embedding (``posi_prompt.pth``): latents = noise - prediction. It streams: a first
   step of 6 latent frames (3 frame pairs), then steps of 2, each block attending to the keys and
   values of up to ``kv_len`` earlier pairs (``dit.KVCache``) plus its own, through locality-
   constrained block-sparse attention (:class:`BlockSparseSelfAttention`) or dense attention;
4. the tiny conditional decoder (``decoder.TCDecoder``) turns the latents into frames, conditioned
   on the upscaled input frames, keeping its own per-layer memory across steps (the "full" mode:
   the Wan 2.1 VAE decoder, ``vae.WanVAEDecoder``, with its feature cache, in its place; the colour
   fix below is applied as in the tiny mode, not checked against the original's full pipeline);
5. colour correction: each output frame's per-channel mean and standard deviation are set to those
   of its upscaled input frame (AdaIN; the tiny pipeline's ``ColorCorrector(method='adain')``), then
   clamped to [-1, 1]; then ``(x + 1) * 127.5`` truncated to uint8, as the original's tensor2video.

Frame bookkeeping (:attr:`FlashVSRTiny.first_window`, ``step``, ``first_outputs``, ``latency``).
Output frame j stands for input frame j. The first step needs input frames 0..24 (25 =
``first_window``: 6 token frames = 1 + 4 * 6 frames) and yields outputs 0..20 (21 =
``first_outputs``: the decoder makes 4 frames per latent frame less the first 3). Step i >= 1 needs
8 more input frames, 8i + 17 .. 8i + 24 (``step`` = 8), and yields outputs 8i + 13 .. 8i + 20. So
in a stream an output comes out once the input 4 frames later has been fed (``latency`` = 4), the
first 21 of them together when frame 24 arrives. At the end of a read range (``last=True``) of n
frames, the range is padded with copies of its last frame to F = 8m + 1 frames, m = max(3,
ceil((n + 3) / 8)), the least that makes 8m - 3 >= n outputs, and the outputs are cut to n: every
frame comes out (:func:`padded_length`). Read ranges of 8m - 3 frames (21, 29, 37, ...) waste no
computation; each read range's start costs the first window.

Positions: the RoPE frame index of a latent frame is its index in the read range (0..5, then 4 + 2i
and 5 + 2i at step i, as the original) plus ``first_frame // 4`` (:meth:`FlashVSRTiny.start`; 0 by
default, so a range read alone counts from 0 as the original); it is computed, not read from a
table, so a range has no length limit (the original's table ends at 1024 latent frames: 4,096
input frames). RoPE is relative (a query-key score depends on the difference of their positions),
so the offset changes results only at the level of rounding; it is there so that a segment and the
whole run round alike. Memory does not grow with the range: the KV cache holds kv_len pairs per
block, the projector at most a few frames, the decoder one frame per memory block, and the input
buffer at most 32 upscaled frames (input is taken 8 frames at a time, whatever the piece size).

Segments (job=upscale, :attr:`FlashVSRTiny.reach`). A segment owning [s, e) is read from r = s - W
(W = job.warmup; frame 0 at the latest) to e + 9, its outputs before s dropped:

* the step grid: a whole run's steps yield outputs [0, 21), then [8i + 13, 8i + 21); a range read
  from r yields its steps' outputs at r + the same numbers, so only r on multiples of 8 lays its
  steps, latent frames and projector groups on the whole run's (``Reach.align`` = 8: segment starts
  are multiples of 8, and the warm-up is rounded up to one so read starts are too);
* the noise: latent frame j of a range from r ends on video frame r + 4j, and its noise is drawn
  from (seed, r + 4j) (:func:`latent_noise`), so a segment's latents get the whole run's noise;
* ``after`` = 9: the last owned output e - 1 (e a multiple of 8 relative to r, or the video's end)
  comes from the step with outputs [e - 3, e + 5), which needs input frames up to e + 8; reading one
  fewer pads that step with a copy of the last frame and changes e - 1 (measured: with e = 40 and
  read_end = e + 8 the outputs from 38 on differ; tests/test_flashvsr_job.py). A range shorter than
  the first window is padded up to 25 frames anyway, so job=upscale reads at least r + 25
  (:attr:`first_window`) where the video has them;
* ``exact``: a segment read from frame 0 runs the whole run's steps on the same frames, so its owned
  outputs are the whole run's bit for bit. From a later r the caches (the DiT's kv_len pairs per
  block, each block's keys depending on the block below over 3 more pairs; the decoder's memory; the
  projector's convolutions) start empty and the first step sees 3 frame pairs at once: the warm-up
  stands in. The past's reach is finite (about 3 pairs per block plus the decoder's), so a warm-up
  beyond it makes the whole run's frames exactly (a one-block model: 64 frames), but for 30 blocks
  that is hundreds of frames; the differences left fall fast (``python -m vsr_ddp.bench --jobs
  flashvsr-warmup``, random weights, a segment's first owned frame, uint8 levels, 30 blocks: W=0 max
  116 / mean 9.1, W=8 2 / 0.14, W=16 1 / 0.025, W=24 1 / 0.0056, W=32 1 / 0.0023, W=40 1 / 0.0007,
  W=48 1 / 0.0007, W=64 1 / 0.0004): ``default_warmup`` (job.warmup=auto) is 48, one step past the
  knee at 40 as a margin for trained weights, whose past may reach further than random ones'; it
  costs 48 / work.segment_frames (8% at 600).

Tiles (job.flashvsr.tile, tile_overlap; not in the original's streaming pipeline): frames larger
than a tile are cut into overlapping LR tiles (:func:`tile_grid`), each its own stream with its own
caches, positions and noise (the absolute-frame rule with the tile's place), so a segment and the
whole run agree tile by tile; the x4 outputs are colour-fixed per tile, blended with linear ramps in
the overlaps (:func:`blend_ramps`) and made uint8 once (:class:`FlashVSRTiny`: why, and the memory).
Each tile's sparse-attention budget is the original's for a video of the tile's size.

Deviations from the original, and why:

* frames are padded, not cropped: the upscaled frame is padded (replicating its edges) to multiples
  of 128 and the output cropped back to 4H x 4W (the original centre-crops the upscaled frame to
  multiples of 128, losing up to 127 pixels per side);
* the range end is padded to cover every frame (the original repeats the last frame 4 times and then
  drops frames down to 8m + 1: up to 7 input frames get no output);
* the noise is drawn per latent frame from a generator seeded by the seed and the frame's place in
  the video (:func:`latent_noise`; the original draws the whole clip's noise at once from one
  generator, which a stream read in segments cannot: the same distribution, other numbers);
* the colour correction's statistics are taken over the cropped frame, the part that is output (the
  original's frame has no padding);
* the bicubic upscaling computes PIL's weights in floating point (PIL: 22-bit fixed point), so a
  rare pixel may differ by one level.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..temporal import Reach
from .decoder import LQProjector, TCDecoder, load_lq_proj, load_tcdecoder
from .dit import (DiTConfig, KVCache, SelfAttentionFn, WanDiT, config_from_shapes, dense_attention, load_dit,
                  read_shapes)
from .sparse import (LOCAL_RANGE, SPARSE_RATIO, WINDOW, block_sparse_attention, draft_block_mask,
                     inference_topk, local_block_mask, pool_blocks, tile_block_mask, topk_ratio_for)
from .vae import WanVAEDecoder, load_wan_vae_decoder

SCALE = 4
MULTIPLE = 128        # the upscaled frame's height and width: whole blocks of 8 x 8 tokens of 16 pixels
FIRST_WINDOW = 25     # input frames of the first step (6 token frames)
FIRST_OUTPUTS = 21    # output frames of the first step
STEP = 8              # input (and output) frames of every later step (2 latent frames)
LATENCY = 4           # an output comes out once the input 4 frames after it has been fed
FIRST_LATENTS = 6     # latent frames of the first step
STEP_LATENTS = 2      # latent frames of every later step
TIMESTEP = 1000.0     # the one denoising step
KV_RATIO = 3.0        # the examples' kv_ratio: kv_len = int(kv_ratio) cached frame pairs
AFTER = 9             # frames a segment reads past its end (module docstring, "Segments")
DEFAULT_WARMUP = 48   # job.warmup=auto (module docstring, "Segments")
MIN_TILE = MULTIPLE // SCALE  # the least tile side (LR pixels): one block of 8 x 8 tokens after x4
TILE_OVERLAP = 16     # LR pixels neighbouring tiles share (job.flashvsr.tile_overlap's default)

FILES = {"dit": "diffusion_pytorch_model_streaming_dmd.safetensors", "lq_proj": "LQ_proj_in.ckpt",
         "decoder": "TCDecoder.ckpt", "prompt": "posi_prompt.pth"}
"""The published files of a FlashVSR folder (v1: JunhaoZhuang/FlashVSR, v1.1: JunhaoZhuang/FlashVSR-v1.1;
the prompt embedding is the original repository's examples/WanVSR/prompt_tensor/posi_prompt.pth)."""
VAE_FILE = "Wan2.1_VAE.pth"
"""The full mode's decoder, in place of FILES["decoder"] (the same repositories)."""


def latent_noise(seed: int, frames, channels: int, h: int, w: int,
                 place: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Gaussian noise (1, channels, len(frames), h, w) float32 on the CPU, latent frame j drawn from
    its own generator seeded by (seed, frames[j]): frames[j] is the absolute video frame the latent
    frame ends on (4j for a range read from frame 0; latent 0 stands for frame 0 alone). So a latent
    frame's noise depends on the seed and where it is in the video, never on where its read range
    started: a segment and the whole run draw the same noise for the same frames.

    ``place``: the (row, column) in LR pixels of the tile the noise is for (tiled streams,
    :func:`tile_grid`); a tile away from the frame's origin seeds with (seed, frame, row, column),
    so tiles of the same size do not all get the same noise (which would repeat any texture the noise
    makes at the tile stride); (0, 0), the whole frame's and the first tile's, keeps the untiled rule."""
    out = torch.empty(1, channels, len(frames), h, w)
    extra = [int(place[0]), int(place[1])] if tuple(place) != (0, 0) else []
    for j, frame in enumerate(frames):
        seeds = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(frame), *extra])
        key = int(seeds.generate_state(1, np.uint64)[0])
        out[0, :, j] = torch.randn(channels, h, w, generator=torch.Generator().manual_seed(key))
    return out


def padded_length(n: int) -> int:
    """Input frames a read range of n frames is computed as: 8m + 1 with m = max(3, ceil((n + 3) / 8)),
    the least such count whose 8m - 3 outputs cover the n frames (0 for an empty range)."""
    if n <= 0:
        return 0
    return 8 * max(3, -(-(n + 3) // 8)) + 1


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one axis of ``size`` LR pixels start: every ``tile - overlap`` pixels
    from 0 while a tile ends before the frame does, then one more shifted back to end on the frame's
    edge (``size - tile``), so every tile is whole; ``[0]`` for a frame no larger than a tile (one
    tile of the frame's size). ``tile`` 0: whole frames."""
    if tile <= 0 or size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def tile_grid(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """The tiles of an h x w LR frame, row by row: (top, left, height, width) in LR pixels, the
    product of :func:`tile_starts` along each axis (a side no larger than ``tile`` is one tile of
    that side's size)."""
    th, tw = (min(tile, h), min(tile, w)) if tile > 0 else (h, w)
    return [(y, x, th, tw) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)]


def blend_ramps(size: int, starts: list[int], tile: int, scale: int = SCALE) -> list[torch.Tensor]:
    """Each tile's blend weights along one axis of the x``scale`` output, (min(tile, size) * scale,)
    float32: 1 where the tile alone covers a pixel; where two neighbours overlap (the x``scale``
    pixels [a, b)), linear ramps (k + 0.5) / (b - a) for the later tile and (b - a - k - 0.5) / (b - a)
    for the earlier one at pixel a + k: they sum to 1, and neither reaches 0 or 1 inside the overlap.
    The frame's outer edges get no ramp. Computed as each tile's raw weight (the smaller of its
    ramps) divided by the sum of the raw weights at the pixel (float64), which is the ramp above
    where two tiles meet and still sums to 1 where an overlap larger than half a tile makes three."""
    side = min(tile, size) * scale if tile > 0 else size * scale
    ends = [s * scale + side for s in starts]
    x = torch.arange(size * scale, dtype=torch.float64) + 0.5                   # pixel centres
    raw = []
    for i, s in enumerate(starts):
        r = ((x >= s * scale) & (x < ends[i])).double()                           # (size * scale,)
        if i > 0 and ends[i - 1] > s * scale:                                     # ramp up
            r = torch.minimum(r, ((x - s * scale) / (ends[i - 1] - s * scale)).clamp(0, 1))
        if i + 1 < len(starts) and ends[i] > starts[i + 1] * scale:               # ramp down
            a = starts[i + 1] * scale
            r = torch.minimum(r, ((ends[i] - x) / (ends[i] - a)).clamp(0, 1))
        raw.append(r)
    total = torch.stack(raw).sum(0)                                               # > 0 everywhere
    return [(r / total)[s * scale:s * scale + side].float() for r, s in zip(raw, starts)]


# ------------------------------------------------------------------------------------------------
# Input preparation
# ------------------------------------------------------------------------------------------------

def _cubic(x: float, a: float = -0.5) -> float:
    """PIL's bicubic kernel (a = -0.5)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=8)
def _bicubic_matrix(n_in: int, scale: int) -> torch.Tensor:
    """(n_in * scale, n_in) float64: PIL's bicubic resampling weights for one axis (ImagingResample's
    precompute_coeffs when upscaling: support 2, taps outside the image dropped, each row normalised)."""
    n_out = n_in * scale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = (i + 0.5) / scale
        lo = max(int(center - 2 + 0.5), 0)
        hi = min(int(center + 2 + 0.5), n_in)
        w = [_cubic(x + lo - center + 0.5) for x in range(hi - lo)]
        total = sum(w)
        m[i, lo:hi] = torch.tensor([v / total for v in w], dtype=torch.float64)
    return m


def upscale_bicubic(frames: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """frames (T, H, W, 3) uint8 -> (T, 3, sH, sW) float32 in [0, 255], whole numbers: what PIL's
    ``resize((sW, sH), Image.BICUBIC)`` makes of each frame (horizontal pass, then vertical, each
    rounded to 8 bits)."""
    t, h, w, _ = frames.shape
    # float64: exact enough to round like PIL, and immune to TF32 matmuls
    x = frames.permute(0, 3, 1, 2).to(torch.float64)                     # (T, 3, H, W)
    mw = _bicubic_matrix(w, scale).to(x.device)                          # (sW, W)
    mh = _bicubic_matrix(h, scale).to(x.device)                          # (sH, H)
    x = torch.floor(x @ mw.T + 0.5).clamp_(0, 255)                       # (T, 3, H, sW)
    return torch.floor(mh @ x + 0.5).clamp_(0, 255).float()              # (T, 3, sH, sW)


# ------------------------------------------------------------------------------------------------
# The block-sparse self-attention hook
# ------------------------------------------------------------------------------------------------

def to_blocks(x: torch.Tensor, grid: tuple[int, int, int], num_heads: int) -> torch.Tensor:
    """Tokens (B, f*h*w, C) in (f, h, w) order -> (B, heads, L, D) in block order: the original's
    WindowPartition3D with windows (2, 8, 8), blocks row-major over (pair, row, col), each block's
    128 tokens in (frame, row, col) order."""
    f, h, w = grid
    wf, wh, ww = WINDOW
    b, _, c = x.shape
    x = x.view(b, f // wf, wf, h // wh, wh, w // ww, ww, num_heads, c // num_heads)
    x = x.permute(0, 7, 1, 3, 5, 2, 4, 6, 8)          # (B, heads, f/2, h/8, w/8, 2, 8, 8, D)
    return x.reshape(b, num_heads, f * h * w, c // num_heads)


def from_blocks(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of :func:`to_blocks`: (B, heads, L, D) -> (B, f*h*w, heads*D) in (f, h, w) order."""
    f, h, w = grid
    wf, wh, ww = WINDOW
    b, nh, _, d = x.shape
    x = x.view(b, nh, f // wf, h // wh, w // ww, wf, wh, ww, d)
    x = x.permute(0, 2, 5, 3, 6, 4, 7, 1, 8)          # (B, f/2, 2, h/8, 8, w/8, 8, heads, D)
    return x.reshape(b, f * h * w, nh * d)


class BlockSparseSelfAttention:
    """FlashVSR's streaming self-attention as a ``dit.SelfAttentionFn``: q of the step's tokens,
    k and v of the cached pairs then the step's, all cut into (2, 8, 8) blocks; a query block sees
    the key blocks in the local_range x local_range square around it (every frame pair), and of
    those only the draft top-k (per head and query frame pair) of the pooled scores survive, with
    the budget ``inference_topk(P, topk_ratio_for(H, W, sparse_ratio))`` of the original (H, W the
    upscaled frame's size: 16 pixels per token). Exact attention over the surviving blocks
    (``sparse.block_sparse_attention``: the CUDA kernel where it applies).

    ``draft=False`` skips the top-k and keeps every locally allowed block (not the original: with a
    window covering the whole grid the original's top-k still drops the least probable block; the
    switch is there to check the block plumbing against dense attention)."""

    def __init__(self, local_range: int = LOCAL_RANGE, sparse_ratio: float = SPARSE_RATIO,
                 draft: bool = True):
        self.local_range = local_range
        self.sparse_ratio = sparse_ratio
        self.draft = draft
        self._local: dict = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                 grid: tuple[int, int, int]) -> torch.Tensor:
        f, h, w = grid
        wf, wh, ww = WINDOW
        if f % wf or h % wh or w % ww or k.shape[1] % (h * w):
            raise ValueError(f"block-sparse attention needs whole (2, 8, 8) blocks, not the token grid "
                             f"{grid} with {k.shape[1]} keys")
        fk = k.shape[1] // (h * w)
        gh, gw = h // wh, w // ww
        key = (gh, gw, q.device)
        if key not in self._local:
            self._local[key] = local_block_mask(gh, gw, self.local_range, device=q.device)
        local = self._local[key]                          # (P, P) bool
        qb = to_blocks(q, grid, num_heads)                # (B, heads, Lq, D)
        kb = to_blocks(k, (fk, h, w), num_heads)          # (B, heads, Lk, D)
        vb = to_blocks(v, (fk, h, w), num_heads)          # (B, heads, Lk, D)
        if self.draft:
            topk = inference_topk(gh * gw, topk_ratio_for(16 * h, 16 * w, self.sparse_ratio))
            mask = draft_block_mask(pool_blocks(qb), pool_blocks(kb), local, topk)  # (B, heads, Nq, Nk)
        else:
            mask = tile_block_mask(local, f // wf, fk // wf)                          # (Nq, Nk)
        return from_blocks(block_sparse_attention(qb, kb, vb, mask), grid)


# ------------------------------------------------------------------------------------------------
# The streaming pipeline
# ------------------------------------------------------------------------------------------------

def _adain(hq: torch.Tensor, lq: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each frame's channels of hq (T, 3, H, W) moved to lq's per-frame, per-channel mean and std
    (population variance + eps), as the original's ``_adain``; in float32."""
    hq, lq = hq.float(), lq.float()
    hm, hv = hq.mean(dim=(2, 3), keepdim=True), hq.var(dim=(2, 3), unbiased=False, keepdim=True)
    lm, lv = lq.mean(dim=(2, 3), keepdim=True), lq.var(dim=(2, 3), unbiased=False, keepdim=True)
    return (hq - hm) / (hv + eps).sqrt() * (lv + eps).sqrt() + lm


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    """Output frames (n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8: ``(y + 1) * 127.5`` truncated, as
    the original's tensor2video."""
    y = ((y.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


class FlashVSRTiny:
    """FlashVSR's tiny pipeline as a stream: (T, H, W, 3) uint8 LR frames in, (T, 4H, 4W, 3) uint8
    out (module docstring: the steps and the frame bookkeeping).

    dit, lq_proj, decoder: the three networks (``load_flashvsr`` loads the published files); the DiT's
    self-attention hook is set here. ``decoder`` a ``vae.WanVAEDecoder`` in place of the TCDecoder is
    the "full" mode (:attr:`mode`): the latents decoded by the Wan 2.1 VAE, streamed with its feature
    cache (a step's 6 latent frames give 21 frames, later steps' 2 give 8, as the TCDecoder's), the
    LQ frames used only by the colour fix. prompt: the prompt embedding (1, S, text_dim) or (S, text_dim).
    sparse_ratio, local_range: the block-sparse attention's settings (the examples' 2.0 and 11);
    kv_ratio: cached frame pairs (int(kv_ratio), the examples' 3.0); attention: "sparse" (the
    original), "dense" (every query sees every cached and current key), or a ``SelfAttentionFn``;
    color_fix: the AdaIN colour correction (the examples': on); seed: the noise generator's seed
    (the examples': 0), re-seeded at every :meth:`start`.

    tile, tile_overlap: spatial tiles (0: whole frames, the original). Frames larger than ``tile``
    LR pixels on a side are cut into the overlapping tiles of :func:`tile_grid`, and each tile is a
    stream of its own (its own KV cache, projector, decoder memory and input buffer; RoPE positions
    from the tile's corner; the noise of :func:`latent_noise` with the tile's place), run one tile
    after another on each 8 input frames, so only one tile's activations exist at a time. Each
    tile's output is colour-fixed against its own upscaled input (below), the tiles' float outputs are
    blended with :func:`blend_ramps` and turned into uint8 once. A frame no larger than a tile is one
    tile: the untiled pipeline, bit for bit. Why the colour fix runs per tile: the AdaIN corrects
    the colour drift of the stream that made the pixels, and each tile's stream drifts on its own
    (its own noise, caches and context); matched to the same bicubic input, neighbouring tiles agree
    in colour before the blend, where one fix of the blended frame would leave each tile's own cast
    (the original has no spatial tiles in its streaming pipeline: its ``tiled`` options reach only
    the full pipeline's VAE). The cost: the per-tile state, which grows with the tile count; in
    bf16 with the published networks about 69,000 T^2 bytes of KV cache (30 blocks x keys and values x
    3 frame pairs x (T/4)^2 tokens per frame x 1536), 5,376 T^2 of decoder memory, about 700 T^2 in
    the projector and up to 11 upscaled input frames (1,056 T^2) per tile of T LR pixels (T a
    multiple of 32; measured with :meth:`cache_bytes`, one block of the published width, x30): 1.25 GB
    at T=128, 5.0 GB at T=256. The tiles' total state is about the untiled one's (plus the
    overlaps): tiles bound the activations (attention, FFN, projector, decoder), not the caches.
    """

    scale = SCALE
    first_window = FIRST_WINDOW
    first_outputs = FIRST_OUTPUTS
    step = STEP
    latency = LATENCY
    alignment = STEP  # read starts on multiples of 8 meet a whole run's step grid ("Segments")
    reach = Reach(before=0, after=AFTER, recurrent=True, exact=True, align=STEP)
    """For job=upscale's segment planning (module docstring, "Segments"): read starts on the whole
    run's step grid (align 8), 9 frames read past a segment's end, the caches' past stood in for by
    a warm-up, and a segment read from frame 0 equal to the whole run bit for bit (exact)."""
    supports_half = False
    """job.precision=auto picks bf16 on CUDA (the original runs bf16; fp16 is not checked for overflow)."""
    default_warmup = DEFAULT_WARMUP
    """``job.warmup: auto``'s number for FlashVSR (measured: module docstring, "Segments")."""
    decoder_frames_per_pass: int | None = 1
    """Latent frames the decoder runs through its layers at once (None: a step's all): 1 bounds its
    memory to 4 full-size frames of activations, as the original's frame-by-frame decoding."""

    def __init__(self, dit: WanDiT, lq_proj: LQProjector, decoder: TCDecoder, prompt: torch.Tensor, *,
                 sparse_ratio: float = SPARSE_RATIO, kv_ratio: float = KV_RATIO,
                 local_range: int = LOCAL_RANGE, attention: str | SelfAttentionFn = "sparse",
                 color_fix: bool = True, seed: int = 0, tile: int = 0, tile_overlap: int = TILE_OVERLAP):
        self.dit, self.lq_proj, self.decoder = dit.eval(), lq_proj.eval(), decoder.eval()
        if tile and (tile < MIN_TILE or not 0 <= tile_overlap < tile):
            raise ValueError(f"FlashVSRTiny: tile must be 0 or at least {MIN_TILE} and tile_overlap in "
                             f"[0, tile), not tile={tile}, tile_overlap={tile_overlap}")
        self.tile, self.tile_overlap = int(tile), int(tile_overlap)
        self.mode = "full" if isinstance(decoder, WanVAEDecoder) else "tiny"
        if attention == "sparse":
            self.attention: SelfAttentionFn = BlockSparseSelfAttention(local_range, sparse_ratio)
        elif attention == "dense":
            self.attention = dense_attention
        elif callable(attention):
            self.attention = attention
        else:
            raise ValueError(f"FlashVSRTiny: attention must be 'sparse', 'dense' or a function, "
                             f"not {attention!r}")
        dit.set_attention(self.attention)
        self.kv_len = int(kv_ratio)
        self.color_fix = color_fix
        self.seed = seed
        param = next(dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        prompt = torch.as_tensor(prompt)
        if prompt.ndim == 2:
            prompt = prompt[None]
        if prompt.ndim != 3 or prompt.shape[0] != 1 or prompt.shape[-1] != dit.config.text_dim:
            raise ValueError(f"FlashVSRTiny: the prompt embedding must be (1, S, {dit.config.text_dim}), "
                             f"not {tuple(prompt.shape)}")
        self._prompt = prompt
        self._cache = KVCache(dit.config.num_layers, self.kv_len)
        self.to(self.device, self.dtype)

    def to(self, device, dtype: torch.dtype = torch.bfloat16) -> "FlashVSRTiny":
        """Move the three networks to ``device`` in ``dtype`` (the original: bfloat16), recompute the
        fixed prompt's keys/values and the timestep's embeddings there, and :meth:`start`."""
        self.device, self.dtype = torch.device(device), dtype
        for net in (self.dit, self.lq_proj, self.decoder):
            net.to(device=self.device, dtype=dtype)
        with torch.no_grad():
            self._context_kv = self.dit.context_kv(self._prompt.to(device=self.device, dtype=dtype))
            self._t, self._t_mod = self.dit.embed_time(torch.tensor([TIMESTEP], device=self.device))
        self.start()
        return self

    def start(self, first_frame: int = 0) -> None:
        """Forget the read range: caches, buffers, positions and the noise. ``first_frame``: the
        absolute index in the video of the range's first frame (job=upscale passes a unit's
        read_start): each latent frame's noise is drawn from the seed and the absolute frame it ends
        on, and its RoPE position counts from ``first_frame // 4``, so a range read from a later
        frame of the step grid (a multiple of 8) gives its latents the whole run's noise and
        positions."""
        if first_frame < 0:
            raise ValueError(f"FlashVSRTiny.start: first_frame must be >= 0, not {first_frame}")
        self._frame_shape: tuple[int, int] | None = None  # (H, W) of the range's LR frames
        self._tiles: list[tuple[int, int, int, int]] | None = None  # tile_grid of them, once known
        self._streams: list[dict] = []              # each tile's stream state (_get_stream), > 1 tile
        self._weights: list[torch.Tensor] = []      # each tile's (4h, 4w) float32 blend weights
        self._reset_stream(int(first_frame))

    def _reset_stream(self, first_frame: int, place: tuple[int, int] = (0, 0)) -> None:
        """A fresh stream (the whole frame's, or one tile's at ``place``) in the attributes the
        stream code works on: caches, buffers, positions and the noise's frame and place."""
        self._first = first_frame
        self._place = place                          # (row, col) of the stream's tile: its noise
        self._cache = KVCache(self.dit.config.num_layers, self.kv_len)
        self.lq_proj.reset()
        if self.mode == "tiny":
            self.decoder.reset()
        self._vae_cache: dict = {}                   # the full mode's VAE feature cache
        self._shape: tuple[int, int] | None = None  # (H, W) of the stream's LR frames (tile)
        self._buf: torch.Tensor | None = None       # (n, 3, Hp, Wp) upscaled frames not yet done with
        self._buf_start = 0                          # range index of self._buf[0]
        self._fed = 0                                # LR frames fed in this range
        self._steps = 0                              # steps run in this range
        self._emitted = 0                            # output frames returned in this range

    _STREAM = ("_first", "_place", "_cache", "_vae_cache", "_shape", "_buf", "_buf_start", "_fed", "_steps",
               "_emitted")
    _LQ_STREAM = ("_started", "_pending_in", "_pending_mid", "_primed")

    def _get_stream(self) -> dict:
        """The current stream's state (references, no copies): this object's stream attributes, the
        projector's and the decoder's memory."""
        state = {a: getattr(self, a) for a in self._STREAM}
        state["lq_proj"] = {a: getattr(self.lq_proj, a) for a in self._LQ_STREAM}
        if self.mode == "tiny":
            state["decoder"] = self.decoder._memory
        return state

    def _set_stream(self, state: dict) -> None:
        """Make ``state`` (:meth:`_get_stream`) the current stream."""
        for a in self._STREAM:
            setattr(self, a, state[a])
        for a, v in state["lq_proj"].items():
            setattr(self.lq_proj, a, v)
        if self.mode == "tiny":
            self.decoder._memory = state["decoder"]

    def _stream_bytes(self, state: dict) -> int:
        """Bytes held by one stream's state tensors (:meth:`_get_stream`)."""
        tensors = [state["_buf"], *state["lq_proj"].values()]
        tensors += list((state["decoder"] if self.mode == "tiny" else state["_vae_cache"]).values())
        held = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return state["_cache"].nbytes() + held

    def cache_bytes(self) -> int:
        """Bytes held by the stream's state tensors (KV cache, projector, decoder, input buffer);
        tiled, those of every tile's stream."""
        if self._streams:
            return sum(self._stream_bytes(state) for state in self._streams)
        return self._stream_bytes(self._get_stream())

    @torch.no_grad()
    def feed(self, frames: np.ndarray, last: bool) -> np.ndarray:
        """frames: (T, H, W, 3) uint8, the next LR frames of the read range (T may be 0). Returns the
        (n, 4H, 4W, 3) uint8 outputs whose computation these frames complete, in order (maybe none);
        with ``last``, all outputs still owed (the range padded at its end), and the range is over:
        the next call starts a new one. Any split of a range into calls gives the same outputs."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"FlashVSRTiny.feed takes (T, H, W, 3) uint8 frames, not {frames.shape} "
                             f"{frames.dtype}")
        if len(frames):
            if self._frame_shape is None:
                self._frame_shape = frames.shape[1:3]
                self._start_tiles()
            elif frames.shape[1:3] != self._frame_shape:
                raise ValueError(f"FlashVSRTiny.feed: {frames.shape[1]}x{frames.shape[2]} frames after "
                                 f"{self._frame_shape[0]}x{self._frame_shape[1]} ones in one read range; "
                                 "call start() first")
        outs = []
        # a step's frames at a time: the input buffer, and a tiled call's float frames, stay small
        pieces = [frames[i:i + STEP] for i in range(0, len(frames), STEP)] or [frames]
        for i, piece in enumerate(pieces):
            end = last and i == len(pieces) - 1
            if self._streams:
                outs.append(self._feed_tiles(piece, end))
            else:
                outs.append(_to_uint8(self._feed_stream(piece, end)))
        h, w = self._frame_shape or (0, 0)
        outs = [o for o in outs if len(o)]
        out = np.concatenate(outs) if outs else np.zeros((0, h * SCALE, w * SCALE, 3), dtype=np.uint8)
        if last:
            self.start()
        return out

    def _start_tiles(self) -> None:
        """With ``tile`` set and a frame larger than a tile: a fresh stream per tile of the grid, and
        each tile's blend weights (:func:`blend_ramps`)."""
        h, w = self._frame_shape
        self._tiles = tile_grid(h, w, self.tile, self.tile_overlap)
        if len(self._tiles) == 1:
            return
        rows = blend_ramps(h, tile_starts(h, self.tile, self.tile_overlap), self.tile)
        cols = blend_ramps(w, tile_starts(w, self.tile, self.tile_overlap), self.tile)
        first = self._first
        for i, (top, left, _, _) in enumerate(self._tiles):
            self._reset_stream(first, (top, left))
            self._streams.append(self._get_stream())
            self._weights.append(rows[i // len(cols)][:, None] * cols[i % len(cols)][None, :])

    def _feed_tiles(self, frames: np.ndarray, last: bool) -> np.ndarray:
        """The next frames (T, H, W, 3) through every tile's stream in turn, their float outputs
        weighted and summed (float32, on the CPU), then uint8 once: (n, 4H, 4W, 3)."""
        h, w = self._frame_shape
        acc = None
        for i, (top, left, th, tw) in enumerate(self._tiles):
            self._set_stream(self._streams[i])
            y = self._feed_stream(frames[:, top:top + th, left:left + tw], last)   # (n, 3, 4th, 4tw)
            self._streams[i] = self._get_stream()
            if acc is None:
                acc = torch.zeros(len(y), 3, h * SCALE, w * SCALE)               # (n, 3, 4H, 4W)
            elif len(y) != len(acc):
                raise RuntimeError("FlashVSRTiny: tiles out of step")  # a bug
            r, c = top * SCALE, left * SCALE
            acc[:, :, r:r + th * SCALE, c:c + tw * SCALE] += y.float().cpu() * self._weights[i]
        return _to_uint8(acc)

    def _feed_stream(self, frames: np.ndarray, last: bool) -> torch.Tensor:
        """The current stream (the whole frame's or a tile's): its next LR frames (T, h, w, 3) uint8
        -> the float outputs (n, 3, 4h, 4w) in [-1, 1] they complete (float32 with the colour fix,
        else the model's dtype), on the model's device; with ``last`` all that are owed."""
        if len(frames):
            if self._shape is None:
                self._shape = frames.shape[1:3]
            elif frames.shape[1:3] != self._shape:  # a bug: feed() checks the frame size
                raise RuntimeError("FlashVSRTiny: a stream's frame size changed")
        outs = []
        if len(frames):
            self._append(self._prepare(frames))
            self._fed += len(frames)
            outs += self._run_ready()
        if last and self._fed:
            total = padded_length(self._fed)
            have = self._buf_start + len(self._buf)
            if total > have:
                self._append(self._buf[-1:].expand(total - have, -1, -1, -1))
            outs += self._run_ready()
        if self._buf is not None:
            self._buf = self._buf.clone()  # the frames still needed (at most 11), without the rest
        h, w = self._shape or (0, 0)
        out = (torch.cat(outs) if outs else
               torch.zeros(0, 3, h * SCALE, w * SCALE, device=self.device))
        keep = max(0, min(len(out), self._fed - self._emitted))
        self._emitted += keep
        return out[:keep]

    def _prepare(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, 3, Hp, Wp) in [-1, 1], the model dtype: bicubic x4, then padded
        (edges replicated) to multiples of 128."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = upscale_bicubic(x) / 255.0 * 2.0 - 1.0                      # (T, 3, 4H, 4W) float32
        ph, pw = -x.shape[-2] % MULTIPLE, -x.shape[-1] % MULTIPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x.to(self.dtype)

    def _append(self, x: torch.Tensor) -> None:
        self._buf = x.clone() if self._buf is None else torch.cat([self._buf, x])

    def _run_ready(self) -> list[np.ndarray]:
        """Run every step whose input frames are all buffered; returns their outputs."""
        outs = []
        while self._buf is not None:
            end = FIRST_WINDOW if self._steps == 0 else FIRST_WINDOW + STEP * self._steps
            if self._buf_start + len(self._buf) < end:
                break
            outs.append(self._step())
        return outs

    def _noise(self, first_latent: int, frames: int, h: int, w: int) -> torch.Tensor:
        """The step's noise (1, 16, frames, h, w) for the range's latent frames first_latent, ...:
        :func:`latent_noise` of each one's absolute frame, cast to the model's device and dtype."""
        keys = [self._first + 4 * j for j in range(first_latent, first_latent + frames)]
        noise = latent_noise(self.seed, keys, self.dit.config.in_dim, h, w, self._place)
        return noise.to(device=self.device, dtype=self.dtype)

    def _step(self) -> torch.Tensor:
        """One step of the original's loop (``cur_process_idx`` = i): the projector's frames, the DiT
        step, the decoder, the colour fix. Returns its (21 or 8, 3, 4H, 4W) outputs in [-1, 1]
        (float32 with the colour fix, else the model's dtype; :func:`_to_uint8` makes the frames)."""
        i = self._steps
        if i == 0:   # projector frames [0, 25), decoder condition [0, 21), latent frames 0..5
            p0, p1, c0, c1, n_lat, offset = 0, FIRST_WINDOW, 0, FIRST_OUTPUTS, FIRST_LATENTS, 0
        else:        # projector frames [8i+17, 8i+25), condition [8i+13, 8i+21), latents 4+2i, 5+2i
            p0 = FIRST_WINDOW + STEP * (i - 1)
            c0 = FIRST_OUTPUTS + STEP * (i - 1)
            p1, c1, n_lat, offset = p0 + STEP, c0 + STEP, STEP_LATENTS, 4 + 2 * i
        s = self._buf_start
        video = self._buf[p0 - s:p1 - s].transpose(0, 1)[None]          # (1, 3, n, Hp, Wp)
        cond = self._buf[c0 - s:c1 - s].transpose(0, 1)[None]           # (1, 3, m, Hp, Wp)
        pdtype = next(self.lq_proj.parameters()).dtype
        tokens = self.lq_proj.feed(video.to(pdtype))
        hp, wp = video.shape[-2:]
        if tokens is None or tokens[0].shape[1] != n_lat * (hp // 16) * (wp // 16):
            raise RuntimeError("FlashVSRTiny: the LQ projector's token frames are out of step")  # a bug
        tokens = [t.to(self.dtype) for t in tokens]
        noise = self._noise(offset, n_lat, hp // 8, wp // 8)            # (1, 16, n_lat, Hp/8, Wp/8)
        pred = self.dit.stream_step(noise, self._t, self._t_mod, self._context_kv, self._cache,
                                    lq_latents=tokens, frame_offset=offset + self._first // 4)
        latents = noise - pred                                           # (1, 16, n_lat, Hp/8, Wp/8)
        ddtype = next(self.decoder.parameters()).dtype
        if self.mode == "full":
            y = self.decoder.feed(latents.to(ddtype), self._vae_cache)   # (1, 3, c1 - c0, Hp, Wp)
        else:
            y = self.decoder.decode(latents.to(ddtype), cond.to(ddtype),
                                    self.decoder_frames_per_pass)        # (1, 3, c1 - c0, Hp, Wp)
        self._steps += 1
        keep = c1 - s   # the next step's condition starts at c1
        self._buf = self._buf[keep:]   # a view: feed() copies what is left once it has run the steps
        self._buf_start += keep
        h, w = self._shape
        y = y[0].transpose(0, 1)[..., :h * SCALE, :w * SCALE]           # (m, 3, 4H, 4W)
        if self.color_fix:
            y = _adain(y, cond[0].transpose(0, 1)[..., :h * SCALE, :w * SCALE]).clamp(-1, 1)
        return y


# ------------------------------------------------------------------------------------------------
# Loading the published files
# ------------------------------------------------------------------------------------------------

def load_prompt(path) -> torch.Tensor:
    """The prompt embedding from ``posi_prompt.pth``: ``torch.save`` of one tensor (1, S, text_dim)
    (the original passes ``torch.load``'s result straight to ``init_cross_kv``); a dict holding a single
    tensor and an (S, text_dim) tensor are accepted too. Read without unpickling code."""
    path = Path(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"FlashVSR prompt: cannot read {path} ({first})") from None
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor) or obj.ndim not in (2, 3) or (obj.ndim == 3 and obj.shape[0] != 1):
        what = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ValueError(f"FlashVSR prompt: {path} is not a (1, S, C) prompt embedding ({what})")
    return obj if obj.ndim == 3 else obj[None]


def load_flashvsr(folder, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, *,
                  version: str = "1.1", config: DiTConfig | None = None, mode: str = "tiny",
                  **options) -> FlashVSRTiny:
    """The tiny pipeline from a folder of the published files (:data:`FILES`), on ``device`` in
    ``dtype`` (the original runs bfloat16). ``version``: "1.1" (the causal LQ projector of
    FlashVSR-v1.1) or "1.0" (v1's per-group one); the files cannot tell. ``config``: the DiT's shape
    (None: read off the DiT file's header, ``dit.config_from_shapes``: the published file gives Wan 2.1
    1.3B). ``mode``: "tiny" (TCDecoder.ckpt) or "full" (the Wan 2.1 VAE decoder from
    :data:`VAE_FILE` in its place). ``options`` go to :class:`FlashVSRTiny`. A missing file
    raises a one-line ValueError naming the folder and the file; a file that does not fit, the
    loaders' one-line ValueErrors naming it."""
    folder = Path(folder)
    if version not in ("1.0", "1.1"):
        raise ValueError(f"FlashVSR: version must be '1.0' or '1.1', not {version!r}")
    if mode not in ("tiny", "full"):
        raise ValueError(f"FlashVSR: mode must be 'tiny' or 'full', not {mode!r}")
    names = dict(FILES, decoder=VAE_FILE) if mode == "full" else FILES
    for name in names.values():
        if not (folder / name).is_file():
            raise ValueError(f"FlashVSR folder {folder}: missing {name}")
    dit_path = folder / FILES["dit"]
    config = config or config_from_shapes(read_shapes(dit_path), dit_path)
    dit = load_dit(dit_path, config, device=device, dtype=dtype)
    lq_proj = load_lq_proj(folder / FILES["lq_proj"], causal=version == "1.1").to(device=device, dtype=dtype)
    if mode == "full":
        decoder = load_wan_vae_decoder(folder / VAE_FILE, device=device, dtype=dtype)
    else:
        decoder = load_tcdecoder(folder / FILES["decoder"]).to(device=device, dtype=dtype)
    prompt = load_prompt(folder / FILES["prompt"])
    return FlashVSRTiny(dit, lq_proj, decoder, prompt, **options)


def random_flashvsr(config: DiTConfig | None = None, *, lq_hidden: tuple[int, int] | None = None,
                    decoder_channels: tuple[int, int, int, int] | None = None, prompt_tokens: int = 512,
                    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    **options) -> FlashVSRTiny:
    """A FlashVSRTiny of random weights (PyTorch's initialisation, from ``seed``), built on ``device``
    with no file: ``config`` None is the published Wan 2.1 1.3B, ``lq_hidden`` / ``decoder_channels``
    None the published projector and decoder; smaller ones make the tiny models of tests and of the
    CPU benchmark. ``options`` go to :class:`FlashVSRTiny`. For timing and for the segment
    measurements (module docstring, "Segments"): random weights make no meaningful picture."""
    from .decoder import DECODER_CHANNELS, LQ_HIDDEN

    config = config or DiTConfig()
    torch.manual_seed(seed)
    with torch.device(device):
        dit = WanDiT(config)
        lq_proj = LQProjector(out_dim=config.dim, hidden=lq_hidden or LQ_HIDDEN)
        decoder = TCDecoder(channels=decoder_channels or DECODER_CHANNELS, latent_channels=config.out_dim)
        prompt = torch.randn(1, prompt_tokens, config.text_dim)
    for net in (dit, lq_proj, decoder):
        net.to(dtype=dtype)
    return FlashVSRTiny(dit, lq_proj, decoder, prompt, **options)


__all__ = ["FlashVSRTiny", "random_flashvsr", "BlockSparseSelfAttention", "load_flashvsr", "load_prompt",
           "padded_length", "latent_noise", "VAE_FILE", "upscale_bicubic", "FILES", "to_blocks",
           "from_blocks", "tile_starts", "tile_grid", "blend_ramps", "MIN_TILE", "TILE_OVERLAP"]
