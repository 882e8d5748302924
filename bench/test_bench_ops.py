"""pytest-benchmark suite of the fused ops against the torch code doing the same work.

    python -m pytest bench/test_bench_ops.py --benchmark-group-by=group

Each group holds gradfuse and its torch reference on the same ResNet-50 gradients (161
tensors, 25.6M values), so pytest-benchmark's table compares them directly. Not part of the
test suite (no timing thresholds): `scripts/test.sh` runs tests/ only.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradfuse import ops
from gradfuse.bench.ops import _python_lars, torch_topk_with_feedback
from gradfuse.bench.shapes import resnet50_shapes

SHAPES = resnet50_shapes()
NUMEL = sum(math.prod(s) for s in SHAPES)
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5, "trust_coefficient": 0.001}


@pytest.fixture(scope="module")
def grads():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=gen) * 1e-3 for s in SHAPES]


@pytest.fixture(scope="module")
def params():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=gen) for s in SHAPES]


@pytest.mark.benchmark(group="lars step")
def test_lars_gradfuse(benchmark, params, grads):
    bufs = [torch.zeros_like(p) for p in params]
    use = [len(s) > 1 for s in SHAPES]
    benchmark(
        lambda: ops.lars_update_(params, grads, bufs, **HYPER, use_lars=use, use_weight_decay=use)
    )


@pytest.mark.benchmark(group="lars step")
def test_lars_python_reference(benchmark, params, grads):
    bufs = [torch.zeros_like(p) for p in params]
    benchmark(lambda: _python_lars(params, grads, bufs, 0.1, 0.9, 5e-5, 1e-3, 1e-8))


@pytest.mark.benchmark(group="lars step")
def test_sgd_momentum_foreach_reference(benchmark, params, grads):
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(leaves, grads):
        p.grad = g
    benchmark(torch.optim.SGD(leaves, lr=0.1, momentum=0.9, foreach=True).step)


@pytest.mark.benchmark(group="pack fp32->fp16")
def test_pack_gradfuse(benchmark, grads):
    flat = torch.empty(NUMEL, dtype=torch.float16)
    benchmark(lambda: ops.pack_(grads, flat))


@pytest.mark.benchmark(group="pack fp32->fp16")
def test_pack_cat_half_reference(benchmark, grads):
    benchmark(lambda: torch.cat([g.flatten() for g in grads]).half())


@pytest.mark.benchmark(group="top-k 0.001 with error feedback")
@pytest.mark.parametrize("sampled", [False, True], ids=["exact", "sampled"])
def test_topk_gradfuse(benchmark, grads, sampled):
    grad = torch.cat([g.flatten() for g in grads])
    residual = torch.zeros_like(grad)
    benchmark(lambda: ops.topk_compress(grad, residual, 0.001, sampled=sampled))


@pytest.mark.benchmark(group="top-k 0.001 with error feedback")
def test_topk_torch_reference(benchmark, grads):
    grad = torch.cat([g.flatten() for g in grads])
    residual = torch.zeros_like(grad)
    k = math.ceil(0.001 * NUMEL)

    benchmark(lambda: torch_topk_with_feedback(grad, residual, k))
