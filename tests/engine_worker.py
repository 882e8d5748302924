"""One rank of the multi-process engine tests. Started N times (by gradfuse.run or mpiexec); it
runs every check named on the command line against the same engine, so one group of processes
serves many tests. Each rank writes {check: "ok" | traceback} to $WORKER_RESULTS.rank<r>.json (tests/multiproc.py).

Every rank's data differs; the expected result is computed locally by regenerating every other
rank's input from the same seeds."""

from __future__ import annotations

import os
import random
import sys
import time
import traceback

import gradfuse as hvd
import torch
from multiproc import arange, checks_of, device, empty, full, ones, run_checks, tensor

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPES = INT_DTYPES + FLOAT_DTYPES
SHAPES = [(7,), (3, 5), (2, 3, 4)]


def data(rank, seed, shape, dtype, small=False):
    """The tensor `rank` contributes for `seed`: small integers (exact in every dtype), drawn on
    the CPU (same values whatever the device) and placed on the device under test."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    hi = 3 if small else 10
    return torch.randint(1, hi, shape, generator=g).to(device(), dtype)


def reference(op, tensors):
    stack = torch.stack([t.double() for t in tensors])
    if op == hvd.Sum:
        return stack.sum(0)
    if op == hvd.Average:
        return stack.mean(0)
    if op == hvd.Min:
        return stack.min(0).values
    if op == hvd.Max:
        return stack.max(0).values
    return stack.prod(0)


def close(actual, expected, dtype):
    # Integer Average truncates toward zero (float64 result cast back to the integer dtype).
    expected = expected.to(dtype).double()
    tol = {torch.float16: 1e-2, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert torch.allclose(actual.double(), expected, rtol=tol, atol=tol), (actual, expected)


# ---- checks ----------------------------------------------------------------------------------


def check_queries():
    n, r = hvd.size(), hvd.rank()
    assert hvd.is_initialized()
    assert n == int(os.environ["EXPECT_SIZE"]) and 0 <= r < n
    assert (hvd.local_rank(), hvd.local_size(), hvd.cross_rank(), hvd.cross_size()) == (r, n, 0, 1)


def check_allreduce_dtypes_ops():
    n, r = hvd.size(), hvd.rank()
    seed = 0
    for dtype in DTYPES:
        for op in (hvd.Sum, hvd.Average, hvd.Min, hvd.Max, hvd.Product):
            for shape in SHAPES:
                seed += 1
                small = op == hvd.Product
                mine = data(r, seed, shape, dtype, small)
                out = hvd.allreduce(mine, name=f"ar.{seed}", op=op)
                expected = reference(op, [data(k, seed, shape, dtype, small) for k in range(n)])
                close(out, expected, dtype)
                assert torch.equal(mine, data(r, seed, shape, dtype, small)), "input changed"


def check_allreduce_scales_inplace():
    n, r = hvd.size(), hvd.rank()
    for i, dtype in enumerate(FLOAT_DTYPES + [torch.int32]):
        t = data(r, 100 + i, (4, 3), dtype)
        expect = (
            reference(hvd.Sum, [data(k, 100 + i, (4, 3), dtype).double() * 2 for k in range(n)])
            * 0.5
            / n
        )
        out = hvd.allreduce_(
            t, name=f"scaled.{i}", op=hvd.Average, prescale_factor=2.0, postscale_factor=0.5
        )
        assert out is t
        close(t, expect, dtype)
    # A non-contiguous tensor reduced in place.
    base = data(r, 200, (4, 6), torch.float32)
    view = base.t()
    hvd.allreduce_(view, name="noncontig", op=hvd.Sum)
    expected = reference(hvd.Sum, [data(k, 200, (4, 6), torch.float32).t() for k in range(n)])
    close(view, expected, torch.float32)


def check_many_in_flight_random_order():
    n, r = hvd.size(), hvd.rank()
    specs = []  # (name, kind, dtype, shape)
    for i in range(48):
        kind = ["allreduce", "allgather", "broadcast"][i % 3]
        specs.append((f"mix.{i}", kind, DTYPES[i % len(DTYPES)], SHAPES[i % len(SHAPES)]))
    order = list(range(len(specs)))
    random.Random(r).shuffle(order)  # each rank submits in its own order
    handles = {}
    for i in order:
        name, kind, dtype, shape = specs[i]
        if kind == "allreduce":
            handles[i] = hvd.allreduce_async(data(r, i, shape, dtype), name=name, op=hvd.Sum)
        elif kind == "allgather":
            rows = (r + i) % 3 + 1
            handles[i] = hvd.allgather_async(data(r, i, (rows,) + shape[1:], dtype), name=name)
        else:
            handles[i] = hvd.broadcast_async(data(r, i, shape, dtype), i % n, name=name)
    random.Random(r + 100).shuffle(order)
    for i in order:
        name, kind, dtype, shape = specs[i]
        out = hvd.synchronize(handles[i])
        if kind == "allreduce":
            close(out, reference(hvd.Sum, [data(k, i, shape, dtype) for k in range(n)]), dtype)
        elif kind == "allgather":
            parts = [data(k, i, ((k + i) % 3 + 1,) + shape[1:], dtype) for k in range(n)]
            assert torch.equal(out, torch.cat(parts)), name
        else:
            assert torch.equal(out, data(i % n, i, shape, dtype)), name


def check_long_negotiation_message():
    # ~150 requests with long names overflow the 4 KiB negotiation slot (second round).
    n, r = hvd.size(), hvd.rank()
    names = [
        f"a.very.long.parameter.name.to.fill.the.negotiation.slot.layer{i:04d}.weight"
        for i in range(150)
    ]
    order = list(range(len(names)))
    random.Random(7 + r).shuffle(order)
    handles = {
        i: hvd.allreduce_async(full((2,), float(r + i)), name=names[i], op=hvd.Sum) for i in order
    }
    for i, h in handles.items():
        expected = float(sum(k + i for k in range(n)))
        assert torch.equal(hvd.synchronize(h), full((2,), expected)), names[i]


def check_allgather():
    n, r = hvd.size(), hvd.rank()
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            seed = 300 + 10 * i + j
            out = hvd.allgather(
                data(r, seed, (r + 1 + j,) + shape[1:], dtype), name=f"ag.{seed}"
            )  # dim 0 differs per rank
            expected = torch.cat([data(k, seed, (k + 1 + j,) + shape[1:], dtype) for k in range(n)])
            assert torch.equal(out, expected), (dtype, shape)
    # A rank may contribute zero rows.
    mine = arange(3.0) if r == 0 else empty(0)
    assert torch.equal(hvd.allgather(mine, name="ag.empty"), arange(3.0))


def check_broadcast():
    n, r = hvd.size(), hvd.rank()
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            seed, root = 400 + 10 * i + j, (i + j) % n
            mine = data(r, seed, shape, dtype)
            out = hvd.broadcast(mine, root, name=f"bc.{seed}")
            assert torch.equal(out, data(root, seed, shape, dtype))
            assert torch.equal(mine, data(r, seed, shape, dtype)), "out-of-place changed input"
            hvd.broadcast_(mine, root, name=f"bc_.{seed}")
            assert torch.equal(mine, data(root, seed, shape, dtype))


def check_grouped_allreduce():
    n, r = hvd.size(), hvd.rank()
    tensors = [data(r, 500 + i, SHAPES[i % 3], torch.float32) for i in range(20)]
    outs = hvd.grouped_allreduce(tensors, name="grouped", op=hvd.Sum)
    for i, out in enumerate(outs):
        close(
            out,
            reference(hvd.Sum, [data(k, 500 + i, SHAPES[i % 3], torch.float32) for k in range(n)]),
            torch.float32,
        )


def check_autograd():
    n, r = hvd.size(), hvd.rank()
    # allreduce: d(sum_k w_k x_k)/dx_r through Sum is the allreduce of the grads.
    x = full((3,), float(r + 1), requires_grad=True)
    y = hvd.allreduce(x, name="grad.ar", op=hvd.Sum)
    (y * (r + 1)).sum().backward()
    assert torch.allclose(x.grad, full((3,), float(sum(range(1, n + 1))))), x.grad
    x = ones(2, requires_grad=True)
    hvd.allreduce(x, name="grad.avg", op=hvd.Average).sum().backward()
    assert torch.allclose(x.grad, ones(2)), x.grad
    # allgather: every rank weights the gathered rows by (rank + 1); Horovod's gradient is
    # the ranks' gradients averaged (tests/grouped_worker.py checks it on uneven data).
    x = ones(r + 1, 2, requires_grad=True)
    (hvd.allgather(x, name="grad.ag") * (r + 1)).sum().backward()
    assert torch.allclose(x.grad, full((r + 1, 2), (n + 1) / 2)), x.grad
    # broadcast: the root gets the average of all ranks' grads, others zeros.
    x = ones(4, requires_grad=True)
    (hvd.broadcast(x, 1 % n, name="grad.bc") * (r + 1)).sum().backward()
    expected = (n + 1) / 2 if r == 1 % n else 0.0
    assert torch.allclose(x.grad, full((4,), expected)), x.grad


def expect_error(exc_type, fn, *needles):
    """fn() must raise exc_type with every needle in its message; returns the message."""
    try:
        fn()
    except exc_type as e:
        for needle in needles:
            assert needle in str(e), f"{needle!r} not in {e}"
        return str(e)
    raise AssertionError(f"{exc_type.__name__} not raised")


def finished_within(handle, seconds=60.0):
    """Waits for handle to finish (completed or failed) without taking its result; an
    AssertionError instead of a hang when it takes longer."""
    deadline = time.monotonic() + seconds
    while not hvd.poll(handle):
        assert time.monotonic() < deadline, f"handle {handle} still pending after {seconds} s"
        time.sleep(0.001)
    return handle


def check_mismatch_errors():
    n, r = hvd.size(), hvd.rank()
    last = n - 1  # the rank that disagrees
    odd = r == last
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(ones(3 if odd else 2), name="bad.shape"),
        "bad.shape",
        "shape",
        f"on rank {last}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(ones((2, 1) if odd else (2,)), name="bad.ndim"),
        "bad.ndim",
        "number of dimensions",
        f"on rank {last}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(
            ones(2, dtype=torch.float64 if odd else torch.float32), name="bad.dtype"
        ),
        "bad.dtype",
        "dtype",
        f"on rank {last}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.broadcast(ones(2), 1 if odd else 0, name="bad.root"),
        "bad.root",
        "root",
        f"on rank {last}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(ones(2), name="bad.op", op=hvd.Max if odd else hvd.Sum),
        "bad.op",
        "reduce op",
        f"on rank {last}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.allgather(ones(2, 3 if odd else 2), name="bad.ag"),
        "bad.ag",
        "shape",
        f"on rank {last}",
    )
    # Mixed into valid work that is in flight at the same time, which must still complete.
    h1 = hvd.allreduce_async(ones(5), name="good.1", op=hvd.Sum)
    h2 = hvd.allreduce_async(ones(4 if odd else 5), name="bad.mixed", op=hvd.Sum)
    h3 = hvd.allreduce_async(ones(5), name="good.2", op=hvd.Sum)
    expect_error(RuntimeError, lambda: hvd.synchronize(h2), "bad.mixed")
    assert torch.equal(hvd.synchronize(h1), full((5,), float(n)))
    assert torch.equal(hvd.synchronize(h3), full((5,), float(n)))
    # The job goes on working, and the failed names can be used again.
    assert torch.equal(hvd.allreduce(ones(2), name="bad.shape", op=hvd.Sum), full((2,), float(n)))


def _hits_misses(fn):
    """fn()'s change to this rank's response cache counters: (hits, misses)."""
    before = hvd.stats()
    fn()
    after = hvd.stats()
    return after["cache_hits"] - before["cache_hits"], after["cache_misses"] - before[
        "cache_misses"
    ]


def check_response_cache():
    n, r = hvd.size(), hvd.rank()
    specs = [(f"cache.{i}", DTYPES[i % len(DTYPES)], SHAPES[i % len(SHAPES)]) for i in range(24)]

    def step(seed, shape_of=lambda shape: shape):
        order = list(range(len(specs)))
        random.Random(seed + r).shuffle(order)  # each rank submits in its own order
        handles = {}
        for i in order:
            name, dtype, shape = specs[i]
            handles[i] = hvd.allreduce_async(
                data(r, seed + i, shape_of(shape), dtype), name=name, op=hvd.Sum
            )
        for i, h in handles.items():
            name, dtype, shape = specs[i]
            expected = reference(
                hvd.Sum, [data(k, seed + i, shape_of(shape), dtype) for k in range(n)]
            )
            close(hvd.synchronize(h), expected, dtype)

    # First step: every request travels in full; the next ones as cache indices (new data, same
    # attributes), with every result still right.
    assert _hits_misses(lambda: step(100)) == (0, len(specs))
    assert _hits_misses(lambda: step(200)) == (len(specs), 0)
    assert _hits_misses(lambda: step(300)) == (len(specs), 0)
    # Every rank changes the shapes: a cached name with new attributes is sent in full and
    # runs with them, then is cached again.
    assert _hits_misses(lambda: step(400, lambda s: (2,) + s)) == (0, len(specs))
    assert _hits_misses(lambda: step(500, lambda s: (2,) + s)) == (len(specs), 0)
    # Only the last rank changes: it sends in full, the others send the bit; the mismatch is
    # still found and raised on every rank, naming the rank.
    odd = r == n - 1
    hvd.allreduce(ones(3), name="cache.bad", op=hvd.Sum)
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(ones(4 if odd else 3), name="cache.bad"),
        "cache.bad",
        "shape",
        f"on rank {n - 1}",
    )
    assert torch.equal(hvd.allreduce(ones(3), name="cache.bad", op=hvd.Sum), full((3,), float(n)))


def check_response_cache_eviction_and_disabled():
    n = hvd.size()
    hvd.shutdown()
    hvd.init(cache_capacity=2)
    try:

        def run(name):
            out = hvd.allreduce(ones(2), name=name, op=hvd.Sum)
            assert torch.equal(out, full((2,), float(n))), name

        def hit(name):
            h, m = _hits_misses(lambda: run(name))
            return {(1, 0): "hit", (0, 1): "miss"}[(h, m)]

        # Capacity 2, least recently run evicted: c evicts b (a ran more recently), b evicts c.
        got = [hit(x) for x in "abacabc"]
        assert got == ["miss", "miss", "hit", "miss", "hit", "miss", "miss"], got
    finally:
        hvd.shutdown()
    hvd.init(cache_capacity=0)
    try:
        for _ in range(3):
            assert _hits_misses(lambda: hvd.allreduce(ones(2), name="nocache")) == (0, 1)
    finally:
        hvd.shutdown()
        hvd.init()


def check_submitted_together():
    n, r = hvd.size(), hvd.rank()
    with hvd.submitted_together():
        before = hvd.stats()["cache_misses"]
        handles = [
            hvd.allreduce_async(full((3,), float(r + i)), name=f"together.{i}", op=hvd.Sum)
            for i in range(5)
        ]
        time.sleep(0.05)  # dozens of cycles: none may take the held requests
        assert hvd.stats()["cache_misses"] == before
    for i, h in enumerate(handles):
        expected = float(sum(k + i for k in range(n)))
        assert torch.equal(hvd.synchronize(h), full((3,), expected))
    assert hvd.stats()["cache_misses"] == before + 5


def check_in_place_span():
    """In-place tensors lying back to back in one buffer, submitted in memory order, are reduced
    on that buffer with no fusion buffer; any other order falls back to packing. Both give the
    same values."""
    n, r = hvd.size(), hvd.rank()
    sizes = [8, 3, 5, 8, 1, 7, 8, 2]  # awkward sizes; the 2-rank group's 256 B threshold splits
    cases = [
        (torch.float32, hvd.Sum, 1.0, 1.0),
        (torch.float32, hvd.Average, 0.5, 3.0),
        (torch.float64, hvd.Average, 1.0, 1.0),
        (torch.float16, hvd.Sum, 0.25, 1.0),
        (torch.bfloat16, hvd.Average, 1.0, 2.0),
        (torch.int32, hvd.Sum, 1.0, 1.0),
        (torch.int64, hvd.Average, 1.0, 1.0),  # integers scaled: packed, not in place
    ]
    for case, (dtype, op, pre, post) in enumerate(cases):
        for order in ("memory", "reversed"):
            seed = 900 + 10 * case + (order == "reversed")
            flat = data(r, seed, (sum(sizes),), dtype)
            views = list(torch.split(flat, sizes))
            indices = list(range(len(views)))
            if order == "reversed":
                indices.reverse()
            before = hvd.stats()
            with hvd.submitted_together():
                handles = [
                    hvd.allreduce_async_(
                        views[i],
                        name=f"span.{case}.{order}.{i}",
                        op=op,
                        prescale_factor=pre,
                        postscale_factor=post,
                    )
                    for i in indices
                ]
            for h in handles:
                hvd.synchronize(h)
            after = hvd.stats()
            inputs = [data(k, seed, (sum(sizes),), dtype).double() * pre for k in range(n)]
            close(flat, reference(op, inputs) * post, dtype)
            in_place = after["in_place"] - before["in_place"]
            batches = after["collectives"] - before["collectives"]
            if order == "memory" and dtype != torch.int64:
                assert in_place == batches >= 1, (dtype, in_place, batches)
            if order == "reversed" and dtype == torch.float32:
                assert in_place == 0, (dtype, in_place)  # one batch of 8 (168 B), packed
    # Names cached in one order and then submitted in memory order: the submission order (not
    # the order the cache first saw them) decides the batch order, so this runs in place.
    for step, order in enumerate(("reversed", "memory", "memory")):
        flat = data(r, 980 + step, (sum(sizes),), torch.float32)
        views = list(torch.split(flat, sizes))
        indices = list(range(len(views)))[:: -1 if order == "reversed" else 1]
        before = hvd.stats()
        with hvd.submitted_together():
            handles = [
                hvd.allreduce_async_(views[i], name=f"span.recached.{i}", op=hvd.Sum)
                for i in indices
            ]
        for h in handles:
            hvd.synchronize(h)
        after = hvd.stats()
        inputs = [data(k, 980 + step, (sum(sizes),), torch.float32).double() for k in range(n)]
        close(flat, reference(hvd.Sum, inputs), torch.float32)
        if step > 0:
            assert after["cache_hits"] - before["cache_hits"] == len(views)
            assert after["in_place"] - before["in_place"] == 1, (step, after, before)


def check_local_errors():
    n, r = hvd.size(), hvd.rank()
    # A name leaves "in flight" once negotiated, so rank r's "dup.r" must stay unmatched until
    # its second submission is refused: the other ranks submit it only after the barrier.
    mine = hvd.allreduce_async(ones(2), name=f"dup.{r}", op=hvd.Sum)
    expect_error(
        ValueError,
        lambda: hvd.allreduce_async(ones(2), name=f"dup.{r}"),
        f"dup.{r}",
        "already in flight",
    )
    torch.distributed.barrier()
    others = [hvd.allreduce_async(ones(2), name=f"dup.{k}", op=hvd.Sum) for k in range(n) if k != r]
    for h in [mine, *others]:
        assert torch.equal(hvd.synchronize(h), full((2,), float(n)))
    expect_error(ValueError, lambda: hvd.allreduce(ones(2), op=17), "op")
    expect_error(ValueError, lambda: hvd.broadcast(ones(2), 99), "root_rank")
    expect_error(TypeError, lambda: hvd.broadcast(ones(2), "0"), "root_rank")
    expect_error(ValueError, lambda: hvd.allreduce(ones(2, dtype=torch.bool)), "dtype")
    expect_error(ValueError, lambda: hvd.allgather(tensor(1.0)), "dimension")
    expect_error(ValueError, lambda: hvd.allreduce(ones(2), name=""), "name")
    expect_error(ValueError, lambda: hvd.synchronize(10**12), "unknown")
    # Nothing above reached the other ranks: a normal collective still pairs up.
    assert (
        hvd.allreduce(full((1,), float(r)), name="after.local", op=hvd.Max).item() == hvd.size() - 1
    )


def check_name_free_only_after_completion():
    # Resubmitting a name races with its negotiation and collective; whenever the second
    # submission is accepted, the first operation must have completed already.
    n, r = hvd.size(), hvd.rank()
    rng = random.Random(r)
    accepted = 0
    for i in range(60):
        first = hvd.allreduce_async(full((3,), float(r + i)), name="reuse", op=hvd.Sum)
        time.sleep(rng.random() * 0.004)  # land anywhere in negotiation or the collective
        try:
            second = hvd.allreduce_async(full((3,), float(r)), name="reuse", op=hvd.Sum)
        except ValueError as e:
            assert "'reuse'" in str(e) and "already in flight" in str(e), e
            second = None
        else:
            accepted += 1
            assert hvd.poll(first), "a name was accepted again before its operation completed"
        expected = float(sum(range(n)) + n * i)
        assert torch.equal(hvd.synchronize(finished_within(first)), full((3,), expected))
        if second is None:  # free now: the first one completed
            second = hvd.allreduce_async(full((3,), float(r)), name="reuse", op=hvd.Sum)
        out = hvd.synchronize(finished_within(second))
        assert torch.equal(out, full((3,), float(sum(range(n)))))
    # A failed operation frees its name on every rank that submitted it.
    if n > 1:
        bad = ones(3 if r == n - 1 else 2)
        expect_error(RuntimeError, lambda: hvd.allreduce(bad, name="reuse.bad"), "reuse.bad")
    out = hvd.allreduce(ones(2), name="reuse.bad", op=hvd.Sum)
    assert torch.equal(out, full((2,), float(n)))


def check_pending_names_limit():
    # A small limit: rank 0 submits 5 names no other rank has submitted yet. The 2 newest
    # fail on rank 0 (the only rank holding them); the 3 oldest keep waiting, and complete once
    # the other ranks submit them.
    n, r = hvd.size(), hvd.rank()
    hvd.shutdown()
    hvd.init(pending_names_limit=3)
    try:
        if r == 0:
            with hvd.submitted_together():
                handles = [
                    hvd.allreduce_async(ones(1), name=f"lonely.{i}", op=hvd.Sum) for i in range(5)
                ]
            for i in (3, 4):
                expect_error(
                    RuntimeError,
                    lambda h=handles[i]: hvd.synchronize(finished_within(h)),
                    f"'lonely.{i}'",
                    "5 tensors were submitted by some ranks",
                    "pending_names_limit=3",
                    "the 2 newest fail",
                    "submitted by rank 0, missing on rank",
                )
            assert not any(hvd.poll(h) for h in handles[:3])
        torch.distributed.barrier()
        if r != 0:
            handles = [
                hvd.allreduce_async(ones(1), name=f"lonely.{i}", op=hvd.Sum) for i in range(3)
            ]
        for h in handles[:3]:
            assert torch.equal(hvd.synchronize(finished_within(h)), full((1,), float(n)))
    finally:
        hvd.shutdown()
        hvd.init()


def check_join_refuses_what_needs_the_joined_rank():
    # The last rank joins at once; the others submit, before or after it joins (either way the
    # controller decides when the join arrives), what a joined rank cannot take part in: every
    # one of them fails on every rank that submitted it, with the same message, and nothing
    # hangs. allreduce (Sum) and barrier go on.
    n, r = hvd.size(), hvd.rank()
    quitter = n - 1
    messages = {}
    if r == quitter:
        last = hvd.join()
    else:
        refused = [
            (
                "join.r.ag",
                lambda nm: hvd.allgather_async(full((r + 1, 2), 1.0), name=nm),
                "allgather",
            ),
            ("join.r.bc", lambda nm: hvd.broadcast_async(ones(2), 0, name=nm), "broadcast"),
            ("join.r.rs", lambda nm: hvd.reducescatter_async(ones(n), name=nm), "reducescatter"),
            ("join.r.a2a", lambda nm: hvd.alltoall_async(ones(n), name=nm), "alltoall"),
            ("join.r.min", lambda nm: hvd.allreduce_async(ones(1), name=nm, op=hvd.Min), "Min"),
        ]
        handles = [(nm, fn(nm), needle) for nm, fn, needle in refused]
        total = hvd.allreduce_async(full((2,), float(r + 1)), name="join.r.sum", op=hvd.Sum)
        for nm, h, needle in handles:
            messages[nm] = expect_error(
                RuntimeError,
                lambda h=h: hvd.synchronize(finished_within(h)),
                f"'{nm}'",
                needle,
                f"rank {quitter} has joined",
            )
        expected = float(sum(range(1, n)))  # the joined rank adds zeros
        assert torch.equal(hvd.synchronize(finished_within(total)), full((2,), expected))
        hvd.barrier()
        last = hvd.join()
    # Every rank agrees on who joined last, and saw the same errors.
    seen = hvd.allgather_object((last, messages))
    assert len({s[0] for s in seen}) == 1 and 0 <= last < quitter, seen
    for nm in seen[0][1]:
        assert len({s[1][nm] for s in seen[:quitter]}) == 1, [s[1][nm] for s in seen]
    # Everyone is back: allgather works again, with every rank's rows, and unnamed collectives
    # pair up although the joined rank skipped the others' unnamed barrier.
    rows = hvd.allgather(full((1,), float(r)), name="join.r.after")
    assert torch.equal(rows, arange(float(n))), rows
    assert torch.equal(hvd.allreduce(ones(2), op=hvd.Sum), full((2,), float(n)))


def check_shutdown_pending_and_reinit():
    n, r = hvd.size(), hvd.rank()
    # Only rank 0 submits "lonely", so it cannot complete; shutdown must fail it, not hang.
    h = hvd.allreduce_async(ones(1), name="lonely") if r == 0 else None
    assert h is None or not hvd.poll(h)
    hvd.shutdown()
    assert not hvd.is_initialized()
    if h is not None:
        expect_error(RuntimeError, lambda: hvd.synchronize(h), "shutdown", "lonely")
    expect_error(RuntimeError, lambda: hvd.allreduce(ones(1)), "shut down", "init")
    expect_error(RuntimeError, hvd.rank, "shut down")
    hvd.init()
    assert hvd.size() == n and hvd.rank() == r
    assert torch.equal(hvd.allreduce(ones(3), name="reinit", op=hvd.Sum), full((3,), float(n)))


def _stat_delta(key, fn):
    before = hvd.stats()[key]
    fn()
    return hvd.stats()[key] - before


def check_inline_allreduce():
    """Small CPU allreduces that hit the response cache complete from the inputs sent with the
    negotiation (engine/inline_allreduce.h): every dtype, Sum and Average, prescale and
    postscale, in place and out of place, equal to the reference on every rank."""
    n, r = hvd.size(), hvd.rank()
    cases = [
        (dtype, op, pre, post)
        for dtype in DTYPES
        for op, pre, post in ((hvd.Sum, 1.0, 1.0), (hvd.Average, 1.0, 1.0), (hvd.Sum, 2.0, 0.5))
        if not (pre != 1.0 and dtype in INT_DTYPES)  # integer scaling truncates: tested below
    ] + [(torch.int32, hvd.Average, 3.0, 1.0)]

    def step(seed):
        for i, (dtype, op, pre, post) in enumerate(cases):
            shape = SHAPES[i % len(SHAPES)]
            inputs = [data(k, seed + i, shape, dtype) for k in range(n)]
            scaled = [t.double() * pre for t in inputs]
            if dtype in INT_DTYPES:
                scaled = [t.trunc() for t in scaled]  # packed in the integer dtype
            expected = reference(op, scaled) * post
            if i % 2:
                out = hvd.allreduce(
                    inputs[r], name=f"inline.{i}", op=op, prescale_factor=pre, postscale_factor=post
                )
                assert torch.equal(inputs[r], data(r, seed + i, shape, dtype)), "input changed"
            else:
                out = inputs[r].clone()
                assert (
                    hvd.allreduce_(
                        out, name=f"inline.{i}", op=op, prescale_factor=pre, postscale_factor=post
                    )
                    is out
                )
            close(out, expected, dtype)

    step(1000)  # first time: sent in full, run the usual way
    inlined = _stat_delta("inline_reduced", lambda: step(2000))
    expect_inline = device().type == "cpu"
    assert inlined == (len(cases) if expect_inline else 0), (inlined, len(cases))
    # Larger than the inline limit, Min/Max, allgather: the usual way, still right.
    big = data(r, 7, (600,), torch.float32)
    for _ in range(2):
        before = hvd.stats()["inline_reduced"]
        out = hvd.allreduce(big, name="inline.big", op=hvd.Sum)
        close(
            out,
            reference(hvd.Sum, [data(k, 7, (600,), torch.float32) for k in range(n)]),
            torch.float32,
        )
        small_max = hvd.allreduce(data(r, 8, (5,), torch.int32), name="inline.max", op=hvd.Max)
        close(
            small_max,
            reference(hvd.Max, [data(k, 8, (5,), torch.int32) for k in range(n)]),
            torch.int32,
        )
        assert hvd.stats()["inline_reduced"] == before


def check_inline_allreduce_straggler():
    """A rank that submits a cached small allreduce later than the others: its peers send their
    inputs again each round, so it still completes inline, with the right result."""
    n, r = hvd.size(), hvd.rank()
    for step in range(4):
        if r == n - 1:
            time.sleep(0.05)
        t = data(r, 3000 + step, (16,), torch.float32)
        out = hvd.allreduce(t, name="inline.late", op=hvd.Sum)
        expected = reference(
            hvd.Sum, [data(k, 3000 + step, (16,), torch.float32) for k in range(n)]
        )
        close(out, expected, torch.float32)


def check_inline_allreduce_timeline():
    """An allreduce completed inline shows on the timeline as negotiate + inline reduce."""
    path = os.environ["WORKER_RESULTS"] + ".inline_timeline.json"
    t = ones(4)
    hvd.allreduce(t, name="inline.traced", op=hvd.Sum)  # a miss: cached for the next one
    hvd.start_timeline(path)
    inlined = _stat_delta(
        "inline_reduced", lambda: hvd.allreduce(t, name="inline.traced", op=hvd.Sum)
    )
    hvd.stop_timeline()
    if device().type != "cpu":
        return
    assert inlined == 1, inlined
    if hvd.rank() != 0:
        return  # only rank 0 writes
    events = hvd.timeline.load(path)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    phases = {e["name"] for e in events if e["ph"] == "X" and tracks[e["tid"]] == "inline.traced"}
    assert phases == {"negotiate", "inline reduce"}, events


def check_fast_path_falls_back():
    """Steady state (every rank sends the same cache references: fast rounds), then one rank
    changes a tensor's dtype: full negotiation, the mismatch raised on every rank naming the
    rank, then back to the fast path."""
    n, r = hvd.size(), hvd.rank()
    names = [f"fast.{i}" for i in range(6)]

    def step(odd_dtype=torch.float32):
        handles = []
        with hvd.submitted_together():  # one message per rank: the same references everywhere
            for i, name in enumerate(names):
                dtype = odd_dtype if (i == 2 and r == n - 1) else torch.float32
                handles.append(hvd.allreduce_async(ones(300, dtype=dtype), name=name, op=hvd.Sum))
        return handles

    def ok_step():
        for h in step():
            assert torch.equal(hvd.synchronize(h), full((300,), float(n)))

    hvd.barrier()
    ok_step()
    fast = _stat_delta("fast_cycles", lambda: [ok_step() for _ in range(5)])
    assert fast >= 1, fast  # a rank's timer may split a step across rounds, not every time
    handles = step(torch.float64)
    for i, h in enumerate(handles):
        if i == 2:
            expect_error(
                RuntimeError, lambda h=h: hvd.synchronize(h), "fast.2", "dtype", f"on rank {n - 1}"
            )
        else:
            assert torch.equal(hvd.synchronize(h), full((300,), float(n)))
    ok_step()


def check_fusion_padding_never_reaches_results():
    """The fusion buffer puts every tensor at a 16-byte-aligned offset, so odd sizes leave
    padding between them. Both buffer slots are first filled with NaN (a batch of 16-byte
    tensors covers them back to back), then odd-sized tensors are fused over them: whatever the
    padding holds, no reduce op lets it into a result."""
    n, r = hvd.size(), hvd.rank()
    sizes = [3, 5, 1, 7, 2, 6]  # padded after 3, 5, 1, 7 and 6 elements (float32: 4 per 16 B)
    total = sum(sizes) + 4 * len(sizes)
    for case, (dtype, op) in enumerate(
        [
            (torch.float32, hvd.Sum),
            (torch.float32, hvd.Min),
            (torch.float32, hvd.Max),
            (torch.float32, hvd.Product),
            (torch.float64, hvd.Average),
            (torch.float16, hvd.Product),
            (torch.int32, hvd.Min),
            (torch.int8, hvd.Max),
        ]
    ):
        per_16 = 16 // torch.tensor([], dtype=dtype).element_size()
        poison = torch.nan if dtype.is_floating_point else torch.iinfo(dtype).min
        for slot in range(2):  # the engine alternates two fusion buffer slots
            with hvd.submitted_together():
                handles = [
                    hvd.allreduce_async(
                        full((per_16,), poison, dtype=dtype), name=f"pad.poison.{case}.{slot}.{i}"
                    )
                    for i in range(total // per_16 + 1)
                ]
            for h in handles:
                hvd.synchronize(h)
        seed = 1200 + case
        with hvd.submitted_together():
            handles = [
                hvd.allreduce_async(
                    data(r, seed + i, (size,), dtype, small=True), name=f"pad.{case}.{i}", op=op
                )
                for i, size in enumerate(sizes)
            ]
        for i, (h, size) in enumerate(zip(handles, sizes)):
            inputs = [data(k, seed + i, (size,), dtype, small=True) for k in range(n)]
            close(hvd.synchronize(h), reference(op, inputs), dtype)
    # The other layouts that pad: grouped reduce-scatter, allgather and broadcast.
    parts = [data(r, 1300 + i, (size, 3), torch.float32) for i, size in enumerate(sizes)]
    outs = hvd.grouped_reducescatter(parts, name="pad.rs", op=hvd.Sum)
    for i, (out, size) in enumerate(zip(outs, sizes)):
        whole = sum(data(k, 1300 + i, (size, 3), torch.float32).double() for k in range(n))
        first = r * (size // n) + min(r, size % n)
        rows = size // n + (1 if r < size % n else 0)
        close(out, whole[first : first + rows], torch.float32)
    with hvd.submitted_together():
        handles = [
            hvd.allgather_async(data(r, 1400 + i, (size + r,), torch.float16), name=f"pad.ag.{i}")
            for i, size in enumerate(sizes)
        ]
    for i, (h, size) in enumerate(zip(handles, sizes)):
        expected = torch.cat([data(k, 1400 + i, (size + k,), torch.float16) for k in range(n)])
        assert torch.equal(hvd.synchronize(h), expected), i
    with hvd.submitted_together():
        handles = [
            hvd.broadcast_async(data(r, 1500 + i, (size,), torch.int16), 0, name=f"pad.bc.{i}")
            for i, size in enumerate(sizes)
        ]
    for i, (h, size) in enumerate(zip(handles, sizes)):
        assert torch.equal(hvd.synchronize(h), data(0, 1500 + i, (size,), torch.int16)), i


def check_negotiation_overlaps_the_running_collective():
    """A tensor submitted once a large allreduce started is negotiated meanwhile: on rank 0's
    timeline, a negotiation round lies inside that collective. (A few tries: a loaded machine
    may schedule the round late; with negotiation behind the collective, none could ever lie
    inside it.) CPU only: a CUDA collective's host-side span is only its queueing."""
    if device().type != "cpu":
        return
    path = os.environ["WORKER_RESULTS"] + ".overlap_timeline.json"
    big = ones(1 << 22)  # 16 MiB: long enough a collective to negotiate beside
    found = False
    for attempt in range(5):
        hvd.start_timeline(path)
        started = hvd.stats()["collectives"]
        big.fill_(1.0)
        # In place: no copy before its collective, which starts right after the count moves.
        h_big = hvd.allreduce_async_(big, name=f"overlap.big.{attempt}", op=hvd.Sum)
        while hvd.stats()["collectives"] == started:  # until its collective starts here
            time.sleep(0.0005)
        h_small = hvd.allreduce_async(ones(4), name=f"overlap.small.{attempt}", op=hvd.Sum)
        assert torch.equal(hvd.synchronize(h_small), full((4,), float(hvd.size())))
        assert torch.equal(hvd.synchronize(h_big), full((1 << 22,), float(hvd.size())))
        hvd.stop_timeline()
        # Every rank takes part in every try (rank 0 alone decides), so all stop together.
        found = bool(
            hvd.broadcast_object(_negotiated_inside_collective(path) if hvd.rank() == 0 else None)
        )
        if found:
            break
    assert found, "no negotiation round overlapped the running collective in 5 tries"


