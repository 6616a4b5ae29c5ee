"""What a run reads: the list of input videos, and the probe manifest that remembers them.

``input`` is a video file, a folder tree of videos, or a list file of paths (config key table in
the design notes). Listing is built for a million clips on a parallel file system: one
``os.scandir`` walk of the tree, using each entry's cached type, and exactly one ``stat`` per
video file (its size and mtime are the manifest's key); nothing else per file, memory and time
linear in the number of files. Rank 0 lists once per launch.

The manifest (``Manifest``: JSON lines keyed by path, size and mtime) keeps what the probe learned
about every input, so a relaunch probes only new or changed files. Probing ranks append to their
own part file (:meth:`Manifest.append`), and rank 0 folds the parts in (:meth:`Manifest.compact`).

Pure Python: no torch, no PyAV.
"""
from __future__ import annotations

import json
import logging
import os
import stat as _stat
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

from . import atomic
from .plan import VIDEO_EXTENSIONS, InputError, VideoInfo, shard_inputs

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1  # bump when VideoInfo's meaning changes: older lines are then probed again
_EXTENSIONS = " ".join(VIDEO_EXTENSIONS)
NOT_A_VIDEO = f"not a video file ({_EXTENSIONS})"


@dataclass(frozen=True, slots=True)
class Input:
    """One input file as listed: no file is opened, it was stat'ed once.

    ``rel``: the output's path relative to the output folder, without extension, POSIX
    separators (``sub/clip``: the final video is ``<output>/sub/clip.mp4``). ``missing``: a
    one-line reason when the input cannot be processed at all (a list file names a file that is
    not there, or not a video; two inputs would make the same output); that input then fails
    alone with this reason.

    An Input is path-like (``open(inp)``, ``Path(inp)``, ``str(inp)`` give its path).
    """

    path: str
    rel: str
    size: int
    mtime_ns: int
    missing: str | None = None

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def _order(inp: Input) -> tuple[str, str]:
    return inp.rel, inp.path


def _is_video_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _check_shares(shard_index: int, num_shards: int) -> None:
    shard_inputs([], shard_index, num_shards)  # raises ValueError for bad work.* settings


def list_inputs(input_path: str | os.PathLike, shard_index: int = 0, num_shards: int = 1,
                exclude: Iterable[str | os.PathLike] = ()) -> list[Input]:
    """Every input, sorted by ``rel`` then path (the same order on every launch), then share
    ``shard_index`` of ``num_shards`` of that list (:func:`plan.shard_inputs`).

    ``input_path``: a video file (rel: its stem); a folder, walked whole (videos by extension,
    case-insensitive; hidden entries, the folders in ``exclude`` and symlinked folders left out;
    rel relative to the folder); or any other file, read as a list file of paths (see
    :func:`read_list`). Inputs after the first with the same ``rel`` get a ``missing`` reason
    (:func:`output_collisions`), decided on the whole list before it is shared out, so job-array
    tasks agree. Raises InputError (one line, naming the path) when there is nothing to list.
    """
    _check_shares(shard_index, num_shards)
    given = os.path.expanduser(os.fspath(input_path))
    path = os.path.abspath(given)
    try:
        st = os.stat(path)
    except OSError as e:
        if isinstance(e, (FileNotFoundError, NotADirectoryError)):
            raise InputError(f"{given}: no such file or folder") from None
        raise InputError(f"{given}: cannot read ({e.strerror or e})") from None
    if _stat.S_ISDIR(st.st_mode):
        inputs = list(walk(path, exclude))
        if not inputs:
            raise InputError(f"{given}: no videos ({_EXTENSIONS}) in this folder")
    elif not _stat.S_ISREG(st.st_mode):
        raise InputError(f"{given}: neither a file nor a folder")
    elif _is_video_name(path):
        stem = os.path.splitext(os.path.basename(path))[0]
        inputs = [Input(path, stem, st.st_size, st.st_mtime_ns)]
    else:
        inputs = read_list(path)
    inputs.sort(key=_order)
    collide = output_collisions(inputs)
    if collide:
        inputs = [replace(i, missing=collide[i.path]) if i.path in collide else i for i in inputs]
    return shard_inputs(inputs, shard_index, num_shards)


