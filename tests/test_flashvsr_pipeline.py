"""FlashVSR's streaming tiny pipeline (vsr_ddp/models/flashvsr/pipeline.py) and the DiT's streaming
step (dit.WanDiT.stream_step), with tiny random networks on the CPU:

* the streaming DiT step with its KV cache equals one forward over the whole latent window under the
  attention mask the cache reproduces (first 3 frame pairs see each other, every later pair the 3
  before it and itself);
* the whole pipeline equals a reference written here over the whole range (bicubic, padding, the
  projector over the clip, the masked DiT forward, the decoder in one call, crop, AdaIN, uint8);
* streaming in pieces of any size equals one call, bit for bit, and outputs come with the documented
  latency;
* block-sparse attention with every local block kept equals dense attention; with the draft's
  budget above the allowed blocks it equals dense attention under the local mask;
* output sizes and counts for sizes that are not multiples of 32 and ranges that are not 8n + 1;
* a long range (4,203 frames) comes out whole, in order, with bounded state;
* load_flashvsr reads a folder of the published names (tiny shapes)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vsr_ddp.models.flashvsr.decoder import LQProjector, TCDecoder
from vsr_ddp.models.flashvsr.dit import DiTConfig, KVCache, WanDiT, dense_attention
from vsr_ddp.models.flashvsr.pipeline import (FILES, BlockSparseSelfAttention, FlashVSRTiny, latent_noise,
                                              load_flashvsr, padded_length, upscale_bicubic)

TINY = dict(dim=64, num_heads=2, num_layers=2, ffn_dim=64, text_dim=32, freq_dim=16)
LQ_TINY = dict(in_dim=3, out_dim=64, layer_num=1, hidden=(8, 12))
DEC_TINY = dict(channels=(6, 5, 4, 3), latent_channels=16)
TOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch at one thread


def networks(seed: int = 0, dit: dict = TINY, lq: dict = LQ_TINY, dec: dict = DEC_TINY):
    torch.manual_seed(seed)
    net = WanDiT(DiTConfig(**dit)).eval()
    return net, LQProjector(**lq).eval(), TCDecoder(**dec).eval(), torch.randn(1, 5, dit["text_dim"])


def pipeline(seed: int = 0, **options) -> FlashVSRTiny:
    return FlashVSRTiny(*networks(seed), **options)


def frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def pair_mask_attention(cached_pairs: int = 3):
    """Dense attention where query frame pair p sees key pairs 0..2 if p < 3, else p-3..p: what the
    streaming KV cache (first step 3 pairs, then one pair per step, kv_len 3) reproduces."""
    def attention(q, k, v, num_heads, grid):
        f, h, w = grid
        pair = torch.arange(f).repeat_interleave(h * w) // 2                  # (L,) pair of each token
        first = cached_pairs
        recent = (pair[None, :] <= pair[:, None]) & (pair[None, :] >= pair[:, None] - cached_pairs)
        allowed = torch.where(pair[:, None] < first, pair[None, :] < first, recent)  # (L, L) bool
        b, lq, c = q.shape
        split = [x.view(b, x.shape[1], num_heads, -1).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*split, attn_mask=allowed)       # (B, H, L, D)
        return out.transpose(1, 2).reshape(b, lq, c)
    return attention


def stream_dit(dit, noise, tokens, context, steps):
    """The streaming DiT over ``steps`` latent-frame counts (6, 2, 2, ...): offsets as the original."""
    cache = KVCache(dit.config.num_layers, 3)
    t, t_mod = dit.embed_time(torch.tensor([1000.0]))
    ctx = dit.context_kv(context)
    outs, start = [], 0
    per_frame = tokens.shape[1] // noise.shape[2]
    for n in steps:
        outs.append(dit.stream_step(noise[:, :, start:start + n], t, t_mod, ctx, cache,
                                    lq_latents=[tokens[:, start * per_frame:(start + n) * per_frame]],
                                    frame_offset=start))
        start += n
    return torch.cat(outs, dim=2), cache


# ------------------------------------------------------------------------------------------------
# The DiT's streaming step
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_stream_step_equals_masked_window_forward():
    dit, _, _, context = networks(1)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 14, 16, 16, generator=g)           # 7 frame pairs of 8 x 8 tokens
    tokens = torch.randn(1, 14 * 64, 64, generator=g)
    streamed, cache = stream_dit(dit, noise, tokens, context, (6, 2, 2, 2, 2))
    dit.set_attention(pair_mask_attention())
    whole = dit(noise, torch.tensor([1000.0]), context, lq_latents=[tokens])
    assert streamed.shape == whole.shape == (1, 16, 14, 16, 16)
    assert (streamed - whole).abs().max() < TOL * whole.abs().max()
    # the cache holds the last 3 pairs of every block, nothing more
    assert all(k.shape == (1, 3 * 2 * 64, 64) and v.shape == k.shape for k, v in cache.layers)
    # and it matters: without it (every step alone) the later steps differ
    dit.set_attention(dense_attention)
    alone = torch.cat([stream_dit(dit, noise[:, :, s:e], tokens[:, s * 64:e * 64], context, (e - s,))[0]
                       for s, e in ((0, 6), (6, 8), (8, 10), (10, 12), (12, 14))], dim=2)
    assert (alone[:, :, 6:] - whole[:, :, 6:]).abs().max() > 1e-3


@torch.no_grad()
def test_sparse_attention_without_draft_equals_dense():
    """2 x 2 blocks per frame pair, a local square covering them all, every local block kept."""
    dit, _, _, context = networks(2)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(1, 16, 10, 32, 32, generator=g)           # 16 x 16 tokens: 2 x 2 blocks
    tokens = torch.randn(1, 10 * 256, 64, generator=g)
    dense, _ = stream_dit(dit, noise, tokens, context, (6, 2, 2))
    dit.set_attention(BlockSparseSelfAttention(local_range=3, draft=False))
    sparse, _ = stream_dit(dit, noise, tokens, context, (6, 2, 2))
    assert (sparse - dense).abs().max() < TOL * dense.abs().max()


@torch.no_grad()
def test_sparse_draft_keeps_every_local_block_when_the_budget_allows():
    """local_range 1: each block sees its own place in every pair; a budget above the allowed blocks
    keeps them all, so the result is dense attention under that mask (written here)."""
    dit, _, _, context = networks(5)
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(1, 16, 8, 32, 32, generator=g)
    tokens = torch.randn(1, 8 * 256, 64, generator=g)
    dit.set_attention(BlockSparseSelfAttention(local_range=1, sparse_ratio=1000.0))
    sparse, _ = stream_dit(dit, noise, tokens, context, (6, 2))

    def same_place(q, k, v, num_heads, grid):
        f, h, w = grid
        place = (torch.arange(h)[:, None] // 8 * 2 + torch.arange(w)[None, :] // 8).flatten()  # token's block
        allowed = place.repeat(f)[:, None] == place.repeat(k.shape[1] // (h * w))[None, :]
        b, lq, c = q.shape
        split = [x.view(b, x.shape[1], num_heads, -1).transpose(1, 2) for x in (q, k, v)]
        return F.scaled_dot_product_attention(*split, attn_mask=allowed).transpose(1, 2).reshape(b, lq, c)

    dit.set_attention(same_place)
    masked, _ = stream_dit(dit, noise, tokens, context, (6, 2))
    assert (sparse - masked).abs().max() < TOL * masked.abs().max()


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------

def test_bicubic_is_pils():
    x = frames(2, 13, 22, seed=7)
    mine = upscale_bicubic(torch.from_numpy(x)).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        ref = np.asarray(Image.fromarray(x[i]).resize((88, 52), Image.BICUBIC)).astype(np.float32)
        diff = np.abs(ref - mine[i])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # PIL's 22-bit fixed point vs float


@torch.no_grad()
def test_pipeline_equals_whole_range_reference():
    """Dense attention, 27 LR frames of 20 x 36 (padded to 128 x 256 after x4, cut back to 80 x 144)."""
    n, h, w = 27, 20, 36
    lr = frames(n, h, w, seed=1)
    pipe = pipeline(3, attention="dense")
    out = pipe.feed(lr, last=True)

    dit, lq, dec, context = networks(3)
    total = padded_length(n)                                       # 33: 4 latent pairs
    assert total == 33
    hr = upscale_bicubic(torch.from_numpy(lr)) / 255 * 2 - 1       # (n, 3, 80, 144)
    hr = F.pad(hr, (0, 256 - 144, 0, 128 - 80), mode="replicate")
    hr = torch.cat([hr, hr[-1:].expand(total - n, -1, -1, -1)])    # the last frame repeated
    video = hr.transpose(0, 1)[None]                               # (1, 3, 33, 128, 256)
    tokens = lq(video)                                             # 8 token frames
    noise = latent_noise(0, [4 * j for j in range(8)], 16, 16, 32)  # latent j ends on frame 4j
    dit.set_attention(pair_mask_attention())
    latents = noise - dit(noise, torch.tensor([1000.0]), context, lq_latents=tokens)
    y = dec(latents, video[:, :, :29])[0].transpose(0, 1)[..., :80, :144]   # (29, 3, 80, 144)
    lq_frames = video[0, :, :29].transpose(0, 1)[..., :80, :144]
    mean = lambda x: x.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    std = lambda x: (x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()  # noqa: E731
    y = ((y - mean(y)) / std(y) * std(lq_frames) + mean(lq_frames)).clamp(-1, 1)
    ref = ((y + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()[:n]
    assert out.shape == ref.shape == (27, 80, 144, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3           # truncation at float rounding edges


@torch.no_grad()
def test_pieces_equal_one_call_with_the_documented_latency():
    n, h, w = 50, 12, 20
    lr = frames(n, h, w, seed=2)
    pipe = pipeline(4)
    whole = pipe.feed(lr, last=True)
    assert whole.shape == (50, 48, 80, 3)
    for pieces in ([1, 5, 0, 13, 2, 9, 4, 16], [24, 1, 8, 8, 9], [50]):
        outs, fed = [], 0
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            out = pipe.feed(lr[fed:fed + p], last=last)
            fed += p
            if not last:   # outputs once the input 4 frames later is in: 21, then 8 at a time
                done = sum(len(o) for o in outs) + len(out)
                assert done == (0 if fed < 25 else 21 + 8 * ((fed - 25) // 8))
            outs.append(out)
        assert np.array_equal(np.concatenate(outs), whole)
    # last=True with an empty piece, after all frames were fed
    assert np.array_equal(np.concatenate([pipe.feed(lr, last=False), pipe.feed(lr[:0], last=True)]), whole)


@torch.no_grad()
def test_sparse_pipeline_without_draft_equals_dense():
    lr = frames(21, 64, 64, seed=5)                                # 256 x 256: 2 x 2 blocks
    dense = pipeline(6, attention="dense").feed(lr, last=True)
    pipe = pipeline(6, attention="sparse", local_range=3)
    pipe.attention.draft = False
    sparse = pipe.feed(lr, last=True)
    diff = np.abs(sparse.astype(int) - dense.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert pipeline(6, attention="sparse").feed(lr, last=True).shape == (21, 256, 256, 3)  # with the draft


@pytest.mark.parametrize("n, h, w", [(1, 8, 8), (21, 20, 36), (26, 33, 47), (34, 32, 32)])
@torch.no_grad()
def test_output_size_and_count(n, h, w):
    pipe = pipeline(7)
    out = pipe.feed(frames(n, h, w, seed=n), last=True)
    assert out.shape == (n, 4 * h, 4 * w, 3) and out.dtype == np.uint8
    assert padded_length(n) == {1: 25, 21: 25, 26: 33, 34: 41}[n]
    # the range is over: the next feed starts a new one (positions, caches, noise from the start)
    again = pipe.feed(frames(n, h, w, seed=n), last=True)
    assert np.array_equal(again, out)


@pytest.mark.slow  # many seconds of CPU
@torch.no_grad()
def test_long_range_comes_out_whole_in_order_with_bounded_state():
    """4,203 constant-colour frames of 8 x 8 whose colour encodes the index: the colour correction
    gives each output its input's colour, so the order can be read back."""
    tiny = FlashVSRTiny(*networks(8, dit=dict(dim=12, num_heads=1, num_layers=1, ffn_dim=12, text_dim=8,
                                              freq_dim=8, in_dim=4, out_dim=4),
                                  lq=dict(in_dim=3, out_dim=12, layer_num=1, hidden=(4, 4)),
                                  dec=dict(channels=(3, 3, 3, 3), latent_channels=4)), attention="dense")
    tiny.decoder_frames_per_pass = None   # a step's 2 latent frames at once: faster at this size
    n = 4203
    idx = np.arange(n)
    digits = np.stack([idx % 16, idx // 16 % 16, idx // 256], axis=1)               # (n, 3) base 16
    colour = digits * 15 + 8                                                          # 8 .. 248
    lr = np.broadcast_to(colour[:, None, None, :], (n, 8, 8, 3)).astype(np.uint8)
    t0 = time.perf_counter()
    outs, fed, sizes, piece = [], 0, [], 1
    while fed < n:
        p = min(piece, n - fed)
        outs.append(tiny.feed(lr[fed:fed + p], last=fed + p == n))
        fed += p
        piece = piece % 37 + 1
        sizes.append((fed, tiny.cache_bytes()))
    out = np.concatenate(outs)
    assert out.shape == (n, 32, 32, 3)
    got = np.round((np.median(out.reshape(n, -1, 3), axis=1) - 8) / 15).astype(int)
    assert np.array_equal(got, digits)
    early = max(b for f, b in sizes if 200 <= f < 1000)
    late = max(b for f, b in sizes if f >= 1000)
    assert 0 < late <= early                                        # no growth over 3,000 frames
    print(f"long range: {n} frames in {time.perf_counter() - t0:.1f} s, peak state {late} bytes")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def write_folder(folder, seed: int = 9):
    from safetensors.torch import save_file

    dit, lq, dec, prompt = networks(seed)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / FILES["dit"]))
    torch.save(lq.state_dict(), folder / FILES["lq_proj"])
    torch.save(dec.state_dict(), folder / FILES["decoder"])
    torch.save(prompt, folder / FILES["prompt"])
    return dit, lq, dec, prompt


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@torch.no_grad()
def test_load_flashvsr_folder(tmp_path, version):
    dit, lq, dec, prompt = write_folder(tmp_path)
    pipe = load_flashvsr(tmp_path, "cpu", torch.float32, version=version, config=DiTConfig(**TINY),
                         attention="dense")
    assert pipe.lq_proj.causal is (version == "1.1")
    lr = frames(21, 16, 16, seed=3)
    out = pipe.feed(lr, last=True)
    assert out.shape == (21, 64, 64, 3)
    built = FlashVSRTiny(dit, LQProjector(**LQ_TINY, causal=version == "1.1"), dec, prompt, attention="dense")
    built.lq_proj.load_state_dict(lq.state_dict())
    assert np.array_equal(built.feed(lr, last=True), out)