def _negotiated_inside_collective(path):
    events = hvd.timeline.load(path)
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    spans = {}
    for e in events:
        if e["ph"] == "X":
            spans.setdefault(tracks[e["tid"]], []).append((e["ts"], e["ts"] + e["dur"]))
    rounds = spans.get("engine: negotiation", [])
    collectives = spans.get("engine: collectives", [])
    assert rounds and collectives, sorted(spans)
    return any(c0 < b and e < c1 for b, e in rounds for c0, c1 in collectives)


def check_no_empty_rounds():
    """Nothing pending on any rank and nothing to send: one round 16 cycles after the last busy
    one, then up to 500 ms between rounds, while idle and while the engine's own collective
    runs, instead of one round per cycle (1 ms). (Each rank wakes on its own
    submission, so this costs no latency.) Upper bounds only: a loaded machine makes fewer
    rounds, not more."""
    hvd.barrier()
    idle = _stat_delta("cycles", lambda: time.sleep(1.0))
    assert idle <= 5, f"{idle} negotiation rounds in 1 s with nothing to negotiate"
    big = ones(1 << 24)  # 64 MiB: tens of cycles long on a CPU
    seconds, during = time.perf_counter(), hvd.stats()["cycles"]
    out = hvd.synchronize(hvd.allreduce_async_(big, name="quiet.big", op=hvd.Sum))
    seconds, during = time.perf_counter() - seconds, hvd.stats()["cycles"] - during
    assert torch.equal(out, full((1 << 24,), float(hvd.size())))
    # The round that agreed it, the one 16 cycles later, a timer or two: a handful, where
    # one round per cycle would be one per millisecond.
    assert during <= 6 + 2 * seconds, f"{during} rounds during a {seconds:.3f} s allreduce"


