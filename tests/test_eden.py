"""EDEN (vsr_ddp.models.eden): the published checkpoint's layout, strict loading with one-line
errors, agreement with the original code (bbldCVer/EDEN, read from the local mirror when present)
and with attention and adaLN written out by hand, the sampler, determinism and padding.

The original is imported from a ``git archive`` of the mirror's ``src`` into a temporary folder;
its ``src.utils`` imports lpips and flolpips (training metrics, not installed here), which are
stubbed for the import; ``use_xformers=False`` selects its plain-torch attention. Tests that need it
are skipped where the mirror is absent.
"""
from __future__ import annotations

import io
import math
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vsr_ddp.models.eden import (COS_SIM_MEAN, COS_SIM_STD, VAE_SCALER, VAE_SHIFT, Eden, EdenConfig,
                                 config_from_shapes, is_eden_state, load_eden, parameter_counts, random_eden,
                                 save_eden)
from vsr_ddp.models.eden.model import DiTBlock
from vsr_ddp.models.sr import ModelError

MIRROR = Path("/work/.mirror/bbldCVer+EDEN/repo")
PUBLISHED = dict(in_dim=3, out_dim=3, patch_size=16, latent_dim=16, hidden_dim=768, num_heads=12,
                 mlp_ratio=4.0, dit_depth=12, decoder_depth=4, qkv_bias=False, attn_drop_rate=0.0,
                 proj_drop_rate=0.0, use_xformers=False, add_attn_decoder=True,
                 add_attn_type="temporal_attn")
