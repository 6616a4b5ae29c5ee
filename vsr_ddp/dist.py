"""The only module that touches torch.distributed.

A vsr_ddp run is embarrassingly parallel: ranks never exchange tensors while they work. They
meet three times: to share the probe results at start-up, to learn that every rank has finished
its units, and to hand their failures to rank 0. The middle meeting can come hours apart for
different ranks (one rank may get a 2-hour video, another a 10-second one), so it is *not* a
collective: each rank bumps a counter in the rendezvous store and polls it, which never times
out. Only once every rank has arrived do we run a (fast) collective.

Run as one process (``python -m vsr_ddp``) there is no process group at all; the same API
works with local stand-ins.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class DistError(RuntimeError):
    """A mis-set distributed environment, reported before any work starts."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    host: str = field(default_factory=socket.gethostname)
    _store: dist.Store | None = None
    _group: object = None  # gloo group for object collectives (the default group when on CPU)
    _local_counters: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self._store is not None

    # -- counters: cheap, non-blocking, usable from any thread -------------------------------
    def add(self, key: str, amount: int = 1) -> int:
        """Add to a run-wide counter and return its new value (``amount=0`` reads it)."""
        if self._store is not None:
            return int(self._store.add(key, amount))
        with self._lock:
            self._local_counters[key] = self._local_counters.get(key, 0) + amount
            return self._local_counters[key]

    def wait_for_all(self, key: str, cancel: threading.Event | None = None, poll_s: float = 0.5) -> bool:
        """Arrive at ``key`` and wait until every rank has, without any timeout.

        A rank that finished early waits here while the others still work; a crashed rank
        makes torchrun tear the whole job down, so the loop cannot spin forever. Returns False
        when ``cancel`` is set first (preemption: the other ranks will not arrive).
        """
        self.add(key, 1)
        while self.add(key, 0) < self.world:
            if cancel is not None and cancel.wait(poll_s):
                return False
            if cancel is None:
                time.sleep(poll_s)
        return True

    # -- collectives: only where every rank is known to be present ---------------------------
    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._group)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init(device: str = "auto", backend: str = "auto", timeout_min: float = 30.0) -> Dist:
    """Set up this process: rank, device, process groups. Call once, pair with :func:`teardown`."""
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistError("device=cuda but torch sees no CUDA device on " + socket.gethostname())
        n_gpu = torch.cuda.device_count()
        if local_world > n_gpu:
            raise DistError(
                f"{local_world} ranks per node but only {n_gpu} GPU(s) on {socket.gethostname()}: "
                f"use --nproc_per_node={n_gpu} (or fewer)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # Ranks on one node share its cores; without this each rank starts one thread per core
        # and they thrash (2 ranks x 2 cores -> 4 busy threads on 2 cores).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))

    ctx = Dist(rank=rank, world=world, local_rank=local_rank, local_world=local_world, device=dev)
    if world == 1:
        return ctx
    if "MASTER_ADDR" not in os.environ:
        raise DistError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun")

    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(minutes=timeout_min)
    # Rendezvous ourselves (what init_process_group does for env://) to keep a handle on the
    # store for the counters above.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)
    ctx.backend = backend
    # torchrun --max-restarts reuses the agent's store across restarts: keep each attempt's
    # counters apart so a restarted job does not count the dead attempt's arrivals.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    ctx._store = dist.PrefixStore(f"vsr_ddp/{attempt}/", store)
    ctx._group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    log.info("rank %d/%d on %s: backend %s, device %s", rank, world, ctx.host, backend, dev)
    return ctx


def teardown(ctx: Dist | None) -> None:
    if ctx is not None and ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
