"""`make demo`: make a sample clip with audio, upscale it x2 with the shipped model on N ranks
on CPU, and write a side-by-side preview picture next to the result.

    python -m vsr_ddp.demo --dir demo_out --nproc 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .plan import probe
from .video import ffmpeg_exe


def make_sample(path: Path, seconds: float = 6.0, size: str = "320x180", fps: str = "30000/1001") -> Path:
    """A test pattern with motion and a 440 Hz tone, the kind of clip ffmpeg can make offline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "30", "-c:a", "aac", "-shortest", str(path)]
    subprocess.run(cmd, check=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="demo_out", help="folder for the sample and the results")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    args = ap.parse_args(argv)
    root = Path(args.dir).resolve()
    sample = make_sample(root / "input" / "sample.mp4")
    src = probe(sample)
    print(f"sample: {sample} ({src.frames} frames, {src.width}x{src.height}, {src.fps} fps, audio)")
    out = root / "output"
    # The shipped x2 model (job.model=default); segments of 60 frames so that both ranks get
    # work from the one clip; a side-by-side preview picture beside the video.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "vsr_ddp", "job=upscale", f"input={sample}", f"output={out}", "job.model=default",
           "job.preview=true", "work.segment_frames=60", "device=cpu"]
    print("running:", " ".join(cmd), flush=True)
    status = subprocess.run(cmd).returncode
    if status != 0:
        print(f"demo failed (exit status {status}); logs in {out / '.vsr_ddp' / 'logs'}", file=sys.stderr)
        return status
    res = probe(out / "sample.mp4")
    report = json.loads((out / "run_report.json").read_text())
    print(f"result: {out / 'sample.mp4'} ({res.frames} frames, {res.width}x{res.height}, {res.fps} fps, "
          f"audio streams {len(res.audio)}); report: {out / 'run_report.json'} -> "
          f"{[v['status'] for v in report['videos']]}; preview: {report['videos'][0].get('preview')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
