"""The shortest inputs, for every job (issue 22): a video stream with no frames fails with a one-line
reason and the batch goes on; a one-frame video comes out right (upscale: one frame at the scaled
size; interpolate: floor(1 x factor) frames, all showing that frame, no pair made; propagate: the key
itself; sim2real: its one keyframe translated). Each job runs once, in one process, over one folder
holding the 0-frame video, the 1-frame video and a short clip, then the same command again: the rerun
exits the same way, trips on nothing the first run left and redoes nothing."""
from __future__ import annotations

import math
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from builders import (decode_indices, ffmpeg_decode, make_clip, make_one_frame, make_zero_frames, records,
                      probe_streams, read_frames, save_tiny_controlnet, save_tiny_sd15)
from conftest import read_report, run_job

from vsr_ddp.models import interpolation as interp

SIZE = (64, 48)  # (width, height)
CLIP_FRAMES = 6


def short_inputs(folder: Path) -> Path:
    """zero.mp4 (an H.264 track of no samples, beside 1 s of audio), one.mp4 (one frame, with audio),
    clip.mp4 (CLIP_FRAMES frames): the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    make_zero_frames(folder / "zero.mp4", size=SIZE, audio=True)
    make_one_frame(folder / "one.mp4", size=SIZE)
    make_clip(folder / "clip.mp4", frames=CLIP_FRAMES, size=SIZE, audio=True)
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def check_run(proc: subprocess.CompletedProcess, out: Path) -> dict:
    """What every job's run over short_inputs must show; returns the report by stem."""
    assert proc.returncode == 1, proc.stderr[-3000:]  # README "Exit status": an input failed
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = {Path(v["input"]).stem: v for v in read_report(out)["videos"]}
    assert sorted(report) == ["clip", "one", "zero"]
    zero = report["zero"]
    assert zero["status"] == "failed" and "no frames" in zero["reason"] and "\n" not in zero["reason"], zero
    assert zero["output"] is None
    assert any("zero.mp4" in ln and "no frames" in ln for ln in proc.stderr.splitlines()), proc.stderr[-3000:]
    # the failed input is the only error of the run
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR") and "zero.mp4" not in ln]
    assert errors == [], errors
    for stem in ("one", "clip"):
        assert report[stem]["status"] == "ok" and report[stem]["reason"] is None, report[stem]
    # no final file for the failed input, nothing half-written, no lease or failure mark left behind
    assert sorted(p.name for p in out.glob("*.mp4")) == ["clip.mp4", "one.mp4"]
    assert not list(out.rglob("*.partial"))
    assert not list(out.rglob("*.lease")) and not list(out.rglob("*.failed.json"))
    assert not list(out.rglob("zero*"))
    return report


def what_a_run_made(out: Path) -> dict:
    """Bytes and times of the final videos and the records of finished work (bundle and shard
    sidecars, merge records)."""
    files = [*out.glob("*.mp4"), *records(out)]
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def run_twice(args: list[str], out: Path, timeout: float = 300) -> tuple[dict, subprocess.CompletedProcess]:
    """The command, checked; then the same command again: the same outcome, nothing redone."""
    first = run_job([*args, f"output={out}", "log.progress=false"], check=False, timeout=timeout)
    report = check_run(first, out)
    made = what_a_run_made(out)
    # per good video its final file; short videos are bundled: a bundle sidecar or two, no shards left
    assert sorted(Path(k).name for k in made if k.endswith(".mp4")) == ["clip.mp4", "one.mp4"]
    assert 1 <= len(made) - 2 <= 2 and all("bundle-" in k for k in made if not k.endswith(".mp4")), made
    again = run_job([*args, f"output={out}", "log.progress=false"], check=False, timeout=timeout)
    rerun = check_run(again, out)
    assert {k: v["status"] for k, v in rerun.items()} == {k: v["status"] for k, v in report.items()}
    assert rerun["zero"]["reason"] == report["zero"]["reason"]
    assert what_a_run_made(out) == made  # shards kept, videos not merged again
    drawn = re.search(r"(\d+) unit\(s\) drawn by this rank, (\d+) already done", again.stderr)
    assert drawn and drawn[1] == drawn[2] != "0", again.stderr[-3000:]
    return report, first


def test_upscale_short_videos(tmp_path):
    src = short_inputs(tmp_path / "in")
    out = tmp_path / "out"
    report, _ = run_twice(["job=upscale", f"input={src}", "job.model=lanczos", "job.scale=2"], out)
    one = ffmpeg_decode(out / "one.mp4")
    assert one.shape == (1, 2 * SIZE[1], 2 * SIZE[0], 3)
    assert decode_indices(one) == [0]
    assert report["one"]["frames"] == 1
    clip = probe_streams(out / "clip.mp4")
    assert (clip["frames"], clip["width"], clip["height"]) == (CLIP_FRAMES, 2 * SIZE[0], 2 * SIZE[1])


@pytest.mark.parametrize("factor", ["2", "5/2", "3", "1/2"])
def test_one_frame_by_the_timing_rule(factor):
    """floor(frames x fps_out / fps_in) output frames, at least one; every one within the only source
    frame's own duration, so it shows that frame (t = 0: no pair is asked for)."""
    fps_in = Fraction(30000, 1001)
    fps_out = fps_in * Fraction(factor)
    n = interp.output_count(1, fps_in, fps_out)
    assert n == max(1, math.floor(Fraction(factor)))
    assert [interp.source_of(k, 1, fps_in, fps_out) for k in range(n)] == [(0, 0)] * n


