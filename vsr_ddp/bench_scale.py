"""``python -m vsr_ddp.bench --jobs scale``: what the bookkeeping costs at scale, beside plain ffmpeg.

1. Short clips (``--scale-clips``, 1,000 of 8 frames in a folder tree), bicubic x2 on 2 ranks
   (torchrun, gloo): the job's cost per clip beyond its start-up (a run of one clip), against
   ffmpeg doing the same resize on the same files, two at a time; the same command again on the
   finished folder (a Slurm requeue); the files left in the output per clip.
2. One long video (``--scale-frames``, 100,000 frames): the job against one ffmpeg pass, and its
   merge against a stream copy of its output with faststart.
3. A simulated plan (``--sim-clips``, 100,000 clips; no files read, no decoding): the real plan,
   work board, leases, bundle sidecars and report, with ranks as threads over one store, a stub
   that writes each clip's output; file-system calls per unit counted with ``strace -c -f``
   (2 and 8 ranks), and the plan, claim and report steps timed at a tenth and at the full size.

Every figure goes to docs/benchmarks.md with the machine and the command.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

SIM = "vsr_ddp.bench_scale"
FILE_CALLS = ("openat", "open", "stat", "newfstatat", "statx", "lstat", "fstatat64", "rename", "renameat",
              "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat", "utimensat", "getdents64", "access",
              "faccessat", "faccessat2", "readlink", "readlinkat")


def _ffmpeg() -> str:
    from .video import ffmpeg_exe

    return ffmpeg_exe()


def make_clip(path: Path, frames: int, size: str = "64x48", audio: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
           "-i", f"testsrc2=size={size}:rate=25:duration={frames / 25:.3f}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={frames / 25:.3f}",
                "-c:a", "aac"]
    cmd += ["-frames:v", str(frames), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            str(path)]
    subprocess.run(cmd, check=True)
    return path


def job(inp: Path, out: Path, nproc: int = 2, extra: tuple = ()) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vsr_ddp", "job=upscale", f"input={inp}", f"output={out}", "job.model=bicubic",
           "job.scale=2", "device=cpu", "log.progress=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scale bench job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def ffmpeg_resize(src: Path, dst: Path, crf: int = 18, preset: str = "medium") -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
                    "-vf", "scale=2*iw:2*ih:flags=bicubic", "-c:v", "libx264", "-crf", str(crf),
                    "-preset", preset,
                    "-pix_fmt", "yuv420p", "-c:a", "copy", "-movflags", "+faststart", str(dst)], check=True)


def files_under(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def short_clips(root: Path, clips: int) -> dict:
    """Part 1: many short clips, against ffmpeg two at a time."""
    src = root / "clips"
    one = make_clip(root / "one" / "c.mp4", 8)
    for k in range(clips):
        dst = src / f"{k // 100:02d}" / f"c{k:05d}.mp4"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(one, dst)
    startup = job(one.parent, root / "out_one")
    wall = job(src, root / "out")
    again = job(src, root / "out")
    inputs = sorted(src.rglob("*.mp4"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: ffmpeg_resize(p, root / "ff" / p.relative_to(src)), inputs))
    ff = time.perf_counter() - t0
    per_clip = (wall - startup) / (clips - 1)
    left = files_under(root / "out")
    report = json.loads((root / "out" / "run_report.json").read_text())
    return {"clips": clips, "startup_s": round(startup, 2), "job_s": round(wall, 2),
            "job_per_clip_ms": round(1000 * per_clip, 1), "ffmpeg_s": round(ff, 2),
            "ffmpeg_per_clip_ms": round(1000 * ff / clips, 1), "ratio": round(per_clip / (ff / clips), 2),
            "again_s": round(again, 2), "again_beyond_startup_s": round(again - startup, 2),
            "files_left": left, "files_per_clip": round(left / clips, 3), "ok": report["totals"]["ok"]}


def long_video(root: Path, frames: int) -> dict:
    """Part 2: one long video, against one ffmpeg pass; its merge against a stream copy."""
    src = make_clip(root / "long" / "long.mp4", frames)
    wall = job(src.parent, root / "out_long")
    entry = json.loads((root / "out_long" / "run_report.json").read_text())["videos"][0]
    t0 = time.perf_counter()
    ffmpeg_resize(src, root / "ff_long" / "long.mp4")
    ff = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-i", entry["output"],
                    "-c", "copy",
                    "-movflags", "+faststart", str(root / "copy.mp4")], check=True)
    copy = time.perf_counter() - t0
    return {"frames": frames, "job_s": round(wall, 2), "ffmpeg_s": round(ff, 2), "ratio": round(wall / ff, 2),
            "merge_s": entry["merge_seconds"], "stream_copy_s": round(copy, 2),
            "merge_ratio": round(entry["merge_seconds"] / copy, 2),
            "output_mb": round(Path(entry["output"]).stat().st_size / 2**20, 1)}


# -- part 3: the simulated plan ------------------------------------------------------------------

def simulate(folder: Path, clips: int, world: int, passes: int = 1) -> dict:
    """The bookkeeping of a ``clips``-clip plan on ``world`` ranks (threads over one store): the
    real plan and bundling, work board, leases, bundle sidecars and report parts; a stub makes a
    bundle by writing its clips' outputs (a few bytes each) and its sidecar. ``passes=2`` runs the
    same plan again on the finished folder (a requeue). Returns the steps' seconds."""
    import torch.distributed as tdist

    from . import claims, shards
    from .dist import Dist
    from .merge import Reports, entry, write_report
    from .plan import VideoInfo, bundle_units, plan_units
    from .work import Board, State, work

    out = folder / "out"
    times = {}
    t0 = time.perf_counter()
    videos = [VideoInfo(path=f"/sim/{k // 1000:03d}/c{k:07d}.mp4", frames=8, fps=Fraction(25), width=64,
                        height=48, codec="h264", rel=f"{k // 1000:03d}/c{k:07d}") for k in range(clips)]
    units = bundle_units(plan_units(videos, "segment", 600, 0), videos, 600,
                         lambda rels: shards.bundle_key(rels, "2x"))
    from .plan import Plan

    plan = Plan(videos=videos, failed={}, units=units)
    times["plan_s"] = time.perf_counter() - t0
    for n in range(passes):
        store = tdist.HashStore()
        run = f"sim{n:09d}"
        runs = shards.runs_dir(out)
        runs.mkdir(parents=True, exist_ok=True)
        errors = []

        def rank_main(rank: int) -> None:
            try:
                ctx = Dist(rank=rank, world=world, _store=store)
                leases = claims.Leases(run, rank, timeout_s=300, runs=runs)
                reports = Reports(out, run, rank)
                board = Board(plan, ctx, leases, wdir=lambda u: shards.bundle_dir(out, u.key),
                              sig=lambda u: "sim", live=lambda r: r == run, merged=lambda vi: None,
                              bundle_rels=lambda u: [videos[v].rel for v in u.clips])

                def settle(unit, side):
                    for clip in side["clips"]:
                        reports.add(entry(clip["input"], "ok", output=clip["output"], frames=8))
                    board.settle(len(side["clips"]))

                def handle(i, state, found, watching):
                    unit = plan.units[i]
                    if state is State.DONE:
                        settle(unit, found)
                        return True
                    wdir = shards.bundle_dir(out, unit.key)
                    lease = shards.lease_path(wdir, unit)
                    lease.parent.mkdir(parents=True, exist_ok=True)
                    if not leases.acquire(lease, what=unit.key):
                        board.watch(i)
                        return False
                    try:
                        clips_made = []
                        for vi in unit.clips:
                            dst = shards.output_path(out, videos[vi])
                            dst.parent.mkdir(parents=True, exist_ok=True)
                            dst.write_bytes(b"stub output")
                            clips_made.append({"rel": videos[vi].rel, "input": videos[vi].path,
                                               "status": "ok",
                                               "output": str(dst), "size": 11, "frames": 8})
                        side = shards.write_bundle(wdir, unit, signature="sim", clips=clips_made, rank=rank,
                                                   host="sim", seconds=0.0, run=run)
                    finally:
                        leases.release(lease)
                    settle(unit, side)
                    return True

                work(board, "dynamic", handle, poll_s=0.5)
                reports.close()
                leases.close()
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        times[f"claim_s_pass{n + 1}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts = shards.report_parts(out, run)
        totals = write_report(parts, out / "run_report.json")
        for part in parts:
            part.unlink()
        times[f"report_s_pass{n + 1}"] = time.perf_counter() - t0
        assert totals["ok"] == clips, totals
    return {"clips": clips, "units": len(units), "world": world,
            **{k: round(v, 3) for k, v in times.items()}}


def strace_counts(clips: int, world: int, passes: int) -> dict:
    """File-system system calls of a simulated plan (``strace -c -f``), less those of an empty one."""
    if shutil.which("strace") is None:
        return {"error": "strace not installed"}

    def calls(n: int) -> dict:
        with tempfile.TemporaryDirectory() as d:
            log = Path(d) / "strace.txt"
            subprocess.run(["strace", "-f", "-c", "-o", str(log), sys.executable, "-m", SIM,
                            "--simulate", str(n),
                            "--world", str(world), "--passes", str(passes), "--dir", d], check=True,
                           capture_output=True)
            counts = {}
            for line in log.read_text().splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m and m.group(2) in FILE_CALLS:
                    counts[m.group(2)] = int(m.group(1))
            return counts

    base, full = calls(0), calls(clips)
    return {k: full.get(k, 0) - base.get(k, 0) for k in sorted(set(full) | set(base))
            if full.get(k, 0) - base.get(k, 0)}


def simulated(root: Path, clips: int) -> dict:
    rows = {}
    for n in (clips // 10, clips):
        with tempfile.TemporaryDirectory(dir=root) as d:
            rows[f"{n} clips, 2 ranks"] = simulate(Path(d), n, 2, passes=2)
    units = rows[f"{clips} clips, 2 ranks"]["units"]
    for world in (2, 8):
        counts = strace_counts(clips // 10, world, passes=2)
        total = sum(counts.values())
        rows[f"strace {clips // 10} clips, {world} ranks"] = {
            "calls": counts, "per_unit": round(total / max(1, units // 10), 1),
            "per_clip": round(total / max(1, clips // 10), 2)}
    return rows


def bench_scale(root: Path, clips: int = 1000, frames: int = 100_000, sim_clips: int = 100_000) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    res = {}
    if sim_clips:
        res["simulated"] = simulated(root, sim_clips)
    if clips:
        res["short_clips"] = short_clips(root / "short", clips)
    if frames:
        res["long_video"] = long_video(root / "long", frames)
    return res


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {SIM}")
    ap.add_argument("--simulate", type=int, required=True, help="clips of a simulated plan")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args(argv)
    print(json.dumps(simulate(Path(args.dir), args.simulate, args.world, args.passes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
