"""AnimeSR (vsr_ddp/models/animesr.py): checkpoints are recognised and loaded strictly, the streamed
output does not depend on how a clip is cut into pieces, and it equals an independent implementation
(ccrestoration 0.2.2's MSRSWVSR, MIT) with the same random weights."""
from __future__ import annotations

import re
import zipfile

import numpy as np
import pytest
import torch

from vsr_ddp.models.animesr import AnimeSR, MSRSWVSR, load_animesr, looks_like_animesr

LAYOUTS = ("raw", "params", "params_ema")


def random_state(seed: int = 0) -> dict:
    """torch's default initialisation: the net adds about 0.05 (std) to the bilinear upscale, and
    over 90% of the outputs are inside [0, 1] (not clipped)."""
    torch.manual_seed(seed)
    return MSRSWVSR().state_dict()


def save(state: dict, path, layout: str):
    torch.save(state if layout == "raw" else {layout: state}, str(path))
    return path


def clip(n: int, h: int, w: int, dtype=np.uint8, seed: int = 1) -> np.ndarray:
    """Smooth moving gradients with a little noise: (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    peak = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for t in range(n):
        base = np.stack([(xx + 2 * t) / w, (yy + t) / h, ((xx + yy + 3 * t) % 17) / 17], axis=-1)
        frames.append(np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * peak)
    return np.round(np.array(frames)).astype(dtype)


def reference_net(wheel, state: dict):
    """ccrestoration's MSRSWVSR read out of the wheel (its file and arch_util.py only; the package's
    registries and other dependencies are left out), with ``state`` loaded strictly."""
    with zipfile.ZipFile(wheel) as z:
        util_src = z.read("ccrestoration/arch/arch_util.py").decode()
        arch_src = z.read("ccrestoration/arch/msrswvsr_arch.py").decode()
    util: dict = {"__name__": "ccrestoration_arch_util"}
    exec(compile(util_src, "ccrestoration/arch/arch_util.py", "exec"), util)

    class Registry:
        def register(self, name=None):
            return lambda cls: cls

    class ArchType:
        MSRSWVSR = "MSRSWVSR"

    ns: dict = {"__name__": "ccrestoration_msrswvsr", "ARCH_REGISTRY": Registry(), "ArchType": ArchType,
                "ResidualBlockNoBN": util["ResidualBlockNoBN"], "pixel_unshuffle": util["pixel_unshuffle"]}
    arch_src = re.sub(r"^from ccrestoration[^\n]*$", "", arch_src, flags=re.M)
    exec(compile(arch_src, "ccrestoration/arch/msrswvsr_arch.py", "exec"), ns)
    net = ns["MSRSWVSR"](num_feat=64, num_block=(5, 3, 2), netscale=4)
    net.load_state_dict(state, strict=True)
    return net.eval()


@torch.inference_mode()
def reference_float(net, frames: np.ndarray) -> np.ndarray:
    """The reference's output of a whole clip, in float: (n, 4H, 4W, 3)."""
    peak = np.iinfo(frames.dtype).max
    x = torch.from_numpy(frames.astype(np.int32)).permute(0, 3, 1, 2).float().div_(peak)
    return net(x[None])[0].permute(0, 2, 3, 1).numpy()


def stream(model: AnimeSR, frames: np.ndarray, pieces) -> np.ndarray:
    model.start()
    outs, i = [], 0
    for k, size in enumerate(pieces):
        out = model.feed(frames[i:i + size], last=k == len(pieces) - 1)
        i += size
        outs.append(out)
    assert i == len(frames)
    return np.concatenate(outs)


@pytest.mark.network
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [(24, 32), (22, 30)])  # (H, W): a multiple of 4, and not
def test_equals_the_reference(ccrestoration_wheel, tmp_path, layout, size):
    state = random_state()
    model = load_animesr(save(state, tmp_path / "AnimeSR_v2.pth", layout), "cpu")
    ref = reference_net(ccrestoration_wheel, state)
    h, w = size
    for dtype in (np.uint8, np.uint16):
        frames = clip(6, h, w, dtype)
        peak = np.iinfo(dtype).max
        want = reference_float(ref, frames)
        assert want.shape == (6, 4 * h, 4 * w, 3)
        assert 0.05 < (0 < want).mean() and (want < 1).mean() > 0.05  # not all clipped
        got = stream(model, frames, [6])
        assert got.shape == want.shape and got.dtype == dtype
        want_q = np.round(np.clip(want, 0, 1) * peak)
        # fp32 tolerance: the same arithmetic in a different order can move a value across a rounding edge
        diff = np.abs(got.astype(np.int64) - want_q)
        assert diff.max() <= 1, (dtype, diff.max())
        assert (diff > 0).mean() < 1e-3, (dtype, (diff > 0).mean())


