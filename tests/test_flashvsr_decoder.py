"""FlashVSR's LQ projector and tiny conditional decoder (vsr_ddp/models/flashvsr/decoder.py): the
published files' layouts load strictly and misfits are named in one line; the outputs equal
computations written here from the original's code (examples/WanVSR/utils/utils.py, TCDecoder.py:
its per-group cache loop, its frame-by-frame work queue), and streaming in chunks equals one call.
Tiny channel counts throughout; the published sizes are checked on the meta device."""
from __future__ import annotations

import math

import pytest
import torch
from builders import randomize
import torch.nn.functional as F

from vsr_ddp.models.flashvsr.decoder import (CausalConv3d, LQProjector, TCDecoder, load_lq_proj,
                                             load_tcdecoder, space_time_to_channels)

LQ_TINY = dict(in_dim=3, out_dim=6, layer_num=2, hidden=(8, 12))
DEC_TINY = dict(channels=(6, 5, 4, 3), latent_channels=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch at one thread


# ------------------------------------------------------------------------------------------------
# References, written from the original
# ------------------------------------------------------------------------------------------------

def ref_unshuffle(x: torch.Tensor, ff: int, hh: int, ww: int) -> torch.Tensor:
    """einops 'b c (f ff) (h hh) (w ww) -> b (c ff hh ww) f h w', one output channel at a time."""
    chans = [x[:, c, i::ff, j::hh, k::ww]
             for c in range(x.shape[1]) for i in range(ff) for j in range(hh) for k in range(ww)]
    return torch.stack(chans, dim=1)


def ref_causal_conv(x, weight, bias, cache):
    """The original CausalConv3d: the cache in front, replicate padding for what it lacks (time front
    2, height and width 1 each side), stride (2, 1, 1)."""
    front = 2
    if cache is not None:
        x = torch.cat([cache, x], dim=2)
        front -= cache.shape[2]
    return F.conv3d(F.pad(x, (1, 1, 1, 1, front, 0), mode="replicate"), weight, bias, stride=(2, 1, 1))


def ref_rms(x, gamma):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1]) * gamma


