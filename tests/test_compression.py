"""The Compressor interface (Horovod's), Compression.topk's per-optimizer state and its
momentum correction, and DistributedOptimizer's checks of the compression argument. The
multi-rank behaviour is in training_worker.py (user compressors, top-k training)."""

import gradfuse as hvd
import pytest
import torch
from gradfuse.compression import Compressor

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "name, wire, unit", [("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)]
)
def test_cast_round_trip(gen, dtype, name, wire, unit):
    compressor = getattr(hvd.Compression, name)
    tensor = torch.randn(3, 50, generator=gen).to(dtype)
    compressed, ctx = compressor.compress(tensor)
    assert compressed.dtype == wire and compressed.shape == tensor.shape
    assert ctx == dtype  # the context is the original dtype, as Horovod's
    back = compressor.decompress(compressed, ctx)
    assert back.dtype == dtype and back.shape == tensor.shape
    # One rounding to the wire dtype (and none back when the original is wider).
    torch.testing.assert_close(back.double(), tensor.double(), rtol=unit, atol=0)
    assert torch.equal(back.to(wire), compressed)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_cast_passes_integers_through(name, dtype):
    compressor = getattr(hvd.Compression, name)
    tensor = torch.arange(12).reshape(3, 4).to(dtype)
    compressed, ctx = compressor.compress(tensor)
    assert compressed is tensor and ctx == dtype
    assert compressor.decompress(compressed, ctx) is tensor


def test_none_and_the_base_class():
    tensor = torch.randn(4)
    compressed, ctx = hvd.Compression.none.compress(tensor)
    assert compressed is tensor and ctx is None
    assert hvd.Compression.none.decompress(tensor, ctx) is tensor
    assert isinstance(hvd.Compression.none, Compressor)
    assert isinstance(hvd.Compression.fp16, Compressor)
    with pytest.raises(NotImplementedError, match=r"must define compress\(tensor\)"):
        Compressor.compress(tensor)
    with pytest.raises(NotImplementedError, match=r"must define decompress\(tensor, ctx\)"):
        Compressor().decompress(tensor, None)


def test_topk_is_used_through_its_state():
    with pytest.raises(TypeError, match=r"per-parameter state.*\.bind\(optimizer\)"):
        hvd.Compression.topk(0.1).compress(torch.randn(10))


SGD_SETTINGS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2, "maximize": True},
]


@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_momentum_correction_sent_dense_is_torch_sgd(gen, settings):
    # One process, tensors sent dense (min_numel above their size): the velocity the state
    # sends, stepped by the SGD with its momentum taken over, is torch's momentum SGD.
    reference = torch.randn(40, generator=gen, requires_grad=True)
    param = reference.detach().clone().requires_grad_()
    ref_opt = torch.optim.SGD([reference], lr=0.1, **settings)
    opt = torch.optim.SGD([param], lr=0.1, **settings)
    state = hvd.Compression.topk(0.01, min_numel=1000).bind(opt)
    groups_before = [dict(g) for g in opt.param_groups]
    for _ in range(5):
        grad = torch.randn(40, generator=gen)
        reference.grad = grad.clone()
        ref_opt.step()
        payload, ctx = state.compress(grad.clone(), param)
        param.grad = state.decompress(payload, ctx).clone()
        with state.optimizer_step():
            opt.step()
        torch.testing.assert_close(param, reference, rtol=1e-6, atol=1e-6)
    assert state.step == 5
    assert [dict(g) for g in opt.param_groups] == groups_before  # restored after each step
    assert "momentum_buffer" not in opt.state[param]  # the SGD applied no momentum itself


