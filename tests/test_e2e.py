"""End to end through the command line: torchrun with 2 ranks (gloo), one process, sweeps."""
from __future__ import annotations

import re
import shutil
from fractions import Fraction

import cv2
import numpy as np
import pytest
from builders import decode_indices, make_clip, probe_streams, read_frames
from conftest import read_report, run_job

pytestmark = pytest.mark.slow


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_two_ranks_upscale_keeps_frames_order_fps_and_audio(clips, tmp_path):
    src = clips["av"]
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=lanczos", "job.scale=2",
                    "work.segment_frames=10"], nproc=2)
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
    assert "[rank 1]" in (logs / "rank1.log").read_text()
    assert "rank 1" not in proc.stderr.replace("rank 1/2", "")
    sides = sorted((out / ".vsr_ddp" / "av_2x").glob("segment_????.json"))
    assert len(sides) == 5
    import json
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


def test_dry_run_prints_the_plan_and_writes_nothing(clips, tmp_path):
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={clips['av']}", f"output={out}", "job.model=lanczos", "job.scale=2",
                    "work.segment_frames=20", "dry_run=true", "job.calibrate=true"], nproc=2)
    assert "rank 0: 2 unit(s), 28 frames" in proc.stdout
    assert "rank 1: 1 unit(s), 20 frames" in proc.stdout
    assert "owns [20, 40) reads [20, 40)" in proc.stdout
    assert re.search(r"estimate: about \d+ s on 2 CPU ranks \(model [\d.]+-[\d.]+ frames/s per rank", proc.stdout)
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
             "work.segment_frames=20"], nproc=2)
    final = out / (name[:-4] + ".mp4")
    assert probe_streams(final)["frames"] == 48
    assert read_report(out)["videos"][0]["status"] == "ok"


def test_hydra_sweep_runs_each_scale_into_its_own_output(clips, tmp_path):
    out = tmp_path / "sweep"
    run_job(["-m", "job=upscale", f"input={clips['av']}", f"output={out}/s${{job.scale}}", "job.model=bicubic",
             "job.scale=2,3", "work.unit=video"], cwd=tmp_path)
    for s in (2, 3):
        got = probe_streams(out / f"s{s}" / "av.mp4")
        assert (got["width"], got["height"], got["frames"]) == (64 * s, 48 * s, 48)
        assert read_report(out / f"s{s}")["videos"][0]["status"] == "ok"
    # each sweep point logged on its own, in Hydra's sweep folder
    assert len(list((tmp_path / "multirun").glob("*/*/[01]/rank0.log"))) == 2
    assert not list(out.glob("sNone*"))


def test_rank_that_finishes_early_outlives_the_collective_timeout(tmp_path):
    """One rank gets ~10x the work; with a 6-second collective timeout the idle rank must wait.

    The long video goes through a compact model heavy enough to take well over 6 s even on an
    idle machine (about 25 s, one thread per rank on 2 idle cores; load only makes it longer)."""
    from builders import save_srvgg

    inputs = tmp_path / "in"
    inputs.mkdir()
    make_clip(inputs / "a_long.mp4", frames=240, size=(160, 120), audio=False)
    make_clip(inputs / "b_short.mp4", frames=24, size=(160, 120), audio=False)
    model = save_srvgg(tmp_path / "m.pth", scale=2, seed=11, num_feat=32, num_conv=16)
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={inputs}", f"output={out}", f"job.model={model}",
             "work.unit=video", "dist.timeout_min=0.1"], nproc=2)
    report = read_report(out)
    assert [v["status"] for v in report["videos"]] == ["ok", "ok"]
    long_s = [v["seconds"] for v in report["videos"]][0]
    assert long_s > 6, f"the long video took {long_s:.1f} s: not long enough to prove anything"
    # Rank 0 merged the videos as they completed, before the end-of-run meeting.
    log0 = (out / ".vsr_ddp" / "logs" / "rank0.log").read_text()
    assert log0.index("a_long.mp4 ->") < log0.index("units done; waiting for the other ranks")


def test_default_model_with_preview(clips, tmp_path):
    """No job.model: the shipped x2 model; job.preview=true writes the side-by-side picture."""
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={clips['av']}", f"output={out}", "job.preview=true", "work.unit=video"])
    got = probe_streams(out / "av.mp4")
    assert (got["width"], got["height"], got["frames"]) == (128, 96, 48)
    preview = out / "av.preview.png"
    assert read_report(out)["videos"][0]["preview"] == str(preview)
    assert cv2.imread(str(preview)).shape[1] > 3 * 64  # three panels at output scale
