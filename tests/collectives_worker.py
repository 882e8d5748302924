"""One rank of the multi-process tests of hierarchical allreduce and the collectives beyond
allreduce/allgather/broadcast (reducescatter, alltoall, barrier, join). Started N times by
tests/test_collectives.py; runs every check named on the command line against one engine and
writes {check: "ok" | traceback} per rank (tests/multiproc.py).

Every rank's data differs; expected values are computed locally by regenerating every other
rank's input from the same seeds."""

from __future__ import annotations

import os
import sys
import time

import gradfuse as hvd
import torch
import torch.distributed as dist

# The engine's allreduce checks run here too (CHECKS picks up every check_* name in this
# module), so the hierarchical path sees every case the flat one does.
from engine_worker import (  # noqa: F401
    DTYPES,
    FLOAT_DTYPES,
    check_allreduce_dtypes_ops,
    check_allreduce_scales_inplace,
    check_grouped_allreduce,
    check_join_refuses_what_needs_the_joined_rank,
    check_many_in_flight_random_order,
    check_mismatch_errors,
    close,
    data,
    expect_error,
    reference,
)
from multiproc import arange, checks_of, device, empty, full, ones, tensor, worker_main, zeros

# Lengths that do not divide by local_size (2) or by the job size, and one bigger than a slot.
AWKWARD = [1, 2, 3, 5, 7, 13, 31, 1009]
OPS = [hvd.Sum, hvd.Average, hvd.Min, hvd.Max, hvd.Product]

# ---- hierarchical allreduce -----------------------------------------------------------------


