"""The work board: units claimed in plan order by whichever rank is free, completion counted in
the rendezvous store, leases across launches.

Within a launch, a counter in the store hands out unit indices (``work.claim=dynamic``; or every
world-th, ``strided``), so each unit is looked at by exactly one rank of the launch. What that
rank finds it is told by :meth:`Board.state` in one call, as a :class:`State`. What a launch has
finished is counted in the store, not on disk:

    udone/<video>   units of a segmented video done; the rank whose count completes it merges it
    vfail/<video>   the first rank to fail a video settles it (its other units are not made)
    settled         videos ok or failed: the launch is done when it reaches the plan's videos
    watch/<k>       units held by other launches (and merges they are doing), for the watcher

A rank with nothing left to draw waits on ``settled`` in the store. One rank per launch, the
first to run out, is the *watcher*: it looks at the units and merges in other launches' hands
(taking over those whose holders died), so the file-system operations of a waiting launch
depend on what other launches hold, not on how many ranks wait.
"""
from __future__ import annotations

import enum
import logging
import time
from typing import Callable

from . import atomic, claims, preempt, shards
from .plan import Plan, Unit, strided

log = logging.getLogger(__name__)


class State(enum.Enum):
    DONE = "done"  # shard and sidecar in place, the video merged, or the bundle recorded
    FAILED = "failed"  # failed in this launch or in a live one: its video fails here too
    HELD = "held"  # another launch's rank holds its lease
    FREE = "free"  # take it


class Made(enum.Enum):
    MADE = "made"
    FAILED = "failed"
    LOST = "lost"  # its lease was taken over by another launch: theirs now
    STOPPED = "stopped"  # preemption


class Board:
    """The state of the plan's units as this launch knows it (see the module's docstring).

    ``layout``: ``wdir(unit) -> Path`` (a unit's folder), ``sig(unit) -> str`` (the signature its
    sidecar must carry), ``live(run) -> bool``, ``merged(video) -> dict | None`` (the recorded
    merge of a segmented video), ``bundle_rels(unit)``."""

    def __init__(self, plan: Plan, ctx, leases: claims.Leases, *, wdir: Callable, sig: Callable,
                 live: Callable, merged: Callable, bundle_rels: Callable):
        self.plan, self.ctx, self.leases = plan, ctx, leases
        self.wdir, self.sig, self.live, self.merged, self.bundle_rels = wdir, sig, live, merged, bundle_rels
        self.looks = 0  # file-system looks at units and merges while waiting (the watcher's)
        self._merged: set[int] = set()  # segmented videos found merged

    def state(self, i: int) -> tuple[State, dict | None]:
        """What unit ``i`` is now, and what was read to tell (a bundle's sidecar, a failure record)."""
        unit = self.plan.units[i]
        if not unit.parts and self.failed(unit.video):
            return State.FAILED, None
        wdir = self.wdir(unit)
        sig = self.sig(unit)
        if unit.parts:
            side = shards.bundle_state(wdir, unit, self.bundle_rels(unit), sig)
            if side is not None and (not any(c.get("status") == "failed" for c in side["clips"])
                                     or self.live(side.get("run"))):
                return State.DONE, side  # failed clips of a launch that ended are retried
        elif unit.video in self._merged or shards.shard_done(wdir, unit, sig):
            return State.DONE, None
        elif self.merged(unit.video) is not None:  # merged, its shards removed (by another launch, maybe)
            self._merged.add(unit.video)
            return State.DONE, None
        failed = atomic.read_json(shards.failure_path(wdir, unit))
        if failed and self.live(failed.get("run")):
            return State.FAILED, failed
        lease = shards.lease_path(wdir, unit)
        holder = claims.read_lease(lease)
        if holder is not None and claims.stale_reason(lease, holder, self.leases.timeout_s, self.leases.host,
                                                      self.leases.runs, self.leases.watch) is None:
            return State.HELD, holder
        return State.FREE, None

    # -- what the launch has finished, counted in the store ---------------------------------------
    def failed(self, video: int) -> bool:
        return self.ctx.add(f"vfail/{video}", 0) > 0

    def fail(self, video: int) -> bool:
        """Mark ``video`` failed; True for the one rank that settles it (and reports it)."""
        if self.ctx.add(f"vfail/{video}", 1) == 1:
            self.ctx.add("settled", 1)
            return True
        return False

    def unit_done(self, unit: Unit) -> bool:
        """Count a segment done; True for the rank whose count completes its video (it merges)."""
        return self.ctx.add(f"udone/{unit.video}", 1) == len(self.plan.units_of(unit.video))

    def settle(self, videos: int = 1) -> None:
        self.ctx.add("settled", videos)

    def finished(self) -> bool:
        return self.ctx.add("settled", 0) >= len(self.plan.videos)

    def watch(self, item: int) -> None:
        """Hand a unit (its index) or a merge (``-1 - video``) in another launch's hands to the
        watcher: slot ``watch/<k>`` holds it as a non-zero number (units + 1, merges as they are)."""
        self.ctx.add(f"watch/{self.ctx.add('watch_n', 1) - 1}", item + 1 if item >= 0 else item)

    def watched(self, start: int) -> list[int]:
        """The items handed to the watcher from slot ``start`` on, up to the first slot whose
        number is not written yet (a rank takes a slot, then writes it: read again next time)."""
        items = []
        for k in range(start, self.ctx.add("watch_n", 0)):
            value = self.ctx.add(f"watch/{k}", 0)
            if value == 0:
                break
            items.append(value - 1 if value > 0 else value)
        return items


