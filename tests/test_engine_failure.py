"""Observability and failure: stats, the timeline, and never a hang: a tensor some ranks never submit (stall inspector), and a rank that
dies mid-run (liveness monitor). One group of 3 ranks runs the checks of
tests/failure_worker.py in order; the last one kills rank 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from multiproc import run_ranks

ENV = {
    # Generous for a loaded 2-core machine: a live rank must never look dead.
    "GRADFUSE_TIMEOUT": "6",
    "GRADFUSE_STALL_WARNING_TIME": "0.3",
    "GRADFUSE_STALL_SHUTDOWN_TIME": "1",
}


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failure")
    # The victim exits with code 0, so the launcher lets the survivors finish.
    return tmp, *run_ranks(
        tmp,
        3,
        "gradfuse.run",
        HERE / "failure_worker.py",
        ["stats", "timeline", "stall", "join_outlives_stall_shutdown", "dead_rank"],
        {**ENV, "GRADFUSE_TIMELINE": str(tmp / "from_init.json")},
        timeout=120,
    )


def _check(group, check):
    _, proc, results = group
    for rank, res in enumerate(results):
        assert res is not None, f"rank {rank} wrote no results:\n{proc.stdout}\n{proc.stderr}"
        assert res.get(check) == "ok", f"rank {rank}, {check}:\n{res.get(check)}\n{proc.stderr}"


@pytest.mark.timeout(180)
def test_stats(group):
    _check(group, "stats")


@pytest.mark.timeout(180)
def test_stall_fails_the_withheld_tensor(group):
    _check(group, "stall")


@pytest.mark.timeout(180)
def test_stall_warning_names_tensor_and_missing_rank(group):
    _, proc, _ = group
    out = proc.stdout + proc.stderr
    for rank in range(3):  # every rank reports it
        assert f"gradfuse[rank {rank}]: stall warning: tensor 'withheld'" in out, out
    assert "missing on rank 1" in out


@pytest.mark.timeout(180)
def test_join_is_never_given_up_on_as_stalled(group):
    _check(group, "join_outlives_stall_shutdown")


@pytest.mark.timeout(180)
def test_dead_rank_fails_survivors_naming_it(group):
    _check(group, "dead_rank")


@pytest.mark.timeout(180)
def test_timeline_phases_per_tensor(group):
    _check(group, "timeline")


@pytest.mark.timeout(180)
def test_timeline_from_init_is_closed_json(group):
    import gradfuse

    tmp = group[0]
    # Written from init() until start_timeline() switched to another file, which closed it.
    events = json.loads((tmp / "from_init.json").read_text())
    tracks = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert tracks == {"stats.0", "stats.1", "engine: negotiation", "engine: collectives"}
    assert events == gradfuse.timeline.load(tmp / "from_init.json")


def test_timeline_load_tolerates_a_killed_writer(tmp_path):
    import gradfuse

    events = [{"name": "pack", "ph": "X", "tid": 1, "ts": i, "dur": 1} for i in range(3)]
    text = "[\n" + ",\n".join(json.dumps(e) for e in events)
    for cut in (text, text + ",\n", text + ',\n{"name": "unp'):
        (tmp_path / "t.json").write_text(cut)
        assert gradfuse.timeline.load(tmp_path / "t.json") == events
