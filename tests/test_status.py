"""python -m vsr_ddp.status on finished runs (segmented videos whose shards were removed or kept,
bundled short clips), on a run that is half done with a failure, on inputs known from the report
lines alone, and --verify (checksums of the shards on disk, sizes of the merged outputs)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from builders import make_clip
from conftest import ROOT, read_report, run_job

from vsr_ddp import shards, status
from vsr_ddp.atomic import atomic_write_json
from vsr_ddp.config import shipped
from vsr_ddp.plan import Unit

LEASE_S = shipped("config", "work.lease_timeout_s")  # the runs' work.lease_timeout_s, as shipped


def segmented_run(clips, out: Path, *extra: str) -> Path:
    """A real run over the two session clips (48 + 36 frames), 12-frame segments: 4 + 3 shards."""
    run_job(["job=upscale", f"input={clips['av'].parent}", f"output={out}", "job.model=lanczos",
             "job.scale=2", "work.segment_frames=12", "encode.preset=ultrafast", "log.progress=false",
             *extra])
    assert [v["status"] for v in read_report(out)["videos"]] == ["ok", "ok"]
    return out


@pytest.fixture(scope="module")
def finished(clips, tmp_path_factory):
    """The run as it ends by default: merged, the shards and their sidecars removed."""
    return segmented_run(clips, tmp_path_factory.mktemp("status") / "out")


@pytest.fixture(scope="module")
def kept(clips, tmp_path_factory):
    """The same run with work.keep_shards=true: every shard and sidecar stays after the merge."""
    return segmented_run(clips, tmp_path_factory.mktemp("status_kept") / "out", "work.keep_shards=true")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """A run of short clips (one unit each: bundled) beside one long enough to be segmented."""
    d = tmp_path_factory.mktemp("bundled")
    src = d / "in"
    (src / "sub").mkdir(parents=True)
    make_clip(src / "long.mp4", frames=24, size=(64, 48), audio=False)
    for name, frames in (("s1", 5), ("s2", 6), ("sub/s3", 4)):
        make_clip(src / f"{name}.mp4", frames=frames, size=(64, 48), audio=False, seed=frames)
    out = d / "out"
    run_job(["job=upscale", f"input={src}", f"output={out}", "job.model=bicubic", "job.scale=2",
             "work.segment_frames=12", "encode.preset=ultrafast", "log.progress=false"])
    assert [v["status"] for v in read_report(out)["videos"]] == ["ok"] * 4
    return out


def wdir_of(out: Path, stem: str) -> Path:
    """The work folder of the video ``stem`` (shards.work_dir's ``<stem>-<h>_<tag>``)."""
    return next(d for d in shards.work_dirs(out) if d.name.startswith(f"{stem}-"))


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run's output folder whose records (merged.json, checkpoint.json, bundle
    sidecars, the report) name the copy's outputs, as if it had run there."""
    shutil.copytree(src, dst)
    for record in [*shards.root(dst).rglob("*.json"), *dst.glob(shards.REPORTS)]:
        text = record.read_text()
        if str(src) in text:
            record.write_text(text.replace(str(src), str(dst)))
    return dst


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vsr_ddp.status", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def run_main(capsys, *args) -> tuple[int, str]:
    """status.main in this process: its exit status and what it printed."""
    rc = status.main([str(a) for a in args])
    return rc, capsys.readouterr().out