def test_interpolate_short_videos(tmp_path):
    src = short_inputs(tmp_path / "in")
    out = tmp_path / "out"
    report, _ = run_twice(["job=interpolate", f"input={src}", "job.model=blend", "job.factor=2"], out)
    source = read_frames(src / "one.mp4")[0]
    one = ffmpeg_decode(out / "one.mp4")
    assert one.shape == (2, SIZE[1], SIZE[0], 3)  # floor(1 x 2): the frame, held for its duration
    assert decode_indices(one) == [0, 0]
    assert all(psnr(f, source) > 35 for f in one)
    assert probe_streams(out / "one.mp4")["fps"] == Fraction(60000, 1001)
    assert (report["one"]["frames"], report["one"]["interpolated_frames"]) == (2, 0)  # no pair made
    assert probe_streams(out / "clip.mp4")["frames"] == 2 * CLIP_FRAMES


def stylize(frame: np.ndarray) -> np.ndarray:
    """A style far from the frame: inverted, channels rotated. (H, W, 3) uint8 -> same."""
    return np.ascontiguousarray((255 - frame)[..., ::-1])


def test_propagate_short_videos(tmp_path):
    src = short_inputs(tmp_path / "in")
    keys = {}
    for stem in ("one", "clip"):  # zero.mp4 has no keys: it must fail for its frames, not its keys
        keys[stem] = stylize(read_frames(src / f"{stem}.mp4")[0])
        (tmp_path / "keys" / stem).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "keys" / stem / "00000.png"), cv2.cvtColor(keys[stem], cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    run_twice(["job=propagate", f"input={src}", f"job.keys={tmp_path / 'keys'}", "device=cpu",
               "job.ebsynth.search_vote_iters=2", "job.ebsynth.patchmatch_iters=2"], out)
    one = ffmpeg_decode(out / "one.mp4")
    assert one.shape == (1, SIZE[1], SIZE[0], 3)
    assert psnr(one[0], keys["one"]) > 30  # the key itself, up to H.264
    clip = ffmpeg_decode(out / "clip.mp4")
    assert clip.shape == (CLIP_FRAMES, SIZE[1], SIZE[0], 3) and psnr(clip[0], keys["clip"]) > 30


def test_sim2real_short_videos(tmp_path):
    """Keyframes by FRESCO's default rule (min_interval 5 < max_interval 20: frame differences
    first), so the one-frame video takes that path too; its one keyframe is translated exactly as
    the pipeline translates that frame alone."""
    from test_sim2real import sim2real_cfg  # the same settings as the command line's

    from vsr_ddp import jobs
    from vsr_ddp.models import fresco

    src = short_inputs(tmp_path / "in")
    models = {"sd": save_tiny_sd15(tmp_path / "sd15"), "cn": save_tiny_controlnet(tmp_path / "control_canny")}
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for stem in ("zero", "one", "clip"):  # zero.mp4 has a prompt: it must fail, not be skipped
        (prompts / f"{stem}.txt").write_text("a real car on a road")
    settings = ["job.short_side=64", "job.steps=2", "job.strength=1.0", "job.batch_size=4",
                "job.fresco.opt_iters=2", "job.ebsynth.search_vote_iters=1", "job.ebsynth.patchmatch_iters=1"]
    out = tmp_path / "out"
    # lossless 4:4:4, so the key can be compared with the pipeline's own translation
    run_twice(["job=sim2real", f"input={src}", f"job.prompts={prompts}", f"job.base_model={models['sd']}",
               f"job.controlnet={models['cn']}", "device=cpu", "encode.preset=ultrafast", "encode.crf=0",
               "encode.pix_fmt=yuv444p", *settings], out, timeout=400)
    log = (out / ".vsr_ddp" / "logs" / "rank0.log").read_text()
    assert re.search(r"one: 1 frames at 64x64, 1 keyframes \[0\]", log), log[-3000:]
    one = read_frames(out / "one.mp4")
    assert one.shape == (1, SIZE[1], SIZE[0], 3)
    assert read_frames(out / "clip.mp4").shape == (CLIP_FRAMES, SIZE[1], SIZE[0], 3)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are many small ops: one thread is faster on a busy CPU
    try:
        job = jobs.make_job(sim2real_cfg(tmp_path, models, *settings), torch.device("cpu"))
        job.setup()
        opts = job.video_options("one")
        embeds = job.pipe.encode_prompt(opts.prompt + opts.added_prompt, opts.negative_prompt)
        frame = fresco.resize_frames(read_frames(src / "one.mp4"), fresco.work_size(*SIZE, 64))
        styled = job.pipe.translate({0: frame[0]}, [0], embeds, job.settings_for(opts), control_maps=job.maps)
    finally:
        torch.set_num_threads(threads)
    want = fresco.resize_frames(styled[0][None], SIZE)[0]
    assert psnr(one[0], want) > 40, psnr(one[0], want)
    assert psnr(one[0], read_frames(src / "one.mp4")[0]) < 25  # translated, not the input passed through
