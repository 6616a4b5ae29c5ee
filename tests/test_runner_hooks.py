"""The runner's interface for whole-unit jobs (propagation, diffusion): own units, context, order."""
from __future__ import annotations

import numpy as np
import pytest
from builders import make_clip, read_frames
from conftest import job_runner, read_report

from vsr_ddp import jobs
from vsr_ddp.plan import InputError, Unit


class TemporalMean(jobs.Job):
    """Each output frame is the mean of its input frame and both neighbours: needs context. Only
    what differs from the Job contract's defaults is written here: overriding process_unit makes
    it a whole-unit job, reads_context hands it each unit's read range."""

    name = "tmean"
    reads_context = True

    def __init__(self, cfg, device):
        self.calls = []

    def tag(self):
        return "tmean"

    def settings(self):
        return {"job": self.name}

    def plan_video(self, info, vi):
        if info.frames < 10:
            raise InputError("too short for this job")
        cuts = [0, 7, 19, info.frames]  # uneven units, like key intervals
        return [Unit(vi, i, a, b, max(0, a - 1), min(info.frames, b + 1))
                for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]

    def process_unit(self, frames, unit, info):
        self.calls.append((unit.read_start, unit.read_end, len(frames)))
        f = frames.astype(np.float32)
        padded = np.concatenate([f[:1], f, f[-1:]])
        mean = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
        lo = unit.start - unit.read_start  # at the video's ends the edge frame stands in for the neighbour
        return mean[lo:lo + unit.frames].round().astype(np.uint8)


def test_whole_unit_job_gets_its_units_with_context(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "in" / "v.mp4", frames=30, audio=False)
    make_clip(tmp_path / "in" / "w.mp4", frames=6, audio=False)
    out = tmp_path / "out"
    runner = job_runner(TemporalMean, tmp_path / "in", out, monkeypatch, "encode.crf=0",
                        "encode.preset=ultrafast")
    assert runner.run() == 1  # w.mp4 was rejected by the job's own planning
    assert runner.job.calls == [(0, 8, 8), (6, 20, 14), (18, 30, 12)]
    report = {v["input"].rsplit("/", 1)[1]: v for v in read_report(out)["videos"]}
    assert report["w.mp4"]["status"] == "failed" and "too short" in report["w.mp4"]["reason"]
    src = read_frames(clip).astype(np.float32)
    padded = np.concatenate([src[:1], src, src[-1:]])
    want = ((padded[:-2] + padded[1:-1] + padded[2:]) / 3).round()
    got = read_frames(out / "v.mp4").astype(np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 2  # yuv420p noise only; a unit off by one frame is far worse


def test_two_ranks_on_one_gpu_is_a_launch_error():
    from vsr_ddp.dist import DistError, check_gpus

    check_gpus([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a")])  # same model of GPU on two nodes: fine
    with pytest.raises(DistError, match="ranks 0 and 2 on n1 both use GPU GPU-a"):
        check_gpus([("n1", "GPU-a"), ("n1", "GPU-b"), ("n1", "GPU-a")])
