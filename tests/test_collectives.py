"""Multi-process tests of hierarchical allreduce and of reducescatter, alltoall, barrier and
join: real ranks over Gloo on this host, one group of processes per configuration.

4 ranks act as 2 nodes x 2 ranks (the test-only GRADFUSE_TEST_LOCAL_SIZE) with hierarchical
allreduce on; the engine's allreduce checks from tests/engine_worker.py run there too, so the
hierarchical path sees every dtype, op, scale and mismatch case the flat one does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import collectives_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

CHECKS = sorted(collectives_worker.CHECKS)

# 3 flat ranks: splits that do not divide, and the same checks without the hierarchy.
CONFIGS = {
    "3ranks-flat": (3, {}),
    "4ranks-2x2-hierarchical": (
        4,
        {"GRADFUSE_HIERARCHICAL_ALLREDUCE": "1", "GRADFUSE_TEST_LOCAL_SIZE": "2"},
    ),
}
# GRADFUSE_TEST_RANKS=n: one flat group of n ranks instead (scripts/gpu_check.sh on one GPU).
if ranks_override(0):
    CONFIGS = {f"{ranks_override(0)}ranks-flat": (ranks_override(0), {})}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def group(request, tmp_path_factory):
    n, extra = CONFIGS[request.param]
    tmp = tmp_path_factory.mktemp(f"coll{n}")
    checks = [c for c in CHECKS if n > 1 or c not in collectives_worker.NEEDS_TWO_RANKS]
    return n, run_ranks(tmp, n, "gradfuse.run", HERE / "collectives_worker.py", checks, extra)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS)
def test_collectives_check(group, check):
    n, (proc, results) = group
    if n == 1 and check in collectives_worker.NEEDS_TWO_RANKS:
        pytest.skip("needs two ranks (one rank disagrees with, or waits for, another)")
    assert_check_ok(proc, results, check)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "var,value",
    [
        ("GRADFUSE_HIERARCHICAL_ALLREDUCE", "sometimes"),
        ("GRADFUSE_TEST_LOCAL_SIZE", "-1"),
        ("GRADFUSE_TEST_LOCAL_SIZE", "two"),
    ],
)
def test_bad_hierarchy_configuration_is_a_value_error(monkeypatch, var, value):
    import gradfuse

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        gradfuse.init()
    assert not gradfuse.is_initialized()
