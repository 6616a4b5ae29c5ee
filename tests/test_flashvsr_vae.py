"""FlashVSR's full-mode decoder, the Wan 2.1 VAE decoder (vsr_ddp/models/flashvsr/vae.py), against an
independent reference: diffusers' AutoencoderKLWan, the same network under other names. A tiny
configuration of the published layout (base dim 8 instead of 96; z_dim 16, channel multipliers
1, 2, 4, 4, two residual blocks per level and the temporal upsampling of levels 1-2, as published)
with random weights; the names are converted here from diffusers' to the published file's
(Wan's own ``WanVAE_`` names: ``decoder.upsamples.N.residual.K``, ``conv2``, ...), and the result is
checked against diffusers' own converter for that file (``convert_wan_vae_to_diffusers``).

Where diffusers and FlashVSR's original (diffsynth/models/wan_video_vae.py) differ, the decoder
follows the original, and none of it shows in float32: diffusers' RMS norm upcasts half types to
float32 (the original normalises in the working dtype); diffusers' decode takes un-normalised
latents (its pipelines compute ``latents / (1 / std) + mean`` first; the original's decode does that
itself, as WanVAEDecoder.decode does); the first-frame rule of the temporal upsampling ('Rep': the
clip's first frame is not doubled, the second frame's time_conv pads with zeros) and the
one-latent-frame-at-a-time decode loop are the same in both."""
from __future__ import annotations

import re

import pytest
import torch
from builders import randomize

from vsr_ddp.models.flashvsr.vae import LATENT_MEAN, LATENT_STD, WanVAEDecoder, load_wan_vae_decoder
from vsr_ddp.models.sr import ModelError

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

DIM = 8
TINY = dict(base_dim=DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
            temperal_downsample=[False, True, True])
RES_PER_LEVEL = TINY["num_res_blocks"] + 1  # residual blocks per decoder level


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch at one thread


RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
          "conv_shortcut": "shortcut"}


def to_published(key: str) -> str:
    """A diffusers AutoencoderKLWan key -> its name in Wan2.1_VAE.pth (Wan's WanVAE_ names)."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    part, _, rest = rest.partition(".")  # head is encoder or decoder
    if part == "conv_in":
        return f"{head}.conv1.{rest}"
    if part == "norm_out":
        return f"{head}.head.0.{rest}"
    if part == "conv_out":
        return f"{head}.head.2.{rest}"
    m = re.fullmatch(r"(resnets|attentions)\.(\d+)\.(.*)", rest)
    if part == "mid_block" and m:  # resnets.0, attentions.0, resnets.1 -> middle.0, 1, 2
        kind, i, tail = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"{head}.middle.1.{tail}"
        name, _, tail = tail.partition(".")
        return f"{head}.middle.{2 * i}.{RESNET[name]}.{tail}"
    if part == "down_blocks":  # already one flat list: only the residual names change
        i, _, tail = rest.partition(".")
        name, _, tail2 = tail.partition(".")
        return f"encoder.downsamples.{i}.{RESNET.get(name, name)}" + (f".{tail2}" if tail2 else "")
    if part == "up_blocks":  # level i: res blocks i*(n+1)+j, then its Resample
        m = re.fullmatch(r"(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", rest)
        level, kind, j, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "upsamplers":
            return f"decoder.upsamples.{level * (RES_PER_LEVEL + 1) + RES_PER_LEVEL}.{tail}"
        name, _, tail = tail.partition(".")
        return f"decoder.upsamples.{level * (RES_PER_LEVEL + 1) + j}.{RESNET[name]}.{tail}"
    raise KeyError(key)


@pytest.fixture(scope="module")
def reference():
    """A tiny diffusers Wan VAE with random weights, and its state dict in the published layout."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY).eval()
    state = randomize(ref, 1)
    published = {to_published(k): v for k, v in state.items()}
    assert len(published) == len(state)
    return ref, published


def decoder_state(published: dict) -> dict:
    return {k: v for k, v in published.items() if k.startswith(("decoder.", "conv2."))}


@pytest.fixture(scope="module")
def ours(reference):
    net = WanVAEDecoder(dim=DIM).eval()
    net.load_state_dict(decoder_state(reference[1]), strict=True)
    return net


