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

import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .atomic import read_json

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

    def wait_for_all(self, key: str, cancel: threading.Event | None = None, poll_s: float = 0.5,
                     on_poll=None) -> bool:
        """Arrive at ``key`` and wait until every rank has, without any timeout.

        A rank that finished early waits here while the others still work; a crashed rank
        makes torchrun tear the whole job down, so the loop cannot spin forever. Returns False
        when ``cancel`` is set first (preemption: the other ranks will not arrive).
        """
        self.add(key, 1)
        while self.add(key, 0) < self.world:
            if on_poll is not None:
                on_poll()  # rank 0 merges finished videos meanwhile
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

    # -- start-up checks --------------------------------------------------------------------
    def check_shared_folder(self, output: str | Path, wait_s: float = 20.0, run: str = "") -> None:
        """Fail before any work when ``output`` is not one folder for every rank.

        Shards written on one node must be visible to rank 0 for the merge, and resuming
        relies on every rank seeing every sidecar. A node-local path (``/tmp/out``, a local
        scratch disk) passes on one node and silently breaks on several, so: every rank writes
        ``<output>/.vsr_ddp/hosts/<run>/<rank>.json`` with a fresh token (each launch on the
        folder in its own ``run`` folder, so concurrent launches never overwrite each other's),
        and after a gather (the barrier) looks for every other rank's token. Network filesystems
        may show a new file a little late, hence the short grace period. Every rank raises the
        same error, naming who cannot see whom.
        """
        if not self.distributed:
            return
        from .shards import hosts_dir

        folder = hosts_dir(Path(output).expanduser(), run)
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        tmp = folder / f"{self.rank}.json.{token[:8]}.partial"
        tmp.write_text(json.dumps({"rank": self.rank, "host": self.host, "pid": os.getpid(), "token": token}))
        os.replace(tmp, folder / f"{self.rank}.json")
        peers = self.all_gather_object((self.host, token))  # [(host, token)] per rank

        def unseen() -> list[int]:
            out = []
            for r, (_, tok) in enumerate(peers):
                seen = (read_json(folder / f"{r}.json", warn=False) or {}).get("token")  # not there yet: None
                if seen != tok:
                    out.append(r)
            return out

        deadline = time.monotonic() + wait_s
        missing = unseen()
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            missing = unseen()
        blind = [(r, m) for r, m in enumerate(self.all_gather_object(missing)) if m]
        if blind:
            who = "; ".join(f"rank {r} on {peers[r][0]} cannot see rank(s) "
                            + ", ".join(f"{m} ({peers[m][0]})" for m in miss) for r, miss in blind[:8])
            raise DistError(f"output folder {output} is not shared between the nodes ({who}): put output= "
                            f"on a filesystem every node mounts at the same path")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,7]`` -> ``node03``), as Slurm expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        if "[" not in nodelist:  # a plain list needs no scontrol
            return nodelist.split(",")[0]
        raise DistError(f"cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol ({e}): set MASTER_ADDR")
    if not out:
        raise DistError(f"scontrol show hostnames {nodelist} printed nothing: set MASTER_ADDR")
    return out[0]


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """This node's entry of Slurm's compressed ``SLURM_TASKS_PER_NODE`` (``2(x3),1``)."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def slurm_env() -> None:
    """Give tasks that srun started directly (no torchrun: Hydra's submitit launcher, ``srun
    python -m vsr_ddp``) the variables torch.distributed reads, from Slurm's own.

    Only inside a job step (SLURM_STEP_ID): the batch script itself also has SLURM_PROCID=0
    and SLURM_NTASKS, and a ``python -m vsr_ddp`` there would wait forever for ranks that
    srun never started. Variables already set (by torchrun, or by hand) win.
    """
    env = os.environ
    if "RANK" in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return
    ntasks = _env_int("SLURM_NTASKS", 1)
    if ntasks <= 1:
        return
    node_id, nnodes = _env_int("SLURM_NODEID", 0), max(1, _env_int("SLURM_NNODES", 1))
    local_world = (_env_int("SLURM_NTASKS_PER_NODE", 0)
                   or _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE")
                                     or env.get("SLURM_TASKS_PER_NODE", ""),
                                     node_id)
                   or -(-ntasks // nnodes))
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(ntasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = str(local_world)
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = _first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env:
        # The same on every task of the job without talking; different for concurrent jobs (and
        # array tasks) sharing a node; below Linux's ephemeral range (32768+).
        env["MASTER_PORT"] = str(20000 + _env_int("SLURM_JOB_ID", 0) % 10000)


def env_rank() -> int:
    """This process's rank as its launcher set it, before :func:`init` (torchrun's RANK, srun's
    SLURM_PROCID): who prints an error found before the ranks can talk."""
    slurm_env()
    return _env_int("RANK", 0)


def env_world() -> int:
    """How many ranks the launcher started (WORLD_SIZE, srun's SLURM_NTASKS), before :func:`init`."""
    slurm_env()
    return _env_int("WORLD_SIZE", 1)


def check_slurm_world(world: int, local_world: int) -> None:
    """Under Slurm + torchrun, WORLD_SIZE must be what the allocation runs: one torchrun per node
    (``srun --ntasks-per-node=1``), ``--nnodes=$SLURM_NNODES``, LOCAL_WORLD_SIZE ranks each.
    Otherwise several independent torchrun worlds each process every input, or nodes idle."""
    env = os.environ
    if "SLURM_JOB_ID" not in env or "TORCHELASTIC_RUN_ID" not in env:
        return
    nodes = max(1, _env_int("SLURM_NNODES", 1))
    fix = ("launch one torchrun per node: srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
           f"--nproc_per_node={local_world} --rdzv_backend=c10d ... (launch/multi_node.sbatch)")
    if world != nodes * local_world:
        raise DistError(f"WORLD_SIZE={world} does not match the Slurm allocation: {nodes} node(s) x "
                        f"{local_world} rank(s) per node = {nodes * local_world}; {fix}")
    if "SLURM_STEP_ID" in env:
        agents = _env_int("SLURM_STEP_NUM_TASKS", _env_int("SLURM_NTASKS", 1))
        if agents != nodes:
            raise DistError(f"srun started {agents} torchrun task(s) on {nodes} node(s), each with its own "
                            f"world of {world} rank(s): every input would be processed more than once; {fix}")


def init(device: str, backend: str, timeout_min: float) -> Dist:
    """Set up this process: rank, device, process groups. Call once, pair with :func:`teardown`."""
    slurm_env()
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    check_slurm_world(world, local_world)

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistError("device=cuda but torch sees no CUDA device on " + socket.gethostname())
        n_gpu = torch.cuda.device_count()
        if 1 < n_gpu < local_world:
            raise DistError(
                f"{local_world} ranks per node but only {n_gpu} GPU(s) on {socket.gethostname()}: "
                f"use --nproc_per_node={n_gpu} (or fewer)")
        # One visible GPU per rank (srun --gpus-per-task=1, --gpu-bind) is device 0 of each; that
        # they are really different GPUs is checked once the ranks can talk (check_gpus).
        index = local_rank if n_gpu >= local_world else 0
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
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
    if dev.type == "cuda":
        check_gpus(ctx.all_gather_object((ctx.host, gpu_id(dev))))
    return ctx


def gpu_id(dev: torch.device) -> str:
    """The physical GPU behind ``dev`` (its UUID), whatever CUDA_VISIBLE_DEVICES renumbered."""
    props = torch.cuda.get_device_properties(dev)
    return str(getattr(props, "uuid", "") or f"{props.name}@{getattr(props, 'pci_bus_id', dev.index)}")


def check_gpus(ranks: list[tuple[str, str]]) -> None:
    """(host, GPU id) of every rank: two ranks on one GPU is a launch mistake, said at once."""
    seen: dict[tuple[str, str], int] = {}
    for rank, key in enumerate(ranks):
        if key in seen:
            raise DistError(f"ranks {seen[key]} and {rank} on {key[0]} both use GPU {key[1]}: one GPU per "
                            f"rank (--nproc_per_node <= GPUs, or srun --gpus-per-task=1)")
        seen[key] = rank


def teardown(ctx: Dist | None) -> None:
    if ctx is not None and ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
