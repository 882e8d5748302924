"""gradfuse.ddp's comm hooks inside real torch DDP models, on CPU ranks over Gloo (no
gradfuse.init()): against DDP's own fp16/bf16 hooks, PowerSGD and no hook, every rank's
parameters bit for bit, checkpoints, the hierarchical path against a flat allreduce, and bad
input. One group of ranks per configuration (tests/ddp_hooks_worker.py):

- 2 ranks: everything, including the accuracy run and the exact checkpoint round trip;
- 3 ranks: a world size that is not a power of two (fp16 within a rounding, not bitwise), one
  node of 3 (the reduce-scatter pads), and nodes of 2 that do not divide 3;
- 4 ranks as 2 nodes x 2 (GRADFUSE_TEST_LOCAL_SIZE): the hierarchical path across nodes.

(The `gradfuse-bench train --ddp-hook` rows run in tests/test_readme_commands.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_hooks_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

EVERY = sorted(set(ddp_hooks_worker.CHECKS) - {"hierarchical_uneven_nodes_raise_everywhere"})
CONFIGS = {
    "2ranks": (2, {}, EVERY),
    "3ranks": (
        3,
        {},
        [
            "fp16_matches_ddp_fp16_compress_hook",
            "fp16_scale_before_rounding_and_overflow_flag",
            "hierarchical_equals_flat_allreduce",
            "hierarchical_uneven_nodes_raise_everywhere",
            "topk_checkpoint_round_trip",
            "topk_exact_ranks_identical",
        ],
    ),
    "4ranks-2x2": (
        4,
        {"GRADFUSE_TEST_LOCAL_SIZE": "2"},
        [
            "fp16_matches_ddp_fp16_compress_hook",
            "hierarchical_equals_flat_allreduce",
            "topk_sampled_ranks_identical",
        ],
    ),
}
# GRADFUSE_TEST_RANKS=n (scripts/gpu_check.sh): one group of n ranks, every check.
if ranks_override(0):
    CONFIGS = {f"{ranks_override(0)}ranks": (ranks_override(0), {}, EVERY)}
CASES = [(name, check) for name, (_, _, checks) in CONFIGS.items() for check in checks]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    started = {}

    def get(name):
        if name not in started:
            n, env, checks = CONFIGS[name]
            tmp = tmp_path_factory.mktemp(f"ddp_{name}")
            started[name] = run_ranks(
                tmp, n, "gradfuse.run", HERE / "ddp_hooks_worker.py", checks, env, timeout=300
            )
        return started[name]

    return get


@pytest.mark.timeout(400)
@pytest.mark.parametrize("config, check", CASES)
def test_ddp_hooks(groups, config, check):
    proc, results = groups(config)
    assert_check_ok(proc, results, check)


def test_bench_rejects_an_unknown_ddp_hook():
    proc = subprocess.run(
        [sys.executable, "-m", "gradfuse.bench", "train", "--ddp-hook", "fp16,fp8"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "got fp8" in proc.stderr, proc.stderr
