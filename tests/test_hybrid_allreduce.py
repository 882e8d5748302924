"""Hybrid all-reduce (the seed slides' third strategy): with GRADFUSE_HIERARCHICAL_THRESHOLD,
the engine reduces each fused message hierarchically or flat by its size. Real ranks over Gloo
on this host, nodes simulated with GRADFUSE_TEST_LOCAL_SIZE: 2 ranks as 2 nodes of 1, 4 ranks
as 2 nodes of 2. Every dtype, sizes on both sides of the threshold, fused and lone messages;
hybrid_worker.py checks the results and the path each message took."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from multiproc import assert_check_ok, run_ranks

# hybrid_worker.py's checks (not imported: it reads the group's environment at import).
CHECKS = [
    "path_follows_message_size",
    "fused_message_decides_not_its_tensors",
    "threshold_must_agree",
    "plan_file_sets_the_engine",
]
CONFIGS = {"2ranks-2x1": (2, "1"), "4ranks-2x2": (4, "2")}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def group(request, tmp_path_factory):
    n, local = CONFIGS[request.param]
    env = {
        "GRADFUSE_HIERARCHICAL_ALLREDUCE": "1",
        "GRADFUSE_TEST_LOCAL_SIZE": local,
        "GRADFUSE_HIERARCHICAL_THRESHOLD": "4096",
    }
    tmp = tmp_path_factory.mktemp(f"hybrid{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "hybrid_worker.py", CHECKS, env)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS)
def test_hybrid_check(group, check):
    proc, results = group
    assert_check_ok(proc, results, check)


@pytest.mark.timeout(300)
def test_allreduce_bench_hybrid_row(tmp_path):
    # gradfuse-bench allreduce --hybrid: the hybrid column next to flat and hierarchical.
    from gradfuse.bench.__main__ import main

    out = tmp_path / "ar.json"
    argv = ["allreduce", "--np", "4", "--max-size", "4096", "--hybrid", "2048"]
    argv += ["--idle-seconds", "0.2", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["hybrid_threshold"] == 2048
    for row in result["rows"]:
        for key in ("gradfuse", "gradfuse_hierarchical", "gradfuse_hybrid"):
            assert row[key] > 0 and row[f"{key}_busbw"] > 0
