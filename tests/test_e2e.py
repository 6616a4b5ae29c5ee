"""End to end through the command line: torchrun with 2 ranks (gloo), one rank, sweeps."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from builders import (Gate, decode_indices, gated, kill_tree, make_clip, probe_streams, read_frames,
                      sidecars, unit_point, wait_until)
from conftest import ROOT, job_cmd, job_env, read_report, run_job
from vsr_ddp import shards
from vsr_ddp.plan import probe


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.slow
def test_two_ranks_upscale_keeps_frames_order_fps_and_audio(clips, tmp_path):
    src = clips["av"]
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=lanczos", "job.scale=2",
                    "work.segment_frames=10", "work.keep_shards=true"], nproc=2)
    final = out / "av.mp4"
    got, ref = probe_streams(final), probe_streams(src)
    assert got["frames"] == ref["frames"] == 48
    assert got["fps"] == Fraction(30000, 1001)
    assert (got["width"], got["height"]) == (128, 96)
    assert abs(got["audio_duration"] - ref["audio_duration"]) < 0.05
    frames = read_frames(final)  # (48, 96, 128, 3) uint8
    assert decode_indices(frames) == list(range(48))
    # Pixels agree with an independent lanczos of the decoded input (up to codec noise).
    want = np.stack([cv2.resize(f, (128, 96), interpolation=cv2.INTER_LANCZOS4) for f in read_frames(src)])
    assert psnr(frames, want) > 32
    report = read_report(out)
    assert [(v["status"], v["frames"], v["output"]) for v in report["videos"]] == [("ok", 48, str(final))]
    # Both ranks worked, each logged to its own file, and only rank 0 reached the console.
    logs = out / ".vsr_ddp" / "logs"
    assert (logs / "rank0.log").exists() and (logs / "rank1.log").exists()
    # every line says its rank, and once the launch has its run id, which launch wrote it
    # (concurrent launches on one folder share the rank<N>.log files)
    text = (logs / "rank1.log").read_text()
    assert "[rank 1]" in text and re.search(r"\[rank 1 run [0-9a-f]+\] INFO vsr_ddp\.runner: ", text)
    assert "rank 1" not in proc.stderr.replace("rank 1/2", "")
    sides = sidecars(out)  # kept: work.keep_shards=true
    assert [p.parent.parent for p in sides] == [shards.work_dir(out, probe(src), "2x")] * 5
    ranks = {json.loads(p.read_text())["rank"] for p in sides}
    assert ranks == {0, 1}
    # The bar shows frames/s and a human ETA.
    assert "frame/s" in proc.stderr and "ETA" in proc.stderr


def test_subtitles_and_non_mp4_audio_are_muxed(clips, tmp_path):
    src = clips["mkv"]
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=bicubic", "job.scale=2",
             "work.unit=video"])
    got, ref = probe_streams(out / "sub.mp4"), probe_streams(src)
    assert got["frames"] == 36 and got["fps"] == Fraction(25)
    assert got["subtitles"] == 1
    assert abs(got["audio_duration"] - ref["audio_duration"]) < 0.05


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_writes_nothing(clips, tmp_path):
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={clips['av']}", f"output={out}", "job.model=lanczos",
                    "job.scale=2", "work.segment_frames=20", "dry_run=true", "job.calibrate=true"], nproc=2)
    assert "units, claimed in this order by whichever rank is free: 3 unit(s), 48 frames" in proc.stdout
    assert "owns [20, 40) reads [20, 40)" in proc.stdout
    assert re.search(r"estimate: about \d+ s on 2 CPU ranks \(model [\d.]+-[\d.]+ frames/s per rank at "
                     r"64x48; units claimed dynamically\)", proc.stdout)
    assert not (out / "av.mp4").exists() and not (out / "run_report.json").exists()


def test_odd_output_size_is_padded_for_yuv420p(tmp_path):
    src = make_clip(tmp_path / "odd.mp4", frames=12, size=(66, 50), audio=False)
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=lanczos", "job.scale=1.5"])
    got = probe_streams(out / "odd.mp4")
    assert (got["width"], got["height"]) == (100, 76)  # 99x75 plus one replicated column and row
    assert got["frames"] == 12


def test_names_with_spaces_unicode_and_shell_characters(clips, tmp_path):
    folder = tmp_path / "in put $(x)"
    folder.mkdir()
    name = "clip 'één' & ; $HOME `x`.mp4"
    shutil.copy(clips["av"], folder / name)
    out = tmp_path / "out dir"
    run_job(["job=upscale", f"input='{folder}'", f"output='{out}'", "job.model=lanczos", "job.scale=2",
             "work.segment_frames=20"])
    final = out / (name[:-4] + ".mp4")
    assert probe_streams(final)["frames"] == 48
    assert read_report(out)["videos"][0]["status"] == "ok"


def test_hydra_sweep_runs_each_scale_into_its_own_output(clips, tmp_path):
    out = tmp_path / "sweep"
    run_job(["-m", "job=upscale", f"input={clips['av']}", f"output={out}/s${{job.scale}}",
             "job.model=bicubic", "job.scale=2,3", "work.unit=video"], cwd=tmp_path)
    for s in (2, 3):
        got = probe_streams(out / f"s{s}" / "av.mp4")
        assert (got["width"], got["height"], got["frames"]) == (64 * s, 48 * s, 48)
        assert read_report(out / f"s{s}")["videos"][0]["status"] == "ok"
    # each sweep point logged on its own, in Hydra's sweep folder
    assert len(list((tmp_path / "multirun").glob("*/*/[01]/rank0.log"))) == 2
    assert not list(out.glob("sNone*"))


def test_sweep_exit_status_follows_its_points(clips, tmp_path):
    """A sweep fails as its points do (README, exit status): 2 for a configuration error, 1 for a
    failed input; the other points still run."""
    from builders import make_not_a_video

    out = tmp_path / "bad_scale"
    proc = run_job(["-m", "job=upscale", f"input={clips['av']}", f"output={out}/s${{job.scale}}",
                    "job.model=bicubic", "job.scale=0,2", "work.unit=video"], check=False, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: job.scale=0: must be positive, or null" in proc.stderr  # checked before any work
    assert read_report(out / "s2")["videos"][0]["status"] == "ok"  # the point after the bad one ran
    assert probe_streams(out / "s2" / "av.mp4")["frames"] == 48

    broken = make_not_a_video(tmp_path / "broken.mp4")
    out = tmp_path / "bad_input"
    proc = run_job(["-m", "job=upscale", f"input={broken},{clips['av']}", f"output={out}/${{hydra:job.num}}",
                    "job.model=bicubic", "job.scale=2", "work.unit=video"], check=False, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert read_report(out / "0")["videos"][0]["status"] == "failed"
    assert read_report(out / "1")["videos"][0]["status"] == "ok"
    assert not (out / "0" / "broken.mp4").exists()


def test_job_array_shares_split_the_inputs_and_write_one_report_each(tmp_path):
    """launch/array.sbatch's work.shard_index / work.num_shards: share i takes inputs[i::n] of the
    sorted list, writes run_report.<i>-of-<n>.json and its logs in its own folder, all in one output."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    frames = {"a": 12, "b": 10, "c": 8}
    for stem, n in frames.items():
        make_clip(inputs / f"{stem}.mp4", frames=n, size=(64, 48), audio=False)
    out = tmp_path / "out"
    args = ["job=upscale", f"input={inputs}", f"output={out}", "job.model=bicubic", "job.scale=2",
            "work.num_shards=2",
            "log.dir=${output}/.vsr_ddp/logs/shard_${work.shard_index}-of-${work.num_shards}"]
    run_job([*args, "work.shard_index=1"])
    assert sorted(p.name for p in out.glob("*.mp4")) == ["b.mp4"]
    run_job([*args, "work.shard_index=0"])
    assert not (out / "run_report.json").exists()
    reports = {i: read_report_named(out, f"run_report.{i}-of-2.json") for i in (0, 1)}
    assert sorted(Path(v["input"]).name for v in reports[0]["videos"]) == ["a.mp4", "c.mp4"]
    assert [Path(v["input"]).name for v in reports[1]["videos"]] == ["b.mp4"]
    assert all(v["status"] == "ok" for r in reports.values() for v in r["videos"])
    for stem, n in frames.items():
        assert decode_indices(read_frames(out / f"{stem}.mp4")) == list(range(n))
    for i in (0, 1):
        assert (out / ".vsr_ddp" / "logs" / f"shard_{i}-of-2" / "rank0.log").is_file()

    proc = run_job([*args, "work.shard_index=2"], check=False)
    assert proc.returncode == 2
    assert "error: work.shard_index=2: must be in [0, 1]" in proc.stderr


