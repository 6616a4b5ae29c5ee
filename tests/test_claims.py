"""Many launches, one output folder: units claimed dynamically, leases across launches, one merge
per video, a launch with other settings turned away, and what status shows of the units in hand."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from builders import (Gate, decode_indices, gated, make_clip, probe_streams, read_frames, records, sidecars,
                      wait_until)
from conftest import ROOT, job_cmd, job_env, read_report, run_job

from vsr_ddp import claims, shards
from vsr_ddp.plan import probe

HOST = socket.gethostname()


def dead_pid() -> int:
    """The process id of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(proc.stdout)


def foreign_lease(path: Path, age_s: float = 0.0, **who) -> dict:
    """A lease as another launch's rank leaves it, last renewed ``age_s`` ago."""
    body = {"run": "0123456789ab", "rank": 1, "host": HOST, "pid": os.getpid(), "token": "theirs",
            "since": "2026-12-05T10:00:00+0000", "what": "test", **who}
    path.write_text(json.dumps(body))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return body


# -- leases ------------------------------------------------------------------------------------

class Clock:
    """Both clocks of vsr_ddp.claims (this host's time, the monotonic one), moved by the test: a
    lease's age and how long a rank has watched it are exactly what the test says they are,
    whatever the load on the machine (the ``clock`` fixture puts it in)."""

    def __init__(self):
        self.wall, self.mono = time.time(), 0.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def stamp(self, path: Path, skew_s: float = 0.0) -> None:
        """A renewal of ``path`` now, by a host whose clock is ``skew_s`` off this one's."""
        os.utime(path, (self.wall + skew_s, self.wall + skew_s))


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(claims, "wall_clock", lambda: c.wall)
    monkeypatch.setattr(claims, "monotonic_clock", lambda: c.mono)
    return c


def take_when_free(leases: claims.Leases, lease: Path, clock: Clock, step_s: float = 0.01,
                   within_s: float = 10.0) -> float:
    """Poll for ``lease`` every ``step_s`` of the test's clock, as a rank polls; when it was taken."""
    start = clock.mono
    while not leases.acquire(lease):
        assert clock.mono - start < within_s, f"{lease.name} not taken within {within_s} s"
        clock.advance(step_s)
    return clock.mono


def test_a_renewed_lease_is_never_taken_and_a_dead_one_is(tmp_path, clock):
    """A holder that renews every 0.1 s keeps its lease (1 s timeout) for as long as it renews;
    once it stops (its node is gone) the lease changes hands exactly one timeout after the last
    renewal, and the old holder learns it lost it before it could commit anything."""
    lease = tmp_path / "segment_0000.lease"
    holder = claims.Leases("runA", 0, timeout_s=1.0, renew_s=0.1)
    other = claims.Leases("runB", 0, timeout_s=1.0, renew_s=0.1)
    try:
        assert holder.acquire(lease)
        made = lease.stat().st_mtime_ns
        deadline = time.monotonic() + 30  # the holder's own thread renews it (touches the file) ...
        while lease.stat().st_mtime_ns == made:
            assert time.monotonic() < deadline, "the holder's thread never renewed its lease"
            time.sleep(0.01)
        holder._stop.set()  # ... from here on the test renews it, on the test's clock
        holder._thread.join()
        for _ in range(25):  # 2.5 s, well past the timeout: renewed every 0.1 s, it stays the holder's
            holder.renew()
            clock.stamp(lease)
            for _ in range(5):  # the other rank polls every 0.02 s
                assert not other.acquire(lease)
                clock.advance(0.02)
        holder.renew()  # its last renewal
        clock.stamp(lease)
        stopped = clock.mono
        holder.check(lease)  # still the holder's
        taken = take_when_free(other, lease, clock)
        assert 0.99 <= taken - stopped <= 1.02  # one timeout after the last renewal, not before
        assert claims.read_lease(lease)["run"] == "runB"
        with pytest.raises(claims.LeaseLost, match="taken over by run runB rank 0"):
            holder.check(lease)
        holder.release(lease)  # not the holder's any more: it stays
        assert claims.read_lease(lease)["run"] == "runB"
    finally:
        other.close()
    assert not lease.exists()  # released on close