def test_finished_run(finished):
    st = status.collect(finished, LEASE_S)
    assert [(v["stem"], v["state"], v["shards_done"], v["shards_total"], v["frames_done"], v["frames_total"])
            for v in st["videos"]] == [("av", "merged", 4, 4, 48, 48), ("sub", "merged", 3, 3, 36, 36)]
    assert all(v["eta_s"] == 0 and v["fps"] > 0 and not v["failures"] for v in st["videos"])
    assert st["total"] | {"fps": None} == {"videos": 2, "merged": 2, "failed": 0, "shards_done": 7,
                                           "shards_total": 7, "frames_done": 84, "frames_total": 84,
                                           "fps": None, "eta_s": 0.0}

    table = cli(f"output={finished}")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["video", "shards", "frames", "frames/s", "ETA", "state", "failures"]
    assert lines[1].split()[:3] == ["av", "4/4", "48/48"] and lines[1].split()[-2:] == ["merged", "0"]
    assert lines[-1].split()[:4] == ["all", "2", "7/7", "84/84"]
    # --json says the same as collect(), and the module never imports torch (instant on a login node).
    probe = subprocess.run([sys.executable, "-c", "import sys; from vsr_ddp import status; "
                            f"rc = status.main(['--output', {str(finished)!r}, '--json']); "
                            "sys.exit(rc or ('torch' in sys.modules and 3))"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)["total"]["frames_done"] == 84


def test_a_merged_video_whose_shards_were_removed_is_merged(finished, tmp_path):
    """After a verified merge the shards and sidecars go: merged.json alone says the video is done,
    its work seconds from the merge's result; an output that no longer has the recorded size is not."""
    assert shards.sidecar_files(finished) == []  # work.keep_shards=false: nothing left but the records
    av = wdir_of(finished, "av")
    assert sorted(p.name for p in av.iterdir()) == [shards.CHECKPOINT, shards.MERGED]
    merged = json.loads((av / shards.MERGED).read_text())
    v_av = status.collect(finished, LEASE_S)["videos"][0]
    assert (v_av["state"], v_av["output"], v_av["shards_done"], v_av["frames_done"]) == \
        ("merged", str(finished / "av.mp4"), 4, 48)
    assert v_av["work_s"] == merged["result"]["seconds"]

    out = copy_run(finished, tmp_path / "out")
    with open(out / "av.mp4", "ab") as f:  # the output changed since the merge: not that merge's any more
        f.write(b"\0")
    v_av = status.collect(out, LEASE_S)["videos"][0]
    assert (v_av["state"], v_av["shards_done"], v_av["frames_done"]) == ("pending", 0, 0)


def test_half_done_run_with_a_failure(kept, tmp_path):
    out = copy_run(kept, tmp_path / "out")
    (out / "av.mp4").unlink()
    (out / "run_report.json").unlink()  # the run "died" before its report
    av, sub = wdir_of(out, "av"), wdir_of(out, "sub")
    for wdir in (av, sub):  # back to before the merge
        (wdir / shards.MERGED).unlink()
        ck = json.loads((wdir / shards.CHECKPOINT).read_text())
        atomic_write_json(wdir / shards.CHECKPOINT, ck | {"output": None})
    # av: shards 0 and 1 done, shard 2 failed (recorded as the runner records it), shard 3 not started.
    for key in ("segment_0002", "segment_0003"):
        shards.sidecar_path(av, key).unlink()
    shards.write_failure(av, Unit(video=0, seg_idx=2, start=24, end=36, read_start=24, read_end=36),
                         reason="CUDA out of memory", rank=1, host="gpu-node-7")
    # sub: shard 0 done, shard 1 in the middle of being written, shard 2 not started.
    shards.sidecar_path(sub, "segment_0001").unlink()
    shard1 = shards.unit_dir(sub, "segment_0001") / "segment_0001.mp4"
    shard1.rename(shard1.with_name("segment_0001.mp4.0123456789ab-r1.partial"))
    shards.sidecar_path(sub, "segment_0002").unlink()
    # Fixed times: sub's shard took 6 s; av's two shards took 2 s each, an hour apart (a requeue).
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for wdir, key, seconds, end in ((av, "segment_0000", 2.0, t0 + timedelta(seconds=2)),
                                    (av, "segment_0001", 2.0, t0 + timedelta(hours=1, seconds=2)),
                                    (sub, "segment_0000", 6.0, t0 + timedelta(seconds=6))):
        side = json.loads(shards.sidecar_path(wdir, key).read_text())
        atomic_write_json(shards.sidecar_path(wdir, key),
                          side | {"seconds": seconds, "finished_at": end.strftime(shards.TIME_FORMAT)})

    st = status.collect(out, LEASE_S)
    v_av, v_sub = st["videos"]
    assert (v_av["state"], v_av["shards_done"], v_av["shards_total"],
            v_av["frames_done"]) == ("failed", 2, 4, 24)
    assert v_av["failures"] == [{"segment": "segment_0002", "seg_idx": 2, "start": 24, "end": 36,
                                 "reason": "CUDA out of memory", "rank": 1, "host": "gpu-node-7"}]
    assert v_av["fps"] == 6.0  # 24 frames over 4 busy seconds: the hour in the queue does not count
    assert v_av["eta_s"] is None  # a failed video gets no ETA
    assert (v_sub["state"], v_sub["shards_done"], v_sub["shards_partial"],
            v_sub["frames_done"]) == ("partial", 1, 1, 12)
    assert v_sub["fps"] == 2.0 and v_sub["eta_s"] == 12.0  # 24 frames left at 2 frames/s
    assert st["total"] == {"videos": 2, "merged": 0, "failed": 1, "shards_done": 3, "shards_total": 7,
                           "frames_done": 36, "frames_total": 84, "fps": 4.5,
                           "eta_s": 5.3}  # 36 frames / 8 busy s; 24 left in sub

    table = cli("--output", out)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.split("\n\n")[0].splitlines()}
    assert rows["av"] == ["av", "2/4", "24/48", "6.0", "-", "failed", "1"]
    assert rows["sub"] == ["sub", "1/3", "12/36", "2.0", "12", "s", "partial", "0"]
    assert rows["all"] == ["all", "2", "3/7", "36/84", "4.5", "5", "s", "0/2", "merged", "1"]
    assert "  av segment_0002 frames [24, 36) on rank 1 (gpu-node-7): CUDA out of memory" in table.stdout


