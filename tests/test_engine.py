"""Multi-process tests of the communication engine: real ranks over Gloo on this host.

One group of processes per configuration runs every check in tests/engine_worker.py (process
start-up dominates on 2 cores); each test below then reads its check's result on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PYTHON_DIR = HERE.parent / "python"
sys.path.insert(0, str(HERE))
import engine_worker

CHECKS = sorted(engine_worker.CHECKS)
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _env(tmp, n, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADFUSE_", "RANK",
                                                                      "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{env.get('PYTHONPATH', '')}",
               ENGINE_TEST_OUT=str(tmp / "result"), EXPECT_SIZE=str(n), OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def _run_group(tmp_path_factory, n, launcher, extra_env=None):
    tmp = tmp_path_factory.mktemp(f"ranks{n}")
    worker = str(HERE / "engine_worker.py")
    if launcher == "gradfuse.run":
        cmd = [sys.executable, "-m", "gradfuse.run", "-np", str(n), worker, *CHECKS]
    else:
        cmd = [str(MPIEXEC), "-n", str(n), sys.executable, worker, *CHECKS]
    proc = subprocess.run(cmd, env=_env(tmp, n, extra_env), capture_output=True, text=True,
                          timeout=240, check=False)
    results = []
    for r in range(n):
        path = tmp / f"result.rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return proc, results


# 2 ranks through the gradfuse.run launcher, with a tiny fusion threshold (many batches);
# 4 ranks through mpiexec (MPI environment, mpi4py rendezvous) with the default threshold.
CONFIGS = {
    "2ranks-run": (2, "gradfuse.run", {"GRADFUSE_FUSION_THRESHOLD": "256"}),
    "4ranks-mpiexec": (4, "mpiexec", {}),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def group(request, tmp_path_factory):
    n, launcher, extra = CONFIGS[request.param]
    if launcher == "mpiexec" and not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    return _run_group(tmp_path_factory, n, launcher, extra)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", ["before_init", *CHECKS])
def test_engine_check(group, check):
    proc, results = group
    assert proc.returncode == 0, f"ranks failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}" \
                                 f"\n{proc.stderr[-4000:]}"
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} wrote no results:\n{proc.stderr[-4000:]}"
        assert res.get(check) == "ok", f"rank {rank}, {check}:\n{res.get(check)}"


@pytest.mark.timeout(120)
def test_run_launcher_propagates_failure(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1': sys.exit(3)\n"
                      "time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-m", "gradfuse.run", "-np", "2", str(script)],
                          env=_env(tmp_path, 2), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 3, proc.stderr
    assert "rank 1 exited with code 3" in proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("var,value,needle", [
    ("GRADFUSE_BOGUS", "1", "GRADFUSE_BOGUS"),
    ("GRADFUSE_FUSION_THRESHOLD", "lots", "GRADFUSE_FUSION_THRESHOLD"),
    ("GRADFUSE_CYCLE_TIME", "-1", "GRADFUSE_CYCLE_TIME"),
])
def test_bad_configuration_is_a_value_error(monkeypatch, var, value, needle):
    import gradfuse

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=needle):
        gradfuse.init()
    assert not gradfuse.is_initialized()


def test_bad_init_keyword():
    import gradfuse

    with pytest.raises(ValueError, match="fusion_threshold"):
        gradfuse.init(fusion_threshold="big")
    with pytest.raises(ValueError, match="cycle_time_ms"):
        gradfuse.init(cycle_time_ms=0)
