"""How far a run got, per video: shards and frames done, frames/s, ETA, failures.

    python -m vsr_ddp.status output=/data/out
    python -m vsr_ddp.status --output /data/out --json

Reads only the files a run leaves under ``<output>/.vsr_ddp/<work dir>/`` (checkpoint.json, shard
sidecars, ``segment_XXXX.failed.json`` records, the leases of the units in hand) and
``<output>/run_report*.json``; it imports no torch, so it answers at once, on a login node, while
the job runs or after it died. Units in hand are listed with the launch (run id), rank and host
that hold them, and whether that holder still renews its lease.

A shard counts as done when its sidecar names the segment's owned range, the signature that
checkpoint.json records for the segment, and a shard file of the recorded size (the run itself
also checks the checksum). frames/s is the frames of finished shards over the wall time during
which shards were being made (the union of each sidecar's [finished_at - seconds, finished_at]),
so the hours a job waited in the queue between a preemption and its requeue do not count.
"""
from __future__ import annotations

import argparse
import json
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
    """frames/s over the busy wall time; from the sidecars' own seconds when finished_at is too
    coarse (1 s) to measure a short run."""
    if frames <= 0:
        return None
    wall = busy_seconds(intervals)
    if wall >= 1.0:
        return frames / wall
    return frames / seconds if seconds > 0 else None


def holder(path: Path, timeout_s: float) -> dict | None:
    """Who holds the lease ``path`` (claims.py), or None when nobody does."""
    lease = claims.read_lease(path)
    if lease is None:
        return None
    runs = path.parent.parent / claims.RUNS  # <output>/.vsr_ddp/runs
    return {"run": lease.get("run"), "rank": lease.get("rank"), "host": lease.get("host"),
            "since": lease.get("since"), "stale": claims.is_stale(path, lease, timeout_s, runs=runs)}


def video_status(wdir: Path, timeout_s: float) -> dict | None:
    """The state of one work folder, or None when it has no readable checkpoint.json."""
    ck = read_json(wdir / shards.CHECKPOINT)
    if not ck or not isinstance(ck.get("segments"), dict):
        return None
    video = ck.get("video") or {}
    segments = ck["segments"]
    # the frames the output gets (a retiming job makes more or fewer than the input has)
    frames_total = (sum(s.get("frames", s["end"] - s["start"]) for s in segments.values())
                    or video.get("frames", 0))
    done, frames_done, partial, failures, intervals, seconds = 0, 0, 0, [], [], 0.0
    in_hand = []
    for key, seg in sorted(segments.items(), key=lambda kv: kv[1]["start"]):
        side = shards.read_sidecar(wdir, key)
        if shards.sidecar_matches(wdir, side, seg["start"], seg["end"],
                                  seg.get("signature", ck.get("signature")),
                                  verify_checksum=False, frames=seg.get("frames")):
            done += 1
            frames_done += int(side.get("frames_written", seg["end"] - seg["start"]))
            sec = float(side.get("seconds") or 0.0)
            seconds += sec
            end = _epoch(side.get("finished_at"))
            if end is not None:
                intervals.append((end - sec, end))
            continue
        held = holder(shards.lease_path(wdir, key), timeout_s)
        if held:
            in_hand.append({"segment": key, "start": seg["start"], "end": seg["end"], **held})
        failed = read_json(shards.failure_path(wdir, key))
        if failed:
            failures.append({"segment": key, "seg_idx": failed.get("seg_idx"), "start": failed.get("start"),
                             "end": failed.get("end"), "reason": failed.get("reason"),
                             "rank": failed.get("rank"), "host": failed.get("host")})
        elif held or partials(wdir / seg.get("shard", key + ".mp4")):
            partial += 1  # being written now, or left by a run that died (redone on resume)
    merging = holder(wdir / shards.MERGE_LEASE, timeout_s)
    if merging:
        in_hand.append({"segment": "merge", "start": None, "end": None, **merging})
    output = ck.get("output")
    if output and Path(output).exists() and done == len(segments):
        state = "merged"
    elif failures:
        state = "failed"
    elif done == len(segments):
        state = "shards done"  # the merge has not happened (yet)
    elif done or partial:
        state = "partial"
    else:
        state = "pending"
    rate = _rate(frames_done, intervals, seconds)
    return {
        "input": ck.get("input"), "stem": Path(ck.get("input") or wdir.name).stem, "work_dir": str(wdir),
        "state": state, "output": output if state == "merged" else None,
        "shards_done": done, "shards_total": len(segments), "shards_partial": partial,
        "frames_done": frames_done, "frames_total": int(frames_total),
        "fps": None if rate is None else round(rate, 3), "busy_s": round(busy_seconds(intervals), 3),
        "work_s": round(seconds, 3),
        "failures": failures, "in_hand": in_hand, "_intervals": intervals,
    }


