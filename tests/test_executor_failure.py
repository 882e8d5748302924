"""The engine's executor thread fails a batch while another is in flight and more are queued
(tests/executor_failure_worker.py): every rank's handles end, with the victim's error, and the
group ends (no hang). 3 ranks (the fault matrix runs the one-batch case at 2 and 4); the last
rank is the victim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from multiproc import assert_check_ok, run_ranks

ENV = {
    "GRADFUSE_TIMEOUT": "6",  # a live rank on a loaded 2-core machine must not look dead
    "GRADFUSE_FUSION_THRESHOLD": "256",
}


@pytest.mark.timeout(180)
def test_failure_with_batches_queued(tmp_path):
    proc, results = run_ranks(
        tmp_path,
        3,
        "gradfuse.run",
        HERE / "executor_failure_worker.py",
        ["failure_with_batches_queued"],
        ENV,
        timeout=150,
    )
    assert_check_ok(proc, results, "failure_with_batches_queued")
