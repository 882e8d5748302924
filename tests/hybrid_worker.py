"""One rank of the hybrid all-reduce tests (tests/test_hybrid_allreduce.py): with
GRADFUSE_HIERARCHICAL_THRESHOLD=T, a fused message of at most T bytes goes hierarchical and a
larger one flat. Each check reads the process's count of hierarchical reductions
(gradfuse._C._testing.hierarchical_allreduce_count) around every allreduce, so a wrong path
fails the check even though both paths give the same sums; and compares every result with a
float64 reference over every rank's (integer-valued, so exact) data."""

from __future__ import annotations

import json
import os
import sys

import gradfuse as hvd
import torch
from engine_worker import DTYPES, close, data, expect_error, reference
from multiproc import checks_of, worker_main

THRESHOLD = int(os.environ["GRADFUSE_HIERARCHICAL_THRESHOLD"])
# Element counts whose messages fall on both sides of the threshold for every dtype.
NUMELS = [1, 7, THRESHOLD // 8, THRESHOLD // 4, THRESHOLD // 2 + 1, 4 * THRESHOLD + 3]


def _runs() -> int:
    return hvd._engine._C()._testing.hierarchical_allreduce_count()


def _wire_bytes(numel: int, dtype: torch.dtype) -> int:
    # cpp/engine/fusion.cpp wire_dtype: int16 travels as int32.
    size = 4 if dtype == torch.int16 else torch.empty((), dtype=dtype).element_size()
    return numel * size


def _allreduce_checked(tensors, op, expect_hierarchical, name):
    """grouped_allreduce (one negotiation, so one fused message) of `tensors`, checked against
    the reference and the path taken."""
    before = _runs()
    outs = hvd.grouped_allreduce(tensors, op=op, name=name)
    taken = _runs() - before
    assert taken == int(expect_hierarchical), (name, taken, expect_hierarchical)
    return outs


def check_path_follows_message_size():
    n, r = hvd.size(), hvd.rank()
    seed = 500
    for dtype in DTYPES:
        for numel in NUMELS:
            seed += 1
            mine = data(r, seed, (numel,), dtype)
            hier = _wire_bytes(numel, dtype) <= THRESHOLD
            (out,) = _allreduce_checked([mine], hvd.Sum, hier, f"size.{seed}")
            close(
                out, reference(hvd.Sum, [data(q, seed, (numel,), dtype) for q in range(n)]), dtype
            )


def check_fused_message_decides_not_its_tensors():
    # Four tensors each below the threshold: fused under it (hierarchical) or over it (flat).
    n, r = hvd.size(), hvd.rank()
    for seed, numel, hier in ((900, THRESHOLD // 32, True), (910, THRESHOLD // 8 + 1, False)):
        mine = [data(r, seed + i, (numel,), torch.float32) for i in range(4)]
        assert all(_wire_bytes(t.numel(), t.dtype) <= THRESHOLD for t in mine)
        outs = _allreduce_checked(mine, hvd.Average, hier, f"fused.{seed}")
        for i, out in enumerate(outs):
            expected = reference(
                hvd.Average, [data(q, seed + i, (numel,), torch.float32) for q in range(n)]
            )
            close(out, expected, torch.float32)


def check_threshold_must_agree():
    # A per-rank threshold would pair a hierarchical reduction with a flat one: init refuses
    # on every rank, naming the setting and each rank's value.
    r, k = hvd.rank(), int(os.environ["GRADFUSE_TEST_LOCAL_SIZE"])
    hvd.shutdown()
    expect_error(
        ValueError,
        lambda: hvd.init(
            hierarchical_allreduce=True, hierarchical_threshold_bytes=1000 + r, test_local_size=k
        ),
        "hierarchical_threshold_bytes",
        "rank 0: 1000",
        "rank 1: 1001",
    )
    hvd.init()


def check_plan_file_sets_the_engine():
    # init(plan=...) takes the settings `gradfuse-bench plan --json` chose for this job's size.
    n, r, k = hvd.size(), hvd.rank(), int(os.environ["GRADFUSE_TEST_LOCAL_SIZE"])
    settings = {
        "fusion_threshold_bytes": 1 << 20,
        "cycle_time_ms": 2.0,
        "hierarchical_allreduce": True,
        "hierarchical_threshold_bytes": 64,
    }
    path = f"{os.environ['WORKER_RESULTS']}.plan{r}.json"
    with open(path, "w") as f:
        json.dump({"runs": [{"gpus": n + 1, "settings": {}}, {"gpus": n, "settings": settings}]}, f)
    hvd.shutdown()
    hvd.init(plan=path, test_local_size=k)
    try:
        for numel, hier in ((16, True), (17, False)):  # 64 bytes: at the threshold
            mine = data(r, 1200 + numel, (numel,), torch.float32)
            (out,) = _allreduce_checked([mine], hvd.Sum, hier, f"plan.{numel}")
            expected = [data(q, 1200 + numel, (numel,), torch.float32) for q in range(n)]
            close(out, reference(hvd.Sum, expected), torch.float32)
    finally:
        hvd.shutdown()
        hvd.init()


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