def claim_order(board: Board, claim: str):
    """Unit indices for this rank to try, in plan order: ``dynamic`` draws the next one from a
    counter in the store whenever this rank is free (ranks never wait on each other's long
    units); ``strided`` takes every world-th, fixed up front."""
    ctx, n = board.ctx, len(board.plan.units)
    if claim == "strided":
        yield from strided(range(n), ctx.rank, ctx.world)
        return
    while (i := ctx.add("claim", 1) - 1) < n:
        yield i


def work(board: Board, claim: str, handle: Callable[[int, State | None, dict | None, bool], bool],
         poll_s: float = 2.0) -> None:
    """Take units until every video of the plan is settled (ok or failed) in this launch.
    ``handle(i, state, found, watching)`` acts on what :meth:`Board.state` said (makes a free
    unit, counts a done one, fails a video, or hands a held one to the watcher) and returns
    whether the unit is settled; ``i < 0``: the merge of video ``-1 - i`` in another launch's hands."""
    seen = {state: 0 for state in State}
    for i in claim_order(board, claim):
        if preempt.requested.is_set():
            return
        state, found = board.state(i)
        seen[state] += 1
        handle(i, state, found, False)
    log.info("%d unit(s) drawn by this rank, %d already done%s", sum(seen.values()), seen[State.DONE],
             f", {seen[State.HELD]} in other launches' hands" if seen[State.HELD] else "")
    if preempt.requested.is_set() or board.finished():
        return
    t0 = time.monotonic()
    log.info("nothing left to draw: waiting for %d of %d video(s) in other hands",
             len(board.plan.videos) - board.ctx.add("settled", 0), len(board.plan.videos))
    if board.ctx.add("watcher", 1) == 1:
        log.info("watching the units and merges in other launches' hands until the plan is done")
        watch(board, handle, poll_s)
    else:
        while not board.finished() and not preempt.requested.wait(min(1.0, poll_s)):
            pass
    log.info("waited %.1f s for the plan to finish; %d file-system look(s) at units and merges meanwhile",
             time.monotonic() - t0, board.looks)


def watch(board: Board, handle: Callable, poll_s: float) -> None:
    """The watcher's loop until the plan is done: the store every half second (new items, the
    count of settled videos), the watched units and merges on disk every ``poll_s``; ``handle``
    acts on each (makes it when it is free) and says whether it is settled (dropped) or still
    in other hands (looked at again)."""
    items: list[int] = []
    seen, last = 0, float("-inf")
    while not preempt.requested.is_set() and not board.finished():
        new = board.watched(seen)
        seen += len(new)
        items += new
        if items and (new or time.monotonic() - last >= poll_s):
            last = time.monotonic()
            left = []
            for item in items:
                if preempt.requested.is_set():
                    return
                board.looks += 1
                found = (None, None) if item < 0 else board.state(item)
                if not handle(item, *found, True):
                    left.append(item)
            items = left
        preempt.requested.wait(min(0.5, poll_s))
