"""job=interpolate: exact retiming, engines against each other on real motion, scene cuts, VFR,
distribution and resume, through the command line."""
from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from builders import (Gate, already_done, encode_frames, ffmpeg_decode, frame_times, gated, make_clip,
                      make_vfr, pan_frames, probe_streams, read_frames, shard_files, sidecars, sigkill_when,
                      unit_point)
from conftest import ROOT, job_cmd, job_env, read_report, run_job

from vsr_ddp import shards
from vsr_ddp.models.interpolation import output_count


def interpolate(src, out, *extra, nproc=1, check=True):
    return run_job(["job=interpolate", f"input={src}", f"output={out}", "log.progress=false", *extra],
                   nproc=nproc, check=check)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def shown_source(n: int, frames: int, fps_in: Fraction, fps_out: Fraction) -> tuple[int, Fraction]:
    """What output frame n should show, worked out here from the timestamps alone (not by the
    job's own rule): it is shown at n / fps_out; source frame i is shown from i / fps_in. (i, t):
    the last source frame shown at or before that time, and how far into its duration the time
    lies (0 <= t < 1); from the last source frame's timestamp on, that frame is held (t = 0)."""
    at = Fraction(n) / fps_out
    stamps = [Fraction(k) / fps_in for k in range(frames)]
    i = max(k for k, stamp in enumerate(stamps) if stamp <= at)
    if i == frames - 1:
        return i, Fraction(0)
    return i, (at - stamps[i]) / (stamps[i + 1] - stamps[i])


@pytest.mark.slow  # 2 ranks: torchrun
def test_any_rational_factor_gives_exact_times_and_exact_in_between_frames(tmp_path):
    """24 -> 60 fps (x 5/2) with the cross-fade: every frame's time is n / 60 exactly, and every
    frame equals (1 - t) a + t b for the t the rule gives, computed here with fractions."""
    src = make_clip(tmp_path / "c.mp4", frames=20, size=(64, 48), fps="24", audio=True)
    out = tmp_path / "o"
    interpolate(src, out, "job.model=blend", "job.factor=5/2", "work.segment_frames=7", nproc=2)
    report = read_report(out)["videos"][0]
    assert report["status"] == "ok" and report["frames"] == 50
    times, _ = frame_times(out / "c.mp4")
    assert times == [Fraction(n, 60) for n in range(50)]
    got, source = read_frames(out / "c.mp4").astype(np.float64), read_frames(src).astype(np.float64)
    for n in range(50):
        i, t = shown_source(n, 20, Fraction(24), Fraction(60))
        assert t in {Fraction(k, 5) for k in range(5)}, (n, t)  # 24 -> 60: t steps by 2/5
        # of every mix of frames i and i + 1 in fifths, the one the rule names is the closest
        j = min(i + 1, 19)
        errors = {k: np.abs(got[n] - ((1 - k / 5) * source[i] + k / 5 * source[j])).mean() for k in range(5)}
        assert min(errors, key=errors.get) == t * 5, (n, t, errors)
        assert errors[t * 5] < 4  # encoding noise only
    # the same duration as the input (within one output frame), and its audio
    got_s, src_s = probe_streams(out / "c.mp4"), probe_streams(src)
    assert abs(50 / 60 - 20 / 24) <= 1 / 60
    assert abs(got_s["audio_duration"] - src_s["audio_duration"]) < 0.03


def test_exact_output_rate_and_the_counting_rule(tmp_path):
    src = make_clip(tmp_path / "ntsc.mp4", frames=11, size=(64, 48), fps="24000/1001", audio=False)
    out = tmp_path / "o"
    interpolate(src, out, "job.model=blend", "job.fps=60000/1001")
    times, _ = frame_times(out / "ntsc.mp4")
    # as many whole output frames as fit in the input's duration (11 frames at 24000/1001 fps):
    # 27 of 1001/60000 s do (0.4505 s <= 0.4588 s), 28 do not
    duration, frame_out = Fraction(11) / Fraction(24000, 1001), 1 / Fraction(60000, 1001)
    assert 27 * frame_out <= duration < 28 * frame_out
    assert len(times) == 27
    assert times == [Fraction(1001 * n, 60000) for n in range(27)]
    assert probe_streams(out / "ntsc.mp4")["fps"] == Fraction(60000, 1001)


