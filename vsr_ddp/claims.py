"""Sharing one output folder between launches: leases on units and merges, and the runs that hold them.

Within one run the ranks draw units in plan order from a counter in the rendezvous store
(runner.py). Across runs, launched at different times, with different numbers of ranks, on other
nodes, each unit has at most one writer at a time because writing it needs its *lease*:

    <work dir>/segment_0003.lease     {"run", "rank", "host", "pid", "token", "since", "what"}
    <work dir>/merge.lease            the same, for the rank that merges the video
    <output>/.vsr_ddp/runs/<run>.json one per live run: its settings, world, hosts (rank 0's lease)

A lease is a file created with O_CREAT | O_EXCL (one creator wins, on local disks, NFSv3+ and
Lustre alike). Its holder renews it by touching it every ``renew_s`` from a background thread,
so a lease whose file was not touched for ``timeout_s`` belongs to a holder that died (killed,
node lost) and is taken over (measured by the observer's own clock too, so hosts need not agree
on the time: :func:`stale_reason`); so is one whose holder ran on this host under a process id that no
longer exists, at once, which is what a rerun after a kill finds, and one whose launch's rank 0
is known dead. Taking over: the first to create ``<lease>.takeover-<its token>`` (O_EXCL again)
renames a lease of its own over the stale one; the others give up. A holder that finds its lease
gone or replaced when renewing has lost it, and abandons the unit before committing it.

No torch here: ``python -m vsr_ddp.status`` reads the same files on a login node.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .atomic import read_json, warn_damaged

log = logging.getLogger(__name__)

LEASE_SUFFIX = ".lease"
UNREADABLE_S = 5.0  # an unreadable lease unchanged this long (three renewals, if less) is damaged
RUNS = "runs"  # <output>/.vsr_ddp/runs/<run>.json
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"

# The clocks a lease is judged by: this host's (a lease's mtime is compared with it) and a
# monotonic one (how long an observer has seen a lease unchanged: Watch). Module-level, so that
# tests can run them on a clock of their own instead of sleeping.
wall_clock = time.time
monotonic_clock = time.monotonic


class LeaseLost(RuntimeError):
    """This rank's lease was taken over (it looked dead to another run): its work is discarded."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_lease(path: Path) -> dict | None:
    """A lease's holder, or None when it is gone, being written, or damaged (garbage, empty: a
    crash or a full disk between its creation and its write). A damaged one is taken over once it
    stays so (:func:`stale_reason`), with a warning then: being written is no damage."""
    return read_json(path, warn=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: alive
    return True


def stale_reason(path: Path, holder: dict | None, timeout_s: float, host: str | None = None,
                 runs: Path | None = None, watch: "Watch | None" = None) -> str | None:
    """Why the holder of ``path`` is gone, or None while it may be alive: not renewed for
    ``timeout_s``; or it ran on this host under a process id that no longer exists (a killed run,
    seen by its rerun); or (``runs``: the folder of run files) the launch it belongs to is gone
    (torchrun restarted its workers: the old attempt's rank 0, on this host, is dead, so the leases
    of its ranks on other nodes are free at once, not after the timeout).

    "Not renewed" compares the file's mtime with this host's clock, which is all a single look can
    do. With ``watch`` (a rank that polls), it is also this observer's own measure: the file stayed
    unchanged for ``timeout_s`` by its monotonic clock, or looks older than ``timeout_s`` and stayed
    unchanged for ``watch.confirm_s`` (a few renewal periods). So hosts whose clocks disagree by
    more than the timeout neither take live leases (a holder renews every tenth of the timeout)
    nor wait forever on dead ones whose mtimes lie in their future."""
    try:
        st = path.stat()
    except OSError:
        return None  # nothing to take over: create it
    age = max(0.0, wall_clock() - st.st_mtime)
    quiet = 0.0
    if watch is None:
        if age > timeout_s:
            return f"not renewed for {age:.0f} s"
    else:
        quiet = watch.quiet(path, st, holder)
        if quiet >= timeout_s or (age > timeout_s and quiet >= watch.confirm_s):
            return f"not renewed for {max(age, quiet):.0f} s"
    if holder is None:
        # Unreadable: being written this instant (created empty, then one write), or damaged:
        # the writer died in between (a full disk), or the file was garbled. A live holder
        # never leaves its lease so for more than an instant, and never renews one it cannot
        # read (renew() finds no token of its own), so unreadable and unchanged for a few
        # seconds by this observer's own clock is as good as dead: otherwise it would block its
        # unit for the whole timeout. One look (no watch) cannot tell: only time decides.
        if watch is not None and quiet >= watch.unreadable_s:
            return f"damaged (garbage, empty or cut short) and unchanged for {quiet:.0f} s"
        return None
    host = host or socket.gethostname()
    pid = holder.get("pid")
    if holder.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
        return f"its process {pid} on {host} is gone"
    if runs is not None and holder.get("run"):
        run = runs / f"{holder['run']}.json"
        if not run.exists():
            return f"its launch {holder['run']} has ended"
        why = stale_reason(run, read_lease(run), timeout_s, host, watch=watch)
        return f"its launch {holder['run']} is gone (run file {run.name}: {why})" if why else None
    return None


def is_stale(path: Path, holder: dict | None, timeout_s: float, host: str | None = None,
             runs: Path | None = None) -> bool:
    """One look: is the holder of ``path`` gone (:func:`stale_reason`, by this host's clock)?"""
    return stale_reason(path, holder, timeout_s, host, runs) is not None


class Watch:
    """How long this observer has seen each lease file unchanged (same holder token, same mtime),
    by its own monotonic clock: a measure of "not renewed" that needs no agreement between hosts'
    clocks (see :func:`stale_reason`)."""

    def __init__(self, confirm_s: float, unreadable_s: float | None = None):
        self.confirm_s = confirm_s
        # how long an unreadable lease must stay unchanged before it counts as damaged, not being
        # written (a create and one write apart): three renewals, at least 1 s, at most UNREADABLE_S
        self.unreadable_s = max(1.0, min(confirm_s, UNREADABLE_S)) if unreadable_s is None else unreadable_s
        self._seen: dict[Path, tuple[tuple, float]] = {}
        self._lock = threading.Lock()

    def quiet(self, path: Path, st: os.stat_result, holder: dict | None) -> float:
        key = (str((holder or {}).get("token")), st.st_ino, st.st_mtime_ns, st.st_size)
        now = monotonic_clock()
        with self._lock:
            seen = self._seen.get(path)
            if seen is None or seen[0] != key:
                self._seen[path] = (key, now)
                return 0.0
            return now - seen[1]

    def forget(self, path: Path) -> None:
        with self._lock:
            self._seen.pop(path, None)


def holder_text(holder: dict | None) -> str:
    if not holder:
        return "another run"
    return f"run {holder.get('run')} rank {holder.get('rank')} on {holder.get('host')}"


class Leases:
    """This rank's leases: acquire, renew in the background, release.

    ``acquire`` returns True when the lease is this rank's now. ``check`` raises
    :class:`LeaseLost` when it is not any more (call it before committing).
    """

    def __init__(self, run: str, rank: int, host: str | None = None, *, timeout_s: float,
                 renew_s: float | None = None, runs: Path | None = None):
        self.run, self.rank = run, rank
        self.runs = runs  # the run files' folder: a lease of a launch that is gone is free
        self.host = host or socket.gethostname()
        self.timeout_s = float(timeout_s)
        self.renew_s = float(renew_s) if renew_s else max(0.2, self.timeout_s / 10)
        # a lease that looks old by the clocks must also stay unchanged this long before our eyes:
        # three renewals missed (a network filesystem may show one late)
        self.watch = Watch(confirm_s=3 * self.renew_s)
        self._held: dict[Path, str] = {}  # path -> our token
        self._lost: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one lease -------------------------------------------------------------------------------
    def acquire(self, path: Path, what: str = "", extra: dict | None = None) -> bool:
        path = Path(path)
        if self._create(path, what, extra):
            return True
        holder = read_lease(path)
        why = stale_reason(path, holder, self.timeout_s, self.host, self.runs, self.watch)
        if why is None:
            return False
        # Take the stale lease over. Its generation (token) gets one exclusive marker file: of all
        # the ranks that find it stale at once, the one that creates the marker replaces the lease
        # (a rename over it: the lease never goes missing, so nobody can create a fresh one
        # meanwhile); the others give up. Markers go when the lease is released.
        try:
            st = path.stat()
        except FileNotFoundError:
            return self._create(path, what, extra)  # released meanwhile
        generation = (holder or {}).get("token") or f"unreadable-{st.st_ino}-{st.st_mtime_ns}"
        marker = path.with_name(f"{path.name}.takeover-{generation}")
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False  # another rank takes this one over
        now = read_lease(path)
        if (now or {}).get("token") != (holder or {}).get("token"):
            marker.unlink(missing_ok=True)  # it changed hands as we looked
            return False if path.exists() else self._create(path, what, extra)
        if holder is None:
            log.warning("%s is %s; taking it over", path, why)
        else:
            log.info("%s: taking over from %s (%s)", path, holder_text(holder), why)
        return self._create(path, what, extra, replace=True)

    def _create(self, path: Path, what: str, extra: dict | None, replace: bool = False) -> bool:
        token = uuid.uuid4().hex
        body = {"run": self.run, "rank": self.rank, "host": self.host, "pid": os.getpid(), "token": token,
                "since": time.strftime(TIME_FORMAT), "what": what, **(extra or {})}
        target = path.with_name(f"{path.name}.{token[:8]}.new") if replace else path
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        data = json.dumps(body).encode("utf-8")
        try:  # one write: a reader sees the file empty or whole, not cut in between
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(target, path)
        with self._lock:
            self._held[path] = token
            self._lost.discard(path)
        self.watch.forget(path)
        self._start()
        return True

    def holds(self, path: Path) -> bool:
        path = Path(path)
        with self._lock:
            token = self._held.get(path)
        return token is not None and (read_lease(path) or {}).get("token") == token

    def check(self, path: Path) -> None:
        """Raise LeaseLost unless ``path`` is still this rank's lease."""
        path = Path(path)
        with self._lock:
            lost = path in self._lost
        if lost or not self.holds(path):
            holder = read_lease(path)
            raise LeaseLost(f"lease {path.name} was taken over by {holder_text(holder)}")

    def release(self, path: Path) -> None:
        """Give the lease up (its file goes, if it is still ours)."""
        path = Path(path)
        mine = self.holds(path)
        with self._lock:
            self._held.pop(path, None)
            self._lost.discard(path)
        if mine:
            for marker in path.parent.glob(f"{path.name}.takeover-*"):
                marker.unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    # -- renewal ---------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="leases", daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.renew()

    def renew(self) -> None:
        with self._lock:
            held = dict(self._held)
        for path, token in held.items():
            if (read_lease(path) or {}).get("token") != token:
                with self._lock:
                    if path in self._held:
                        self._lost.add(path)
                log.warning("%s: lease lost (taken over by %s)", path, holder_text(read_lease(path)))
                continue
            try:
                os.utime(path)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            held = list(self._held)
        for path in held:
            self.release(path)


# -- runs ------------------------------------------------------------------------------------------

def runs_dir(output: Path) -> Path:
    from .shards import runs_dir as layout

    return layout(output)


def run_file(output: Path, run: str) -> Path:
    from .shards import run_file as layout

    return layout(output, run)


def register_run(output: Path, leases: Leases, settings: dict, **extra) -> str | None:
    """Register the launch whose rank 0 holds ``leases`` in ``<output>/.vsr_ddp/runs/`` (its
    file renewed as a lease) and return why it must stop before any work, or None: a live launch
    on the folder runs other settings, and the two would overwrite each other's videos."""
    from .jobs.base import signature

    runs_dir(output).mkdir(parents=True, exist_ok=True)
    sig = signature(settings)
    leases.acquire(run_file(output, leases.run), what="run", extra={"signature": sig, "settings": settings,
                                                                    **extra})
    others = {r: h for r, h in live_runs(output, leases.timeout_s).items() if r != leases.run}
    for holder in others.values():
        if holder.get("signature") != sig:
            return (f"output folder {output} is in use by {holder_text(holder)} with other settings "
                    f"({settings_difference(holder.get('settings') or {}, settings)}): wait for it to "
                    f"finish, launch with its settings to join it, or use another output=")
    if others:
        log.info("joining %d run(s) already working on %s: %s; units are shared", len(others), output,
                 ", ".join(holder_text(h) for h in others.values()))
    log.info("run %s: %d rank(s)", leases.run, extra.get("world", 1))
    return None


def live_runs(output: Path, timeout_s: float, host: str | None = None) -> dict[str, dict]:
    """run id -> its run file, for the runs on ``output`` whose rank 0 still renews it."""
    out = {}
    folder = runs_dir(output)
    if not folder.is_dir():
        return out
    for path in folder.glob("*.json"):
        holder = read_lease(path)
        if holder is None:
            _warn_damaged_run(path)
        elif not is_stale(path, holder, timeout_s, host):
            out[path.stem] = holder
    return out


def _warn_damaged_run(path: Path) -> None:
    """A run file that cannot be read counts as no live launch. It gets one warning unless it
    may be one being written this instant (empty, and younger than UNREADABLE_S)."""
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_size or wall_clock() - st.st_mtime > UNREADABLE_S:
        warn_damaged(path, "garbage, empty or cut short", st, consequence="it counts as no live launch")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_difference(theirs: dict, ours: dict, limit: int = 3) -> str:
    """``job.scale: 4 there, 2 here; ...``: the first settings that differ."""
    a, b = flatten(theirs), flatten(ours)
    keys = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)),
                  key=lambda k: (k not in a or k not in b, k))  # settings both have first
    diffs = [f"{k}: {a.get(k, '(unset)')} there, {b.get(k, '(unset)')} here" for k in keys]
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more if diffs else "its settings"
