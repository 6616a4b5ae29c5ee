"""Listing inputs (a folder tree, a list file) and the probe manifest (no torch; one real clip)."""
import dataclasses
import json
import os
import time
from fractions import Fraction
from pathlib import Path

import pytest

from vsr_ddp.inputs import (Input, Manifest, info_from_json, info_to_json, list_inputs, manifest_line,
                            output_collisions)
from vsr_ddp.plan import InputError, VideoInfo, probe


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rels(inputs) -> list[str]:
    return [i.rel for i in inputs]


def test_a_folder_tree_is_listed_with_its_relative_paths(tmp_path):
    tree = tmp_path / "in"
    for name in ("a/clip.mp4", "b/clip.mp4", "b/deeper/x.MKV", "top.webm", "notes.txt", "a/cover.jpg",
                 ".hidden/h.mp4", "a/.partial.mp4", "out/.vsr_ddp/w.mp4", "out/sub/made.mp4"):
        _touch(tree / name)
    (tree / "linked").symlink_to(tree / "b", target_is_directory=True)  # not followed: b listed once
    (tree / "a" / "alias.mov").symlink_to(tree / "top.webm")  # a symlinked file is an input
    inputs = list_inputs(tree, exclude=[tree / "out"])  # the run's output folder, inside the tree
    assert _rels(inputs) == ["a/alias", "a/clip", "b/clip", "b/deeper/x", "top"]
    clip = inputs[1]
    assert clip.path == str(tree / "a" / "clip.mp4") and clip.size == 1 and clip.missing is None
    assert clip.mtime_ns == os.stat(clip.path).st_mtime_ns
    assert inputs[0].path == str(tree / "a" / "alias.mov") and inputs[0].size == 1
    assert Path(clip) == tree / "a" / "clip.mp4" and str(clip) == clip.path  # path-like
    # without the exclusion the output folder's videos are inputs too (hidden work folder aside)
    assert "out/sub/made" in _rels(list_inputs(tree))
    assert [_rels(list_inputs(tree, k, 2, exclude=[tree / "out"])) for k in (0, 1)] == [
        ["a/alias", "b/clip", "top"], ["a/clip", "b/deeper/x"]]


def test_the_same_output_name_fails_the_later_input_only(tmp_path):
    for name in ("a/clip.mp4", "a/clip.mkv", "b/clip.mp4"):
        _touch(tmp_path / name)
    inputs = list_inputs(tmp_path)
    assert [(i.rel, Path(i.path).name) for i in inputs] == [
        ("a/clip", "clip.mkv"), ("a/clip", "clip.mp4"), ("b/clip", "clip.mp4")]
    first = str(tmp_path / "a" / "clip.mkv")
    reason = f"same output name a/clip.mp4 as {first}; rename one of them"
    assert [i.missing for i in inputs] == [None, reason, None]
    clean = [dataclasses.replace(i, missing=None) for i in inputs]
    assert output_collisions(clean) == {str(tmp_path / "a" / "clip.mp4"): reason}
    # decided before the job-array share: the task that gets the later one fails it too
    assert list_inputs(tmp_path, 1, 3)[0].missing == reason


def test_a_list_file_names_its_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    _touch(data / "day1" / "a.mp4")
    _touch(data / "day2" / "b.mov", b"xyz")
    _touch(tmp_path / "home" / "c.mkv")
    (data / "folder.mp4").mkdir()
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "batch.list"
    listing.write_text("\n".join([
        "# clips for the demo",
        "",
        "  ../data/day1/a.mp4  ",  # relative to the list file's folder, whitespace stripped
        str(data / "day2" / "b.mov"),  # absolute
        "../data/day1/../day1/a.mp4",  # the same file again: kept once
        "#../data/day2/b.mov",
        "~/c.mkv",
        "../data/day3/gone.mp4",
        "../data/notes.txt",
        "../data/folder.mp4",
        "   ",
    ]) + "\n", encoding="utf-8")
    inputs = list_inputs(listing)
    by_rel = {i.rel: i for i in inputs}
    # rel: below the deepest folder common to all listed files
    assert _rels(inputs) == sorted(by_rel)
    assert _rels(inputs) == ["data/day1/a", "data/day2/b", "data/day3/gone", "data/folder", "data/notes",
                             "home/c"]
    a = by_rel["data/day1/a"]
    assert a.path == str(data / "day1" / "a.mp4") and a.missing is None
    assert by_rel["data/day2/b"].size == 3 and by_rel["home/c"].path == str(tmp_path / "home" / "c.mkv")
    assert by_rel["data/day3/gone"].missing.startswith("no such file")
    assert by_rel["data/notes"].missing == "not a video file (.mp4 .mkv .mov .avi .webm)"
    assert "a folder" in by_rel["data/folder"].missing
    # one folder in common: rel is the stem, as for a single video
    (lists / "one.txt").write_text(f"{data / 'day2' / 'b.mov'}\n{data / 'day2' / 'b.mov'}\n")
    assert _rels(list_inputs(lists / "one.txt")) == ["b"]