def check_layout():
    n, r = hvd.size(), hvd.rank()
    k = int(os.environ.get("GRADFUSE_TEST_LOCAL_SIZE", "0")) or n
    assert (hvd.local_rank(), hvd.local_size()) == (r % k, k), (hvd.local_rank(), hvd.local_size())
    assert (hvd.cross_rank(), hvd.cross_size()) == (r // k, n // k)


def check_hierarchical_every_dtype_op_size():
    # Integer-valued data: every dtype and op must match the flat reference exactly.
    n, r = hvd.size(), hvd.rank()
    seed = 10_000
    for dtype in DTYPES:
        for op in OPS:
            handles = {}
            for numel in AWKWARD:
                seed += 1
                small = op == hvd.Product
                handles[seed] = (
                    hvd.allreduce_async(
                        data(r, seed, (numel,), dtype, small), name=f"h.{seed}", op=op
                    ),
                    numel,
                    small,
                )
            for s, (h, numel, small) in handles.items():
                expected = reference(op, [data(k, s, (numel,), dtype, small) for k in range(n)])
                close(hvd.synchronize(h), expected, dtype)


def check_hierarchical_matches_flat_random_floats():
    # Non-integer data: equal to torch.distributed's flat all_reduce up to rounding order.
    r = hvd.rank()
    for i, dtype in enumerate(FLOAT_DTYPES):
        for numel in AWKWARD:
            g = torch.Generator().manual_seed(20_000 + 100 * i + numel * 10 + r)
            mine = torch.randn(numel, generator=g).to(device(), dtype)
            # The reference: torch's flat all_reduce on the default group, outside the engine,
            # kept on the CPU (Gloo) whatever the device under test: on CUDA the default group
            # would use NCCL, which cannot run several ranks on one GPU.
            flat = mine.to("cpu", copy=True)  # a copy also when mine is on the CPU
            dist.all_reduce(flat)
            out = hvd.allreduce(mine, name=f"hf.{i}.{numel}", op=hvd.Sum).cpu()
            tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
            assert torch.allclose(out.double(), flat.double(), rtol=tol, atol=tol), (dtype, numel)
            avg = hvd.allreduce(mine, name=f"hf.avg.{i}.{numel}", op=hvd.Average).cpu()
            assert torch.allclose(avg.double(), flat.double() / hvd.size(), rtol=tol, atol=tol)


def check_hierarchical_fused_and_empty():
    # Many tensors in one fusion buffer whose total length is odd, plus an empty tensor.
    n, r = hvd.size(), hvd.rank()
    shapes = [(3,), (1,), (5, 3), (7,), (0,), (2, 2, 2)]
    tensors = [data(r, 30_000 + i, s, torch.float32) for i, s in enumerate(shapes)]
    outs = hvd.grouped_allreduce(tensors, name="hfused", op=hvd.Average)
    for i, (s, out) in enumerate(zip(shapes, outs)):
        expected = reference(hvd.Average, [data(k, 30_000 + i, s, torch.float32) for k in range(n)])
        close(out, expected, torch.float32)


def check_zz_init_errors():
    # Runs last (checks run in sorted order): restarts the engine. A layout that cannot be
    # built fails init() on every rank alike and leaves gradfuse restartable.
    n = hvd.size()
    hvd.shutdown()
    expect_error(
        ValueError, lambda: hvd.init(test_local_size=n + 1), f"test_local_size={n + 1}", str(n)
    )
    assert not hvd.is_initialized()
    expect_error(ValueError, lambda: hvd.init(hierarchical_allreduce="maybe"), "hierarchical")
    hvd.init()
    assert hvd.size() == n
    assert torch.equal(
        hvd.allreduce(ones(3), name="after.init.errors", op=hvd.Sum),
        full((3,), float(n)),
    )


# ---- reducescatter ---------------------------------------------------------------------------


def rows_of(dim0, n, k):
    """(first row, rows) of rank k's part: the first dim0 % n ranks get one row more."""
    base, extra = divmod(dim0, n)
    return k * base + min(k, extra), base + (1 if k < extra else 0)


def check_reducescatter():
    n, r = hvd.size(), hvd.rank()
    seed = 40_000
    for dtype in DTYPES:
        for op in (hvd.Sum, hvd.Average):
            handles = {}
            for dim0 in (1, 3, n, 7, 2 * n + 1):  # fewer rows than ranks, uneven, even
                seed += 1
                shape = (dim0, 3)
                handles[seed] = (
                    hvd.reducescatter_async(data(r, seed, shape, dtype), op=op, name=f"rs.{seed}"),
                    shape,
                )
            for s, (h, shape) in handles.items():  # submitted together: fused
                reduced = reference(op, [data(k, s, shape, dtype) for k in range(n)])
                first, rows = rows_of(shape[0], n, r)
                out = hvd.synchronize(h)
                assert out.shape == (rows, 3), (out.shape, shape)
                close(out, reduced[first : first + rows], dtype)
    # Default op is Average; a 1-D tensor.
    out = hvd.reducescatter(full((n,), float(r)), name="rs.default")
    assert torch.allclose(out, full((1,), (n - 1) / 2)), out


def check_reducescatter_errors():
    n, r = hvd.size(), hvd.rank()
    odd = r == n - 1
    expect_error(ValueError, lambda: hvd.reducescatter(ones(4), op=hvd.Max), "Sum or Average")
    expect_error(ValueError, lambda: hvd.reducescatter(tensor(1.0)), "dimension")
    expect_error(
        RuntimeError,
        lambda: hvd.reducescatter(ones(5 if odd else 4, 2), name="rs.bad.shape"),
        "rs.bad.shape",
        "shape",
        f"on rank {n - 1}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.reducescatter(ones(4), op=hvd.Sum if odd else hvd.Average, name="rs.bad.op"),
        "rs.bad.op",
        "reduce op",
    )
    assert torch.equal(
        hvd.reducescatter(ones(n), op=hvd.Sum, name="rs.after"), full((1,), float(n))
    )


# ---- alltoall -------------------------------------------------------------------------------


def send_splits(k, n, seed):
    """The rows rank k sends to each rank (some zero)."""
    return [(k + j + seed) % 3 for j in range(n)]


def check_alltoall():
    n, r = hvd.size(), hvd.rank()
    # A column of one element per row: torch calls it contiguous (the size-1 dimension's stride
    # is n, not 1), and the engine must still send it as bytes.
    column = (torch.arange(n, dtype=torch.int32, device=device()) + 10 * r).view(1, n).t()
    assert column.is_contiguous() and column.stride() == (1, n)
    got = hvd.alltoall(column, name="a2a.column")
    expected = tensor([[10 * k + r] for k in range(n)], dtype=torch.int32)
    assert torch.equal(got, expected), (got, expected)
    for i, dtype in enumerate(DTYPES):
        seed = 50_000 + i
        splits = send_splits(r, n, seed)
        mine = data(r, seed, (sum(splits), 2), dtype)
        as_tensor = i % 2 == 0  # splits as a list or as a 1-D tensor
        out, received = hvd.alltoall(
            mine, splits=torch.tensor(splits) if as_tensor else splits, name=f"a2a.{seed}"
        )
        parts, expect_received = [], []
        for k in range(n):
            theirs = send_splits(k, n, seed)
            start = sum(theirs[:r])
            parts.append(data(k, seed, (sum(theirs), 2), dtype)[start : start + theirs[r]])
            expect_received.append(theirs[r])
        assert torch.equal(out, torch.cat(parts)), (dtype, out, parts)
        assert received.tolist() == expect_received, (received, expect_received)
    # Even split without splits: rank r gets rows [2r, 2r + 2) of every rank's tensor.
    mine = arange(2 * n * 3, dtype=torch.float32).view(2 * n, 3) + 100 * r
    out = hvd.alltoall(mine, name="a2a.even")
    expected = torch.cat(
        [(arange(2 * n * 3.0).view(2 * n, 3) + 100 * k)[2 * r : 2 * r + 2] for k in range(n)]
    )
    assert torch.equal(out, expected)
    # Nothing sent at all, and a rank that sends nothing.
    out, received = hvd.alltoall(empty(0, 4), splits=[0] * n, name="a2a.nothing")
    assert out.shape == (0, 4) and received.tolist() == [0] * n
    splits = [0] * n if r == 0 else [1] * n
    out, received = hvd.alltoall(full((sum(splits),), float(r)), splits, name="a2a.quiet")
    assert torch.equal(out, arange(1.0, n)), out
    assert received.tolist() == [0] + [1] * (n - 1)


def check_alltoall_errors():
    n, r = hvd.size(), hvd.rank()
    odd = r == n - 1
    t = ones(n, 2)
    expect_error(ValueError, lambda: hvd.alltoall(t, splits=[1] * (n + 1)), "splits", "per rank")
    expect_error(ValueError, lambda: hvd.alltoall(t, splits=[-1, n + 1] + [0] * (n - 2)), ">= 0")
    expect_error(ValueError, lambda: hvd.alltoall(t, splits=[2] * n), "splits", "sum")
    if n >= 3:
        # Splits whose int64 sum wraps around to exactly dim 0 (2 * (2**63 - 1) + n + 2 is n
        # modulo 2**64) must not pass as a valid split.
        big = 2**63 - 1
        wraps = [big, big, n + 2] + [0] * (n - 3)
        expect_error(ValueError, lambda: hvd.alltoall(t, splits=wraps), "splits", "exceed")
    expect_error(ValueError, lambda: hvd.alltoall(ones(n + 1)), "divide")
    expect_error(ValueError, lambda: hvd.alltoall(t, splits=ones(n)), "splits")
    expect_error(TypeError, lambda: hvd.alltoall(t, splits=[1.0] * n), "splits")
    expect_error(ValueError, lambda: hvd.alltoall(tensor(1.0)), "dimension")
    expect_error(
        RuntimeError,
        lambda: hvd.alltoall(ones(n, 3 if odd else 2), name="a2a.bad.shape"),
        "a2a.bad.shape",
        "shape",
        f"on rank {n - 1}",
    )
    expect_error(
        RuntimeError,
        lambda: hvd.alltoall(
            ones(n, dtype=torch.float64 if odd else torch.float32), name="a2a.bad.dtype"
        ),
        "a2a.bad.dtype",
        "dtype",
    )
    out = hvd.alltoall(full((n,), float(r)), name="a2a.after")
    assert torch.equal(out, arange(float(n)))


def check_refused_unnamed_call_on_one_rank_keeps_names_in_step():
    """An unnamed call the engine refuses on one rank (a non-finite scale, caught in C++) takes
    no automatic name: the ranks' next unnamed collectives still pair up."""
    n, r = hvd.size(), hvd.rank()
    if r == 0:
        for bad in (
            lambda: hvd.allreduce(ones(3), prescale_factor=float("nan")),
            lambda: hvd.allreduce_(ones(3), postscale_factor=float("inf")),
        ):
            expect_error(ValueError, bad, "scale")
    for i in range(3):
        got = hvd.allreduce(full((2,), float(r + i)), op=hvd.Sum)
        assert torch.equal(got, full((2,), float(sum(range(n)) + n * i))), got


# ---- barrier and join -----------------------------------------------------------------------


def check_barrier():
    r = hvd.rank()
    time.sleep(0.1 * r)  # the last rank arrives last
    arrived = time.time()
    hvd.barrier()
    left = time.time()
    times = hvd.allgather(tensor([[arrived, left]], dtype=torch.float64), name="bar.t")
    assert times[:, 1].min() >= times[:, 0].max(), times  # nobody left before all arrived
    for _ in range(3):
        hvd.barrier()


def check_join():
    n, r = hvd.size(), hvd.rank()
    quitter = n - 1  # runs out of data first
    if r == quitter:
        hvd.allreduce(ones(3), name="join.0", op=hvd.Sum)
        last = hvd.join()
    else:
        assert torch.equal(hvd.allreduce(ones(3), name="join.0", op=hvd.Sum), full((3,), float(n)))
        time.sleep(0.2)  # the quitter has joined by now
        for i, dtype in enumerate(DTYPES):  # it contributes zeros; Average divides by size
            mine = data(r, 60_000 + i, (5,), dtype)
            others = [data(k, 60_000 + i, (5,), dtype) for k in range(n - 1)]
            joined_zeros = [zeros(5, dtype=dtype)]
            close(
                hvd.allreduce(mine, name=f"join.s.{i}", op=hvd.Sum),
                reference(hvd.Sum, others),
                dtype,
            )
            close(
                hvd.allreduce(mine, name=f"join.a.{i}", op=hvd.Average),
                reference(hvd.Average, others + joined_zeros),
                dtype,
            )
        grads = hvd.grouped_allreduce([ones(4), ones(2, 2)], name="join.g", op=hvd.Sum)
        assert all(torch.equal(g, torch.full_like(g, float(n - 1))) for g in grads)
        # (What fails while a rank has joined: check_join_refuses_what_needs_the_joined_rank.)
        if r == 0:
            time.sleep(0.3)  # rank 0 joins last
        last = hvd.join()
    assert last == 0, last
    # Everyone is back: collectives use every rank again, and join works a second time.
    assert torch.equal(hvd.allreduce(ones(2), name="join.after", op=hvd.Sum), full((2,), float(n)))
    if r == 1:
        time.sleep(0.3)
    assert hvd.join() == 1 % n


CHECKS = checks_of(globals())
# Checks that make one rank disagree with, or wait for, another: meaningless at 1 rank, so a
# 1-rank group (GRADFUSE_TEST_RANKS=1) does not run them.
NEEDS_TWO_RANKS = {
    "alltoall_errors",
    "join",
    "join_refuses_what_needs_the_joined_rank",
    "mismatch_errors",
    "reducescatter_errors",
}

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
