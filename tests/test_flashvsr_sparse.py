"""FlashVSR's block-sparse attention (vsr_ddp/models/flashvsr/sparse.py): the mask rules against
tables written by hand from the rules in words, and the dense fallback against attention computed
directly. Everything here runs on the CPU in a few seconds."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vsr_ddp.models.flashvsr import sparse


def allowed_sets(mask: torch.Tensor) -> dict[int, set[int]]:
    """{query block: set of key blocks} of a (Nq, Nk) bool mask."""
    return {i: set(torch.nonzero(row).flatten().tolist()) for i, row in enumerate(mask)}


# A 3 x 4 block grid, numbered row-major:
#    0  1  2  3
#    4  5  6  7
#    8  9 10 11
GRID_3x4_ALL = set(range(12))

# local_range 3, normal slide: the 3 x 3 square centred on the block, cut off at the grid's edges.
SLIDE_3x4_WIN3 = {
    0: {0, 1, 4, 5},
    1: {0, 1, 2, 4, 5, 6},
    2: {1, 2, 3, 5, 6, 7},
    3: {2, 3, 6, 7},
    4: {0, 1, 4, 5, 8, 9},
    5: {0, 1, 2, 4, 5, 6, 8, 9, 10},
    6: {1, 2, 3, 5, 6, 7, 9, 10, 11},
    7: {2, 3, 6, 7, 10, 11},
    8: {4, 5, 8, 9},
    9: {4, 5, 6, 8, 9, 10},
    10: {5, 6, 7, 9, 10, 11},
    11: {6, 7, 10, 11},
}

# local_range 3, clamped (the unused variant): the square slides back inside the grid. Rows: the
# grid has exactly 3, so always all of them. Columns: start = clamp(c - 1, 0, 4 - 3), so columns
# 0 and 1 see columns 0..2, columns 2 and 3 see columns 1..3.
LEFT_3 = {0, 1, 2, 4, 5, 6, 8, 9, 10}
RIGHT_3 = {1, 2, 3, 5, 6, 7, 9, 10, 11}
CLAMP_3x4_WIN3 = {q: LEFT_3 if q % 4 < 2 else RIGHT_3 for q in range(12)}

# A 2 x 3 grid with local_range 2 (even): rows [r - 1, r], columns [c - 1, c].
#    0 1 2
#    3 4 5
SLIDE_2x3_WIN2 = {0: {0}, 1: {0, 1}, 2: {1, 2}, 3: {0, 3}, 4: {0, 1, 3, 4}, 5: {1, 2, 4, 5}}
# Clamped: rows start at clamp(r - 1, 0, 0) = 0 (both rows); columns at clamp(c - 1, 0, 1).
CLAMP_2x3_WIN2 = {0: {0, 1, 3, 4}, 1: {0, 1, 3, 4}, 2: {1, 2, 4, 5},
                  3: {0, 1, 3, 4}, 4: {0, 1, 3, 4}, 5: {1, 2, 4, 5}}


@pytest.mark.parametrize("grid, window, clamp, expected", [
    ((3, 4), 3, False, SLIDE_3x4_WIN3),
    ((3, 4), 9, False, {q: GRID_3x4_ALL for q in range(12)}),
    ((3, 4), 3, True, CLAMP_3x4_WIN3),
    ((3, 4), 9, True, {q: GRID_3x4_ALL for q in range(12)}),
    ((2, 3), 2, False, SLIDE_2x3_WIN2),
    ((2, 3), 2, True, CLAMP_2x3_WIN2),
    # 1 x 5 with local_range 3: the neighbours left and right, one at the ends.
    ((1, 5), 3, False, {0: {0, 1}, 1: {0, 1, 2}, 2: {1, 2, 3}, 3: {2, 3, 4}, 4: {3, 4}}),
])
def test_local_mask_table(grid, window, clamp, expected):
    mask = sparse.local_block_mask(*grid, window, clamp=clamp)
    assert mask.dtype == torch.bool and mask.shape == (len(expected), len(expected))
    assert allowed_sets(mask) == expected


def test_local_mask_rectangular_window_and_without_self():
    # window 1 row x 3 columns on 3 x 4: same row only, the horizontal neighbours.
    mask = sparse.local_block_mask(3, 4, 1, 3)
    assert allowed_sets(mask)[5] == {4, 5, 6}
    assert allowed_sets(mask)[8] == {8, 9}
    no_self = allowed_sets(sparse.local_block_mask(3, 4, 3, include_self=False))
    assert no_self == {q: s - {q} for q, s in SLIDE_3x4_WIN3.items()}


def test_tile_repeats_the_local_rule_over_all_frame_pairs():
    local = torch.tensor([[True, False], [True, True]])  # P = 2
    tiled = sparse.tile_block_mask(local, 2, 3)
    assert tiled.shape == (4, 6)
    # query 1 (pair 0, position 1) and query 3 (pair 1, position 1) see every key in every pair;
    # queries at position 0 see only position 0 of each of the 3 key pairs.
    assert allowed_sets(tiled) == {0: {0, 2, 4}, 1: set(range(6)), 2: {0, 2, 4}, 3: set(range(6))}


def slab(rows):
    """One (batch, head) of probabilities as (1, 1, Nq, Nk)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def kept(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(ij) for ij in torch.nonzero(mask[0, 0]).tolist()}