def latents(t: int = 4, h: int = 4, w: int = 6, seed: int = 2) -> torch.Tensor:
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed))  # (B, C, T, h, w)


def ref_decode(ref: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """Diffusers' way: un-normalise as its Wan pipelines do, then decode (clamped to [-1, 1])."""
    mean = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        return ref.decode(z / inv_std + mean).sample


# ------------------------------------------------------------------------------------------------

def test_key_names():
    """A handful of names checked by hand against the original's module tree, and the whole
    conversion against diffusers' own converter of the published file; the published sizes give
    the published counts (meta device)."""
    by_hand = {
        "post_quant_conv.weight": "conv2.weight",
        "quant_conv.bias": "conv1.bias",
        "decoder.conv_in.weight": "decoder.conv1.weight",
        "decoder.mid_block.resnets.0.norm1.gamma": "decoder.middle.0.residual.0.gamma",
        "decoder.mid_block.attentions.0.to_qkv.weight": "decoder.middle.1.to_qkv.weight",
        "decoder.mid_block.resnets.1.conv2.bias": "decoder.middle.2.residual.6.bias",
        "decoder.up_blocks.0.upsamplers.0.time_conv.weight": "decoder.upsamples.3.time_conv.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": "decoder.upsamples.4.shortcut.weight",
        "decoder.up_blocks.2.upsamplers.0.resample.1.bias": "decoder.upsamples.11.resample.1.bias",
        "decoder.up_blocks.3.resnets.2.norm2.gamma": "decoder.upsamples.14.residual.3.gamma",
        "decoder.norm_out.gamma": "decoder.head.0.gamma",
        "decoder.conv_out.weight": "decoder.head.2.weight",
        "encoder.down_blocks.3.time_conv.weight": "encoder.downsamples.3.time_conv.weight",
    }
    for diff, pub in by_hand.items():
        assert to_published(diff) == pub

    with torch.device("meta"):
        ref = AutoencoderKLWan()  # the published sizes
        net = WanVAEDecoder()
    ref_state = ref.state_dict()
    published = {to_published(k): v for k, v in ref_state.items()}
    back = convert_wan_vae_to_diffusers(published)
    assert set(back) == set(ref_state)
    assert all(back[k] is ref_state[k] for k in back)
    assert len(published) == 194 and sum(v.numel() for v in published.values()) == 126_892_531
    mine = net.state_dict()
    dec = decoder_state(published)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in dec.items()}
    assert len(mine) == 108 and sum(v.numel() for v in mine.values()) == 73_295_603
    assert not list(net.buffers())


def test_equals_diffusers(reference, ours):
    """Same random latents, float32: T latent frames -> 4T - 3 frames of 8x the size, as diffusers."""
    ref, _ = reference
    z = latents()
    want = ref_decode(ref, z)
    with torch.no_grad():
        got = ours.decode(z)
    assert got.shape == want.shape == (1, 3, 13, 32, 48)
    assert (want.abs() < 0.999).float().mean() > 0.5  # not saturated by the clamp
    assert want.std() > 0.05
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_chunks_equal_whole(reference, ours):
    """Latent frames fed in chunks of any size (the original feeds one at a time) give the same frames,
    each call the frames of its own latents; so does the single-frame clip."""
    z = latents(t=6, seed=3)
    with torch.no_grad():
        whole = ours.decode(z)
        assert whole.shape[2] == 4 * 6 - 3
        torch.testing.assert_close(ours.decode(z, chunk=4), whole, rtol=0, atol=1e-5)
        cache: dict = {}
        parts = [ours.feed(z[:, :, a:b], cache) for a, b in ((0, 2), (2, 3), (3, 6))]
    assert [p.shape[2] for p in parts] == [5, 4, 12]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)
    with torch.no_grad():
        one = ours.decode(z[:, :, :1])
    assert one.shape[2] == 1
    torch.testing.assert_close(one, whole[:, :, :1], rtol=0, atol=1e-5)
    torch.testing.assert_close(one, ref_decode(reference[0], z[:, :, :1]), rtol=0, atol=1e-5)


