"""What every builder shares: the ffmpeg binary imageio-ffmpeg ships (never a system ffmpeg, so
every machine encodes alike), run with frames streamed to its stdin."""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from typing import Iterable

import imageio_ffmpeg
import numpy as np

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _run_ffmpeg(args: list[str], frames: Iterable[np.ndarray] = ()) -> None:
    """Run the bundled ffmpeg, streaming frames (rgb24) to its stdin; raise on failure."""
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args]
    # stderr goes to a file, not a pipe, so a chatty ffmpeg cannot deadlock our writes
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            for frame in frames:
                proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:  # ffmpeg quit early; its exit code and stderr say why
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait()
        if rc:
            err.seek(0)
            raise RuntimeError(f"ffmpeg exited {rc}: {cmd}\n{err.read().decode(errors='replace')}")
