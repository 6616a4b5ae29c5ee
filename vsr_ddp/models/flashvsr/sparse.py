"""FlashVSR's locality-constrained block-sparse self-attention (LCSA), as vsr_ddp's own code.

FlashVSR cuts the DiT's token grid into blocks of 128 tokens, each a 3-D window of 2 latent frames
x 8 x 8 latent tokens (``WINDOW``), so a latent frame pair of h x w tokens is a (h//8, w//8) grid
of P blocks, numbered row-major (block (r, c) is r * (w//8) + c). The query blocks of one step are
Tq frame pairs of P blocks, the key blocks Tk frame pairs (the cached past pairs first, the
current ones last). Which key blocks a query block attends to is decided per head, in two stages:

1. locality (:func:`local_block_mask`): a query block at (r, c) may only look at key blocks whose
   (row, col) lies in a local_range x local_range square around (r, c), in every frame pair alike
   (:func:`tile_block_mask`). Keys are never restricted in time: every query frame pair sees all
   cached and current pairs. This bounds the receptive field, which is what lets a model trained
   on small crops run at 4K without the attention spreading thinner than it learned.
2. a draft top-k (:func:`draft_block_mask`): each block's queries and keys are mean-pooled
   (:func:`pool_blocks`), the pooled scores are softmax-normalised over the locally allowed key
   blocks, and per (head, query frame pair) only the ``topk`` largest of those probabilities,
   compared across all P query blocks at once, survive.

:func:`block_sparse_attention` then runs exact attention restricted to the surviving 128 x 128
blocks: through the ``block_sparse_attn`` CUDA kernel (mit-han-lab/Block-Sparse-Attention, the one
the original requires) when it imports and the tensors suit it, else through an exact dense
fallback with the block mask expanded to tokens. The inference settings the original ships are
in :func:`inference_topk`, :func:`topk_ratio_for` and :func:`trim_kv_cache`.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BLOCK_SIZE = 128
"""Tokens per block, for queries and keys alike: the kernel's fixed 128 x 128 tile."""

WINDOW = (2, 8, 8)
"""(latent frames, token rows, token cols) of one block: 2 * 8 * 8 = BLOCK_SIZE tokens."""

LOCAL_RANGE = 11
"""Side of the local square in blocks in the original's examples (9 is its pipeline default:
"9 gives sharper details, 11 more stable results")."""

SPARSE_RATIO = 2.0
"""The examples' sparse_ratio (1.5 is faster; 2.0 more stable); see :func:`topk_ratio_for`."""

KV_LEN = 3
"""Past frame pairs kept in the streaming key/value cache at inference (kv_ratio=3.0)."""


