"""The one-pass LARS path: sum_squares, unpack_'s sq_norms, lars_update_from_norms_, and the
LARS optimizer's norm cache, against float64 references and against the two-pass op."""

import pytest
import torch
from conftest import AWKWARD_SIZES
from gradfuse import ops
from gradfuse.optim import LARS
from references import HYPER, lars_reference, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sq_ref(t):
    return t.double().pow(2).sum().item()


def assert_sq_close(got, tensors):
    # fp32 lanes within 4096-element blocks (the kernels' design): a few 1e-6 relative.
    for value, t in zip(got.tolist(), tensors):
        ref = sq_ref(t)
        assert abs(value - ref) <= 5e-5 * ref + 1e-300, (value, ref, t.numel())


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_sum_squares_matches_float64_and_ignores_thread_count(simd, gen, dtype):
    tensors = [randn(gen, n, dtype=dtype) for n in AWKWARD_SIZES] + [randn(gen, 3, 5, 7)[..., 0]]
    tensors[-1] = tensors[-1].contiguous()
    got = ops.sum_squares(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    assert_sq_close(got, tensors)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.sum_squares(tensors), got)
    finally:
        torch.set_num_threads(threads)
    assert ops.sum_squares([]).shape == (0,)


def test_sum_squares_propagates_nan_and_inf(gen):
    a, b = randn(gen, 4099), randn(gen, 33)
    a[4000], b[5] = float("nan"), float("inf")
    got = ops.sum_squares([a, b, randn(gen, 9)])
    assert got[0].isnan() and got[1].isinf() and got[2].isfinite()


@pytest.mark.parametrize("flat_dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_sq_norms_are_the_written_values_norms(simd, gen, flat_dtype, out_dtype, accumulate):
    sizes = AWKWARD_SIZES + [5] * 40  # many small ones too
    outs = [randn(gen, n, dtype=out_dtype) for n in sizes]
    flat = randn(gen, sum(sizes) + 3, dtype=flat_dtype)
    sq = torch.full((len(outs),), float("nan"), dtype=torch.float64)  # poisoned
    ops.unpack_(flat, outs, scale=0.25, accumulate=accumulate, sq_norms=sq)
    # Bitwise what a separate pass over the written tensors gives, and close to float64.
    assert torch.equal(sq, ops.sum_squares(outs))
    assert_sq_close(sq, outs)


def test_unpack_sq_norms_bad_input(gen):
    flat, outs = randn(gen, 10), [torch.empty(4), torch.empty(6)]
    with pytest.raises(TypeError, match="sq_norms must be Double .one float64"):
        ops.unpack_(flat, outs, sq_norms=torch.empty(2))
    with pytest.raises(ValueError, match="one element per tensor \\(2\\), got sizes \\[3\\]"):
        ops.unpack_(flat, outs, sq_norms=torch.empty(3, dtype=torch.float64))
    alias = torch.empty(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="overlap"):
        ops.unpack_(
            torch.empty(6, dtype=torch.float64), [alias, torch.empty(2)], sq_norms=alias[2:4]
        )


def make_case(gen, sizes, dtype=torch.float32, grad_dtype=None):
    params = [randn(gen, n, dtype=dtype) for n in sizes]
    grads = [randn(gen, n, dtype=grad_dtype or dtype, scale=0.01) for n in sizes]
    bufs = [randn(gen, n, dtype=dtype, scale=0.001) for n in sizes]
    return params, grads, bufs


def clone_all(*lists):
    return [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_in_momentum", [False, True])
@pytest.mark.parametrize(
    ("dtype", "grad_dtype"),
    [(torch.float32, None), (torch.float32, torch.float16), (torch.bfloat16, None)],
)
def test_one_pass_equals_two_pass_bitwise(simd, gen, nesterov, lr_in_momentum, dtype, grad_dtype):
    sizes = AWKWARD_SIZES + [3] * 20
    params, grads, bufs = make_case(gen, sizes, dtype, grad_dtype)
    p2, g2, b2 = clone_all(params, grads, bufs)
    use_lars = [i % 3 != 1 for i in range(len(sizes))]
    use_wd = [i % 4 != 2 for i in range(len(sizes))]
    kw = dict(
        **HYPER,
        nesterov=nesterov,
        lr_in_momentum=lr_in_momentum,
        use_lars=use_lars,
        use_weight_decay=use_wd,
    )
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
    ops.lars_update_(p2, g2, b2, **kw)
    w_sq = ops.sum_squares(params)
    ops.lars_update_from_norms_(params, grads, bufs, ops.sum_squares(grads), w_sq, **kw)
    for a, b in zip(params + bufs, p2 + b2):
        assert torch.equal(a, b)
    # The norms written in passing are the new params', bit for bit.
    assert torch.equal(w_sq, ops.sum_squares(params))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for p, (p_ref, _) in zip(params, refs):
        err = (p.double() - p_ref).norm() / max(p_ref.norm().item(), 1e-300)
        assert err < tol


def test_one_pass_grad_scale_found_inf_and_model_copies(gen):
    sizes = [1, 9, 4097]
    params, grads, bufs = make_case(gen, sizes, grad_dtype=torch.float16)
    copies = [torch.full((n,), float("nan"), dtype=torch.float16) for n in sizes]
    p2, g2, b2, c2 = clone_all(params, grads, bufs, copies)
    scale = torch.tensor([512.0])
    found = torch.zeros(1)
    kw = dict(**HYPER, grad_scale=scale, found_inf=found)
    ops.lars_update_(p2, g2, b2, model_copies=c2, **kw)
    w_sq = ops.sum_squares(params)
    ops.lars_update_from_norms_(
        params, grads, bufs, ops.sum_squares(grads), w_sq, model_copies=copies, **kw
    )
    for a, b in zip(params + bufs + copies, p2 + b2 + c2):
        assert torch.equal(a, b)
    before = clone_all(params, bufs)[0] + [w_sq.clone()]
    found.fill_(1.0)
    ops.lars_update_from_norms_(params, grads, bufs, ops.sum_squares(grads), w_sq, **kw)
    for a, b in zip(params + [w_sq], before):
        assert torch.equal(a, b)


def test_one_pass_nan_norm_poisons_the_step(gen):
    params, grads, bufs = make_case(gen, [33])
    g_sq = torch.tensor([float("nan")], dtype=torch.float64)
    w_sq = ops.sum_squares(params)
    ops.lars_update_from_norms_(params, grads, bufs, g_sq, w_sq, **HYPER)
    assert params[0].isnan().all() and w_sq.isnan().all()


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda a: a.update(g_sq=torch.zeros(2)),
            TypeError,
            "grad_sq_norms must be Double .one float64",
        ),
        (
            lambda a: a.update(w_sq=torch.zeros(3, dtype=torch.float64)),
            ValueError,
            "param_sq_norms must be 1-D with one element per param \\(2\\)",
        ),
        (lambda a: a.update(w_sq=a["g_sq"]), ValueError, "must not share memory"),
        (
            lambda a: a.update(g_sq=torch.zeros(1, 2, dtype=torch.float64)),
            ValueError,
            "grad_sq_norms must be 1-D",
        ),
    ],
)
def test_one_pass_bad_input(gen, mutate, error, message):
    params, grads, bufs = make_case(gen, [4, 5])
    a = {"g_sq": torch.zeros(2, dtype=torch.float64), "w_sq": torch.zeros(2, dtype=torch.float64)}
    mutate(a)
    with pytest.raises(error, match=message):
        ops.lars_update_from_norms_(params, grads, bufs, a["g_sq"], a["w_sq"], **HYPER)