def test_nothing_to_list_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _touch(tmp_path / "empty" / "sub" / "readme.txt")
    with pytest.raises(InputError, match=r"empty: no videos \(.mp4 .mkv .mov .avi .webm\) in this folder"):
        list_inputs(tmp_path / "empty")
    listing = _touch(tmp_path / "none.txt", b"# nothing yet\n\n")
    with pytest.raises(InputError, match=r"none.txt: no paths in this list file"):
        list_inputs(listing)
    with pytest.raises(InputError, match=r"nowhere: no such file or folder"):
        list_inputs(tmp_path / "nowhere")


def _full_info(path="/in/sub/clip.mp4") -> VideoInfo:
    """A VideoInfo with every field away from its default."""
    names = {f.name for f in dataclasses.fields(VideoInfo)}
    extra = {"rel": "sub/clip"} if "rel" in names else {}
    info = VideoInfo(path=path, frames=4, fps=Fraction(30000, 1001), width=1920, height=1080,
                     codec="hevc",
                     audio=({"index": 1, "codec": "aac", "language": "eng"},
                            {"index": 2, "codec": "ac3", "language": None}),
                     subtitles=({"index": 3, "codec": "subrip", "language": "fra"},),
                     covers=({"index": 4, "codec": "mjpeg", "language": None},), stream=5,
                     color={"colorspace": "bt709", "color_trc": "smpte2084"},
                     timestamps=(1001, 2002, 4004, 5005, 7007), time_base=Fraction(1, 30000),
                     start=Fraction(1, 3), rotation=270, sar=Fraction(45, 64), interlaced=True,
                     pix_fmt="yuv420p10le", bit_depth=10, **extra)
    for f in dataclasses.fields(VideoInfo):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert getattr(info, f.name) != default, f"test VideoInfo leaves {f.name} at its default"
    return info


def _round_trip(info: VideoInfo) -> VideoInfo:
    return info_from_json(json.loads(json.dumps(info_to_json(info))))


def test_video_info_round_trips_through_json_exactly():
    info = _full_info()
    back = _round_trip(info)
    assert back == info
    assert type(back.audio) is tuple and type(back.timestamps) is tuple and type(back.fps) is Fraction
    assert back.time_of(2) == info.time_of(2) and back.frame_at(0.1) == info.frame_at(0.1)


def test_a_probed_variable_frame_rate_clip_round_trips(tmp_path):
    from builders import make_vfr

    src, _ = make_vfr(tmp_path / "screen.mp4")
    info = probe(src)
    assert info.vfr and len(info.timestamps) == info.frames + 1
    assert _round_trip(info) == info


def _input(path: Path, rel: str = "sub/clip") -> Input:
    st = os.stat(path)
    return Input(str(path), rel, st.st_size, st.st_mtime_ns)


def test_the_manifest_remembers_unchanged_files_only(tmp_path):
    clip = _touch(tmp_path / "in" / "clip.mp4", b"1234")
    bad = _touch(tmp_path / "in" / "bad.mp4", b"")
    manifest = tmp_path / "out" / ".vsr_ddp" / "manifest.jsonl"
    assert len(Manifest.load(manifest)) == 0  # none yet
    info = _full_info(str(clip))
    written = Manifest.append(manifest, [(_input(clip), info), (_input(bad, "bad"), "empty file (0 bytes)")])
    assert written == 2
    m = Manifest.load(manifest)
    assert m.lookup(_input(clip)) == info
    assert m.lookup(_input(bad, "bad")) == "empty file (0 bytes)"
    assert m.lookup(_input(_touch(tmp_path / "in" / "new.mp4"), "new")) is None  # never probed
    if hasattr(info, "rel"):  # the output name is the listing's, not the one stored with the probe
        assert m.lookup(_input(clip, "moved/clip")) == dataclasses.replace(info, rel="moved/clip")

    st = os.stat(clip)
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: same size, new mtime
    assert m.lookup(_input(clip)) is None
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert m.lookup(_input(clip)) == info
    clip.write_bytes(b"12345")  # rewritten
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert m.lookup(_input(clip)) is None


