"""FlashVSR's DiT backbone (vsr_ddp.models.flashvsr.dit) against an independent reference, diffusers'
WanTransformer3DModel, and its loader against the published key layout.

The reference is built with a tiny config of the same layout and random weights; its state dict is
renamed to the published names by ``diffusers_to_published`` below (written here from diffusers' own
module names, not taken from dit.py or DiffSynth's converter), loaded strictly, and both models run
on the same latents, timesteps and prompt embedding in float32.

Where diffusers and FlashVSR's original (DiffSynth's ``wan_video_dit.py``) differ, and which side
this code follows:

* RoPE split of a head: FlashVSR gives frame / row / column ``d - 2*(d//3)``, ``d//3``, ``d//3``
  channels, diffusers (like Wan's own repo) ``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)``. Equal when
  ``d//3`` is even (128 -> 44/42/42); the tiny head dim 32 (12/10/10) keeps them equal, and DiTConfig
  refuses head dims where they would differ (FlashVSR's own code would fail there). Both rotate
  interleaved (even, odd) channel pairs with per-axis ladders theta^(-2i/d_axis), in float64.
* Time embedding: both [cos | sin] with frequencies 10000^(-i/half); FlashVSR computes the phase in
  float64, diffusers in float32 (at t = 1000 that is a phase error of up to ~1e-4). This code follows
  FlashVSR: against diffusers as it is the outputs (magnitude ~4) differ by ~1e-5 (measured 1.0e-5),
  and with only diffusers' phase made float64 (``_float64_phase``) by float32 rounding (1.4e-6).
* Norms and modulation: diffusers runs LayerNorms and the modulation in float32 whatever the model
  dtype, FlashVSR in the model dtype; identical here (float32).
* Head: both add the time embedding (before ``time_projection``) to the head's (1, 2, C) table;
  FlashVSR's broadcasting is right only for batch 1, this code and diffusers add it per row (the
  batch-2 case below checks that).
* The published file uses Wan's / DiffSynth's names (``blocks.N.self_attn.q.weight``): DiffSynth
  identifies it by the md5 of its sorted keys and shapes, 9269f8db9040a9d860eaca435be61814 (Wan 2.1
  T2V 1.3B, loaded by ``from_civitai`` with the keys unchanged), which the default config reproduces.
"""
from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch

from vsr_ddp.models.flashvsr.dit import DiTConfig, WanDiT, dense_attention, load_dit, rope_angles

TINY = dict(dim=64, num_heads=2, num_layers=2, ffn_dim=64, text_dim=32, freq_dim=16,
            in_dim=16, out_dim=16, patch_size=(1, 2, 2))
TOL = 5e-6            # outputs of magnitude ~4: float32 rounding
TOL_F32_PHASE = 5e-5  # diffusers' float32 time phase at t = 1000 (measured ~1e-5)

_BLOCK = {  # diffusers' per-block names -> the published ones
    r"attn1\.to_(q|k|v)\.": r"self_attn.\1.",
    r"attn1\.to_out\.0\.": "self_attn.o.",
    r"attn1\.norm_(q|k)\.": r"self_attn.norm_\1.",
    r"attn2\.to_(q|k|v)\.": r"cross_attn.\1.",
    r"attn2\.to_out\.0\.": "cross_attn.o.",
    r"attn2\.norm_(q|k)\.": r"cross_attn.norm_\1.",
    r"norm2\.": "norm3.",  # diffusers' norm2 is the affine norm before cross-attention
    r"ffn\.net\.0\.proj\.": "ffn.0.",
    r"ffn\.net\.2\.": "ffn.2.",
    r"scale_shift_table$": "modulation",
}
_TOP = {
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
    "patch_embedding.": "patch_embedding.",
}


def diffusers_to_published(state: dict) -> dict:
    """diffusers' WanTransformer3DModel state dict -> Wan's / FlashVSR's published key names."""
    out = {}
    for key, value in state.items():
        new = None
        m = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if m:
            for pat, rep in _BLOCK.items():
                if re.match(pat, m.group(2)):
                    new = f"blocks.{m.group(1)}." + re.sub(pat, rep, m.group(2), count=1)
                    break
        elif key == "scale_shift_table":
            new = "head.modulation"
        else:
            new = next((rep + key[len(pre):] for pre, rep in _TOP.items() if key.startswith(pre)), None)
        if new is None:
            raise KeyError(f"no published name for diffusers key {key}")
        out[new] = value
    return out


