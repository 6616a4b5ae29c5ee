"""A Hydra sweep's exit status: ``python -m vsr_ddp -m ...`` runs one point per combination.

    python -m vsr_ddp -m job=upscale input=clip.mp4 output='out/s${job.scale}' job.model=bicubic job.scale=2,3

Hydra runs the points one after another in the sweeping process (the basic launcher), or each in
a process of its own elsewhere (``hydra/launcher=slurm``), and never looks at what a point
returns; the sweep's exit status is made here:

* :func:`begin` at the start of the command line (``cli()``): this process sweeps, no point has run;
* :func:`point_done` after each point: its status is recorded, or, in a process that a launcher
  started for the point, a failure is raised as :class:`SweepPointFailed` (submitit pickles it
  back to the sweeping process, which then fails too);
* :func:`exit_status` once Hydra is done: that of the most serious point, None if none ran here.
"""
from __future__ import annotations

import os

from .config import CONFIG_ERROR

_sweeper_pid: int | None = None  # the process that runs the command line; None: begin() not called here
_statuses: list[int] = []         # exit status of each point run in that process


class SweepPointFailed(RuntimeError):
    """A sweep point run away from the sweeping process (hydra/launcher=slurm) that exited non-zero:
    raised so that the sweep, which only sees the point's result, fails too."""

    def __init__(self, status: int, point: str = ""):
        super().__init__(status, point)  # its arguments: the exception is pickled back to the sweep
        self.status, self.point = status, point

    def __str__(self) -> str:
        return f"sweep point {self.point} exited with status {self.status}"


def active() -> bool:
    """Is this a sweep point (``-m``)? False also outside Hydra's command line (a config composed
    by ``hydra.compose``: tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def begin() -> None:
    """A command line starts in this process: it is the sweeping one, and no point has run yet
    (a second command line in one process starts afresh). A process that a launcher starts for a
    point never calls this: it imports this module anew (or forks), so it is not the sweeper."""
    global _sweeper_pid
    _sweeper_pid = os.getpid()
    _statuses.clear()


def point_done(status: int) -> None:
    """Record the exit status of the point that just ran in this process; in a process of its own
    (a launcher's), raise :class:`SweepPointFailed` when it failed: the point's name and status
    reach the sweep only that way."""
    if os.getpid() != _sweeper_pid:
        if status:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            raise SweepPointFailed(status, f"#{hc.job.num} ({' '.join(hc.overrides.task)})")
        return
    _statuses.append(status)


def exit_status() -> int | None:
    """The sweep's exit status once its points ran in this process (:func:`worst`); None when no
    point ran here (a single run, or every point ran elsewhere)."""
    return worst(_statuses) if _statuses else None


def worst(statuses: list[int]) -> int:
    """A sweep's exit status: that of its most serious point. 128 + N when one was stopped by a
    signal, 2 when one had a configuration error, 1 when one failed, else 0."""
    failed = [s for s in statuses if s]
    if not failed:
        return 0
    stopped = [s for s in failed if s > 128]
    if stopped:
        return stopped[0]
    return CONFIG_ERROR if CONFIG_ERROR in failed else 1
