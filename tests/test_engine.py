"""Multi-process tests of the communication engine: real ranks over Gloo on this host.

One group of processes per configuration runs every check in tests/engine_worker.py (process
start-up dominates on 2 cores); each test below then reads its check's result on every rank."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine_worker
from multiproc import MPIEXEC, assert_check_ok, ranks_override, run_ranks, worker_env

CHECKS = sorted(engine_worker.CHECKS)


# 2 ranks through the gradfuse.run launcher, with a tiny fusion threshold (many batches);
# 4 ranks through mpiexec (MPI environment, mpi4py rendezvous) with the default threshold.
# GRADFUSE_TEST_RANKS=n replaces both with one group of n ranks through gradfuse.run (how
# scripts/gpu_check.sh runs these checks on CUDA at 1 rank over NCCL, 2 over Gloo).
CONFIGS = {
    "2ranks-run": (2, "gradfuse.run", {"GRADFUSE_FUSION_THRESHOLD": "256"}),
    "4ranks-mpiexec": (4, "mpiexec", {}),
}
if ranks_override(0):
    CONFIGS = {
        f"{ranks_override(0)}ranks-run": (
            ranks_override(0),
            "gradfuse.run",
            {"GRADFUSE_FUSION_THRESHOLD": "256"},
        )
    }


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def group(request, tmp_path_factory):
    n, launcher, extra = CONFIGS[request.param]
    if launcher == "mpiexec" and not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    tmp = tmp_path_factory.mktemp(f"ranks{n}")
    checks = [c for c in CHECKS if n > 1 or c not in engine_worker.NEEDS_TWO_RANKS]
    return n, run_ranks(tmp, n, launcher, HERE / "engine_worker.py", checks, extra)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", ["before_init", *CHECKS])
def test_engine_check(group, check):
    n, (proc, results) = group
    if n == 1 and check in engine_worker.NEEDS_TWO_RANKS:
        pytest.skip("needs two ranks (it makes one rank disagree with another)")
    assert_check_ok(proc, results, check)


@pytest.mark.timeout(120)
def test_engine_threads_leave_openmp_to_the_user(tmp_path):
    # Two threads per rank (the other groups run with one): the executor's pack_ and unpack_
    # would start an OpenMP team of their own, and libgomp would then throttle the user's.
    check = "engine_threads_leave_openmp_to_the_user"
    proc, results = run_ranks(
        tmp_path, 2, "gradfuse.run", HERE / "engine_worker.py", [check], {"OMP_NUM_THREADS": "2"}
    )
    assert_check_ok(proc, results, check)


@pytest.mark.timeout(300)
def test_pending_names_limit_is_reported_on_every_rank(group):
    # check_pending_names_limit: the ranks that never held the failed names report them too.
    n, (proc, _) = group
    if n == 1:
        pytest.skip("needs two ranks")
    out = proc.stdout + proc.stderr
    for rank in range(n):
        line = f"gradfuse[rank {rank}]: 5 tensors were submitted by some ranks and not yet by all"
        assert line in out, out
    assert "the 2 newest fail: tensor 'lonely.3' (submitted by rank 0, missing on rank" in out, out


@pytest.mark.timeout(120)
def test_run_launcher_propagates_failure(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gradfuse.run", "-np", "2", str(script)],
        env=worker_env(tmp_path, 2),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert "rank 1 exited with code 3" in proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "var,value,needle",
    [
        ("GRADFUSE_BOGUS", "1", "GRADFUSE_BOGUS"),
        ("GRADFUSE_FUSION_THRESHOLD", "lots", "GRADFUSE_FUSION_THRESHOLD"),
        ("GRADFUSE_CYCLE_TIME", "-1", "GRADFUSE_CYCLE_TIME"),
        ("GRADFUSE_CACHE_CAPACITY", "-1", "GRADFUSE_CACHE_CAPACITY"),
        ("GRADFUSE_PENDING_NAMES_LIMIT", "-1", "GRADFUSE_PENDING_NAMES_LIMIT"),
    ],
)
def test_bad_configuration_is_a_value_error(monkeypatch, var, value, needle):
    import gradfuse

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=needle):
        gradfuse.init()
    assert not gradfuse.is_initialized()


def test_kernel_and_build_variables_are_not_engine_errors(monkeypatch):
    from gradfuse import config

    for var in ("GRADFUSE_CPU_SIMD", "GRADFUSE_CUDA", "GRADFUSE_VENV"):
        monkeypatch.setenv(var, "scalar")
    config.resolve()  # no "unknown GRADFUSE_* variable" error


def test_bad_init_keyword():
    import gradfuse

    with pytest.raises(ValueError, match="fusion_threshold"):
        gradfuse.init(fusion_threshold="big")
    with pytest.raises(ValueError, match="cycle_time_ms"):
        gradfuse.init(cycle_time_ms=0)


def _name_reuse(steps):
    from gradfuse import _C

    return _C._testing.name_reuse(steps)


def test_a_name_is_in_use_until_its_operation_completes():
    # The engine's own TensorQueue and handle table; "complete" leaves device work running (a
    # CUDA collective queued on the engine's stream) until "finish".
    steps = [
        ("push", "w"),
        ("push", "w"),  # waiting for the other ranks
        ("negotiate", "w"),
        ("push", "w"),  # its collective is running
        ("complete", "w"),
        ("push", "w"),  # the engine is done, the device is not
        ("finish", "w"),
        ("push", "w"),  # completed: free again
    ]
    out = _name_reuse(steps)
    refused = [i for i, msg in enumerate(out) if msg]
    assert refused == [1, 3, 5], out
    for i in refused:
        assert "'w'" in out[i] and "already in flight" in out[i], out[i]
    assert out[7] == ""


@pytest.mark.parametrize(
    "finish",
    [
        ["complete_cpu"],  # CPU work: done when the engine completes it
        ["fail"],  # a failed operation (mismatch, stall, dead peer) frees its name too
        ["complete", "fail"],  # device work that failed
        ["complete_cpu", "release"],  # synchronized: the handle is gone
    ],
)
def test_a_name_is_free_once_its_operation_completed_or_failed(finish):
    steps = [("push", "x"), ("negotiate", "x"), ("push", "x")]
    steps += [(action, "x") for action in finish] + [("push", "x")]
    out = _name_reuse(steps)
    assert "'x'" in out[2], out
    assert out[-1] == "", out


def test_finished_names_are_forgotten_and_running_ones_kept():
    # Past 64 negotiated names the queue sweeps the finished ones out of its table; one still
    # running on the device must stay in use through the sweeps.
    steps = [("push", "slow"), ("negotiate", "slow"), ("complete", "slow")]
    for i in range(300):
        steps += [("push", f"g{i}"), ("negotiate", f"g{i}"), ("complete_cpu", f"g{i}")]
    steps += [("push", "slow"), ("push", "g0"), ("push", "g299")]
    out = _name_reuse(steps)
    assert "'slow'" in out[-3], out[-3]
    assert out[-2:] == ["", ""], out[-2:]