def test_a_bundled_runs_clips_are_merged(bundled, tmp_path):
    """Short clips are made several to a unit (a bundle): each clip of a bundle's sidecar is a row,
    merged, one unit, its frames; the segmented video beside them is merged from its work folder."""
    st = status.collect(bundled, LEASE_S)
    assert [(v["stem"], v["state"], v["shards_done"], v["shards_total"], v["frames_done"], v["frames_total"])
            for v in st["videos"]] == [("long", "merged", 2, 2, 24, 24), ("s1", "merged", 1, 1, 5, 5),
                                       ("s2", "merged", 1, 1, 6, 6), ("s3", "merged", 1, 1, 4, 4)]
    assert [v["output"] for v in st["videos"]] == [str(bundled / f"{n}.mp4")
                                                   for n in ("long", "s1", "s2", "sub/s3")]
    assert all(v["bundle"].startswith("bundle-") for v in st["videos"][1:])
    assert "bundle" not in st["videos"][0]
    assert st["total"] | {"fps": None} == {"videos": 4, "merged": 4, "failed": 0, "shards_done": 5,
                                           "shards_total": 5, "frames_done": 39, "frames_total": 39,
                                           "fps": None, "eta_s": 0.0}
    assert st["total"]["fps"] > 0 and st["in_hand"] == []

    # A clip that failed in its bundle, and a bundle in another launch's hands (no sidecar yet).
    out = copy_run(bundled, tmp_path / "out")
    side_path = next(p for p in shards.bundle_sidecars(out)
                     if any(c["rel"] == "s2" for c in json.loads(p.read_text())["clips"]))
    side = json.loads(side_path.read_text())
    side["clips"] = [c | {"status": "failed", "reason": "decode error at frame 3"} if c["rel"] == "s2" else c
                     for c in side["clips"]]
    atomic_write_json(side_path, side)
    key = "bundle-00112233aabbccdd"
    lease = shards.lease_path(shards.bundle_dir(out, key), key)
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps({"run": "0123456789ab", "rank": 3, "host": "node-9", "pid": 1, "token": "t",
                                 "since": "2026-12-05T10:00:00+0000", "what": f"s7 {key}"}))
    st = status.collect(out, LEASE_S)
    s2 = st["videos"][2]
    assert (s2["stem"], s2["state"], s2["shards_done"], s2["frames_done"], s2["frames_total"],
            s2["reason"]) == ("s2", "failed", 0, 0, 6, "decode error at frame 3")
    # its launch has no run file: the lease is a dead launch's
    assert [(h["bundle"], h["what"], h["run"], h["rank"], h["host"], h["stale"]) for h in st["in_hand"]] == \
        [(key, f"s7 {key}", "0123456789ab", 3, "node-9", True)]
    table = status.format_table(st)
    assert table.splitlines()[3].split() == ["s2", "0/1", "0/6", "-", "-", "failed", "1"]
    assert (f"in hand:\n  s7 {key}: run 0123456789ab rank 3 on node-9 since 2026-12-05T10:00:00+0000 "
            "(not renewed: its holder died; the next launch takes it over)") in table
    assert table.endswith("failures:\n  s2: decode error at frame 3")