@pytest.mark.network
def test_rife_beats_flow_beats_blend_on_real_motion_and_a_cut_is_not_morphed(tmp_path, rife_models):
    """A camera pan and zoom over a photograph, every other frame dropped, rebuilt at x2: PSNR
    against the dropped frames. A hard cut in the middle gives a repeated frame, not a blend.
    The three engines are one sweep (one launch, three points)."""
    full = pan_frames(40, cut_at=24)  # cut between original frames 23 and 24
    half = encode_frames(tmp_path / "half.mp4", full[::2], "12", audio=True)
    run_job(["-m", "job=interpolate", f"input={half}", f"output={tmp_path}/${{job.model}}",
             "log.progress=false", "job.model=rife-hdv3,flow,blend", "job.factor=2",
             f"models_dir={rife_models}", "work.segment_frames=8"], cwd=tmp_path)
    scores = {}
    for model in ("rife-hdv3", "flow", "blend"):
        out = tmp_path / model
        made = read_frames(out / "half.mp4")
        assert len(made) == 40
        report = read_report(out)["videos"][0]
        assert report["scene_cuts"] == 1 and report["interpolated_frames"] == 18  # 19 pairs, one a cut
        # the frame across the cut (output 23) repeats a source frame exactly: half 11 or 12
        repeats = [psnr(made[23], made[22]), psnr(made[23], made[24])]
        assert max(repeats) > 40, f"{model}: the frame across the cut is not a source frame"
        dropped = [n for n in range(1, 39, 2) if n != 23]
        scores[model] = np.mean([psnr(made[n], full[n]) for n in dropped])
    assert scores["rife-hdv3"] > scores["flow"] > scores["blend"], scores
    assert scores["rife-hdv3"] > scores["blend"] + 3


