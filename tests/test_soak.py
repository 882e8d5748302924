"""The 4-rank soak (tests/soak_worker.py): 1,000 steps of random tensor sets and collectives,
submitted in a different order on every rank from several threads, results bitwise equal to
the seeds' reference, and no handle or thread left after shutdown()."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from multiproc import assert_check_ok, run_ranks


@pytest.fixture(scope="module")
def soak(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    return run_ranks(tmp, 4, "gradfuse.run", HERE / "soak_worker.py", [], timeout=400)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("check", ["soak", "no_thread_left"])
def test_soak_four_ranks(soak, check):
    proc, results = soak
    print("\n".join(line for line in proc.stdout.splitlines() if "soak:" in line or "OS" in line))
    assert_check_ok(proc, results, check)
