"""Logging and progress: one log file per rank, only rank 0 on the console, and a tqdm bar on
rank 0 that counts the frames of all ranks (each rank adds to a run-wide counter)."""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

FORMAT = "%(asctime)s [%(who)s] %(levelname)s %(name)s: %(message)s"

# The launch's run id, once the runner knows it: concurrent launches on one output folder append
# to the same rank<N>.log files, and each line says which launch wrote it.
_run = ""
_BASE_FACTORY = logging.getLogRecordFactory()
_handlers: list[logging.Handler] = []  # what setup_logging put on the root logger


def set_run(run_id: str) -> None:
    """Tag every later log line with ``run <id>`` beside the rank."""
    global _run
    _run = run_id


def human_duration(seconds: float | None) -> str:
    """'45 s', '12 min', '1 h 3 min', '2 d 5 h' — what a person reads at a glance; never negative
    (time left that a count beyond its total would make negative is none)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m = s // 60
    if m < 60:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


class _TqdmHandler(logging.StreamHandler):
    """Console lines that do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(log_dir: Path, rank: int, level: str = "INFO") -> Path:
    """``<log_dir>/rank<N>.log`` for every rank (appended across resumes and shared by concurrent
    launches: see :func:`set_run`); console for rank 0."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"rank{rank}.log"
    set_run("")  # a new launch (or sweep point): no run id until the runner has one

    def factory(*args, **kwargs):
        record = _BASE_FACTORY(*args, **kwargs)
        record.who = f"rank {rank} run {_run}" if _run else f"rank {rank}"
        return record

    logging.setLogRecordFactory(factory)  # replaces an earlier run's in this process, never wraps it
    close_logging()
    root = logging.getLogger()
    for h in list(root.handlers):  # whatever else was there (basicConfig's): this run's handlers only
        root.removeHandler(h)
    root.setLevel(level)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(fh)
    _handlers.append(fh)
    if rank == 0:
        ch = _TqdmHandler()
        ch.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        # log.error(..., extra={"console": False}): for the file only (tracebacks behind a
        # one-line console message)
        ch.addFilter(lambda record: getattr(record, "console", True))
        root.addHandler(ch)
        _handlers.append(ch)
    logging.captureWarnings(True)
    return path


def close_logging() -> None:
    """Detach and close the handlers :func:`setup_logging` put on the root logger (the rank log
    file stays complete; a later run or sweep point in this process opens its own)."""
    root = logging.getLogger()
    while _handlers:
        h = _handlers.pop()
        root.removeHandler(h)
        h.close()


class _Bar(tqdm):
    @property
    def format_dict(self):
        d = super().format_dict
        rate = d.get("rate") or (d["n"] / d["elapsed"] if d.get("elapsed") else None)
        left = max(0, d["total"] - d["n"]) / rate if rate and d.get("total") else None
        d["eta"] = human_duration(left)
        return d


class Progress:
    """Run-wide frame progress. Every rank calls :meth:`advance`; rank 0 shows the bar and
    every rank logs a line with frames/s and ETA now and then."""

    def __init__(self, ctx, show_bar: bool, log_every_s: float):
        self.ctx = ctx
        self.log = logging.getLogger("vsr_ddp.progress")
        self.log_every_s = log_every_s
        self._stop = threading.Event()
        self._mine = 0
        self._t0 = time.monotonic()
        self._bar = None
        self._thread = None
        if show_bar:
            self._bar = _Bar(total=0, unit="frame", dynamic_ncols=True, file=sys.stderr, mininterval=0.5,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} frames [{rate_fmt}, ETA {eta}]")

    def add_total(self, frames: int) -> None:
        self.ctx.add("frames_total", frames)

    def start(self) -> None:
        self._refresh()
        self._thread = threading.Thread(target=self._poll, name="progress", daemon=True)
        self._thread.start()

    def advance(self, frames: int) -> None:
        self._mine += frames
        self.ctx.add("frames_done", frames)

    def _poll(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(0.5):
            self._refresh()
            if time.monotonic() - last_log >= self.log_every_s:
                last_log = time.monotonic()
                self._log_line()

    def _refresh(self) -> None:
        if self._bar is None:
            return
        total, done = self.ctx.add("frames_total", 0), max(self.ctx.add("frames_done", 0), 0)
        self._bar.total = max(total, done)
        self._bar.update(done - self._bar.n)

    def _log_line(self, last: bool = False) -> None:
        # The runner keeps done <= total (a unit's frames are on the bar only while it is in the
        # total); a moment's overlap (a rank takes a unit off the total as another commits it and
        # puts it back) shows as done == total, never beyond it, nor as a negative count.
        total, done = self.ctx.add("frames_total", 0), self.ctx.add("frames_done", 0)
        if last and done > total:  # once every rank is through: a counting bug, for the log file
            self.log.warning("progress: %d frames counted for a total of %d", done, total,
                             extra={"console": False})
        done = max(done, 0)
        total = max(total, done)
        elapsed = time.monotonic() - self._t0
        rate = self._mine / elapsed if elapsed > 0 else 0.0
        all_rate = done / elapsed if elapsed > 0 else 0.0
        eta = human_duration((total - done) / all_rate) if all_rate > 0 else "?"
        self.log.info("this rank %d frames (%.2f frames/s); all ranks %d/%d frames, ETA %s",
                      self._mine, rate, done, total, eta)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._refresh()
        self._log_line(last=True)
        if self._bar is not None:
            self._bar.close()