@pytest.mark.parametrize("rows, topk, expected", [
    # exactly the k largest of the whole slab, whichever rows they are in
    ([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], 2, {(1, 0), (0, 0)}),
    ([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]], 3, {(1, 0), (0, 0), (1, 1)}),
    # ties at the threshold are all dropped: the 3rd largest is 0.4, tied with the 1st and 2nd
    ([[0.4, 0.4, 0.2], [0.4, 0.3, 0.3]], 2, set()),
    ([[0.4, 0.4, 0.2], [0.4, 0.3, 0.3]], 3, {(0, 0), (0, 1), (1, 0)}),
    ([[0.4, 0.4, 0.2], [0.4, 0.3, 0.3]], 4, {(0, 0), (0, 1), (1, 0)}),
    # k beyond the allowed (non-zero) blocks keeps every allowed block, never a forbidden one
    ([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]], 10, {(0, 0), (0, 1), (1, 2)}),
    # nothing forbidden: k is capped at n - 1, so the smallest still goes
    ([[0.5, 0.5], [0.9, 0.1]], 100, {(0, 0), (0, 1), (1, 0)}),
    # a query block can lose every key block: row 1 is flatter than row 0
    ([[0.9, 0.1], [0.5, 0.5]], 1, {(0, 0)}),
    ([[0.9, 0.1], [0.5, 0.5]], 0, set()),
])
def test_topk_rule(rows, topk, expected):
    assert kept(sparse.topk_block_mask(slab(rows), topk, q_windows=1)) == expected


def test_topk_is_per_query_frame_pair_and_per_head():
    # P = 1 query block per pair, 2 query pairs, 2 key blocks: each pair keeps its own top 1
    # (a single ranking over both pairs would keep (0, 0) and (0, 1) only).
    probs = slab([[0.9, 0.8], [0.6, 0.4]])
    assert kept(sparse.topk_block_mask(probs, 1, q_windows=2)) == {(0, 0), (1, 0)}
    assert kept(sparse.topk_block_mask(probs, 1, q_windows=1)) == {(0, 0)}
    two_heads = torch.cat([probs, probs.flip(-1)], dim=1)  # (1, 2, 2, 2)
    mask = sparse.topk_block_mask(two_heads, 1, q_windows=2)
    assert torch.nonzero(mask[0, 1]).tolist() == [[0, 1], [1, 1]]


# Draft end to end on a 1 x 3 grid, local_range 3: query 0 sees {0, 1}, 1 sees {0, 1, 2}, 2 sees
# {1, 2}. Pooled queries q = (1, 1, 1, 1), keys (s/2)(1, 1, 1, 1) with s = (2, 0, 0): D = 4, so
# q . k / sqrt(4) = s. Probabilities by row: e^2/(e^2+1), 1/(e^2+1) | e^2/(e^2+2), 1/(e^2+2) x 2
# | 1/2, 1/2. Ranked: .881 (0,0) > .787 (1,0) > .5 (2,1) = .5 (2,2) > .119 (0,1) > .107 (1,1)
# = .107 (1,2) > 0 (the forbidden (0,2), (2,0)).
E2 = math.exp(2.0)
DRAFT_PROBS = [[E2 / (E2 + 1), 1 / (E2 + 1), 0.0],
               [E2 / (E2 + 2), 1 / (E2 + 2), 1 / (E2 + 2)],
               [0.0, 0.5, 0.5]]
