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
from multiproc import assert_check_ok, run_ranks

CHECKS = sorted(training_worker.CHECKS)
# The accuracy check trains 300 steps; once, at 2 ranks, is enough.
SLOW = {"topk_compression_accuracy"}


@pytest.fixture(scope="module", params=[2, 4])
def group(request, tmp_path_factory):
    n = request.param
    checks = CHECKS if n == 2 else [c for c in CHECKS if c not in SLOW]
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
    if n != 2 and check in SLOW:
        pytest.skip("run at 2 ranks only")
    assert_check_ok(proc, results, check)