def test_a_million_clips_cost_a_read_per_bundle(tmp_path, capsys, monkeypatch):
    """The default view reads each bundle sidecar once and looks at no clip's output (they are
    missing here, and still shown merged); --verify looks at every one."""
    out = tmp_path / "out"
    for b in range(40):
        key = f"bundle-{b:02x}{'0' * 14}"
        clips = [{"rel": f"d{b}/c{i}", "input": f"/in/d{b}/c{i}.mp4", "status": "ok",
                  "output": str(out / f"d{b}/c{i}.mp4"), "size": 1000, "frames": 10, "seconds": 0.5,
                  "merge_seconds": 0.01} for i in range(25)]
        shards.bundle_dir(out, key).mkdir(parents=True, exist_ok=True)
        atomic_write_json(shards.sidecar_path(shards.bundle_dir(out, key), key), {
            "version": 1, "bundle": key, "signature": "s", "clips": clips, "run": "r", "rank": 0, "host": "h",
            "seconds": 12.5, "finished_at": "2026-01-01T00:00:00+0000"})
    opened = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    st = status.collect(out, LEASE_S)
    monkeypatch.undo()
    assert (st["total"]["videos"], st["total"]["merged"], st["total"]["frames_done"]) == (1000, 1000, 10000)
    assert sorted(opened) == sorted(str(p) for p in shards.bundle_sidecars(out))
    rc, text = run_main(capsys, "--output", out, "--verify")
    assert rc == 1
    lines = text.splitlines()
    assert len(lines) == 1001 and lines[-1] == "1000 problem(s) in 1000 file(s) verified"
    assert lines[0].startswith(f"{out / 'd0/c0.mp4'}: missing (bundle-")


def test_verify_finds_a_changed_shard(kept, tmp_path, capsys):
    """--verify: every shard still on disk against its sidecar's checksum, every merged output
    against its recorded size; one line per problem and exit status 1, else how many it checked."""
    rc, text = run_main(capsys, f"output={kept}", "--verify")
    assert rc == 0, text
    assert text.splitlines() == ["9 file(s) verified: every shard matches its checksum and every merged "
                                 "output has its recorded size"]  # 7 shards, 2 outputs
    out = copy_run(kept, tmp_path / "out")
    shard = shards.unit_dir(wdir_of(out, "av"), "segment_0002") / "segment_0002.mp4"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum tells
    shard.write_bytes(bytes(data))
    with open(out / "sub.mp4", "ab") as f:
        f.write(b"\0")
    rc, text = run_main(capsys, f"output={out}", "--verify")
    assert rc == 1
    size = (out / "sub.mp4").stat().st_size
    assert text.splitlines() == [
        f"{shard}: checksum differs from its sidecar's (the file was changed)",
        f"{out / 'sub.mp4'}: {size} bytes, merged.json of {wdir_of(out, 'sub').name} says {size - 1}",
        "2 problem(s) in 9 file(s) verified"]
    rc, text = run_main(capsys, f"output={out}", "--verify", "--json")
    assert rc == 1 and len(json.loads(text)["problems"]) == 2


