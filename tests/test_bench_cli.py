"""gradfuse-bench runs end to end (tiny sizes; the numbers are not checked: no timing
thresholds in tests) and rejects bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from multiproc import worker_env


def bench(tmp_path, *args):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gradfuse.bench", *args, "--json", str(out)],
        env=worker_env(tmp_path, 0),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_ops(tmp_path):
    out, result = bench(tmp_path, "ops", "--reps", "1")
    assert "gradfuse lars_update_" in out and "copy bandwidth" in out
    assert {r["impl"].split(" (")[0] for r in result["rows"]} >= {
        "gradfuse lars_update_",
        "gradfuse pack_",
        "gradfuse exact",
        "gradfuse sampled",
    }


@pytest.mark.timeout(300)
def test_allreduce(tmp_path):
    out, result = bench(
        tmp_path, "allreduce", "--np", "2", "--max-size", "4096", "--idle-seconds", "0.5"
    )
    assert result["ranks"] == 2 and [r["bytes"] for r in result["rows"]] == [1024, 4096]
    assert all(r["gradfuse_busbw"] > 0 and r["torch_flat_busbw"] > 0 for r in result["rows"])
    assert "busbw" in out
    assert "1 KiB latency" in out and "idle CPU" in out
    assert result["latency"]["engine_s"] > 0 and result["latency"]["direct_s"] > 0
    assert result["idle"]["with_engine_pct"] >= 0


@pytest.mark.timeout(300)
def test_train(tmp_path):
    out, result = bench(
        tmp_path,
        "train",
        "--np",
        "1,2",
        "--model",
        "mlp",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--batch-size",
        "4",
    )
    assert [r["ranks"] for r in result] == [1, 2]
    assert all(
        r["gradfuse_per_rank"] > 0 and r["gradfuse_views_per_rank"] > 0 and r["ddp_per_rank"] > 0
        for r in result
    )
    assert "gradfuse/DDP" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--np", "1,x"], "--np must be like 1,2,4"),
        (["train", "--np", "0"], "--np needs rank counts >= 1"),
        (["allreduce", "--np", "0"], "--np must be >= 1"),
        (["allreduce", "--max-size", "10"], "--max-size must be at least 1024"),
        (["ops", "--device", "cuda:0"], None),
    ],
)
def test_bad_arguments(args, message):
    import torch

    if message is None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "no CUDA device is available"
    proc = subprocess.run(
        [sys.executable, "-m", "gradfuse.bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
