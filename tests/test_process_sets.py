"""Multi-process tests of Horovod's process sets: every collective on subsets of the ranks,
sets running side by side (a stall in one does not block another), add/remove, misuse and
mismatches. Real ranks over Gloo on this host, one group of processes per rank count; the
checks live in tests/process_sets_worker.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import process_sets_worker
from multiproc import assert_check_ok, run_ranks

# The stall check shuts the engine down and starts it again; the shutdown check last.
FIRST = ["init_process_sets"]
LAST = ["stall_in_one_set_does_not_block_another", "shutdown_invalidates_sets"]
CHECKS = FIRST + sorted(set(process_sets_worker.CHECKS) - set(FIRST) - set(LAST)) + LAST


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def group(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"ps{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "process_sets_worker.py", CHECKS, timeout=420)


@pytest.mark.timeout(480)
@pytest.mark.parametrize("check", CHECKS)
def test_process_sets_check(group, check):
    proc, results = group
    assert_check_ok(proc, results, check)


def test_process_set_objects_without_init():
    import gradfuse as hvd

    ps = hvd.ProcessSet([3, 1])
    assert ps.ranks == [1, 3] and ps.process_set_id is None and ps.size() is None
    assert str(ps) == "ProcessSet(process_set_id=None, ranks=[1, 3], mpi_comm=None)"
    assert hvd.global_process_set.process_set_id == 0
    with pytest.raises(RuntimeError, match="not been initialized|has been shut down"):
        hvd.add_process_set([0])
    with pytest.raises(ValueError, match="list of ints"):
        hvd.ProcessSet([1.0])
