"""Shard bookkeeping: work folders, sidecars, checkpoint.json, atomic writes, resume.

A shard counts as done exactly when its sidecar exists and matches it (owned range, job
signature, file size and checksum). Shards and sidecars are written under a temporary name,
flushed, fsynced and renamed, so a kill at any moment leaves either a complete pair or
leftovers that :func:`discard_partial` removes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .plan import Unit, VideoInfo

SIDECAR_VERSION = 1
TMP_SUFFIX = ".partial"


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


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


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def work_dir(output: Path, info: VideoInfo, tag: str) -> Path:
    """``<output>/.vsr_ddp/<stem>_<tag>/``; the tag says what the job made (``4x``)."""
    return Path(output) / ".vsr_ddp" / f"{info.stem}_{tag}"


def shard_path(wdir: Path, unit: Unit) -> Path:
    return wdir / f"{unit.key}.mp4"


def sidecar_path(wdir: Path, unit: Unit) -> Path:
    return wdir / f"{unit.key}.json"


def read_sidecar(wdir: Path, unit: Unit) -> dict | None:
    try:
        with open(sidecar_path(wdir, unit), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shard_done(wdir: Path, unit: Unit, signature: str, verify_checksum: bool = True) -> bool:
    """True when the unit's shard and sidecar are complete, consistent and made by this job."""
    side = read_sidecar(wdir, unit)
    if not side or side.get("version") != SIDECAR_VERSION or side.get("signature") != signature:
        return False
    if (side.get("start"), side.get("end"), side.get("frames_written")) != (unit.start, unit.end, unit.frames):
        return False
    shard = wdir / side.get("shard", "")
    try:
        if shard.stat().st_size != side.get("size"):
            return False
    except OSError:
        return False
    return not verify_checksum or sha256(shard) == side.get("sha256")


def failure_path(wdir: Path, unit: Unit) -> Path:
    return wdir / f"{unit.key}.failed.json"


def discard_partial(wdir: Path, unit: Unit) -> None:
    """Remove whatever an earlier attempt at this unit left behind (partial or failed)."""
    for p in (shard_path(wdir, unit), sidecar_path(wdir, unit), failure_path(wdir, unit)):
        for q in (p, tmp_path(p)):
            q.unlink(missing_ok=True)


def write_failure(wdir: Path, unit: Unit, *, reason: str, rank: int, host: str) -> None:
    """Record why a unit failed, next to where its shard would be (read by vsr_ddp.status)."""
    atomic_write_json(failure_path(wdir, unit), {
        "version": SIDECAR_VERSION, "seg_idx": unit.seg_idx, "start": unit.start, "end": unit.end,
        "reason": reason, "rank": rank, "host": host, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def write_sidecar(wdir: Path, unit: Unit, *, signature: str, encode: dict, rank: int, host: str,
                  seconds: float, extra: dict | None = None) -> dict:
    """Record a finished shard. Call after the shard itself has been committed."""
    shard = shard_path(wdir, unit)
    side = {
        "version": SIDECAR_VERSION,
        "seg_idx": unit.seg_idx,
        "start": unit.start,
        "end": unit.end,
        "read_start": unit.read_start,
        "read_end": unit.read_end,
        "frames_written": unit.frames,
        "shard": shard.name,
        "size": shard.stat().st_size,
        "sha256": sha256(shard),
        "encode": encode,
        "signature": signature,
        "rank": rank,
        "host": host,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic_write_json(sidecar_path(wdir, unit), side)
    return side


def check_coverage(units: list[Unit], frames: int) -> None:
    """Owned ranges must tile [0, frames) exactly once; raise naming the first gap or overlap."""
    pos = 0
    for u in sorted(units, key=lambda u: (u.start, u.end)):
        if u.start > pos:
            raise ValueError(f"frames [{pos}, {u.start}) are covered by no shard")
        if u.start < pos:
            raise ValueError(f"frames [{u.start}, {min(pos, u.end)}) are covered by more than one shard "
                             f"({u.key} overlaps the shard before it)")
        pos = u.end
    if pos != frames:
        raise ValueError(f"frames [{pos}, {frames}) are covered by no shard")


def write_checkpoint(wdir: Path, info: VideoInfo, units: list[Unit], signatures: dict[str, str], status: dict,
                     output: str | None = None) -> None:
    """Rank 0's manifest of one video: segment key -> absolute range, shard, signature its sidecar
    must carry, status."""
    atomic_write_json(wdir / "checkpoint.json", {
        "version": SIDECAR_VERSION,
        "input": info.path,
        "video": info.to_json(),
        "output": output,
        "segments": {
            u.key: {"start": u.start, "end": u.end, "read_start": u.read_start, "read_end": u.read_end,
                    "shard": shard_path(wdir, u).name, "signature": signatures[u.key],
                    "status": status.get(u.key, "pending")}
            for u in units
        },
    })
