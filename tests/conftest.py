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
    """The command line of a vsr_ddp process (torchrun for ``nproc`` > 1): for tests marked slow."""
    _must_be_slow(f"{nproc} rank(s) in a process of their own")
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
            cwd: Path | None = None, process: bool = False) -> subprocess.CompletedProcess:
    """Run vsr_ddp's command line as a user would: ``torchrun`` with ``nproc`` ranks, or for one
    rank the same ``python -m vsr_ddp`` entry point (:func:`vsr_ddp.__main__.cli`: Hydra's command
    line, the settings check, the runner, the exit status) inside this process, which saves the
    seconds of starting Python and importing torch; ``process=True`` where the process itself is
    what a test is about (signals, an installed wheel, what reaches the terminal)."""
    if nproc == 1 and not process:
        proc = run_here(overrides, cwd=cwd or ROOT)
    else:
        proc = subprocess.run(job_cmd(overrides, nproc), capture_output=True, text=True, timeout=timeout,
                              env=job_env(), cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"vsr_ddp exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                             f"STDERR:\n{proc.stderr[-5000:]}")
    return proc


def run_here(overrides: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m vsr_ddp *overrides`` in this process: exit status, stdout and stderr as a
    subprocess would give them. What a run sets process-wide (signal handlers, the working
    folder, sys.argv, HYDRA_FULL_ERROR) is put back afterwards."""
    import contextlib
    import io
    import signal

    from vsr_ddp import __main__ as entry
    from vsr_ddp import preempt

    assert not preempt.requested.is_set(), "a stop request is left over from an earlier run"
    signals = {s: signal.getsignal(s)
               for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    saved = sys.argv, os.getcwd(), os.environ.get("HYDRA_FULL_ERROR")
    out, err, status = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = ["vsr_ddp", *overrides]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # as job_env() gives the command line
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.cli()
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        if saved[2] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[2]
        for s, handler in signals.items():
            signal.signal(s, handler)
        preempt.requested.clear()
    return subprocess.CompletedProcess(["python", "-m", "vsr_ddp", *overrides], status, out.getvalue(),
                                       err.getvalue())


_current: list = []  # the test running now (pytest's item), for _must_be_slow


@pytest.fixture(autouse=True)
def _note_test(request):
    _current[:] = [request.node]
    yield
    _current.clear()


def _must_be_slow(what: str) -> None:
    """Processes of their own (torchrun, a CLI subprocess) belong to tests marked slow, so that
    ``make test-fast`` (-m "not slow and not network") really starts none."""
    if _current and _current[0].get_closest_marker("slow") is None:
        raise AssertionError(f"{_current[0].nodeid} starts {what}: mark it @pytest.mark.slow")


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
