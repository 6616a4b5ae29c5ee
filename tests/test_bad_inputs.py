"""Broken inputs: each gets a clear reason, the other videos finish, the exit status says so."""
from __future__ import annotations

import shutil

import pytest
from builders import (make_audio_only, make_clip, make_corrupt, make_not_a_video, make_truncated,
                      make_zero_byte, probe_streams)
from conftest import read_report, run_job


@pytest.mark.slow
def test_bad_inputs_are_reported_and_the_batch_goes_on(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = make_clip(d / "good.mp4", frames=24, audio=True)
    src = make_clip(tmp_path / "src.mp4", frames=48, audio=True, faststart=True)
    make_zero_byte(d / "empty.mp4")
    make_not_a_video(d / "notes.mp4")
    make_audio_only(d / "song.mp4")
    make_truncated(src, d / "cut.mp4")
    make_corrupt(src, d / "garbled.mp4")
    shutil.copy(good, d / "good.webm")  # same output name as good.mp4, which sorts first
    out = tmp_path / "out"
    proc = run_job(["job=upscale", f"input={d}", f"output={out}", "job.model=lanczos", "job.scale=2",
                    "work.segment_frames=16"], nproc=2, check=False)
    assert proc.returncode == 1  # any input failed (rank 0's 1; torchrun exits 1 when a rank does)
    report = {v["input"].rsplit("/", 1)[1]: v for v in read_report(out)["videos"]}
    assert report["good.mp4"]["status"] == "ok"
    assert probe_streams(out / "good.mp4")["frames"] == 24
    expected = {"empty.mp4": "empty file", "notes.mp4": "not a readable video", "song.mp4": "no video stream",
                "cut.mp4": "truncated or corrupt", "garbled.mp4": "corrupt", "good.webm": "same output name"}
    for name, needle in expected.items():
        entry = report[name]
        assert entry["status"] == "failed", name
        assert needle in entry["reason"], (name, entry["reason"])
        assert "\n" not in entry["reason"]
        # the console names the file and the cause on one line
        lines = proc.stderr.splitlines()
        assert any(name in ln and needle in ln for ln in lines), (name, proc.stderr[-3000:])
    # no final file for a failed input, and nothing half-written anywhere
    assert sorted(p.name for p in out.glob("*.mp4")) == ["good.mp4"]
    assert not list(out.rglob("*.partial"))


def test_missing_input_is_a_configuration_error(tmp_path):
    proc = run_job(["job=upscale", f"input={tmp_path / 'nope'}", f"output={tmp_path / 'out'}",
                    "job.model=lanczos", "job.scale=2"], check=False)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'nope'}: no such file or folder" in proc.stderr


# --- A checkpoint whose pickle would run code: refused, and the code never runs ---

CODE_CHECKPOINTS = {
    # what a user passes, under the file name they would have: (file name, overrides)
    "upscale": ("evil.pth", ["job=upscale", "job.model={file}"]),
    "interpolate-rife": ("flownet.pkl", ["job=interpolate", "job.model={file}"]),
    "interpolate-raft": ("raft_large.pth", ["job=interpolate", "job.model=flow", "job.flow_weights={file}"]),
    "propagate-raft": ("raft_large.pth", ["job=propagate", "job.keys={keys}", "job.flow_weights={file}"]),
}


def test_the_code_checkpoint_is_live(tmp_path):
    """The builder's payload does run when the file is unpickled: a refusal below is the loader's."""
    import torch
    from builders import make_code_checkpoint

    marker = tmp_path / "ran"
    make_code_checkpoint(tmp_path / "evil.pth", marker)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("case", sorted(CODE_CHECKPOINTS))
def test_a_checkpoint_that_runs_code_is_refused(case, clips, tmp_path):
    from builders import make_code_checkpoint

    name, overrides = CODE_CHECKPOINTS[case]
    marker = tmp_path / "payload_ran"
    weights = make_code_checkpoint(tmp_path / "models" / name, marker)
    keys = tmp_path / "keys"
    keys.mkdir()
    out = tmp_path / "out"
    proc = run_job([o.format(file=weights, keys=keys) for o in overrides]
                   + [f"input={clips['av']}", f"output={out}", "log.progress=false"], check=False)
    assert not marker.exists(), "the checkpoint's pickle was run as code"
    assert proc.returncode == 2, proc.stderr[-3000:]  # a configuration error, before any work
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(weights) in errors[0], proc.stderr[-3000:]
    assert "Python objects" in errors[0], errors[0]
    # torch's own message advises weights_only=False (which would run the payload), in terminal colours
    assert "weights_only" not in proc.stderr and "\x1b" not in proc.stderr, errors[0]
    # one line: nothing on stderr but the log's own lines and that error
    assert [ln for ln in proc.stderr.splitlines() if not ln.startswith(("INFO: ", "error: "))] == []
    assert not (out.exists() and list(out.rglob("*.mp4")))  # no video, no shard
