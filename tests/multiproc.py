"""Multi-process test harness shared by the engine and training tests.

The pytest side (:func:`run_ranks`) starts one group of real ranks (by ``gradfuse.run`` or
``mpiexec``) running a worker script with a list of check names; process start-up dominates
on 2 cores, so one group serves many tests. The worker side (:func:`run_checks`) runs each
check, catching failures, and writes ``{check: "ok" | traceback}`` to
``$WORKER_RESULTS.rank<r>.json``; :func:`assert_check_ok` then reads one check on every rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from functools import cache
from pathlib import Path

import torch

MPIEXEC = Path(sys.executable).parent / "mpiexec"

# Settings that choose where the workers' tensors live, passed through to the ranks (every other
# GRADFUSE_* variable of the caller is dropped). GRADFUSE_TEST_DEVICE: cpu (default) or cuda;
# GRADFUSE_CUDA_BACKEND: the engine's transport for CUDA tensors (nccl, or gloo so that several
# ranks can share one GPU). scripts/gpu_check.sh sets both.
PASSED_THROUGH = ("GRADFUSE_TEST_DEVICE", "GRADFUSE_CUDA_BACKEND")


def worker_env(tmp: Path, n: int, extra: dict | None = None) -> dict:
    # Drop the caller's launcher and gradfuse settings: each group sets its own.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GRADFUSE_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))
    }
    env.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
    env.update(WORKER_RESULTS=str(tmp / "result"), EXPECT_SIZE=str(n), OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def ranks_override(default: int) -> int:
    """The rank count of a multi-process test group: GRADFUSE_TEST_RANKS when set (e.g. 1 to
    run on one GPU over NCCL), else the configuration's own."""
    raw = os.environ.get("GRADFUSE_TEST_RANKS", "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"GRADFUSE_TEST_RANKS must be an integer >= 1, got {raw!r}")
    return int(raw)


# ---- worker side: the device the checks run on -----------------------------------------------


@cache
def device():
    """This rank's test device, from GRADFUSE_TEST_DEVICE: cpu (the default) or cuda, where rank
    r uses cuda:{local_rank % device_count} (several ranks may share one GPU) and makes it the
    current device. Call it before gradfuse.init(), so the transports bind to that GPU."""
    kind = os.environ.get("GRADFUSE_TEST_DEVICE", "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ValueError(f"GRADFUSE_TEST_DEVICE must be cpu or cuda, got {kind!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("GRADFUSE_TEST_DEVICE=cuda but torch.cuda.is_available() is False")
    local_rank = next(
        (
            int(os.environ[k])
            for k in ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")
            if k in os.environ
        ),
        0,
    )
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


# Tensor factories on the test device: the checks write ones(3) where they mean "a tensor on
# the device under test" and keep torch.ones(3) for tensors that must stay on the CPU.
def ones(*size, **kw):
    return torch.ones(*size, device=device(), **kw)


def zeros(*size, **kw):
    return torch.zeros(*size, device=device(), **kw)


def empty(*size, **kw):
    return torch.empty(*size, device=device(), **kw)


def full(size, value, **kw):
    return torch.full(size, value, device=device(), **kw)


def arange(*args, **kw):
    return torch.arange(*args, device=device(), **kw)


def tensor(data, **kw):
    return torch.tensor(data, device=device(), **kw)


def run_ranks(
    tmp: Path,
    n: int,
    launcher: str,
    worker: Path,
    args: list[str],
    extra_env: dict | None = None,
    timeout: float = 240,
):
    """Runs `worker args...` on n ranks; returns (CompletedProcess, [results per rank])."""
    if launcher == "gradfuse.run":
        cmd = [sys.executable, "-m", "gradfuse.run", "-np", str(n), str(worker), *args]
    elif launcher == "mpiexec":
        cmd = [str(MPIEXEC), "-n", str(n), sys.executable, str(worker), *args]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    # Its own session, so a hung group is killed whole (launcher and ranks), not orphaned.
    with subprocess.Popen(
        cmd,
        env=worker_env(tmp, n, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            stderr += f"\n[harness] {n} ranks killed after {timeout} s: the group hung"
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    results = []
    for r in range(n):
        path = tmp / f"result.rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return proc, results


def assert_check_ok(proc, results, check: str) -> None:
    # A failed group names the check that failed first (run_checks stops there).
    first_failure = next(
        (
            f"rank {rank}, {name}:\n{outcome}"
            for rank, res in enumerate(results)
            for name, outcome in (res or {}).items()
            if outcome != "ok" and not outcome.startswith("not run")
        ),
        "",
    )
    assert proc.returncode == 0, (
        f"ranks failed (rc {proc.returncode}); first failed check: {first_failure}\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} wrote no results:\n{proc.stderr[-4000:]}"
        assert res.get(check) == "ok", f"rank {rank}, {check}:\n{res.get(check)}"


def run_checks(checks: dict, names: list[str], rank: int, results: dict | None = None) -> None:
    """Worker side: runs checks[name]() for each name and writes this rank's results.

    The first failure ends this rank at once (exit code 1, so the launcher stops the others):
    a check that fails on one rank leaves the ranks out of step, and going on would turn the
    failure into a hang (the other ranks wait in a collective this rank has abandoned)."""
    results = dict(results or {})
    failed = None
    for name in names:
        if failed is not None:
            results[name] = f"not run: '{failed}' failed before it on rank {rank}"
            continue
        try:
            checks[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (any failure is reported, not raised)
            results[name] = traceback.format_exc()
            failed = name
        print(f"rank {rank}: {name}: {results[name]}", flush=True)
    with open(f"{os.environ['WORKER_RESULTS']}.rank{rank}.json", "w") as f:
        json.dump(results, f)
    if failed is not None:
        os._exit(1)


def checks_of(namespace: dict) -> dict:
    """A worker module's checks: its functions named check_<name>, keyed by <name>."""
    return {k[len("check_") :]: fn for k, fn in namespace.items() if k.startswith("check_")}


def worker_main(checks: dict, names: list[str]) -> None:
    """A worker's whole run: gradfuse.init(), the named checks, results, shutdown()."""
    import gradfuse as hvd

    device()  # picks and sets this rank's GPU before the transports start
    hvd.init()
    try:
        run_checks(checks, names, hvd.rank())
    finally:
        hvd.shutdown()


def torch_distributed_worker_main(checks: dict, names: list[str], backend: str) -> None:
    """A worker's whole run without gradfuse.init(): a torch.distributed group, the named checks,
    results, then the group destroyed. Every rank reaches the barrier first (a rank whose check
    failed has exited), so no rank tears its transport down while a peer still uses it.

    Under CI load a rank of the sharded-LARS worker (FSDP2/DTensor over Gloo, no gradfuse
    engine) still aborted in the interpreter's teardown ("terminate called without an active
    exception") after its results were written and its group destroyed; not root-caused. The
    worker therefore ends with os._exit(0) once the group is gone: every check's outcome is
    already recorded, and a crash before that point still fails the test."""
    import torch.distributed as dist

    dist.init_process_group(backend)
    try:
        run_checks(checks, names, dist.get_rank())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
