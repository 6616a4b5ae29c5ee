"""The on-disk layout of a run and its bookkeeping: work folders, shard / sidecar / failure-record
names, checkpoint.json, report names, and the rule for "this shard is done". The run
(runner.py) and ``python -m vsr_ddp.status`` both read the layout from here (no torch imported).

A shard counts as done exactly when its sidecar exists and matches it (owned range, job
signature, file size and checksum). Shards and sidecars are written atomically (atomic.py), so a
kill at any moment leaves either a complete pair or leftovers that :func:`discard_partial` removes.

Beside them, the coordination files of claims.py: ``<key>.lease`` while a rank makes the shard,
``merge.lease`` while one merges the video, and ``merged.json`` once the final video is written
(which shards went into which output file), so a video is merged exactly once.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from .atomic import atomic_write_json, partials, read_json
from .plan import Unit, VideoInfo

SIDECAR_VERSION = 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # sidecars' finished_at, failure records' failed_at
WORK_DIR = ".vsr_ddp"  # <output>/.vsr_ddp/: everything a run keeps besides the final videos and reports
CHECKPOINT = "checkpoint.json"  # rank 0's manifest of one video, in its work folder
MERGED = "merged.json"  # the merge's record, in the work folder: output, its size, the shards it joined
MERGE_LEASE = "merge.lease"  # held by the rank merging the video (claims.py)
REPORTS = "run_report*.json"  # every report name below, as a glob


def report_name(shard_index: int = 0, num_shards: int = 1) -> str:
    """``run_report.json``, or ``run_report.<i>-of-<n>.json`` for one share of a job array, so
    that the tasks of an array can share one output folder without clobbering the report."""
    return "run_report.json" if num_shards == 1 else f"run_report.{shard_index}-of-{num_shards}.json"


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def work_dir(output: Path, info: VideoInfo, tag: str) -> Path:
    """``<output>/.vsr_ddp/<stem>_<tag>/``; the tag says what the job made (``4x``)."""
    return Path(output) / WORK_DIR / f"{info.stem}_{tag}"


def shard_path(wdir: Path, unit: Unit) -> Path:
    return wdir / f"{unit.key}.mp4"


def sidecar_path(wdir: Path, unit: Unit | str) -> Path:
    """``<key>.json``; ``unit`` is a Unit or its key (``segment_0003``)."""
    return wdir / f"{getattr(unit, 'key', unit)}.json"


def failure_path(wdir: Path, unit: Unit | str) -> Path:
    return wdir / f"{getattr(unit, 'key', unit)}.failed.json"


def lease_path(wdir: Path, unit: Unit | str) -> Path:
    """``<key>.lease``: held by the rank making the shard (claims.py)."""
    return wdir / f"{getattr(unit, 'key', unit)}.lease"


def merge_failure_path(wdir: Path) -> Path:
    return wdir / "merge.failed.json"


def read_sidecar(wdir: Path, unit: Unit | str) -> dict | None:
    return read_json(sidecar_path(wdir, unit))


def sidecar_matches(wdir: Path, side: dict | None, start: int, end: int, signature: str | None,
                    verify_checksum: bool = True, frames: int | None = None) -> bool:
    """The "shard done" rule: the sidecar names this owned range and signature (None: any, for
    manifests older than per-segment signatures), it wrote ``frames`` frames (default: the owned
    range's), and its shard file has the recorded size (and checksum, unless ``verify_checksum``
    is off: status's quick look)."""
    if not side or side.get("version") != SIDECAR_VERSION:
        return False
    if signature is not None and side.get("signature") != signature:
        return False  # made by other job settings: the run redoes it
    written = end - start if frames is None else frames
    if (side.get("start"), side.get("end"), side.get("frames_written")) != (start, end, written):
        return False
    if not isinstance(side.get("shard"), str) or not side["shard"]:
        return False
    shard = wdir / side["shard"]
    try:
        if shard.stat().st_size != side.get("size"):
            return False
    except OSError:
        return False
    return not verify_checksum or sha256(shard) == side.get("sha256")


def shard_done(wdir: Path, unit: Unit, signature: str, verify_checksum: bool = True) -> bool:
    """True when the unit's shard and sidecar are complete, consistent and made by this job."""
    return sidecar_matches(wdir, read_sidecar(wdir, unit), unit.start, unit.end, signature, verify_checksum,
                           frames=unit.out_frames)


def discard_partial(wdir: Path, unit: Unit) -> None:
    """Remove whatever earlier attempts at this unit left behind (partial or failed), every
    writer's. Only for the holder of the unit's lease: nobody else is writing it."""
    for p in (shard_path(wdir, unit), sidecar_path(wdir, unit), failure_path(wdir, unit)):
        for q in (p, *partials(p)):
            q.unlink(missing_ok=True)


def write_merged(wdir: Path, output: Path, sides: list[dict], result: dict, **who) -> None:
    """Record a finished merge: the output file, its size, and the shards (by checksum) it joined."""
    atomic_write_json(wdir / MERGED, {
        "version": SIDECAR_VERSION, "output": str(output), "size": output.stat().st_size,
        "shards": {s["shard"]: s["sha256"] for s in sides}, "result": result,
        "merged_at": time.strftime(TIME_FORMAT), **who})


def merged_result(wdir: Path, output: Path, sides: list[dict | None]) -> dict | None:
    """The recorded merge result when ``output`` is the merge of exactly these shards, else None."""
    rec = read_json(wdir / MERGED)
    if not rec or rec.get("output") != str(output) or any(s is None for s in sides):
        return None
    if rec.get("shards") != {s["shard"]: s["sha256"] for s in sides}:
        return None
    try:
        if output.stat().st_size != rec.get("size"):
            return None
    except OSError:
        return None
    return rec.get("result") or {}


def write_failure(wdir: Path, unit: Unit, *, reason: str, rank: int, host: str,
                  run: str | None = None) -> None:
    """Record why a unit failed, next to where its shard would be (read by vsr_ddp.status). While
    ``run`` lives, launches sharing the folder take the unit as failed; a later run retries it."""
    atomic_write_json(failure_path(wdir, unit), {
        "version": SIDECAR_VERSION, "seg_idx": unit.seg_idx, "start": unit.start, "end": unit.end,
        "reason": reason, "rank": rank, "host": host, "run": run, "failed_at": time.strftime(TIME_FORMAT)})


def write_sidecar(wdir: Path, unit: Unit, *, signature: str, encode: dict, rank: int, host: str,
                  seconds: float, run: str | None = None, extra: dict | None = None) -> dict:
    """Record a finished shard. Call after the shard itself has been committed."""
    shard = shard_path(wdir, unit)
    side = {
        "version": SIDECAR_VERSION,
        "seg_idx": unit.seg_idx,
        "start": unit.start,
        "end": unit.end,
        "read_start": unit.read_start,
        "read_end": unit.read_end,
        "frames_written": unit.out_frames,
        "out_start": unit.out_range[0],  # where its frames go in the output (= start, but for retiming jobs)
        "shard": shard.name,
        "size": shard.stat().st_size,
        "sha256": sha256(shard),
        "encode": encode,
        "signature": signature,
        "run": run,  # which launch made it (several may share the folder), and which of its ranks
        "rank": rank,
        "host": host,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime(TIME_FORMAT),
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
    must carry, status. Nothing in the run reads it back (status does); one left damaged gets its
    warning here, as it is replaced."""
    if (wdir / CHECKPOINT).exists():
        read_json(wdir / CHECKPOINT)
    atomic_write_json(wdir / CHECKPOINT, {
        "version": SIDECAR_VERSION,
        "input": info.path,
        "video": info.to_json(),
        "output": output,
        "segments": {
            u.key: {"start": u.start, "end": u.end, "read_start": u.read_start, "read_end": u.read_end,
                    "frames": u.out_frames,
                    "shard": shard_path(wdir, u).name, "signature": signatures[u.key],
                    "status": status.get(u.key, "pending")}
            for u in units
        },
    })