def read_report_named(output: Path, name: str) -> dict:
    return json.loads((output / name).read_text(encoding="utf-8"))


@pytest.mark.slow
def test_rank_that_finishes_early_outlives_the_collective_timeout(tmp_path):
    """With a 6-second collective timeout (dist.timeout_min=0.1), the rank that finishes early
    must wait for the other one longer than that, and live: the long video's unit is held (gated:
    tests/builders/gated_main.py) until the other rank, its own video made and merged, has been
    waiting for it for 7 s, however fast the machine makes either video."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    make_clip(inputs / "a_long.mp4", frames=24, size=(64, 48), audio=False)
    make_clip(inputs / "b_short.mp4", frames=12, size=(64, 48), audio=False)
    out = tmp_path / "out"
    logs = out / ".vsr_ddp" / "logs"
    waiting = "nothing left to draw: waiting for 1 of 2 video(s) in other hands"
    gate = Gate(tmp_path / "gate")
    gate.open(unit_point("b_short", 0))
    cmd = gated(job_cmd(["job=upscale", f"input={inputs}", f"output={out}", "job.model=lanczos",
                         "job.scale=2", "work.unit=video", "work.bundle_frames=1", "dist.timeout_min=0.1"],
                        nproc=2))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=gate.env(job_env()), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until("a rank waiting for the other", lambda: unit_point("a_long", 0) in gate.reached() and any(
            waiting in log.read_text() for log in logs.glob("rank*.log")), [proc])
        time.sleep(7)  # past the collective timeout, by the clock: the idle rank must outlive it
        gate.open_all()
        _, err = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    report = read_report(out)
    assert [v["status"] for v in report["videos"]] == ["ok", "ok"]
    # Each video was made and written out by one rank, one bundle each (work.bundle_frames=1):
    # the short one while the other rank was still at work on the long one, which the short
    # one's rank then waited for, longer than the timeout.
    bundles = [json.loads(p.read_text()) for p in shards.bundle_sidecars(out)]
    assert sorted(c["rel"] for b in bundles for c in b["clips"]) == ["a_long", "b_short"]
    assert all(len(b["clips"]) == 1 and b["clips"][0]["status"] == "ok" for b in bundles)
    made_by = {b["clips"][0]["rel"]: b["rank"] for b in bundles}
    assert sorted(made_by.values()) == [0, 1]
    log = (logs / f"rank{made_by['b_short']}.log").read_text()
    assert log.index("b_short.mp4 ->") < log.index(waiting)
    at = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # noqa: E731
    lines = log.splitlines()
    since = at(next(line for line in lines if waiting in line))
    assert (at(lines[-1]) - since).total_seconds() > 6, "the idle rank did not wait past the timeout"


def test_default_model_with_preview(clips, tmp_path):
    """No job.model: the shipped x2 model; job.preview=true writes the side-by-side picture."""
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={clips['av']}", f"output={out}", "job.preview=true", "work.unit=video"])
    got = probe_streams(out / "av.mp4")
    assert (got["width"], got["height"], got["frames"]) == (128, 96, 48)
    preview = out / "av.preview.png"
    assert read_report(out)["videos"][0]["preview"] == str(preview)
    assert cv2.imread(str(preview)).shape[1] > 3 * 64  # three panels at output scale
