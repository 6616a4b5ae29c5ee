"""Interrupted runs: SIGKILL the whole torchrun job mid-run, or preempt it as Slurm does (SIGTERM,
SIGUSR1); rerun the same command, keep every finished shard and get the whole video."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess

import numpy as np
import pytest
from builders import (Gate, already_done, decode_indices, gated, make_clip, read_frames, shard_files,
                      sidecars, sigkill_when, unit_point, wait_until)
from conftest import ROOT, job_cmd, job_env, read_report, run_job

from vsr_ddp import shards
from vsr_ddp.plan import probe

pytestmark = pytest.mark.slow


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL the whole 2-rank job once units 0-2 are done and each rank is writing the shard of
    the next one (gated: tests/builders/gated_main.py); the rerun keeps those three, makes the
    rest, and nothing half-written is ever under a finished file's name. (The runs keep their
    shards, work.keep_shards=true, so that the test can tell the kept ones from remade ones.)"""
    clip = make_clip(tmp_path / "clip.mp4", frames=40, size=(64, 48), audio=True)
    args = lambda out: ["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos",  # noqa: E731
                        "job.scale=2", "work.segment_frames=4", "work.keep_shards=true"]
    out = tmp_path / "killed"
    wdir = shards.work_dir(out, probe(clip), "2x")
    gate = Gate(tmp_path / "gate")
    gate.open(*(unit_point("clip", k) for k in range(5)))
    for k in (3, 4):
        gate.hold(unit_point("clip", k) + "-written")
    writing = lambda: [p for k in (3, 4)  # noqa: E731
                       for p in shards.unit_dir(wdir, k).glob(f"segment_{k:04d}.mp4.*.partial")]
    # torchrun, both ranks and their encoders, once 3 shards are done and the shards of units 3
    # and 4 are being written (their encoders have the frames): no chance to clean up
    in_place = lambda: (len(sidecars(out)) == 3  # noqa: E731
                        and {unit_point("clip", k) + "-written" for k in (3, 4)} <= gate.reached()
                        and len(writing()) == 2)
    sigkill_when(gated(job_cmd(args(out), nproc=2)), in_place, env=gate.env(job_env()), cwd=ROOT)
    done_before = {p.name: json.loads(p.read_text()) for p in sidecars(out)}
    assert sorted(done_before) == [f"segment_{k:04d}.json" for k in range(3)]
    assert len(writing()) == 2  # the half-written shards are there, under their temporary names only
    assert sorted(p.name for p in wdir.glob("*/segment_????.mp4")) == \
        [f"segment_{k:04d}.mp4" for k in range(3)]
    assert not (out / "clip.mp4").exists()

    run_job(args(out))  # the same command again (one rank: shards do not depend on the rank count)
    assert already_done(out, ranks=1) == len(done_before)
    for name, side in done_before.items():  # finished shards were kept, not redone
        assert json.loads(shards.sidecar_path(wdir, name.removesuffix(".json")).read_text()) == side
    assert not list(out.rglob("*.partial"))

    fresh = tmp_path / "fresh"
    run_job(args(fresh))
    resumed, uninterrupted = read_frames(out / "clip.mp4"), read_frames(fresh / "clip.mp4")
    assert resumed.shape == (40, 96, 128, 3)
    assert np.array_equal(resumed, uninterrupted)
    assert decode_indices(resumed) == list(range(40))
    assert read_report(out)["videos"][0]["status"] == "ok"
    checkpoint = json.loads((wdir / "checkpoint.json").read_text())
    assert [s["status"] for s in checkpoint["segments"].values()] == ["done"] * 10
    assert [(s["start"], s["end"]) for s in checkpoint["segments"].values()] == \
        [(i, i + 4) for i in range(0, 40, 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_ranks(overrides: list[str], gate: Gate, n: int = 2) -> list[subprocess.Popen]:
    """n tasks of ``srun --ntasks=n python -m vsr_ddp ...`` (no torchrun: Slurm's variables only),
    gated (:func:`builders.gated`)."""
    procs, port = [], free_port()
    for rank in range(n):
        env = {**gate.env(job_env()), "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NTASKS": str(n), "SLURM_NNODES": "1", "SLURM_NODEID": "0",
               "SLURM_STEP_TASKS_PER_NODE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            env.pop(var, None)
        procs.append(subprocess.Popen(gated(job_cmd(overrides)), cwd=ROOT, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


# How Slurm stops a job: scancel --signal=TERM (or the batch script's preempt() in launch/*.sbatch)
# signals every process of the step, torchrun, its ranks and their ffmpeg encoders; --signal=USR1
# reaches the ranks; srun without torchrun (hydra/launcher=slurm) forwards a signal to each task.
PREEMPTIONS = ["SIGTERM-torchrun-step", "SIGUSR1-torchrun-ranks", "SIGTERM-srun-tasks", "SIGUSR1-srun-tasks"]


@pytest.mark.parametrize("how", PREEMPTIONS)
def test_preemption_exits_128_plus_n_keeps_finished_shards_and_the_rerun_completes(tmp_path, how):
    """The signal comes once units 0 and 1 are done and each rank is inside the next one (gated:
    tests/builders/gated_main.py): both ranks abandon their unit, and exactly those two stay (and
    are kept by the rerun: work.keep_shards=true keeps them after the merge, for the test to see)."""
    signame, launcher, target = how.split("-")
    sig = signal.Signals[signame]
    clip = make_clip(tmp_path / "clip.mp4", frames=24, size=(64, 48), audio=True)
    out = tmp_path / "out"
    args = ["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos", "job.scale=2",
            "work.segment_frames=4", "work.keep_shards=true"]
    wdir = shards.work_dir(out, probe(clip), "2x")
    gate = Gate(tmp_path / "gate")
    gate.open(unit_point("clip", 0), unit_point("clip", 1))
    procs = [subprocess.Popen(gated(job_cmd(args, nproc=2)), cwd=ROOT, env=gate.env(job_env()),
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
             ] if launcher == "torchrun" else srun_ranks(args, gate)
    try:
        wait_until("units 0 and 1 done, 2 and 3 in hand",
                   lambda: len(sidecars(out)) == 2 and len(gate.reached()) == 4, procs)
        if target == "step":
            os.killpg(procs[0].pid, sig)
        elif target == "ranks":  # torchrun's workers
            ranks = subprocess.run(["pgrep", "-P", str(procs[0].pid)], capture_output=True, text=True).stdout
            assert len(ranks.split()) == 2, ranks
            for pid in ranks.split():
                os.kill(int(pid), sig)
        else:
            for p in procs:
                p.send_signal(sig)
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    status = 128 + sig.value
    if launcher == "srun":
        assert [p.returncode for p in procs] == [status, status], errs[0][-3000:]
    elif target == "ranks":  # torchrun fails (1) and names each rank's exit status
        assert procs[0].returncode == 1
        exits = sorted(re.findall(r"rank\s+: (\d) \(local_rank.*\n\s*exitcode\s+: (\d+)", errs[0]))
        assert exits == [("0", str(status)), ("1", str(status))], errs[0][-3000:]
    else:  # torchrun itself ends with 1 on SIGTERM (its SignalException); the ranks stopped on their own
        assert procs[0].returncode != 0
    for rank in (0, 1):
        log = (out / ".vsr_ddp" / "logs" / f"rank{rank}.log").read_text(encoding="utf-8")
        assert f"received {signame}" in log, f"rank {rank} did not see {signame}"
        assert "stopped early on request; rerun the same command to resume" in log
        assert "Traceback" not in log
    assert "rerun the same command to resume" in errs[0]
    assert not list(out.rglob("*.partial")), "a partial file was left behind"
    assert not list(out.rglob("*.failed.json")), "preemption was recorded as a failure"
    assert not (out / "clip.mp4").exists()
    finished = shard_files(wdir)
    for side in sidecars(out):  # every sidecar left describes a complete shard
        meta = json.loads(side.read_text())
        assert (side.parent / meta["shard"]).stat().st_size == meta["size"]
    assert sorted(finished) == [f"segment_{k:04d}.{ext}" for k in (0, 1) for ext in ("json", "mp4")]

    run_job(args)  # the same command again, as a requeue does (one rank: shards do not depend on it)
    assert already_done(out, ranks=1) == 2
    after = shard_files(wdir)
    assert {name: after[name] for name in finished} == finished, "a finished shard was redone"
    assert decode_indices(read_frames(out / "clip.mp4")) == list(range(24))
    assert read_report(out)["videos"][0]["status"] == "ok"
    checkpoint = json.loads((wdir / "checkpoint.json").read_text())
    assert [s["status"] for s in checkpoint["segments"].values()] == ["done"] * 6
