"""One rank of the multi-process SyncBatchNorm tests (tests/test_sync_batch_norm.py): forward
output, running statistics and gradients must equal torch.nn.BatchNorm*d run in one process, in
float64 on the CPU, on the concatenation of every rank's batch (ranks hold different batch
sizes, one of them possibly none)."""

from __future__ import annotations

import sys

import gradfuse as hvd
import torch
from engine_worker import expect_error
from multiproc import checks_of, device, worker_main

REFERENCE = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
REFERENCE[5] = torch.nn.BatchNorm3d
SPATIAL = {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}
C = 4


def batch_sizes(empty_rank=None):
    sizes = [2 + (3 * r) % 5 for r in range(hvd.size())]  # different per rank
    if empty_rank is not None:
        sizes[empty_rank] = 0
    return sizes


def global_tensors(seed, sizes, dims):
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), C, *SPATIAL[dims])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5
    weight_of_output = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, weight_of_output


def my_rows(t, sizes):
    start = sum(sizes[: hvd.rank()])
    return t[start : start + sizes[hvd.rank()]]


def assert_close(got, expected, what, tol):
    got = got.detach().cpu().double()
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    err = float((got - expected).abs().max()) if got.numel() else 0.0
    assert err <= tol * max(1.0, float(expected.abs().max()) if expected.numel() else 0.0), (
        f"{what}: max error {err}"
    )


def compare_training(dims, dtype, momentum, affine, track, sizes, steps=3, tol=1e-10):
    """Trains `steps` forward/backward passes on both modules and compares everything, then
    one eval-mode forward."""
    sync = hvd.SyncBatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track)
    sync = sync.to(device(), dtype)
    ref = REFERENCE[dims](C, momentum=momentum, affine=affine, track_running_stats=track).double()
    if affine:  # not the default ones/zeros, so the affine terms matter
        with torch.no_grad():
            for m in (sync, ref):
                m.weight.copy_(torch.linspace(0.5, 2.0, C))
                m.bias.copy_(torch.linspace(-1.0, 1.0, C))
    for step in range(steps + 1):
        train = step < steps
        sync.train(train)
        ref.train(train)
        x, w_out = global_tensors(1000 * dims + step, sizes, dims)
        mine = my_rows(x, sizes).to(device(), dtype).requires_grad_()
        xr = x.clone().requires_grad_()
        y = sync(mine)
        yr = ref(xr)
        what = f"{dims}-D {dtype} momentum={momentum} affine={affine} track={track} step {step}"
        assert y.dtype == dtype and y.device.type == device().type
        assert_close(y, my_rows(yr, sizes), f"output, {what}", tol)
        if track:
            assert_close(sync.running_mean, ref.running_mean, f"running_mean, {what}", tol)
            assert_close(sync.running_var, ref.running_var, f"running_var, {what}", tol)
            assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked), what
        if not train and track:
            continue  # eval with running statistics: nothing to differentiate here
        (y.double() * my_rows(w_out, sizes).to(device())).sum().backward()
        (yr * w_out).sum().backward()
        assert_close(mine.grad, my_rows(xr.grad, sizes), f"input grad, {what}", tol)
        if affine:
            for name in ("weight", "bias"):
                local = getattr(sync, name).grad
                # Each rank holds its batch's share; the sum over ranks is the full gradient.
                total = hvd.allreduce(local.detach(), op=hvd.Sum, name=f"sbn.{name}")
                assert_close(total, getattr(ref, name).grad, f"{name} grad, {what}", tol)
                getattr(sync, name).grad = None
                getattr(ref, name).grad = None
    if track:
        bits = hvd.allgather(sync.running_var.detach().reshape(1, -1), name="sbn.bits")
        assert all(torch.equal(bits[r], bits[0]) for r in range(hvd.size()))


# ---- checks ---------------------------------------------------------------------------------


def check_every_input_rank_float64():
    for dims in (2, 3, 4, 5):
        compare_training(dims, torch.float64, 0.1, True, True, batch_sizes())


def check_momentum_none_cumulative_average():
    compare_training(4, torch.float64, None, True, True, batch_sizes(), steps=4)


def check_no_affine_and_untracked():
    compare_training(3, torch.float64, 0.3, False, True, batch_sizes())
    # Untracked: batch statistics, synchronized, in eval mode too.
    compare_training(4, torch.float64, 0.1, True, False, batch_sizes())


def check_a_rank_with_an_empty_batch():
    compare_training(4, torch.float64, 0.1, True, True, batch_sizes(empty_rank=0))
    compare_training(2, torch.float64, None, True, True, batch_sizes(empty_rank=hvd.size() - 1))


def check_float32():
    compare_training(4, torch.float32, 0.1, True, True, batch_sizes(), tol=2e-5)


def check_errors():
    sync = hvd.SyncBatchNorm(C).to(device())
    expect_error(ValueError, lambda: sync(torch.ones(C, device=device())), "2 dimensions", "1-D")
    expect_error(ValueError, lambda: sync(torch.ones(2, C + 1, device=device())), "channels")
    # One value per channel over all ranks: an error on every rank (as BatchNorm's on one).
    only_one = torch.ones(1 if hvd.rank() == 0 else 0, C, device=device())
    expect_error(ValueError, lambda: sync(only_one), "more than 1 value per channel", "got 1")


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