def walk(folder: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> Iterator[Input]:
    """The videos in ``folder`` and below, in no particular order, as they are found (stop early
    at will: :func:`plan.check_input` takes the first).

    One ``os.scandir`` per folder, each closed before its subfolders are read (one open folder at
    a time). Per entry: the name (hidden ones, starting with '.', skipped, ``.vsr_ddp`` among
    them), the extension, the entry's cached type (no system call where the file system fills
    ``d_type``, as Lustre, ext4 and xfs do) and, for a video name only, one ``stat`` (following a
    symlinked file to its target: its size and mtime). Symlinked folders are not followed; the
    folders of ``exclude`` (the run's output folder, which may sit inside the tree) are skipped.
    A video name that cannot be stat'ed (a broken link) is listed with ``missing`` set; a
    subfolder that cannot be read is skipped with a warning.
    """
    root = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    skip = {os.path.realpath(os.path.expanduser(os.fspath(e))) for e in exclude}
    root_real = os.path.realpath(root) if skip else root
    stack = [""]  # folders still to read, relative to root, POSIX separators
    while stack:
        rel_dir = stack.pop()
        prefix = rel_dir + "/" if rel_dir else ""
        subdirs = []
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError as e:
            if not rel_dir:
                raise InputError(f"{root}: cannot read this folder ({e.strerror or e})") from None
            log.warning("%s: cannot read this folder (%s); its videos are left out",
                        os.path.join(root, rel_dir), e.strerror or e)
            continue
        with it:
            for entry in it:
                name = entry.name
                if name[0] == ".":
                    continue
                stem, ext = os.path.splitext(name)
                if ext.lower() in VIDEO_EXTENSIONS:
                    try:
                        st = entry.stat()  # the one stat of a video file: its size and mtime
                    except OSError as e:
                        yield Input(entry.path, prefix + stem, 0, 0,
                                    missing=f"cannot read ({e.strerror or e}; a broken link?)")
                        continue
                    if _stat.S_ISREG(st.st_mode):
                        yield Input(entry.path, prefix + stem, st.st_size, st.st_mtime_ns)
                        continue
                    if not _stat.S_ISDIR(st.st_mode) or entry.is_symlink():
                        continue  # a pipe, a device, a link to a folder
                elif not entry.is_dir(follow_symlinks=False):
                    continue
                sub = prefix + name
                if skip and os.path.join(root_real, sub) in skip:
                    continue
                subdirs.append(sub)
        stack.extend(reversed(subdirs))


def read_list(list_file: str | os.PathLike) -> list[Input]:
    """The inputs a list file names, in its order.

    UTF-8 text, one path per line (bytes that are not UTF-8 are kept as the file system's own, as
    ``os.fsdecode`` does); blank lines and lines starting with '#' ignored, whitespace around a path
    stripped, '~' expanded, relative paths relative to the list file's folder; a path named
    again (after normalising ``a/../b`` and ``./``; symlinks are not resolved) is kept once.
    ``rel`` is the path relative to the deepest folder common to all listed files, without
    extension. Each listed video is stat'ed once; one that is not there, not a file or not named
    like a video is listed with ``missing`` set, so it fails alone.
    """
    list_file = os.path.abspath(os.fspath(list_file))
    base = os.path.dirname(list_file)
    paths, seen = [], set()
    try:
        with open(list_file, encoding="utf-8-sig", errors="surrogateescape") as f:
            for n, line in enumerate(f, 1):
                s = line.strip()
                if not s or s[0] == "#":
                    continue
                if "\0" in s:
                    raise InputError(f"{list_file}: not a video file ({_EXTENSIONS}) nor a list file of "
                                     f"paths (line {n} holds binary data)")
                p = os.path.normpath(os.path.join(base, os.path.expanduser(s)))
                if p not in seen:
                    seen.add(p)
                    paths.append(p)
    except OSError as e:
        raise InputError(f"{list_file}: cannot read this list file ({e.strerror or e})") from None
    del seen
    if not paths:
        raise InputError(f"{list_file}: no paths in this list file (one per line; '#' starts a comment)")
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    cut = len(common.rstrip("/")) + 1
    inputs = []
    for p in paths:
        rel = os.path.splitext(p[cut:])[0].replace(os.sep, "/")
        if not _is_video_name(p):
            inputs.append(Input(p, rel, 0, 0, missing=NOT_A_VIDEO))
            continue
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            inputs.append(Input(p, rel, 0, 0, missing=f"no such file (listed in {list_file})"))
            continue
        except OSError as e:
            inputs.append(Input(p, rel, 0, 0, missing=f"cannot read ({e.strerror or e})"))
            continue
        if _stat.S_ISREG(st.st_mode):
            inputs.append(Input(p, rel, st.st_size, st.st_mtime_ns))
        else:
            what = "a folder" if _stat.S_ISDIR(st.st_mode) else "not a regular file"
            inputs.append(Input(p, rel, 0, 0, missing=f"{what}, not a video file (listed in {list_file})"))
    return inputs


def first_video(folder: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> Input | None:
    """The first video found in ``folder`` or below (the walk stops there), or None."""
    return next(walk(folder, exclude), None)


def check_list_file(list_file: str | os.PathLike) -> None:
    """InputError unless ``list_file`` can be opened and starts like text (only its first 8 KiB
    are read: a video with an extension other than the known ones is caught here)."""
    try:
        with open(list_file, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise InputError(f"{list_file}: cannot read this list file ({e.strerror or e})") from None
    if b"\0" in head:
        raise InputError(f"{list_file}: not a video file ({_EXTENSIONS}) nor a list file of paths "
                         f"(it holds binary data)")


def output_collisions(inputs: Iterable[Input]) -> dict[str, str]:
    """``{path: reason}`` for every input after the first with an ``rel`` already taken (two
    inputs that would write the same final video, ``a/clip.mp4`` and ``a/clip.mkv``). Inputs
    with ``missing`` set make no output and take no name."""
    first: dict[str, str] = {}
    out = {}
    for inp in inputs:
        if inp.missing is not None:
            continue
        taken = first.setdefault(inp.rel, inp.path)
        if taken != inp.path:
            out[inp.path] = f"same output name {inp.rel}.mp4 as {taken}; rename one of them"
    return out


# -- VideoInfo <-> JSON, exactly --------------------------------------------------------------------

_FRACTIONS = frozenset(f.name for f in fields(VideoInfo) if f.type in ("Fraction", Fraction))
_STREAM_LISTS = ("audio", "subtitles", "covers")


def info_to_json(info: VideoInfo) -> dict:
    """Every field of ``info`` as JSON values (Fractions as ``"num/den"``, tuples as lists,
    ``timestamps`` kept): :func:`info_from_json` gives back an equal VideoInfo."""
    d = {}
    for f in fields(VideoInfo):
        v = getattr(info, f.name)
        if f.name in _FRACTIONS:
            v = f"{v.numerator}/{v.denominator}"
        elif f.name in _STREAM_LISTS:
            v = [dict(s) for s in v]
        elif f.name == "timestamps":
            v = [int(t) for t in v]
        elif f.name == "color":
            v = dict(v)
        d[f.name] = v
    return d


def info_from_json(d: dict) -> VideoInfo:
    """The VideoInfo :func:`info_to_json` wrote (missing fields take their defaults; an unknown
    field raises TypeError)."""
    kw = dict(d)
    for name in _FRACTIONS & kw.keys():
        kw[name] = Fraction(kw[name])
    for name in _STREAM_LISTS:
        if name in kw:
            kw[name] = tuple(dict(s) for s in kw[name])
    if "timestamps" in kw:
        kw["timestamps"] = tuple(kw["timestamps"])
    return VideoInfo(**kw)


# -- the probe manifest -----------------------------------------------------------------------------

def manifest_line(inp: Input, result: VideoInfo | str) -> bytes:
    """One manifest line: path, size, mtime_ns and either ``info`` (a VideoInfo) or ``error``
    (the probe's one-line reason)."""
    d = {"path": inp.path, "size": inp.size, "mtime_ns": inp.mtime_ns, "v": MANIFEST_VERSION}
    if isinstance(result, VideoInfo):
        d["info"] = info_to_json(result)
    else:
        d["error"] = str(result)
    # ASCII JSON: a file name that is not UTF-8 (surrogate escapes) round-trips as \\udcxx
    return json.dumps(d, separators=(",", ":")).encode("ascii") + b"\n"


class Manifest:
    """What the probe said about each input, by path, valid while the file keeps its size and
    mtime. JSON lines, the last line of a path winning; written by :meth:`append` (one part file
    per probing rank: appends from several hosts to one file are not atomic on network file
    systems) and folded together by :meth:`compact` (rank 0). Lines are kept as read (bytes) and
    decoded on :meth:`lookup`, so a million entries cost their file size in memory."""

    def __init__(self) -> None:
        self._lines: dict[str, tuple[int, int, bytes]] = {}

    def __len__(self) -> int:
        return len(self._lines)

    def __contains__(self, path: str) -> bool:
        return path in self._lines

    def paths(self):
        return self._lines.keys()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """The manifest at ``path``; empty when there is none. Damaged lines (the last one cut
        short by a crash mid-append, say) are skipped with one warning: those files are probed
        again."""
        m = cls()
        m._read(Path(path))
        return m

    def _read(self, path: Path) -> None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return
        bad = 0
        with f:
            for raw in f:
                try:
                    d = json.loads(raw)
                    key, size, mtime = d["path"], d["size"], d["mtime_ns"]
                    if not (isinstance(key, str) and type(size) is int and type(mtime) is int
                            and ("info" in d or "error" in d)):
                        raise ValueError("not a manifest entry")
                except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSON errors included
                    bad += raw.strip() != b""
                    continue
                if d.get("v") != MANIFEST_VERSION:
                    continue  # written by another version of the probe: probed again
                self._lines[key] = (size, mtime, raw if raw.endswith(b"\n") else raw + b"\n")
        if bad:
            atomic.warn_damaged(path, f"{bad} damaged line(s)",
                                consequence="those lines are skipped and their files probed again")

    def lookup(self, inp: Input) -> VideoInfo | str | None:
        """The stored VideoInfo of ``inp`` (its ``rel`` the listing's), or the probe's one-line
        error for a file that did not probe, or None when the file is new or changed (another size
        or mtime) since."""
        entry = self._lines.get(inp.path)
        if entry is None or inp.missing is not None or entry[0] != inp.size or entry[1] != inp.mtime_ns:
            return None
        d = json.loads(entry[2])
        if "error" in d:
            return str(d["error"])
        try:
            info = info_from_json(d["info"])
        except (TypeError, ValueError, ZeroDivisionError, KeyError):
            return None  # a VideoInfo of another shape: probe again
        if getattr(info, "rel", inp.rel) != inp.rel:  # a list file's common folder moved: the listing's
            info = replace(info, rel=inp.rel)
        return info

    @staticmethod
    def append(path: str | os.PathLike, entries: Iterable[tuple[Input, VideoInfo | str]]) -> int:
        """Append ``(input, VideoInfo or error)`` lines to ``path`` (created with its folder),
        durably (flush + fsync), and return how many. A line cut short by an earlier crash is
        closed first, so it damages no new line. Call it per probed file or per batch: what was
        appended survives a kill."""
        data = b"".join(manifest_line(inp, res) for inp, res in entries)
        if not data:
            return 0
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return data.count(b"\n")

    @classmethod
    def compact(cls, path: str | os.PathLike, parts: Iterable[str | os.PathLike],
                keep: set[str] | None = None) -> Manifest:
        """Rewrite the manifest at ``path`` from itself plus ``parts`` (in order, later lines
        winning), keeping only the paths in ``keep`` (all when None), atomically (temporary file,
        fsync, rename: a reader sees the old manifest or the new one); then delete the parts.
        Returns the new manifest."""
        path, parts = Path(path), [Path(p) for p in parts]
        m = cls.load(path)
        for part in parts:
            m._read(part)
        if keep is not None:
            m._lines = {k: v for k, v in m._lines.items() if k in keep}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.tmp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.writelines(line for _, _, line in m._lines.values())
            atomic.commit(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for part in parts:
            part.unlink(missing_ok=True)
        return m