def _reference(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=TINY["num_heads"],
        attention_head_dim=TINY["dim"] // TINY["num_heads"], in_channels=16, out_channels=16,
        text_dim=TINY["text_dim"], freq_dim=TINY["freq_dim"], ffn_dim=TINY["ffn_dim"],
        num_layers=TINY["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
    with torch.no_grad():  # every parameter random, norm gains around 1 (none left at its 1 / 0 init)
        for name, p in ref.named_parameters():
            if re.search(r"norm\w*\.weight$", name):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


@pytest.fixture(scope="module")
def pair():
    ref = _reference()
    ours = WanDiT(DiTConfig(**TINY)).eval()
    ours.load_state_dict(diffusers_to_published(ref.state_dict()), strict=True)
    return ref, ours


def _inputs(batch=2, frames=3, height=8, width=12, ctx_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, height, width, generator=g)        # (B, 16, F, H, W)
    context = torch.randn(batch, ctx_len, TINY["text_dim"], generator=g)  # (B, S, text_dim)
    timestep = torch.tensor([1000.0, 237.5][:batch])                     # FlashVSR's is 1000
    return x, timestep, context


def test_conversion_names_by_hand():
    conv = diffusers_to_published({k: 0 for k in _reference().state_dict()})
    for diffusers_key, published in [
        ("blocks.0.attn1.to_q.weight", "blocks.0.self_attn.q.weight"),
        ("blocks.1.attn2.to_out.0.bias", "blocks.1.cross_attn.o.bias"),
        ("blocks.1.attn2.norm_k.weight", "blocks.1.cross_attn.norm_k.weight"),
        ("blocks.0.norm2.bias", "blocks.0.norm3.bias"),
        ("blocks.0.ffn.net.0.proj.weight", "blocks.0.ffn.0.weight"),
        ("blocks.1.scale_shift_table", "blocks.1.modulation"),
        ("scale_shift_table", "head.modulation"),
        ("proj_out.weight", "head.head.weight"),
        ("condition_embedder.time_proj.weight", "time_projection.1.weight"),
        ("condition_embedder.text_embedder.linear_2.bias", "text_embedding.2.bias"),
    ]:
        assert diffusers_to_published({diffusers_key: 0}) == {published: 0}
    assert set(conv) == set(WanDiT(DiTConfig(**TINY)).state_dict())


def _float64_phase(module):
    """diffusers' Timesteps (flip_sin_to_cos, shift 0), its phase computed in float64 as FlashVSR does."""
    half = module.num_channels // 2

    def forward(timesteps):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        phase = timesteps.double()[:, None] * freqs[None]
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).float()
    return forward


@torch.no_grad()
def test_equals_diffusers_reference(pair):
    ref, ours = pair
    for batch, frames, height, width, ctx_len, seed in [(2, 3, 8, 12, 7, 1), (1, 2, 6, 4, 5, 2)]:
        x, timestep, context = _inputs(batch, frames, height, width, ctx_len, seed)
        want = ref(x, timestep, context, return_dict=False)[0]  # (B, 16, F, H, W)
        got = ours(x, timestep, context)
        assert got.shape == want.shape == x.shape
        assert want.abs().max() > 1  # not a trivially small output
        diff = (got - want).abs().max().item()
        assert diff < TOL_F32_PHASE, f"max |ours - diffusers| = {diff:.3g} at {tuple(x.shape)}"
        # the whole gap is diffusers' float32 time phase: with a float64 one it is float32 rounding
        proj = ref.condition_embedder.timesteps_proj
        proj.forward = _float64_phase(proj)
        try:
            want64 = ref(x, timestep, context, return_dict=False)[0]
        finally:
            del proj.forward
        diff64 = (got - want64).abs().max().item()
        assert diff64 < TOL, f"max |ours - diffusers (float64 phase)| = {diff64:.3g} at {tuple(x.shape)}"


@torch.no_grad()
def test_lq_latents_added_before_their_blocks(pair):
    """FlashVSR adds its LQ projector's i-th output to the tokens just before block i; the reference
    gets the same through forward pre-hooks on its blocks."""
    ref, ours = pair
    x, timestep, context = _inputs()
    tokens = 3 * 4 * 6  # (F/1) * (H/2) * (W/2)
    lq = [torch.randn(2, tokens, TINY["dim"], generator=torch.Generator().manual_seed(3))]  # block 0 only

    def add(i):
        return lambda module, args: (args[0] + lq[i],) + tuple(args[1:])

    hooks = [ref.blocks[i].register_forward_pre_hook(add(i)) for i in range(len(lq))]
    try:
        want = ref(x, timestep, context, return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    got = ours(x, timestep, context, lq_latents=lq)
    assert (got - want).abs().max().item() < TOL_F32_PHASE
    assert (got - ours(x, timestep, context)).abs().max().item() > 1e-3  # it did change the output


@torch.no_grad()
def test_attention_hook_gets_rotated_qkv_and_grid(pair):
    _, ours = pair
    x, timestep, context = _inputs()
    seen = []

    def spy(q, k, v, num_heads, grid):
        seen.append((tuple(q.shape), num_heads, tuple(grid)))
        return dense_attention(q, k, v, num_heads, grid)

    base = ours(x, timestep, context)
    ours.set_attention(spy)
    try:
        hooked = ours(x, timestep, context)
    finally:
        ours.set_attention(dense_attention)
    assert torch.equal(base, hooked)
    assert seen == [((2, 72, TINY["dim"]), TINY["num_heads"], (3, 4, 6))] * TINY["num_layers"]


def test_rope_frame_offset_is_a_later_slice():
    """A shared offset cancels in full self-attention (RoPE is relative), so the reference cannot see
    it; it matters once streamed chunks attend to cached keys: there it must continue the table."""
    cfg = DiTConfig(**TINY)
    cos_all, sin_all = rope_angles(cfg, (5, 2, 3))
    cos, sin = rope_angles(cfg, (2, 2, 3), frame_offset=3)
    assert torch.equal(cos, cos_all[3 * 6:]) and torch.equal(sin, sin_all[3 * 6:])


def test_default_config_is_the_published_layout():
    """The 1.3B model's keys and shapes hash (DiffSynth's hash_state_dict_keys: md5 of the sorted
    "key:shape" and "key" strings) to the Wan 2.1 T2V 1.3B entry FlashVSR's loader matches the
    streaming DMD file with; and the RoPE split is (44, 42, 42)."""
    with torch.device("meta"):
        model = WanDiT()
    names = []
    for key, value in model.state_dict().items():
        names += [key + ":" + "_".join(map(str, value.shape)), key]
    assert hashlib.md5(",".join(sorted(names)).encode()).hexdigest() == "9269f8db9040a9d860eaca435be61814"
    assert DiTConfig().rope_dims == (44, 42, 42)
    with pytest.raises(ValueError, match="head_dim"):
        DiTConfig(dim=128, num_heads=2)  # head dim 64: 64 // 3 = 21 is odd


def _save(state: dict, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@torch.no_grad()
def test_load_dit_strict_from_published_names(tmp_path, pair):
    _, ours = pair
    path = tmp_path / "diffusion_pytorch_model_streaming_dmd.safetensors"
    state = ours.state_dict()
    for key in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.norm_k.weight", "blocks.0.norm3.weight",
                "blocks.0.modulation", "head.modulation", "head.head.weight", "time_projection.1.weight",
                "text_embedding.0.weight", "patch_embedding.weight"):
        assert key in state
    _save(state, path)
    loaded = load_dit(path, DiTConfig(**TINY))
    assert not loaded.training
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    x, timestep, context = _inputs()
    assert torch.equal(loaded(x, timestep, context), ours(x, timestep, context))
    half = load_dit(path, DiTConfig(**TINY), dtype=torch.bfloat16)
    assert half.head.head.weight.dtype == torch.bfloat16


def _one_line_error(path, config, *needles):
    with pytest.raises(ValueError) as err:
        load_dit(path, config)
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text
    for needle in needles:
        assert needle in text, text


def test_load_dit_errors_name_file_and_key(tmp_path):
    cfg = DiTConfig(**TINY)
    state = WanDiT(cfg).state_dict()

    missing = dict(state)
    del missing["blocks.1.ffn.2.bias"]
    _save(missing, tmp_path / "missing.safetensors")
    _one_line_error(tmp_path / "missing.safetensors", cfg, "missing", "blocks.1.ffn.2.bias")

    extra = dict(state, **{"blocks.0.self_attn.extra.weight": torch.zeros(2)})
    _save(extra, tmp_path / "extra.safetensors")
    _one_line_error(tmp_path / "extra.safetensors", cfg, "unexpected", "blocks.0.self_attn.extra.weight")

    wrong = dict(state, **{"head.modulation": torch.zeros(1, 3, TINY["dim"])})
    _save(wrong, tmp_path / "wrong.safetensors")
    _one_line_error(tmp_path / "wrong.safetensors", cfg, "wrong shape", "head.modulation", "(1, 3, 64)")

    # the published 1.3B layout is not the tiny one: named as such, without reading tensors
    _one_line_error(tmp_path / "missing.safetensors", DiTConfig(), "wrong shape")

    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    _one_line_error(tmp_path / "garbage.safetensors", cfg, "cannot read")
    _one_line_error(tmp_path / "absent.safetensors", cfg, "cannot read")
