"""Fused LARS (torch.ops.gradfuse.lars_update_) against a float64 reference."""

import math

import pytest
import torch
from conftest import AWKWARD_SIZES
from gradfuse import ops
from gradfuse.bench.shapes import resnet50_shapes
from references import HYPER, lars_reference, randn, rel_err


def make_case(gen, shapes, dtype=torch.float32, grad_dtype=None):
    params = [randn(gen, *s, dtype=dtype) for s in shapes]
    grads = [randn(gen, *s, dtype=grad_dtype or dtype, scale=0.01) for s in shapes]
    bufs = [randn(gen, *s, dtype=dtype, scale=0.001) for s in shapes]
    return params, grads, bufs


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_in_momentum", [False, True])
def test_matches_float64_reference_on_awkward_sizes(simd, gen, nesterov, lr_in_momentum):
    shapes = [(n,) for n in AWKWARD_SIZES] + [(3, 5, 7)]
    params, grads, bufs = make_case(gen, shapes)
    use_lars = [i % 3 != 1 for i in range(len(shapes))]
    use_wd = [i % 4 != 2 for i in range(len(shapes))]
    refs = [
        lars_reference(
            p,
            g,
            v,
            **HYPER,
            nesterov=nesterov,
            lr_in_momentum=lr_in_momentum,
            use_lars=ul,
            use_wd=uw,
        )
        for p, g, v, ul, uw in zip(params, grads, bufs, use_lars, use_wd)
    ]
    ops.lars_update_(
        params,
        grads,
        bufs,
        **HYPER,
        nesterov=nesterov,
        lr_in_momentum=lr_in_momentum,
        use_lars=use_lars,
        use_weight_decay=use_wd,
    )
    for p, v, (p_ref, v_ref) in zip(params, bufs, refs):
        assert rel_err(p, p_ref) < 1e-6
        assert rel_err(v, v_ref) < 1e-5


def test_resnet50_shapes_in_one_call(gen):
    shapes = resnet50_shapes()
    assert len(shapes) == 161
    params, grads, bufs = make_case(gen, shapes)
    use_lars = [len(s) > 1 for s in shapes]  # the seeds' rule: no LARS on bias / BN
    refs = [
        lars_reference(
            p, g, v, **HYPER, nesterov=False, lr_in_momentum=False, use_lars=ul, use_wd=ul
        )
        for p, g, v, ul in zip(params, grads, bufs, use_lars)
    ]
    ops.lars_update_(params, grads, bufs, **HYPER, use_lars=use_lars, use_weight_decay=use_lars)
    worst = max(rel_err(p, r[0]) for p, r in zip(params, refs))
    assert worst < 1e-6


def test_zero_norms_give_trust_ratio_one(gen):
    # Zero weights (fresh bias) and zero gradients (unused parameter): plain momentum SGD.
    p_zero, g = torch.zeros(37), randn(gen, 37)
    p, g_zero = randn(gen, 37), torch.zeros(37)
    bufs = [torch.zeros(37), torch.zeros(37)]
    p_zero_before, p_before = p_zero.clone(), p.clone()
    ops.lars_update_(
        [p_zero, p],
        [g, g_zero],
        bufs,
        lr=0.5,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=0.001,
    )
    torch.testing.assert_close(p_zero, p_zero_before - 0.5 * g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p, p_before)  # zero gradient and no weight decay: unchanged


def test_fp32_master_with_half_grads_and_model_copy(simd, gen):
    for low in (torch.float16, torch.bfloat16):
        shapes = [(1,), (9,), (1000,), (17, 3)]
        params, grads, bufs = make_case(gen, shapes, grad_dtype=low)
        copies = [torch.full(s, float("nan"), dtype=low) for s in shapes]  # poisoned
        refs = [
            lars_reference(
                p, g, v, **HYPER, nesterov=False, lr_in_momentum=False, use_lars=True, use_wd=True
            )
            for p, g, v in zip(params, grads, bufs)
        ]
        ops.lars_update_(params, grads, bufs, **HYPER, model_copies=copies)
        for p, c, (p_ref, _) in zip(params, copies, refs):
            assert rel_err(p, p_ref) < 1e-6
            assert torch.equal(c, p.to(low))  # rounded once from the fp32 result


