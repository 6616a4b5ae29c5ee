"""How far a run got, per video: shards and frames done, frames/s, ETA, failures.

    python -m vsr_ddp.status output=/data/out
    python -m vsr_ddp.status --output /data/out --json
    python -m vsr_ddp.status output=/data/out --verify     # checksums and sizes; exit 1 on any problem

Reads only the files a run leaves under ``<output>`` (the layout is shards.py's): each segmented
video's work folder (checkpoint.json, merged.json, its shard sidecars, failure records and the
leases of the units in hand), each bundle's sidecar (one row per clip it made), the report lines
of the launches (``report/part-*.jsonl``, while a launch runs or after it died) and
``run_report*.json``; it imports no torch, so it answers at once, on a login node, while the job
runs or after it died. Units in hand are listed with the launch (run id), rank and host that hold
them, and whether that holder still renews its lease.

A segmented video is merged when merged.json records its output and that output still has the
recorded size (its shards and sidecars are removed after the merge, unless work.keep_shards);
before that, a shard counts as done when its sidecar names the segment's owned range, the
signature that checkpoint.json records for the segment, and a shard file of the recorded size.
A bundled clip is merged when its bundle's sidecar says ok: the default view reads each bundle
sidecar once and touches no clip's output (a million clips stay cheap); ``--verify`` checks that
every merged output exists with its recorded size and every shard still on disk has the checksum
its sidecar records.

frames/s is the frames done over the wall time during which they were being made: the union of
each shard's [finished_at - seconds, finished_at], each bundle's, and for a merged video whose
shards are gone [merged_at - work seconds, merged_at] (an upper bound on its wall time when
several ranks made its shards), so the hours a job waited in the queue between a preemption and
its requeue do not count. Videos no rank has started yet have no files and are not listed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from . import claims, shards
from .atomic import partials, read_json
from .config import shipped
from .logs import human_duration


def _epoch(stamp: str | None) -> float | None:
    try:
        return datetime.strptime(stamp, shards.TIME_FORMAT).timestamp()
    except (TypeError, ValueError):
        return None


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: wall time during which any shard was made."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _rate(frames: int, intervals: list[tuple[float, float]], seconds: float) -> float | None:
    """frames/s over the busy wall time; from the recorded seconds when finished_at is too
    coarse (1 s) to measure a short run."""
    if frames <= 0:
        return None
    wall = busy_seconds(intervals)
    if wall >= 1.0:
        return frames / wall
    return frames / seconds if seconds > 0 else None


def _interval(end_stamp: str | None, seconds: float) -> list[tuple[float, float]]:
    end = _epoch(end_stamp)
    return [] if end is None else [(end - seconds, end)]


def holder(path: Path, timeout_s: float, runs: Path | None = None) -> dict | None:
    """Who holds the lease ``path`` (claims.py), or None when nobody does. ``runs``: the run
    files' folder (shards.runs_dir), so that a lease of a launch that is gone counts as stale."""
    lease = claims.read_lease(path)
    if lease is None:
        return None
    return {"run": lease.get("run"), "rank": lease.get("rank"), "host": lease.get("host"),
            "since": lease.get("since"), "stale": claims.is_stale(path, lease, timeout_s, runs=runs)}


def _row(input_: str | None, *, state: str, work_dir: str | None = None, output: str | None = None,
         shards_done: int = 0, shards_total: int = 0, shards_partial: int = 0, frames_done: int = 0,
         frames_total: int = 0, fps: float | None = None, busy_s: float = 0.0, work_s: float = 0.0,
         failures: list | None = None, in_hand: list | None = None, **extra) -> dict:
    name = os.path.basename((input_ or work_dir or "?").rstrip("/"))
    stem = name[:name.rindex(".")] if "." in name[1:] else name  # Path.stem, without its cost a million times
    return {"input": input_, "stem": stem, "work_dir": work_dir,
            "state": state, "output": output, "shards_done": shards_done, "shards_total": shards_total,
            "shards_partial": shards_partial, "frames_done": frames_done, "frames_total": frames_total,
            "fps": None if fps is None else round(fps, 3), "busy_s": round(busy_s, 3),
            "work_s": round(work_s, 3), "failures": failures or [], "in_hand": in_hand or [], **extra}