def test_momentum_factor_masking_and_error_feedback(gen):
    param = torch.zeros(2000, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    state = hvd.Compression.topk(0.01, sampled=False).bind(opt)
    grad = torch.randn(2000, generator=gen)
    (values, indices), ctx = state.compress(grad, param)
    memory = state.memory[param]
    assert indices.numel() == 20
    torch.testing.assert_close(values, grad[indices])  # the first velocity is the gradient
    assert (memory["momentum"][indices] == 0).all()  # masked where sent
    kept = torch.ones(2000, dtype=torch.bool)
    kept[indices] = False
    assert torch.equal(memory["momentum"][kept], grad[kept])
    assert torch.equal(memory["residual"][kept], grad[kept]) and not memory["residual"][~kept].any()
    dense = state.decompress((values, indices), ctx)
    assert dense.shape == grad.shape and torch.equal(dense[indices], values)
    # Second step: u = 0.9 u + g, accumulated onto the residual.
    grad2 = torch.randn(2000, generator=gen)
    state.compress(grad2, param)
    expected_u = torch.where(kept, 0.9 * grad + grad2, grad2)
    sent = state.memory[param]["residual"] == 0
    torch.testing.assert_close(memory["momentum"][~sent], expected_u[~sent])


def test_explicit_momentum_and_other_optimizers(gen):
    param = torch.zeros(10, requires_grad=True)
    with pytest.raises(ValueError, match=r"param_groups \[1\]\): it would be applied twice"):
        hvd.Compression.topk(0.1, momentum=0.9).bind(
            torch.optim.SGD([{"params": []}, {"params": [param], "momentum": 0.5}], lr=0.1)
        )
    # A momentum-free SGD with explicit momentum: the state applies it, the SGD steps plainly.
    state = hvd.Compression.topk(0.1, momentum=0.9, min_numel=100).bind(
        torch.optim.SGD([param], lr=0.1)
    )
    grad = torch.ones(10)
    state.compress(grad, param)
    payload, _ = state.compress(grad, param)
    torch.testing.assert_close(payload, torch.full((10,), 1.9))
    # Adam keeps its own rule: the gradient itself is what is sent.
    state = hvd.Compression.topk(0.1, min_numel=100).bind(torch.optim.Adam([param]))
    payload, _ = state.compress(grad, param)
    assert payload is grad and state.memory == {}
    # momentum=0 turns the correction off for an SGD with momentum.
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    state = hvd.Compression.topk(0.1, momentum=0, min_numel=100).bind(opt)
    assert state.compress(grad, param)[0] is grad
    with state.optimizer_step():
        assert opt.param_groups[0]["momentum"] == 0.9  # not taken over: left as it is


def test_one_topk_object_gives_each_optimizer_its_own_state(one_rank):
    topk = hvd.Compression.topk(0.1, min_numel=1)
    model = torch.nn.Linear(4, 3)
    first = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=topk)
    second = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compression=topk)
    assert first._gf_topk is not second._gf_topk
    assert first._gf_topk.settings is second._gf_topk.settings is topk


class NotACompressor:
    compress = None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"compression": hvd.Compression.topk},
            TypeError,
            r"must be called: Compression\.topk\(ratio\)",
        ),
        (
            {"compression": NotACompressor()},
            TypeError,
            r"compress\(tensor\) and decompress\(tensor, ctx\)",
        ),
        ({"compression": "fp16"}, TypeError, "got 'fp16'"),
        (
            {"compression": hvd.Compression.topk(0.1), "op": hvd.Min},
            ValueError,
            "Compression.topk needs op=gradfuse.Average or Sum",
        ),
        (
            {"compression": hvd.Compression.topk(0.1, momentum=0.5)},
            ValueError,
            "applied twice",
        ),
    ],
)
def test_distributed_optimizer_rejects_bad_compression(one_rank, kwargs, error, message):
    model = torch.nn.Linear(4, 3)
    with pytest.raises(error, match=message):
        hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kwargs
        )


def test_topk_state_does_not_load_into_other_compression(one_rank):
    model = torch.nn.Linear(4, 3)
    topk = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), compression=hvd.Compression.topk(0.1)
    )
    plain = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    assert "gradfuse" not in plain.state_dict()
    with pytest.raises(ValueError, match="holds Compression.topk state.*Compression.none"):
        plain.load_state_dict(topk.state_dict())
