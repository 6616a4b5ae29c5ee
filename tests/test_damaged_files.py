"""Bookkeeping files left damaged in the output folder (garbage, empty, cut short), as a crash on a
filesystem without ordering, a full disk or a stray copy leaves them: the rerun of the same command
redoes exactly what they recorded, replaces them, warns once per file, and blocks on none."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from builders import decode_indices, make_clip, read_frames, shard_files
from conftest import read_report, run_job

from vsr_ddp import shards
from vsr_ddp.plan import probe


def test_damaged_sidecars_checkpoint_leases_and_run_files_are_redone_replaced_and_named(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=40, size=(64, 48), audio=True)
    out = tmp_path / "out"
    # a short lease timeout: a damaged lease is taken over after three renewal periods (3 s), not 5 s
    args = ["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos", "job.scale=2",
            "work.segment_frames=8", "work.lease_timeout_s=10", "work.keep_shards=true"]
    run_job(args)
    wdir = shards.work_dir(out, probe(clip), "2x")
    log = shards.logs_dir(out) / "rank0.log"

    def unit_file(name: str) -> Path:  # segment_0002.lease -> its place in the work folder
        return shards.unit_dir(wdir, name.split(".")[0]) / name

    first_log = log.read_text(encoding="utf-8")
    assert " WARNING " not in first_log
    first = read_frames(out / "clip.mp4")
    before = shard_files(wdir)

    # What a crash or a full disk leaves, unit by unit:
    side = unit_file("segment_0000.json").read_bytes()
    unit_file("segment_0000.json").write_bytes(side[:len(side) // 2])  # cut short
    garbage = np.random.default_rng(1).integers(0, 256, 300, np.uint8).tobytes()
    unit_file("segment_0001.json").write_bytes(garbage)
    for name in ("segment_0002.json", "segment_0002.mp4", "segment_0003.json", "segment_0003.mp4"):
        unit_file(name).unlink()  # units in hand when it stopped: their leases are left
    unit_file("segment_0002.lease").write_bytes(b"\x00\x00{\"run\": \"9f")  # this host's lease, garbled
    # another host's launch, whose run file is garbled: its lease is sound, its launch unreadable
    unit_file("segment_0003.lease").write_text(json.dumps({
        "run": "deadbeef0001", "rank": 1, "host": "node-gone", "pid": 4242, "token": "ab" * 16,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": "clip segment_0003"}))
    shards.run_file(out, "deadbeef0001").write_text('{"run": "deadbeef0001", "rank": 0, "ho')
    (wdir / "merge.lease").write_bytes(b"")  # created, never written: the disk was full
    (wdir / "checkpoint.json").write_bytes(b"\x89garbage\xff" * 10)
    merged = (wdir / "merged.json").read_text()
    (wdir / "merged.json").write_text(merged[:40])
    (out / "clip.mp4").unlink()

    t0 = time.monotonic()
    run_job(args)  # the same command
    rerun_s = time.monotonic() - t0
    assert rerun_s < 60, f"the rerun waited {rerun_s:.0f} s on damaged leases"
    assert read_report(out)["videos"][0]["status"] == "ok"

    # exactly the damaged units were made again (by the rerun: its run id), the sound one kept as
    # it was (same bytes, same inode: files are replaced, never rewritten in place)
    after = shard_files(wdir)
    assert after["segment_0004.json"] == before["segment_0004.json"]
    assert after["segment_0004.mp4"] == before["segment_0004.mp4"]
    first_run = json.loads(before["segment_0004.json"][0])["run"]
    for k in range(4):
        side = json.loads(after[f"segment_{k:04d}.json"][0])
        assert side["run"] != first_run, f"segment_{k:04d} was not made again"
        assert (side["start"], side["end"]) == (8 * k, 8 * k + 8)
    # the damaged files are good JSON again; the leases are gone with their units
    checkpoint = json.loads((wdir / "checkpoint.json").read_text())
    assert [s["status"] for s in checkpoint["segments"].values()] == ["done"] * 5
    assert json.loads((wdir / "merged.json").read_text())["output"] == str(out / "clip.mp4")
    assert not list(out.rglob("*.lease")) and not list(out.rglob("*.takeover-*"))
    assert not list(out.rglob("*.partial"))
    # the same frames as the first run
    again = read_frames(out / "clip.mp4")
    assert np.array_equal(again, first)
    assert decode_indices(again) == list(range(40))

    # one warning per damaged file, naming it
    rerun_log = log.read_text(encoding="utf-8")[len(first_log):]
    warnings = [line.split(" WARNING ", 1)[1] for line in rerun_log.splitlines() if " WARNING " in line]
    damaged = [unit_file("segment_0000.json"), unit_file("segment_0001.json"),
               unit_file("segment_0002.lease"), shards.run_file(out, "deadbeef0001"), wdir / "merge.lease",
               wdir / "checkpoint.json", wdir / "merged.json"]
    for path in damaged:
        named = [w for w in warnings if w.split(": ", 1)[1].startswith(f"{path} is damaged")]
        assert len(named) == 1, (path, warnings)
    assert len(warnings) == len(damaged), warnings
    assert "segment_0003.lease: taking over from run deadbeef0001 rank 1 on node-gone (its launch " \
           "deadbeef0001 is gone (run file deadbeef0001.json: damaged" in rerun_log


def test_a_shard_changed_in_place_is_caught_by_the_merge_and_named(tmp_path, capsys):
    """A finished shard whose bytes changed but not its size (bit rot, a stray write): the rerun
    trusts shards by size and sidecar, so the unit is not made again, but the merge checks each
    shard's checksum as it reads it: the video fails, naming the shard, and nothing is left under
    the output's name. ``status --verify`` names it too; once it is removed, the next rerun makes
    that unit alone again and the video is whole."""
    from vsr_ddp import status

    clip = make_clip(tmp_path / "clip.mp4", frames=24, size=(64, 48), audio=False)
    out = tmp_path / "out"
    args = ["job=upscale", f"input={clip}", f"output={out}", "job.model=lanczos", "job.scale=2",
            "work.segment_frames=8", "work.keep_shards=true"]
    run_job(args)
    wdir = shards.work_dir(out, probe(clip), "2x")
    first = read_frames(out / "clip.mp4")
    before = shard_files(wdir)
    shard = shards.unit_dir(wdir, "segment_0001") / "segment_0001.mp4"
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    shard.write_bytes(bytes(data))  # same size, other bytes
    (out / "clip.mp4").unlink()  # the rerun merges it again

    proc = run_job(args, check=False)
    assert proc.returncode == 1
    report = read_report(out)
    assert report["totals"]["failed"] == 1
    reason = report["failures"][0]["reason"]
    assert reason.startswith("merge: segment_0001.mp4: its bytes do not match the checksum"), reason
    assert not (out / "clip.mp4").exists() and not list(out.rglob("*.partial"))
    after = shard_files(wdir)  # no unit made again: resume trusts the sizes
    assert {k: v for k, v in after.items() if k != "segment_0001.mp4"} == \
        {k: v for k, v in before.items() if k != "segment_0001.mp4"}

    assert status.main([f"output={out}", "--verify"]) == 1
    assert f"{shard}: checksum differs" in capsys.readouterr().out

    shard.unlink()
    run_job(args)
    assert read_report(out)["totals"] == {"videos": 1, "ok": 1, "failed": 0, "skipped": 0}
    again = shard_files(wdir)
    run_of = lambda files: json.loads(files["segment_0001.json"][0])["run"]  # noqa: E731
    assert run_of(again) != run_of(before)  # made again (by the last run) ...
    for k in (0, 2):  # ... and only it
        for ext in ("json", "mp4"):
            assert again[f"segment_{k:04d}.{ext}"] == before[f"segment_{k:04d}.{ext}"]
    assert np.array_equal(read_frames(out / "clip.mp4"), first)