def video_status(wdir: Path, timeout_s: float, runs: Path | None = None) -> tuple[dict, list, float] | None:
    """One segmented video's row, the busy intervals of its finished work and when it last
    changed (to pick the newest record of an input); None when it has no readable checkpoint.json.
    A merged video is told by merged.json alone (its shards may be gone)."""
    ck = read_json(wdir / shards.CHECKPOINT)
    if not ck or not isinstance(ck.get("segments"), dict):
        return None
    video = ck.get("video") or {}
    segments = ck["segments"]
    # the frames the output gets (a retiming job makes more or fewer than the input has)
    frames_total = int(sum(s.get("frames", s["end"] - s["start"]) for s in segments.values())
                       or video.get("frames", 0))
    try:
        when = (wdir / shards.CHECKPOINT).stat().st_mtime
    except OSError:
        when = 0.0
    rec = read_json(wdir / shards.MERGED)
    check = None
    if rec and rec.get("output"):
        check = (rec["output"], rec.get("size"), f"{shards.MERGED} of {wdir.name}")
        try:
            merged = Path(rec["output"]).stat().st_size == rec.get("size")
        except OSError:
            merged = False
        if merged:
            result = rec.get("result") or {}
            seconds = float(result.get("seconds") or 0.0)
            intervals = _interval(rec.get("merged_at"), seconds)
            row = _row(ck.get("input"), state="merged", work_dir=str(wdir), output=rec["output"],
                       shards_done=len(segments), shards_total=len(segments), frames_done=frames_total,
                       frames_total=frames_total, fps=frames_total / seconds if seconds > 0 else None,
                       busy_s=busy_seconds(intervals), work_s=seconds, _check=check)
            return row, intervals, max(when, (intervals or [(0, 0)])[0][1])
    done, frames_done, partial, failures, intervals, seconds = 0, 0, 0, [], [], 0.0
    in_hand = []
    for key, seg in sorted(segments.items(), key=lambda kv: kv[1]["start"]):
        side = shards.read_sidecar(wdir, key)
        if shards.sidecar_matches(wdir, side, seg["start"], seg["end"],
                                  seg.get("signature", ck.get("signature")),
                                  verify_checksum=False, frames=seg.get("frames"), key=key):
            done += 1
            frames_done += int(side.get("frames_written", seg["end"] - seg["start"]))
            sec = float(side.get("seconds") or 0.0)
            seconds += sec
            intervals += _interval(side.get("finished_at"), sec)
            continue
        held = holder(shards.lease_path(wdir, key), timeout_s, runs)
        if held:
            in_hand.append({"segment": key, "start": seg["start"], "end": seg["end"], **held})
        failed = read_json(shards.failure_path(wdir, key))
        if failed:
            failures.append({"segment": key, "seg_idx": failed.get("seg_idx"), "start": failed.get("start"),
                             "end": failed.get("end"), "reason": failed.get("reason"),
                             "rank": failed.get("rank"), "host": failed.get("host")})
        elif held or partials(shards.unit_dir(wdir, key) / seg.get("shard", key + ".mp4")):
            partial += 1  # being written now, or left by a run that died (redone on resume)
    merging = holder(wdir / shards.MERGE_LEASE, timeout_s, runs)
    if merging:
        in_hand.append({"segment": "merge", "start": None, "end": None, **merging})
    merge_failed = read_json(shards.merge_failure_path(wdir))
    if merge_failed and done == len(segments):
        failures.append({"segment": "merge", "seg_idx": None, "start": None, "end": None,
                         "reason": merge_failed.get("reason"), "rank": merge_failed.get("rank"),
                         "host": merge_failed.get("host")})
    output = ck.get("output")
    if not rec and output and Path(output).exists() and done == len(segments):
        state = "merged"  # a merge from before merged.json was written
    elif failures:
        state = "failed"
    elif done == len(segments):
        state = "shards done"  # the merge has not happened (yet)
    elif done or partial:
        state = "partial"
    else:
        state = "pending"
    row = _row(ck.get("input"), state=state, work_dir=str(wdir), output=output if state == "merged" else None,
               shards_done=done, shards_total=len(segments), shards_partial=partial, frames_done=frames_done,
               frames_total=frames_total, fps=_rate(frames_done, intervals, seconds),
               busy_s=busy_seconds(intervals), work_s=seconds, failures=failures, in_hand=in_hand,
               **({"_check": check} if check else {}))
    return row, intervals, when


