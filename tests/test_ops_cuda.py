"""The CUDA kernels of every gradfuse op against float64 references and the CPU kernels.

Skipped as a whole without a GPU (or with a CPU-only build of gradfuse). Inputs are fresh
random data each run (the seed is printed, so a failure can be replayed) in awkward sizes:
empty, single, odd, around the 4-wide vector width and the 64K-element chunk, many small
tensors (several kernel-argument tables), misaligned views (the scalar fallback) and one
tensor of about 25M elements. The norms (sum_squares, unpack_'s sq_norms, both LARS ops) must
be deterministic: bitwise equal run to run, whatever the alignment.
"""

import math
import subprocess
import sys

import gradfuse
import pytest
import references
import torch
from references import (
    HYPER,
    ULP,
    as_f32,
    assert_bits_equal,
    check_error_feedback,
    decompress_reference,
    expected_k,
    lars_reference,
    magnitude_keys,
    math_dtype,
    rel_err,
    sample_positions,
    topk_reference,
)

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and gradfuse.build_info()["cuda"]),
    reason="needs a GPU and a CUDA build of gradfuse",
)

ops = torch.ops.gradfuse
DEV = "cuda"
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW = [torch.float16, torch.bfloat16]
# Empty, single, odd, around the 4-wide vectors and the 65536-element chunks.
AWKWARD = [0, 1, 3, 4, 5, 7, 9, 33, 4097, 65535, 65536, 65537, 100003]
HUGE = 25_000_003


def randn(gen, *shape, dtype=torch.float32, scale=1.0, device=DEV):
    """references.randn, on the GPU by default."""
    return references.randn(gen, *shape, dtype=dtype, scale=scale, device=device)