def collect(output: str | Path, timeout_s: float) -> dict:
    """Everything :func:`main` prints, as one dict (what ``--json`` writes). ``timeout_s``: the
    runs' ``work.lease_timeout_s``, after which a lease not renewed counts as its holder's death."""
    output = Path(output).expanduser()
    root = output / ".vsr_ddp"
    if not root.is_dir():
        raise FileNotFoundError(f"{output}: no .vsr_ddp folder "
                                f"(not a vsr_ddp output folder, or nothing ran yet)")
    videos = [v for d in sorted(p for p in root.iterdir() if p.is_dir()) if (v := video_status(d, timeout_s))]
    # Inputs that never got a work folder (failed to probe, or skipped by the job) are only in the
    # run reports.
    reports = sorted(output.glob(shards.REPORTS))
    known = {v["input"] for v in videos}
    for report in reports:
        for entry in (read_json(report) or {}).get("videos", []):
            if entry.get("input") in known:
                v = next(v for v in videos if v["input"] == entry["input"])
                if entry.get("status") == "failed" and entry.get("reason"):
                    v["state"], v["reason"] = "failed", entry["reason"]
            elif entry.get("status") in ("failed", "skipped"):
                known.add(entry.get("input"))
                videos.append({"input": entry.get("input"), "stem": Path(entry.get("input") or "?").stem,
                               "work_dir": None, "state": entry["status"], "reason": entry.get("reason"),
                               "output": None, "shards_done": 0, "shards_total": 0, "shards_partial": 0,
                               "frames_done": 0, "frames_total": 0, "fps": None, "busy_s": 0.0, "work_s": 0.0,
                               "failures": [], "in_hand": [], "_intervals": []})
    videos.sort(key=lambda v: v["input"] or "")
    frames_done = sum(v["frames_done"] for v in videos)
    frames_total = sum(v["frames_total"] for v in videos)
    intervals = [i for v in videos for i in v.pop("_intervals")]
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
    runs = [{"run": run, "rank0_host": r.get("host"), "world": r.get("world"), "since": r.get("since"),
             "job": r.get("job"), "input": r.get("input")}
            for run, r in sorted(claims.live_runs(output, timeout_s).items())]
    return {"output": str(output), "reports": [str(r) for r in reports], "videos": videos, "total": total,
            "runs": runs}


def _eta(v: dict) -> str:
    if v["state"] in ("merged", "skipped", "failed"):
        return "-"
    return "0 s" if v["eta_s"] == 0 else human_duration(v["eta_s"])


def format_table(status: dict) -> str:
    """A plain aligned table, one row per video, a total row, then one line per failure."""
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
    hands = [(v, h) for v in status["videos"] for h in v.get("in_hand", ())]
    if hands:
        out.append("")
        out.append("in hand:")
        for v, h in hands:
            what = "merge" if h["segment"] == "merge" else f"{h['segment']} frames [{h['start']}, {h['end']})"
            dead = " (not renewed: its holder died; the next launch takes it over)" if h["stale"] else ""
            out.append(f"  {v['stem']} {what}: run {h['run']} rank {h['rank']} on {h['host']} "
                       f"since {h['since']}{dead}")
    fails = [(v, f) for v in status["videos"] for f in v["failures"]]
    reasons = [v for v in status["videos"]
               if v.get("reason") and not v["failures"] and v["state"] == "failed"]
    if fails or reasons:
        out.append("")
        out.append("failures:")
        for v, f in fails:
            out.append(f"  {v['stem']} {f['segment']} frames [{f['start']}, {f['end']}) on rank {f['rank']} "
                       f"({f['host']}): {f['reason']}")
        for v in reasons:
            out.append(f"  {v['stem']}: {v['reason']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept the job's own spelling, output=DIR, as well as --output DIR.
    argv = [a for arg in argv
            for a in (["--output", arg[len("output="):]] if arg.startswith("output=") else [arg])]
    ap = argparse.ArgumentParser(prog="python -m vsr_ddp.status", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="the run's output folder (output= of the job)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    default = float(shipped("config", "work.lease_timeout_s"))
    ap.add_argument("--lease-timeout", type=float, default=default, metavar="SECONDS",
                    help="the runs' work.lease_timeout_s: a lease not renewed this long is a dead holder's "
                         f"(default: conf/config.yaml's, {default:g})")
    args = ap.parse_args(argv)
    try:
        status = collect(args.output, args.lease_timeout)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if args.json else format_table(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
