"""The progress line counts what is there: "all ranks N/M frames, ETA ..." never shows more frames
done than the run makes (N > M) nor a negative ETA, and a run ends at N == M: two ranks (the
demo's run: units drawn by whichever rank is free, the rank that completes a video merges it), a
rerun on the same folder (every unit found done), a unit whose lease is taken over after its
frames were counted, and a unit that fails part way."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from builders import already_done, make_clip
from conftest import job_runner, read_report, run_job

from vsr_ddp import claims, jobs
from vsr_ddp.logs import human_duration
from vsr_ddp.plan import Unit
from vsr_ddp.runner import Runner

LINE = re.compile(r"all ranks (-?\d+)/(-?\d+) frames, ETA (\S+(?: \S+)*)$")


def progress_lines(text: str) -> list[tuple[int, int, str]]:
    """(done, total, ETA) of every progress line in a log."""
    return [(int(m[1]), int(m[2]), m[3]) for m in map(LINE.search, text.splitlines()) if m]


def check_lines(lines: list[tuple[int, int, str]], end: int, where: str, text: str) -> None:
    """Every line: 0 <= N <= M, no negative ETA; the last one N == M == ``end``. The display
    clamps N to M as a safety net: the counts under it must agree too (the run's last line
    warns in the log file when they do not)."""
    assert "frames counted for a total of" not in text, (where, text[-2000:])
    assert lines, f"no progress line in {where}"
    for done, total, eta in lines:
        assert 0 <= done <= total, (where, lines)
        assert not eta.startswith("-"), (where, lines)
    assert lines[-1][:2] == (end, end), (where, lines)


def test_human_duration_is_never_negative():
    assert human_duration(-48) == "0 s"
    assert human_duration(-1e9) == "0 s"
    assert human_duration(90) == "1 min"


@pytest.mark.slow
def test_two_ranks_then_a_rerun(clips, tmp_path):
    """Two ranks on one video cut into four segments: each unit is drawn by one rank, and the
    rank that completes the video merges it; no unit's frames are counted twice (the demo's
    'all ranks 100/50 frames, ETA -48 s' once). The rerun on the same folder finds everything
    done (the merge record) and takes it all off the total: 0/0."""
    out = tmp_path / "out"
    args = ["job=upscale", f"input={clips['av']}", f"output={out}", "job.model=lanczos", "job.scale=2",
            "work.segment_frames=12", "encode.preset=ultrafast", "log.progress=false", "log.every_s=0.5"]
    logs = out / ".vsr_ddp" / "logs"
    run_job(args, nproc=2)
    assert [v["status"] for v in read_report(out)["videos"]] == ["ok"]
    for rank in (0, 1):
        text = (logs / f"rank{rank}.log").read_text()
        check_lines(progress_lines(text), 48, f"rank {rank}", text)
    sizes = {rank: len((logs / f"rank{rank}.log").read_text()) for rank in (0, 1)}
    run_job(args, nproc=2)  # the demo run again on its folder: a resume with nothing left
    assert already_done(out, ranks=2) == 4  # its four units, found done by whichever rank drew each
    for rank in (0, 1):
        rerun = (logs / f"rank{rank}.log").read_text()[sizes[rank]:]  # the log files are appended
        check_lines(progress_lines(rerun), 0, f"rank {rank}, rerun", rerun)


class Slow(jobs.Job):
    """A whole-unit job that tells the bar about its frames before it has them (as propagate
    does), so a unit that is lost or fails part way has frames on the bar already."""

    name = "slowcopy"

    def __init__(self, cfg, device):
        self.fail_unit = None

    def begin(self, info, unit, progress):
        self.progress = progress  # the unit's progress callback, handed in by the runner

    def tag(self):
        return "slow"

    def settings(self):
        return {"job": self.name}

    def plan_video(self, info, vi):
        cuts = [0, 7, 19, info.frames]
        return [Unit(vi, i, a, b, a, b) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]

    def process_unit(self, frames, unit, info):
        for k in range(1, len(frames)):
            self.progress(k)  # frames as good as done, before the unit has them
        if unit.seg_idx == self.fail_unit:
            raise RuntimeError("the model gave up part way")
        return frames.copy()


def run_in_process(tmp_path, monkeypatch, caplog, fail_unit=None) -> tuple[Runner, int]:
    make_clip(tmp_path / "in" / "v.mp4", frames=30, audio=False)
    runner = job_runner(Slow, tmp_path / "in", tmp_path / "out", monkeypatch, "log.every_s=0.5",
                        "encode.preset=ultrafast")
    runner.job.fail_unit = fail_unit
    with caplog.at_level(logging.INFO, logger="vsr_ddp.progress"):
        status = runner.run()
    return runner, status


def test_a_unit_whose_lease_was_taken_over_is_not_counted_twice(tmp_path, monkeypatch, caplog):
    """Unit 1's lease is lost just before its shard is committed (another launch took it over:
    its frames were on the bar already); the unit is made again, as the other launch would."""
    check = claims.Leases.check
    lost = []

    def check_once(self, path):
        if Path(path).name == "segment_0001.lease" and not lost:
            lost.append(path)
            raise claims.LeaseLost(f"lease {Path(path).name} was taken over by a test")
        return check(self, path)

    monkeypatch.setattr(claims.Leases, "check", check_once)
    runner, status = run_in_process(tmp_path, monkeypatch, caplog)
    assert status == 0 and lost
    assert [v["status"] for v in read_report(tmp_path / "out")["videos"]] == ["ok"]
    check_lines(progress_lines(caplog.text), 30, "the log", caplog.text)
    assert runner.ctx.add("frames_done", 0) == runner.ctx.add("frames_total", 0) == 30


def test_a_unit_that_fails_part_way_leaves_the_total(tmp_path, monkeypatch, caplog):
    """Unit 1 fails after putting frames on the bar: its frames come off the bar and the unit off
    the total (its video fails: unit 2 is never made either); the run ends at what it made."""
    runner, status = run_in_process(tmp_path, monkeypatch, caplog, fail_unit=1)
    assert status == 1
    assert [v["status"] for v in read_report(tmp_path / "out")["videos"]] == ["failed"]
    check_lines(progress_lines(caplog.text), 7, "the log", caplog.text)
    assert runner.ctx.add("frames_done", 0) == runner.ctx.add("frames_total", 0) == 7