def misaligned(t):
    """A contiguous copy of t that starts one element into its storage (not 16-byte aligned)."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = base[1:].view(t.shape)
    view.copy_(t)
    return view


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we compare whatever was raised
        return type(exc), str(exc).splitlines()[0]
    return None


def assert_same_error(cpu_call, cuda_call):
    """Both devices reject the input with the same exception type and message."""
    cpu, cuda = error_of(cpu_call), error_of(cuda_call)
    assert cpu is not None, "the CPU op accepted the input"
    assert cuda == cpu


# ---- LARS -----------------------------------------------------------------------------------


def lars(
    params,
    grads,
    bufs,
    copies=(),
    use_lars=None,
    use_wd=None,
    nesterov=False,
    lr_in_momentum=False,
    grad_scale=None,
    found_inf=None,
    **hyper,
):
    h = {**HYPER, **hyper}
    n = len(params)
    ops.lars_update_(
        list(params),
        list(grads),
        list(bufs),
        list(copies),
        [True] * n if use_lars is None else list(use_lars),
        [True] * n if use_wd is None else list(use_wd),
        h["lr"],
        h["momentum"],
        h["weight_decay"],
        h["trust_coefficient"],
        h["eps"],
        nesterov,
        lr_in_momentum,
        grad_scale,
        found_inf,
    )


def lars_case(gen, numels, dtype=torch.float32, grad_dtype=None):
    params = [randn(gen, n, dtype=dtype) for n in numels]
    grads = [randn(gen, n, dtype=grad_dtype or dtype, scale=0.01) for n in numels]
    bufs = [randn(gen, n, dtype=dtype, scale=0.001) for n in numels]
    return params, grads, bufs


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_in_momentum", [False, True])
def test_lars_awkward_sizes(gen, nesterov, lr_in_momentum):
    numels = AWKWARD + [108]  # the last: a multiple of 4 but not 16-byte aligned
    params, grads, bufs = lars_case(gen, numels)
    params[-1], grads[-1], bufs[-1] = (misaligned(t) for t in (params[-1], grads[-1], bufs[-1]))
    use_lars = [i % 3 != 1 for i in range(len(numels))]
    use_wd = [i % 4 != 2 for i in range(len(numels))]
    flags = {"nesterov": nesterov, "lr_in_momentum": lr_in_momentum}
    refs = [
        lars_reference(p, g, v, use_lars=ul, use_wd=uw, **flags)
        for p, g, v, ul, uw in zip(params, grads, bufs, use_lars, use_wd)
    ]
    lars(params, grads, bufs, use_lars=use_lars, use_wd=use_wd, **flags)
    for p, v, (p_ref, v_ref) in zip(params, bufs, refs):
        assert rel_err(p, p_ref) < 1e-6
        assert rel_err(v, v_ref) < 1e-5


def test_lars_many_small_tensors_and_cpu_agreement(gen):
    # 700 tensors: several launches of the 4 KiB tables (42 tensors per update launch) or two of
    # the 32 KiB ones, with tensors cut between launches.
    numels = torch.randint(1, 3000, (700,), generator=gen).tolist()
    numels[350] = 200_000
    params, grads, bufs = lars_case(gen, numels)
    cpu = [[t.to("cpu", copy=True) for t in ts] for ts in (params, grads, bufs)]
    use_lars = [i % 5 != 0 for i in range(len(numels))]
    refs = [
        lars_reference(p, g, v, use_lars=ul, use_wd=ul)
        for p, g, v, ul in zip(params, grads, bufs, use_lars)
    ]
    lars(params, grads, bufs, use_lars=use_lars, use_wd=use_lars)
    lars(*cpu, use_lars=use_lars, use_wd=use_lars)
    assert max(rel_err(p, r[0]) for p, r in zip(params, refs)) < 1e-6
    # The CPU sums the norms in another order: the two devices agree to a few ulps.
    for p, p_cpu in zip(params, cpu[0]):
        torch.testing.assert_close(p.cpu(), p_cpu, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("param_dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("grad_dtype", [torch.float32] + LOW)
@pytest.mark.parametrize("copy_dtype", [None, torch.float32] + LOW)
def test_lars_dtypes_and_model_copies(gen, param_dtype, grad_dtype, copy_dtype):
    numels = [1, 9, 1000, 65537]
    params, grads, bufs = lars_case(gen, numels, dtype=param_dtype, grad_dtype=grad_dtype)
    copies = (
        []
        if copy_dtype is None
        else [torch.full((n,), float("nan"), dtype=copy_dtype, device=DEV) for n in numels]
    )  # poisoned: every element must be written
    refs = [lars_reference(p, g, v, nesterov=True) for p, g, v in zip(params, grads, bufs)]
    lars(params, grads, bufs, copies, nesterov=True)
    tol = 1e-6 if param_dtype == torch.float32 else 1e-2
    for p, (p_ref, _) in zip(params, refs):
        assert rel_err(p, p_ref) < tol
    for p, c in zip(params, copies):
        assert torch.equal(c, p.to(copy_dtype))  # rounded once from the stored parameter


def test_lars_grad_scale_and_found_inf_skip(gen):
    numels = [50, 9, 70000]
    params, grads, bufs = lars_case(gen, numels)
    copies = [torch.full((n,), 3.0, dtype=torch.float16, device=DEV) for n in numels]
    scale = 1024.0
    scaled = [g * scale for g in grads]
    before = [t.clone() for t in params + bufs + copies]
    # found_inf set: nothing moves, and nothing waits for the host.
    lars(
        params,
        scaled,
        bufs,
        copies,
        lr_in_momentum=True,
        grad_scale=torch.tensor([scale], device=DEV),
        found_inf=torch.ones(1, device=DEV),
    )
    assert all(torch.equal(a, b) for a, b in zip(params + bufs + copies, before))
    refs = [lars_reference(p, g, v, lr_in_momentum=True) for p, g, v in zip(params, grads, bufs)]
    lars(
        params,
        scaled,
        bufs,
        copies,
        lr_in_momentum=True,
        grad_scale=torch.tensor([scale], device=DEV),
        found_inf=torch.zeros(1, device=DEV),
    )
    for p, c, (p_ref, _) in zip(params, copies, refs):
        assert rel_err(p, p_ref) < 1e-6
        assert torch.equal(c, p.half())


def test_lars_zero_norms_give_trust_ratio_one(gen):
    p_zero, g = torch.zeros(37, device=DEV), randn(gen, 37)
    p, g_zero = randn(gen, 37), torch.zeros(37, device=DEV)
    bufs = [torch.zeros(37, device=DEV), torch.zeros(37, device=DEV)]
    p_zero_before, p_before = p_zero.clone(), p.clone()
    lars([p_zero, p], [g, g_zero], bufs, lr=0.5, weight_decay=0.0, trust_coefficient=0.001)
    torch.testing.assert_close(p_zero, p_zero_before - 0.5 * g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p, p_before)


def test_lars_nan_gradient_poisons_its_tensor_only(gen):
    params, grads, bufs = lars_case(gen, [20, 30])
    grads[0][3] = float("nan")
    lars(params, grads, bufs)
    assert params[0].isnan().all()  # the NaN norm poisons the trust ratio: loud, not hidden
    assert params[1].isfinite().all()


def test_lars_huge_tensor(gen):
    params, grads, bufs = lars_case(gen, [HUGE])
    p_ref, v_ref = lars_reference(params[0], grads[0], bufs[0])
    lars(params, grads, bufs)
    assert rel_err(params[0], p_ref) < 1e-6
    assert rel_err(bufs[0], v_ref) < 1e-5


def test_lars_on_a_side_stream(gen):
    params, grads, bufs = lars_case(gen, [1000, 3])
    refs = [lars_reference(p, g, v) for p, g, v in zip(params, grads, bufs)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lars(params, grads, bufs)
    stream.synchronize()
    for p, (p_ref, _) in zip(params, refs):
        assert rel_err(p, p_ref) < 1e-6


def lars_bad_inputs(device):
    z = lambda *s, **kw: torch.zeros(*s, device=device, **kw)
    return [
        ([z(3)], [z(3), z(3)], [z(3)], {}),  # length mismatch
        ([z(3)], [z(4)], [z(3)], {}),  # numel mismatch
        ([z(3, dtype=torch.float64)], [z(3)], [z(3)], {}),  # fp64 params
        ([z(3)], [z(3, dtype=torch.int32)], [z(3)], {}),  # int grads
        ([z(4, 2).t()], [z(2, 4)], [z(2, 4)], {}),  # non-contiguous
        ([z(3)], [z(3)], [z(3, dtype=torch.half)], {}),  # momentum dtype
        ([z(3)], [z(3)], [z(3)], {"lr": -1.0}),
        ([z(3)], [z(3)], [z(3)], {"eps": float("nan")}),
        ([z(3)], [z(3)], [z(3)], {"grad_scale": z(2)}),
        ([z(3)], [z(3)], [z(3)], {"found_inf": z(1, dtype=torch.half)}),
        ([z(3)], [z(3)], [z(3)], {"copies": [z(4, dtype=torch.half)]}),
    ]


@pytest.mark.parametrize("case", range(11))
def test_lars_bad_input_same_error_as_cpu(case):
    cpu, cuda = lars_bad_inputs("cpu")[case], lars_bad_inputs(DEV)[case]

    def call(args):
        params, grads, bufs, kw = args
        kw = dict(kw)
        copies = kw.pop("copies", ())
        return lambda: lars(params, grads, bufs, copies, **kw)

    assert_same_error(call(cpu), call(cuda))


def test_lars_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu but params\[0\] is on cuda"):
        lars([torch.zeros(3, device=DEV)], [torch.zeros(3)], [torch.zeros(3, device=DEV)])


# ---- one-pass LARS and deterministic norms -------------------------------------------------


def sq_ref(t):
    return t.detach().cpu().double().pow(2).sum().item()


def assert_sq_close(got, tensors, rtol=5e-6):
    for value, t in zip(got.cpu().tolist(), tensors):
        ref = sq_ref(t)
        assert abs(value - ref) <= rtol * ref + 1e-300, (value, ref, t.numel(), t.dtype)


# Many chunks per tensor (partials summed by the last block), sizes around the chunk, odd tails.
NORM_SIZES = AWKWARD + [3 * 65536 + 5, 2_000_003]


@pytest.mark.parametrize("dtype", FLOATS)
def test_sum_squares_close_and_bitwise_run_to_run(gen, dtype):
    tensors = [randn(gen, n, dtype=dtype) for n in NORM_SIZES] + [misaligned(randn(gen, 999))]
    first = ops.sum_squares(tensors)
    assert first.dtype == torch.float64 and first.device.type == torch.device(DEV).type
    assert first.shape == (len(tensors),)
    assert_sq_close(first, tensors)
    for _ in range(20):
        assert_bits_equal(ops.sum_squares(tensors), first)
    assert first[0].item() == 0.0  # the empty tensor


def test_sum_squares_mixed_dtypes_alignment_and_specials(gen):
    tensors = [randn(gen, n, dtype=FLOATS[i % 4]) for i, n in enumerate(NORM_SIZES)]
    got = ops.sum_squares(tensors)
    # One call over mixed dtypes equals one call per tensor; a misaligned copy of the same
    # values gives the same bits (the same element-to-thread order on both paths).
    for t, value in zip(tensors, got):
        assert_bits_equal(ops.sum_squares([t]), value.view(1))
        assert_bits_equal(ops.sum_squares([misaligned(t)]), value.view(1))
    a, b = randn(gen, 70001), randn(gen, 33)
    a[69999], b[5] = float("nan"), float("inf")
    got = ops.sum_squares([a, b, randn(gen, 9)])
    assert got[0].isnan() and got[1].isinf() and got[2].isfinite()


@pytest.mark.parametrize("flat_dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_sq_norms_are_the_written_values_norms(gen, flat_dtype, out_dtype, accumulate):
    sizes = NORM_SIZES[:-1] + [5] * 40
    outs = [randn(gen, n, dtype=out_dtype) for n in sizes]
    outs[-1] = misaligned(outs[-1])
    flat = misaligned(randn(gen, sum(sizes) + 3, dtype=flat_dtype))
    before = [t.clone() for t in outs]
    sq = torch.full((len(outs),), float("nan"), dtype=torch.float64, device=DEV)  # poisoned
    ops.unpack_(flat, outs, 0.25, accumulate, None, sq)
    # Bitwise what a separate pass over the written tensors gives, and close to float64.
    assert_bits_equal(sq, ops.sum_squares(outs))
    assert_sq_close(sq, outs)
    # Run to run: the same inputs give the same bits.
    for _ in range(5):
        again = [b.clone() for b in before]
        sq2 = torch.empty_like(sq)
        ops.unpack_(flat, again, 0.25, accumulate, None, sq2)
        assert_bits_equal(sq2, sq)


def test_unpack_sq_norms_empty_tensors_and_no_elements(gen):
    outs = [torch.empty(0, device=DEV), randn(gen, 7), torch.empty(0, 3, device=DEV)]
    sq = torch.full((3,), float("nan"), dtype=torch.float64, device=DEV)
    ops.unpack_(randn(gen, 7), outs, 1.0, False, None, sq)
    assert sq[0].item() == 0.0 and sq[2].item() == 0.0 and sq[1].item() == sq_ref(outs[1])
    sq.fill_(float("nan"))
    ops.unpack_(randn(gen, 2), [torch.empty(0, device=DEV)], 1.0, False, None, sq[:1])
    assert sq[0].item() == 0.0


def one_pass(params, grads, bufs, g_sq, w_sq, copies=(), **kw):
    gradfuse.ops.lars_update_from_norms_(
        params, grads, bufs, g_sq, w_sq, model_copies=list(copies), **{**HYPER, **kw}
    )


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_in_momentum", [False, True])
@pytest.mark.parametrize(
    ("dtype", "grad_dtype"),
    [(torch.float32, None), (torch.float32, torch.float16), (torch.bfloat16, None)],
)
def test_one_pass_equals_two_pass_bitwise(gen, nesterov, lr_in_momentum, dtype, grad_dtype):
    sizes = NORM_SIZES + [3] * 20
    params, grads, bufs = lars_case(gen, sizes, dtype, grad_dtype)
    params[1], grads[1], bufs[1] = (misaligned(t) for t in (params[1], grads[1], bufs[1]))
    p2, g2, b2 = ([t.clone() for t in ts] for ts in (params, grads, bufs))
    use_lars = [i % 3 != 1 for i in range(len(sizes))]
    use_wd = [i % 4 != 2 for i in range(len(sizes))]
    flags = {"nesterov": nesterov, "lr_in_momentum": lr_in_momentum}
    lars(p2, g2, b2, use_lars=use_lars, use_wd=use_wd, **flags)
    w_sq = ops.sum_squares(params)
    one_pass(
        params,
        grads,
        bufs,
        ops.sum_squares(grads),
        w_sq,
        use_lars=use_lars,
        use_weight_decay=use_wd,
        **flags,
    )
    # The two-pass op's norm pass takes the same deterministic sums: the same bits.
    for a, b in zip(params + bufs, p2 + b2):
        assert_bits_equal(a.float(), b.float())
    # The new norms, taken while the update wrote them: what sum_squares gives now.
    assert_bits_equal(w_sq, ops.sum_squares(params))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("copy_dtype", [None, torch.float16])
def test_one_pass_matches_the_cpu_given_the_same_norms(gen, param_dtype, copy_dtype):
    # Given the same norms, both devices compute each element with the same fused
    # multiply-adds and roundings: the same bits. Only the norms' summation order differs.
    sizes = [1, 9, 1000, 65537, 200_003]
    params, grads, bufs = lars_case(gen, sizes, param_dtype)
    copies = (
        [] if copy_dtype is None else [torch.zeros(n, dtype=copy_dtype, device=DEV) for n in sizes]
    )
    cpu = [[t.cpu() for t in ts] for ts in (params, grads, bufs, copies)]
    g_sq, w_sq = ops.sum_squares(cpu[1]), ops.sum_squares(cpu[0])
    w_sq_gpu = w_sq.to(DEV)
    kw = {"use_lars": [True, False, True, True, True], "nesterov": True}
    one_pass(params, grads, bufs, g_sq.to(DEV), w_sq_gpu, copies, **kw)
    one_pass(cpu[0], cpu[1], cpu[2], g_sq, w_sq, cpu[3], **kw)
    for a, b in zip(params + bufs + copies, cpu[0] + cpu[2] + cpu[3]):
        assert torch.equal(a.cpu(), b)
    torch.testing.assert_close(w_sq_gpu.cpu(), w_sq, rtol=1e-6, atol=0)


def test_one_pass_grad_scale_found_inf_and_zero_norms(gen):
    sizes = [50, 9, 70000]
    params, grads, bufs = lars_case(gen, sizes)
    scale = 1024.0
    scaled = [g * scale for g in grads]
    g_sq = ops.sum_squares(scaled)  # of the scaled grads, as unpack takes them
    w_sq = ops.sum_squares(params)
    before = [t.clone() for t in params + bufs + [w_sq]]
    one_pass(
        params,
        scaled,
        bufs,
        g_sq,
        w_sq,
        grad_scale=torch.tensor([scale], device=DEV),
        found_inf=torch.ones(1, device=DEV),
    )
    assert all(torch.equal(a, b) for a, b in zip(params + bufs + [w_sq], before))
    refs = [lars_reference(p, g, v) for p, g, v in zip(params, grads, bufs)]
    one_pass(
        params,
        scaled,
        bufs,
        g_sq,
        w_sq,
        grad_scale=torch.tensor([scale], device=DEV),
        found_inf=torch.zeros(1, device=DEV),
    )
    for p, (p_ref, _) in zip(params, refs):
        assert rel_err(p, p_ref) < 1e-6
    # A zero norm gives trust ratio 1, a NaN norm poisons its tensor only.
    p, g, v = lars_case(gen, [37, 37, 0])
    ref, _ = lars_reference(p[0], g[0], v[0], use_lars=False, lr=0.5, weight_decay=0.0)
    norms_g = torch.tensor([0.0, float("nan"), 5.0], dtype=torch.float64, device=DEV)
    norms_w = torch.tensor([1.0, 1.0, 7.0], dtype=torch.float64, device=DEV)
    one_pass(p, g, v, norms_g, norms_w, lr=0.5, weight_decay=0.0)
    assert rel_err(p[0], ref) < 1e-6  # trust ratio 1
    assert p[1].isnan().all()
    assert norms_w[2].item() == 0.0  # the empty tensor's new norm


def test_two_pass_lars_bitwise_run_to_run(gen):
    # Many chunks per tensor: the norm pass's partials and last-block sums decide the trust
    # ratio's low bits; 20 runs from the same inputs must agree exactly.
    params, grads, bufs = lars_case(gen, [2_000_003, 65537, 3 * 65536, 9])
    start = [[t.clone() for t in ts] for ts in (params, grads, bufs)]
    lars(params, grads, bufs)
    for _ in range(20):
        p, g, v = ([t.clone() for t in ts] for ts in start)
        lars(p, g, v)
        for a, b in zip(p + v, params + bufs):
            assert_bits_equal(a, b)


def kernel_launches(fn, name):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if name in e.name and e.device_type.name == "CUDA")


def test_resnet50_shapes_one_launch_each(gen):
    from gradfuse.bench.shapes import resnet50_shapes

    shapes = resnet50_shapes()
    params = [randn(gen, *s) for s in shapes]
    grads = [randn(gen, *s, scale=1e-3) for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    use_lars = [len(s) > 1 for s in shapes]
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float16, device=DEV)
    restored = [torch.empty_like(g) for g in grads]
    g_sq = torch.empty(len(shapes), dtype=torch.float64, device=DEV)
    w_sq = ops.sum_squares(params)
    cpu_params = [p.cpu() for p in params]
    calls = {
        "pack": lambda: ops.pack_(grads, flat, 1.0),
        "unpack": lambda: ops.unpack_(flat, restored, 1.0, False, None, g_sq),
        "lars_update_kernel": lambda: one_pass(
            params, restored, bufs, g_sq, w_sq, use_lars=use_lars, use_weight_decay=use_lars
        ),
        "sum_squares_kernel": lambda: ops.sum_squares(grads),
    }
    counts = {
        name: kernel_launches(fn, "convert_kernel" if name in ("pack", "unpack") else name)
        for name, fn in calls.items()
    }
    if torch.cuda.get_device_capability()[0] >= 7:  # 32 KiB kernel arguments: one table
        assert counts == dict.fromkeys(calls, 1), counts
    assert_sq_close(g_sq, restored)
    for r, g in zip(restored, grads):
        assert torch.equal(r, g.half().float())
    # The step against the CPU twin from the same norms: bitwise equal.
    cpu_bufs = [torch.zeros_like(p) for p in cpu_params]
    one_pass(
        cpu_params,
        [r.cpu() for r in restored],
        cpu_bufs,
        ops.sum_squares([r.cpu() for r in restored]),
        ops.sum_squares(cpu_params),
        use_lars=use_lars,
        use_weight_decay=use_lars,
    )
    for p, c in zip(params, cpu_params):
        torch.testing.assert_close(p.cpu(), c, rtol=1e-6, atol=1e-7)


def test_one_pass_ops_never_sync(gen):
    params, grads, bufs = lars_case(gen, [100_003, 7, 65537])
    flat = torch.empty(sum(p.numel() for p in params), device=DEV)
    sq = torch.empty(3, dtype=torch.float64, device=DEV)

    def step():
        ops.unpack_(flat, grads, 1.0, False, None, sq)
        w_sq = ops.sum_squares(params)
        one_pass(params, grads, bufs, sq, w_sq, lr=1e-3)
        lars(params, grads, bufs, lr=1e-3)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_lars_optimizer_uses_one_pass_on_cuda_and_matches_cpu(gen):
    from gradfuse.optim import LARS, _has_one_pass_kernels

    assert _has_one_pass_kernels(torch.device(DEV))
    shapes = [(64, 32), (64,), (10, 64), (10,)]
    init = [randn(gen, *s, device="cpu") for s in shapes]
    grads = [[randn(gen, *s, device="cpu", scale=1e-2) for s in shapes] for _ in range(5)]
    results = []
    for device in ("cpu", DEV):
        params = [torch.nn.Parameter(t.to(device)) for t in init]
        opt = LARS(params, lr=0.1, weight_decay=1e-4, trust_coefficient=0.02)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(device)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def norm_bad_inputs(device):
    z = lambda *s, **kw: torch.zeros(*s, device=device, **kw)
    d = torch.float64
    return [
        ([z(3)], z(1), z(1, dtype=d)),  # grad norms not float64
        ([z(3)], z(2, dtype=d), z(1, dtype=d)),  # wrong length
        ([z(3)], z(1, dtype=d), z(1, 1, dtype=d)),  # not 1-D
    ]


@pytest.mark.parametrize("case", range(3))
def test_one_pass_bad_input_same_error_as_cpu(case):
    (pc, gc, wc), (pg, gg, wg) = norm_bad_inputs("cpu")[case], norm_bad_inputs(DEV)[case]

    def call(params, g_sq, w_sq):
        return lambda: one_pass(
            params,
            [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params],
            g_sq,
            w_sq,
        )

    assert_same_error(call(pc, gc, wc), call(pg, gg, wg))
    assert_same_error(
        lambda: ops.sum_squares([torch.zeros(2), torch.zeros(2, dtype=torch.int32)]),
        lambda: ops.sum_squares(
            [torch.zeros(2, device=DEV), torch.zeros(2, dtype=torch.int32, device=DEV)]
        ),
    )
    assert_same_error(
        lambda: ops.unpack_(
            torch.zeros(4), [torch.zeros(4)], 1.0, False, None, torch.zeros(2, dtype=torch.float64)
        ),
        lambda: ops.unpack_(
            torch.zeros(4, device=DEV),
            [torch.zeros(4, device=DEV)],
            1.0,
            False,
            None,
            torch.zeros(2, dtype=torch.float64, device=DEV),
        ),
    )


# ---- pack / unpack ----------------------------------------------------------------------------


def assert_converted(out, ref, *dtypes):
    out, ref = out.cpu(), ref.cpu()
    if torch.float64 in dtypes:
        # The kernel rounds fp64 -> 16 bit once; torch's reference may go through fp32: one ulp
        # of slack (one subnormal step near zero).
        finfo = torch.finfo(out.dtype)
        torch.testing.assert_close(out, ref, rtol=ULP[out.dtype], atol=finfo.tiny * finfo.eps)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_pack_converts_and_rounds_once(gen, src, dst):
    tensors = [randn(gen, n, dtype=src) for n in AWKWARD] + [
        misaligned(randn(gen, 3, 5, dtype=src))
    ]
    total = sum(t.numel() for t in tensors)
    out = torch.full((total + 3,), 7.0, dtype=dst, device=DEV)  # poisoned, with a tail
    flag = torch.zeros(1, device=DEV)
    scale = as_f32(0.37)
    ops.pack_(tensors, out, scale, flag)
    math_t = math_dtype(src, dst)
    ref = torch.cat([t.cpu().to(math_t).flatten() * scale for t in tensors]).to(dst)
    assert_converted(out[:total], ref, src, dst)
    assert torch.equal(out[total:].cpu(), torch.full((3,), 7.0, dtype=dst))
    assert flag.item() == 0.0


@pytest.mark.parametrize("flat_dtype", FLOATS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_mixed_dtypes(gen, flat_dtype, accumulate):
    tensors = [randn(gen, n, dtype=FLOATS[i % 4]) for i, n in enumerate(AWKWARD)]
    flat = randn(gen, sum(t.numel() for t in tensors) + 5, dtype=flat_dtype)
    before = [t.clone() for t in tensors]
    scale = as_f32(0.3)
    ops.unpack_(flat, tensors, scale, accumulate)
    offset = 0
    for t, b in zip(tensors, before):
        m = math_dtype(t.dtype, flat_dtype)
        part = flat[offset : offset + t.numel()].cpu().to(m) * scale
        ref = (b.cpu().to(m) + part if accumulate else part).to(t.dtype)
        offset += t.numel()
        assert_converted(t, ref, t.dtype, flat_dtype)


# Scales a float cannot hold (1/size for 3 ranks, a postscale, their product as the engine
# forms it): float64 data is scaled by the double itself, bit-equal to x * scale in double.
F64_SCALES = [1 / 3, 1 / 7, 0.1, (1 / 7) * (1 / 3)]
F64_PAIRS = [
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.float32, torch.float64),
]


@pytest.mark.parametrize("scale", F64_SCALES)
@pytest.mark.parametrize("src, dst", F64_PAIRS)
def test_pack_scales_float64_in_double(gen, scale, src, dst):
    tensors = [randn(gen, n, dtype=src) for n in AWKWARD] + [
        misaligned(randn(gen, 5, 7, dtype=src))
    ]
    total = sum(t.numel() for t in tensors)
    out = misaligned(torch.full((total + 3,), float("nan"), dtype=dst, device=DEV))  # poisoned
    flag = torch.zeros(1, device=DEV)
    ops.pack_(tensors, out, scale, flag)
    ref = torch.cat([t.cpu().double().flatten() * scale for t in tensors]).to(dst)
    assert_bits_equal(out[:total], ref)
    assert out[total:].isnan().all()
    assert flag.item() == 0.0
    # The CPU kernels write the same bits.
    out_cpu = torch.empty(total, dtype=dst)
    ops.pack_([t.cpu() for t in tensors], out_cpu, scale)
    assert_bits_equal(out[:total], out_cpu)


@pytest.mark.parametrize("scale", F64_SCALES)
@pytest.mark.parametrize("flat_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_scales_float64_in_double(gen, scale, flat_dtype, accumulate):
    sizes = [*AWKWARD, 35]
    flat = misaligned(randn(gen, sum(sizes) + 5, dtype=flat_dtype))
    if accumulate:
        tensors = [randn(gen, n, dtype=torch.float64) for n in sizes]
    else:
        tensors = [torch.full((n,), float("nan"), dtype=torch.float64, device=DEV) for n in sizes]
    tensors[-1] = misaligned(tensors[-1].view(5, 7))
    before = [t.to("cpu", copy=True) for t in tensors]
    ops.unpack_(flat, tensors, scale, accumulate)
    offset = 0
    for t, b in zip(tensors, before):
        # The product rounded, then the sum: torch's two roundings of b + x * s.
        part = flat[offset : offset + t.numel()].cpu().double().view(t.shape) * scale
        assert_bits_equal(t, b + part if accumulate else part)
        offset += t.numel()


def test_pack_many_small_tensors_round_trip(gen):
    # 500 tensors: several 80-tensor launch tables; odd sizes put most segments off alignment.
    numels = torch.randint(0, 5000, (500,), generator=gen).tolist()
    grads = [randn(gen, n, scale=1e-2) for n in numels]
    flat = torch.full((sum(numels),), float("nan"), dtype=torch.float16, device=DEV)
    flag = torch.zeros(1, device=DEV)
    ops.pack_(grads, flat, 4.0, flag)
    assert flag.item() == 0.0
    restored = [torch.full_like(g, float("nan")) for g in grads]
    ops.unpack_(flat, restored, 0.25, False, flag)
    for g, r in zip(grads, restored):
        assert torch.equal(r, (g * 4.0).half().float() * 0.25)  # exact: powers of two
    # The CPU kernels write the same bits.
    flat_cpu = torch.empty(sum(numels), dtype=torch.float16)
    ops.pack_([g.cpu() for g in grads], flat_cpu, 4.0)
    assert torch.equal(flat.cpu(), flat_cpu)


def test_fp16_overflow_and_sticky_flag(gen):
    x = randn(gen, 1001)
    out = torch.empty(1001, dtype=torch.float16, device=DEV)
    flag = torch.zeros(1, device=DEV)
    ops.pack_([x], out, 1.0, flag)
    assert flag.item() == 0.0
    x[500] = 65519.0  # rounds down to 65504: finite
    ops.pack_([x], out, 1.0, flag)
    assert flag.item() == 0.0 and out[500].item() == 65504.0
    x[999] = 65520.0  # rounds to inf
    ops.pack_([x], out, 1.0, flag)
    assert flag.item() == 1.0 and out[999].isinf().item()
    ops.pack_([x * 0.5], out, 1.0, flag)
    assert flag.item() == 1.0  # sticky: set, never cleared
    flag.zero_()
    ops.pack_([x * 0.5], out, 1.0, flag)
    assert flag.item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dst", FLOATS)
def test_nonfinite_inputs_reported(gen, bad, dst):
    for n in (37, 4096):
        x = randn(gen, n)
        x[n - 1] = bad
        out = torch.empty(n, dtype=dst, device=DEV)
        flag = torch.zeros(1, device=DEV)
        ops.pack_([x], out, 2.0, flag)
        assert flag.item() == 1.0
        assert out[n - 1].isnan().item() == math.isnan(bad)
        back = torch.empty(n, device=DEV)
        flag.zero_()
        ops.unpack_(out, [back], 1.0, False, flag)
        assert flag.item() == 1.0


def test_pack_huge_tensor(gen):
    x = randn(gen, HUGE)
    out = torch.empty(HUGE, dtype=torch.bfloat16, device=DEV)
    flag = torch.zeros(1, device=DEV)
    ops.pack_([x], out, 1.0, flag)
    assert torch.equal(out, x.to(torch.bfloat16)) and flag.item() == 0.0


def test_pack_empty():
    out = torch.full((4,), 3.0, device=DEV)
    ops.pack_([], out)
    ops.pack_([torch.empty(0, device=DEV), torch.empty(0, 5, device=DEV)], out)
    ops.unpack_(out, [torch.empty(0, device=DEV)])
    assert torch.equal(out.cpu(), torch.full((4,), 3.0))


def pack_bad_inputs(device):
    z = lambda *s, **kw: torch.zeros(*s, device=device, **kw)
    return [
        ([z(5)], z(4), None),
        ([z(2, dtype=torch.int32)], z(4), None),
        ([z(2)], z(4, dtype=torch.int64), None),
        ([z(1), z(4, 2).t()], z(10), None),
        ([z(2)], z(8)[::2], None),
        ([z(2)], z(2), z(2)),
        ([z(2)], z(2), z(1, dtype=torch.half)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_pack_bad_input_same_error_as_cpu(case):
    (tc, oc, fc), (tg, og, fg) = pack_bad_inputs("cpu")[case], pack_bad_inputs(DEV)[case]
    assert_same_error(lambda: ops.pack_(tc, oc, 1.0, fc), lambda: ops.pack_(tg, og, 1.0, fg))
    assert_same_error(
        lambda: ops.unpack_(oc, tc, 1.0, False, fc), lambda: ops.unpack_(og, tg, 1.0, False, fg)
    )


# ---- top-k ------------------------------------------------------------------------------------


def compress(grad, residual, ratio, sampled=False, index_dtype=None, seed=0):
    return ops.topk_compress(grad, residual, ratio, sampled, index_dtype, seed)


def assert_same_as_cpu(grad, residual_before, ratio, sampled, seed, values, indices, residual):
    """The CPU twin, on the same input and seed, selects the very same elements."""
    r_cpu = residual_before.cpu().clone()
    v_cpu, i_cpu = compress(grad.cpu(), r_cpu, ratio, sampled=sampled, seed=seed)
    assert torch.equal(indices.cpu(), i_cpu)
    assert_bits_equal(values, v_cpu)  # bits: NaN is sent too
    assert_bits_equal(residual, r_cpu)


@pytest.mark.parametrize("numel", [1, 2, 7, 9, 33, 2047, 2049, 4097, 100003, 1_000_003])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_topk_exact_is_the_topk_set_and_matches_cpu(gen, numel, ratio):
    grad = randn(gen, numel)
    residual = randn(gen, numel, scale=0.5)
    before = residual.clone()
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    values, indices = compress(grad, residual, ratio, seed=seed)
    k = expected_k(numel, ratio)
    assert values.shape == indices.shape == (k,)
    assert indices.dtype == torch.int64 and values.device.type == torch.device(DEV).type
    acc = check_error_feedback(grad, before, residual, values, indices)
    assert torch.equal(indices.cpu(), topk_reference(acc, k))
    assert_same_as_cpu(grad, before, ratio, False, seed, values, indices, residual)


def assert_sampled_set(acc, indices, k):
    """The exact top-k, or every element at or above a threshold (ties included)."""
    indices = indices.cpu()
    if indices.numel() == k:
        assert torch.equal(indices, topk_reference(acc, k))
    else:
        keys = magnitude_keys(acc)
        assert torch.equal(indices, (keys >= keys[indices].min()).nonzero().flatten())


@pytest.mark.parametrize("numel", [1, 100, 4097, 100003, 2_000_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_topk_sampled_bounds_and_cpu_agreement(gen, numel, ratio):
    grad = randn(gen, numel)
    residual = torch.zeros(numel, device=DEV)
    values, indices = compress(grad, residual, ratio, sampled=True, seed=7)
    k = expected_k(numel, ratio)
    assert k <= indices.numel() <= 2 * k
    acc = check_error_feedback(grad, torch.zeros(numel), residual, values, indices)
    assert_sampled_set(acc, indices, k)
    assert_same_as_cpu(grad, torch.zeros(numel), ratio, True, 7, values, indices, residual)


def sparse_grad(gen, numel, density):
    grad = torch.zeros(numel)
    nnz = max(1, int(numel * density))
    grad[torch.randperm(numel, generator=gen)[:nnz]] = randn(gen, nnz, device="cpu")
    return grad.to(DEV)


@pytest.mark.parametrize("numel", [1, 9, 4097, 100003, 2_000_003])
@pytest.mark.parametrize("ratio", [0.0003, 0.001, 0.01])
@pytest.mark.parametrize("sampled", [False, True])
def test_topk_sparse_gradient_matches_torch_topk_and_cpu(gen, numel, ratio, sampled):
    grad = sparse_grad(gen, numel, 0.001)
    residual = torch.zeros(numel, device=DEV)
    values, indices = compress(grad, residual, ratio, sampled=sampled, seed=5)
    acc = check_error_feedback(grad, torch.zeros(numel), residual, values, indices)
    k = expected_k(numel, ratio)
    if sampled:
        assert_sampled_set(acc, indices, k)
    else:
        assert torch.equal(indices.cpu(), topk_reference(acc, k))
    assert_same_as_cpu(grad, torch.zeros(numel), ratio, sampled, 5, values, indices, residual)


def test_topk_sparse_gradient_extra_memory_is_o_k(gen):
    # 25M elements, 0.1% non-zeros, 1% density: the threshold is 0 and every element would be a
    # candidate (the old exact phase sorted them all: ~44 B each, 1.1 GB). Now: O(k) buffers and
    # a few bytes per 2048-element tile.
    n, k = 25_000_000, 250_000
    grad = sparse_grad(gen, n, 0.001)
    residual = torch.zeros(n, device=DEV)
    compress(grad[:4096], residual[:4096].clone(), 0.01)  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _, indices = compress(grad, residual, 0.01)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert indices.numel() == k
    # values + indices + selected (24 B per k), candidates (<= 16 B per k + 8 KiB), tile
    # counts (32 B per 2048 elements), the sample: well under 64 B per k.
    assert extra < 64 * k, f"{extra / 2**20:.1f} MiB extra"
    assert torch.equal(indices.cpu(), topk_reference(grad, k))


def test_topk_threshold_above_the_kth_falls_back_to_every_element():
    # Large values exactly at the sampled positions: fewer than k pass the threshold, so the
    # k-th largest is found by the radix select over every element.
    n, ratio, seed = 100_000, 0.5, 3
    k = expected_k(n, ratio)
    grad = torch.ones(n)
    grad[sample_positions(n, k, seed)] = 10.0
    for sampled in (False, True):
        residual = torch.zeros(n, device=DEV)
        values, indices = compress(grad.to(DEV), residual, ratio, sampled=sampled, seed=seed)
        assert torch.equal(indices.cpu(), topk_reference(grad, k))
        assert_same_as_cpu(grad, torch.zeros(n), ratio, sampled, seed, values, indices, residual)


def test_topk_more_candidates_than_room_falls_back_to_every_element(gen):
    # The sample sees only zeros, the rest is noise: every element passes the threshold 0.
    n, ratio, seed = 1_000_000, 0.001, 11
    k = expected_k(n, ratio)
    grad = randn(gen, n, device="cpu")
    grad[sample_positions(n, k, seed)] = 0.0
    residual = torch.zeros(n, device=DEV)
    values, indices = compress(grad.to(DEV), residual, ratio, seed=seed)
    assert torch.equal(indices.cpu(), topk_reference(grad, k))
    assert_same_as_cpu(grad, torch.zeros(n), ratio, False, seed, values, indices, residual)


def test_topk_exact_and_decompress_never_sync(gen):
    grad = randn(gen, 1_000_003)
    residual = torch.zeros(1_000_003, device=DEV)
    for _ in range(2):  # warm-up: lazy module loading, allocator
        v, i = compress(grad, residual, 0.001)
        ops.topk_decompress(torch.cat([v, v]), torch.cat([i, i]), 1_000_003)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            v, i = compress(grad, residual, 0.001)
            ops.topk_decompress(torch.cat([v, v]), torch.cat([i, i]), 1_000_003)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_topk_many_small_tensors_match_cpu(gen):
    # Random small sizes, and sizes around the 2048-element tiles.
    sizes = torch.randint(1, 5000, (60,), generator=gen).tolist() + [2047, 2048, 2049, 4095]
    for numel in sizes:
        ratio = float(torch.empty(()).uniform_(0.0005, 0.3, generator=gen))
        for sampled in (False, True):
            grad = randn(gen, numel)
            residual = randn(gen, numel, scale=0.5)
            before = residual.clone()
            values, indices = compress(grad, residual, ratio, sampled=sampled, seed=numel)
            acc = check_error_feedback(grad, before, residual, values, indices)
            k = expected_k(numel, ratio)
            if sampled:
                assert_sampled_set(acc, indices, k)
            else:
                assert torch.equal(indices.cpu(), topk_reference(acc, k)), (numel, ratio)
            assert_same_as_cpu(grad, before, ratio, sampled, numel, values, indices, residual)


def test_topk_nan_and_inf_always_selected(gen):
    grad = randn(gen, 10000)
    grad[17], grad[9000], grad[4] = float("nan"), float("inf"), -float("inf")
    residual = torch.zeros(10000, device=DEV)
    values, indices = compress(grad, residual, 0.001)  # k = 10
    assert {4, 17, 9000} <= set(indices.tolist())
    assert values[indices == 17].isnan().all()
    assert residual.isfinite().all()
    assert_same_as_cpu(grad, torch.zeros(10000), 0.001, False, 0, values, indices, residual)


def test_topk_ties_and_zeros():
    residual = torch.zeros(1000, device=DEV)
    values, indices = compress(torch.zeros(1000, device=DEV), residual, 0.01)
    assert indices.tolist() == list(range(10)) and (values == 0).all()  # ties: lowest indices
    grad = torch.ones(5000, device=DEV)
    grad[[3, 1000, 4999]] = 5.0
    values, indices = compress(grad, torch.zeros(5000, device=DEV), 0.0006)  # k = 3
    assert indices.tolist() == [3, 1000, 4999]


@pytest.mark.parametrize("dtype", LOW)
def test_topk_half_grads_and_int32_indices(gen, dtype):
    grad = randn(gen, 5001, dtype=dtype)
    residual = randn(gen, 5001)
    before = residual.clone()
    values, indices = compress(grad, residual, 0.01, index_dtype=torch.int32)
    assert indices.dtype == torch.int32 and values.dtype == torch.float32
    acc = check_error_feedback(grad, before, residual, values, indices)
    assert torch.equal(indices.cpu().long(), topk_reference(acc, expected_k(5001, 0.01)))


def test_topk_empty():
    values, indices = compress(torch.empty(0, device=DEV), torch.empty(0, device=DEV), 0.5)
    assert (
        values.numel() == 0
        and indices.numel() == 0
        and values.device.type == torch.device(DEV).type
    )


def test_topk_huge_exact(gen):
    grad = randn(gen, 25_000_000)
    residual = torch.zeros(25_000_000, device=DEV)
    values, indices = compress(grad, residual, 0.001)
    assert torch.equal(indices.cpu(), topk_reference(grad, 25_000))
    assert torch.equal(values, grad[indices])


def test_topk_round_trip_through_decompress(gen):
    grad = randn(gen, 3000)
    residual = torch.zeros(3000, device=DEV)
    values, indices = compress(grad, residual, 0.1)
    dense = ops.topk_decompress(values, indices, 3000)
    assert torch.equal(dense + residual, grad)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("numel, k", [(1, 1), (7, 3), (2049, 1000), (100_003, 997), (HUGE, 40_000)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_decompress_deterministic_and_bitwise_cpu(gen, dtype, numel, k, index_dtype):
    # 8 ranks, most indices picked by several of them: summed in rank order, like the CPU.
    pool = torch.randperm(numel, generator=gen)[: min(numel, 2 * k)]
    values, indices = [], []
    for _ in range(8):
        indices.append(pool[torch.randperm(pool.numel(), generator=gen)[:k]].sort().values)
        values.append(randn(gen, k, dtype=dtype, device="cpu", scale=100.0))
    flat_v = torch.cat(values).to(DEV)
    flat_i = torch.cat(indices).to(DEV, index_dtype)
    first = ops.topk_decompress(flat_v, flat_i, numel)
    for _ in range(20):
        assert_bits_equal(ops.topk_decompress(flat_v, flat_i, numel).double(), first.double())
    ref = decompress_reference(values, indices, numel, dtype)
    assert_bits_equal(first.double(), ref.double())
    cpu = ops.topk_decompress(flat_v.cpu(), flat_i.cpu(), numel)
    assert_bits_equal(first.double(), cpu.double())


def test_decompress_index_out_of_range_is_a_device_assertion(tmp_path):
    # Checked on the device (no host sync): the kernel's assertion fails, and the error surfaces
    # at the next synchronization. In a child process: it leaves the CUDA context unusable.
    script = tmp_path / "bad_index.py"
    script.write_text(
        "import torch, gradfuse\n"
        "v = torch.ones(3, device='cuda')\n"
        "i = torch.tensor([0, 7, 1], device='cuda')\n"
        "torch.ops.gradfuse.topk_decompress(v, i, 5)\n"
        "torch.cuda.synchronize()\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode != 0
    assert "topk_decompress: index out of [0, numel)" in out.stderr + out.stdout
    assert "device-side assert" in out.stderr


def test_decompress_empty_and_nan(gen):
    assert ops.topk_decompress(
        torch.empty(0, device=DEV), torch.empty(0, dtype=torch.long, device=DEV), 3
    ).tolist() == [0.0, 0.0, 0.0]
    values = torch.tensor([1.0, float("nan"), 2.0, float("inf")], device=DEV)
    dense = ops.topk_decompress(values, torch.tensor([1, 0, 1, 2], device=DEV), 4)
    assert dense[0].isnan() and dense[1] == 3.0 and dense[2] == float("inf") and dense[3] == 0


def topk_bad_inputs(device):
    z = lambda *s, **kw: torch.zeros(*s, device=device, **kw)
    return [
        (z(4), z(4), 0.0, None),
        (z(4), z(4), 1.5, None),
        (z(4), z(4, dtype=torch.half), 0.5, None),
        (z(4, dtype=torch.float64), z(4), 0.5, None),
        (z(4), z(2, 2), 0.5, None),
        (z(4, 2).t(), z(2, 4), 0.5, None),
        (z(4), z(4), 0.5, torch.float32),
    ]


@pytest.mark.parametrize("case", range(7))
def test_topk_bad_input_same_error_as_cpu(case):
    (gc, rc, ratio, idx), (gg, rg, _, _) = topk_bad_inputs("cpu")[case], topk_bad_inputs(DEV)[case]
    assert_same_error(
        lambda: compress(gc, rc, ratio, index_dtype=idx),
        lambda: compress(gg, rg, ratio, index_dtype=idx),
    )
