"""One rank of tests/test_lars_sharded.py: gradfuse.optim.LARS on parameters sharded across the
ranks (DTensor Shard(0) and FSDP2's fully_shard) against the same LARS run in one process on
the full tensors. Uses torch.distributed alone: LARS needs no gradfuse.init(). CPU over Gloo
(the one-pass kernels LARS needs for sharded parameters exist on the CPU)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from gradfuse import optim
from multiproc import checks_of, torch_distributed_worker_main
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

# Rows 7 and 5 split unevenly; a 1-row tensor leaves every rank but 0 an empty shard.
SHAPES = [(7, 3), (5,), (1, 4), (6, 2, 2)]
HYPER = {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02}


def mesh():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def full_tensors(seed):
    """The same full tensors on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def run_lars(params, set_grads, steps=3, **options):
    """`steps` LARS steps on `params`; set_grads(step) gives each step's gradients, and before
    step 2 every parameter is tripled in place (the kept norms must notice)."""
    opt = optim.LARS(params, **HYPER, **options)
    for step in range(steps):
        for p, g in zip(params, set_grads(step)):
            p.grad = g
        if step == 2:
            with torch.no_grad():
                for p in params:
                    (p.to_local() if hasattr(p, "to_local") else p).mul_(3.0)
        opt.step()
    return params


def sharded_vs_full(**options):
    device_mesh = mesh()
    full = [torch.nn.Parameter(t) for t in full_tensors(0)]
    sharded = [
        torch.nn.Parameter(distribute_tensor(t.detach().clone(), device_mesh, [Shard(0)]))
        for t in full
    ]
    run_lars(full, lambda step: full_tensors(10 + step), **options)
    run_lars(
        sharded,
        lambda step: [
            distribute_tensor(g, device_mesh, [Shard(0)]) for g in full_tensors(10 + step)
        ],
        **options,
    )
    return [p.full_tensor() for p in sharded], [p.detach() for p in full]


def check_dtensor_shard0_matches_one_process():
    for options in ({}, {"nesterov": True, "lr_in_momentum": True}):
        got, want = sharded_vs_full(**options)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def check_local_norms_would_differ():
    """The comparison above can fail: with each shard's own norm (no sum over the ranks) the
    result differs from the one-process LARS."""
    real = optim._norm_groups
    optim._norm_groups = lambda p: (real(p), ())[1]  # still checks placements, reduces nothing
    try:
        got, want = sharded_vs_full()
    finally:
        optim._norm_groups = real
    assert not torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-6)


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3), torch.nn.Linear(3, 1)
    )


def batches(rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 6, generator=gen), torch.randn(4, 1, generator=gen)


def check_fully_shard_training_matches_one_process():
    size, rank = dist.get_world_size(), dist.get_rank()
    model = make_model(0)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = optim.LARS(model.parameters(), **HYPER)
    ref = make_model(0)
    ref_opt = optim.LARS(ref.parameters(), **HYPER)
    for step in range(3):
        x, y = batches(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()  # FSDP2 averages over the ranks
        opt.step()
        opt.zero_grad()
        # One process, every rank's batch: the mean of the ranks' mean losses.
        data = [batches(r, step) for r in range(size)]
        xs, ys = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
        torch.nn.functional.mse_loss(ref(xs), ys).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


def check_grad_placed_unlike_its_param_raises():
    device_mesh = mesh()
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), device_mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(4, 2), device_mesh, [Replicate()])
    try:
        optim.LARS([p], lr=0.1).step()
    except ValueError as e:
        assert "gradient must be a DTensor placed like it" in str(e), e
    else:
        raise AssertionError("a Replicate gradient of a Shard(0) parameter was accepted")


def check_sharded_params_without_the_one_pass_kernel_raise():
    """Where the device lacks lars_update_from_norms_ (CUDA in this build), a sharded parameter
    is refused by name on every rank rather than stepped with its shard's own norm."""
    p = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh(), [Shard(0)]))
    p.grad = distribute_tensor(torch.ones(4, 2), mesh(), [Shard(0)])
    real = optim._has_one_pass_kernels
    optim._has_one_pass_kernels = lambda device: False
    try:
        optim.LARS([p], lr=0.1).step()
    except NotImplementedError as e:
        assert "sharded as DTensors on cpu need the one-pass kernel" in str(e), e
    else:
        raise AssertionError("a sharded parameter was stepped without the one-pass kernel")
    finally:
        optim._has_one_pass_kernels = real
    torch.testing.assert_close(p.full_tensor(), torch.ones(4, 2))  # untouched


if __name__ == "__main__":
    torch_distributed_worker_main(checks_of(globals()), sys.argv[1:], "gloo")