def ref_projector(sd: dict, video: torch.Tensor, causal: bool) -> list[torch.Tensor]:
    """The original forward(): 3 copies of frame 0 in front, groups of 4 frames, the first group only
    fills the caches. causal (v1.1): each conv gets the previous group's last 2 frames; otherwise
    (v1): its own input's last 2 frames."""
    t = video.shape[2]
    video = torch.cat([video[:, :, :1].repeat(1, 1, 3, 1, 1), video], dim=2)
    cache1 = cache2 = None
    outs = []
    for i in range(1 + (t - 1) // 4):
        x = ref_unshuffle(video[:, :, 4 * i:4 * i + 4], 1, 16, 16)
        if not causal:
            cache1 = x[:, :, -2:]
        y = ref_causal_conv(x, sd["conv1.weight"], sd["conv1.bias"], cache1)
        cache1 = x[:, :, -2:]
        y = F.silu(ref_rms(y, sd["norm1.gamma"]))
        before2 = cache2 if causal else y[:, :, -2:]
        cache2 = y[:, :, -2:]
        if i == 0:
            continue
        z = ref_causal_conv(y, sd["conv2.weight"], sd["conv2.bias"], before2)
        outs.append(F.silu(ref_rms(z, sd["norm2.gamma"])))
    z = torch.cat(outs, dim=2)  # (B, C, f, h, w)
    tokens = torch.stack([z[:, :, f, i, j] for f in range(z.shape[2]) for i in range(z.shape[3])
                          for j in range(z.shape[4])], dim=1)  # (B, f*h*w, C)
    n = len({k.split(".")[1] for k in sd if k.startswith("linear_layers.")})
    return [tokens @ sd[f"linear_layers.{m}.weight"].T + sd[f"linear_layers.{m}.bias"] for m in range(n)]


# the original decoder stack, by index (TAEHV with an identity conv + ReLU after each outer ReLU)
DEC_SPEC = (["clamp", "conv", "relu", "conv", "relu"] + ["mem"] * 3 + ["up", ("grow", 1), "conv"]
            + ["mem"] * 3 + ["up", ("grow", 2), "conv"] + ["mem"] * 3 + ["up", ("grow", 2), "conv"]
            + ["relu", "conv", "relu", "conv"])


def ref_decoder(sd: dict, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The original decode_video(parallel=False) on a fresh decoder, then the pipeline's x*2-1:
    frame by frame through a depth-first work queue, each MemBlock given its previous input (zeros
    first), the first 3 output frames dropped."""
    if cond.shape[2] % 4:
        cond = torch.cat([cond[:, :, :1].repeat(1, 1, 4 - cond.shape[2] % 4, 1, 1), cond], dim=2)
    x = torch.cat([ref_unshuffle(cond, 4, 8, 8), latents], dim=1)  # (B, 768 + C, T, h, w)
    memory, out = {}, []

    def conv(i, v, name="decoder.{}"):
        w = sd[name.format(i) + ".weight"]
        return F.conv2d(v, w, sd.get(name.format(i) + ".bias"), padding=w.shape[-1] // 2)

    def run(i, v):
        if i == len(DEC_SPEC):
            out.append(v)
            return
        kind = DEC_SPEC[i]
        if kind == "clamp":
            run(i + 1, torch.tanh(v / 3) * 3)
        elif kind == "conv":
            run(i + 1, conv(i, v))
        elif kind == "relu":
            run(i + 1, F.relu(v))
        elif kind == "up":
            run(i + 1, F.interpolate(v, scale_factor=2, mode="nearest"))
        elif kind == "mem":
            past = memory.get(i, torch.zeros_like(v))
            memory[i] = v
            h = F.relu(conv(0, torch.cat([v, past], dim=1), f"decoder.{i}.conv.{{}}"))
            h = F.relu(conv(2, h, f"decoder.{i}.conv.{{}}"))
            run(i + 1, F.relu(conv(4, h, f"decoder.{i}.conv.{{}}") + v))
        else:  # ("grow", stride): a 1x1 conv, its channel blocks are the next frames in order
            y = F.conv2d(v, sd[f"decoder.{i}.conv.weight"])
            for part in y.chunk(kind[1], dim=1):
                run(i + 1, part)

    for t in range(x.shape[2]):
        run(0, x[:, :, t])
    return torch.stack(out, dim=2)[:, :, 3:] * 2 - 1


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ff,hh,ww", [(4, 8, 8), (1, 16, 16), (2, 3, 1)])
def test_space_time_to_channels_is_the_originals_pixelshuffle3d(ff, hh, ww):
    x = torch.randn(2, 3, 2 * ff, 2 * hh, 3 * ww)
    assert torch.equal(space_time_to_channels(x, ff, hh, ww), ref_unshuffle(x, ff, hh, ww))


def test_causal_conv_equals_an_explicit_sum():
    """Given two copies of frame 0 in front (a clip's start), the conv is out[t] = b + sum over
    (dt, dy, dx) of w * input[2t + dt], with the spatial borders replicated."""
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3)
    x = torch.randn(1, 2, 7, 4, 5)
    got = conv(torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2))
    t_idx = torch.tensor([0, 0] + list(range(7)))
    y_idx = torch.arange(-1, 5).clamp(0, 3)
    x_idx = torch.arange(-1, 6).clamp(0, 4)
    xp = x[:, :, t_idx][:, :, :, y_idx][:, :, :, :, x_idx]  # (1, 2, 9, 6, 7)
    w, b = conv.weight.detach(), conv.bias.detach()
    want = []
    for t in range((9 - 4) // 2 + 1):
        acc = b.view(1, 3, 1, 1).expand(1, 3, 4, 5).clone()
        for dt in range(4):
            for dy in range(3):
                for dx in range(3):
                    patch = xp[:, :, 2 * t + dt, dy:dy + 4, dx:dx + 5]
                    acc += torch.einsum("oc,bchw->bohw", w[:, :, dt, dy, dx], patch)
        want.append(acc)
    assert got.shape == (1, 3, 3, 4, 5)
    torch.testing.assert_close(got, torch.stack(want, dim=2), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The projector
# ------------------------------------------------------------------------------------------------

def tiny_projector(causal: bool, seed: int = 1) -> tuple[LQProjector, dict]:
    torch.manual_seed(seed)
    net = LQProjector(causal=causal, **LQ_TINY).eval()
    return net, randomize(net, seed)


@pytest.mark.parametrize("causal", [True, False])
def test_projector_whole_clip_equals_the_originals_group_loop(causal):
    net, sd = tiny_projector(causal)
    video = torch.rand(2, 3, 13, 32, 48) * 2 - 1  # 4k + 1 = 13 frames -> 3 token frames of 2 x 3
    with torch.no_grad():
        got = net(video)
    want = ref_projector(sd, video, causal)
    assert len(got) == 2 and all(g.shape == (2, 3 * 2 * 3, 6) for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_two_caches_differ():
    """v1.1's caches reach into the previous group, v1's do not: the same weights give other tokens."""
    net1, sd = tiny_projector(True)
    net0 = LQProjector(causal=False, **LQ_TINY)
    net0.load_state_dict(sd)
    video = torch.rand(1, 3, 9, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(net1(video)[0], net0(video)[0], atol=1e-4)


@pytest.mark.parametrize("causal,chunks", [
    (True, [1, 4, 4, 4, 4]),    # the pipeline: 1 frame, then 4 at a time
    (False, [1, 4, 4, 4, 4]),
    (True, [2, 3, 5, 1, 6]),    # any cut (causal)
    (False, [3, 6, 2, 6]),      # any cut (v1 buffers up to group ends)
    (True, [17]),
])
def test_projector_streamed_in_chunks_equals_one_call(causal, chunks):
    net, _ = tiny_projector(causal)
    video = torch.rand(1, 3, 17, 16, 32) * 2 - 1
    with torch.no_grad():
        whole = net(video)
        net.reset()
        parts, start = [], 0
        for n in chunks:
            out = net.feed(video[:, :, start:start + n])
            start += n
            if out is not None:
                parts.append(out)
    assert sum(chunks) == 17
    assert net.feed(video[:, :, :0]) is None
    for m in range(2):
        torch.testing.assert_close(torch.cat([p[m] for p in parts], dim=1), whole[m], rtol=1e-5, atol=1e-6)
    assert whole[0].shape == (1, 4 * 1 * 2, 6)  # 17 = 4 * 4 + 1 frames -> 4 token frames of 1 x 2


def test_projector_first_call_primes_only():
    net, _ = tiny_projector(True)
    with torch.no_grad():
        assert net.feed(torch.rand(1, 3, 1, 16, 16)) is None   # the pipeline's first call
        assert net.feed(torch.rand(1, 3, 4, 16, 16))[0].shape == (1, 1, 6)


def test_projector_rejects_bad_frames():
    net, _ = tiny_projector(True)
    with pytest.raises(ValueError, match="multiples of 16"):
        net.feed(torch.rand(1, 3, 5, 24, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        net.feed(torch.rand(1, 4, 5, 16, 16))


# ------------------------------------------------------------------------------------------------
# The decoder
# ------------------------------------------------------------------------------------------------

def tiny_decoder(seed: int = 2) -> tuple[TCDecoder, dict]:
    torch.manual_seed(seed)
    net = TCDecoder(**DEC_TINY).eval()
    return net, randomize(net, seed)


def test_decoder_equals_the_originals_frame_by_frame_decode():
    net, sd = tiny_decoder()
    latents = torch.randn(1, 4, 3, 2, 3)
    cond = torch.rand(1, 3, 4 * 3 - 3, 16, 24) * 2 - 1   # 4T - 3 LQ frames, 8x the latent size
    with torch.no_grad():
        got = net(latents, cond)
    want = ref_decoder(sd, latents, cond)
    assert got.shape == (1, 3, 9, 16, 24) == want.shape
    assert want.std() > 0.05  # not a trivially flat output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_decoder_streamed_in_chunks_equals_one_call():
    """The pipeline's cut: 6 latents with 21 LQ frames, then 2 latents with 8 frames each."""
    net, _ = tiny_decoder()
    latents = torch.randn(2, 4, 10, 2, 2)
    cond = torch.rand(2, 3, 4 * 10 - 3, 16, 16) * 2 - 1
    with torch.no_grad():
        whole = net(latents, cond, frames_per_pass=None)
        net.reset()
        parts = [net.decode(latents[:, :, :6], cond[:, :, :21])]
        for s in (6, 8):
            parts.append(net.decode(latents[:, :, s:s + 2], cond[:, :, 4 * s - 3:4 * s + 5]))
        per_frame = net(latents, cond, frames_per_pass=1)
    assert [p.shape[2] for p in parts] == [21, 8, 8] and whole.shape == (2, 3, 37, 16, 16)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_frame, whole, rtol=1e-5, atol=1e-6)


def test_decoder_rejects_mismatched_condition():
    net, _ = tiny_decoder()
    latents = torch.randn(1, 4, 2, 2, 2)
    for frames in (7, 8):  # 2 latents need 5 condition frames at the start
        with pytest.raises(ValueError, match="need 5 condition frames"):
            net(latents, torch.rand(1, 3, frames, 16, 16))
    with pytest.raises(ValueError, match="condition must be"):
        net(latents, torch.rand(1, 3, 5, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        net(torch.randn(1, 16, 2, 2, 2), torch.rand(1, 3, 5, 16, 16))
    with torch.no_grad():
        net(latents, torch.rand(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match="need 8 condition frames"):  # mid-stream: 4 per latent frame
        net.decode(latents, torch.rand(1, 3, 5, 16, 16))


# ------------------------------------------------------------------------------------------------
# The published files
# ------------------------------------------------------------------------------------------------

def test_default_sizes_are_the_published_ones():
    """FlashVSR 1.3B (v1 and v1.1): LQ_proj_in.ckpt 8 tensors / 287,845,888 parameters, TCDecoder.ckpt
    66 / 45,338,371 (Buffer/Causal_LQ4x_Proj(3, 1536, layer_num=1); build_tcdecoder([512, 256, 128,
    128], new_latent_channels=16 + 768))."""
    with torch.device("meta"):
        lq, dec = LQProjector().state_dict(), TCDecoder().state_dict()
    assert (len(lq), sum(v.numel() for v in lq.values())) == (8, 287_845_888)
    assert (len(dec), sum(v.numel() for v in dec.values())) == (66, 45_338_371)
    assert {k: tuple(v.shape) for k, v in lq.items()} == {
        "conv1.weight": (2048, 768, 4, 3, 3), "conv1.bias": (2048,), "norm1.gamma": (2048, 1, 1, 1),
        "conv2.weight": (3072, 2048, 4, 3, 3), "conv2.bias": (3072,), "norm2.gamma": (3072, 1, 1, 1),
        "linear_layers.0.weight": (1536, 3072), "linear_layers.0.bias": (1536,)}
    assert tuple(dec["decoder.1.weight"].shape) == (512, 784, 3, 3)
    assert tuple(dec["decoder.26.weight"].shape) == (3, 128, 3, 3)
    assert tuple(dec["decoder.15.conv.weight"].shape) == (512, 256, 1, 1)
    assert "decoder.10.bias" not in dec and "decoder.3.bias" not in dec and "decoder.5.skip.weight" not in dec


def save(state: dict, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, str(path))  # the published .ckpt: a raw state dict
    return path


@pytest.mark.parametrize("name", ["LQ_proj_in.ckpt", "LQ_proj_in.safetensors"])
def test_lq_proj_file_loads_strictly(tmp_path, name):
    net, sd = tiny_projector(True)
    state = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # v1.1 ships it in bf16
    loaded = load_lq_proj(save(state, tmp_path / name), causal=False)
    assert isinstance(loaded, LQProjector) and not loaded.causal and not loaded.training
    assert len(loaded.linear_layers) == 2 and loaded.conv2.weight.shape[:2] == (12, 8)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k].float())


@pytest.mark.parametrize("name", ["TCDecoder.ckpt", "TCDecoder.safetensors"])
def test_tcdecoder_file_loads_strictly(tmp_path, name):
    net, sd = tiny_decoder()
    loaded = load_tcdecoder(save(sd, tmp_path / name))
    assert loaded.latent_channels == 4 and not loaded.training
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    latents, cond = torch.randn(1, 4, 1, 2, 2), torch.rand(1, 3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, cond), net(latents, cond))


def broken(state: dict, how: str) -> tuple[dict, str]:
    state = dict(state)
    key = sorted(state)[-1]
    if how == "missing":
        del state[key]
        return state, f"missing {key}"
    if how == "unexpected":
        state["module.extra.weight"] = torch.zeros(1)
        return state, "unexpected module.extra.weight"
    state[key] = torch.zeros(*state[key].shape, 2)
    return state, f"wrong shape {key}"


@pytest.mark.parametrize("how", ["missing", "unexpected", "wrong shape"])
@pytest.mark.parametrize("which", ["LQ_proj_in.ckpt", "TCDecoder.ckpt"])
def test_misfit_files_are_named_in_one_line(tmp_path, which, how):
    sd = tiny_projector(True)[1] if which.startswith("LQ") else tiny_decoder()[1]
    state, expect = broken(sd, how)
    path = save(state, tmp_path / which)
    loader = load_lq_proj if which.startswith("LQ") else load_tcdecoder
    with pytest.raises(ValueError) as e:
        loader(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expect in msg


class NotATensor:
    pass


@pytest.mark.parametrize("content,expect", [
    ("tensor", "not a state dict of tensors"),
    ("wrapped", "not a state dict of tensors"),   # the published files have no wrapper key
    ("object", "tensors-only"),                   # weights_only refuses to unpickle it
    ("garbage", "cannot read"),
    (None, "does not exist"),
])
@pytest.mark.parametrize("which", ["LQ_proj_in.ckpt", "TCDecoder.ckpt"])
def test_unreadable_files_are_named_in_one_line(tmp_path, which, content, expect):
    path = tmp_path / which
    if content == "tensor":
        torch.save(torch.zeros(3), str(path))
    elif content == "wrapped":
        torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, str(path))
    elif content == "object":
        torch.save({"conv1.weight": NotATensor()}, str(path))
    elif content == "garbage":
        path.write_bytes(b"not a checkpoint")
    loader = load_lq_proj if which.startswith("LQ") else load_tcdecoder
    with pytest.raises(ValueError) as e:
        loader(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expect in msg