@torch.no_grad()
def local_block_mask(grid_h: int, grid_w: int, window_h: int, window_w: int | None = None, *,
                     include_self: bool = True, clamp: bool = False,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Which blocks of a (grid_h, grid_w) block grid each block may attend to, in one frame pair.

    The rule: query block (r, c) sees key block (r2, c2) iff r2 lies in the rows
    [r - window_h // 2, r - window_h // 2 + window_h - 1] and c2 in the columns
    [c - window_w // 2, c - window_w // 2 + window_w - 1]. An odd window is centred on the query;
    an even one reaches one block further back than forward (window 4 covers r-2 .. r+1).

    clamp=False is the "normal slide" the original's self-attention uses: the square is cut off
    at the grid's edges, so edge and corner blocks see fewer blocks. clamp=True is the original's
    other, unused variant: the square is shifted back inside the grid (start clamped to
    [0, grid - window]) so every block sees a full window_h x window_w square; where the grid is
    smaller than the window every block sees the whole grid.

    include_self=False removes each block from its own set. With include_self=True and a window
    of at least 1, no row is empty, which is what keeps the draft's softmax free of NaN.

    Returns (P, P) bool, P = grid_h * grid_w, blocks numbered row-major (r * grid_w + c), rows
    the query block, columns the key block.
    """
    window_w = window_h if window_w is None else window_w
    if grid_h < 1 or grid_w < 1 or window_h < 1 or window_w < 1:
        raise ValueError(f"grid ({grid_h}, {grid_w}) and window ({window_h}, {window_w}) must be >= 1")
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)  # (P,) row of each block
    cols = torch.arange(grid_w, device=device).repeat(grid_h)  # (P,) column of each block

    def span(pos: torch.Tensor, window: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = pos - window // 2
        if clamp:
            # max then min, as torch.clamp does when the upper bound is below the lower one.
            start = torch.minimum(start.clamp(min=0), torch.full_like(start, size - window))
        return start, start + window - 1

    r0, r1 = span(rows, window_h, grid_h)
    c0, c1 = span(cols, window_w, grid_w)
    in_rows = (rows[None, :] >= r0[:, None]) & (rows[None, :] <= r1[:, None])  # (P, P) bool
    in_cols = (cols[None, :] >= c0[:, None]) & (cols[None, :] <= c1[:, None])  # (P, P) bool
    mask = in_rows & in_cols  # (P, P) bool
    if not include_self:
        mask.fill_diagonal_(False)
    return mask


def tile_block_mask(local: torch.Tensor, q_windows: int, k_windows: int) -> torch.Tensor:
    """The per-frame-pair ``local`` mask repeated over Tq query and Tk key frame pairs.

    Query block x * P + a (frame pair x, position a) sees key block y * P + b iff local[a, b],
    whatever x and y: locality is spatial only, every query pair sees every key pair.

    local: (P, P) bool. Returns (Tq * P, Tk * P) bool.
    """
    return local.repeat(q_windows, k_windows)


def pool_blocks(x: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Mean of each run of ``block_size`` consecutive tokens: the block summaries the draft scores.

    x: (B, H, L, D) with tokens already in block order (each block's tokens contiguous). A last,
    partial block (L not a multiple of block_size, which FlashVSR never makes) is averaged over
    the tokens it has. The mean is taken in x's dtype, as the original does.

    Returns (B, H, ceil(L / block_size), D).
    """
    b, h, length, d = x.shape
    full = length // block_size
    parts = []
    if full:
        parts.append(x[:, :, :full * block_size].reshape(b, h, full, block_size, d).mean(dim=3))
    if length % block_size:
        parts.append(x[:, :, full * block_size:].mean(dim=2, keepdim=True))
    return torch.cat(parts, dim=2)


@torch.no_grad()
def draft_block_scores(q_pooled: torch.Tensor, k_pooled: torch.Tensor,
                       local: torch.Tensor) -> torch.Tensor:
    """Softmax over the locally allowed key blocks of the pooled scores q . k / sqrt(D).

    q_pooled: (B, H, Tq * P, D), k_pooled: (B, H, Tk * P, D), local: (P, P) bool. Key blocks the
    local rule forbids get probability 0. Every row of ``local`` must allow at least one key
    block (include_self guarantees it): an empty row would make the softmax NaN.

    Returns (B, H, Tq * P, Tk * P) float32.
    """
    p = local.shape[0]
    nq, nk = q_pooled.shape[-2], k_pooled.shape[-2]
    if local.shape != (p, p) or nq % p or nk % p:
        raise ValueError(f"{nq} query and {nk} key blocks are not whole frame pairs of the "
                         f"{tuple(local.shape)} local mask")
    if not bool(local.any(dim=-1).all()):
        raise ValueError("every block must see at least one block (use include_self=True)")
    allowed = tile_block_mask(local.to(q_pooled.device), nq // p, nk // p)  # (Nq, Nk) bool
    d = q_pooled.shape[-1]
    # Product and scaling in the inputs' dtype, softmax in float32, as the original does.
    scores = (q_pooled @ k_pooled.transpose(-1, -2) / math.sqrt(d)).float()  # (B, H, Nq, Nk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1)  # (B, H, Nq, Nk) float32


@torch.no_grad()
def topk_block_mask(probs: torch.Tensor, topk: int, q_windows: int) -> torch.Tensor:
    """Keep the ``topk`` largest draft probabilities of each (batch, head, query frame pair).

    The selection is not per query block: the P x Nk probabilities of one query frame pair
    (all its query blocks against all key blocks) are ranked together. With k = min(topk, n - 1),
    n = P * Nk, the threshold is the (k + 1)-th largest value and only values strictly above it
    are kept, so
      * without ties exactly k blocks are kept; values tied at the threshold are all dropped,
        so ties can leave fewer than k;
      * a topk at least the number of allowed blocks keeps every allowed block (the threshold is
        then a forbidden block's 0), except where nothing is forbidden: then the smallest
        value(s) still go, since k <= n - 1;
      * a query block can lose all its key blocks when its probabilities are flatter than its
        neighbours'; the kernel (and :func:`block_sparse_attention`) then outputs zeros for it.

    probs: (B, H, Tq * P, Nk) float. Returns (B, H, Tq * P, Nk) bool.
    """
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")
    b, h, nq, nk = probs.shape
    if nq % q_windows:
        raise ValueError(f"{nq} query blocks do not split into {q_windows} frame pairs")
    slab = probs.reshape(b, h, q_windows, (nq // q_windows) * nk)  # (B, H, Tq, P * Nk)
    k = min(topk, slab.shape[-1] - 1)
    threshold = torch.topk(slab, k + 1, dim=-1).values[..., -1:]  # (B, H, Tq, 1)
    return (slab > threshold).reshape(b, h, nq, nk)  # (B, H, Nq_blocks, Nk_blocks) bool


@torch.no_grad()
def draft_block_mask(q_pooled: torch.Tensor, k_pooled: torch.Tensor, local: torch.Tensor,
                     topk: int) -> torch.Tensor:
    """The block mask FlashVSR's self-attention runs with: local rule, then the draft top-k.

    q_pooled: (B, H, Tq * P, D) and k_pooled: (B, H, Tk * P, D), the :func:`pool_blocks` of the
    queries and of the keys (cached pairs first); local: (P, P) bool from
    :func:`local_block_mask`. The original only takes B == 1; here batch entries are independent.

    Returns (B, H, Tq * P, Tk * P) bool: the ``block_mask`` of :func:`block_sparse_attention`.
    """
    probs = draft_block_scores(q_pooled, k_pooled, local)  # (B, H, Nq, Nk) float32
    return topk_block_mask(probs, topk, q_pooled.shape[-2] // local.shape[0])


def inference_topk(blocks_per_window: int, topk_ratio: float) -> int:
    """The original inference's top-k budget per (head, query frame pair): int(P * P * ratio) - 1.

    (Its training forward uses min(max(int(P * P * 2.0), 1), P * P * Tq - 1) instead.)
    """
    return int(blocks_per_window * blocks_per_window * topk_ratio) - 1


def topk_ratio_for(height: int, width: int, sparse_ratio: float = SPARSE_RATIO) -> float:
    """The examples' topk_ratio for a height x width output: sparse_ratio * 768 * 1280 / (h * w).

    With P = h * w / 128**2 blocks, the budget P * P * ratio is sparse_ratio * 60 * P: about
    sparse_ratio * 60 key blocks per query block at every resolution (60 blocks = one
    768 x 1280 frame pair).
    """
    return sparse_ratio * 768 * 1280 / (height * width)


def trim_kv_cache(k: torch.Tensor, v: torch.Tensor, window_tokens: int,
                  kv_len: int = KV_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys/values a streaming step hands to the next one, by the original's rule.

    k, v: (B, H, L, D), this step's keys (cached pairs first, then the current ones), L a multiple
    of window_tokens = P * BLOCK_SIZE (one frame pair). If they hold more than kv_len frame pairs,
    the oldest ONE pair is dropped; otherwise all are kept. At inference the first step has 3
    pairs and each later step adds one, so with kv_len=3 a step attends to 3 cached pairs plus its
    own and passes on the newest 3. (A cache over kv_len + 1 pairs shrinks by one per step only.)
    """
    if k.shape[-2] % window_tokens:
        raise ValueError(f"{k.shape[-2]} cached tokens are not whole frame pairs of {window_tokens}")
    if k.shape[-2] // window_tokens > kv_len:
        return k[:, :, window_tokens:], v[:, :, window_tokens:]
    return k, v


@functools.lru_cache(maxsize=1)
def _kernel():
    """block_sparse_attn_func, or None where the package (a CUDA build) does not import."""
    try:
        from block_sparse_attn import block_sparse_attn_func
    except Exception:  # not installed, or built for another torch/CUDA: use the fallback
        return None
    return block_sparse_attn_func


def _kernel_suits(q: torch.Tensor, block_size: int) -> bool:
    return (block_size == BLOCK_SIZE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (32, 64, 128) and _kernel() is not None)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Attention where query token i sees key token j iff block_mask[..., i // bs, j // bs].

    q: (B, H, Lq, D), k and v: (B, H, Lk, D); block_mask: bool, broadcastable to
    (B, H, ceil(Lq / bs), ceil(Lk / bs)): a last, partial block covers the tokens that exist, as
    in the kernel. Scale 1 / sqrt(D). A query block with no key block gets zeros, as the kernel
    writes (the draft top-k can make such rows).

    Runs the block_sparse_attn kernel (the original's) for fp16/bf16 CUDA tensors with head size
    32, 64 or 128 and block_size 128 when the package imports; otherwise
    :func:`masked_block_attention`, exact up to floating-point order. Returns (B, H, Lq, D).
    """
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    if k.shape != (b, h, lk, d) or v.shape[:-1] != (b, h, lk):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    blocks = (b, h, -(-lq // block_size), -(-lk // block_size))
    try:
        block_mask = block_mask.to(torch.bool).expand(blocks)  # (B, H, Nq_blocks, Nk_blocks) bool
    except RuntimeError:
        raise ValueError(f"block_mask {tuple(block_mask.shape)} does not fit {blocks}") from None
    if _kernel_suits(q, block_size) and v.shape[-1] == d:
        return _kernel_attention(q, k, v, block_mask)
    return masked_block_attention(q, k, v, block_mask, block_size)


def _kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      block_mask: torch.Tensor) -> torch.Tensor:
    """The block_sparse_attn call of the original, batched through cumulative sequence lengths."""
    b, h, lq, d = q.shape
    lk = k.shape[-2]

    def packed(x: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (B * L, H, D)
        return x.transpose(1, 2).reshape(-1, h, x.shape[-1])

    steps = torch.arange(b + 1, device=q.device, dtype=torch.int32)
    out = _kernel()(
        packed(q), packed(k), packed(v),
        steps * lq, steps * lk,
        torch.ones(h, device=q.device, dtype=torch.int32),  # every head block-sparse, its own mask
        None, block_mask.contiguous(), lq, lk, 0.0,
        deterministic=False, softmax_scale=None, is_causal=False, exact_streaming=False,
        return_attn_probs=False,
    )  # (B * Lq, H, D)
    return out.reshape(b, lq, h, d).transpose(1, 2)


def masked_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                           block_size: int = BLOCK_SIZE, max_mask_elements: int = 1 << 26) -> torch.Tensor:
    """The exact fallback: dense scaled-dot-product attention under the token-expanded block mask.

    Same arguments as :func:`block_sparse_attention` (block_mask already (B, H, Nq_blocks,
    Nk_blocks)). Query blocks are processed in runs whose token mask holds at most
    max_mask_elements entries, so memory stays bounded at video sizes; rows are independent, so
    the runs change nothing. Query blocks with no key block get zeros instead of NaN.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    nq = block_mask.shape[-2]
    key_block = torch.arange(lk, device=q.device) // block_size  # (Lk,) block of each key token
    run = max(1, max_mask_elements // max(1, b * h * block_size * lk))
    outs = []
    for i0 in range(0, nq, run):
        rows = block_mask[:, :, i0:i0 + run]  # (B, H, n, Nk_blocks) bool
        t0, t1 = i0 * block_size, min(lq, (i0 + run) * block_size)
        query_block = torch.arange(t0, t1, device=q.device) // block_size - i0  # (t,) local block
        token_mask = rows[:, :, query_block][..., key_block]  # (B, H, t, Lk) bool
        empty = ~token_mask.any(dim=-1, keepdim=True)  # (B, H, t, 1) bool
        out = F.scaled_dot_product_attention(q[:, :, t0:t1], k, v, attn_mask=token_mask | empty)
        outs.append(out.masked_fill(empty, 0.0))
    return torch.cat(outs, dim=2)
