"""The work board at scale (issue: bookkeeping that does not grow with videos x ranks): ranks with
nothing left to draw wait on the store, one rank per launch (the watcher) looks at what other
launches hold, so the file-system operations of a waiting launch are the same with 2 and 8 ranks;
short clips are bundled, each still with its own output and report line."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from builders import (Gate, decode_indices, gated, kill_tree, make_clip, make_zero_frames, probe_streams,
                      read_frames, unit_point, wait_until)
from conftest import ROOT, job_cmd, job_env, read_report, run_job

from vsr_ddp import shards
from vsr_ddp.plan import VideoInfo, bundle_units, plan_units

CLIPS = 3


def waits(out: Path, run: str) -> dict[int, tuple[float, int]]:
    """rank -> (seconds it waited for the plan to finish, file-system looks meanwhile) in launch
    ``run``, from the rank logs (shared by the launches on the folder)."""
    found = {}
    for log in shards.logs_dir(out).glob("rank*.log"):
        for m in re.finditer(rf"\[rank (\d+) run {run}\] INFO vsr_ddp\.work: waited ([\d.]+) s for the plan "
                             r"to finish; (\d+) file-system look", log.read_text()):
            found[int(m[1])] = (float(m[2]), int(m[3]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 8])
def test_waiting_ranks_look_at_the_store_not_the_file_system(tmp_path, nproc):
    """Three clips, each its own bundle (work.bundle_frames=1). A first launch (one rank, gated)
    makes two and holds the third; a second launch of ``nproc`` ranks joins, finds two done and
    the third in other hands, and every one of its ranks waits. Exactly one of them (the watcher)
    looks at the held unit on disk, about once a second, the others at nothing, however many they
    are; once the first launch finishes it, the second one's watcher sees it and both end."""
    for n in range(CLIPS):
        make_clip(tmp_path / "in" / f"c{n}.mp4", frames=6, size=(32, 24), audio=False, seed=n)
    out = tmp_path / "out"
    args = [f"input={tmp_path / 'in'}", f"output={out}", "job=upscale", "job.model=bicubic", "job.scale=2",
            "work.bundle_frames=1", "work.lease_timeout_s=10", "log.progress=false"]
    gate = Gate(tmp_path / "gate")
    gate.open(unit_point("c0", 0), unit_point("c1", 0))
    first = subprocess.Popen(gated(job_cmd(args)), cwd=ROOT, env=gate.env(job_env()),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the first launch holding c2", lambda: unit_point("c2", 0) in gate.reached(), [first])

        def open_once_all_wait():  # the first launch finishes c2 4 s after the second's ranks all drew
            deadline = time.monotonic() + 240  # (the first launch says it has drawn only after c2)
            while time.monotonic() < deadline:
                logs = "".join(p.read_text() for p in shards.logs_dir(out).glob("rank*.log"))
                if logs.count("drawn by this rank") >= nproc:
                    time.sleep(4.0)
                    break
                time.sleep(0.2)
            gate.open_all()

        opener = threading.Thread(target=open_once_all_wait, daemon=True)
        opener.start()
        run_job(args, nproc=nproc)
        opener.join()
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err[-3000:]
    finally:
        gate.open_all()
        kill_tree(first)
    assert [v["status"] for v in read_report(out)["videos"]] == ["ok"] * CLIPS
    for n in range(CLIPS):
        assert decode_indices(read_frames(out / f"c{n}.mp4")) == list(range(6))
    logs = "".join(p.read_text() for p in shards.logs_dir(out).glob("rank*.log"))
    run = re.search(rf"run (\w{{12}}): {nproc} rank\(s\)", logs)[1]
    w = waits(out, run)
    assert sorted(w) == list(range(nproc)), w  # every rank of the second launch waited
    watching = [r for r, (_, looks) in w.items() if looks]
    assert len(watching) == 1, w  # one watcher; the others looked at nothing while they waited
    seconds, looks = w[watching[0]]
    assert seconds >= 3 and 2 <= looks <= seconds / 1.0 + 2, w  # one look a poll (1 s), not one a rank


def test_bundles_are_runs_of_short_videos_cut_where_the_clips_say():
    """bundle_units: whole short videos together up to bundle_frames; a video cut into segments
    keeps its units; a boundary stays where it was when a clip is added elsewhere."""
    def video(rel, frames):
        return VideoInfo(path=f"/in/{rel}.mp4", frames=frames, fps=25, width=8, height=8, codec="h264",
                         rel=rel)

    def bundles(videos, limit=100):
        units = bundle_units(plan_units(videos, "segment", 50, 0), videos, limit, lambda rels: "+".join(rels))
        return [u.key if u.parts else f"{videos[u.video].rel}:{u.key}" for u in units]

    vids = [video(f"c{k:03d}", 8) for k in range(40)] + [video("long", 120)] + [video("z", 8)]
    keys = bundles(vids)
    assert keys[-1] == "z" and keys[-4:-1] == ["long:segment_0000", "long:segment_0001", "long:segment_0002"]
    clips = [k.split("+") for k in keys[:-4]]
    assert [c for group in clips for c in group] == [f"c{k:03d}" for k in range(40)]  # in order, each once
    assert all(len(g) * 8 <= 100 for g in clips)  # at most bundle_frames frames a bundle
    # A clip added in the middle changes the bundles around it only.
    more = vids[:20] + [video("c019b", 8)] + vids[20:]
    after = bundles(more)
    changed = set(keys) ^ set(after)
    assert len(changed) <= 4, changed
    # A video longer than bundle_frames that is one unit (work.unit=video) is a bundle of its own.
    solo = bundle_units(plan_units([video("a", 8), video("big", 500)], "video", 0, 0), [video("a", 8),
                        video("big", 500)], 100, lambda rels: "+".join(rels))
    assert [u.key for u in solo] == ["a", "big"]


@pytest.mark.slow
def test_a_bundle_gives_each_clip_its_output_report_line_and_failure(tmp_path):
    """Four short clips in one bundle on 2 ranks, one of them with no frames: three outputs with
    their audio, three ok lines and one failure in the report, one bundle sidecar; a relaunch
    makes nothing again and reports the same."""
    src = tmp_path / "in"
    good = [make_clip(src / "a" / "clip.mp4", frames=5, size=(32, 24), audio=True, seed=1),
            make_clip(src / "b" / "clip.mp4", frames=7, size=(32, 24), audio=False, seed=2),
            make_clip(src / "c.mp4", frames=1, size=(32, 24), audio=False, seed=3)]
    make_zero_frames(src / "b" / "zero.mp4")
    out = tmp_path / "out"
    args = [f"input={src}", f"output={out}", "job=upscale", "job.model=bicubic", "job.scale=2",
            "log.progress=false"]
    first = run_job(args, nproc=2, check=False)
    assert first.returncode == 1, first.stderr[-3000:]
    report = read_report(out)
    assert report["totals"] == {"videos": 4, "ok": 3, "failed": 1, "skipped": 0}
    assert [f["input"] for f in report["failures"]] == [str(src / "b" / "zero.mp4")]
    by_input = {v["input"]: v for v in report["videos"]}
    for clip, rel, frames in zip(good, ("a/clip", "b/clip", "c"), (5, 7, 1)):
        final = out / f"{rel}.mp4"
        assert by_input[str(clip)]["output"] == str(final) and by_input[str(clip)]["frames"] == frames
        assert decode_indices(read_frames(final)) == list(range(frames))
    audio = [probe_streams(f)["audio_duration"] for f in (out / "a" / "clip.mp4", good[0])]
    assert abs(audio[0] - audio[1]) < 0.05
    finished = shards.bundle_sidecars(out)
    assert len(finished) == 1 and len(json.loads(finished[0].read_text())["clips"]) == 3
    made = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    # the same command again: nothing made, the same report
    again = run_job(args, nproc=2, check=False)
    assert again.returncode == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")} == made
    assert read_report(out)["totals"] == report["totals"]
    drawn = re.findall(r"(\d+) unit\(s\) drawn by this rank, (\d+) already done", again.stderr)
    assert drawn and all(a == b for a, b in drawn), again.stderr[-2000:]