def bundle_rows(path: Path):
    """The rows of one bundle sidecar's clips, the bundle's busy interval and when it finished;
    nothing when it cannot be read. No clip's output is looked at (``--verify`` does)."""
    side = read_json(path)
    clips = (side or {}).get("clips")
    if not isinstance(clips, list):
        return [], [], 0.0
    intervals = _interval(side.get("finished_at"), float(side.get("seconds") or 0.0))
    when = intervals[0][1] if intervals else 0.0
    rows = []
    for c in clips:
        if not isinstance(c, dict):
            continue
        frames = int(c.get("frames") or 0)
        seconds = float(c.get("seconds") or 0.0)
        if c.get("status") == "ok":
            rows.append(_row(c.get("input"), state="merged", output=c.get("output"), shards_done=1,
                             shards_total=1, frames_done=frames, frames_total=frames,
                             fps=frames / seconds if seconds > 0 else None, work_s=seconds,
                             bundle=side.get("bundle") or path.stem,
                             _check=(c.get("output"), c.get("size"), path.name)))
        else:
            rows.append(_row(c.get("input"), state="failed", shards_total=1, frames_total=frames,
                             reason=c.get("reason") or "failed", bundle=side.get("bundle") or path.stem))
    return rows, intervals, when


def _bundle_leases(output: Path) -> list[Path]:
    """The leases of bundles in hand (next to their sidecars: shards.bundle_dir)."""
    return sorted(shards.root(output).glob(f"bundles/*/bundle-*{claims.LEASE_SUFFIX}"))


_OK = '"status": "ok"'  # how a report line of a video done reads (json.dumps)


def report_entries(path: Path, want=lambda line: True):
    """The video entries of a report part (one JSON object a line) or of a run report, streamed:
    a run report written by the run has one entry a line after ``"videos": [``; any other layout
    is read whole. ``want(line)`` says, before it is parsed, whether a line is worth parsing.
    A damaged line (a kill in the middle of an append) is skipped."""
    try:
        f = open(path, encoding="utf-8")
    except OSError:
        return
    with f:
        if path.suffix == ".jsonl":
            for line in f:
                if line.strip() and want(line):
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(e, dict):
                        yield e
            return
        streamed = None
        for line in f:
            text = line.strip()
            if streamed is None:
                if text == '"videos": [':
                    streamed = 0
                continue
            if text.startswith("]"):
                break
            text = text.rstrip(",")
            if not text or not want(text):
                streamed += 1
                continue
            try:
                e = json.loads(text)
            except ValueError:
                if streamed == 0:
                    streamed = None  # entries over several lines: not the run's own layout
                    break
                continue
            streamed += 1
            if isinstance(e, dict):
                yield e
        if streamed is not None:
            return
    for e in (read_json(path) or {}).get("videos", []):
        if isinstance(e, dict) and want(json.dumps(e)):
            yield e


