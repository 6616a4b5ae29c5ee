"""`make bench`: how close the upscale job runs to the speed of its model, and how it scales.

    python -m vsr_ddp.bench                      # CPU here: random-weight Compact model, 1 and 2 ranks
    python -m vsr_ddp.bench --nproc 8 --size 1280x720 --model /models/realesr-animevideov3.pth

For one model and one clip it measures: the model alone on pre-decoded frames (frames/s), the
whole job through the command line with 1 rank and with N ranks (frames/s in steady state, from
the sidecars, and over the whole wall time including start-up and merge), the share of each
stage, peak host RSS and GPU memory, the merge's share of the job, and peak RSS for a clip 10x
longer. It prints one table per run and writes bench.json. A benchmark, not a test: it
asserts nothing. For job=propagate and job=sim2real it times their model stages alone
(:func:`bench_propagation`, :func:`bench_sim2real`); for temporal models, what a segment's
warm-up buys (:func:`bench_warmup`) and the temporal quality report (:func:`bench_temporal`); for
FlashVSR (``--jobs flashvsr,flashvsr-warmup``) its frames/s and peak memory (:func:`bench_flashvsr`)
and what a segment's warm-up buys it (:func:`bench_flashvsr_warmup`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import shards
from .config import shipped
from .demo import make_pattern
from .models.ebsynth import SynthParams, max_levels
from .plan import probe
from .video import FrameReader


def make_compact(path: Path, scale: int, num_feat: int, num_conv: int, seed: int = 0) -> Path:
    """A random-weight SRVGGNetCompact (Real-ESRGAN's compact video model) saved in its layout."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact  # spandrel ships the arch

    torch.manual_seed(seed)
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def model_only(model: str, clip: Path, batch: int, device: torch.device, precision: str) -> dict:
    """The model on frames already in memory: the ceiling for the job."""
    from .models.sr import Upscaler

    info = probe(clip)
    frames = np.concatenate(list(FrameReader(info).read(0, info.frames)))  # (N, H, W, 3) uint8
    up = Upscaler(model, device=device, batch_size=batch, precision=precision)
    up(frames[:batch])  # warm-up: allocations, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        up(frames[i:i + batch])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"frames": len(frames), "seconds": round(seconds, 3), "fps": round(len(frames) / seconds, 3)}


def run_job(model: str, clip: Path, out: Path, nproc: int, batch: int, segment_frames: int,
            device: str, precision: str, extra: tuple[str, ...] = ()) -> dict:
    """The job through its command line; figures from the wall clock, the sidecars, the report."""
    args = ["job=upscale", f"input={clip}", f"output={out}", f"job.model={model}", f"job.batch_size={batch}",
            f"job.precision={precision}", f"work.segment_frames={segment_frames}", f"device={device}",
            "log.progress=false", "work.keep_shards=true", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "vsr_ddp", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vsr_ddp", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "run_report.json").read_text())["videos"][0]
    sides = [json.loads(p.read_text()) for p in shards.sidecar_files(out)]
    for p in shards.bundle_sidecars(out):  # whole short videos: one shard a clip, remuxed to its output
        bundle = json.loads(p.read_text())
        sides += [{**c["shard"], "frames_written": c["frames"], "rank": bundle["rank"]}
                  for c in bundle["clips"] if c["status"] == "ok"]
    frames = sum(s["frames_written"] for s in sides)
    per_rank: dict[int, float] = {}
    for s in sides:
        per_rank[s["rank"]] = per_rank.get(s["rank"], 0.0) + s["stages"]["wall_s"]
    steady = max(per_rank.values())  # the busiest rank decides when the work is done
    stage_total = sum(s["stages"]["wall_s"] for s in sides)
    share = {k: round(sum(s["stages"][k] for s in sides) / stage_total, 3)
             for k in ("decode_s", "model_s", "encode_s", "model_starved_s")}
    return {
        "ranks": nproc, "frames": frames, "wall_s": round(wall, 2),
        "fps_steady": round(frames / steady, 3), "fps_wall": round(frames / wall, 3),
        "stage_share": share, "merge_s": report.get("merge_seconds"),
        "merge_share": round((report.get("merge_seconds") or 0) / wall, 4),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in sides),
        "peak_gpu_mb": max((s.get("peak_gpu_mb", 0) for s in sides), default=0) or None,
        "busy_s_per_rank": {r: round(busy, 2) for r, busy in sorted(per_rank.items())},
        "frames_per_rank": {r: sum(s["frames_written"] for s in sides if s["rank"] == r)
                            for r in sorted(per_rank)},
    }


def bench_balance(args, root: Path, model: str, device: torch.device) -> dict:
    """Load balance on a batch whose videos' lengths differ ``args.long`` times (long, short, long,
    short): whole-video units claimed rank-strided (rank 0 gets both long ones) and dynamically.
    The figure: the busiest rank's work over the ideal, total work / ranks."""
    batch = root / "balance_in"
    batch.mkdir(exist_ok=True)
    short_s = max(1, args.frames // args.long) * 1001 / 30000 + 0.001
    for n, seconds in enumerate((args.long * short_s, short_s, args.long * short_s, short_s)):
        make_pattern(batch / f"v{n}.mp4", seconds=seconds, size=args.size, fps="30000/1001")
    dev_arg = "cuda" if device.type == "cuda" else "cpu"
    nproc = min(args.nproc, torch.cuda.device_count()) if device.type == "cuda" else args.nproc
    out = {}
    for claim in ("strided", "dynamic"):
        r = run_job(model, batch, root / f"out_balance_{claim}", nproc, args.batch, 10 ** 6, dev_arg,
                    args.precision, extra=("work.unit=video", "work.bundle_frames=1", f"work.claim={claim}"))
        busy = r["busy_s_per_rank"]
        ideal = sum(busy.values()) / nproc
        out[claim] = {"frames_per_rank": r["frames_per_rank"], "busy_s_per_rank": busy,
                      "busiest_over_ideal": round(max(busy.values()) / ideal, 3), "wall_s": r["wall_s"]}
    return out


def table(title: str, rows: list[tuple[str, object]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"### {title}", *(f"  {k:<{w}}  {v}" for k, v in rows)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench_out", help="work folder (clips, outputs, bench.json)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks for the multi-rank run")
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--size", default="256x144", help="input size WxH")
    ap.add_argument("--model", default="compact",
                    help="'compact' (random weights, built here) or a checkpoint")
    ap.add_argument("--scale", type=int, default=2, help="scale of the built compact model")
    ap.add_argument("--feat", type=int, default=32, help="features of the built compact model")
    ap.add_argument("--conv", type=int, default=16, help="conv layers of the built compact model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--long", type=int, default=10, help="the long clip is this many times the short one")
    ap.add_argument("--jobs", default="upscale,balance,reader,propagate,interpolate,warmup,temporal,sim2real",
                    help="which to measure; sim2real runs only on CUDA (SD 1.5-sized random weights); "
                         "interpolate times rife-hdv3 when it is fetched; also flashvsr (frames/s: a tiny "
                         "random configuration on the CPU, the published 1.3B shapes on CUDA) and "
                         "flashvsr-warmup (what a segment's warm-up buys); scale (bookkeeping at scale "
                         "beside plain ffmpeg: vsr_ddp.bench_scale)")
    ap.add_argument("--scale-clips", type=int, default=1000, help="--jobs scale: short clips")
    ap.add_argument("--scale-frames", type=int, default=100_000, help="--jobs scale: long video's frames")
    ap.add_argument("--sim-clips", type=int, default=100_000, help="--jobs scale: simulated clips")
    args = ap.parse_args(argv)
    jobs = set(args.jobs.split(","))
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({os.cpu_count()} cores)")
    model = args.model
    if model == "compact":
        model = str(make_compact(root / "compact.safetensors", args.scale, args.feat, args.conv))
    fps = "30000/1001"
    short = make_pattern(root / "short.mp4", seconds=args.frames * 1001 / 30000 + 0.001, size=args.size,
                         fps=fps)
    n_short = probe(short).frames
    seg = max(1, -(-n_short // (2 * max(2, args.nproc))))  # about two segments per rank
    results = {"device": dev_name, "model": args.model if args.model != "compact" else
               f"random SRVGGNetCompact x{args.scale}, {args.feat} features, {args.conv} convs",
               "input": f"{args.size}, {n_short} frames", "batch": args.batch}
    print(f"vsr_ddp bench on {dev_name}: {results['model']}, input {results['input']}", flush=True)

    if "upscale" in jobs:
        bench_upscale(args, root, model, short, n_short, seg, device, results)
    if "balance" in jobs:
        r = results["balance"] = bench_balance(args, root, model, device)
        print(table(f"load balance: 4 whole videos (long, short, long, short; {args.long}x apart) on "
                    f"{args.nproc} ranks", [(k, v) for k, v in r.items()]), flush=True)
    if "reader" in jobs:
        r = results["reader"] = bench_reader(root)
        print(table("reading 600 frames of 1280x720 at 80 frames/s (a consumer slower than decoding)",
                    [(k, f"peak RSS {v['peak_rss_mb']:.0f} MB, {v['seconds']:.1f} s") for k, v in r.items()]),
              flush=True)
    if "propagate" in jobs:
        r = results["propagate"] = bench_propagation(size=512, frames=2, device=device)
        print(table("propagate (EbSynth) at 512x512", [(k, v) for k, v in r.items()]), flush=True)
    if "interpolate" in jobs:
        size = (1920, 1080) if device.type == "cuda" else (320, 180)
        r = results["interpolate"] = bench_interpolate(size, device)
        print(table(f"interpolate (midpoints of a real pan) at {size[0]}x{size[1]}",
                    [(k, v) for k, v in r.items()]), flush=True)
    if "warmup" in jobs:
        r = results["warmup"] = bench_warmup(device=device)
        print(table("temporal warm-up: recurrent models (AnimeSR's network: random x4, shipped x2) at "
                    "128x72, a segment's first frame against the whole run", [(k, v) for k, v in r.items()]),
              flush=True)
    if "temporal" in jobs:
        r = results["temporal"] = bench_temporal(device=device)
        print(temporal_table(r), flush=True)
    if "flashvsr" in jobs:
        r = results["flashvsr"] = bench_flashvsr(device)
        print(table("FlashVSR (job.model=flashvsr, tiny mode, random weights): x4 streaming, whole range",
                    [(k, v) for k, v in r.items()]), flush=True)
    if "flashvsr-warmup" in jobs:
        r = results["flashvsr-warmup"] = bench_flashvsr_warmup()
        print(table("FlashVSR segment warm-up (tiny random model, dim 128, 64x48 -> 256x192, CPU): a "
                    "segment's first owned frame (72) against the whole run", [(k, v) for k, v in r.items()]),
              flush=True)
    if "sim2real" in jobs and device.type == "cuda":
        r = results["sim2real"] = bench_sim2real(size=512, frames=8, steps=20, device=device)
        print(table("sim2real (FRESCO keyframes, SD 1.5-sized random weights) at 512x512, batch 8",
                    [(k, v) for k, v in r.items()]), flush=True)
    if "scale" in jobs:
        from .bench_scale import bench_scale

        r = results["scale"] = bench_scale(root / "scale", args.scale_clips, args.scale_frames,
                                           args.sim_clips)
        for part, rows in r.items():
            print(table(f"scale: {part}", [(k, v) for k, v in rows.items()]), flush=True)
    (root / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {root / 'bench.json'}")
    return 0


# --- Temporal models: what a segment's warm-up buys -----------------------------------------------

def bench_warmup(size: tuple[int, int] = (128, 72), frames: int = 48, start: int = 40,
                 warmups=(0, 1, 2, 4, 8, 16, 32), seed: int = 0, device: torch.device | None = None) -> dict:
    """Recurrent models over the natural-picture pan of ``make demo``: AnimeSR's network at x4 with
    random weights from ``seed``, and the shipped trained one (``job.model=default-temporal``, x2).
    For each: the whole clip fed from frame 0, then a segment starting at ``start`` fed from
    ``start - W`` for each warm-up W; the difference of the segment's first owned frame to the whole
    run's (uint8 levels: max and mean), and the model time the warm-up adds."""
    from .demo import natural_frames
    from .models.animesr import MSRSWVSR, AnimeSR
    from .models.sr import DEFAULT_TEMPORAL
    from .models.temporal import load_temporal

    device = device or torch.device("cpu")
    clip = np.stack(list(natural_frames(frames, size)))  # (T, H, W, 3) uint8
    torch.manual_seed(seed)
    models = {"AnimeSR x4, random weights": AnimeSR(MSRSWVSR().eval()).to(device, torch.float32),
              "default-temporal x2, trained": load_temporal(DEFAULT_TEMPORAL, device)}
    out = {}
    for name, model in models.items():
        model.start()
        t0 = time.perf_counter()
        whole = model.feed(clip, last=True)  # (T, sH, sW, 3)
        per_frame_s = (time.perf_counter() - t0) / frames
        for w in warmups:
            if w > start:
                continue
            model.start()
            seg = model.feed(clip[start - w:start + 2], last=True)  # frame start + 1: its next neighbour
            diff = np.abs(seg[w].astype(np.int16) - whole[start].astype(np.int16))
            out[f"{name}: W={w}"] = {"max": int(diff.max()), "mean": round(float(diff.mean()), 3),
                                     "extra model s per segment": round(w * per_frame_s, 3)}
    return out


FLASHVSR_TINY = dict(dim=128, num_heads=1, num_layers=2, ffn_dim=256, text_dim=64, freq_dim=32)
"""The tiny random FlashVSR of the CPU figures: one head of 128 (the published head width), two blocks."""


def bench_flashvsr(device: torch.device, frames: int = 41, size: tuple[int, int] | None = None,
                   sizes=((352, 192), (480, 270))) -> dict:
    """FlashVSR's tiny pipeline (job.model=flashvsr) fed one read range of ``frames`` frames of the
    natural-picture pan, x4: frames/s of the whole range (the first window included) after one
    untimed run, and on CUDA the peak memory. On the CPU a tiny random configuration
    (:data:`FLASHVSR_TINY`, LR ``size``, default 64x48); on CUDA the published shapes (Wan 2.1 1.3B,
    the published projector and decoder) with random weights in bf16, built on the device, at LR
    352x192 (768x1408 out) and 480x270 (1920x1080 out), each where memory allows."""
    from .demo import natural_frames
    from .models.flashvsr.dit import DiTConfig
    from .models.flashvsr.pipeline import random_flashvsr

    out = {}
    if device.type != "cuda":
        w, h = size or (64, 48)
        model = random_flashvsr(DiTConfig(**FLASHVSR_TINY), lq_hidden=(16, 24),
                                decoder_channels=(16, 12, 8, 8), prompt_tokens=8, device=device,
                                dtype=torch.float32)
        runs = [(f"tiny random configuration, CPU: {w}x{h} -> {4 * w}x{4 * h}", model, (w, h))]
    else:
        model = random_flashvsr(device=device, dtype=torch.bfloat16)
        runs = [(f"published 1.3B shapes, random weights, bf16: {w}x{h} -> {4 * w}x{4 * h}", model, (w, h))
                for w, h in ([size] if size else sizes)]
    for label, model, (w, h) in runs:
        clip = np.stack(list(natural_frames(frames, (w, h))))  # (T, H, W, 3) uint8
        try:
            model.start()
            model.feed(clip[:model.first_window], last=True)  # untimed: kernels, allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            model.start()
            made = model.feed(clip, last=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            out[label] = {"skipped": "out of memory"}
            torch.cuda.empty_cache()
            continue
        row = {"frames": len(made), "seconds": round(seconds, 2), "frames/s": round(len(made) / seconds, 2)}
        if device.type == "cuda":
            row["peak GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out[label] = row
    return out


def bench_flashvsr_warmup(layers=(1, 2, 30), warmups=(0, 8, 16, 24, 32, 40, 48, 64), start: int = 72,
                          owned: int = 16, size: tuple[int, int] = (64, 48)) -> dict:
    """What a segment's warm-up buys FlashVSR (job.warmup; FlashVSRTiny.default_warmup), on the CPU in
    float32: tiny random models (:data:`FLASHVSR_TINY` with ``layers`` blocks; 30 is the published
    depth) over the natural-picture pan at ``size``; the whole clip fed from frame 0, then a segment
    owning [start, start + owned) read from start - W with the job's noise rule (first_frame) and 9
    frames past its end; the difference of its first owned frame (and of all its owned frames) to the
    whole run's, in uint8 levels."""
    from .demo import natural_frames
    from .models.flashvsr.dit import DiTConfig
    from .models.flashvsr.pipeline import random_flashvsr

    n = start + owned + 9
    clip = np.stack(list(natural_frames(n, size)))
    out = {}
    for depth in layers:
        model = random_flashvsr(DiTConfig(**{**FLASHVSR_TINY, "num_layers": depth}), lq_hidden=(16, 24),
                                decoder_channels=(16, 12, 8, 8), prompt_tokens=8, attention="sparse")
        model.start()
        whole = model.feed(clip, last=True)
        for w in warmups:
            model.start(first_frame=start - w)
            seg = model.feed(clip[start - w:], last=True)[w:w + owned]
            first = np.abs(seg[0].astype(np.int16) - whole[start].astype(np.int16))
            every = np.abs(seg.astype(np.int16) - whole[start:start + owned].astype(np.int16))
            out[f"{depth} block(s): W={w}"] = {"max": int(first.max()), "mean": round(float(first.mean()), 4),
                                               "owned max": int(every.max()),
                                               "owned mean": round(float(every.mean()), 4)}
    return out


def temporal_clip(frames: int, size: tuple[int, int]) -> np.ndarray:
    """# (T, H, W, 3) uint8 ground truth for :func:`bench_temporal`: ``make demo``'s natural-picture
    pan and zoom, its left quarter held at frame 0's picture (a locked-off region: flicker is
    measured there)."""
    from .demo import natural_frames

    clip = np.stack(list(natural_frames(frames, size)))
    clip[:, :, :size[0] // 4] = clip[0, :, :size[0] // 4]
    return clip


def bench_temporal(size: tuple[int, int] = (384, 216), frames: int = 48, segment: int = 8, warmup: int = 16,
                   noise: float = 2.0, seed: int = 0, device: torch.device | None = None) -> dict:
    """Temporal quality (issue 24 item 4) on a real clip with ground truth: :func:`temporal_clip` at
    ``size`` is the ground truth, its x4 reduction (cv2.INTER_AREA) the input, once clean and once
    with Gaussian noise of ``noise`` levels per pixel (seeded; a stand-in for sensor noise, which a
    per-frame model turns into flicker). Outputs at x4: bicubic, the shipped x2 model followed by
    bicubic x2, the shipped temporal x2 model (default-temporal) followed by bicubic x2, and
    AnimeSR's network with random weights from ``seed`` (the tooling, not a quality claim). Each:
    PSNR to the ground truth (dB), warping error (levels; flow t+1 -> t by DIS on the ground truth,
    shared by all outputs), flicker in the ground truth's static pixels (levels);
    the ground truth's own figures are the floor. Then the seam check: AnimeSR run as the job
    runs it, in segments of ``segment`` frames each fed from ``start - warmup`` (context outputs
    dropped), against the whole run, also with no warm-up for contrast."""
    import cv2

    from .models.animesr import MSRSWVSR, AnimeSR
    from .models.sr import DEFAULT_TEMPORAL, Upscaler
    from .models.temporal import load_temporal
    from .temporal_metrics import flicker, pair_flows, psnr, seams, static_mask, warping_error

    device = device or torch.device("cpu")
    w, h = size
    t0 = time.perf_counter()
    gt = temporal_clip(frames, size)
    lr = np.stack([cv2.resize(f, (w // 4, h // 4), interpolation=cv2.INTER_AREA) for f in gt])
    rng = np.random.default_rng(seed)
    inputs = {"clean": lr, f"noise {noise:g}": np.clip(np.rint(lr + rng.normal(0, noise, lr.shape)),
                                                       0, 255).astype(np.uint8)}
    flows = pair_flows(gt)
    still = static_mask(gt)
    bicubic4 = Upscaler("bicubic", device=device, scale=4)
    bicubic2 = Upscaler("bicubic", device=device, scale=2)
    per_frame = Upscaler("default", device=device, batch_size=8)
    torch.manual_seed(seed)
    animesr = AnimeSR(MSRSWVSR().eval()).to(device, torch.float32)

    def recurrent(clip):
        animesr.start()
        return animesr.feed(clip, last=True)

    shipped_temporal = load_temporal(DEFAULT_TEMPORAL, device)

    def shipped_recurrent(clip):
        shipped_temporal.start()
        return shipped_temporal.feed(clip, last=True)

    models = {"bicubic x4": bicubic4, "shipped x2 model + bicubic x2": lambda x: bicubic2(per_frame(x)),
              "shipped temporal x2 + bicubic x2": lambda x: bicubic2(shipped_recurrent(x)),
              "AnimeSR net, random weights": recurrent}

    def figures(out):
        return {"psnr_db": round(psnr(out, gt), 2), "warping_error": round(warping_error(out, flow=flows), 3),
                "flicker_static": round(flicker(out, still), 3)}

    out = {"size": f"{w // 4}x{h // 4} -> {w}x{h}", "frames": frames,
           "static_share": round(float(still.mean()), 3),
           "ground truth": {"psnr_db": None, "warping_error": round(warping_error(gt, flow=flows), 3),
                            "flicker_static": round(flicker(gt, still), 3)}}
    for name, run in models.items():
        for kind, clip in inputs.items():
            out[f"{name} ({kind})"] = figures(run(clip))
    whole = recurrent(lr)
    starts = list(range(0, frames, segment))
    for w_ in (warmup, 0):
        parts = []
        for s in starts:
            a, b = max(0, s - w_), min(frames, s + segment + animesr.reach.after)
            parts.append(recurrent(lr[a:b])[s - a:s - a + segment])  # context outputs dropped
        segmented = np.concatenate(parts)
        found = seams(segmented, whole, starts)
        diff = np.abs(segmented.astype(np.int16) - whole.astype(np.int16))
        out[f"seams W={w_}"] = {"segment": segment, "per_start": found, "max_at_starts": max(found.values()),
                                "max_any_frame": int(diff.max()),
                                "mean_any_frame": round(float(diff.mean()), 4)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def temporal_table(r: dict) -> str:
    rows = [(k, f"PSNR {'-' if v['psnr_db'] is None else v['psnr_db']} dB, warping error "
                f"{v['warping_error']:.3f}, flicker {v['flicker_static']:.3f}")
            for k, v in r.items() if isinstance(v, dict) and "warping_error" in v]
    rows += [(k, f"max {v['max_at_starts']} at starts {v['per_start']}, max {v['max_any_frame']} "
                 f"mean {v['mean_any_frame']} over all frames")
             for k, v in r.items() if k.startswith("seams")]
    return table(f"temporal quality at x4, {r['size']}, {r['frames']} frames (levels; random weights: the "
                 f"tooling, not a quality claim; {r['static_share']:.0%} static, {r['seconds']} s)", rows)


# --- Propagation and sim2real: the model stages alone ---------------------------------------------

def bench_interpolate(size: tuple[int, int], device: torch.device, pairs: int = 8, batch: int = 4) -> dict:
    """Interpolated frames/s of each engine (t = 1/2, pairs batched as the job does) on a camera pan
    over scikit-image's astronaut photograph, after one untimed batch. rife-hdv3 only when fetched."""
    import cv2
    import skimage.data

    from .models import interpolation as interp
    from .models import published

    w, h = size
    photo = cv2.resize(skimage.data.astronaut(), (w * 2, h * 2), interpolation=cv2.INTER_CUBIC)
    frames = np.stack([np.ascontiguousarray(photo[k:k + h, 2 * k:2 * k + w]) for k in range(pairs + 1)])
    a, b = frames[:-1], frames[1:]  # (pairs, H, W, 3) uint8
    preset = shipped("job/interpolate", "flow_preset")  # DIS, as job=interpolate ships it
    engines = {"blend": lambda: interp.Blend(), "flow": lambda: interp.FlowInterp(device, None, preset)}
    try:
        path = published.weights_path("rife-hdv3", published.models_dir())
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        engines["rife-hdv3"] = lambda: interp.Rife(path, device, 1.0 if max(size) <= 2048 else 0.5, dtype)
    except FileNotFoundError as e:
        print(f"interpolate: rife-hdv3 skipped ({e})", flush=True)
    # Practical-RIFE 4.25/4.26's layout with freshly initialised weights: its speed (no published
    # 4.x weights come from the package index); flush-to-zero keeps untrained weights' subnormal
    # products from slowing CPU convs down, which trained weights do not suffer
    from .models.rife import VERSIONS, IFNet4

    torch.manual_seed(0)
    rife4 = Path(tempfile.mkdtemp()) / "flownet.pkl"
    torch.save(IFNet4(VERSIONS["4.25/4.26"]).state_dict(), rife4)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    flow_scale = 1.0 if max(size) <= 2048 else 0.5
    engines["rife-4.26 (speed only)"] = lambda: interp.Rife(rife4, device, flow_scale, dtype)
    torch.set_flush_denormal(True)
    out = {}
    for name, make in engines.items():
        engine = make()
        half = [Fraction(1, 2)] * batch
        engine(a[:batch], b[:batch], half)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for s in range(0, pairs, batch):
            engine(a[s:s + batch], b[s:s + batch], half[:len(a[s:s + batch])])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[f"{name} frames/s"] = round(pairs / (time.perf_counter() - t0), 3)
    torch.set_flush_denormal(False)
    return out


def bench_propagation(size: int = 512, frames: int = 2, device: str | torch.device | None = None,
                      params: SynthParams | None = None, warmup: bool = True) -> dict:
    """Frames/s of keyframe propagation at ``size`` x ``size``, as the job runs it: one key
    interval with ``frames`` frames between its two keys, each synthesized forward and backward
    (DIS flow, Rerender's guides, EbSynth) and blended.

    ``fps`` counts output frames (two syntheses each); ``synth_fps`` single syntheses. Content is
    a smooth random texture panning 2 px/frame, the keys its colour-inverted frames. ``params``
    defaults to FRESCO/Rerender's settings on CUDA and to 2 search-vote x 2 PatchMatch
    iterations on CPU; the dict says which were used. ``warmup`` runs a one-frame interval first
    (CUDA start-up, host buffers).
    """
    import cv2

    from .models.propagation import Propagator

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if params is None:
        cpu = {} if dev.type == "cuda" else {"search_vote_iters": 2, "patchmatch_iters": 2}
        params = SynthParams.shipped(**cpu)
    n = frames + 2
    rng = np.random.default_rng(0)
    big = rng.random((size // 8 + 2, (size + 2 * n) // 8 + 2, 3)).astype(np.float32) * 255
    big = cv2.resize(big, (big.shape[1] * 8, big.shape[0] * 8), interpolation=cv2.INTER_CUBIC)
    clip = np.stack([np.clip(big[:size, 2 * t:2 * t + size], 0, 255).astype(np.uint8) for t in range(n)])
    keys = 255 - clip                                          # (n, size, size, 3) uint8
    prop = Propagator(params, device=dev)
    prop.flow.setup()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if warmup:
        prop(clip[:3], keys[0], keys[2])
    sync()
    t0 = time.perf_counter()
    prop(clip, keys[0], keys[-1])
    sync()
    seconds = time.perf_counter() - t0
    levels = max_levels((size, size), params.patch_size)
    if params.pyramid_levels >= 1:
        levels = min(levels, params.pyramid_levels)
    return {"size": f"{size}x{size}", "device": str(dev), "frames": frames, "seconds": round(seconds, 3),
            "fps": round(frames / seconds, 4), "synth_fps": round(2 * frames / seconds, 4),
            "pyramid_levels": levels, "search_vote_iters": params.search_vote_iters,
            "patchmatch_iters": params.patchmatch_iters, "patch_size": params.patch_size,
            "max_jump": params.max_jump, "flow": prop.flow.kind, "torch_threads": torch.get_num_threads()}


def sd15_random_components(seed: int = 0):
    """Full-size SD 1.5-shaped UNet, ControlNet and VAE with random weights (same memory and speed
    as the real ones, nothing downloaded), a DDPM scheduler with SD 1.5's schedule."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, clip_sample=False)
    return unet, controlnet, vae, scheduler


def bench_sim2real(base_model: str | None = None, controlnet: str | None = None, size: int = 512,
                   frames: int = 8, steps: int = 20, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None, vae_slicing: bool = False, vae_tiling: bool = False,
                   components: tuple | None = None, **settings) -> dict:
    """Time one batch of ``frames`` keyframes at ``size`` x ``size`` and report peak GPU memory.

    With no model paths, SD 1.5-shaped random components (:func:`sd15_random_components`) and
    random prompt embeddings: the speed and memory of the real thing. ``components`` (unet,
    controlnet, vae, scheduler) overrides both, e.g. tiny ones for a CPU smoke run. Other keyword
    arguments go to :class:`FrescoSettings`. Returns a dict of figures (the lead's ``make bench``).
    """
    from dataclasses import asdict

    from .models.fresco import FrescoPipeline, FrescoSettings

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if base_model:
        pipe = FrescoPipeline.from_local(base_model, controlnet, device=device, dtype=dtype)
        embeds = pipe.encode_prompt("a photo of a street, best quality", "lowres, worst quality")
    else:
        unet, cn, vae, scheduler = components or sd15_random_components()
        pipe = FrescoPipeline(unet, cn, vae, None, None, scheduler, device=device, dtype=dtype)
        g = torch.Generator("cpu").manual_seed(0)
        embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    pipe.set_memory_options(vae_tiling=vae_tiling, vae_slicing=vae_slicing)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size + 8 * frames, size + 8 * frames, 3), dtype=np.uint8)
    clip = np.stack([base[4 * i:4 * i + size, 4 * i:4 * i + size] for i in range(frames)])  # a slow pan
    s = FrescoSettings.shipped(steps=steps, batch_size=max(frames, 3), **settings)
    if device.type == "cuda":  # one short untimed pass: kernel loading, cuDNN/SDPA choices, allocator growth
        warm = FrescoSettings(**{**asdict(s), "steps": 1, "strength": 1.0, "batch_size": 3})
        pipe.translate(clip[:3], [0, 1, 2], embeds, warm)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    pipe.translate(clip, list(range(frames)), embeds, s)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "size": size, "frames": frames, "steps": steps,
              "strength": s.strength, "seconds": round(seconds, 3),
              "seconds_per_key": round(seconds / frames, 3),
              "models": "local" if base_model else ("given" if components else "random SD 1.5-shaped")}
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    return result


# Peak RSS sampled from /proc/self/statm: a child's ru_maxrss starts from its parent's at fork.
READER_PROBE = """
import os, sys, time
from vsr_ddp.plan import probe
from vsr_ddp.video import FrameReader
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
reader = FrameReader(probe(sys.argv[1]), backend=sys.argv[2], chunk=8)
t, peak = time.perf_counter(), rss_mb()
for chunk in reader.read(0, 600):
    time.sleep(0.1)  # 80 frames/s: a model stage slower than the decoder
    peak = max(peak, rss_mb())
print(peak, time.perf_counter() - t)
"""


def bench_reader(root: Path) -> dict:
    """Peak host RSS of each reader over 600 frames of 720p taken more slowly than they decode:
    decord's decoder runs ahead and keeps its frames, PyAV decodes as frames are taken."""
    clip = make_pattern(root / "hd.mp4", seconds=1500 * 1001 / 30000, size="1280x720")
    out = {}
    for backend in ("decord", "pyav"):  # each in a fresh process: its peak RSS is its own
        proc = subprocess.run([sys.executable, "-c", READER_PROBE, str(clip), backend], capture_output=True,
                              text=True, check=True)
        rss, seconds = proc.stdout.split()[-2:]
        out[backend] = {"peak_rss_mb": round(float(rss), 1), "seconds": round(float(seconds), 2)}
    return out


def bench_upscale(args, root: Path, model: str, short: Path, n_short: int, seg: int, device: torch.device,
                  results: dict) -> None:
    fps = "30000/1001"
    results["model_only"] = model_only(model, short, args.batch, device, args.precision)
    dev_arg = "cuda" if device.type == "cuda" else "cpu"
    one = run_job(model, short, root / "out1", 1, args.batch, seg, dev_arg, args.precision)
    # one rank per GPU: on a 1-GPU machine there is no N-rank run to measure
    nproc = min(args.nproc, torch.cuda.device_count()) if device.type == "cuda" else args.nproc
    many = (run_job(model, short, root / f"out{nproc}", nproc, args.batch, seg, dev_arg, args.precision)
            if nproc > 1 else None)
    if many is None:
        print(f"N-rank run skipped: {torch.cuda.device_count()} GPU here", flush=True)
    longclip = make_pattern(root / "long.mp4", seconds=args.long * args.frames * 1001 / 30000 + 0.001,
                            size=args.size, fps=fps)
    # same segment size: only the video length differs
    long1 = run_job(model, longclip, root / "out_long", 1, args.batch, seg, dev_arg, args.precision)
    results.update({"one_rank": one, "n_ranks": many, "long_one_rank": long1})

    m = results["model_only"]["fps"]
    for name, r in (("1 rank", one), (f"{nproc} ranks", many), (f"1 rank, {args.long}x longer clip", long1)):
        if r is None:
            continue
        rows = [("frames", r["frames"]), ("end-to-end frames/s (steady, from sidecars)", r["fps_steady"]),
                ("end-to-end frames/s (wall, incl. start-up + merge)", r["fps_wall"]),
                ("stage share of unit wall time",
                 ", ".join(f"{k[:-2]} {v:.0%}" for k, v in r["stage_share"].items())),
                ("peak host RSS per rank", f"{r['peak_rss_mb']:.0f} MB"),
                ("peak GPU memory", f"{r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] else "n/a"),
                ("merge", f"{r['merge_s']:.2f} s = {r['merge_share']:.1%} of job wall")]
        if r["ranks"] == 1:
            rows.insert(2, ("end-to-end / model-only", f"{r['fps_steady'] / m:.3f}"))
        else:
            rows.insert(2, ("scaling efficiency vs N x 1 rank",
                            f"{r['fps_steady'] / (r['ranks'] * one['fps_steady']):.3f}"))
        print(table(name, rows), flush=True)
    print(table("model only (pre-decoded frames)",
                [("frames/s", m), ("frames", results["model_only"]["frames"])]))
    growth = long1["peak_rss_mb"] / one["peak_rss_mb"] - 1
    print(table("memory over video length", [("peak RSS short / long", f"{one['peak_rss_mb']:.0f} / "
                                              f"{long1['peak_rss_mb']:.0f} MB ({growth:+.1%})")]))
    results["summary"] = {"e2e_over_model": round(one["fps_steady"] / m, 3),
                          "scaling_efficiency": None if many is None else
                          round(many["fps_steady"] / (nproc * one["fps_steady"]), 3),
                          "rss_growth_long": round(growth, 4), "merge_share": one["merge_share"]}


if __name__ == "__main__":
    sys.exit(main())
