"""SIGKILL the whole torchrun job mid-run, rerun the same command, get the same video."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from builders import decode_indices, make_clip, read_frames, save_srvgg
from conftest import ROOT, job_cmd, job_env, read_report, run_job

pytestmark = pytest.mark.slow


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=40, size=(64, 48), audio=True)
    # A compact model heavy enough that the kill lands mid-run; its output keeps the frame code.
    model = save_srvgg(tmp_path / "realesr-general-x2.pth", scale=2, seed=7, num_feat=32, num_conv=16)
    args = lambda out: ["job=upscale", f"input={clip}", f"output={out}", f"job.model={model}",  # noqa: E731
                        "work.segment_frames=4", "job.batch_size=2"]
    out = tmp_path / "killed"
    wdir = out / ".vsr_ddp" / "clip_2x"
    proc = subprocess.Popen(job_cmd(args(out), nproc=2), cwd=ROOT, env=job_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(wdir.glob("segment_????.json"))) < 3:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline, "no shards after 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and both ranks, no chance to clean up
        proc.wait()
    done_before = {p.name: json.loads(p.read_text()) for p in wdir.glob("segment_????.json")}
    assert 3 <= len(done_before) < 10
    assert not (out / "clip.mp4").exists()

    rerun = run_job(args(out), nproc=2)
    assert "already done" in rerun.stderr
    for name, side in done_before.items():  # finished shards were kept, not redone
        assert json.loads((wdir / name).read_text()) == side
    assert not list(out.rglob("*.partial"))

    fresh = tmp_path / "fresh"
    run_job(args(fresh), nproc=2)
    resumed, uninterrupted = read_frames(out / "clip.mp4"), read_frames(fresh / "clip.mp4")
    assert resumed.shape == (40, 96, 128, 3)
    assert np.array_equal(resumed, uninterrupted)
    assert decode_indices(resumed) == list(range(40))
    assert read_report(out)["videos"][0]["status"] == "ok"
    checkpoint = json.loads((wdir / "checkpoint.json").read_text())
    assert [s["status"] for s in checkpoint["segments"].values()] == ["done"] * 10
    assert [(s["start"], s["end"]) for s in checkpoint["segments"].values()] == [(i, i + 4) for i in range(0, 40, 4)]


def test_sigterm_stops_cleanly_and_the_rerun_finishes(tmp_path):
    """What Slurm preemption does: SIGTERM to torchrun, which passes it to every rank."""
    clip = make_clip(tmp_path / "clip.mp4", frames=40, size=(64, 48), audio=True)
    model = save_srvgg(tmp_path / "m.pth", scale=2, seed=8, num_feat=32, num_conv=16)
    args = ["job=upscale", f"input={clip}", f"output={tmp_path / 'out'}", f"job.model={model}",
            "work.segment_frames=4", "job.batch_size=1", "work.read_chunk=1"]
    wdir = tmp_path / "out" / ".vsr_ddp" / "clip_2x"
    proc = subprocess.Popen(job_cmd(args, nproc=2), cwd=ROOT, env=job_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(wdir.glob("segment_????.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to torchrun only, as Slurm does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "rerun the same command to resume" in err
    assert not list(wdir.glob("*.partial")), "a partial shard was left behind"
    assert not list(wdir.glob("*.failed.json")), "preemption was recorded as a failure"
    for side in wdir.glob("segment_????.json"):  # every sidecar left describes a complete shard
        assert (wdir / json.loads(side.read_text())["shard"]).stat().st_size == json.loads(side.read_text())["size"]
    assert not (tmp_path / "out" / "clip.mp4").exists()
    run_job(args, nproc=2)
    assert decode_indices(read_frames(tmp_path / "out" / "clip.mp4")) == list(range(40))
