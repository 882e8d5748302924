"""One rank of the init-agreement and misuse tests (tests/test_init_and_misuse.py): settings
that must agree are checked at init() on every rank, a blocking collective inside
submitted_together() raises instead of hanging, and a forked child leaves the parent's engine
alone. Each check ends with the engine initialized and working, as the next check expects."""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import time

import gradfuse as hvd
import torch
from engine_worker import expect_error
from multiproc import checks_of, full, ones, worker_main

# Generous for a loaded 2-core machine; a mismatch used to surface only after timeout_s.
PROMPT_S = 20


_step = iter(range(10**6))


def works_named():
    n, r = hvd.size(), hvd.rank()
    name = f"works.{next(_step)}"
    out = hvd.allreduce(full((3,), float(r + 1)), op=hvd.Sum, name=name)
    assert torch.equal(out, full((3,), float(n * (n + 1) // 2))), out


def check_settings_must_agree():
    n, r = hvd.size(), hvd.rank()
    last = r == n - 1  # the rank whose setting differs
    cases = [
        ("fusion_threshold_bytes", {"fusion_threshold_bytes": 256 if last else 1 << 20}),
        ("cache_capacity", {"cache_capacity": 0 if last else 16}),
        ("stall_shutdown_s", {"stall_shutdown_s": 5.0 if last else 0.0}),
        ("hierarchical_allreduce", {"hierarchical_allreduce": last}),
    ]
    hvd.shutdown()
    for what, options in cases:
        start = time.monotonic()
        message = expect_error(ValueError, lambda o=options: hvd.init(**o), what, "differ")
        took = time.monotonic() - start
        assert took < PROMPT_S, f"{what}: the mismatch took {took:.1f} s to raise"
        # Every rank's value is named.
        for k in range(n):
            assert f"rank {k}: " in message, message
        assert not hvd.is_initialized()
    # Two settings differing at once are both reported.
    message = expect_error(
        ValueError,
        lambda: hvd.init(cache_capacity=3 if last else 4, fusion_threshold_bytes=8 if last else 9),
        "cache_capacity",
        "fusion_threshold_bytes",
    )
    # Settings that only change when a rank acts may differ.
    hvd.init(cycle_time_ms=2.0 if last else 1.0)
    works_named()


def check_init_failure_on_one_rank_ends_init_everywhere():
    r = hvd.rank()
    hvd.shutdown()
    # Only rank 0 writes the timeline; its path cannot be opened.
    bad = "/nonexistent-gradfuse-dir/timeline.json"
    start = time.monotonic()
    expect_error(
        RuntimeError,
        lambda: hvd.init(timeline=bad),
        "gradfuse.init() failed on rank 0",
        "cannot open the timeline file",
        bad,
    )
    took = time.monotonic() - start
    assert took < 5, f"rank {r} learned of rank 0's init failure after {took:.1f} s"
    assert not hvd.is_initialized()
    hvd.init()
    works_named()


def check_blocking_inside_submitted_together():
    n = hvd.size()
    blocking = {
        "allreduce": lambda: hvd.allreduce(ones(2), name="held.allreduce"),
        "allreduce_": lambda: hvd.allreduce_(ones(2), name="held.allreduce_"),
        "allgather": lambda: hvd.allgather(ones(2), name="held.allgather"),
        "grouped_allreduce": lambda: hvd.grouped_allreduce([ones(2)], name="held.grouped"),
        "broadcast": lambda: hvd.broadcast(ones(2), 0, name="held.broadcast"),
        "broadcast_": lambda: hvd.broadcast_(ones(2), 0, name="held.broadcast_"),
        "reducescatter": lambda: hvd.reducescatter(ones(n), name="held.reducescatter"),
        "alltoall": lambda: hvd.alltoall(ones(n), name="held.alltoall"),
        "barrier": hvd.barrier,
        "join": hvd.join,
    }
    start = time.monotonic()
    with hvd.submitted_together():
        handle = hvd.allreduce_async(ones(2), name="held.async", op=hvd.Sum)
        for fn, call in blocking.items():
            expect_error(RuntimeError, call, f"gradfuse.{fn}:", "submitted_together", "_async")
        # Waiting for a handle submitted in the block would never return either.
        expect_error(RuntimeError, lambda: hvd.synchronize(handle), f"handle {handle}", "held")
        with hvd.submitted_together():  # nested blocks: still held
            expect_error(RuntimeError, lambda: hvd.allreduce(ones(1)), "submitted_together")
        expect_error(RuntimeError, lambda: hvd.synchronize(handle), "held")
    assert time.monotonic() - start < PROMPT_S
    # After the block the held handle completes, and nothing refused was submitted.
    assert torch.equal(hvd.synchronize(handle), full((2,), float(n)))
    works_named()


def check_forked_child_leaves_the_engine_alone():
    pid = os.fork()
    if pid == 0:
        # The child: collectives and init() refuse, naming the fork; the ops work; then its
        # exit (the atexit handlers, among them gradfuse's shutdown, and the C++ static
        # destructors) must neither hang nor touch the parent's engine. Before, shutdown joined
        # engine threads that only exist in the parent, and the child hung. (A full interpreter
        # exit also tears down torch's own process-group objects, which hangs in a fork child
        # with or without gradfuse; fork children such as multiprocessing's end with
        # os._exit, and this one runs exactly the exit steps that are gradfuse's concern.)
        code = 0
        try:
            expect_error(RuntimeError, lambda: hvd.allreduce(ones(1)), "fork", str(os.getppid()))
            expect_error(RuntimeError, hvd.init, "fork")
            expect_error(RuntimeError, hvd.rank, "fork")
            flat = torch.empty(3)
            torch.ops.gradfuse.pack_([torch.ones(3)], flat, 2.0, None)
            assert torch.equal(flat, torch.full((3,), 2.0))
        except BaseException as e:  # noqa: BLE001 - reported through the exit code
            print(f"forked child failed: {e!r}", file=sys.stderr, flush=True)
            code = 3
        atexit._run_exitfuncs()
        ctypes.CDLL(None).exit(code)  # C exit(): static destructors, no Python finalization
    deadline = time.monotonic() + PROMPT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked child did not exit within {PROMPT_S} s")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0, f"child status {status}"
    # The parent's engine is untouched.
    works_named()


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
