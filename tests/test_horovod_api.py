"""Horovod 0.28's surface beyond the collectives: build queries, HorovodInternalError, the node
layout read from the launcher (unit tests with fake environments, and real ranks started as
two torchrun nodes on one host), and broadcast_optimizer_state (tests/api_worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import gradfuse as hvd
import pytest
from gradfuse import launch
from gradfuse.exceptions import NotInitializedError
from gradfuse.launch import Placement, node_layout, placement

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import api_worker
from multiproc import assert_check_ok, run_ranks, worker_env

# ---- placement(): which node the launcher says this rank is on -------------------------------


def test_placement_torchrun_node_rank_is_the_node():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
    }
    p = placement(env)
    assert (p.node, p.local_rank, p.local_size, p.source) == ("torchrun node 1", 1, 2, "torchrun")


def test_placement_torchrun_without_group_rank_groups_by_host():
    p = placement({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (p.node, p.local_rank, p.local_size) == (None, 1, 2)


def test_placement_mpi_launchers():
    ompi = placement(
        {
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        }
    )
    assert (ompi.node, ompi.local_rank, ompi.local_size, ompi.source) == (None, 1, 4, "Open MPI")
    hydra = placement(
        {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    )
    assert (hydra.local_rank, hydra.local_size, hydra.source) == (0, 2, "MPICH")


def test_placement_slurm():
    base = {"SLURM_PROCID": "7", "SLURM_NTASKS": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "3"}
    p = placement({**base, "SLURM_NTASKS_PER_NODE": "2"})
    assert (p.node, p.local_rank, p.local_size, p.source) == ("Slurm node 3", 1, 2, "Slurm")
    # Without --ntasks-per-node: from the step's tasks per node, '2(x3),3' -> node 3 runs 3.
    p = placement({**base, "SLURM_STEP_TASKS_PER_NODE": "2(x3),3"})
    assert p.local_size == 3
    assert placement({**base, "SLURM_TASKS_PER_NODE": "garbage"}).local_size is None


def test_placement_without_launcher_is_the_host():
    p = placement({"RANK": "0", "WORLD_SIZE": "2"})  # e.g. a hand-made env:// job
    assert (p.node, p.local_rank, p.source) == (None, None, "host name")
    assert placement({}).source == "host name"


def test_placement_rejects_non_numbers():
    with pytest.raises(ValueError, match="LOCAL_RANK='x' is not an integer"):
        placement({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"})


# ---- node_layout(): every rank's placement -> the nodes ----------------------------------------


def torchrun(group, local, size=2, host="h"):
    return Placement(host, f"torchrun node {group}", local, size, "torchrun")


def test_two_torchrun_nodes_on_one_host_are_two_nodes():
    ps = [torchrun(0, 0), torchrun(0, 1), torchrun(1, 0), torchrun(1, 1)]
    assert node_layout(ps) == [[0, 1], [2, 3]]


def test_local_rank_orders_a_node():
    ps = [torchrun(0, 1), torchrun(1, 0), torchrun(0, 0), torchrun(1, 1)]
    assert node_layout(ps) == [[2, 0], [1, 3]]


def test_host_names_when_the_launcher_says_nothing():
    ps = [Placement(h, None, None, None, "host name") for h in ["a", "b", "a", "b", "b"]]
    assert node_layout(ps) == [[0, 2], [1, 3, 4]]


def test_repeated_local_rank_raises_naming_the_ranks():
    ps = [torchrun(0, 0, 3), torchrun(0, 1, 3), torchrun(0, 1, 3)]
    with pytest.raises(ValueError) as e:
        node_layout(ps)
    msg = str(e.value)
    assert "torchrun node 0 (ranks 0-2, torchrun)" in msg, msg
    assert "rank 0: 0, rank 1: 1, rank 2: 1" in msg, msg


def test_wrong_local_size_raises_naming_the_ranks():
    ps = [torchrun(0, 0, 2), torchrun(0, 1, 2), torchrun(1, 0, 2)]
    with pytest.raises(
        ValueError,
        match=r"torchrun node 1 \(rank 2, torchrun\) has 1 ranks.*"
        r"rank 2: 2",
    ):
        node_layout(ps)


def test_mixed_launchers_raise():
    ps = [torchrun(0, 0, 1), Placement("h", None, None, None, "host name")]
    with pytest.raises(ValueError, match="torchrun on rank 0; host name on rank 1"):
        node_layout(ps)


def test_slurm_tasks_per_node_parsing():
    assert [launch._slurm_tasks_on_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, None]


# ---- queries and errors before init() -----------------------------------------------------------


def test_queries_before_init():
    assert not hvd.is_initialized()
    assert hvd.mpi_built() is False and hvd.mpi_enabled() is False
    assert hvd.gloo_enabled() is False  # the engine is not running
    assert hvd.gloo_built() is True
    assert type(hvd.nccl_built()) is int
    with pytest.raises(ValueError, match="MPI is not enabled"):
        hvd.mpi_threads_supported()
    for query in (hvd.is_homogeneous, hvd.rank, hvd.local_size, hvd.cross_rank, hvd.stop_timeline):
        with pytest.raises(ValueError, match="not been initialized|has been shut down"):
            query()
    with pytest.raises(
        RuntimeError, match="not been initialized|has been shut down"
    ):  # both, for old code
        hvd.start_timeline("t.json", mark_cycles=True)


def test_error_classes():
    assert issubclass(hvd.HorovodInternalError, RuntimeError)
    assert issubclass(NotInitializedError, ValueError) and issubclass(
        NotInitializedError, RuntimeError
    )


# ---- real ranks ----------------------------------------------------------------------------------

TWO_RANK_CHECKS = [
    "build_queries",
    "layout_under_gradfuse_run",
    "mismatch_is_internal_error",
    "usage_errors_keep_their_types",
    "optimizer_state_root_stepped_others_not",
    "optimizer_state_every_rank_stepped_differently",
    "optimizer_state_root_without_state",
    "optimizer_state_sparse_adam",
    "optimizer_state_tensor_hyperparameters",
    "optimizer_state_distributed_optimizer",
    "optimizer_state_layout_mismatch_raises_everywhere",
    "optimizer_state_bad_arguments",
    "dead_peer_is_internal_error",  # last: rank 1 leaves the job
]
assert set(TWO_RANK_CHECKS) | {"torchrun_two_nodes_on_one_host"} == set(api_worker.CHECKS)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api2")
    # GRADFUSE_TIMEOUT: how soon the dead peer is named (generous for a loaded machine).
    env = {"GRADFUSE_TIMEOUT": "6"}
    return run_ranks(
        tmp, 2, "gradfuse.run", HERE / "api_worker.py", TWO_RANK_CHECKS, env, timeout=400
    )


@pytest.mark.timeout(500)
@pytest.mark.parametrize("check", TWO_RANK_CHECKS)
def test_two_ranks(two_ranks, check):
    assert_check_ok(*two_ranks, check)


def spawn(tmp: Path, per_rank_env: list[dict], args: list[str], timeout: float = 240):
    """Starts one worker per entry of per_rank_env (each with its own launcher variables, as
    torchrun would set them) and returns [results per rank]; the group is killed on timeout."""
    n = len(per_rank_env)
    common = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(launch.free_port()),
        "WORLD_SIZE": str(n),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "api_worker.py"), *args],
            env={**worker_env(tmp, n), **common, "RANK": str(r), **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r, extra in enumerate(per_rank_env)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            logs.append(p.communicate()[0] + "\n[test] killed after the timeout")
    results = []
    for r in range(n):
        path = tmp / f"result.rank{r}.json"
        results.append(api_worker.json.loads(path.read_text()) if path.exists() else None)
    return results, "\n".join(logs)[-6000:]


@pytest.mark.timeout(300)
def test_four_ranks_as_two_torchrun_nodes_on_one_host(tmp_path):
    # What `torchrun --nnodes 2 --nproc_per_node 2` sets on each of two agents on this host;
    # the hierarchical allreduce must follow the same layout.
    envs = [
        {
            "LOCAL_RANK": str(r % 2),
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": str(r // 2),
            "GRADFUSE_HIERARCHICAL_ALLREDUCE": "1",
        }
        for r in range(4)
    ]
    results, log = spawn(tmp_path, envs, ["torchrun_two_nodes_on_one_host"])
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote no results:\n{log}"
        assert res["torchrun_two_nodes_on_one_host"] == "ok", f"rank {r}: {res}\n{log}"


@pytest.mark.timeout(300)
def test_inconsistent_layout_raises_on_every_rank(tmp_path):
    # Three ranks claim node 0, two of them local rank 1: every rank's init() says so.
    envs = [
        {"LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": "3", "GROUP_RANK": "0"}
        for local in (0, 1, 1)
    ]
    results, log = spawn(tmp_path, envs, ["--expect-init-error"])
    messages = set()
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote no results:\n{log}"
        messages.add(res["init"])
    assert len(messages) == 1, messages  # the same error everywhere
    msg = messages.pop()
    assert msg.startswith("ValueError: gradfuse.init(): inconsistent node layout"), msg
    assert "rank 0: 0, rank 1: 1, rank 2: 1" in msg, msg
