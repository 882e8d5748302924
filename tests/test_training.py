"""Multi-process training tests: DistributedOptimizer equivalence with one-process training on
the digits data set, compression, error and warning cases, broadcast helpers. One group of
ranks per world size runs every check in tests/training_worker.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import training_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

CHECKS = sorted(training_worker.CHECKS)
# The accuracy check trains 300 steps; once, in the group of SLOW_AT ranks, is enough.
SLOW = {"topk_compression_accuracy"}

# One group of ranks per world size. GRADFUSE_TEST_RANKS=n replaces them with one group of n
# ranks, which runs every check it can (scripts/gpu_check.sh: 1 rank over NCCL, 2 ranks sharing
# one GPU over Gloo).
WORLD_SIZES, SLOW_AT = [2, 4], 2
if ranks_override(0):
    WORLD_SIZES, SLOW_AT = [ranks_override(0)], ranks_override(0)


def skip_reason(n, check):
    """Why the group of n ranks does not run `check`, or None when it does."""
    if check in SLOW and n != SLOW_AT:
        return f"run at {SLOW_AT} ranks only"
    if n == 1 and check in training_worker.NEEDS_TWO_RANKS:
        return "needs two ranks (one rank sends what another holds)"
    return None


@pytest.fixture(scope="module", params=WORLD_SIZES)
def group(request, tmp_path_factory):
    n = request.param
    checks = [c for c in CHECKS if skip_reason(n, c) is None]
    return n, run_ranks(
        tmp_path_factory.mktemp(f"train{n}"),
        n,
        "gradfuse.run",
        HERE / "training_worker.py",
        checks,
        timeout=600,
    )


@pytest.mark.timeout(700)
@pytest.mark.parametrize("check", CHECKS)
def test_training_check(group, check):
    n, (proc, results) = group
    reason = skip_reason(n, check)
    if reason:
        pytest.skip(reason)
    assert_check_ok(proc, results, check)