def test_pieces_equal_one_call_bit_for_bit(tmp_path):
    model = AnimeSR(_net())
    for h, w in ((24, 32), (22, 30)):
        frames = clip(6, h, w)
        whole = stream(model, frames, [6])
        assert whole.shape == (6, 4 * h, 4 * w, 3)
        for pieces in ([1, 2, 3], [3, 2, 1], [1] * 6, [2, 4], [6, 0]):
            assert np.array_equal(stream(model, frames, pieces), whole), pieces
        assert np.array_equal(stream(model, frames, [6]), whole)  # start() forgets everything


def test_outputs_are_returned_once_the_next_frame_is_fed():
    model = AnimeSR(_net())
    frames = clip(4, 8, 12)
    model.start()
    assert len(model.feed(frames[:1], last=False)) == 0
    assert len(model.feed(frames[1:3], last=False)) == 2
    assert len(model.feed(frames[3:], last=True)) == 2
    # last=True ends the range: the next frame fed is the first of a new one
    one = model.feed(frames[:1], last=True)
    assert one.shape == (1, 32, 48, 3) and one.dtype == np.uint8
    assert model.feed(frames[:0], last=True).shape == (0, 32, 48, 3)


def test_uint16_in_uint16_out():
    model = AnimeSR(_net())
    eight = stream(model, clip(3, 8, 8), [3])
    sixteen = stream(model, clip(3, 8, 8).astype(np.uint16) * 257, [3])
    assert sixteen.dtype == np.uint16 and sixteen.shape == eight.shape
    assert np.abs(sixteen / 257.0 - eight).max() <= 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoints_are_recognised_by_their_keys(tmp_path, layout):
    state = random_state()
    wrapped = state if layout == "raw" else {layout: state}
    assert looks_like_animesr(wrapped)
    assert not looks_like_animesr({"conv_first.weight": torch.zeros(1), "params": {"body.0.weight": 0}})
    model = load_animesr(save(state, tmp_path / "a.pth", layout), "cpu")
    assert isinstance(model, AnimeSR) and model.scale == 4


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path, change):
    state = random_state()
    if change == "missing":
        del state["recurrent_cell.fusion.2.bias"]
    elif change == "extra":
        state["recurrent_cell.fusion.3.weight"] = torch.zeros(3)
    else:
        state["recurrent_cell.fusion.2.bias"] = torch.zeros(5)
    path = save(state, tmp_path / "AnimeSR_v2.pth", "params_ema")
    with pytest.raises(ValueError) as e:
        load_animesr(path, "cpu")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "fusion" in msg, msg


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    from builders import make_code_checkpoint

    marker = tmp_path / "payload_ran"
    path = make_code_checkpoint(tmp_path / "AnimeSR_v2.pth", marker)
    with pytest.raises(ValueError) as e:
        load_animesr(path, "cpu")
    msg = str(e.value)
    assert not marker.exists(), "the checkpoint's pickle was run as code"
    assert str(path) in msg and "\n" not in msg and "Python objects" in msg, msg
    assert "weights_only" not in msg


def test_reach():
    pytest.importorskip("vsr_ddp.models.temporal")
    r = AnimeSR.reach
    assert (r.before, r.after, r.recurrent, r.exact, r.align) == (1, 1, True, True, 1)


def _net() -> MSRSWVSR:
    net = MSRSWVSR()
    net.load_state_dict(random_state())
    return net


def test_a_preroll_holds_the_first_frame_still_before_its_output(tmp_path):
    """AnimeSR(net, preroll=k): the outputs of a range are those of the same range with its first
    frame put k more times in front (the preroll-0 path, checked against ccrestoration above), the
    first k outputs dropped; in pieces as in one call; 0 leaves AnimeSR's own cold start. A
    safetensors checkpoint names its pre-roll in its metadata."""
    from safetensors.torch import save_file

    frames = clip(5, 16, 20)
    plain = AnimeSR(_net())
    for k in (1, 3):
        rolled = AnimeSR(_net(), preroll=k)
        want = stream(plain, np.concatenate([np.repeat(frames[:1], k, 0), frames]), [5 + k])[k:]
        got = stream(rolled, frames, [5])
        assert got.shape == (5, 64, 80, 3) and np.array_equal(got, want), k
        assert np.array_equal(stream(rolled, frames, [2, 1, 2]), got)
        assert not np.array_equal(got[0], stream(plain, frames, [5])[0])  # the cold start differs
    state = {k: v.contiguous() for k, v in _net().state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"preroll": "3"})
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert load_animesr(tmp_path / "m.safetensors").preroll == 3
    assert load_animesr(tmp_path / "plain.safetensors").preroll == 0