def collect(output: str | Path, timeout_s: float, verify: bool = False) -> dict:
    """Everything :func:`main` prints, as one dict (what ``--json`` writes). ``timeout_s``: the
    runs' ``work.lease_timeout_s``, after which a lease not renewed counts as its holder's death.
    ``verify``: also check the checksums of the shards on disk and the sizes of the merged
    outputs, under ``"verify": {"files", "problems"}``."""
    with _no_gc():
        return _collect(Path(output).expanduser(), timeout_s, verify)


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector off meanwhile (restored after): status makes a million rows and
    a table's lines with no cycles among them, and the collector's passes over them would cost most
    of its time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _collect(output: Path, timeout_s: float, verify: bool) -> dict:
    root = shards.root(output)
    if not root.is_dir():
        raise FileNotFoundError(f"{output}: no {shards.WORK_DIR} folder "
                                f"(not a vsr_ddp output folder, or nothing ran yet)")
    runs = shards.runs_dir(output)
    # One row per input: where several records name it (an older bundle its clip has left, a
    # work folder of other settings), the newest wins.
    rows: dict[str, tuple[dict, float]] = {}
    intervals: list[tuple[float, float]] = []

    def add(row: dict, when: float) -> None:
        key = row["input"] or row["work_dir"] or f"?{len(rows)}"
        if key not in rows or when >= rows[key][1]:
            rows[key] = (row, when)

    for wdir in sorted(shards.work_dirs(output)):
        found = video_status(wdir, timeout_s, runs)
        if found:
            intervals += found[1]
            add(found[0], found[2])
    for path in shards.bundle_sidecars(output):
        clips, spans, when = bundle_rows(path)
        intervals += spans
        for row in clips:
            add(row, when)
    in_hand = []
    for lease in _bundle_leases(output):
        held = holder(lease, timeout_s, runs)
        if held:
            what = (claims.read_lease(lease) or {}).get("what") or lease.stem
            in_hand.append({"bundle": lease.stem, "what": what, **held})

    # Inputs that never got a work folder or bundle record (failed to probe, skipped by the job)
    # are only in the report lines: this launch's parts and the reports of launches that ended,
    # oldest first (a later line about an input overrides an earlier one).
    reports = sorted(output.glob(shards.REPORTS))
    sources = sorted([*shards.report_parts(output), *reports], key=_mtime)
    only: dict[str, dict] = {}  # input -> its row, for inputs known from report lines alone

    def want(line: str) -> bool:
        return _OK not in line or bool(only)  # a video done matters only to undo a failure of before

    for source in sources:
        for entry in report_entries(source, want):
            inp, st = entry.get("input"), entry.get("status")
            if inp in rows:
                row = rows[inp][0]
                if st == "failed" and entry.get("reason") and row["state"] != "merged":
                    row["state"], row["reason"] = "failed", entry["reason"]
            elif st in ("failed", "skipped"):
                only[inp] = _row(inp, state=st, reason=entry.get("reason"))
            else:
                only.pop(inp, None)
    videos = [r for r, _ in rows.values()] + list(only.values())
    rows.clear()
    videos.sort(key=lambda v: v["input"] or "")
    checks = [v.pop("_check") for v in videos if "_check" in v]
    frames_done = sum(v["frames_done"] for v in videos)
    frames_total = sum(v["frames_total"] for v in videos)
    run_rate = _rate(frames_done, intervals, sum(v["work_s"] for v in videos))
    for v in videos:
        left = v["frames_total"] - v["frames_done"]
        rate = v["fps"] or run_rate
        v["eta_s"] = 0.0 if left == 0 else (round(left / rate, 1)
                                            if rate and v["state"] != "failed" else None)
    # the rest waits
    left = sum(v["frames_total"] - v["frames_done"] for v in videos if v["state"] != "failed")
    total = {
        "videos": len(videos), "merged": sum(v["state"] == "merged" for v in videos),
        "failed": sum(v["state"] == "failed" for v in videos),
        "shards_done": sum(v["shards_done"] for v in videos),
        "shards_total": sum(v["shards_total"] for v in videos),
        "frames_done": frames_done, "frames_total": frames_total,
        "fps": None if run_rate is None else round(run_rate, 3),
        "eta_s": 0.0 if left == 0 else (round(left / run_rate, 1) if run_rate else None),
    }
    live = [{"run": run, "rank0_host": r.get("host"), "world": r.get("world"), "since": r.get("since"),
             "job": r.get("job"), "input": r.get("input")}
            for run, r in sorted(claims.live_runs(output, timeout_s).items())]
    status = {"output": str(output), "reports": [str(r) for r in reports],
              "report_parts": [str(p) for p in shards.report_parts(output)], "videos": videos, "total": total,
              "runs": live, "in_hand": in_hand}
    if verify:
        status["verify"] = verify_files(output, checks)
    return status


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def verify_files(output: Path, checks: list[tuple]) -> dict:
    """Every shard still on disk against its sidecar's size and sha256, and every merged output
    (``checks``: (path, recorded size, the record that says so)) against its recorded size.
    Returns ``{"files": how many were checked, "problems": ["<file>: <what>", ...]}``."""
    problems, files = [], 0
    for sidecar in shards.sidecar_files(output):
        side = read_json(sidecar)
        if not side or not isinstance(side.get("shard"), str) or not side["shard"]:
            problems.append(f"{sidecar}: unreadable sidecar")
            continue
        files += 1
        shard = sidecar.parent / side["shard"]
        try:
            size = shard.stat().st_size
        except OSError:
            problems.append(f"{shard}: missing (its sidecar {sidecar.name} records it)")
            continue
        if size != side.get("size"):
            problems.append(f"{shard}: {size} bytes, its sidecar says {side.get('size')}")
        elif shards.sha256(shard) != side.get("sha256"):
            problems.append(f"{shard}: checksum differs from its sidecar's (the file was changed)")
    for path, size, record in checks:
        if not path:
            continue
        files += 1
        try:
            actual = os.stat(path).st_size
        except OSError:
            problems.append(f"{path}: missing ({record} records {size} bytes)")
            continue
        if actual != size:
            problems.append(f"{path}: {actual} bytes, {record} says {size}")
    return {"files": files, "problems": problems}


def _eta(v: dict) -> str:
    if v["state"] in ("merged", "skipped", "failed"):
        return "-"
    return "0 s" if v["eta_s"] == 0 else human_duration(v["eta_s"])