def engine_threads_leave_openmp_to_the_user():
    """The engine's threads run ATen's CPU work alone (engine/engine_thread.h): a fused
    allreduce large enough for pack_ and unpack_ to split across threads starts no OpenMP team
    on the executor thread, so the process does not hold more OpenMP threads than the user
    asked for (libgomp then throttles every team, the user's included). Needs a process with
    OpenMP threads to spare (test_engine.py runs it with OMP_NUM_THREADS=2)."""

    def engine_threads():
        names = {}
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/comm") as f:
                    name = f.read().strip()
            except OSError:  # the thread ended
                continue
            if name.startswith("gradfuse-"):
                names[name] = names.get(name, 0) + 1
        return names

    assert torch.get_num_threads() == 2, torch.get_num_threads()
    assert "OpenMP" in torch.__config__.parallel_info(), torch.__config__.parallel_info()
    n = hvd.size()
    # Four tensors of 1M floats: pack_ splits them into many chunks, each a parallel_for item.
    tensors = [data(hvd.rank(), 90 + i, (1 << 20,), torch.float32) for i in range(4)]
    with hvd.submitted_together():
        handles = [
            hvd.allreduce_async_(t, name=f"omp.{i}", op=hvd.Average) for i, t in enumerate(tensors)
        ]
    for i, h in enumerate(handles):
        out = hvd.synchronize(h)
        expected = reference(
            hvd.Average, [data(r, 90 + i, (1 << 20,), torch.float32) for r in range(n)]
        )
        close(out, expected, torch.float32)
    # Every thread the engine starts is named; each of its two working threads is alone (an
    # OpenMP worker it had started would carry its name: Linux copies it to new threads).
    threads = engine_threads()
    assert threads.get("gradfuse-exec") == 1, threads
    assert threads.get("gradfuse-negot") == 1, threads
    assert torch.get_num_threads() == 2, "the user's thread count changed"


