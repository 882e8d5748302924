"""float64 allreduce is scaled in double on every engine path: 3 real ranks over Gloo.

One group of 3 ranks (an Average's 1/3 is not a float) runs every check in
tests/fp64_worker.py; each test then reads its check's result on every rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fp64_worker
from multiproc import assert_check_ok, run_ranks

CHECKS = sorted(fp64_worker.CHECKS)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp64")
    return run_ranks(tmp, 3, "gradfuse.run", HERE / "fp64_worker.py", CHECKS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS)
def test_fp64_scaling(group, check):
    assert_check_ok(*group, check)