def test_load_flashvsr_names_the_missing_file(tmp_path):
    write_folder(tmp_path)
    (tmp_path / FILES["prompt"]).unlink()
    with pytest.raises(ValueError, match=f"{tmp_path}.*missing posi_prompt.pth"):
        load_flashvsr(tmp_path, config=DiTConfig(**TINY))
    with pytest.raises(ValueError, match="version"):
        load_flashvsr(tmp_path, version="2")


@pytest.mark.slow  # many seconds of CPU
@torch.no_grad()
def test_full_mode_decodes_with_the_wan_vae_in_pieces_as_in_one_call(tmp_path):
    """mode=full: the Wan 2.1 VAE decoder (tiny widths) in place of the TCDecoder, streamed with its
    feature cache: every frame comes out x4, and pieces of any size give one call's frames."""
    from vsr_ddp.models.flashvsr.pipeline import VAE_FILE
    from vsr_ddp.models.flashvsr.vae import WanVAEDecoder

    dit, lq, _, prompt = networks(8)
    vae = WanVAEDecoder(dim=8).eval()
    pipe = FlashVSRTiny(dit, lq, vae, prompt, attention="dense")
    assert pipe.mode == "full"
    lr = frames(38, 12, 20, seed=8)
    one = pipe.feed(lr, last=True)
    assert one.shape == (38, 48, 80, 3)
    parts = [pipe.feed(lr[i:i + 5], last=i + 5 >= 38) for i in range(0, 38, 5)]
    assert np.array_equal(np.concatenate(parts), one)
    # by folder: Wan2.1_VAE.pth in place of TCDecoder.ckpt
    write_folder(tmp_path)
    with pytest.raises(ValueError, match=f"missing {VAE_FILE}"):
        load_flashvsr(tmp_path, mode="full", config=DiTConfig(**TINY))
    torch.save(vae.state_dict(), tmp_path / VAE_FILE)
    (tmp_path / FILES["decoder"]).unlink()
    assert load_flashvsr(tmp_path, "cpu", torch.float32, mode="full", config=DiTConfig(**TINY)).mode == "full"