CHECKS = checks_of(globals())
# Run on their own by test_engine.py, in a process with OpenMP threads to spare.
OPENMP_CHECKS = {"engine_threads_leave_openmp_to_the_user": engine_threads_leave_openmp_to_the_user}
# Checks that make one rank disagree with, or wait for, another: meaningless at 1 rank, so a
# 1-rank group (GRADFUSE_TEST_RANKS=1) does not run them.
NEEDS_TWO_RANKS = {
    "join_refuses_what_needs_the_joined_rank",
    "fast_path_falls_back",
    "inline_allreduce_straggler",
    "local_errors",
    "mismatch_errors",
    "negotiation_overlaps_the_running_collective",
    "pending_names_limit",
    "response_cache",
    "shutdown_pending_and_reinit",
}


def main():
    names = sys.argv[1:]
    results = {}
    device()  # picks and sets this rank's GPU (GRADFUSE_TEST_DEVICE=cuda) before the transports
    # Before init: clear errors, no hang.
    try:
        expect_error(RuntimeError, lambda: hvd.allreduce(ones(1)), "not been initialized")
        expect_error(RuntimeError, hvd.size, "not been initialized")
        results["before_init"] = "ok"
    except Exception:  # noqa: BLE001  (any failure is reported, not raised)
        results["before_init"] = traceback.format_exc()
    hvd.init()
    rank = hvd.rank()
    try:
        run_checks({**CHECKS, **OPENMP_CHECKS}, names, rank, results)
    finally:
        hvd.shutdown()


if __name__ == "__main__":
    main()