TINY = dict(hidden_dim=64, latent_dim=8, dit_depth=2, decoder_depth=1)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The original's modules: {"EDEN": class, "InputPadder": class, "integrators": source text}."""
    if not MIRROR.is_dir():
        pytest.skip("no mirror of bbldCVer/EDEN")
    root = tmp_path_factory.mktemp("eden_original")
    tar = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD", "src"], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(root, filter="data")
    stubs = {"lpips": types.ModuleType("lpips"), "flolpips": types.ModuleType("flolpips"),
             "flolpips.flolpips": types.ModuleType("flolpips.flolpips")}
    stubs["lpips"].LPIPS = object
    stubs["flolpips.flolpips"].Flolpips = object
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update({k: v for k, v in stubs.items() if k not in sys.modules or sys.modules[k] is None})
    sys.path.insert(0, str(root))
    try:
        from src.models.EDEN import EDEN
        from src.utils import InputPadder
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k == "src" or k.startswith("src.")]:
            del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
    integrators = (root / "src" / "transport" / "integrators.py").read_text()
    return {"EDEN": EDEN, "InputPadder": InputPadder, "integrators": integrators}


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _frames(h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth frame and a shifted, slightly changed copy: a pair with motion, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand((1, 3, h // 4 + 2, w // 4 + 2), generator=g), size=(h + 8, w + 8),
                         mode="bilinear", align_corners=False)
    f0 = base[..., 4:4 + h, 4:4 + w]
    f1 = (base[..., 2:2 + h, 6:6 + w] * 0.95 + 0.03).clamp(0, 1)
    return f0.contiguous(), f1.contiguous()


def _original_tiny(original, model: Eden):
    c = model.config
    net = original["EDEN"](**{**PUBLISHED, "hidden_dim": c.hidden_dim, "latent_dim": c.latent_dim,
                              "num_heads": c.num_heads, "dit_depth": c.dit_depth,
                              "decoder_depth": c.decoder_depth})
    net.load_state_dict(model.state_dict(), strict=True)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# layout and loading


def test_published_layout_is_the_originals(original):
    with torch.device("meta"):
        theirs = original["EDEN"](**PUBLISHED)
        ours = Eden(EdenConfig())
    expected = _shapes(theirs.state_dict())
    assert _shapes(ours.state_dict()) == expected
    assert len(expected) == 254
    assert config_from_shapes(expected) == EdenConfig()  # 768 / 64 = the published 12 heads
    counts = parameter_counts(ours)
    assert sum(counts.values()) == sum(p.numel() for p in theirs.parameters())
    assert counts["patch"] == 2 * (768 * 3 * 16 * 16 + 768) + 2 * 2 * 768
    # the rough sizes: patch encoder ~1.2M, DiT ~113M (its 12 blocks), decoder ~38M
    blocks = sum(p.numel() for n, p in ours.named_parameters() if n.startswith("dit_blocks."))
    assert round(counts["patch"] / 1e5) == 12 and round(blocks / 1e6) == 113
    assert round(counts["decoder"] / 1e6) == 39


# the published layout as read from the original's source (EDEN.py, blocks.py, attention.py,
# embedding.py): every key and shape, without the mirror
TOP = {"proj_in.weight": (768, 16), "proj_in.bias": (768,), "patch_cond_dit.weight": (768, 3, 16, 16),
       "patch_cond_dit.bias": (768,), "norm_cond_dit.weight": (768,), "norm_cond_dit.bias": (768,),
       "norm_out.weight": (768,), "norm_out.bias": (768,), "proj_out.weight": (32, 768),
       "proj_out.bias": (32,),
       "adaLN_modulation.1.weight": (4608, 768), "adaLN_modulation.1.bias": (4608,),
       "difference_embedder.weight": (768, 1), "difference_embedder.bias": (768,),
       "denoise_timestep_embedder.mlp.0.weight": (768, 256), "denoise_timestep_embedder.mlp.0.bias": (768,),
       "denoise_timestep_embedder.mlp.2.weight": (768, 768), "denoise_timestep_embedder.mlp.2.bias": (768,),
       "patch_cond_dec.weight": (768, 3, 16, 16), "patch_cond_dec.bias": (768,),
       "norm_cond_dec.weight": (768,), "norm_cond_dec.bias": (768,), "proj_token.weight": (768, 16),
       "proj_token.bias": (768,), "unpatchify.0.weight": (768,), "unpatchify.0.bias": (768,),
       "unpatchify.1.weight": (768, 768), "unpatchify.1.bias": (768,), "unpatchify.3.weight": (768, 768),
       "unpatchify.3.bias": (768,)}
BLOCK = {"norm_self_attn.weight": (768,), "norm_self_attn.bias": (768,), "self_attn.qkv.weight": (2304, 768),
         "self_attn.proj.weight": (768, 768), "norm_temp_attn.weight": (768,), "norm_temp_attn.bias": (768,),
         "temp_attn.qkv.weight": (2304, 768), "temp_attn.proj.weight": (768, 768), "norm_mlp.weight": (768,),
         "norm_mlp.bias": (768,), "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
         "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,)}


def test_published_layout_table():
    expected = dict(TOP)
    for prefix, depth in (("dit_blocks", 12), ("decoder_blocks", 4)):
        expected.update({f"{prefix}.{i}.{k}": v for i in range(depth) for k, v in BLOCK.items()})
    with torch.device("meta"):
        ours = Eden(EdenConfig())
    assert _shapes(ours.state_dict()) == expected
    assert config_from_shapes(expected) == EdenConfig()
    assert is_eden_state({"eden": expected}) and is_eden_state(expected)


def test_tiny_file_loads_strictly(tmp_path):
    model = random_eden(**TINY, num_heads=4, seed=3)
    for name, wrapper in (("eden.pt", True), ("bare.pt", False), ("eden.safetensors", True)):
        path = save_eden(model, tmp_path / name, wrapper=wrapper)
        contents = torch.load(path, weights_only=True) if path.suffix == ".pt" else None
        if contents is not None:
            assert is_eden_state(contents)
            assert (list(contents) == ["eden"]) == wrapper
        loaded = load_eden(path, num_heads=4)
        assert loaded.config == model.config
        assert not loaded.training
        state = loaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # the heads are read as hidden // 64 unless given
    assert load_eden(tmp_path / "eden.pt").config.num_heads == 1
    assert not is_eden_state({"eden": {"conv.weight": torch.zeros(1)}})
    assert not is_eden_state({"flownet.weight": torch.zeros(1)})


@pytest.mark.parametrize("damage, words", [
    ("missing", "missing dit_blocks.1.mlp.fc2.bias"),
    ("shape", "wrong shape difference_embedder.weight (64, 2) for (64, 1)"),
    ("extra", "unexpected extra.weight"),
    ("not eden", "is not an EDEN checkpoint (no 'proj_in.weight')"),
])
def test_damaged_file_names_itself(tmp_path, damage, words):
    state = random_eden(**TINY).state_dict()
    if damage == "missing":
        del state["dit_blocks.1.mlp.fc2.bias"]
    elif damage == "shape":
        state["difference_embedder.weight"] = torch.zeros(64, 2)
    elif damage == "extra":
        state["extra.weight"] = torch.zeros(2)
    else:
        state = {"conv.weight": torch.zeros(2)}
    path = tmp_path / "eden.pt"
    torch.save({"eden": state}, path)
    with pytest.raises(ModelError) as err:
        load_eden(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and words in text, text


def test_unreadable_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_eden(tmp_path / "absent.pt")
    path = tmp_path / "code.pt"
    torch.save({"eden": {"proj_in.weight": torch.zeros(2)}, "obj": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(ModelError) as err:
        load_eden(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# agreement with the original and with direct computations


def test_denoise_and_decode_match_original(original):
    model = random_eden(**TINY, num_heads=4, seed=1)
    theirs = _original_tiny(original, model)
    g = torch.Generator().manual_seed(0)
    f0, f1 = _frames(64, 96, seed=2)
    cond_frames = torch.cat((f0, f1))
    latents = torch.randn((1, 2 * 3, 8), generator=g)
    t = torch.tensor([0.75])
    difference = torch.tensor([[-0.4]])
    with torch.no_grad():
        want_v = theirs.denoise(latents, t, cond_frames, difference)
        want_frame = theirs.decode(latents / VAE_SCALER + VAE_SHIFT)
        cond = model.condition(cond_frames)
        got_v = model.denoise(latents, t, cond, difference)
        got_frame = model.decode(latents / VAE_SCALER + VAE_SHIFT, cond)
    assert want_v.abs().mean() > 0.1 and want_frame.std() > 0.01
    torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_frame, want_frame, atol=1e-5, rtol=1e-5)


def test_midpoint_matches_original_pipeline(original):
    """The original inference.py's interpolate(), step by step, with the same noise: the ODE grid is
    the one its integrators.py hard-codes (the sampler's num_steps is not used)."""
    assert "self.t = th.tensor([0.00, 0.75, 1.00])" in original["integrators"]
    model = random_eden(**TINY, num_heads=2, seed=4)
    theirs = _original_tiny(original, model)
    f0, f1 = _frames(46, 70, seed=5)
    seed = 11
    with torch.no_grad():
        padder = original["InputPadder"]([46, 70])
        difference = ((torch.mean(torch.cosine_similarity(f0, f1), dim=[1, 2]) - COS_SIM_MEAN)
                      / COS_SIM_STD).unsqueeze(1)
        cond_frames = padder.pad(torch.cat((f0, f1), dim=0))
        h, w = cond_frames.shape[2:]
        assert (h, w) == (64, 96)
        noise = torch.randn([1, h // 32 * w // 32, 8], generator=torch.Generator().manual_seed(seed))
        x = noise + 0.75 * theirs.denoise(noise, torch.zeros(1), cond_frames, difference)
        x = x + 0.25 * theirs.denoise(x, torch.full((1,), 0.75), cond_frames, difference)
        want = padder.unpad(theirs.decode(x / VAE_SCALER + VAE_SHIFT).clamp(0.0, 1.0))
    got = model.midpoint(f0, f1, seed)
    assert got.shape == (1, 3, 46, 70)
    assert 0.0 < (want > 0).float().mean() and want.std() > 0.01
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias


def _attend(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, q (m, D), k and v (n, D), by hand."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        w = torch.exp(qh @ kh.T / math.sqrt(d))
        out.append((w / w.sum(-1, keepdim=True)) @ vh)
    return torch.cat(out, dim=-1)


def test_dit_block_by_hand():
    dim, heads, ph, pw = 32, 4, 4, 6
    torch.manual_seed(0)
    block = DiTBlock(dim, heads)
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn(prm.shape) / (prm.shape[-1] ** 0.5 if prm.dim() > 1 else 4))
    x = torch.randn(1, ph // 2 * pw // 2, dim)
    t0, t1 = torch.randn(1, ph * pw, dim), torch.randn(1, ph * pw, dim)
    mods = torch.randn(1, 6 * dim) * 0.5
    with torch.no_grad():
        got = block(x, t0, t1, ph, pw, mods)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[0].chunk(6)
        xs = x[0]
        wq, wk, wv = block.self_attn.qkv.weight.split(dim)
        hn = _layer_norm(xs, block.norm_self_attn) * (1 + scale_a) + shift_a
        xs = xs + gate_a * (_attend(hn @ wq.T, hn @ wk.T, hn @ wv.T, heads) @ block.self_attn.proj.weight.T)
        # temporal: each latent token (r, c) with the 2x2 patches (2r..2r+1, 2c..2c+1) of both frames
        hn = _layer_norm(xs, block.norm_temp_attn)
        wq, wk, wv = block.temp_attn.qkv.weight.split(dim)
        rows = []
        for i in range(xs.shape[0]):
            r, c = divmod(i, pw // 2)
            under = [(2 * r + a) * pw + 2 * c + b for a in (0, 1) for b in (0, 1)]
            seq = torch.cat((t0[0, under], hn[i:i + 1], t1[0, under]))
            rows.append(_attend(hn[i:i + 1] @ wq.T, seq @ wk.T, seq @ wv.T, heads))
        xs = xs + torch.cat(rows) @ block.temp_attn.proj.weight.T
        hn = _layer_norm(xs, block.norm_mlp) * (1 + scale_m) + shift_m
        hid = hn @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
        want = xs + gate_m * (hid @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the sampler's behaviour


def test_deterministic_per_seed_and_own_size():
    model = random_eden(**TINY, seed=7)
    f0, f1 = _frames(46, 70, seed=8)
    a, b = model.midpoint(f0, f1, 5), model.midpoint(f0, f1, 5)
    other = model.midpoint(f0, f1, 6)
    assert a.shape == (1, 3, 46, 70) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - other).abs().mean() > 1e-3
    assert a.min() >= 0 and a.max() <= 1
    # fp16 asked on the CPU: no autocast there, the fp32 result
    assert torch.equal(model.midpoint(f0, f1, 5, precision="fp16"), a)
    with pytest.raises(ValueError):
        model.midpoint(f0, f1, 5, precision="fp8")
    # a batch of pairs gives each pair's own midpoint for its seed
    g0, g1 = _frames(46, 70, seed=9)
    both = model.midpoints(torch.cat((f0, g0)), torch.cat((f1, g1)), [5, 3])
    torch.testing.assert_close(both[:1], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], model.midpoint(g0, g1, 3), atol=1e-5, rtol=1e-5)
    # sizes already a multiple of 32 are not padded
    h0, h1 = _frames(64, 32, seed=10)
    assert model.midpoint(h0, h1, 0).shape == (1, 3, 64, 32)
