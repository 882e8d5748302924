"""Bad calls to the collectives fail at the call, on the calling rank, before anything is
submitted: first 30 fixed calls at one rank, in this process (after every call no handle is
left and a good allreduce works); then the 2-rank hypothesis fuzz, tests/fuzz_collectives_worker.py,
at least 1,000 random bad calls per collective."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import gradfuse as hvd
import pytest
import torch
from gradfuse import _C

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_collectives_worker
from multiproc import assert_check_ok, run_ranks

x = torch.ones(3)
BAD_CALLS = [
    # (call, exception, text the message must contain)
    (lambda: hvd.allreduce(x, prescale_factor=math.nan), ValueError, "prescale_factor"),
    (lambda: hvd.allreduce(x, postscale_factor=math.inf), ValueError, "postscale_factor"),
    (lambda: hvd.allreduce(x, prescale_factor="2"), TypeError, "prescale_factor"),
    (lambda: hvd.allreduce(x, op=True), ValueError, "op"),
    (lambda: hvd.allreduce(x, op=1.0), ValueError, "op"),
    (lambda: hvd.allreduce(x.to_sparse()), ValueError, "dense"),
    (lambda: hvd.allreduce_(torch.ones(1).expand(3)), ValueError, "expanded"),
    (lambda: hvd.broadcast_(torch.ones(1).expand(3), 0), ValueError, "expanded"),
    (lambda: hvd.grouped_allreduce(5), TypeError, "tensors"),
    (lambda: hvd.grouped_allreduce(torch.ones(2, 3)), TypeError, "tensors"),
    (lambda: hvd.grouped_allreduce([x, None]), TypeError, "tensor"),
    (lambda: hvd.grouped_allreduce([x, x.bool()]), ValueError, "dtype"),
    (lambda: hvd.grouped_allreduce([x, x.to("meta")]), ValueError, "meta"),
    (lambda: hvd.broadcast(x, 2**32), ValueError, "root_rank"),
    (lambda: hvd.broadcast(x, 2**64), ValueError, "root_rank"),
    (lambda: hvd.broadcast(x, -1), ValueError, "root_rank"),
    (lambda: hvd.alltoall(x, splits=torch.tensor([True])), ValueError, "splits"),
    (
        lambda: hvd.alltoall(x, splits=torch.ones(1, dtype=torch.int64, device="meta")),
        ValueError,
        "splits",
    ),
    (lambda: hvd.synchronize(True), TypeError, "handle"),
    (lambda: hvd.synchronize(2**70), ValueError, "handle"),
    (lambda: hvd.poll("1"), TypeError, "handle"),
    (lambda: hvd.poll(None), TypeError, "handle"),
    (lambda: hvd.join(device=0 if not torch.cuda.is_available() else "meta"), ValueError, "device"),
    (lambda: hvd.join(device=True), TypeError, "device"),
    (lambda: hvd.join(device=1.5), TypeError, "device"),
    (lambda: hvd.join(device="banana"), ValueError, "device"),
    (lambda: hvd.broadcast_object(1, root_rank=0, name=5), ValueError, "name"),
    (lambda: hvd.allgather_object(1, name=""), ValueError, "name"),
    (lambda: hvd.allgather_object(lambda: 1), TypeError, "pickle"),
    (lambda: hvd.broadcast_object(lambda: 1, root_rank=0), TypeError, "pickle"),
]


@pytest.mark.parametrize("index", range(len(BAD_CALLS)))
def test_bad_call_fails_at_the_call(one_rank, index):
    call, exc, text = BAD_CALLS[index]
    before = _C.engine_handle_count()  # the table is the process's: earlier modules' count too
    with pytest.raises(exc, match=text):
        call()
    assert _C.engine_handle_count() == before, "a bad call left a submission behind"
    assert torch.equal(hvd.allreduce(torch.arange(3.0), op=hvd.Sum), torch.arange(3.0))


# ---- 2 ranks: >= 1,000 random bad calls per collective (tests/fuzz_collectives_worker.py) ----

HERE = Path(__file__).resolve().parent
FUZZ_CHECKS = [
    "setup",
    *(f"fuzz_{c}" for c in fuzz_collectives_worker.FAMILIES),
    "healthy_after",
]


@pytest.fixture(scope="module")
def fuzz_group(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz2")
    return run_ranks(tmp, 2, "gradfuse.run", HERE / "fuzz_collectives_worker.py", FUZZ_CHECKS)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("check", FUZZ_CHECKS)
def test_fuzz_two_ranks(fuzz_group, check):
    proc, results = fuzz_group
    if check == FUZZ_CHECKS[-1]:  # the counts, once
        print("\n".join(line for line in proc.stdout.splitlines() if "calls" in line))
    assert_check_ok(proc, results, check)