def test_a_scene_cut_repeats_the_earlier_frame_until_the_later_frames_time(tmp_path):
    """Issue 22: a cut happens at the later frame's time, so every output frame whose source
    position lies strictly between the last frame of one shot and the first of the next repeats
    the last frame of the first shot (as vs-rife and SVFI do), never the next shot early; a frame
    at or after the first frame's time belongs to the next shot. One run of job.fps=60000/1001 over
    three clips covers the ratios 2 (30000/1001 in), 5/2 (24000/1001) and 2400/1001 (25 fps), and
    work.segment_frames=6 puts the cut pair across a unit boundary (made by the unit before it)."""
    frames, cut = 12, 6  # shot 1 is source frames 0..5 (astronaut), shot 2 is 6..11 (coffee)
    shots = pan_frames(frames, cut_at=cut)  # (12, 96, 160, 3) uint8
    rates = {"r2": Fraction(30000, 1001), "r5_2": Fraction(24000, 1001), "r25": Fraction(25)}
    fps_out = Fraction(60000, 1001)
    folder = tmp_path / "in"
    folder.mkdir()
    for name, fps in rates.items():
        encode_frames(folder / f"{name}.mp4", shots, str(fps))
    out = tmp_path / "o"
    interpolate(folder, out, "job.model=blend", "job.fps=60000/1001", "work.segment_frames=6")
    reports = {v["input"].split("/")[-1]: v for v in read_report(out)["videos"]}
    last, first = shots[cut - 1], shots[cut]
    for name, fps_in in rates.items():
        report = reports[f"{name}.mp4"]
        assert report["status"] == "ok" and report["scene_cuts"] == 1, report
        made = ffmpeg_decode(out / f"{name}.mp4")  # what a user's ffmpeg shows
        count = math.floor(frames * fps_out / fps_in)
        assert len(made) == report["frames"] == count, name
        position = {n: n * fps_in / fps_out for n in range(count)}  # exact source positions
        across = [n for n, s in position.items() if cut - 1 < s < cut]
        # at least one of them is past the pair's midpoint, where the nearest frame is shot 2's
        assert any(position[n] - (cut - 1) >= Fraction(1, 2) for n in across), (name, across)
        for n in across:  # a repeat of shot 1's last frame: not shot 2, not a morph of the two
            to_last, to_first = psnr(made[n], last), psnr(made[n], first)
            assert to_last > 27 and to_last > to_first + 15, (name, n, position[n], to_last, to_first)
        # the frames around them: shot 1 before, shot 2 from the first frame's time on
        before = max(n for n, s in position.items() if s <= cut - 1)
        after = min(n for n, s in position.items() if s >= cut)
        assert psnr(made[before], last) > psnr(made[before], first) + 15, (name, before)
        assert psnr(made[after], first) > psnr(made[after], last) + 15, (name, after)
        if position[after] == cut:  # exactly the first frame of shot 2
            assert psnr(made[after], first) > 27, (name, after)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_a_rerun_keeps_finished_shards(tmp_path):
    src = encode_frames(tmp_path / "p.mp4", pan_frames(21), "25", audio=True)
    one, two = tmp_path / "one", tmp_path / "two"
    # lossless shards: the frames compared are the engine's, whatever choices x264 makes
    same = ["job.model=flow", "job.factor=2", "work.segment_frames=6",
            "encode.crf=0", "encode.preset=ultrafast", "work.keep_shards=true"]  # shards kept to compare
    interpolate(src, one, *same)
    interpolate(src, two, *same, nproc=2)
    a, b = read_frames(one / "p.mp4"), read_frames(two / "p.mp4")
    assert len(a) == len(b) == 42
    if not np.array_equal(a, b):  # say which units differ, and which rank made them when (a rare flake)
        shard_hash = lambda p: json.loads(p.read_text())["sha256"]  # noqa: E731
        differ = [p.stem for p in sidecars(one) if shard_hash(p) != shard_hash(two / p.relative_to(one))]
        logs = [ln for f in sorted((two / ".vsr_ddp" / "logs").glob("rank*.log"))
                for ln in f.read_text().splitlines() if "segment_" in ln]
        frames = [i for i in range(len(a)) if not np.array_equal(a[i], b[i])]
        pytest.fail(f"1 rank and 2 ranks differ at frames {frames}, shards {differ}; 2-rank logs: {logs}")
    # take the video and one shard away: the rerun makes that shard alone and the video is the same
    # (with the video in place, merged.json says it is done: the rerun makes nothing)
    sides = sidecars(two)
    assert len(sides) == 4
    kept = {p: p.read_bytes() for p in sides[:2] + sides[3:]}
    sides[2].unlink()
    (two / "p.mp4").unlink()
    interpolate(src, two, *same)  # one rank will do
    assert already_done(two, ranks=1) == 3
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert json.loads(sides[2].read_text())["frames_written"] == 12
    assert np.array_equal(read_frames(two / "p.mp4"), a)


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_shards(tmp_path):
    """SIGKILL the whole 2-rank torchrun job once units 0 and 1 are done and each rank is inside the
    next one (gated: tests/builders/gated_main.py): nothing half-written under a finished file's
    name, no video; the same command again keeps the finished shards as they are, makes the
    others, and the video equals an uninterrupted run's, frame for frame."""
    # 30 frames at 24 fps x 5/2: 6 units of 5 source frames, 12 or 13 output frames each (the
    # retiming's out_start bookkeeping resumes too)
    src = encode_frames(tmp_path / "p.mp4", pan_frames(30), "24", audio=True)
    args = lambda out: ["job=interpolate", f"input={src}", f"output={out}",  # noqa: E731
                        "log.progress=false", "job.model=flow", "job.factor=5/2", "work.segment_frames=5",
                        "encode.crf=0", "encode.preset=ultrafast",  # lossless: the engine's frames compared
                        "work.keep_shards=true"]  # the shards stay after the merge, to compare
    total, frames = 6, output_count(30, Fraction(24), Fraction(60))
    assert frames == 75
    out = tmp_path / "killed"
    gate = Gate(tmp_path / "gate")
    gate.open(unit_point("p", 0), unit_point("p", 1))
    in_place = lambda: len(sidecars(out)) == 2 and len(gate.reached()) == 4  # noqa: E731
    sigkill_when(gated(job_cmd(args(out), nproc=2)), in_place, env=gate.env(job_env()), cwd=ROOT)

    [wdir] = list(shards.work_dirs(out))
    units = json.loads((wdir / "checkpoint.json").read_text())["segments"]
    assert len(units) == total
    before = shard_files(wdir)
    done = sidecars(out)
    assert [p.stem for p in done] == ["segment_0000", "segment_0001"]
    # no half-written file where a finished one belongs (leftovers are *.partial): every sidecar
    # names its shard exactly, every shard under its name is whole, and there is no video
    for side in done:
        meta = json.loads(side.read_text())
        shard = side.parent / meta["shard"]
        assert shard.stat().st_size == meta["size"]
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == meta["sha256"]
        assert meta["frames_written"] == units[side.stem]["frames"]
    for shard in wdir.glob("*/segment_????.mp4"):  # a shard is committed whole, its sidecar after it
        assert len(read_frames(shard)) == units[shard.stem]["frames"], shard.name
    assert not list(out.glob("p.mp4*")) and not (out / "run_report.json").exists()

    run_job(args(out))  # the same command again (one rank: shards do not depend on the rank count)
    assert already_done(out, ranks=1) == len(done)
    after = shard_files(wdir)
    assert {name: after[name] for name in before} == before, "a finished shard was redone"
    assert len(after) == 2 * total
    assert not list(out.rglob("*.partial"))
    checkpoint = json.loads((wdir / "checkpoint.json").read_text())
    assert [s["status"] for s in checkpoint["segments"].values()] == ["done"] * total
    report = read_report(out)["videos"][0]
    assert report["status"] == "ok" and report["frames"] == frames

    fresh = tmp_path / "fresh"
    run_job(args(fresh))
    resumed, uninterrupted = read_frames(out / "p.mp4"), read_frames(fresh / "p.mp4")
    assert resumed.shape == (frames, 96, 160, 3)
    assert np.array_equal(resumed, uninterrupted)
    assert probe_streams(out / "p.mp4")["fps"] == Fraction(60)
    assert frame_times(out / "p.mp4")[0] == [Fraction(n, 60) for n in range(frames)]


