"""Settings that must agree are checked at init() (a mismatch raises on every rank, naming each
rank's value, instead of a hang until timeout_s), a blocking collective inside
submitted_together() raises instead of waiting for its own held submission, and a child of
os.fork() neither uses nor stops the parent's engine. Real ranks over Gloo: 2 and 3."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import init_worker
from multiproc import assert_check_ok, run_ranks

CHECKS = sorted(init_worker.CHECKS)


@pytest.fixture(scope="module", params=[2, 3])
def group(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"init{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "init_worker.py", CHECKS, timeout=150)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("check", CHECKS)
def test_init_and_misuse(group, check):
    assert_check_ok(*group, check)
