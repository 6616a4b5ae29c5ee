"""Interrupted runs: kill a running job the hard way once it has finished some shards, and read
back what a run left in its work folder (finished shards, the rank logs' "already done" counts)."""
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


def sigkill_once_sharded(cmd: list[str], output: Path, *, env: dict, cwd: Path, at_least: int = 1,
                         timeout: float = 120) -> None:
    """Start ``cmd`` (torchrun ... -m vsr_ddp ... output=<output>) in a session of its own, wait
    until its work folders (``<output>/.vsr_ddp/*/``) hold at least ``at_least`` shard sidecars
    between them, then SIGKILL the whole job (:func:`kill_tree`): torchrun, the ranks and their
    ffmpeg encoders, none gets a chance to clean up, and none writes anything after this returns.
    Fails when the job ends before it could be killed (the clip is too short for this machine:
    make it longer) or makes no shards in ``timeout``."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads it while the job runs
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while len(list(Path(output).glob(".vsr_ddp/*/segment_????.json"))) < at_least:
                if proc.poll() is not None:
                    err.seek(0)
                    tail = err.read().decode(errors="replace")[-3000:]
                    raise AssertionError(f"the job ended ({proc.returncode}) before it was killed\n{tail}")
                assert time.monotonic() < deadline, f"fewer than {at_least} shard(s) after {timeout:.0f} s"
                time.sleep(0.05)
        finally:
            kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, and wait until they are all gone.

    Killing torchrun's process group is not enough: torchrun starts each rank in a session of its
    own, so the ranks (and their encoders) would live on as orphans, finish the unit at hand and
    commit it after the "kill". So: stop the whole tree first (SIGSTOP cannot be caught, and a
    stopped process forks nothing), listing it again until no new process shows; then SIGKILL
    every process and process group in it, and wait for each to be dead (a system call in
    flight, a rename say, completes before a process stops or dies)."""
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


def already_done(output: Path) -> int:
    """Finished shards the last run found, over all ranks: each rank log's last
    'N unit(s) for this rank, M already done' line (the logs are appended across reruns)."""
    total = 0
    for log in sorted((Path(output) / ".vsr_ddp" / "logs").glob("rank*.log")):
        found = re.findall(r"\d+ unit\(s\) for this rank, (\d+) already done",
                           log.read_text(encoding="utf-8"))
        assert found, f"{log} has no unit count"
        total += int(found[-1])
    return total


def shard_files(wdir: Path) -> dict[str, tuple[bytes, int]]:
    """Every finished shard and its sidecar: name -> (bytes, inode). Files are replaced, never
    rewritten in place, so an unchanged inode means the file was not made again."""
    files = {}
    for side in sorted(Path(wdir).glob("segment_????.json")):
        for f in (side, side.parent / json.loads(side.read_text())["shard"]):
            files[f.name] = (f.read_bytes(), f.stat().st_ino)
    return files
