"""The Slurm pieces of vsr_ddp.dist without a cluster (fast, part of `make test`); the same paths
run for real on a one-node cluster in `make test-slurm` (tests/slurm/run_slurm_test.sh)."""
from __future__ import annotations

import json
import os

import pytest

from vsr_ddp import dist

SRUN_TASK = {  # task 3 of `srun --nodes=2 --ntasks-per-node=2 python -m vsr_ddp ...` in job 1234567
    "SLURM_JOB_ID": "1234567", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_STEP_NODELIST": "gpu[03-04]",
}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A private os.environ, and a fake scontrol on PATH that expands gpu[03-04]."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    scontrol = bindir / "scontrol"
    scontrol.write_text('#!/bin/sh\n'
                        '[ "$1 $2 $3" = "show hostnames gpu[03-04]" ] && printf "gpu03\\ngpu04\\n"\n')
    scontrol.chmod(0o755)
    fake = {"PATH": f"{bindir}:/usr/bin:/bin"}
    monkeypatch.setattr(os, "environ", fake)
    return fake


def test_srun_task_gets_the_torch_variables(env):
    env.update(SRUN_TASK)
    dist.slurm_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                "MASTER_PORT")} == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu03",
                                                    "MASTER_PORT": "24567"}


def test_torchrun_and_the_batch_script_are_left_alone(env):
    env.update(SRUN_TASK, RANK="5", WORLD_SIZE="16")  # torchrun set them: they win
    dist.slurm_env()
    assert (env["RANK"], env["WORLD_SIZE"], "MASTER_ADDR" in env) == ("5", "16", False)
    env.clear()
    env.update({k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"})  # the batch shell, not a step
    dist.slurm_env()
    assert "RANK" not in env


def test_node_list_without_scontrol(env):
    env.update(SRUN_TASK, PATH="/nonexistent", SLURM_JOB_NODELIST="n1,n2", SLURM_STEP_NODELIST="n1,n2")
    dist.slurm_env()
    assert env["MASTER_ADDR"] == "n1"
    env.clear()
    env.update(SRUN_TASK, PATH="/nonexistent")
    with pytest.raises(dist.DistError,
                       match=r"cannot expand SLURM_JOB_NODELIST=gpu\[03-04\].*set MASTER_ADDR"):
        dist.slurm_env()


def test_tasks_per_node_spec():
    assert [dist._tasks_on_node("4(x2),3", i) for i in range(4)] == [4, 4, 3, None]


def test_world_size_must_match_the_allocation(env):
    env.update(SLURM_JOB_ID="7", SLURM_NNODES="2", TORCHELASTIC_RUN_ID="7")
    dist.check_slurm_world(16, 8)  # 2 nodes x 8
    with pytest.raises(dist.DistError,
                       match=r"^WORLD_SIZE=8 does not match the Slurm allocation: 2 node\(s\) x 8 "
                             r"rank\(s\) per node = 16; launch one torchrun per node"):
        dist.check_slurm_world(8, 8)  # torchrun --standalone on each node: two worlds
    env.update(SLURM_NNODES="1", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="8")
    with pytest.raises(dist.DistError, match=r"^srun started 8 torchrun task\(s\) on 1 node\(s\)"):
        dist.check_slurm_world(8, 8)  # srun --ntasks-per-node=8 torchrun --standalone --nproc_per_node=8
    del env["TORCHELASTIC_RUN_ID"]
    dist.check_slurm_world(8, 8)  # not torchrun: nothing to compare


class FakeGather(dist.Dist):
    """Rank 0 of a 2-rank world whose collectives return what the other rank would send."""

    def __init__(self, other_token, other_missing):
        super().__init__(rank=0, world=2, host="node-a")
        self._store = object()  # "distributed"
        self.answers = [None, other_missing]
        self.other_token = other_token

    def all_gather_object(self, obj):
        if isinstance(obj, tuple):  # (host, token)
            return [obj, ("node-b", self.other_token)]
        return [obj, self.answers[1]]


def test_shared_folder(tmp_path):
    hosts = tmp_path / ".vsr_ddp" / "hosts"
    hosts.mkdir(parents=True)
    (hosts / "1.json").write_text(json.dumps({"rank": 1, "host": "node-b", "token": "t1"}))
    FakeGather("t1", []).check_shared_folder(tmp_path, wait_s=0.1)  # both see both

    # Rank 1 wrote t2 on a disk rank 0 cannot see (what rank 0 finds is an old run's file); rank 1
    # cannot see rank 0's either.
    with pytest.raises(dist.DistError) as e:
        FakeGather("t2", [0]).check_shared_folder(tmp_path, wait_s=0.1)
    assert str(e.value) == (f"output folder {tmp_path} is not shared between the nodes (rank 0 on node-a "
                            f"cannot see rank(s) 1 (node-b); rank 1 on node-b cannot see rank(s) 0 "
                            f"(node-a)): put output= on a filesystem every node mounts at the same path")
    assert json.loads((hosts / "0.json").read_text())["host"] == "node-a"