def test_a_damaged_last_line_is_skipped(tmp_path, caplog):
    clips = [_touch(tmp_path / f"{k}.mp4") for k in range(3)]
    manifest = tmp_path / "manifest.jsonl"
    Manifest.append(manifest, [(_input(clips[0]), _full_info(str(clips[0])))])
    with open(manifest, "ab") as f:  # a crash mid-append
        f.write(manifest_line(_input(clips[1]), _full_info(str(clips[1])))[:70])
    m = Manifest.load(manifest)
    assert len(m) == 1 and m.lookup(_input(clips[0])) is not None and m.lookup(_input(clips[1])) is None
    assert "damaged" in caplog.text
    # the next append closes the cut line first: its own lines are whole
    Manifest.append(manifest, [(_input(clips[2]), "not a readable video")])
    assert Manifest.load(manifest).lookup(_input(clips[2])) == "not a readable video"


def test_compact_folds_the_parts_in_later_lines_winning(tmp_path):
    clips = [_touch(tmp_path / "in" / f"{k}.mp4") for k in range(4)]
    manifest = tmp_path / "manifest.jsonl"
    Manifest.append(manifest, [(_input(c), f"old {k}") for k, c in enumerate(clips[:3])])
    parts = [tmp_path / "manifest.jsonl.rank0", tmp_path / "manifest.jsonl.rank1", tmp_path / "none.rank2"]
    Manifest.append(parts[0], [(_input(clips[1]), "first try")])
    Manifest.append(parts[1], [(_input(clips[1]), _full_info(str(clips[1]))), (_input(clips[3]), "new")])
    keep = {str(c) for c in clips[1:]}  # clips[0] is no longer an input
    m = Manifest.compact(manifest, parts, keep=keep)
    assert not any(p.exists() for p in parts) and not list(tmp_path.glob("*.partial"))
    again = Manifest.load(manifest)
    for got in (m, again):
        assert set(got.paths()) == keep
        assert got.lookup(_input(clips[1])) == _full_info(str(clips[1]))
        assert got.lookup(_input(clips[2])) == "old 2" and got.lookup(_input(clips[3])) == "new"
    assert len(manifest.read_bytes().splitlines()) == 3


def test_listing_a_tree_stats_each_video_once(tmp_path, monkeypatch):
    """The scale rule (a million clips on Lustre): one scandir per folder, one stat per video file
    (DirEntry.stat, whose size and mtime are the manifest key), no other per-file system call."""
    tree = tmp_path / "tree"
    for d in range(200):
        folder = tree / f"d{d:03d}"
        folder.mkdir(parents=True)
        for k in range(100):
            (folder / f"c{k:03d}.mp4").touch()
    calls = {"scandir": 0, "os.stat": 0, "os.lstat": 0, "entry.stat": 0, "entry.is_file": 0,
             "entry.is_dir": 0, "entry.is_symlink": 0}
    real_scandir, real_stat, real_lstat = os.scandir, os.stat, os.lstat

    class Entry:
        __slots__ = ("_e", "name", "path")

        def __init__(self, e):
            self._e, self.name, self.path = e, e.name, e.path

        def stat(self, *, follow_symlinks=True):
            calls["entry.stat"] += 1
            return self._e.stat(follow_symlinks=follow_symlinks)

        def is_file(self, *, follow_symlinks=True):
            calls["entry.is_file"] += 1
            return self._e.is_file(follow_symlinks=follow_symlinks)

        def is_dir(self, *, follow_symlinks=True):
            calls["entry.is_dir"] += 1
            return self._e.is_dir(follow_symlinks=follow_symlinks)

        def is_symlink(self):
            calls["entry.is_symlink"] += 1
            return self._e.is_symlink()

    class Scan:
        def __init__(self, path):
            calls["scandir"] += 1
            self._it = real_scandir(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._it.close()

        def __iter__(self):
            return (Entry(e) for e in self._it)

    def counted(name, real):
        def wrapper(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        return wrapper

    monkeypatch.setattr(os, "scandir", Scan)
    monkeypatch.setattr(os, "stat", counted("os.stat", real_stat))
    monkeypatch.setattr(os, "lstat", counted("os.lstat", real_lstat))
    t0 = time.perf_counter()
    inputs = list_inputs(tree)
    seconds = time.perf_counter() - t0
    monkeypatch.undo()
    assert len(inputs) == 20_000 and inputs[0].rel == "d000/c000" and inputs[-1].rel == "d199/c099"
    assert calls == {"scandir": 201, "os.stat": 1, "os.lstat": 0, "entry.stat": 20_000, "entry.is_file": 0,
                     "entry.is_dir": 200, "entry.is_symlink": 0}, calls
    print(f"listed 20,000 files in 200 folders in {seconds:.3f} s (counting wrappers included)")
