"""job=interpolate with an EDEN checkpoint (job.model=/models/eden.pt, told from its keys): the
engine through the command line on a real clip, with a tiny random model of the published layout:
exact timing, source frames kept, in-between frames seeded by their place (a rerun and two ranks
give the same frames), factors EDEN cannot make refused before any work."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from builders import frame_times, make_clip, read_frames
from conftest import read_report, run_job

from vsr_ddp.models.eden import random_eden, save_eden


@pytest.fixture(scope="module")
def eden_file(tmp_path_factory):
    return save_eden(random_eden(seed=3), tmp_path_factory.mktemp("eden") / "eden.pt")


def interpolate(src, out, model, *extra, nproc=1, check=True):
    return run_job(["job=interpolate", f"input={src}", f"output={out}", f"job.model={model}",
                    "log.progress=false", "encode.crf=0", "encode.preset=ultrafast", *extra],
                   nproc=nproc, check=check)


def test_midpoints_through_the_command_line(tmp_path, eden_file, one_thread):
    """x2 and x4 of a 6-frame clip: n / fps_out exactly, the source frames where they fall, the
    in-between frames made by the model (not copies of a neighbour), the same frames again on a
    rerun into another folder."""
    src = make_clip(tmp_path / "c.mp4", frames=6, size=(40, 30), fps="24", audio=True)
    source = read_frames(src).astype(np.int16)
    for factor in (2, 4):
        out = tmp_path / f"x{factor}"
        interpolate(src, out, eden_file, f"job.factor={factor}", "job.scene_threshold=0")
        entry = read_report(out)["videos"][0]
        assert entry["status"] == "ok" and entry["frames"] == 6 * factor
        times, _ = frame_times(out / "c.mp4")
        assert times == [Fraction(n, 24 * factor) for n in range(6 * factor)]
        got = read_frames(out / "c.mp4").astype(np.int16)
        assert got.shape == (6 * factor, 30, 40, 3)
        for i in range(6):  # lossless encode: the source frames come through within yuv420p rounding
            assert np.abs(got[i * factor] - source[i]).mean() < 2.5
        between = [n for n in range(6 * factor - factor) if n % factor]
        nearest = [min(np.abs(got[n] - source[n // factor + k]).mean() for k in (0, 1)) for n in between]
        assert min(nearest) > 1, "an in-between frame is a copy of a source frame"
        again = tmp_path / f"again{factor}"
        interpolate(src, again, eden_file, f"job.factor={factor}", "job.scene_threshold=0")
        assert np.array_equal(read_frames(again / "c.mp4"), read_frames(out / "c.mp4"))


def test_the_seed_changes_the_in_between_frames_only(tmp_path, eden_file, one_thread):
    src = make_clip(tmp_path / "c.mp4", frames=4, size=(40, 30), fps="24", audio=False)
    a, b = tmp_path / "a", tmp_path / "b"
    interpolate(src, a, eden_file, "job.factor=2", "job.scene_threshold=0")
    interpolate(src, b, eden_file, "job.factor=2", "job.scene_threshold=0", "job.seed=7")
    fa, fb = read_frames(a / "c.mp4"), read_frames(b / "c.mp4")
    assert np.array_equal(fa[0::2], fb[0::2])
    assert not np.array_equal(fa[1::2][:-1], fb[1::2][:-1])


def test_a_factor_eden_cannot_make_stops_before_any_work(tmp_path, eden_file):
    src = make_clip(tmp_path / "c.mp4", frames=4, size=(40, 30), fps="24", audio=False)
    proc = interpolate(src, tmp_path / "o", eden_file, "job.factor=3", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "job.factor=3" in line[0] and "flow" in line[0] and "blend" in line[0], line
    assert not (tmp_path / "o" / "c.mp4").exists()


@pytest.mark.slow
def test_two_ranks_and_segments_make_the_frames_of_one_rank(tmp_path, eden_file):
    """Segments of 3 source frames on 2 ranks against one rank in one segment: every in-between
    frame's noise comes from its place in the video, so the frames are identical."""
    src = make_clip(tmp_path / "c.mp4", frames=9, size=(40, 30), fps="24", audio=False)
    one, two = tmp_path / "one", tmp_path / "two"
    interpolate(src, one, eden_file, "job.factor=2", "job.scene_threshold=0")
    interpolate(src, two, eden_file, "job.factor=2", "job.scene_threshold=0", "work.segment_frames=3",
                nproc=2)
    assert np.array_equal(read_frames(one / "c.mp4"), read_frames(two / "c.mp4"))
