"""The on-disk layout of a run and its bookkeeping: every path a run writes, the sidecars and
records, and the rule for "this unit is done". The run (runner.py, work.py, merge.py) and
``python -m vsr_ddp.status`` read the layout from here (no torch imported); ``.vsr_ddp`` is
spelt here only.

    <output>/<rel>.mp4                              final video (rel: the input's path below the input folder)
    <output>/run_report.json                        the report, written at the end from the parts below
    <output>/.vsr_ddp/manifest.jsonl                probe results keyed by path, size and mtime (inputs.py)
    <output>/.vsr_ddp/runs/<run>.json               one per live launch (claims.py)
    <output>/.vsr_ddp/runs/<run>.plan.jsonl         its probed inputs, for its ranks to read (while it runs;
                                                    and <run>.todo.jsonl: the new files, for them to probe)
    <output>/.vsr_ddp/hosts/<run>/<rank>.json       the shared-folder check (dist.py)
    <output>/.vsr_ddp/report/part-<run>-<rank>.jsonl  report lines, each rank as it goes
    <output>/.vsr_ddp/logs/rank<N>.log
    <output>/.vsr_ddp/work/<aa>/<bb>/<stem>-<h>_<tag>/  a segmented video's work folder
        checkpoint.json  merged.json  merge.lease  merge.failed.json
        <k>/segment_0003.mp4 .json .lease .failed.json  (k = seg_idx // 250: no folder over ~1,000 entries)
    <output>/.vsr_ddp/bundles/<aa>/bundle-<h>.json .lease    whole short videos, several to a unit
        bundle-<h>/                                 its shards while it runs (one a clip, gone once remuxed)

``<aa>/<bb>`` are hex digits of the hash of the video's relative path (or the bundle's clips), so
work folders fan out evenly whatever the inputs are called.

A shard counts as done exactly when its sidecar exists and matches it (owned range, job
signature, file size: the checksum is recorded, and checked by the merge as it reads and by
``python -m vsr_ddp.status --verify``). Shards and sidecars are written atomically (atomic.py),
so a kill at any moment leaves either a complete pair or leftovers that :func:`discard_partial`
removes. A bundle is done when its sidecar lists its clips with this signature and every clip's
output has the size recorded there.
"""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from .atomic import atomic_write_json, partials, read_json
from .plan import Unit, VideoInfo

SIDECAR_VERSION = 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # every time stamp a run writes
WORK_DIR = ".vsr_ddp"  # <output>/.vsr_ddp/: everything a run keeps besides the final videos and reports
CHECKPOINT = "checkpoint.json"  # a segmented video's manifest, in its work folder
MERGED = "merged.json"  # the merge's record, in the work folder: output, its size, the shards it joined
MERGE_LEASE = "merge.lease"  # held by the rank merging the video (claims.py)
REPORTS = "run_report*.json"  # every report name below, as a glob
UNITS_PER_FOLDER = 250  # segment files (4 kinds) per subfolder of a work folder


def root(output: Path) -> Path:
    return Path(output) / WORK_DIR


def runs_dir(output: Path) -> Path:
    return root(output) / "runs"


def run_file(output: Path, run: str) -> Path:
    return runs_dir(output) / f"{run}.json"


def plan_file(output: Path, run: str) -> Path:
    """The probed inputs of one launch, as rank 0 listed them, for its other ranks to read."""
    return runs_dir(output) / f"{run}.plan.jsonl"


def todo_file(output: Path, run: str) -> Path:
    """The inputs new since the manifest, as rank 0 listed them, for every rank to probe a share of."""
    return runs_dir(output) / f"{run}.todo.jsonl"


def hosts_dir(output: Path, run: str) -> Path:
    return root(output) / "hosts" / run


def logs_dir(output: Path) -> Path:
    return root(output) / "logs"


def manifest_path(output: Path) -> Path:
    return root(output) / "manifest.jsonl"


def manifest_part(output: Path, run: str, rank: int) -> Path:
    return root(output) / f"manifest.part-{run}-{rank}.jsonl"


def report_dir(output: Path) -> Path:
    return root(output) / "report"


def report_part(output: Path, run: str, rank: int) -> Path:
    return report_dir(output) / f"part-{run}-{rank}.jsonl"


def report_parts(output: Path, run: str | None = None) -> list[Path]:
    """The report parts of one launch (``run``), or of every launch, in name order."""
    return sorted(report_dir(output).glob(f"part-{run or '*'}-*.jsonl"))


def remove_dead_runs_files(output: Path, live: dict) -> None:
    """What launches that are gone (not in ``live``: run id -> run file) left of their own: report
    parts (a preempted launch writes no report), plan files and probe parts."""
    for folder, pattern in ((report_dir(output), "part-*.jsonl"), (runs_dir(output), "*.jsonl"),
                            (root(output), "manifest.part-*.jsonl")):
        for path in folder.glob(pattern):
            run = re.search(r"[0-9a-f]{12}", path.name)
            if run and run[0] not in live:
                path.unlink(missing_ok=True)


