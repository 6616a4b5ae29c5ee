"""vsr_ddp's command line with its units gated by files: for tests that kill, stop or join a run
at a chosen unit, instead of at a moment they hope comes before the run's end.

    python tests/builders/gated_main.py job=... input=... output=...            (one process)
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/builders/gated_main.py ...

With ``VSR_DDP_TEST_GATE=<folder>`` in the environment, every job of ``vsr_ddp.jobs.JOBS`` is
replaced by a subclass that stops at these points of each unit it makes; at each it writes
``<folder>/reached-<point>`` and waits until ``<folder>/open-<point>`` or ``<folder>/open-all``
exists, or a stop is requested (a signal: the run's own stop checks take over from there):

    <stem>-segment_0003            before the unit's first frames are read: its lease is held and
                                   its shard's encoder is running (no frame written yet)
    <stem>-segment_0003-written    after the unit's first piece went on to the model and the
                                   encoder (its shard is being written: ``<shard>.*.partial``),
                                   only where the test asked for it with ``<folder>/hold-<point>``
    <stem>-segment_0003-progress   the first time the job reports progress inside the unit (a job
                                   that reports it mid-unit: propagate), only where the test asked
                                   for it with ``<folder>/hold-<point>``

Everything else is the real thing: the runner, the job, the command line (vsr_ddp.__main__.cli).
A rank writes a unit's sidecar after committing its shard, so a test knows which units are done
from the work folder, and which are in hand from ``reached-*`` (:class:`builders.runs.Gate`).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

GATE_ENV = "VSR_DDP_TEST_GATE"
ROOT = Path(__file__).resolve().parents[2]


def wait_at(point: str, only_if_held: bool = False) -> None:
    """Say that ``point`` is reached, and wait until the test opens it (or a stop is requested);
    ``only_if_held``: pass unless the test asked to hold it."""
    from vsr_ddp import preempt

    folder = Path(os.environ[GATE_ENV])
    if only_if_held and not (folder / f"hold-{point}").exists():
        return
    (folder / f"reached-{point}").touch()
    while not ((folder / f"open-{point}").exists() or (folder / "open-all").exists()):
        if preempt.requested.is_set():
            return
        time.sleep(0.02)


class Gated:
    """Mixed in before a job class: its units stop at the gate points."""

    def begin(self, info, unit, progress):
        point = f"{info.stem}-{unit.key}-progress"
        told = []

        def gated(frames_done: float) -> None:
            progress(frames_done)
            if frames_done > 0 and not told:
                told.append(frames_done)
                wait_at(point, only_if_held=True)

        super().begin(info, unit, gated)

    def unit_pieces(self, read, unit, info):
        pieces = super().unit_pieces(read, unit, info)

        def gated():
            wait_at(f"{info.stem}-{unit.key}")  # in the decode thread, at the unit's first read
            for n, piece in enumerate(pieces):
                yield piece
                if n == 0:  # handed on to the model and the encoder: the shard is being written
                    wait_at(f"{info.stem}-{unit.key}-written", only_if_held=True)

        return gated()


def main() -> None:
    # run as a script, this file's folder leads sys.path: its module names (clips, common, runs,
    # ...) must not shadow anything; the checkout's vsr_ddp is the one tested
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(here)]
    sys.path.insert(0, str(ROOT))
    if os.environ.get(GATE_ENV):
        from vsr_ddp.jobs import JOBS

        for name, job in list(JOBS.items()):
            JOBS[name] = type(job.__name__, (Gated, job), {})
    from vsr_ddp.__main__ import cli

    cli()


if __name__ == "__main__":
    main()
