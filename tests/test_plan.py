"""Planning, manifest and bookkeeping units (no video decoding, no torch)."""
from fractions import Fraction
from pathlib import Path

import pytest

from vsr_ddp import atomic, shards
from vsr_ddp.logs import human_duration
from vsr_ddp.plan import InputError, Plan, Unit, VideoInfo, check_input, list_inputs, plan_units


def _info(frames, name="v.mp4"):
    return VideoInfo(path=name, frames=frames, fps=Fraction(30000, 1001), width=64, height=48, codec="h264")


def test_segments_own_each_frame_once_and_read_context():
    units = plan_units([_info(25), _info(7, "w.mp4")], "segment", segment_frames=10, overlap=2)
    v0 = [u for u in units if u.video == 0]
    assert [(u.start, u.end) for u in v0] == [(0, 10), (10, 20), (20, 25)]
    assert [(u.read_start, u.read_end) for u in v0] == [(0, 12), (8, 22), (18, 25)]
    assert [u.key for u in v0] == ["segment_0000", "segment_0001", "segment_0002"]
    v1 = [u for u in units if u.video == 1]
    assert [(u.start, u.end, u.read_start, u.read_end) for u in v1] == [(0, 7, 0, 7)]
    for vi, n in ((0, 25), (1, 7)):
        shards.check_coverage([u for u in units if u.video == vi], n)


def test_whole_video_units_are_rank_strided():
    units = plan_units([_info(5, f"{i}.mp4") for i in range(5)], "video", segment_frames=2, overlap=3)
    assert all((u.start, u.end) == (0, 5) and (u.read_start, u.read_end) == (0, 5) for u in units)
    plan = Plan(videos=[], failed={}, units=units)
    assert [u.video for u in plan.units_for_rank(0, 2)] == [0, 2, 4]
    assert [u.video for u in plan.units_for_rank(1, 2)] == [1, 3]
    every = sorted(u.video for r in range(3) for u in plan.units_for_rank(r, 3))
    assert every == [0, 1, 2, 3, 4]


def test_bad_work_settings_are_rejected():
    with pytest.raises(ValueError, match="work.unit"):
        plan_units([_info(5)], "frames", 10, 0)
    with pytest.raises(ValueError, match="segment_frames"):
        plan_units([_info(5)], "segment", 0, 0)


def test_coverage_names_gaps_and_overlaps():
    u = lambda s, e, i=0: Unit(0, i, s, e, s, e)  # noqa: E731
    with pytest.raises(ValueError, match=r"frames \[10, 12\) are covered by no shard"):
        shards.check_coverage([u(0, 10), u(12, 20, 1)], 20)
    with pytest.raises(ValueError, match=r"frames \[8, 10\) are covered by more than one shard"):
        shards.check_coverage([u(0, 10), u(8, 20, 1)], 20)
    with pytest.raises(ValueError, match=r"frames \[20, 25\) are covered by no shard"):
        shards.check_coverage([u(0, 10), u(10, 20, 1)], 25)


def test_sidecar_marks_a_shard_done_only_when_it_matches(tmp_path):
    unit = Unit(0, 3, 30, 40, 28, 42)
    shard = shards.shard_path(tmp_path, unit)
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"\x00" * 1000)
    assert not shards.shard_done(tmp_path, unit, "sig")  # no sidecar yet
    side = shards.write_sidecar(tmp_path, unit, signature="sig", encode={"crf": 18}, rank=1, host="h",
                                seconds=1.5)
    assert side["start"] == 30 and side["end"] == 40 and side["frames_written"] == 10
    assert side["shard"] == "segment_0003.mp4" and side["size"] == 1000
    assert shards.shard_done(tmp_path, unit, "sig")
    assert not shards.shard_done(tmp_path, unit, "other-settings")
    assert not shards.shard_done(tmp_path, Unit(0, 3, 30, 41, 28, 42), "sig")  # another plan
    shard.write_bytes(b"\x01" * 1000)  # same size, other bytes: resume trusts the size, the checksum tells
    assert shards.shard_done(tmp_path, unit, "sig")
    assert not shards.shard_done(tmp_path, unit, "sig", verify_checksum=True)
    shards.discard_partial(tmp_path, unit)
    assert not shard.exists() and not shards.sidecar_path(tmp_path, unit).exists()


def test_atomic_json_leaves_no_partial(tmp_path):
    target = tmp_path / "checkpoint.json"
    atomic.atomic_write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{")
    assert not list(tmp_path.glob("*" + atomic.TMP_SUFFIX))


def test_inputs_are_listed_by_extension(tmp_path):
    for name in ("b.mkv", "a.mp4", "notes.txt", "c.WEBM"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.mov").write_bytes(b"xy")
    inputs = list_inputs(tmp_path)
    assert [Path(i.path).name for i in inputs] == ["a.mp4", "b.mkv", "c.WEBM", "d.mov"]
    assert [i.rel for i in inputs] == ["a", "b", "c", "sub/d"]  # the folder tree, mirrored in the output
    assert inputs[3].path == str(tmp_path / "sub" / "d.mov") and inputs[3].size == 2
    assert [i.rel for i in list_inputs(tmp_path, 1, 2)] == ["b", "sub/d"]  # a job-array task's share
    assert [i.rel for i in list_inputs(tmp_path / "b.mkv")] == ["b"]
    with pytest.raises(ValueError, match="no such file"):
        list_inputs(tmp_path / "missing")


def test_check_input_takes_a_tree_and_a_list_file(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    with pytest.raises(InputError, match="no videos .* in this folder"):
        check_input(tmp_path)
    (tmp_path / "deep" / "er" / "v.mkv").write_bytes(b"x")
    assert check_input(tmp_path) == tmp_path
    listed = tmp_path / "list.txt"
    listed.write_text("deep/er/v.mkv\n")
    assert check_input(listed) == listed
    with pytest.raises(InputError, match="no such file or folder"):
        check_input(tmp_path / "other.txt")
    binary = tmp_path / "clip.m4v"  # a video under an unknown extension is no list of paths
    binary.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(InputError, match="binary data"):
        check_input(binary)


@pytest.mark.parametrize("seconds,text", [(5, "5 s"), (59.6, "1 min"), (720, "12 min"), (3780, "1 h 3 min"),
                                          (7200, "2 h"), (7500, "2 h 5 min"), (90000, "1 d 1 h"),
                                          (None, "?")])
def test_human_eta(seconds, text):
    assert human_duration(seconds) == text


def test_the_strided_rule_splits_anything_into_disjoint_shares_that_cover_it():
    """plan.strided is the one rule of every fixed assignment: item i goes to share i % count."""
    from vsr_ddp.plan import shard_inputs, strided

    items = [f"v{i}" for i in range(11)]
    shares = [strided(items, r, 4) for r in range(4)]
    assert shares[1] == ["v1", "v5", "v9"]
    assert sorted(sum(shares, []), key=items.index) == items  # every item once
    assert strided(range(5), 0, 1) == [0, 1, 2, 3, 4] and strided(range(2), 3, 4) == []
    assert strided(iter("abcde"), 1, 2) == ["b", "d"]  # any iterable, read once
    assert shard_inputs(items, 1, 4) == shares[1]  # job-array shares (work.shard_index / num_shards)
    plan = Plan(videos=[], failed={}, units=items)
    assert [plan.units_for_rank(r, 4) for r in range(4)] == shares  # units per rank (work.claim=strided)
