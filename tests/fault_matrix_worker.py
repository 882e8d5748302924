"""One rank of the fault matrix (tests/test_fault_matrix.py). GROUP says what goes wrong on
rank VICTIM (the last rank: rank 0 hosts the job's store):

  kill       it SIGKILLs itself mid-run
  stop       it SIGSTOPs itself mid-run (the harness kills it afterwards)
  kill_remote, stop_remote
             the same, with GRADFUSE_TEST_REMOTE_PEERS=1 (set by the harness): every rank
             plays a machine of its own, so no rank sees another in /proc; in kill_remote,
             rank 1 (with 3 ranks or more) is busy in Python at the fault, for SLOW_S, and must
             not be taken for dead
  exception  its engine fails executing 'step.3' (GRADFUSE_TEST_FAULT=execute:step.3)
  uncaught   its script raises an exception nobody catches, mid-run (the process ends)
  uncaught_in_set, kill_in_set
             as uncaught and kill, in a collective on a process set of ranks 1..VICTIM, whose
             other members report it (rank 0, outside the set, only waits)
  init       two init() calls: first it passes a fusion threshold the others do not
             (misconfigured), then its engine fails to start (init_failure;
             GRADFUSE_TEST_FAULT=engine_start)

Every rank records, per fault, the error it got and when (time.monotonic(), one clock for the
whole machine), and the victim when the fault happened; the harness judges them. Results go to
$WORKER_RESULTS.rank<r>.json as {fault: record}."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import gradfuse as hvd
import torch.distributed as dist
from multiproc import device, ones

GROUP = os.environ["GROUP"]
RANK = int(os.environ["RANK"])
SIZE = int(os.environ["WORLD_SIZE"])
VICTIM = SIZE - 1
FAULT_STEP = 3
SLOW_RANK, SLOW_S = 1, 1.5  # longer than the monitors' watch after a closed connection
records: dict = {}


class UncaughtOnPurpose(Exception):
    pass


def write():
    with open(f"{os.environ['WORKER_RESULTS']}.rank{RANK}.json", "w") as f:
        json.dump(records, f)


def failing_init(fault):
    record = records.setdefault(fault, {})
    options = {}
    if fault == "misconfigured" and RANK == VICTIM:
        options["fusion_threshold_bytes"] = 1 << 10
    record["t_init"] = time.monotonic()
    try:
        hvd.init(**options)
    except (RuntimeError, ValueError) as e:
        record.update(t_error=time.monotonic(), error=f"{type(e).__name__}: {e}")
        return
    record["error"] = None  # init() should have raised


def run_until_error(fault):
    record = records.setdefault(fault, {})
    hvd.init()
    kind = fault.split("_")[0]  # kill, stop, uncaught
    in_set = fault.endswith("_in_set")
    process_set = hvd.add_process_set(list(range(1, SIZE))) if in_set else hvd.global_process_set
    if RANK not in process_set.ranks:
        return
    for step in range(10**6):
        if RANK == VICTIM and step == FAULT_STEP and kind in ("kill", "stop"):
            record["t_fault"] = time.monotonic()
            write()
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
        if fault == "kill_remote" and RANK == SLOW_RANK != VICTIM and step == FAULT_STEP:
            compute_for(SLOW_S)
        if RANK == VICTIM and step == FAULT_STEP and kind == "uncaught":
            record["t_fault"] = time.monotonic()
            write()
            raise UncaughtOnPurpose("boom")
        try:
            hvd.allreduce(ones(1), name=f"step.{step}", process_set=process_set)
        except RuntimeError as e:
            record.update(t_error=time.monotonic(), error=str(e), step=step)
            return


def compute_for(seconds):
    """Slow, not dead: Python work that keeps the GIL (but for the interpreter's switches)."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def wait_for_the_others():
    """Every rank stays until every rank that can report has: rank 0's process holds the job's
    store, and any rank's exit is news to the others (they would rightly report a lost store,
    or a dead rank, if they had not got their error yet)."""
    store = dist.distributed_c10d._get_default_store()
    store.add("test/fault_matrix/done", 1)
    # The victim reports too, unless it is gone or stopped.
    reporting = SIZE if GROUP in ("init", "exception") else SIZE - 1
    deadline = time.monotonic() + 60
    try:
        while store.add("test/fault_matrix/done", 0) < reporting:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except dist.DistError:
        pass  # rank 0 saw everyone done and left first, taking the store


def main():
    device()
    try:
        if GROUP == "init":
            failing_init("misconfigured")
            failing_init("init_failure")
        else:
            run_until_error(GROUP)
    except UncaughtOnPurpose:
        raise  # ends this process, through sys.excepthook and atexit
    except Exception:  # noqa: BLE001  (reported, not raised)
        records["traceback"] = traceback.format_exc()
    write()
    if dist.is_initialized():
        wait_for_the_others()
    # Not shutdown(): after a fault the engine's thread may sit in a collective with the lost
    # rank until the transport's timeout, which says nothing about how fast the error came.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
