"""One rank of tests/test_executor_failure.py: the engine's executor fails a batch while the
batch before it is in flight and later ones are queued behind it. The last rank is the victim
(GRADFUSE_TEST_FAULT=execute:queued.3, set here before init(), in its process only)."""

from __future__ import annotations

import os
import sys
import time

import gradfuse as hvd
import torch
import torch.distributed
from multiproc import run_checks

COUNT = 8
FAILING = 3  # the victim's engine fails running 'queued.3'


def check_failure_with_batches_queued():
    """Every rank: the failing batch and every later one fail with the victim's error (also
    those already handed to the executor); the earlier ones have their right values or that
    same error (a peer may lose them to the abort); later calls fail at once, naming it."""
    n, victim = hvd.size(), hvd.size() - 1
    needles = (f"rank {victim} failed", "injected fault")
    # Each tensor is its own batch (GRADFUSE_FUSION_THRESHOLD=256 and 400 B tensors), and the
    # one before the failing one is large, so it is likely still in flight.
    tensors = [torch.full((1 << 20 if i == FAILING - 1 else 100,), float(i)) for i in range(COUNT)]
    handles = [
        hvd.allreduce_async(t, name=f"queued.{i}", op=hvd.Sum) for i, t in enumerate(tensors)
    ]
    for i, h in enumerate(handles):
        try:
            out = hvd.synchronize(h)
        except RuntimeError as e:
            assert all(needle in str(e) for needle in needles), (i, str(e))
            continue
        assert i < FAILING, f"'queued.{i}' completed after the failure of 'queued.{FAILING}'"
        assert torch.equal(out, torch.full_like(out, float(i * n))), i
    try:
        hvd.allreduce(torch.ones(1), name="after.failure")
        raise AssertionError("no error after the failure")
    except RuntimeError as e:
        assert all(needle in str(e) for needle in needles), str(e)
    _keep_store_until_all_are_done()


def _keep_store_until_all_are_done():
    """The job's store lives in rank 0's process: rank 0 stays until every rank has checked
    (the peers' monitors read the victim's posted fault from it). At most 60 s."""
    store = torch.distributed.distributed_c10d._get_default_store()
    store.add("test/executor_failure/done", 1)
    deadline = time.monotonic() + 60
    while store.add("test/executor_failure/done", 0) < hvd.size():
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)


CHECKS = {"failure_with_batches_queued": check_failure_with_batches_queued}


def main():
    if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
        os.environ["GRADFUSE_TEST_FAULT"] = f"execute:queued.{FAILING}"
    hvd.init()
    try:
        run_checks(CHECKS, sys.argv[1:], hvd.rank())
    finally:
        hvd.shutdown()


if __name__ == "__main__":
    main()