def test_tiled_decode_as_the_original(reference, ours):
    """decode_tiled against the original's tiled_decode loop written here (its task list and
    build_mask ramps) around diffusers' decode of each tile."""
    ref, _ = reference
    z = latents(t=2, h=6, w=10, seed=4)
    tile, stride, up = (4, 6), (2, 4), 8
    _, _, t, h, w = z.shape
    tasks = []
    for y in range(0, h, stride[0]):
        if y - stride[0] >= 0 and y - stride[0] + tile[0] >= h:
            continue
        for x in range(0, w, stride[1]):
            if x - stride[1] >= 0 and x - stride[1] + tile[1] >= w:
                continue
            tasks.append((y, y + tile[0], x, x + tile[1]))
    assert len(tasks) == 4

    def mask_1d(n, left, right, border):
        m = torch.ones(n)
        if not left:
            m[:border] = (torch.arange(border) + 1) / border
        if not right:
            m[-border:] = torch.flip((torch.arange(border) + 1) / border, dims=(0,))
        return m

    values = torch.zeros(1, 3, 4 * t - 3, h * up, w * up)
    weight = torch.zeros(1, 1, 4 * t - 3, h * up, w * up)
    for y, y_, x, x_ in tasks:
        part = ref_decode(ref, z[:, :, :, y:y_, x:x_])
        H, W = part.shape[-2:]
        mh = mask_1d(H, y == 0, y_ >= h, (tile[0] - stride[0]) * up)[:, None].expand(H, W)
        mw = mask_1d(W, x == 0, x_ >= w, (tile[1] - stride[1]) * up)[None, :].expand(H, W)
        mask = torch.stack([mh, mw]).min(dim=0).values
        values[:, :, :, y * up:y * up + H, x * up:x * up + W] += part * mask
        weight[:, :, :, y * up:y * up + H, x * up:x * up + W] += mask
    want = (values / weight).clamp(-1, 1)
    with torch.no_grad():
        got = ours.decode_tiled(z, tile=tile, stride=stride)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_loads_published_layout(reference, tmp_path):
    """A tiny file in the published layout (a raw state dict, encoder keys included) loads strictly
    through load_wan_vae_decoder, its sizes read from the file, and decodes as diffusers; so does the
    ``model_state`` wrapper the original's converter unwraps, and a .safetensors of the same keys."""
    ref, published = reference
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(published, path)
    assert any(k.startswith("encoder.") for k in published) and "conv1.weight" in published
    net = load_wan_vae_decoder(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert set(net.state_dict()) == set(decoder_state(published))
    z = latents(t=3, seed=5)
    want = ref_decode(ref, z)
    with torch.no_grad():
        torch.testing.assert_close(net.decode(z), want, rtol=0, atol=1e-5)

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model_state": published}, wrapped)
    from safetensors.torch import save_file

    flat = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in published.items()}, str(flat))
    for other in (wrapped, flat):
        with torch.no_grad():
            torch.testing.assert_close(load_wan_vae_decoder(other).decode(z), want, rtol=0, atol=1e-5)

    net = load_wan_vae_decoder(path, dtype=torch.bfloat16)
    assert net.conv2.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = net.decode(z.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == want.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("damage, named", [
    ("missing", "decoder.upsamples.3.time_conv.bias"),
    ("unexpected", "decoder.upsamples.99.gamma"),
    ("shape", "decoder.head.2.bias"),
    ("object", "cannot read"),
    ("absent", "does not exist"),
])
def test_misfit_is_one_line(reference, tmp_path, damage, named):
    """A file that does not fit: one-line ModelError (a ValueError) naming the file and the key."""
    state = dict(reference[1])
    path = tmp_path / "Wan2.1_VAE.pth"
    if damage == "missing":
        del state[named]
    elif damage == "unexpected":
        state[named] = torch.ones(3)
    elif damage == "shape":
        state[named] = torch.zeros(4)
    if damage == "object":
        torch.save({"model_state": state, "config": object()}, path)
    elif damage != "absent":
        torch.save(state, path)
    with pytest.raises(ModelError) as err:
        load_wan_vae_decoder(path)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in msg and str(path) in msg and named in msg
    if damage == "shape":
        assert "(4,) for (3,)" in msg
