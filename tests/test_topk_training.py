"""Top-k compression keeps every rank's model bit for bit identical: 4 ranks, 200 steps of
DistributedOptimizer(compression=Compression.topk(...)), exact and sampled selection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import topk_training_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

CHECKS = sorted(topk_training_worker.CHECKS)
RANKS = ranks_override(4)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    return run_ranks(
        tmp_path_factory.mktemp("topk_train"),
        RANKS,
        "gradfuse.run",
        HERE / "topk_training_worker.py",
        CHECKS,
        timeout=600,
    )


@pytest.mark.timeout(700)
@pytest.mark.parametrize("check", CHECKS)
def test_topk_training_check(group, check):
    proc, results = group
    assert_check_ok(proc, results, check)
