"""Multi-process tests of op=Adasum: allreduce in every form and DistributedOptimizer(op=Adasum)
against a float64 reference of Horovod's formula (tests/adasum_worker.py), on 2 ranks, 4 ranks
(as 2 nodes x 2, so CUDA tensors exercise the per-node path) and 3 ranks, which Horovod does
not support: there every rank must raise."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import adasum_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

CHECKS = sorted(adasum_worker.CHECKS)
CONFIGS = {
    "2ranks": (2, {}),
    "3ranks": (3, {}),
    "4ranks-2x2": (4, {"GRADFUSE_TEST_LOCAL_SIZE": "2"}),
}
if ranks_override(0):
    CONFIGS = {f"{ranks_override(0)}ranks": (ranks_override(0), {})}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def group(request, tmp_path_factory):
    n, extra = CONFIGS[request.param]
    tmp = tmp_path_factory.mktemp(f"adasum{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "adasum_worker.py", CHECKS, extra, 400)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("check", CHECKS)
def test_adasum_check(group, check):
    proc, results = group
    assert_check_ok(proc, results, check)
