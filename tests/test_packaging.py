"""vsr_ddp as users install it: a built wheel, installed elsewhere, run from another folder."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from builders import make_clip
from conftest import ROOT, job_env

# What setup.cfg builds from; copied so that building leaves no build/ or egg-info in the checkout.
SOURCES = ["vsr_ddp", "conf", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"]


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"pip {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif p.exists():
            shutil.copy2(p, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    src = source
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(dist), ".", cwd=src)
    (whl,) = dist.glob("vsr_ddp-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_every_module_the_configs_and_the_shipped_model(source, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(source).as_posix() for p in (source / "vsr_ddp").rglob("*.py")}
    assert modules and not modules - names, f"setup.cfg's packages miss {sorted(modules - names)}"
    configs = {"vsr_ddp/" + p.relative_to(source).as_posix() for p in (source / "conf").rglob("*.yaml")}
    assert "vsr_ddp/conf/config.yaml" in configs and "vsr_ddp/conf/job/upscale.yaml" in configs
    assert not configs - names, f"the wheel lacks {sorted(configs - names)}"
    assert "vsr_ddp/weights/compact_x2.safetensors" in names
    assert not [n for n in names if n.startswith("conf/")], "conf/ must live inside the package"


@pytest.mark.slow
def test_installed_wheel_runs_from_any_folder(wheel, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--quiet", "--target", str(target), str(wheel), cwd=tmp_path)
    clip = make_clip(tmp_path / "clip.mp4", frames=12, size=(64, 48))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = job_env()
    env["PYTHONPATH"] = str(target)  # before the checkout's editable install on sys.path

    where = subprocess.run([sys.executable, "-c", "import vsr_ddp; print(vsr_ddp.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).resolve() == (target / "vsr_ddp" / "__init__.py").resolve(), where

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vsr_ddp", "job=upscale", f"input={clip}", f"output={out}",
                           "job.model=bicubic", "job.scale=2", "dry_run=true"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Primary config directory not found" not in proc.stderr
    assert "1 video(s), 1 unit(s), 1 rank(s)" in proc.stdout
    assert re.search(r"clip segment_0000: owns \[0, 12\) reads \[0, 12\)", proc.stdout), proc.stdout
    assert not (out / "clip.mp4").exists()
    assert not list(elsewhere.iterdir()), "the run left files in the working folder"


@pytest.mark.parametrize("script", sorted((ROOT / "launch").glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_scripts_run_the_installed_package(script):
    """The scripts start `-m vsr_ddp` from PATH (an installed vsr_ddp), never a file of a checkout."""
    text = script.read_text(encoding="utf-8")
    code = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    launches = [line for line in code if re.search(r"\btorchrun\b", line)]
    assert launches, f"{script.name} starts no torchrun"
    assert all(re.search(r"-m vsr_ddp\b", line) or line.rstrip().endswith("\\") for line in launches)
    assert re.search(r"torchrun [^\n]*(\\\n[^\n]*)*-m vsr_ddp\b", text), script.name
    checkout = re.compile(r"((?<![.\w])vsr_ddp/|\.py\b|SLURM_SUBMIT_DIR|BASH_SOURCE|dirname \"\$0\")")
    for line in code:
        assert not checkout.search(line), f"{script.name} depends on the checkout: {line.strip()}"
