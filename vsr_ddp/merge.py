"""The end of a video and of a run: the one-pass merge of a segmented video's shards, the clips
of a bundle committed straight to their outputs, and the report, streamed.

Report lines are written by each rank as its videos settle (``.vsr_ddp/report/part-<run>-<rank>.jsonl``,
one JSON object a line, the format of ``run_report.json``'s entries); at the end rank 0 streams
this launch's parts into ``run_report.json``: totals and failures first, then every video, never
holding all of them in memory.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from . import claims, shards
from .atomic import atomic_write_json, commit, fsync_file, partials, read_json, tmp_path
from .logs import human_duration
from .plan import Plan, Unit
from .video import merge

log = logging.getLogger(__name__)


def entry(info_path: str, status: str, reason: str | None = None, output: str | None = None,
          frames: int | None = None, seconds: float | None = None, **extra) -> dict:
    """One video's line of the report (DESIGN.md's run_report.json entry)."""
    return {"input": info_path, "status": status, "reason": reason, "output": output, "frames": frames,
            "seconds": seconds, **extra}


class Reports:
    """This rank's report part, appended to as its videos settle."""

    def __init__(self, output: Path, run: str, rank: int):
        self.path = shards.report_part(output, run, rank)
        self._f = None

    def add(self, line: dict) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(line) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def _lines(parts: list[Path]):
    for part in parts:
        with open(part, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield line, json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill: its video is redone and said again
                        log.warning("%s: a damaged line skipped", part)


def write_report(parts: list[Path], path: Path) -> dict:
    """``run_report.json`` from report parts, streamed: ``{"totals", "failures", "videos"}``; two
    passes over the parts, the failures (and one line at a time) in memory. Returns the totals."""
    totals = {"videos": 0, "ok": 0, "failed": 0, "skipped": 0}
    failures = []
    for _, e in _lines(parts):
        totals["videos"] += 1
        totals[e.get("status", "failed")] = totals.get(e.get("status", "failed"), 0) + 1
        if e.get("status") == "failed":
            failures.append({"input": e.get("input"), "reason": e.get("reason")})
    tmp = tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"totals": ' + json.dumps(totals) + ',\n "failures": ['
                    + ",".join("\n  " + json.dumps(x) for x in failures) + '\n ],\n "videos": [')
            for n, (line, _) in enumerate(_lines(parts)):
                f.write(("\n  " if n == 0 else ",\n  ") + line)
            f.write("\n ]}\n")
        fsync_file(tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**totals, "failures": failures}


def finish_report(parts: list[Path], path: Path) -> dict:
    """The launch's report from its parts (then removed: the report holds them), and its log lines."""
    totals = write_report(parts, path)
    for part in parts:
        part.unlink(missing_ok=True)
    for failure in totals["failures"][:20]:
        log.error("FAILED %s: %s", failure["input"], failure["reason"])
    if len(totals["failures"]) > 20:
        log.error("... and %d more failures: %s", len(totals["failures"]) - 20, path)
    log.info("%d ok, %d failed, %d skipped; report: %s", totals["ok"], totals["failed"], totals["skipped"],
             path)
    return totals


class Merger:
    """Merges of segmented videos (once, under a lease, by the rank that completes the video)
    and the final outputs of bundled clips. ``sigs(video)``: unit key -> signature."""

    def __init__(self, *, output: Path, plan: Plan, job, leases: claims.Leases, ctx, run: str,
                 wdir: Callable, sigs: Callable, live: Callable, reports: Reports, keep_shards: bool,
                 reader: Callable):
        self.output, self.plan, self.job, self.leases = output, plan, job, leases
        self.ctx, self.run = ctx, run
        self.wdir, self.sigs, self.live, self.reports = wdir, sigs, live, reports
        self.keep_shards, self.reader = keep_shards, reader
        self.writer = f"{run}-r{ctx.rank}"

    def out(self, vi: int) -> Path:
        return shards.output_path(self.output, self.plan.videos[vi])

    def merged(self, vi: int) -> dict | None:
        """The recorded merge of video ``vi`` when its output is the merge of the plan's units."""
        return shards.merged_result(self.wdir(self.plan.videos[vi]), self.out(vi), self.plan.units_of(vi),
                                    self.sigs(vi))

    def try_merge(self, vi: int) -> tuple[str, str | None]:
        """Merge a segmented video whose shards are all done, once: under its merge lease, unless
        ``merged.json`` says its output is already the merge of these units. Returns (merged,
        None), (failed, reason: here or in a live launch), or (busy, None): another launch's
        rank is merging it now. Reports it, when merged or failed here."""
        info = self.plan.videos[vi]
        wdir = self.wdir(info)
        result = self.merged(vi)
        if result is not None:
            self.report_ok(vi, result)
            return "merged", None
        failed = read_json(shards.merge_failure_path(wdir))
        if failed and self.live(failed.get("run")):
            return "failed", f"merge: {failed.get('reason')}"
        lock = wdir / shards.MERGE_LEASE
        if not self.leases.acquire(lock, what=f"merge {info.stem}"):
            return "busy", None
        try:
            result = self.merged(vi)  # merged as we took the lease
            if result is None:
                # what an interrupted merge left behind (every writer's temporary files)
                for leftover in (*partials(self.out(vi)), shards.merge_failure_path(wdir)):
                    leftover.unlink(missing_ok=True)
                result = self.merge_video(vi, lock)
            self.report_ok(vi, result)
            return "merged", None
        except claims.LeaseLost as e:
            log.warning("%s: merge abandoned: %s", info.path, e)
            return "busy", None
        except Exception as e:  # noqa: BLE001 - reported per video
            log.error("%s: merge failed: %s", info.path, e)
            atomic_write_json(shards.merge_failure_path(wdir), {
                "reason": str(e), "run": self.run, "rank": self.ctx.rank, "host": self.ctx.host,
                "failed_at": time.strftime(shards.TIME_FORMAT)})
            return "failed", f"merge: {e}"
        finally:
            self.leases.release(lock)

    def report_ok(self, vi: int, result: dict) -> None:
        self.reports.add(entry(self.plan.videos[vi].path, "ok", **result))

    def merge_video(self, vi: int, lock: Path | None = None) -> dict:
        """Join the shards into the output in one pass (checksums checked as they are read), then
        record the merge and, unless ``work.keep_shards``, remove the shards."""
        info = self.plan.videos[vi]
        wdir = self.wdir(info)
        units = self.plan.units_of(vi)
        sigs = self.sigs(vi)
        missing = [u for u in units if not shards.shard_done(wdir, u, sigs[u.key])]
        if missing:
            raise RuntimeError("shards missing or inconsistent: " + ", ".join(
                f"{u.key} [{u.start}, {u.end})" for u in missing[:5]))
        sides = sorted((shards.read_sidecar(wdir, u) for u in units), key=lambda s: s["start"])
        # Coverage from what the sidecars say, not from the plan: stale or foreign shards show here.
        shards.check_coverage([Unit(vi, s["seg_idx"], s["start"], s["end"], s["read_start"], s["read_end"])
                               for s in sides], info.frames)
        out = self.out(vi)
        out.parent.mkdir(parents=True, exist_ok=True)
        out_info = self.job.output_info(info)
        t0 = time.monotonic()
        ordered = [(shards.unit_dir(wdir, s["seg_idx"]) / s["shard"], s.get("out_start", s["start"]),
                    s["frames_written"]) for s in sides]
        if lock is not None:
            self.leases.check(lock)
        merge(ordered, out_info, out, writer=self.writer, checksums=[s.get("sha256") for s in sides])
        merge_s = time.monotonic() - t0
        seconds = sum(s["seconds"] for s in sides) + merge_s
        log.info("%s -> %s: %d frames, merged in %.2f s (work %s)", info.path, out, out_info.frames, merge_s,
                 human_duration(seconds))
        result = {"output": str(out), "frames": out_info.frames, "seconds": round(seconds, 3),
                  "merge_seconds": round(merge_s, 3), **_counts(sides)}
        result.update(self.finish_video(vi, out))
        shards.write_merged(wdir, out, units, sigs, sides, result, run=self.run, rank=self.ctx.rank,
                            host=self.ctx.host)
        shards.write_checkpoint(wdir, info, units, sigs, {u.key: "done" for u in units}, output=str(out))
        if not self.keep_shards:
            shards.remove_shards(wdir)
        return result

    def finish_video(self, vi: int, out: Path) -> dict:
        info = self.plan.videos[vi]
        try:  # e.g. upscale's side-by-side preview
            return self.job.finish_video(info, out, self.reader(info)) or {}
        except Exception as e:  # noqa: BLE001 - the video itself is done and fine
            log.warning("%s: %s after the merge failed: %s", info.path, self.job.name, e)
            return {}

    def commit_clip(self, vi: int, shard: Path, unit: Unit, side: dict) -> dict:
        """A bundled clip's one shard, remuxed straight to its output with the input's audio."""
        info = self.plan.videos[vi]
        out = self.out(vi)
        out.parent.mkdir(parents=True, exist_ok=True)
        out_info = self.job.output_info(info)
        t0 = time.monotonic()
        merge([(shard, unit.out_range[0], unit.out_frames)], out_info, out, writer=self.writer)
        merge_s = time.monotonic() - t0
        result = {"output": str(out), "frames": out_info.frames,
                  "seconds": round(side["seconds"] + merge_s, 3), "merge_seconds": round(merge_s, 3),
                  **_counts([side])}
        result.update(self.finish_video(vi, out))
        log.info("%s -> %s: %d frames in %s", info.path, out, out_info.frames,
                 human_duration(result["seconds"]))
        return result


def _counts(sides: list[dict]) -> dict:
    counts: dict = {}
    for s in sides:
        for key, value in (s.get("counts") or {}).items():
            counts[key] = counts.get(key, 0) + value
    return counts
