"""One rank of the multi-process tests of hierarchical allreduce and the collectives beyond
allreduce/allgather/broadcast (reducescatter, alltoall, barrier, join). Started N times by
tests/test_collectives.py; runs every check named on the command line against one engine and
writes {check: "ok" | traceback} per rank (tests/multiproc.py).

Every rank's data differs; expected values are computed locally by regenerating every other
rank's input from the same seeds."""

from __future__ import annotations

import os
import sys

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
    check_many_in_flight_random_order,
    check_mismatch_errors,
    close,
    data,
    expect_error,
    reference,
)
from multiproc import run_checks

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
            mine = torch.randn(numel, generator=g).to(dtype)
            flat = mine.clone()
            dist.all_reduce(flat)  # the default group: a flat ring, outside the engine
            out = hvd.allreduce(mine, name=f"hf.{i}.{numel}", op=hvd.Sum)
            tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
            assert torch.allclose(out.double(), flat.double(), rtol=tol, atol=tol), (dtype, numel)
            avg = hvd.allreduce(mine, name=f"hf.avg.{i}.{numel}", op=hvd.Average)
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
    expect_error(ValueError, lambda: hvd.init(test_local_size=3), "test_local_size=3", str(n))
    assert not hvd.is_initialized()
    expect_error(ValueError, lambda: hvd.init(hierarchical_allreduce="maybe"), "hierarchical")
    hvd.init()
    assert hvd.size() == n
    assert torch.equal(
        hvd.allreduce(torch.ones(3), name="after.init.errors", op=hvd.Sum),
        torch.full((3,), float(n)),
    )


CHECKS = {name[len("check_") :]: fn for name, fn in globals().items() if name.startswith("check_")}


def main():
    names = sys.argv[1:]
    hvd.init()
    try:
        run_checks(CHECKS, names, hvd.rank())
    finally:
        hvd.shutdown()


if __name__ == "__main__":
    main()