def test_a_lease_whose_process_is_gone_from_this_host_is_taken_at_once(tmp_path):
    leases = claims.Leases("runB", 0, timeout_s=300)
    try:
        lease = tmp_path / "segment_0001.lease"
        foreign_lease(lease, pid=dead_pid())  # a rank killed a moment ago, on this host
        assert leases.acquire(lease)
        # alive on this host, or on another host and fresh: theirs
        other = tmp_path / "segment_0002.lease"
        foreign_lease(other)
        assert not leases.acquire(other)
        elsewhere = tmp_path / "segment_0003.lease"
        foreign_lease(elsewhere, host="node-17", pid=dead_pid(), age_s=200)
        assert not leases.acquire(elsewhere)
    finally:
        leases.close()


def test_a_lease_not_renewed_for_the_timeout_is_taken_once_seen_unchanged(tmp_path, clock):
    """Its mtime says 301 s: taken once this rank has also seen it unchanged for three renewal
    periods (its own clock's word, not only the file's), and not before."""
    leases = claims.Leases("runB", 0, timeout_s=300, renew_s=0.2)
    try:
        lease = tmp_path / "segment_0003.lease"
        foreign_lease(lease, host="node-17")
        clock.stamp(lease, -301)
        assert not leases.acquire(lease)
        clock.advance(0.55)
        assert not leases.acquire(lease)  # unchanged for less than three renewal periods (0.6 s)
        clock.advance(0.1)
        assert leases.acquire(lease)
        assert claims.read_lease(lease)["run"] == "runB"
    finally:
        leases.close()


@pytest.mark.parametrize("skew_s", [-1000.0, 1000.0])
def test_hosts_whose_clocks_disagree_neither_steal_live_leases_nor_wait_forever(tmp_path, clock, skew_s):
    """A holder on a host whose clock is 1000 s behind (or ahead of) this one, with a 1 s timeout:
    while it renews (every 0.1 s, its clock's times), its lease stays its own although its mtimes
    look 1000 s old (behind); once it stops, the lease is taken three renewal periods later
    (behind: old by the clocks, and seen unchanged that long) or one timeout later by this rank's
    own clock (ahead), although its mtimes lie 1000 s in the future."""
    lease = tmp_path / "segment_0000.lease"
    foreign_lease(lease, host="node-17", pid=4242)
    other = claims.Leases("runB", 0, timeout_s=1.0, renew_s=0.1)
    try:
        for _ in range(30):  # 3 s of renewals
            clock.stamp(lease, skew_s)
            for _ in range(5):  # this rank polls every 0.02 s
                assert not other.acquire(lease), "a live lease was taken"
                clock.advance(0.02)
        clock.stamp(lease, skew_s)  # its last renewal
        stopped = clock.mono
        taken = take_when_free(other, lease, clock)
        assert claims.read_lease(lease)["run"] == "runB"
        expected = 0.3 if skew_s < 0 else 1.0
        assert expected - 0.01 <= taken - stopped <= expected + 0.02
    finally:
        other.close()


def test_the_leases_of_a_launch_that_is_gone_are_free_at_once(tmp_path):
    """torchrun restarts its workers after a crash: the old attempt's ranks on other nodes left
    fresh-looking leases, but its rank 0 (whose run file is on this host) is dead."""
    runs = tmp_path / "runs"
    runs.mkdir()
    leases = claims.Leases("newrun", 0, timeout_s=300, runs=runs)
    try:
        lease = tmp_path / "segment_0000.lease"
        foreign_lease(runs / "0123456789ab.json", rank=0)  # its launch is alive (this process)
        foreign_lease(lease, host="node-17", pid=4242)
        assert not leases.acquire(lease)
        foreign_lease(runs / "0123456789ab.json", rank=0, pid=dead_pid())  # ... and now it is not
        assert leases.acquire(lease)
        other = tmp_path / "segment_0001.lease"
        foreign_lease(other, run="ffffffffffff", host="node-17", pid=4242)  # a launch that ended
        assert leases.acquire(other)
    finally:
        leases.close()


