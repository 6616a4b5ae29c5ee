"""Stopping early on request: SIGTERM (Slurm preemption, torchrun shutting workers down),
SIGUSR1/SIGUSR2 (Slurm's ``--signal`` warning) and SIGINT.

The first signal sets :data:`requested`; the unit in hand is abandoned cleanly (its partial shard
is removed), no new unit starts, and the process exits with 128 + the signal number. Finished
shards stay, so rerunning or requeueing the same command resumes. A second SIGINT interrupts
at once, as Ctrl-C users expect.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

requested = threading.Event()
_signum: list[int] = []


class Preempted(Exception):
    """Raised inside a unit when a stop was requested."""


def _handler(signum, frame):
    if requested.is_set() and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _signum.append(signum)
    requested.set()
    log.warning("received %s: finishing up (the unit in hand is discarded; rerun to resume)",
                signal.Signals(signum).name)


def check() -> None:
    """Raise Preempted when a stop was requested: called between the iterations of long loops
    (EbSynth's search-vote passes, FRESCO's denoising steps), so a rank inside a unit that takes
    minutes still leaves within seconds of the signal, before Slurm's hard kill."""
    if requested.is_set():
        raise Preempted("stop requested")


def install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, _handler)


def exit_status() -> int:
    return 128 + (_signum[0] if _signum else signal.SIGTERM)
