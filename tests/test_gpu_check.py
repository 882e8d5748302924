"""CPU tests of the GPU check (scripts/gpu_check.sh, gpu_check.py, gpu_check_report.py), so the
code that first runs on a lent GPU machine does not rot between visits: the check script runs
at tiny sizes on the CPU, its element checks catch a corrupted op, the report writer renders,
and gpu_check.sh on a machine without a GPU says so and builds nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_check_script_runs_on_the_cpu(tmp_path):
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "gpu_check.py"), "--device", "cpu", "--small"]
        + ["--json", str(result)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = json.loads(result.read_text())
    assert parts["huge"]["status"] == "passed", parts
    assert "every one checked" in parts["huge"]["detail"]
    # The CUDA-only parts say why they skipped (sync still ran its workload on the CPU).
    assert parts["sync"]["status"] == "skipped" and "CUDA only" in parts["sync"]["detail"]
    assert parts["graph"]["status"] == "skipped" and "GPU" in parts["graph"]["detail"]
    assert parts["topk"]["status"] == "skipped" and "B/param" in parts["topk"]["detail"]


def _corrupt_after(fn, target):
    """fn, then one element near the end of target(args) changed: a kernel that missed it."""

    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        t = target(args, result)
        t[-3] += 1
        return result

    return wrapped


@pytest.mark.parametrize(
    "op,target,needle",
    [
        ("pack_", lambda a, r: a[1], "pack_"),
        ("unpack_", lambda a, r: a[1][-1], "unpack_"),
        ("lars_update_", lambda a, r: a[0][0], "lars_update_ weights"),
        ("topk_compress", lambda a, r: a[1], "topk_compress (exact) residual"),
    ],
)
def test_huge_check_catches_a_wrong_element(monkeypatch, op, target, needle):
    gpu_check = load("gpu_check")
    import gradfuse.ops

    monkeypatch.setattr(gradfuse.ops, op, _corrupt_after(getattr(gradfuse.ops, op), target))
    with pytest.raises(AssertionError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        gpu_check.part_huge(torch.device("cpu"), small=True)


def test_report_from_steps_and_bench(tmp_path):
    (tmp_path / "machine.txt").write_text("gpu: Fake GPU, 80 GiB\ndriver: 1.0\n")
    (tmp_path / "steps.tsv").write_text(
        "ops\t1. op tests\tpassed\t12\t300 passed in 11s\n"
        "sanitizer_racecheck\t3. racecheck\tskipped\t3\tthe tool could not run here\n"
        "check_huge\t4. huge\tfailed\t20\tAssertionError: pack_: element 2147483650 | x\n"
    )
    (tmp_path / "ops.log").write_text("log")
    bench = {
        "copy_bandwidth_gbps": 3000.0,
        "rows": [
            {
                "op": "pack",
                "impl": "gradfuse pack_",
                "ms": 0.05,
                "speedup": 8.0,
                "gbps": 2400.0,
                "share_of_copy": 0.8,
            },
            {
                "op": "pack",
                "impl": "torch.cat",
                "ms": 0.4,
                "speedup": None,
                "gbps": 300.0,
                "share_of_copy": 0.1,
            },
        ],
    }
    (tmp_path / "bench_ops.json").write_text(json.dumps(bench))
    assert load("gpu_check_report").main([str(tmp_path)]) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.index("## Machine") < md.index("## Steps") < md.index("## Benchmark")
    assert "- gpu: Fake GPU, 80 GiB" in md
    assert "**FAILED**: 1 passed, 1 failed, 1 skipped" in md
    assert "| 1. op tests | PASS | 12 | 300 passed in 11s | ops.log |" in md
    assert "element 2147483650 \\| x" in md  # a | in a summary does not break the table
    assert "**3000 GB/s**" in md and "| pack | gradfuse pack_ | 0.050 | 8.0x | 2400 | 80% |" in md


def _no_gpu_here():
    if shutil.which("nvidia-smi") or torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpu_check.sh would really build and run")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fake_nvidia_smi", [False, True])
def test_gpu_check_sh_without_a_gpu_builds_nothing(tmp_path, fake_nvidia_smi):
    """No nvidia-smi, or one that works while torch sees no GPU: one line, exit 0, and no
    pip, no build directory, no report."""
    _no_gpu_here()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "python-calls.txt"
    # $PYTHON logs every call, so a pip install (or anything else) would show.
    python = bin_dir / "python-logged"
    python.write_text(f'#!/bin/sh\necho "$*" >>{calls}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    if fake_nvidia_smi:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    path = os.pathsep.join(
        [str(bin_dir)]
        + [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvidia-smi").exists()]
    )
    builds_before = sorted((ROOT / "build").glob("gpu-check-*"))
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), str(out)],
        env={**os.environ, "PATH": path, "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs an NVIDIA GPU and found none" in lines[0], proc.stdout
    reason = "torch.cuda.is_available() is false" if fake_nvidia_smi else "no nvidia-smi"
    assert reason in lines[0]
    logged = calls.read_text() if calls.exists() else ""
    assert "pip" not in logged, logged
    assert (logged != "") == fake_nvidia_smi, logged  # torch is asked only past nvidia-smi
    assert not out.exists(), "no report directory without a GPU"
    assert sorted((ROOT / "build").glob("gpu-check-*")) == builds_before