def report_name(shard_index: int = 0, num_shards: int = 1) -> str:
    """``run_report.json``, or ``run_report.<i>-of-<n>.json`` for one share of a job array, so
    that the tasks of an array can share one output folder without clobbering the report."""
    return "run_report.json" if num_shards == 1 else f"run_report.{shard_index}-of-{num_shards}.json"


def rel_of(info: VideoInfo) -> str:
    """The input's path below the input folder, without extension (``sub/clip``)."""
    return info.rel or info.stem


def output_path(output: Path, info: VideoInfo) -> Path:
    """``<output>/<rel>.mp4``: the final video, mirroring the input's place in its folder tree."""
    return Path(output) / f"{rel_of(info)}.mp4"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def work_dir(output: Path, info: VideoInfo, tag: str) -> Path:
    """A segmented video's work folder, ``.vsr_ddp/work/<aa>/<bb>/<stem>-<h>_<tag>/``; the tag
    says what the job made (``4x``)."""
    h = _digest(rel_of(info))
    return root(output) / "work" / h[:2] / h[2:4] / f"{info.stem}-{h[:8]}_{tag}"


def work_dirs(output: Path):
    """Every segmented video's work folder under ``output``."""
    return (p for p in root(output).glob("work/*/*/*") if p.is_dir())


def bundle_key(rels: list[str], tag: str) -> str:
    return f"bundle-{_digest(chr(0).join([tag, *rels]))[:16]}"


def bundle_dir(output: Path, key: str) -> Path:
    """The folder of a bundle's sidecar, lease and failure record (its shards: ``bundle_dir / key``)."""
    return root(output) / "bundles" / key[len("bundle-"):][:2]


def bundle_sidecars(output: Path):
    return sorted(root(output).glob("bundles/*/bundle-*.json"))


def unit_dir(wdir: Path, unit: Unit | str | int) -> Path:
    """The subfolder of a work folder that holds a unit's files (Unit, its key or its seg_idx)."""
    if isinstance(unit, Unit):
        if unit.clips:
            return wdir
        idx = unit.seg_idx
    elif isinstance(unit, str):
        if unit.startswith("bundle-"):
            return wdir
        idx = int(unit.rsplit("_", 1)[1])
    else:
        idx = unit
    return wdir / f"{idx // UNITS_PER_FOLDER:04d}"


def _key(unit: Unit | str) -> str:
    return getattr(unit, "key", unit)


def sidecar_files(output: Path) -> list[Path]:
    """Every segment sidecar under ``output`` (finished shards of segmented videos)."""
    return sorted(root(output).glob("work/*/*/*/*/segment_*[0-9].json"))


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_path(wdir: Path, unit: Unit) -> Path:
    return unit_dir(wdir, unit) / f"{unit.key}.mp4"


def sidecar_path(wdir: Path, unit: Unit | str) -> Path:
    """``<key>.json``; ``unit`` is a Unit or its key (``segment_0003``)."""
    return unit_dir(wdir, unit) / f"{_key(unit)}.json"


def failure_path(wdir: Path, unit: Unit | str) -> Path:
    return unit_dir(wdir, unit) / f"{_key(unit)}.failed.json"


def lease_path(wdir: Path, unit: Unit | str) -> Path:
    """``<key>.lease``: held by the rank making the shard (claims.py)."""
    return unit_dir(wdir, unit) / f"{_key(unit)}.lease"


def merge_failure_path(wdir: Path) -> Path:
    return wdir / "merge.failed.json"


def read_sidecar(wdir: Path, unit: Unit | str) -> dict | None:
    return read_json(sidecar_path(wdir, unit))


def sidecar_matches(wdir: Path, side: dict | None, start: int, end: int, signature: str | None,
                    verify_checksum: bool = False, frames: int | None = None, key: str | None = None) -> bool:
    """The "shard done" rule: the sidecar names this owned range and signature (None: any, for
    manifests older than per-segment signatures), it wrote ``frames`` frames (default: the owned
    range's), and its shard file has the recorded size; with ``verify_checksum``, its checksum
    too (``status --verify``; the merge checks it as it reads the shard)."""
    if not side or side.get("version") != SIDECAR_VERSION:
        return False
    if signature is not None and side.get("signature") != signature:
        return False  # made by other job settings: the run redoes it
    written = end - start if frames is None else frames
    if (side.get("start"), side.get("end"), side.get("frames_written")) != (start, end, written):
        return False
    if not isinstance(side.get("shard"), str) or not side["shard"]:
        return False
    shard = unit_dir(wdir, key or Path(side["shard"]).stem) / side["shard"]
    try:
        if shard.stat().st_size != side.get("size"):
            return False
    except OSError:
        return False
    return not verify_checksum or sha256(shard) == side.get("sha256")