DRAFT_KEPT = {
    1: {(0, 0)},
    2: {(0, 0), (1, 0)},
    3: {(0, 0), (1, 0)},  # (2, 1) and (2, 2) tie at the threshold
    4: {(0, 0), (1, 0), (2, 1), (2, 2)},
    5: {(0, 0), (1, 0), (2, 1), (2, 2), (0, 1)},
    6: {(0, 0), (1, 0), (2, 1), (2, 2), (0, 1)},  # (1, 1) and (1, 2) tie
    7: {(0, 0), (1, 0), (2, 1), (2, 2), (0, 1), (1, 1), (1, 2)},
    100: {(0, 0), (1, 0), (2, 1), (2, 2), (0, 1), (1, 1), (1, 2)},
}


def draft_inputs(key_pairs: int = 1):
    q = torch.ones(1, 1, 3, 4)
    s = torch.tensor([2.0, 0.0, 0.0] * key_pairs)
    k = (s / 2)[None, None, :, None].expand(1, 1, 3 * key_pairs, 4).contiguous()
    return q, k, sparse.local_block_mask(1, 3, 3)


def test_draft_scores_are_the_local_softmax_of_scaled_pooled_scores():
    q, k, local = draft_inputs()
    probs = sparse.draft_block_scores(q, k, local)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs[0, 0], torch.tensor(DRAFT_PROBS), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("topk", sorted(DRAFT_KEPT))
def test_draft_mask_keeps_the_hand_ranked_blocks(topk):
    q, k, local = draft_inputs()
    mask = sparse.draft_block_mask(q, k, local, topk)
    assert mask.shape == (1, 1, 3, 3) and mask.dtype == torch.bool
    assert kept(mask) == DRAFT_KEPT[topk]


def test_draft_with_a_cached_pair_ranks_both_pairs_together():
    # Keys: a cached pair and the current one, identical. Each allowed probability halves and
    # appears twice: query 0 (.440, .060 in each pair), 1 (.394, .053, .053), 2 (.25, .25).
    # The top 2 are (0, 0) and (0, 3), i.e. the same spatial block in both pairs.
    q, k, local = draft_inputs(key_pairs=2)
    assert kept(sparse.draft_block_mask(q, k, local, 2)) == {(0, 0), (0, 3)}
    assert kept(sparse.draft_block_mask(q, k, local, 4)) == {(0, 0), (0, 3), (1, 0), (1, 3)}
    # Two query pairs (6 query blocks): each pair ranks its own P x Nk slab.
    q2 = torch.ones(1, 1, 6, 4)
    assert kept(sparse.draft_block_mask(q2, k, local, 2)) == {(0, 0), (0, 3), (3, 0), (3, 3)}


def test_draft_rejects_an_empty_local_row():
    q, k, _ = draft_inputs()
    with pytest.raises(ValueError, match="at least one"):
        sparse.draft_block_scores(q, k, sparse.local_block_mask(1, 3, 1, include_self=False))


def test_pool_blocks_means_each_block_including_a_partial_last_one():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 1, 10, 1)  # tokens 0..9, block size 4
    assert sparse.pool_blocks(x, 4).flatten().tolist() == [1.5, 5.5, 8.5]


def test_inference_budget_and_cache_rules():
    # 768 x 1280: 6 x 10 = 60 blocks per frame pair; sparse_ratio 2 gives ratio 2, budget 7199.
    assert sparse.topk_ratio_for(768, 1280) == 2.0
    assert sparse.inference_topk(60, sparse.topk_ratio_for(768, 1280)) == 7199
    # 1536 x 2560 has 240 blocks; the budget stays ~120 key blocks per query block.
    assert sparse.inference_topk(240, sparse.topk_ratio_for(1536, 2560)) == 120 * 240 - 1
    k = torch.arange(10.0).reshape(1, 1, 10, 1)  # 5 pairs of 2 tokens
    for pairs, kept_from in ((3, 0), (4, 2), (5, 2)):  # over kv_len: drop the oldest pair only
        kk, vv = sparse.trim_kv_cache(k[:, :, :2 * pairs], -k[:, :, :2 * pairs], 2, kv_len=3)
        assert kk.flatten().tolist() == list(range(kept_from, 2 * pairs))
        assert torch.equal(vv, -kk)


