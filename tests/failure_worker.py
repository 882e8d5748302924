"""One rank of the failure tests (tests/test_engine_failure.py): a stalled tensor and a rank
that dies mid-run. Writes {check: "ok" | traceback} like tests/multiproc.py; the rank that dies
writes its results first."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import gradfuse as hvd
import torch
import torch.distributed

VICTIM = 2  # not rank 0: that one hosts the job's store


def expect_runtime_error(handle, *needles):
    try:
        hvd.synchronize(handle)
    except RuntimeError as e:
        for needle in needles:
            assert needle in str(e), (needle, str(e))
        return str(e)
    raise AssertionError("no RuntimeError")


def check_stall():
    # Rank 1 never submits "withheld": the others get a stall error after
    # GRADFUSE_STALL_SHUTDOWN_TIME instead of waiting forever, and the job goes on.
    if hvd.rank() != 1:
        h = hvd.allreduce_async(torch.ones(2), name="withheld")
        expect_runtime_error(
            h, "stall", "'withheld'", "missing on rank 1", "submitted by ranks 0, 2"
        )
    # Rank 1 must not run ahead into the next collective: it would stall there in turn. The
    # default group is the user's, not the engine's.
    torch.distributed.barrier()
    out = hvd.allreduce(torch.ones(2), name="after.stall", op=hvd.Sum)
    assert torch.equal(out, torch.full((2,), float(hvd.size())))
    assert hvd.stats()["stalled"] == 1  # every rank gave up on it, in the same cycle


def check_join_outlives_stall_shutdown():
    # Rank 2 joins and waits longer than GRADFUSE_STALL_SHUTDOWN_TIME for the others: its join
    # is only reported, never given up on, so the others' allreduce still gets its zeros.
    if hvd.rank() == 2:
        last = hvd.join()
    else:
        time.sleep(2.0)  # twice the stall shutdown time
        out = hvd.allreduce(torch.ones(2), name="after.long.join", op=hvd.Sum)
        assert torch.equal(out, torch.full((2,), 2.0)), out
        if hvd.rank() == 0:
            time.sleep(0.3)  # rank 0 joins last
        last = hvd.join()
    assert last == 0, last


def check_stats():
    before = hvd.stats()
    hvd.grouped_allreduce([torch.ones(4), torch.ones(4)], name="stats", op=hvd.Sum)
    after = hvd.stats()
    assert after["tensors"] - before["tensors"] == 2, (before, after)
    assert after["bytes"] - before["bytes"] == 2 * 4 * 4, (before, after)
    assert after["cycles"] > before["cycles"] and after["negotiation_s"] > 0
    assert after["fusion_ratio"] >= 1.0


def check_timeline():
    # Started at run time (the group's init() also wrote GRADFUSE_TIMELINE from the start).
    path = os.environ["WORKER_RESULTS"] + ".timeline.json"
    hvd.start_timeline(path)
    hvd.allreduce(torch.ones(3), name="traced.a")
    hvd.grouped_allreduce([torch.ones(2), torch.ones(5)], name="traced.g")
    hvd.stop_timeline()
    if hvd.rank() != 0:
        return  # only rank 0 writes
    events = hvd.timeline.load(path)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    for tensor in ("traced.a", "traced.g.0", "traced.g.1"):
        phases = {e["name"] for e in events if e["ph"] == "X" and tracks[e["tid"]] == tensor}
        assert phases == {"negotiate", "queue", "pack", "collective", "unpack"}, (tensor, events)


def check_dead_rank():
    for step in range(3):
        hvd.allreduce(torch.ones(1), name=f"warmup.{step}")
    if hvd.rank() == VICTIM:
        write_results(hvd.rank(), {**RESULTS, "dead_rank": "ok"})  # then vanish, mid-run
        os._exit(0)
    try:
        start = time.monotonic()
        error = None
        for step in range(1000):
            h = hvd.allreduce_async(torch.ones(1), name=f"step.{step}")
            try:
                hvd.synchronize(h)
            except RuntimeError as e:
                error = str(e)
                break
        assert error is not None
        # Its process is gone, which the monitor sees in /proc well before timeout_s.
        assert f"rank {VICTIM} is dead: its process" in error and "exited" in error, error
        assert time.monotonic() - start < 5, error  # GRADFUSE_TIMEOUT is 6 here
        # Later calls fail at once with the same reason, and shutdown does not hang.
        try:
            hvd.allreduce(torch.ones(1), name="after.death")
            raise AssertionError("no error after the death")
        except RuntimeError as e:
            assert f"rank {VICTIM}" in str(e), str(e)
        elapsed = time.monotonic() - start
        print(f"rank {hvd.rank()}: failed {elapsed:.2f} s after the death", flush=True)
    finally:
        _keep_store_until_survivors_are_done()


def _keep_store_until_survivors_are_done():
    """The job's store lives in rank 0's process. Each survivor's monitor reaches its verdict on
    its own beat, up to one beat apart; rank 0 must not exit (taking the store with it) before
    the others have theirs, or they would rightly report the store gone instead of the dead
    rank. Rank 0 waits for every survivor, at most 60 s."""
    store = torch.distributed.distributed_c10d._get_default_store()
    store.add("test/dead_rank/done", 1)
    if hvd.rank() == 0:
        deadline = time.monotonic() + 60
        while store.add("test/dead_rank/done", 0) < hvd.size() - 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)


RESULTS: dict = {}
CHECKS = {
    "timeline": check_timeline,
    "stall": check_stall,
    "join_outlives_stall_shutdown": check_join_outlives_stall_shutdown,
    "stats": check_stats,
    "dead_rank": check_dead_rank,
}


def main():
    hvd.init()
    rank = hvd.rank()
    names = sys.argv[1:]
    for name in names:
        try:
            CHECKS[name]()
            RESULTS[name] = "ok"
        except Exception:  # noqa: BLE001  (reported, not raised)
            RESULTS[name] = traceback.format_exc()
    write_results(rank, RESULTS)
    hvd.shutdown()


def write_results(rank, results):
    with open(f"{os.environ['WORKER_RESULTS']}.rank{rank}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
