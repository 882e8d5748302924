"""Multi-process tests of the grouped collectives, the collectives' gradients (Horovod's),
reducescatter's scale factors and sparse allreduce / DistributedOptimizer's sparse path: real
ranks over Gloo on this host, one group of processes per configuration (2 and 3 ranks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import grouped_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

CHECKS = sorted(grouped_worker.CHECKS)
NEEDS_TWO_RANKS = {"grouped_mismatch_fails_every_rank"}

CONFIGS = [2, 3]
# GRADFUSE_TEST_RANKS=n: one group of n ranks instead (scripts/gpu_check.sh on one GPU).
if ranks_override(0):
    CONFIGS = [ranks_override(0)]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda n: f"{n}ranks")
def group(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"grouped{n}")
    checks = [c for c in CHECKS if n > 1 or c not in NEEDS_TWO_RANKS]
    return n, run_ranks(tmp, n, "gradfuse.run", HERE / "grouped_worker.py", checks, timeout=400)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("check", CHECKS)
def test_grouped_check(group, check):
    n, (proc, results) = group
    if n == 1 and check in NEEDS_TWO_RANKS:
        pytest.skip("needs two ranks (one rank disagrees with another)")
    assert_check_ok(proc, results, check)
