"""Interrupted runs, at a unit of the test's choosing: a gated vsr_ddp command line
(gated_main.py: each unit waits for the test's word), SIGKILL of a whole job once it is where the
test wants it, and what a run left in its work folder (finished shards, the rank logs' "already
done" counts). Nothing here waits for a run to be fast or slow: every wait is for an event, and
its timeout only bounds a hang."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from vsr_ddp import shards

from .gated_main import GATE_ENV

GATED_MAIN = Path(__file__).with_name("gated_main.py")


def gated(cmd: list[str]) -> list[str]:
    """``cmd``, a vsr_ddp command line (conftest.job_cmd: ``python -m vsr_ddp ...`` or torchrun's
    ``... -m vsr_ddp ...``), with the entry point replaced by gated_main.py: its units then wait
    at the gate that ``VSR_DDP_TEST_GATE`` names (:class:`Gate`)."""
    for i in range(len(cmd) - 1):
        if cmd[i:i + 2] == ["-m", "vsr_ddp"]:
            return [*cmd[:i], str(GATED_MAIN), *cmd[i + 2:]]
    raise ValueError(f"not a vsr_ddp command line: {cmd}")


def unit_point(stem: str, seg: int) -> str:
    """The gate point before unit ``seg`` of video ``stem`` (see gated_main.py)."""
    return f"{stem}-segment_{seg:04d}"


class Gate:
    """The test's side of gated_main.py: a folder that gated runs (:func:`gated`, with
    :meth:`env`) report to and wait on. ``open(point, ...)`` lets units past their gate point,
    ``open_all()`` every unit, ``hold(point)`` asks for a point that is passed unless held (a
    unit's first progress report); ``reached()`` is the set of points that ranks have come to (a
    rank at a unit's point holds that unit's lease and has started its encoder)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def env(self, env: dict) -> dict:
        return {**env, GATE_ENV: str(self.folder)}

    def open(self, *points: str) -> None:
        for point in points:
            (self.folder / f"open-{point}").touch()

    def open_all(self) -> None:
        self.open("all")

    def hold(self, point: str) -> None:
        (self.folder / f"hold-{point}").touch()

    def reached(self) -> set[str]:
        return {p.name.removeprefix("reached-") for p in self.folder.glob("reached-*")}


def sidecars(output: Path) -> list[Path]:
    """The finished segments' sidecars in every work folder under ``output`` (a merged video's
    are gone unless the run kept its shards: work.keep_shards=true)."""
    return shards.sidecar_files(Path(output))


def records(output: Path) -> list[Path]:
    """What says work is finished under ``output``: segment and bundle sidecars, merge records."""
    output = Path(output)
    return sorted([*shards.sidecar_files(output), *shards.bundle_sidecars(output),
                   *(d / shards.MERGED for d in shards.work_dirs(output) if (d / shards.MERGED).exists())])


def wait_until(what: str, condition: Callable[[], bool], procs: Iterable[subprocess.Popen] = (),
               timeout: float = 120) -> None:
    """Poll ``condition`` until it holds. Fails when one of ``procs`` ends first (with its stderr,
    if piped), or after ``timeout`` seconds: a bound on a hang, not on how fast the machine is."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                err = p.stderr.read() if p.stderr is not None else ""
                raise AssertionError(f"a process ended ({p.returncode}) before {what}\n{str(err)[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.02)


def sigkill_when(cmd: list[str], ready: Callable[[], bool], *, env: dict, cwd: Path,
                 timeout: float = 120) -> None:
    """Start ``cmd`` (torchrun ... vsr_ddp ...) in a session of its own, wait until ``ready()``
    (a gated run holding the units the test chose, say), then SIGKILL the whole job
    (:func:`kill_tree`): torchrun, the ranks and their ffmpeg encoders, none gets a chance to
    clean up, and none writes anything after this returns. Fails when the job ends first."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads it while the job runs
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                if proc.poll() is not None:
                    err.seek(0)
                    tail = err.read().decode(errors="replace")[-3000:]
                    raise AssertionError(f"the job ended ({proc.returncode}) before it was killed\n{tail}")
                assert time.monotonic() < deadline, f"not ready to be killed after {timeout:.0f} s"
                time.sleep(0.02)
        finally:
            kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, and wait until they are all gone.

    Killing torchrun's process group is not enough: torchrun starts each rank in a session of its
    own, so the ranks (and their encoders) would live on as orphans, finish the unit at hand and
    commit it after the "kill". So: stop the whole tree first (SIGSTOP cannot be caught, and a
    stopped process forks nothing), listing it again until no new process shows; then SIGKILL
    every process and process group in it, and wait for each to be dead (a system call in
    flight, a rename say, completes before a process stops or dies). A ``proc`` that has ended
    already is left alone: its process id may be another process's by now."""
    if proc.poll() is not None:
        return
    tree: set[int] = set()
    while new := {proc.pid, *_descendants(proc.pid)} - tree:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        tree |= new
    groups = set()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while alive := [pid for pid in tree if _state(pid) not in (None, "Z", "X")]:
        assert time.monotonic() < deadline, f"processes {alive} outlived SIGKILL"
        time.sleep(0.02)


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state, ppid, ...), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _state(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def already_done(output: Path, ranks: int | None = None) -> int:
    """Finished units the last run found, over all ranks: each rank log's last
    'N unit(s) drawn by this rank, M already done' line (the logs are appended across reruns).
    ``ranks``: the last run's rank count, when an earlier run on the folder had more."""
    total = 0
    logs = sorted(shards.logs_dir(Path(output)).glob("rank*.log"))
    if ranks is not None:
        logs = [shards.logs_dir(Path(output)) / f"rank{r}.log" for r in range(ranks)]
    for log in logs:
        found = re.findall(r"\d+ unit\(s\) drawn by this rank, (\d+) already done",
                           log.read_text(encoding="utf-8"))
        assert found, f"{log} has no unit count"
        total += int(found[-1])
    return total


def shard_files(wdir: Path) -> dict[str, tuple[bytes, int]]:
    """Every finished shard and its sidecar: name -> (bytes, inode). Files are replaced, never
    rewritten in place, so an unchanged inode means the file was not made again."""
    files = {}
    for side in sorted(Path(wdir).glob("*/segment_????.json")):
        for f in (side, side.parent / json.loads(side.read_text())["shard"]):
            files[f.name] = (f.read_bytes(), f.stat().st_ino)
    return files