def test_low_precision_params(simd, gen):
    params, grads, bufs = make_case(gen, [(100,), (7, 7)], dtype=torch.bfloat16)
    refs = [
        lars_reference(
            p, g, v, **HYPER, nesterov=True, lr_in_momentum=False, use_lars=True, use_wd=True
        )
        for p, g, v in zip(params, grads, bufs)
    ]
    ops.lars_update_(params, grads, bufs, **HYPER, nesterov=True)
    for p, (p_ref, _) in zip(params, refs):
        assert rel_err(p, p_ref) < 1e-2  # bf16 storage


def test_grad_scale_and_found_inf(gen):
    params, grads, bufs = make_case(gen, [(50,), (3, 3)])
    scale = 1024.0
    scaled = [g * scale for g in grads]
    refs = [
        lars_reference(
            p, g, v, **HYPER, nesterov=False, lr_in_momentum=True, use_lars=True, use_wd=True
        )
        for p, g, v in zip(params, grads, bufs)
    ]
    before = [p.clone() for p in params]
    # found_inf set: nothing moves.
    ops.lars_update_(
        params,
        scaled,
        bufs,
        **HYPER,
        lr_in_momentum=True,
        grad_scale=torch.tensor([scale]),
        found_inf=torch.ones(1),
    )
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    ops.lars_update_(
        params,
        scaled,
        bufs,
        **HYPER,
        lr_in_momentum=True,
        grad_scale=torch.tensor([scale]),
        found_inf=torch.zeros(1),
    )
    for p, (p_ref, _) in zip(params, refs):
        assert rel_err(p, p_ref) < 1e-6


def test_nan_gradient_propagates(gen):
    params, grads, bufs = make_case(gen, [(20,)])
    grads[0][3] = float("nan")
    ops.lars_update_(params, grads, bufs, **HYPER)
    assert params[0].isnan().all()  # the NaN norm poisons the trust ratio: loud, not hidden


def test_huge_tensor(gen):
    n = 25_000_003
    params, grads, bufs = make_case(gen, [(n,)])
    ref, _ = lars_reference(
        params[0],
        grads[0],
        bufs[0],
        **HYPER,
        nesterov=False,
        lr_in_momentum=False,
        use_lars=True,
        use_wd=True,
    )
    ops.lars_update_(params, grads, bufs, **HYPER)
    assert rel_err(params[0], ref) < 1e-6


def test_opcheck(gen):
    params, grads, bufs = make_case(gen, [(3,), (4, 2)])
    args = (
        params,
        grads,
        bufs,
        [],
        [True, False],
        [True, True],
        0.1,
        0.9,
        0.01,
        0.001,
        1e-8,
        False,
        False,
        None,
        None,
    )
    torch.library.opcheck(torch.ops.gradfuse.lars_update_, args)


def _call(params, grads, bufs, **kw):
    ops.lars_update_(params, grads, bufs, **{**HYPER, **kw})


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda a: a["grads"].pop(), ValueError, "grads must have one entry per params"),
        (lambda a: a.update(use_lars=[True]), ValueError, "use_lars must have one entry"),
        (
            lambda a: a["grads"].__setitem__(1, torch.zeros(5)),
            ValueError,
            r"grads\[1\] must have as many elements as params\[1\] \(6\), got 5",
        ),
        (
            lambda a: a["params"].__setitem__(0, torch.zeros(3, dtype=torch.float64)),
            TypeError,
            r"params\[0\] must be float32, float16 or bfloat16, got Double",
        ),
        (
            lambda a: a["grads"].__setitem__(1, torch.zeros(6, dtype=torch.int32)),
            TypeError,
            r"grads\[1\] must be float32, float16 or bfloat16, got Int",
        ),
        (
            lambda a: a["grads"].__setitem__(1, torch.zeros(6, 2)[:, 0]),
            ValueError,
            r"grads\[1\] must be contiguous",
        ),
        (lambda a: a.update(lr=math.nan), ValueError, "lr must be a finite non-negative number"),
        (
            lambda a: a.update(model_copies=[torch.zeros(3, dtype=torch.half)]),
            ValueError,
            "model_copies must be empty or have one entry per params",
        ),
        (
            lambda a: a.update(found_inf=torch.zeros(2)),
            ValueError,
            "found_inf must have exactly one element",
        ),
        (
            lambda a: a.update(grad_scale=torch.ones(1, dtype=torch.float64)),
            TypeError,
            "grad_scale must be Float",
        ),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(mutate, error, message):
    args = {name: [torch.zeros(3), torch.zeros(6)] for name in ("params", "grads", "bufs")}
    mutate(args)
    params, grads, bufs = args.pop("params"), args.pop("grads"), args.pop("bufs")
    with pytest.raises(error, match=message):
        _call(params, grads, bufs, **args)
