"""One rank of tests/test_fp64_scaling.py: float64 allreduce scaled in double (issue 11, item 6).

Every rank's tensors differ; each rank regenerates every other rank's input from the same
seeds and checks its result bit for bit against a float64 reference: the inputs (prescaled in
double) summed in rank order, then multiplied by postscale * (1 / size) in double, as the engine
forms the factor. A float scale would be off by ~3e-8 relative and fail almost every element.

The sum itself must not depend on the order Gloo adds the ranks' values in, so that the only
rounding under test is the scaling:
- without a prescale, the inputs are dyadic (k / 1024 with |k| < 2**20): their sum is exact;
- with a prescale, each element is nonzero on one rank only (x * prescale + 0 + 0 is exact in
  any order), and x is a full-precision random double.

Each case runs through the fusion path (several tensors, out of place: packed with pack_,
unpacked with unpack_) and the in-place path (one tensor reduced in its own memory, scaled with
Tensor.mul_), and the engine's counters confirm which path ran."""

from __future__ import annotations

import sys

import gradfuse as hvd
import torch
from multiproc import checks_of, worker_main

# Awkward sizes around the CPU kernels' 8 lanes and 64K-element chunks.
SIZES = [1, 3, 4, 5, 7, 33, 4097, 65537]

# (reduce op, prescale, postscale): an Average alone (1/size), a postscale, and both together.
CASES = {
    "average": (hvd.Average, 1.0, 1.0),
    "postscale": (hvd.Sum, 1.0, 1 / 7),
    "prescale_postscale_average": (hvd.Average, 1 / 3, 1 / 7),
}


def rank_input(rank, seed, numel, prescaled):
    """The float64 tensor `rank` contributes for `seed` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if not prescaled:
        return torch.randint(-(2**20), 2**20, (numel,), generator=g).double() / 1024
    # The owner of each element is drawn from a generator every rank shares.
    owner = torch.randint(0, hvd.size(), (numel,), generator=torch.Generator().manual_seed(seed))
    x = torch.randn(numel, generator=g, dtype=torch.float64)
    return torch.where(owner == rank, x, torch.zeros_like(x))


def reference(seed, numel, op, prescale, postscale):
    n = hvd.size()
    total = torch.zeros(numel, dtype=torch.float64)
    for r in range(n):  # rank order
        total += rank_input(r, seed, numel, prescale != 1.0) * prescale
    return total * (postscale * (1.0 / n if op == hvd.Average else 1.0))


def assert_bits_equal(out, ref, what):
    assert out.dtype == torch.float64 and out.shape == ref.shape, (what, out.dtype, out.shape)
    differ = (out.view(torch.int64) != ref.view(torch.int64)).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{what}: {differ.numel()} of {out.numel()} elements differ from the float64 reference, "
        f"first at {differ[0].item()}: {out[differ[0]].item()!r} != {ref[differ[0]].item()!r}"
    )


def run_fused(case, seed):
    op, pre, post = CASES[case]
    r = hvd.rank()
    inputs = [rank_input(r, seed + i, n, pre != 1.0) for i, n in enumerate(SIZES)]
    before = hvd.stats()
    outs = hvd.grouped_allreduce(
        inputs, name=f"fp64.fused.{case}", op=op, prescale_factor=pre, postscale_factor=post
    )
    after = hvd.stats()
    assert after["collectives"] > before["collectives"]
    assert after["in_place"] == before["in_place"], "expected the fusion (packed) path"
    for i, (n, out) in enumerate(zip(SIZES, outs)):
        assert_bits_equal(out, reference(seed + i, n, op, pre, post), f"{case}, tensor {i}")


def run_in_place(case, seed):
    op, pre, post = CASES[case]
    n = 65537
    t = rank_input(hvd.rank(), seed, n, pre != 1.0)
    before = hvd.stats()
    hvd.allreduce_(
        t, name=f"fp64.inplace.{case}", op=op, prescale_factor=pre, postscale_factor=post
    )
    after = hvd.stats()
    assert after["in_place"] == before["in_place"] + 1, "expected the in-place path"
    assert_bits_equal(t, reference(seed, n, op, pre, post), case)


def check_fused_average():
    run_fused("average", 100)


def check_fused_postscale():
    run_fused("postscale", 200)


def check_fused_prescale_postscale_average():
    run_fused("prescale_postscale_average", 300)


def check_in_place_average():
    run_in_place("average", 400)


def check_in_place_postscale():
    run_in_place("postscale", 500)


def check_in_place_prescale_postscale_average():
    run_in_place("prescale_postscale_average", 600)


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