def format_table(status: dict) -> str:
    """A plain aligned table, one row per video, a total row, then the launches, the units in
    hand and one line per failure."""
    head = ["video", "shards", "frames", "frames/s", "ETA", "state", "failures"]
    rows = []
    for v in status["videos"]:
        rows.append([v["stem"], f"{v['shards_done']}/{v['shards_total']}",
                     f"{v['frames_done']}/{v['frames_total']}",
                     f"{v['fps']:.1f}" if v["fps"] else "-", _eta(v), v["state"],
                     str(len(v["failures"]) or int(v["state"] == "failed" and bool(v.get("reason"))))])
    t = status["total"]
    rows.append([f"all {t['videos']}", f"{t['shards_done']}/{t['shards_total']}",
                 f"{t['frames_done']}/{t['frames_total']}", f"{t['fps']:.1f}" if t["fps"] else "-",
                 "-" if t["eta_s"] == 0 and t["merged"] == t["videos"] else human_duration(t["eta_s"]),
                 f"{t['merged']}/{t['videos']} merged", str(sum(int(r[-1]) for r in rows))])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {1, 2, 3, 4, 6}  # numbers align right

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(head), *(line(r) for r in rows[:-1]), "-" * len(line(head)), line(rows[-1])]
    if status.get("runs"):
        out.append("")
        out.append("launches working on this folder:")
        for r in status["runs"]:
            out.append(f"  run {r['run']}: {r['world']} rank(s), rank 0 on {r['rank0_host']}, "
                       f"since {r['since']}")
    dead = " (not renewed: its holder died; the next launch takes it over)"
    hands = [(v["stem"], h) for v in status["videos"] for h in v.get("in_hand", ())]
    if hands or status.get("in_hand"):
        out.append("")
        out.append("in hand:")
        for stem, h in hands:
            what = "merge" if h["segment"] == "merge" else f"{h['segment']} frames [{h['start']}, {h['end']})"
            out.append(f"  {stem} {what}: run {h['run']} rank {h['rank']} on {h['host']} "
                       f"since {h['since']}{dead if h['stale'] else ''}")
        for h in status.get("in_hand", ()):
            out.append(f"  {h['what']}: run {h['run']} rank {h['rank']} on {h['host']} "
                       f"since {h['since']}{dead if h['stale'] else ''}")
    fails = [(v, f) for v in status["videos"] for f in v["failures"]]
    reasons = [v for v in status["videos"]
               if v.get("reason") and not v["failures"] and v["state"] == "failed"]
    if fails or reasons:
        out.append("")
        out.append("failures:")
        for v, f in fails:
            where = (f["segment"] if f["segment"] == "merge"
                     else f"{f['segment']} frames [{f['start']}, {f['end']})")
            out.append(f"  {v['stem']} {where} on rank {f['rank']} ({f['host']}): {f['reason']}")
        for v in reasons:
            out.append(f"  {v['stem']}: {v['reason']}")
    return "\n".join(out)


def dump_json(status: dict, f) -> None:
    """``status`` as JSON, one video a line (json's fast encoder: a million videos in seconds)."""
    f.write("{")
    for n, (key, value) in enumerate(status.items()):
        f.write(("\n" if n == 0 else ",\n") + f" {json.dumps(key)}: ")
        if key == "videos":
            f.write("[" + ",".join("\n  " + json.dumps(v) for v in value) + ("\n ]" if value else "]"))
        else:
            f.write(json.dumps(value, indent=2).replace("\n", "\n "))
    f.write("\n}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept the job's own spelling, output=DIR, as well as --output DIR.
    argv = [a for arg in argv
            for a in (["--output", arg[len("output="):]] if arg.startswith("output=") else [arg])]
    ap = argparse.ArgumentParser(prog="python -m vsr_ddp.status", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="the run's output folder (output= of the job)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--verify", action="store_true",
                    help="check every shard on disk against its sidecar's checksum and every merged output's "
                         "size: one line per problem and exit status 1 when any, else how many files were "
                         "verified")
    default = float(shipped("config", "work.lease_timeout_s"))
    ap.add_argument("--lease-timeout", type=float, default=default, metavar="SECONDS",
                    help="the runs' work.lease_timeout_s: a lease not renewed this long is a dead holder's "
                         f"(default: conf/config.yaml's, {default:g})")
    args = ap.parse_args(argv)
    with _no_gc():
        return _report(args)


def _report(args) -> int:
    try:
        status = collect(args.output, args.lease_timeout, verify=args.verify)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.verify:
        checked = status["verify"]
        if args.json:
            json.dump(checked, sys.stdout, indent=2)
            print()
        else:
            for problem in checked["problems"]:
                print(problem)
            n = len(checked["problems"])
            print(f"{n} problem(s) in {checked['files']} file(s) verified" if n else
                  f"{checked['files']} file(s) verified: every shard matches its checksum and every "
                  f"merged output has its recorded size")
        return 1 if checked["problems"] else 0
    if args.json:
        dump_json(status, sys.stdout)
    else:
        print(format_table(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
