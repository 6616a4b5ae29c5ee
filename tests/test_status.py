"""python -m vsr_ddp.status on a finished run, and on a run that is half done with a failure."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from conftest import ROOT, read_report, run_job

from vsr_ddp import shards, status
from vsr_ddp.config import shipped
from vsr_ddp.atomic import atomic_write_json
from vsr_ddp.plan import Unit

LEASE_S = shipped("config", "work.lease_timeout_s")  # the runs' work.lease_timeout_s, as shipped


@pytest.fixture(scope="module")
def finished(clips, tmp_path_factory):
    """A real run over the two session clips (48 + 36 frames), 12-frame segments: 4 + 3 shards."""
    out = tmp_path_factory.mktemp("status") / "out"
    run_job(["job=upscale", f"input={clips['av'].parent}", f"output={out}", "job.model=lanczos",
             "job.scale=2", "work.segment_frames=12", "encode.preset=ultrafast", "log.progress=false"])
    assert [v["status"] for v in read_report(out)["videos"]] == ["ok", "ok"]
    return out


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vsr_ddp.status", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


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


def test_half_done_run_with_a_failure(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "av.mp4").unlink()
    (out / "run_report.json").unlink()  # the run "died" before its report
    av, sub = out / ".vsr_ddp" / "av_2x", out / ".vsr_ddp" / "sub_2x"
    for wdir in (av, sub):  # back to before the merge
        ck = json.loads((wdir / "checkpoint.json").read_text())
        atomic_write_json(wdir / "checkpoint.json", ck | {"output": None})
    # av: shards 0 and 1 done, shard 2 failed (recorded as the runner records it), shard 3 not started.
    for key in ("segment_0002", "segment_0003"):
        (av / f"{key}.json").unlink()
    shards.write_failure(av, Unit(video=0, seg_idx=2, start=24, end=36, read_start=24, read_end=36),
                         reason="CUDA out of memory", rank=1, host="gpu-node-7")
    # sub: shard 0 done, shard 1 in the middle of being written, shard 2 not started.
    (sub / "segment_0001.json").unlink()
    (sub / "segment_0001.mp4").rename(sub / "segment_0001.mp4.0123456789ab-r1.partial")
    (sub / "segment_0002.json").unlink()
    # Fixed times: sub's shard took 6 s; av's two shards took 2 s each, an hour apart (a requeue).
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for wdir, key, seconds, end in ((av, "segment_0000", 2.0, t0 + timedelta(seconds=2)),
                                    (av, "segment_0001", 2.0, t0 + timedelta(hours=1, seconds=2)),
                                    (sub, "segment_0000", 6.0, t0 + timedelta(seconds=6))):
        side = json.loads((wdir / f"{key}.json").read_text())
        atomic_write_json(wdir / f"{key}.json",
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
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    report = read_report(out)
    report["videos"] += [{"input": "/in/broken.mp4", "status": "failed", "reason": "empty file (0 bytes)",
                          "output": None, "frames": None, "seconds": None},
                         {"input": "/in/still.mp4", "status": "skipped", "reason": "a single frame",
                          "output": None, "frames": 1, "seconds": None}]
    atomic_write_json(out / "run_report.json", report)
    st = status.collect(out, LEASE_S)
    assert [(v["stem"], v["state"]) for v in st["videos"]] == [("broken", "failed"), ("still", "skipped"),
                                                               ("av", "merged"), ("sub", "merged")]
    assert (st["total"]["failed"], st["total"]["eta_s"]) == (1, 0.0)
    table = status.format_table(st)
    assert table.splitlines()[1].split() == ["broken", "0/0", "0/0", "-", "-", "failed", "1"]
    assert table.splitlines()[2].split() == ["still", "0/0", "0/0", "-", "-", "skipped", "0"]
    assert table.endswith("failures:\n  broken: empty file (0 bytes)")


def test_the_lease_timeout_default_is_the_shipped_configs(capsys):
    """--lease-timeout defaults to conf/config.yaml's work.lease_timeout_s: one home for it."""
    with pytest.raises(SystemExit):
        status.main(["--help"])
    assert f"conf/config.yaml's, {LEASE_S:g})" in " ".join(capsys.readouterr().out.split())
