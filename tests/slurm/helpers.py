"""Inputs and checks for tests/slurm/run_slurm_test.sh (runs outside pytest).

    python tests/slurm/helpers.py inputs WORK
    python tests/slurm/helpers.py check OUT --video clip=48 [--report run_report.json] [--no-report NAME]
    python tests/slurm/helpers.py snapshot WDIR FILE
    python tests/slurm/helpers.py compare WDIR FILE
    python tests/slurm/helpers.py ranks OUT --world 2

Every check prints one line and exits 1 with the reason when it fails.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for builders

from builders import decode_indices, make_clip, read_frames, save_srvgg  # noqa: E402

CLIPS = {  # folder -> {stem: frames}
    "one": {"clip": 48},
    "many": {"a": 24, "b": 30, "c": 36},
    "long": {"long": 240},
}


def inputs(work: Path) -> None:
    for folder, clips in CLIPS.items():
        for i, (stem, frames) in enumerate(clips.items()):
            make_clip(work / "in" / folder / f"{stem}.mp4", frames=frames, size=(64, 48), audio=True, seed=i)
    # Heavy enough on CPU that a preemption signal lands mid-run; its output keeps the frame code.
    save_srvgg(work / "model_x2.pth", scale=2, seed=7, num_feat=32, num_conv=16)
    print(f"inputs in {work / 'in'}: {CLIPS}; model {work / 'model_x2.pth'}")


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def check(out: Path, videos: list[str], report: str | None, no_report: list[str]) -> None:
    for spec in videos:
        stem, frames = spec.split("=")
        path = out / f"{stem}.mp4"
        if not path.exists():
            fail(f"{path} missing")
        got = decode_indices(read_frames(path))
        if got != list(range(int(frames))):
            fail(f"{path}: frames {got[:5]}... ({len(got)}), expected 0..{int(frames) - 1}")
    if report:
        data = json.loads((out / report).read_text())
        stems = sorted(Path(v["input"]).stem for v in data["videos"])
        want = sorted(spec.split("=")[0] for spec in videos)
        if stems != want or any(v["status"] != "ok" for v in data["videos"]):
            got = [(Path(v["input"]).stem, v["status"], v["reason"]) for v in data["videos"]]
            fail(f"{out / report}: {got}, expected {want} all ok")
    for name in no_report:
        if (out / name).exists():
            fail(f"{out / name} exists but should not")
    print(f"ok: {', '.join(videos)} frame-exact" + (f", {report} all ok" if report else ""))


def sidecars(wdir: Path) -> dict:
    return {p.name: {k: side[k] for k in ("sha256", "finished_at", "rank")}
            for p in sorted(wdir.glob("segment_*.json")) if not p.name.endswith(".failed.json")
            for side in [json.loads(p.read_text())]}


def snapshot(wdir: Path, file: Path) -> None:
    snap = sidecars(wdir)
    file.write_text(json.dumps(snap, indent=1))
    print(f"{len(snap)} shard(s) done before the stop: {', '.join(snap)}")


def already_done(logs: Path) -> int:
    """Finished shards the last run found, over all ranks: each rank log's last
    'N unit(s) for this rank, M already done' line (rank logs are appended across requeues)."""
    total = 0
    for log in sorted(logs.glob("rank*.log")):
        found = re.findall(r"\d+ unit\(s\) for this rank, (\d+) already done",
                           log.read_text(encoding="utf-8"))
        if not found:
            fail(f"{log} has no unit count")
        total += int(found[-1])
    return total


def compare(wdir: Path, file: Path, logs: Path | None = None) -> None:
    before, after = json.loads(file.read_text()), sidecars(wdir)
    kept = [k for k in before if after.get(k) == before[k]]
    changed = [k for k in before if k in after and after[k] != before[k]]
    redone = [k for k in after if k not in before]
    total = len(json.loads((wdir / "checkpoint.json").read_text())["segments"])
    print(f"{len(kept)} shard(s) kept from before the stop, {len(redone)} done after the requeue, "
          f"{len(changed)} redone although finished; {total} in all")
    if (changed or len(kept) != len(before) or not before or len(kept) + len(redone) != total
            or len(redone) >= total):
        fail("the requeued run did not resume from the finished shards")
    if logs is not None:
        found = already_done(logs)
        print(f"the requeued run's rank logs: {found} unit(s) already done")
        if found != len(before):
            fail(f"the requeued run found {found} finished shard(s), not the {len(before)} kept")


def ranks(out: Path, world: int) -> None:
    """The last run on ``out`` was one launch of ``world`` ranks and every rank took part in it.
    What a finished run leaves to show it (rank <r>'s host file, ``.vsr_ddp/hosts/<run>/<r>.json``,
    is written at start-up for the shared-folder check and goes with its run folder at the end):
    rank 0's log names the run and its rank count; each rank's log has that run's lines, down to
    its unit count after the work; every shard's sidecar names that run and a rank of it."""
    logs = out / ".vsr_ddp" / "logs"
    runs = re.findall(r"\] INFO \S+: run ([0-9a-f]+): (\d+) rank\(s\)$",
                      (logs / "rank0.log").read_text(encoding="utf-8"), re.M)
    if not runs:
        fail(f"{logs / 'rank0.log'} names no run")
    run, n = runs[-1]
    if int(n) != world:
        fail(f"run {run} had {n} rank(s), not {world}: the tasks did not form one world")
    units = {}
    for r in range(world):
        log = logs / f"rank{r}.log"
        found = re.findall(rf"^\S+ \S+ \[rank {r} run {run}\] INFO \S+: (\d+) unit\(s\) for this rank",
                           log.read_text(encoding="utf-8") if log.exists() else "", re.M)
        if not found:
            fail(f"rank {r} did not work in run {run}: no unit count of it in {log}")
        units[r] = int(found[-1])
    made = {}
    for side in sorted(out.glob(".vsr_ddp/*/segment_*.json")):
        if side.name.endswith(".failed.json"):
            continue
        meta = json.loads(side.read_text())
        if meta.get("run") != run or not 0 <= meta.get("rank", -1) < world:
            fail(f"{side} was made by run {meta.get('run')} rank {meta.get('rank')}, not run {run}")
        made.setdefault(meta["rank"], []).append(meta.get("host"))
    if not made:
        fail(f"no shards under {out / '.vsr_ddp'}")
    if (out / ".vsr_ddp" / "hosts" / run).exists():
        fail(f"{out / '.vsr_ddp' / 'hosts' / run} is left after the run")
    print(f"ok: run {run}, {world} rank(s), units drawn per rank {units}, shards made per rank "
          + ", ".join(f"{r}: {len(h)} on {', '.join(sorted(set(h)))}" for r, h in sorted(made.items())))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inputs").add_argument("work", type=Path)
    c = sub.add_parser("check")
    c.add_argument("out", type=Path)
    c.add_argument("--video", action="append", default=[], help="stem=frames")
    c.add_argument("--report")
    c.add_argument("--no-report", action="append", default=[])
    r = sub.add_parser("ranks")
    r.add_argument("out", type=Path)
    r.add_argument("--world", type=int, required=True)
    for name in ("snapshot", "compare"):
        s = sub.add_parser(name)
        s.add_argument("wdir", type=Path)
        s.add_argument("file", type=Path)
        if name == "compare":
            s.add_argument("--logs", type=Path,
                           help="rank logs folder: check the rerun's 'already done' counts")
    args = ap.parse_args()
    if args.cmd == "inputs":
        inputs(args.work)
    elif args.cmd == "check":
        check(args.out, args.video, args.report, args.no_report)
    elif args.cmd == "ranks":
        ranks(args.out, args.world)
    elif args.cmd == "snapshot":
        snapshot(args.wdir, args.file)
    else:
        compare(args.wdir, args.file, args.logs)


if __name__ == "__main__":
    main()