def test_one_taker_wins_a_stale_lease(tmp_path):
    """Eight launches find the same dead holder's lease at once: exactly one takes it over."""
    for trial in range(20):
        lease = tmp_path / f"segment_{trial:04d}.lease"
        foreign_lease(lease, host="node-17", age_s=1000)
        takers = [claims.Leases(f"run{n}", 0, timeout_s=300, renew_s=0.05) for n in range(8)]
        start = threading.Barrier(len(takers))
        won = []

        def take(leases):
            start.wait()
            while (claims.read_lease(lease) or {}).get("token") == "theirs":  # each polls, as ranks do
                if leases.acquire(lease):
                    won.append(leases.run)
                    return
                time.sleep(0.005)

        threads = [threading.Thread(target=take, args=(t,)) for t in takers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, won
        assert claims.read_lease(lease)["run"] == won[0]
        for t in takers:
            t.close()
        assert not list(tmp_path.glob(f"segment_{trial:04d}*"))  # released: lease and marker gone


# -- whole launches ----------------------------------------------------------------------------

def unit_logs(output: Path, who: bool = False) -> list[tuple]:
    """(video, unit) of every unit made, from every rank log of every launch on the folder; with
    who, (video, unit, run, rank) as the line's tag says."""
    made = []
    for log in sorted(shards.logs_dir(output).glob("rank*.log")):
        for rank, run, video, unit in re.findall(
                r"\[rank (\d+) run (\w+)\] INFO vsr_ddp\.maker: (\S+) (segment_\d{4}): frames \[",
                log.read_text(encoding="utf-8")):
            made.append((video, unit, run, int(rank)) if who else (video, unit))
    return made


@pytest.mark.slow
def test_concurrent_launches_share_the_units_and_finish_together(tmp_path):
    """Two 2-rank launches of the same command on one folder (a second sbatch of the same
    script), then a lone process, each joining while the launches before it are at work. The
    launches are gated (tests/builders/gated_main.py): each one starts once every rank of the
    ones before holds a unit, and no unit is let through before every rank of all three holds
    one, so every rank of every launch makes a unit, however fast or loaded the machine. The
    videos are longer than a segment (no bundles), and their shards are kept after the merge
    (work.keep_shards=true) for the test to see who made each."""
    lengths = (24, 12, 18)
    clips = [make_clip(tmp_path / "in" / f"v{n}.mp4", frames=frames, size=(64, 48), audio=n == 0, seed=n)
             for n, frames in enumerate(lengths)]
    out = tmp_path / "out"
    args = [f"input={tmp_path / 'in'}", f"output={out}", "job=upscale", "job.model=lanczos", "job.scale=2",
            "work.segment_frames=6", "work.keep_shards=true"]
    wdirs = {shards.work_dir(out, probe(clip), "2x"): clip.stem for clip in clips}
    gate = Gate(tmp_path / "gate")
    env = gate.env(job_env())
    runs = shards.runs_dir(out)
    launches = []

    def launch(nproc: int) -> None:
        launches.append(subprocess.Popen(gated(job_cmd(args, nproc=nproc)), cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        held = len(gate.reached()) + nproc  # each of its ranks takes the next unit nobody holds
        wait_until(f"{held} units in hand", lambda: len(gate.reached()) == held, launches)

    launch(2)
    launch(2)
    launch(1)  # a lone process joins too
    gate.open_all()
    results = [p.communicate(timeout=600) + (p.returncode,) for p in launches]
    for stdout, stderr, rc in results:
        assert rc == 0, stderr[-3000:]
    # Every unit made once, by one launch or the other; both launches worked.
    made = unit_logs(out)
    units = sum(-(-n // 6) for n in lengths)
    assert len(made) == len(set(made)) == units
    sides = [json.loads(p.read_text()) for p in sidecars(out)]
    assert len(sides) == units
    launched = re.findall(r"INFO vsr_ddp\.claims: run (\w{12}): (\d) rank\(s\)",
                          (shards.logs_dir(out) / "rank0.log").read_text())
    assert sorted(int(n) for _, n in launched) == [1, 2, 2]
    first_run, second_run = [r for r, n in launched if n == "2"]
    by_run = {s["run"] for s in sides}
    assert {first_run, second_run} <= by_run <= {r for r, _ in launched}, "a 2-rank launch got no unit"
    every_rank = {(r, rank) for r, n in launched for rank in range(int(n))}
    assert {(s["run"], s["rank"]) for s in sides} == every_rank, "a rank of some launch made no unit"
    # The rank logs, shared by the launches, tag each line with its launch: they agree with the
    # sidecars on who made every unit.
    assert sorted(unit_logs(out, who=True)) == sorted(
        (wdirs[p.parent.parent], p.stem, s["run"], s["rank"])
        for p in sidecars(out) for s in [json.loads(p.read_text())])
    # Every video whole and right, merged exactly once.
    merges = []
    for log in shards.logs_dir(out).glob("rank*.log"):
        merges += re.findall(r"(\S+\.mp4) -> \S+: \d+ frames, merged in", log.read_text())
    assert sorted(Path(m).name for m in merges) == [f"v{n}.mp4" for n in range(3)]
    for n, (clip, frames) in enumerate(zip(clips, lengths)):
        final = out / f"v{n}.mp4"
        got = read_frames(final)
        assert got.shape == (frames, 96, 128, 3)
        assert decode_indices(got) == list(range(frames))
        assert probe_streams(final)["fps"] == probe_streams(clip)["fps"]
        wdir = shards.work_dir(out, probe(clip), "2x")
        assert json.loads((wdir / shards.MERGED).read_text())["run"] in by_run
    audio = [probe_streams(f)["audio_duration"] for f in (out / "v0.mp4", clips[0])]
    assert abs(audio[0] - audio[1]) < 0.05
    assert [v["status"] for v in read_report(out)["videos"]] == ["ok"] * 3
    # Nothing left behind: no lease, no partial file, no launch registered.
    assert not list(out.rglob("*.lease")) and not list(out.rglob("*.partial"))
    assert not list(runs.iterdir())
    # One launch alone (one rank) makes the same videos.
    solo = tmp_path / "solo"
    run_job([a.replace(f"output={out}", f"output={solo}") for a in args])
    for n in range(3):
        assert np.array_equal(read_frames(out / f"v{n}.mp4"), read_frames(solo / f"v{n}.mp4"))


@pytest.mark.slow
def test_a_merge_interrupted_by_a_kill_is_redone_and_only_the_merge(tmp_path):
    """A kill in the middle of a merge leaves every shard done (they go only after a merge is
    recorded), no output and no merge record: the rerun merges the video again from the same
    shards and makes no unit again. (The runs keep their shards, work.keep_shards=true, for the
    test to tell kept shards from remade ones.)"""
    clip = make_clip(tmp_path / "clip.mp4", frames=30, size=(64, 48), audio=True)
    out = tmp_path / "out"
    args = ["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos", "job.scale=2",
            "work.segment_frames=8", "work.keep_shards=true"]
    run_job(args)
    wdir = shards.work_dir(out, probe(clip), "2x")
    sides = {p.name: p.read_text() for p in sidecars(out)}
    assert len(sides) == 4
    first = read_frames(out / "clip.mp4")
    # What a kill in the middle of the merge leaves: the merger's lease (its process gone), its
    # temporary files (the output's and its streams'), no final video and no merge record.
    (out / "clip.mp4").unlink()
    (wdir / shards.MERGED).unlink()
    foreign_lease(wdir / shards.MERGE_LEASE, pid=dead_pid())
    (out / "clip.mp4.0123456789ab-r1.partial").write_bytes(b"\0" * 1000)
    (out / "clip.mp4.0123456789ab-r1.streams.partial").write_bytes(b"\0" * 1000)
    proc = run_job(args)
    assert np.array_equal(read_frames(out / "clip.mp4"), first)
    assert {p.name: p.read_text() for p in sidecars(out)} == sides  # no unit redone
    assert sorted(unit_logs(out)) == [("clip", f"segment_{k:04d}") for k in range(4)]  # each made once
    assert "taking over" in (shards.logs_dir(out) / "rank0.log").read_text()
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.lease"))
    assert read_report(out)["videos"][0]["status"] == "ok"
    # A rerun of a finished folder merges nothing again.
    stamp = (out / "clip.mp4").stat().st_mtime_ns
    run_job(args)
    assert (out / "clip.mp4").stat().st_mtime_ns == stamp
    assert proc.returncode == 0


def test_a_launch_with_other_settings_stops_before_any_work(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=12, size=(64, 48), audio=False)
    out = tmp_path / "out"
    args = ["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos", "job.scale=2"]
    # a live launch on the folder (this process renews its run file), running job.scale=4
    runs = out / ".vsr_ddp" / "runs"
    runs.mkdir(parents=True)
    live = claims.Leases("0123456789ab", 0, timeout_s=300)
    try:
        settings = {"job": "upscale", "model": "lanczos", "scale": 4.0, "outscale": None}
        assert live.acquire(runs / "0123456789ab.json", extra={"signature": "theirs", "settings": settings})
        proc = run_job(args, check=False)
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert errors[0].startswith(f"error: output folder {out} is in use by run 0123456789ab rank 0 on "
                                    f"{HOST} with other settings (scale: 4.0 there, 2.0 here; ")
        assert errors[0].endswith("): wait for it to finish, launch with its settings to join it, or use "
                                  "another output=")
        assert "frames" not in proc.stderr  # no progress bar: nothing started
        assert not list(shards.work_dirs(out)) and not records(out) and not (out / "clip.mp4").exists()
        assert [p.name for p in runs.iterdir()] == ["0123456789ab.json"]  # its own run file is gone
    finally:
        live.close()
    # Once that launch is gone (its run file with it), the folder is free.
    run_job(args)
    assert (out / "clip.mp4").exists()


def test_status_shows_who_holds_the_units_in_hand(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=24, size=(64, 48), audio=False)
    out = tmp_path / "out"
    run_job(["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos", "job.scale=2",
             "work.segment_frames=8", "work.keep_shards=true"])
    wdir = next(shards.work_dirs(out))
    for path in (shards.sidecar_path(wdir, "segment_0001"), wdir / shards.MERGED):
        path.unlink()
    (out / "clip.mp4").unlink()
    # A launch working on the folder now: its run file, and rank 1's lease on segment 1 ...
    runs = shards.runs_dir(out)
    runs.mkdir(exist_ok=True)
    foreign_lease(shards.run_file(out, "0123456789ab"), rank=0, world=2, job="upscale", input=str(clip))
    foreign_lease(shards.lease_path(wdir, "segment_0001"), rank=1, host="node-17")
    # ... and a merge lease left by a launch that died on this host
    foreign_lease(wdir / shards.MERGE_LEASE, run="ba9876543210", rank=0, pid=dead_pid())
    proc = subprocess.run([sys.executable, "-m", "vsr_ddp.status", f"output={out}"], capture_output=True,
                          text=True, cwd=ROOT, env=job_env(), check=True)
    assert "run 0123456789ab: 2 rank(s), rank 0 on " + HOST in proc.stdout
    assert "clip segment_0001 frames [8, 16): run 0123456789ab rank 1 on node-17 since" in proc.stdout
    assert re.search(r"clip merge: run ba9876543210 rank 0 on \S+ since \S+ \(not renewed: its holder died",
                     proc.stdout)
    data = json.loads(subprocess.run([sys.executable, "-m", "vsr_ddp.status", f"output={out}", "--json"],
                                     capture_output=True, text=True, cwd=ROOT, env=job_env(),
                                     check=True).stdout)
    held = data["videos"][0]["in_hand"]
    assert [(h["segment"], h["run"], h["rank"], h["stale"]) for h in held] == \
        [("segment_0001", "0123456789ab", 1, False), ("merge", "ba9876543210", 0, True)]
    assert [r["run"] for r in data["runs"]] == ["0123456789ab"]