def direct_attention(q, k, v, block_mask, bs):
    """Per query token: softmax over the keys its block may see, zeros where it may see none."""
    b, h, lq, d = q.shape
    out = torch.zeros(b, h, lq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                keys = [j for j in range(k.shape[2]) if block_mask[bi, hi, i // bs, j // bs]]
                if not keys:
                    continue
                logits = torch.stack([q[bi, hi, i].double() @ k[bi, hi, j].double() for j in keys])
                p = torch.softmax(logits / math.sqrt(d), dim=0)
                out[bi, hi, i] = sum(pj * v[bi, hi, j].double() for pj, j in zip(p, keys))
    return out.float()


@pytest.mark.parametrize("lq, lk", [(12, 16), (10, 13), (3, 5)])
def test_fallback_matches_direct_masked_attention(lq, lk):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    bs = 4
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (lq, lk, lk))
    nq, nk = -(-lq // bs), -(-lk // bs)
    block_mask = torch.rand(2, 2, nq, nk, generator=g) < 0.5
    block_mask[0, 1, 0] = False  # a query block with no key block at all
    block_mask[1, 0, -1] = False
    block_mask[1, 1, :, -1] = True  # the partial last key block in use
    out = sparse.block_sparse_attention(q, k, v, block_mask, block_size=bs)
    assert out.shape == (2, 2, lq, 8) and not out.isnan().any()
    torch.testing.assert_close(out, direct_attention(q, k, v, block_mask, bs), rtol=1e-5, atol=1e-5)
    assert out[0, 1, :bs].abs().max() == 0


def test_fallback_with_128_blocks_and_ragged_lengths_in_runs():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (200, 300, 300))
    block_mask = torch.tensor([[True, False, True], [False, True, False]])[None, None].expand(1, 2, 2, 3)
    # The reference, vectorised: token (i, j) allowed iff block_mask[i // 128, j // 128].
    allowed = block_mask[0, 0][torch.arange(200) // 128][:, torch.arange(300) // 128]
    logits = (q @ k.transpose(-1, -2) / 4.0).masked_fill(~allowed, float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ v
    out = sparse.block_sparse_attention(q, k, v, block_mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Processing the query blocks in runs of one block changes nothing.
    runs = sparse.masked_block_attention(q, k, v, block_mask, 128, max_mask_elements=1)
    torch.testing.assert_close(runs, expected, rtol=1e-5, atol=1e-5)


def test_all_true_mask_is_dense_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 3, n, 8, generator=g) for n in (9, 11, 11))
    out = sparse.block_sparse_attention(q, k, v, torch.ones(3, 3, dtype=torch.bool), block_size=4)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    manual = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


def test_mask_of_the_wrong_block_count_is_refused():
    q = torch.zeros(1, 1, 10, 4)
    with pytest.raises(ValueError, match="does not fit"):
        sparse.block_sparse_attention(q, q, q, torch.ones(1, 1, 2, 3, dtype=torch.bool), block_size=4)


def test_draft_mask_drives_the_attention_end_to_end():
    # Two frame pairs of a 2 x 2 block grid, blocks of 4 tokens: pooled draft, then attention.
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 2 * 4 * 4, 8, generator=g) for _ in range(3))
    local = sparse.local_block_mask(2, 2, 1)  # each block sees only itself in each pair
    mask = sparse.draft_block_mask(sparse.pool_blocks(q, 4), sparse.pool_blocks(k, 4), local, 3)
    assert mask.shape == (1, 2, 8, 8)
    allowed = sparse.tile_block_mask(local, 2, 2)
    assert not (mask & ~allowed).any()  # the top-k never adds a forbidden block
    assert mask.flatten(2).sum(-1).le(2 * 3).all()  # at most topk per pair, 2 pairs
    out = sparse.block_sparse_attention(q, k, v, mask, block_size=4)
    torch.testing.assert_close(out, direct_attention(q, k, v, mask, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() and sparse._kernel() is not None),
                    reason="needs CUDA and the block_sparse_attn package")
def test_kernel_matches_the_fallback():  # pragma: no cover - GPU machines only
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(2, 4, n, 64, generator=g, device="cuda", dtype=torch.bfloat16)
               for n in (300, 500, 500))
    block_mask = torch.rand(2, 4, 3, 4, generator=g, device="cuda") < 0.5
    block_mask[0, 0, 1] = False  # an empty query block: zeros from both
    out = sparse.block_sparse_attention(q, k, v, block_mask)
    ref = sparse.masked_block_attention(q.float(), k.float(), v.float(), block_mask)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
