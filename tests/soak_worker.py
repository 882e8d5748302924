"""One rank of the 4-rank soak (tests/test_soak.py): 1,000 steps of random collectives.

Every step draws (from its seed, the same on every rank) a set of tensors: how many, their
shapes (empty, one element, odd sizes), dtypes (fp16, bf16, fp32, fp64, integers) and
collectives (allreduce Sum/Average/Min/Max, allgather with a different dim 0 per rank,
broadcast from a random root, reducescatter, alltoall with random splits per rank). Each rank
submits them in its own random order, from several threads, sometimes inside
submitted_together(); then every result must equal, bit for bit, the reference every rank
computes from the seeds (integer-valued data, so every sum is exact in every dtype).
Afterwards no handle is left, and after shutdown() no thread: neither Python's
(threading.enumerate()) nor the OS's (/proc/self/task) count exceeds its value before init()."""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import threading
import time

import gradfuse as hvd
import torch
import torch.distributed as dist
from gradfuse import _C
from multiproc import device, run_checks

STEPS = int(os.environ.get("SOAK_STEPS", "1000"))  # fewer only to debug by hand
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]
DTYPES += [torch.int8, torch.uint8]
KINDS = ["sum", "average", "min", "max", "allgather", "broadcast", "reducescatter", "alltoall"]
counts = collections.Counter()


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def data(step, j, rank, shape, dtype):
    """Rank `rank`'s tensor j of `step`: small integers, exact in every dtype and every sum."""
    g = torch.Generator().manual_seed((step * 64 + j) * 16 + rank)
    return torch.randint(0, 8, shape, generator=g).to(dtype)


def shape_of(rng):
    dims = rng.choice([(0,), (1,), (rng.choice([1, 2, 3, 5, 7, 13]),), (rng.randint(0, 4), 3)])
    return dims if rng.random() < 0.9 else (rng.randint(1, 40),)


def plan(step, n):
    """The step's collectives, the same on every rank: (kind, dtype, shape per rank, extra)."""
    rng = random.Random(step)
    items = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(KINDS)
        dtype = rng.choice(DTYPES)
        base = shape_of(rng)
        shapes = [base] * n
        extra = None
        if kind == "allgather":
            shapes = [(rng.randint(0, 3),) + base[1:] for _ in range(n)]
        elif kind == "broadcast":
            extra = rng.randrange(n)
        elif kind == "alltoall":
            extra = [[rng.randint(0, 2) for _ in range(n)] for _ in range(n)]  # [sender][dest]
            shapes = [(sum(extra[k]),) + base[1:] for k in range(n)]
        items.append((kind, dtype, shapes, extra))
    return items


def submit(step, j, item, rank):
    kind, dtype, shapes, extra = item
    x = data(step, j, rank, shapes[rank], dtype).to(device())
    name = f"soak.{step}.{j}"
    counts[kind] += 1
    if kind in ("sum", "average", "min", "max"):
        op = {"sum": hvd.Sum, "average": hvd.Average, "min": hvd.Min, "max": hvd.Max}[kind]
        return hvd.allreduce_async(x, name=name, op=op)
    if kind == "allgather":
        return hvd.allgather_async(x, name=name)
    if kind == "broadcast":
        return hvd.broadcast_async(x, extra, name=name)
    if kind == "reducescatter":
        return hvd.reducescatter_async(x, name=name, op=hvd.Sum)
    return hvd.alltoall_async(x, extra[rank], name=name)


def expected(step, j, item, rank, n):
    kind, dtype, shapes, extra = item
    xs = [data(step, j, k, shapes[k], dtype) for k in range(n)]
    if kind in ("sum", "average", "reducescatter"):
        total = torch.stack([x.double() for x in xs]).sum(0)
        if kind == "average":
            total = total / n
        out = total.to(dtype)
        if kind == "reducescatter":
            d = out.shape[0]
            rows = [d // n + (1 if k < d % n else 0) for k in range(n)]
            out = out[sum(rows[:rank]) : sum(rows[: rank + 1])]
        return out
    if kind in ("min", "max"):
        stack = torch.stack(xs)
        return stack.min(0).values if kind == "min" else stack.max(0).values
    if kind == "allgather":
        return torch.cat(xs)
    if kind == "broadcast":
        return xs[extra]
    parts = []  # alltoall: what each rank k sends here
    for k in range(n):
        start = sum(extra[k][:rank])
        parts.append(xs[k][start : start + extra[k][rank]])
    return torch.cat(parts), torch.tensor([extra[k][rank] for k in range(n)])


def bits_equal(out, ref):
    out = out.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    if out.numel():
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), (out, ref)


def run_step(step, n, rank):
    items = plan(step, n)
    rng = random.Random(step * 7919 + rank + 1)  # this rank's own order, threads and grouping
    order = list(range(len(items)))
    rng.shuffle(order)
    threads = rng.randint(1, 3)
    together = rng.random() < 0.3
    handles = {}

    def submitter(mine):
        for j in mine:
            handles[j] = submit(step, j, items[j], rank)

    shares = [order[t::threads] for t in range(threads)]
    if together:
        counts["submitted_together"] += 1
        with hvd.submitted_together():
            run_threads(submitter, shares)
    else:
        run_threads(submitter, shares)
    for j in order:
        out = hvd.synchronize(handles[j])
        ref = expected(step, j, items[j], rank, n)
        try:
            if isinstance(ref, tuple):
                bits_equal(out[0], ref[0])
                assert torch.equal(out[1].cpu(), ref[1]), (out[1], ref[1])
            else:
                bits_equal(out, ref)
        except AssertionError as e:
            raise AssertionError(f"step {step}, tensor {j}: {items[j]}: {e}") from e
    counts["tensors"] += len(items)


def run_threads(fn, shares):
    if len(shares) == 1:
        fn(shares[0])
        return
    errors = []

    def guarded(share):
        try:
            fn(share)
        except Exception as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)

    ts = [threading.Thread(target=guarded, args=(s,)) for s in shares]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def check_soak():
    n, rank = hvd.size(), hvd.rank()
    start = time.perf_counter()
    for step in range(STEPS):
        run_step(step, n, rank)
        counts["steps"] += 1
    elapsed = time.perf_counter() - start
    assert _C.engine_handle_count() == 0, _C.engine_handle_count()
    print(f"rank {rank}: soak: {dict(counts)} in {elapsed:.1f} s", flush=True)
    assert counts["steps"] == STEPS


def main():
    torch.zeros(4).sum()  # torch's own lazy set-up, before the baseline
    threads_before, os_before = {t.ident for t in threading.enumerate()}, os_threads()
    device()
    hvd.init()
    rank = hvd.rank()
    run_checks({"soak": check_soak}, ["soak"], hvd.rank())
    hvd.shutdown()
    dist.destroy_process_group()  # gradfuse.init() created it: its threads go too

    def check_no_thread_left():
        left = [t.name for t in threading.enumerate() if t.ident not in threads_before]
        assert not left, f"Python threads left after shutdown(): {left}"
        assert os_threads() <= os_before, f"OS threads: {os_threads()} after, {os_before} before"
        print(f"rank {rank}: OS threads {os_before} before init, {os_threads()} after", flush=True)

    path = f"{os.environ['WORKER_RESULTS']}.rank{rank}.json"
    with open(path) as f:
        results = json.load(f)
    run_checks({"no_thread_left": check_no_thread_left}, ["no_thread_left"], rank, results)


if __name__ == "__main__":
    sys.exit(main())