def test_verify_passes_a_bundled_run(bundled, capsys):
    rc, text = run_main(capsys, f"output={bundled}", "--verify")
    assert rc == 0 and text.startswith("4 file(s) verified")  # long's output and 3 clips (no shards kept)


def test_a_folder_without_a_run_is_a_clear_error(tmp_path):
    res = cli(f"output={tmp_path}")
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {tmp_path}: no .vsr_ddp folder (not a vsr_ddp output folder, "
                                  f"or nothing ran yet)")


def test_busy_seconds_is_the_union_of_the_intervals():
    assert status.busy_seconds([]) == 0
    assert status.busy_seconds([(0, 2), (1, 3), (10, 11), (10.5, 10.7)]) == 4


def test_inputs_only_in_the_run_report(finished, tmp_path):
    """A video that failed to probe, or that the job skipped, has no work folder: the report tells."""
    out = copy_run(finished, tmp_path / "out")
    report = read_report(out)
    report["videos"] += [{"input": "/in/broken.mp4", "status": "failed", "reason": "empty file (0 bytes)",
                          "output": None, "frames": None, "seconds": None},
                         {"input": "/in/still.mp4", "status": "skipped", "reason": "a single frame",
                          "output": None, "frames": 1, "seconds": None}]
    atomic_write_json(out / "run_report.json", report)  # indented: not the run's one-entry-a-line layout
    st = status.collect(out, LEASE_S)
    assert [(v["stem"], v["state"]) for v in st["videos"]] == [("broken", "failed"), ("still", "skipped"),
                                                               ("av", "merged"), ("sub", "merged")]
    assert (st["total"]["failed"], st["total"]["eta_s"]) == (1, 0.0)
    table = status.format_table(st)
    assert table.splitlines()[1].split() == ["broken", "0/0", "0/0", "-", "-", "failed", "1"]
    assert table.splitlines()[2].split() == ["still", "0/0", "0/0", "-", "-", "skipped", "0"]
    assert table.endswith("failures:\n  broken: empty file (0 bytes)")


def test_inputs_only_in_the_report_parts(finished, tmp_path):
    """While a launch runs (or after it died) its ranks' report parts are the report: read too,
    a line cut short by a kill skipped; the run's own run_report.json is read a line at a time."""
    out = copy_run(finished, tmp_path / "out")
    assert ' "videos": [' in (out / "run_report.json").read_text().splitlines()  # one entry a line below
    assert [e["status"] for e in status.report_entries(out / "run_report.json")] == ["ok", "ok"]
    part = shards.report_part(out, "0123456789ab", 1)
    part.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"input": "/in/broken.mp4", "status": "failed", "reason": "moov atom not found", "output": None,
              "frames": None, "seconds": None},
             {"input": str(Path(read_report(out)["videos"][0]["input"])), "status": "failed",
              "reason": "an older failure", "output": None, "frames": None, "seconds": None}]
    part.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"input": "/in/cut.mp4", "sta')
    st = status.collect(out, LEASE_S)
    # av is merged: a failure line about it (an earlier attempt) does not undo that
    assert [(v["stem"], v["state"], v.get("reason")) for v in st["videos"]] == [
        ("broken", "failed", "moov atom not found"), ("av", "merged", None), ("sub", "merged", None)]
    assert st["report_parts"] == [str(part)]


def test_the_lease_timeout_default_is_the_shipped_configs(capsys):
    """--lease-timeout defaults to conf/config.yaml's work.lease_timeout_s: one home for it."""
    with pytest.raises(SystemExit):
        status.main(["--help"])
    assert f"conf/config.yaml's, {LEASE_S:g})" in " ".join(capsys.readouterr().out.split())
