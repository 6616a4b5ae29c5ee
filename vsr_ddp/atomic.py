"""Files that appear whole or not at all: write under a temporary name, flush, fsync, rename.

Shards, sidecars, checkpoint.json, reports, the final videos and fetched models all go through
here, so a kill at any moment leaves either the complete file or a ``*.partial`` leftover that
the next run removes or overwrites, never a half-written file under a name that is read.

Temporary names are unique per writer (``segment_0003.mp4.<writer>.partial``): launches that share
an output folder never write into each other's files, and the last rename wins whole.
:func:`read_json` reads what :func:`atomic_write_json` wrote, a damaged file counting as missing.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

TMP_SUFFIX = ".partial"

log = logging.getLogger(__name__)


def tmp_path(path: Path, writer: str | None = None) -> Path:
    """``<name>.<writer>.partial``; a fresh random writer name when none is given."""
    return path.with_name(f"{path.name}.{writer or uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def partials(path: Path) -> list[Path]:
    """Every writer's temporary file of ``path``."""
    return sorted(path.parent.glob(f"{path.name}.*{TMP_SUFFIX}"))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# What the run reads, by identity (st_dev, st_ino): files no commit may replace, and folders no
# commit may write into (inputs are the files directly in the input folder). config.check_paths
# refuses such an output before any work; this is the last line behind it.
_read_files: set[tuple[int, int]] = set()
_read_folders: set[tuple[int, int]] = set()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def protect(paths=()) -> None:
    """Declare what this run reads (files and folders; replaces the last declaration, so each run
    or sweep point states its own): :func:`commit` then refuses to replace any of those files or
    to put a file directly into any of those folders."""
    _read_files.clear()
    _read_folders.clear()
    for p in map(Path, paths):
        ident = _identity(p)
        if ident is not None:
            (_read_folders if p.is_dir() else _read_files).add(ident)


class WouldReplaceInput(OSError):
    """A write that would replace a file the run reads."""


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file appear under its final name, durably."""
    final = Path(final)
    if _identity(final) in _read_files or _identity(final.parent) in _read_folders:
        tmp.unlink(missing_ok=True)
        raise WouldReplaceInput(f"refusing to write {final}: this run reads it or its folder")
    fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def atomic_write_json(path: Path, obj) -> None:
    tmp = tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    commit(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
    commit(tmp, path)


def read_json(path: Path, warn: bool = True) -> dict | None:
    """A JSON file's object, or None when it is missing or damaged.

    Files under their final names are written whole (:func:`commit`), so a damaged one (garbage,
    empty, cut short) is what a crash on a filesystem without ordering, a full disk or a stray
    copy leaves: it counts as missing, so what it records is made again and the file replaced,
    and it gets one warning (:func:`warn_damaged`). ``warn=False`` for files that are legitimately
    unreadable for an instant: leases and run files, created empty and then written (claims.py)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            st = os.fstat(f.fileno())
    except OSError:
        return None
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        problem = "empty" if not data.strip() else f"not JSON: {str(e)[:80]}"
    else:
        if isinstance(obj, dict):
            return obj
        problem = f"a JSON {type(obj).__name__}, not an object"
    if warn:
        warn_damaged(path, problem, st)
    return None


_warned: set = set()  # (path, inode, mtime, size) of each damaged file already warned about


def warn_damaged(path: Path, problem: str, st: os.stat_result | None = None,
                 consequence: str = "taken as missing: what it records is made again and the file replaced"
                 ) -> None:
    """One warning per damaged file (per version of it: a file replaced by another damaged one
    gets its own), however often the run reads it."""
    try:
        st = st or os.stat(path)
    except OSError:
        return
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    if key in _warned:
        return
    _warned.add(key)
    log.warning("%s is damaged (%s), as a crash or a full disk leaves files; %s", path, problem, consequence)