@pytest.mark.network
def test_bad_settings_and_inputs(tmp_path, rife_models):
    src = make_clip(tmp_path / "c.mp4", frames=8, size=(64, 48), fps="24", audio=False)
    # a midpoint model cannot make thirds: a configuration error before any work
    proc = interpolate(src, tmp_path / "x", "job.model=rife-hdv3", "job.factor=3",
                       f"models_dir={rife_models}",
                       check=False)
    assert proc.returncode == 2 and "job.model=flow" in proc.stderr
    # ... and per video, when the rate is given: that video fails, the others go on
    other = make_clip(tmp_path / "d.mp4", frames=8, size=(64, 48), fps="30", audio=False)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "c.mp4").write_bytes(src.read_bytes())
    (folder / "d.mp4").write_bytes(other.read_bytes())
    proc = interpolate(folder, tmp_path / "y", "job.model=rife-hdv3", "job.fps=60",
                       f"models_dir={rife_models}",
                       check=False)
    status = {v["input"].split("/")[-1]: v for v in read_report(tmp_path / "y")["videos"]}
    assert proc.returncode == 1 and status["d.mp4"]["status"] == "ok"
    assert status["c.mp4"]["status"] == "failed" and "midpoint" in status["c.mp4"]["reason"]
    # variable frame rate: an error for that input, unless job.vfr=cfr
    vfr, _ = make_vfr(tmp_path / "vfr.mp4", audio=False)
    proc = interpolate(vfr, tmp_path / "z", "job.model=blend", check=False)
    report = read_report(tmp_path / "z")["videos"][0]
    assert proc.returncode == 1
    assert "variable frame rate" in report["reason"] and "job.vfr=cfr" in report["reason"]
    interpolate(vfr, tmp_path / "w", "job.model=blend", "job.vfr=cfr")
    assert read_report(tmp_path / "w")["videos"][0]["frames"] == 90


@pytest.mark.network
def test_rife_in_half_precision_stays_close_to_fp32(rife_models, tmp_path):
    """job.precision picks RIFE's dtype (fp16 on CUDA by default, bf16 on request): the engine
    in either gives frames within a few levels of fp32 on a real pair (the real rife-hdv3 weights,
    run here on the CPU, where the job itself stays in fp32). An unknown precision stops the run."""
    import skimage.data
    import torch

    from vsr_ddp.models import interpolation as interp

    photo = skimage.data.astronaut()
    a, b = photo[100:196, 150:278][None], photo[103:199, 155:283][None]  # the camera moved (5, 3) px
    ts = [Fraction(1, 2)]
    path = rife_models / "rife-hdv3.safetensors"
    full = interp.Rife(path, torch.device("cpu"))(a, b, ts)
    for dtype in (torch.float16, torch.bfloat16):
        half = interp.Rife(path, torch.device("cpu"), dtype=dtype)(a, b, ts)
        assert half.shape == full.shape == (1, 96, 128, 3) and half.dtype == np.uint8
        assert psnr(half, full) > 45, dtype  # measured: fp16 61.7 dB, bf16 54.0 dB
        assert psnr(half, full) < float("inf")  # it really ran in another precision
    src = make_clip(tmp_path / "c.mp4", frames=4, size=(64, 48), fps="24", audio=False)
    proc = interpolate(src, tmp_path / "o", "job.model=blend", "job.precision=fp8", check=False)
    assert proc.returncode == 2
    assert "error: job.precision=fp8: must be auto, fp32, fp16 or bf16" in proc.stderr
