"""Launch paths besides gradfuse.run and mpiexec (covered by test_engine.py): torchrun, a
default group the user initialized first, and Slurm's environment."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from gradfuse import launch
from multiproc import worker_env

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    import gradfuse as hvd
    if sys.argv[1] == "user-group":
        dist.init_process_group("gloo")   # the user's own default group, before gradfuse
    hvd.init()
    r, n = hvd.rank(), hvd.size()
    total = hvd.allreduce(torch.tensor([r + 1.0]), op=hvd.Sum, name="x")
    assert total.item() == n * (n + 1) / 2, total
    if sys.argv[1] == "user-group":
        mine = torch.tensor([1.0])
        dist.all_reduce(mine)              # the user's collectives still work beside the engine
        assert mine.item() == n
        hvd.shutdown()
        dist.all_reduce(mine)              # and after it: gradfuse leaves the user's group alone
        assert mine.item() == n * n
        dist.destroy_process_group()
    else:
        hvd.shutdown()
    print(f"rank {r} ok", flush=True)
""")


@pytest.mark.timeout(150)
def test_torchrun(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun next to the interpreter")
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), "plain"],
        env=worker_env(tmp_path, 2),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


@pytest.mark.timeout(150)
def test_already_initialized_default_group(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "gradfuse.run", "-np", "2", str(script), "user-group"],
        env=worker_env(tmp_path, 2),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


def test_slurm_environment(monkeypatch):
    for var in (
        "RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[03-05,07],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    info = launch.detect()
    assert (info.rank, info.size, info.master_addr, info.launcher) == (3, 8, "gpu03", "slurm")
    assert info.master_port == 20000 + 123456 % 20000
    monkeypatch.setenv("SLURM_PROCID", "8")
    with pytest.raises(ValueError, match="inconsistent rank 8 / size 8 from slurm"):
        launch.detect()