def shard_done(wdir: Path, unit: Unit, signature: str, verify_checksum: bool = False) -> bool:
    """True when the unit's shard and sidecar are complete, consistent and made by this job."""
    return sidecar_matches(wdir, read_sidecar(wdir, unit), unit.start, unit.end, signature, verify_checksum,
                           frames=unit.out_frames, key=unit.key)


def discard_partial(wdir: Path, unit: Unit) -> None:
    """Remove whatever earlier attempts at this unit left behind (partial or failed), every
    writer's. Only for the holder of the unit's lease: nobody else is writing it."""
    for p in (shard_path(wdir, unit), sidecar_path(wdir, unit), failure_path(wdir, unit)):
        for q in (p, *partials(p)):
            q.unlink(missing_ok=True)


def remove_shards(wdir: Path) -> None:
    """After a verified merge (``work.keep_shards=false``): the shards, sidecars and every other
    unit file go; checkpoint.json and merged.json stay (resume reads merged.json)."""
    import shutil

    for sub in wdir.iterdir():
        if sub.is_dir():
            shutil.rmtree(sub, ignore_errors=True)
    for leftover in partials(wdir / "joined.mp4"):
        leftover.unlink(missing_ok=True)


def _units_record(units: list[Unit], signatures: dict[str, str]) -> dict:
    return {u.key: [u.start, u.end, u.out_frames, signatures[u.key]] for u in units}


def write_merged(wdir: Path, output: Path, units: list[Unit], signatures: dict[str, str], sides: list[dict],
                 result: dict, **who) -> None:
    """Record a finished merge: the output file, its size, the units (range and signature) and
    the shards (by checksum) it joined."""
    atomic_write_json(wdir / MERGED, {
        "version": SIDECAR_VERSION, "output": str(output), "size": output.stat().st_size,
        "units": _units_record(units, signatures), "shards": {s["shard"]: s["sha256"] for s in sides},
        "result": result, "merged_at": time.strftime(TIME_FORMAT), **who})


def merged_result(wdir: Path, output: Path, units: list[Unit], signatures: dict[str, str]) -> dict | None:
    """The recorded merge result when ``output`` is the merge of exactly these units, made with
    these settings, and still has the size it was written with; else None."""
    rec = read_json(wdir / MERGED)
    if not rec or rec.get("output") != str(output):
        return None
    if rec.get("units") != _units_record(units, signatures):
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
        "sha256": sha256(shard),  # in the page cache still: checked by the merge and status --verify
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


# -- bundles: whole short videos, several to a unit ----------------------------------------------

def write_bundle(wdir: Path, unit: Unit, *, signature: str, clips: list[dict], rank: int, host: str,
                 seconds: float, run: str | None = None) -> dict:
    """Record a finished bundle: one entry per clip, ``{"rel", "input", "status": ok|failed,
    "output", "size", "frames", "seconds", "reason"}`` (the clips' own outputs are committed)."""
    side = {"version": SIDECAR_VERSION, "bundle": unit.key, "signature": signature, "clips": clips,
            "run": run, "rank": rank, "host": host, "seconds": round(seconds, 3),
            "finished_at": time.strftime(TIME_FORMAT)}
    atomic_write_json(sidecar_path(wdir, unit), side)
    return side


def bundle_state(wdir: Path, unit: Unit, rels: list[str], signature: str) -> dict | None:
    """A bundle's sidecar when it covers exactly these clips (by relative path, in order) with
    this signature and every ok clip's output still has its recorded size; else None."""
    side = read_sidecar(wdir, unit)
    if not side or side.get("version") != SIDECAR_VERSION or side.get("signature") != signature:
        return None
    clips = side.get("clips")
    if not isinstance(clips, list) or [c.get("rel") for c in clips] != rels:
        return None
    for c in clips:
        if c.get("status") == "ok":
            try:
                if Path(c["output"]).stat().st_size != c.get("size"):
                    return None
            except (OSError, KeyError, TypeError):
                return None
    return side


def clip_shard(wdir: Path, unit: Unit, n: int) -> Path:
    """The shard of a bundle's ``n``-th clip, while the bundle runs."""
    return wdir / unit.key / f"clip_{n:04d}.mp4"


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
    """A segmented video's manifest: segment key -> absolute range, shard, signature its sidecar
    must carry, status. Written when the video's state changes (its first unit starts, it is
    merged); nothing in the run reads it back (status does): one left damaged gets its warning
    here, as it is replaced."""
    if (wdir / CHECKPOINT).exists():
        read_json(wdir / CHECKPOINT)
    atomic_write_json(wdir / CHECKPOINT, {
        "version": SIDECAR_VERSION,
        "input": info.path,
        "rel": rel_of(info),
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
