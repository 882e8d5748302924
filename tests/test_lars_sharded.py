"""gradfuse.optim.LARS on sharded parameters (DTensor Shard(0), FSDP2 fully_shard) on 2 and 3
CPU ranks: the trust ratio uses the full tensors' norms, so the result equals one process
running LARS on the full tensors. One group of ranks per rank count runs every check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lars_sharded_worker
from multiproc import assert_check_ok, checks_of, ranks_override, run_ranks

CHECKS = sorted(checks_of(vars(lars_sharded_worker)))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def group(request, tmp_path_factory):
    n = ranks_override(request.param)
    tmp = tmp_path_factory.mktemp(f"lars_sharded{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "lars_sharded_worker.py", CHECKS, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS)
def test_sharded_lars(group, check):
    assert_check_ok(*group, check)