def test_opcheck(gen):
    params, grads, bufs = make_case(gen, [5, 9])
    torch.library.opcheck(
        torch.ops.gradfuse.lars_update_from_norms_,
        (
            params,
            grads,
            bufs,
            [],
            [True, False],
            [True, True],
            ops.sum_squares(grads),
            ops.sum_squares(params),
            0.1,
            0.9,
            1e-3,
            0.02,
            1e-8,
            False,
            False,
        ),
    )
    torch.library.opcheck(torch.ops.gradfuse.sum_squares, (params,))
    outs = [torch.empty(5), torch.empty(9)]
    torch.library.opcheck(
        torch.ops.gradfuse.unpack_,
        (randn(gen, 14), outs, 1.0, False, None, torch.empty(2, dtype=torch.float64)),
    )


def make_model(gen):
    model = torch.nn.Sequential(
        torch.nn.Linear(7, 33), torch.nn.BatchNorm1d(33), torch.nn.Linear(33, 3)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(randn(gen, *p.shape))
    return model


def run_steps(gen_seed, steps, tamper=None):
    """LARS steps on a small model; returns its parameters. The second model steps every
    parameter with the two-pass op (norms from scratch each time)."""
    gen = torch.Generator().manual_seed(gen_seed)
    model = make_model(gen)
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-3, trust_coefficient=0.02)
    for step in range(steps):
        x = randn(gen, 16, 7)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        if tamper is not None:
            tamper(step, model)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def reference_steps(gen_seed, steps, tamper=None):
    gen = torch.Generator().manual_seed(gen_seed)
    model = make_model(gen)
    params = list(model.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    use = [p.ndim > 1 for p in params]
    for step in range(steps):
        x = randn(gen, 16, 7)
        for p in params:
            p.grad = None
        model(x).pow(2).sum().backward()
        if tamper is not None:
            tamper(step, model)
        with torch.no_grad():
            ops.lars_update_(
                params,
                [p.grad for p in params],
                bufs,
                lr=0.1,
                momentum=0.9,
                weight_decay=1e-3,
                trust_coefficient=0.02,
                use_lars=use,
                use_weight_decay=use,
            )
    return [p.detach().clone() for p in params]


def test_optimizer_keeps_norms_between_steps_and_matches_the_two_pass_op():
    seed = torch.randint(0, 2**31 - 1, ()).item()
    got, opt = run_steps(seed, 5)
    assert opt._norms._param_sq  # the one-pass path ran and kept the new params' norms
    for a, b in zip(got, reference_steps(seed, 5)):
        assert torch.equal(a, b)


def test_optimizer_sees_params_and_grads_changed_in_place():
    def tamper(step, model):
        with torch.no_grad():
            if step == 2:
                model[0].weight.mul_(3.0)  # a stale ||w||^2 would give the wrong trust ratio
            if step == 3:
                model[2].weight.grad.mul_(0.5)

    seed = torch.randint(0, 2**31 - 1, ()).item()
    got, _ = run_steps(seed, 5, tamper)
    for a, b in zip(got, reference_steps(seed, 5, tamper)):
        assert torch.equal(a, b)
