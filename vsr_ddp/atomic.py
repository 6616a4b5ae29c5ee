"""Files that appear whole or not at all: write under a temporary name, flush, fsync, rename.

Shards, sidecars, checkpoint.json, reports, the final videos and fetched models all go through
here, so a kill at any moment leaves either the complete file or a ``*.partial`` leftover that
the next run removes or overwrites, never a half-written file under a name that is read.

Temporary names are unique per writer (``segment_0003.mp4.<writer>.partial``): launches that share
an output folder never write into each other's files, and the last rename wins whole.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

TMP_SUFFIX = ".partial"


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


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file appear under its final name, durably."""
    fsync_file(tmp)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def atomic_write_json(path: Path, obj) -> None:
    tmp = tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    commit(tmp, path)
