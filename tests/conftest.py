"""Shared fixtures: running the job the way users do (the command line, one process or torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def job_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "vsr_ddp", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "vsr_ddp", *overrides]


def job_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HYDRA_FULL_ERROR"] = "1"
    return env


def run_job(overrides: list[str], nproc: int = 1, check: bool = True, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m vsr_ddp`` (or torchrun with ``nproc`` ranks) as a user would."""
    proc = subprocess.run(job_cmd(overrides, nproc), capture_output=True, text=True, timeout=timeout,
                          env=job_env(), cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"vsr_ddp exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                             f"STDERR:\n{proc.stderr[-5000:]}")
    return proc


def read_report(output: Path) -> dict:
    return json.loads((Path(output) / "run_report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Session-wide sample clips, made once: {name: path}."""
    from builders import make_clip

    d = tmp_path_factory.mktemp("clips")
    return {
        "av": make_clip(d / "av.mp4", frames=48, size=(64, 48), fps="30000/1001", audio=True),
        "mkv": make_clip(d / "sub.mkv", frames=36, size=(64, 48), fps="25", audio=True, subtitles=True),
    }
