"""Fuzz of the fused ops (gradfuse.ops and torch.ops.gradfuse.*) with hypothesis.

Every example starts from a valid call drawn at random and applies one mutation: a wrong dtype
(int/bool/complex/float64 where float is needed), a wrong shape or length, a meta tensor among
CPU ones, a non-contiguous or expanded tensor, an output overlapping an input, a NaN, infinite,
negative or huge scalar, a non-number, a non-tensor. A bad call must raise TypeError or
ValueError (RuntimeError where torch's dispatcher rejects an argument type) naming the offending
argument; the unmutated ("valid") calls must succeed and match a float64 reference. The examples
are derandomized, so CI runs the same calls every time."""

from __future__ import annotations

import collections
import math
import re

import gradfuse.ops as gops
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from references import check_error_feedback, expected_k, lars_reference, rel_err

CALLS_PER_OP = 1000
FUZZ = settings(
    max_examples=CALLS_PER_OP,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
FLOAT16ISH = [torch.float32, torch.float16, torch.bfloat16]
NOT_FLOAT = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
calls = collections.Counter()  # op -> calls made, outcomes -> how many


def ints(data, shape, dtype, lo=-8, hi=8):
    """Integer-valued data (exact in every float dtype) of `shape`."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def spoil(data, t, how):
    """A copy of `t` made bad in one way; returns (tensor, expected exception, message regex)."""
    n = max(t.numel(), 2)
    if how == "dtype":
        dtype = data.draw(st.sampled_from(NOT_FLOAT), label="bad dtype")
        return torch.zeros(t.shape, dtype=dtype), TypeError, "must be float"
    if how == "noncontiguous":
        return torch.zeros(n, 2, dtype=t.dtype)[:, 0], ValueError, "contiguous"
    if how == "expanded":
        return torch.zeros(1, dtype=t.dtype).expand(n), ValueError, "contiguous"
    if how == "meta":
        return torch.zeros(t.shape, dtype=t.dtype, device="meta"), ValueError, "one device"
    if how == "numel":
        return torch.zeros(t.numel() + data.draw(st.integers(1, 3)), dtype=t.dtype), ValueError, ""
    raise AssertionError(how)


def expect(call, exc, arg, pattern=""):
    """`call` raises `exc` with a message naming `arg` (and matching `pattern`)."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert arg in message, f"{exc.__name__} does not name {arg!r}: {message}"
    assert re.search(pattern, message), f"{message!r} does not match {pattern!r}"
    calls["rejected"] += 1


def bad_scalar(data, finite_nonnegative=True):
    """A bad float argument: (value, expected exception)."""
    value = data.draw(
        st.sampled_from(
            [math.nan, math.inf, -math.inf, "1.0", None, [1.0]]
            + ([-1.0, -1e-30] if finite_nonnegative else [])
        ),
        label="bad scalar",
    )
    return value, (ValueError if isinstance(value, float) else TypeError)


# ---- lars_update_ ----------------------------------------------------------------------------

LARS_TENSOR_ARGS = ["params", "grads", "momentum_bufs", "model_copies"]
LARS_HYPER = ["lr", "momentum", "weight_decay", "trust_coefficient", "eps"]


def lars_call(data):
    n = data.draw(st.integers(1, 3), label="tensors")
    numels = [data.draw(st.integers(0, 9)) for _ in range(n)]
    pdtype = data.draw(st.sampled_from(FLOAT16ISH), label="param dtype")
    gdtype = data.draw(st.sampled_from(FLOAT16ISH), label="grad dtype")
    kw = {
        "params": [ints(data, (k,), pdtype) for k in numels],
        "grads": [ints(data, (k,), gdtype) for k in numels],
        "momentum_bufs": [ints(data, (k,), pdtype) for k in numels],
        "model_copies": [torch.zeros(k, dtype=torch.float16) for k in numels]
        if data.draw(st.booleans(), label="copies")
        else None,
        "use_lars": [data.draw(st.booleans()) for _ in range(n)],
        "use_weight_decay": [data.draw(st.booleans()) for _ in range(n)],
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "trust_coefficient": 0.02,
        "eps": 1e-8,
    }
    return n, kw


def run_lars(data, kw):
    if data.draw(st.booleans(), label="through torch.ops"):
        n = len(kw["params"])
        torch.ops.gradfuse.lars_update_(
            kw["params"],
            kw["grads"],
            kw["momentum_bufs"],
            kw["model_copies"] or [],
            kw["use_lars"],
            kw["use_weight_decay"],
            *(kw[h] for h in LARS_HYPER),
            False,
            False,
            kw.get("grad_scale"),
            kw.get("found_inf"),
        )
        assert n == len(kw["params"])
    else:
        gops.lars_update_(**kw)


def check_lars_valid(data, kw):
    before = [
        (p.clone(), g.clone(), v.clone()) for p, g, v in zip(*(kw[a] for a in LARS_TENSOR_ARGS[:3]))
    ]
    run_lars(data, kw)
    hyper = {h: kw[h] for h in LARS_HYPER}
    for i, (p, g, v) in enumerate(before):
        ref_p, ref_v = lars_reference(
            p, g, v, use_lars=kw["use_lars"][i], use_wd=kw["use_weight_decay"][i], **hyper
        )
        tol = 1e-5 if p.dtype == torch.float32 else 1e-2
        assert rel_err(kw["params"][i], ref_p) <= tol, (i, kw["params"][i], ref_p)
        assert rel_err(kw["momentum_bufs"][i], ref_v) <= tol, (i, kw["momentum_bufs"][i], ref_v)
    calls["valid"] += 1


LARS_MUTATIONS = [
    "valid", "length", "tensor", "mixed dtype", "alias", "hyper", "flag", "flags type",
    "not a tensor",
]  # fmt: skip


@FUZZ
@given(st.data())
def test_fuzz_lars_update(data):
    calls["lars_update_"] += 1
    n, kw = lars_call(data)
    how = data.draw(st.sampled_from(LARS_MUTATIONS), label="mutation")
    i = data.draw(st.integers(0, n - 1), label="index")
    if how == "valid":
        return check_lars_valid(data, kw)
    if how == "length":
        arg = data.draw(st.sampled_from(["grads", "momentum_bufs", "use_lars", "use_weight_decay"]))
        kw[arg] = kw[arg][:-1] if data.draw(st.booleans()) else kw[arg] + kw[arg][:1]
        return expect(lambda: run_lars(data, kw), ValueError, arg, "one entry per")
    if how == "tensor":
        arg = data.draw(
            st.sampled_from(LARS_TENSOR_ARGS if kw["model_copies"] else LARS_TENSOR_ARGS[:3])
        )
        spoilt = data.draw(st.sampled_from(["dtype", "noncontiguous", "expanded", "meta", "numel"]))
        if spoilt == "numel" and arg == "params":
            arg = "grads"  # params set the numel the others must have
        kw[arg][i], exc, pattern = spoil(data, kw[arg][i], spoilt)
        if spoilt == "meta" and arg == "params" and i == 0:
            # params[0] sets the device, so the first CPU tensor after it is named with it
            return expect(lambda: run_lars(data, kw), exc, "params[0]", pattern)
        return expect(lambda: run_lars(data, kw), exc, f"{arg}[{i}]", pattern)
    if how == "mixed dtype":
        if n < 2:
            return check_lars_valid(data, kw)
        other = {torch.float32: torch.float16}.get(kw["grads"][0].dtype, torch.float32)
        kw["grads"][1] = kw["grads"][1].to(other)
        return expect(lambda: run_lars(data, kw), TypeError, "grads[1]", "share the dtype")
    if how == "alias":
        k = kw["params"][i].numel()
        if k == 0:
            return check_lars_valid(data, kw)
        dtype = kw["params"][i].dtype
        base = torch.zeros(2 * k, dtype=dtype)
        shift = data.draw(st.integers(0, k - 1), label="overlap shift")
        kw["params"][i] = base[:k]
        kw["momentum_bufs"][i] = base[shift : shift + k]
        if data.draw(st.booleans()) and kw["grads"][i].dtype == dtype:
            kw["grads"][i], kw["momentum_bufs"][i] = (
                base[shift : shift + k],
                torch.zeros(k, dtype=dtype),
            )
        return expect(lambda: run_lars(data, kw), ValueError, f"params[{i}]", "overlap")
    if how == "hyper":
        arg = data.draw(st.sampled_from(LARS_HYPER))
        kw[arg], exc = bad_scalar(data)
        if exc is TypeError and data.draw(st.booleans(), label="dispatcher path"):
            return expect(lambda: run_lars(data, kw), (TypeError, RuntimeError), arg)
        return expect(lambda: gops.lars_update_(**kw), exc, arg)
    if how == "flag":
        arg = data.draw(st.sampled_from(["grad_scale", "found_inf"]))
        bad = data.draw(st.sampled_from(["numel", "dtype", "meta"]))
        kw[arg], exc, pattern = {
            "numel": (torch.ones(2), ValueError, "one element"),
            "dtype": (torch.ones(1, dtype=torch.float64), TypeError, "float32"),
            "meta": (torch.ones(1, device="meta"), ValueError, "one device"),
        }[bad]
        return expect(lambda: run_lars(data, kw), exc, arg, pattern)
    if how == "flags type":
        kw["use_lars"] = data.draw(st.sampled_from([5, 1.5, "ab"]))
        return expect(lambda: gops.lars_update_(**kw), (TypeError, ValueError), "use_lars")
    if how == "not a tensor":
        arg = data.draw(st.sampled_from(LARS_TENSOR_ARGS[:3]))
        kw[arg][i] = data.draw(st.sampled_from([None, 1.0, [1.0]]))
        return expect(lambda: gops.lars_update_(**kw), TypeError, f"{arg}[{i}]")
    raise AssertionError(how)


# ---- pack_ / pack / unpack_ ------------------------------------------------------------------

PACK_DTYPES = FLOAT16ISH + [torch.float64]
PACK_MUTATIONS = [
    "valid", "tensor", "flat", "short", "alias", "scale", "nonfinite", "not a tensor",
    "pack dtype",
]  # fmt: skip


def pack_call(data):
    n = data.draw(st.integers(1, 4), label="tensors")
    tensors = [
        ints(data, (data.draw(st.integers(0, 7)),), data.draw(st.sampled_from(PACK_DTYPES)))
        for _ in range(n)
    ]
    total = sum(t.numel() for t in tensors) + data.draw(st.integers(0, 3), label="spare")
    flat = ints(data, (total,), data.draw(st.sampled_from(PACK_DTYPES), label="flat dtype"))
    scale = data.draw(st.sampled_from([1.0, 0.5, 2.0, -0.25]), label="scale")
    return tensors, flat, scale


def run_pack(data, op, tensors, flat, scale, nonfinite=None):
    if op == "pack":  # allocates its own buffer of flat's dtype
        return gops.pack(tensors, flat.dtype, scale)
    via = data.draw(st.sampled_from(["wrapper", "torch.ops"]), label="path")
    if op == "pack_":
        fn = gops.pack_ if via == "wrapper" else torch.ops.gradfuse.pack_
        return fn(tensors, flat, scale, nonfinite)
    fn = gops.unpack_ if via == "wrapper" else torch.ops.gradfuse.unpack_
    return fn(flat, tensors, scale, False, nonfinite)


def check_pack_valid(data, op, tensors, flat, scale):
    # Integer data and power-of-two scales: every result is exact, so the reference is too.
    before = [t.clone() for t in tensors], flat.clone()
    nonfinite = torch.zeros(1)
    if op == "pack":
        flat, nonfinite = run_pack(data, op, tensors, flat, scale)
        assert flat.numel() == sum(t.numel() for t in tensors) and flat.dtype == before[1].dtype
        before = before[0], flat.clone()
    else:
        run_pack(data, op, tensors, flat, scale, nonfinite)
    offset = 0
    for t, t0 in zip(tensors, before[0]):
        segment = slice(offset, offset + t.numel())
        if op != "unpack_":
            assert torch.equal(flat[segment].double(), t0.double() * scale), (flat, t0, scale)
        else:
            assert torch.equal(t.double(), before[1][segment].double() * scale), (t, flat, scale)
        offset += t.numel()
    if op == "pack_":
        assert torch.equal(flat[offset:], before[1][offset:]), "pack_ wrote past the tensors"
    assert nonfinite.item() == 0
    calls["valid"] += 1


# pack allocates its buffer: the mutations of a given buffer do not apply to it.
PACK_ALLOCATING_MUTATIONS = ["valid", "tensor", "scale", "not a tensor", "pack dtype"]


@pytest.mark.parametrize("op", ["pack_", "pack", "unpack_"])
@FUZZ
@given(data=st.data())
def test_fuzz_pack_unpack(op, data):
    calls[op] += 1
    tensors, flat, scale = pack_call(data)
    flat_name = "out" if op == "pack_" else "flat"
    how = data.draw(
        st.sampled_from(PACK_ALLOCATING_MUTATIONS if op == "pack" else PACK_MUTATIONS),
        label="mutation",
    )
    i = data.draw(st.integers(0, len(tensors) - 1), label="index")
    run = lambda: run_pack(data, op, tensors, flat, scale)
    if how == "valid" or (how == "pack dtype" and op == "unpack_"):
        return check_pack_valid(data, op, tensors, flat, scale)
    if how == "tensor":
        spoilt = data.draw(st.sampled_from(["dtype", "noncontiguous", "expanded", "meta"]))
        tensors[i], exc, pattern = spoil(data, tensors[i], spoilt)
        if spoilt == "meta" and op == "pack" and i == 0:
            # pack makes its buffer on tensors[0]'s device: the others are then the odd ones
            if len(tensors) == 1:
                return  # a valid call on the meta device (shapes only)
            return expect(run, exc, "tensors[1]", pattern)
        return expect(run, exc, f"tensors[{i}]", pattern)
    if how == "flat":
        spoilt = data.draw(st.sampled_from(["dtype", "noncontiguous", "expanded", "meta"]))
        if spoilt == "meta":  # the first tensor is then the one on another device
            flat = torch.empty(flat.shape, dtype=flat.dtype, device="meta")
            return expect(run, ValueError, "tensors[0]", "one device")
        flat, exc, pattern = spoil(data, flat, spoilt)
        if exc is ValueError and sum(t.numel() for t in tensors) > flat.numel():
            pattern = ""  # too short as well; whichever is checked first
        return expect(run, exc, flat_name, pattern)
    if how == "short":
        if sum(t.numel() for t in tensors) == 0:
            return check_pack_valid(data, op, tensors, flat, scale)
        flat = flat[: sum(t.numel() for t in tensors) - 1].clone()
        return expect(run, ValueError, flat_name, "elements")
    if how == "alias":
        if tensors[i].numel() == 0:
            return check_pack_valid(data, op, tensors, flat, scale)
        shift = data.draw(st.integers(0, max(flat.numel() - 1, 0)), label="shift")
        tensors[i] = flat.view(-1)[shift : shift + tensors[i].numel()]
        if tensors[i].numel() == 0:
            return check_pack_valid(data, op, tensors, flat, scale)
        return expect(run, ValueError, f"tensors[{i}]", "overlap")
    if how == "scale":
        scale, exc = bad_scalar(data, finite_nonnegative=False)
        if op == "pack":
            return expect(lambda: gops.pack(tensors, flat.dtype, scale), exc, "scale")
        if exc is TypeError:
            fn = gops.pack_ if op == "pack_" else gops.unpack_
            args = (tensors, flat) if op == "pack_" else (flat, tensors)
            return expect(lambda: fn(*args, scale), TypeError, "scale")
        return expect(run, ValueError, "scale", "finite")
    if how == "nonfinite":
        bad, exc, pattern = data.draw(
            st.sampled_from(
                [
                    (torch.zeros(2), ValueError, "one element"),
                    (torch.zeros(1, dtype=torch.int32), TypeError, "float32"),
                    (torch.zeros(1, device="meta"), ValueError, "one device"),
                ]
            )
        )
        return expect(
            lambda: run_pack(data, op, tensors, flat, scale, bad), exc, "nonfinite", pattern
        )
    if how == "not a tensor":
        tensors[i] = data.draw(st.sampled_from([None, 3.0, "x"]))
        return expect(run, (TypeError, RuntimeError), "tensors")
    if how == "pack dtype":
        dtype = data.draw(st.sampled_from(["float16", torch.int32, torch.bool, 16]))
        exc = TypeError
        if isinstance(dtype, torch.dtype):
            return expect(lambda: gops.pack(tensors, dtype), exc, "out", "must be float")
        return expect(lambda: gops.pack(tensors, dtype), exc, "dtype")
    raise AssertionError(how)


# ---- topk_compress / topk_decompress ---------------------------------------------------------

TOPK_MUTATIONS = [
    "valid", "grad", "residual", "shape", "ratio", "index_dtype", "seed", "alias", "meta",
]  # fmt: skip


def topk_call(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=3), label="shape"))
    grad = ints(data, shape, data.draw(st.sampled_from(FLOAT16ISH), label="grad dtype"))
    residual = ints(data, shape, torch.float32)
    ratio = data.draw(st.floats(1e-6, 1.0, exclude_min=False), label="ratio")
    return grad, residual, ratio


@FUZZ
@given(st.data())
def test_fuzz_topk_compress(data):
    calls["topk_compress"] += 1
    grad, residual, ratio = topk_call(data)
    how = data.draw(st.sampled_from(TOPK_MUTATIONS), label="mutation")
    direct = data.draw(st.booleans(), label="through torch.ops")

    def run(g=grad, r=residual, ratio=ratio, sampled=False, index_dtype=torch.int64, seed=0):
        if direct:
            return torch.ops.gradfuse.topk_compress(g, r, ratio, sampled, index_dtype, seed)
        return gops.topk_compress(g, r, ratio, sampled=sampled, index_dtype=index_dtype, seed=seed)

    if how == "valid":
        sampled = data.draw(st.booleans())
        index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
        seed = data.draw(st.integers(-(2**63), 2**63 - 1))
        before = residual.clone()
        values, indices = run(sampled=sampled, index_dtype=index_dtype, seed=seed)
        check_error_feedback(grad, before, residual, values, indices)
        k = expected_k(grad.numel(), ratio)
        assert indices.dtype == index_dtype
        assert (k <= indices.numel() <= 2 * k) if sampled else indices.numel() == k
        calls["valid"] += 1
        return
    if how in ("grad", "residual"):
        spoilt = data.draw(st.sampled_from(["dtype", "noncontiguous", "expanded"]))
        bad, exc, pattern = spoil(data, grad if how == "grad" else residual, spoilt)
        if spoilt == "dtype" and how == "residual":
            pattern = "float32"
        args = (bad, residual) if how == "grad" else (grad, bad)
        if spoilt != "dtype" and bad.shape != grad.shape:
            pattern = ""  # also a shape mismatch; contiguity is checked first
        return expect(lambda: run(*args), exc, how, pattern)
    if how == "shape":
        bad = torch.zeros(grad.numel() + 1)
        return expect(lambda: run(r=bad), ValueError, "residual", "shape")
    if how == "ratio":
        value = data.draw(st.sampled_from([0.0, -0.5, 1.5, 1e300, math.nan, math.inf, "0.1", None]))
        exc = ValueError if isinstance(value, float) else TypeError
        if exc is TypeError and direct:
            exc = (TypeError, RuntimeError)
        return expect(lambda: run(ratio=value), exc, "ratio")
    if how == "index_dtype":
        value = data.draw(st.sampled_from([torch.float32, torch.int16, torch.bool]))
        return expect(lambda: run(index_dtype=value), TypeError, "index_dtype")
    if how == "seed":
        value = data.draw(st.sampled_from([1.5, "1", 2**64, -(2**70)]))
        return expect(
            lambda: gops.topk_compress(grad, residual, ratio, seed=value),
            (TypeError, ValueError),
            "seed",
        )
    if how == "alias":
        if grad.numel() == 0:
            return expect(lambda: run(ratio=-1.0), ValueError, "ratio")
        g = torch.zeros(grad.numel() * 2)
        shift = data.draw(st.integers(0, grad.numel() - 1))
        args = (g[: grad.numel()], g[shift : shift + grad.numel()])
        return expect(lambda: run(*args), ValueError, "grad", "overlap")
    if how == "meta":
        # Data-dependent output: torch refuses meta tensors here, naming the reason.
        bad = torch.empty(grad.shape, dtype=torch.float32, device="meta")
        return expect(lambda: run(r=bad), RuntimeError, "meta")
    raise AssertionError(how)


DECOMPRESS_MUTATIONS = [
    "valid", "values dtype", "indices dtype", "dims", "lengths", "numel", "range", "meta",
]  # fmt: skip


@FUZZ
@given(st.data())
def test_fuzz_topk_decompress(data):
    calls["topk_decompress"] += 1
    numel = data.draw(st.integers(0, 20), label="numel")
    m = data.draw(st.integers(0, 8), label="count") if numel else 0
    vdtype = data.draw(st.sampled_from(PACK_DTYPES), label="values dtype")
    values = ints(data, (m,), vdtype)
    indices = ints(
        data, (m,), data.draw(st.sampled_from([torch.int32, torch.int64])), 0, max(numel, 1)
    )
    how = data.draw(st.sampled_from(DECOMPRESS_MUTATIONS), label="mutation")
    fn = data.draw(st.sampled_from([gops.topk_decompress, torch.ops.gradfuse.topk_decompress]))
    if how == "valid":
        dense = fn(values, indices, numel)
        ref = [0.0] * numel
        for v, i in zip(values.tolist(), indices.tolist()):
            ref[i] += v  # duplicates add up
        assert dense.dtype == vdtype and torch.equal(
            dense.double(), torch.tensor(ref, dtype=torch.float64)
        )
        calls["valid"] += 1
        return
    if how == "values dtype":
        bad = torch.zeros(m, dtype=data.draw(st.sampled_from(NOT_FLOAT)))
        return expect(lambda: fn(bad, indices, numel), TypeError, "values")
    if how == "indices dtype":
        bad = torch.zeros(
            m, dtype=data.draw(st.sampled_from([torch.float32, torch.bool, torch.int16]))
        )
        return expect(lambda: fn(values, bad, numel), TypeError, "indices")
    if how == "dims":
        return expect(lambda: fn(values.view(1, -1), indices, numel), ValueError, "values")
    if how == "lengths":
        return expect(
            lambda: fn(values, torch.zeros(m + 1, dtype=torch.int64), max(numel, 1)),
            ValueError,
            "indices",
        )
    if how == "numel":
        value = data.draw(st.sampled_from([-1, -(2**40), 2**62, 2**63 - 1, 2**64, 2.0, "3"]))
        if not isinstance(value, int) or value >= 2**63:
            return expect(
                lambda: gops.topk_decompress(values, indices, value),
                (TypeError, ValueError),
                "numel",
            )
        return expect(lambda: fn(values, indices, value), ValueError, "numel")
    if how == "range":
        if m == 0:
            return expect(lambda: fn(values, indices, -1), ValueError, "numel")
        bad = indices.clone()
        bad[data.draw(st.integers(0, m - 1))] = data.draw(st.sampled_from([-1, numel, numel + 5]))
        return expect(lambda: fn(values, bad, numel), ValueError, "indices", "must be in")
    if how == "meta":
        bad = torch.zeros(m, dtype=torch.int64, device="meta")
        return expect(lambda: fn(values, bad, numel), ValueError, "indices", "one device")
    raise AssertionError(how)


def test_fuzz_counts():
    """Runs last in this file: every op got its calls, both bad and valid ones."""
    print(dict(calls))
    for op in ["lars_update_", "pack_", "pack", "unpack_", "topk_compress", "topk_decompress"]:
        assert calls[op] >= CALLS_PER_OP, (op, calls[op])
    assert calls["valid"] > 0 and calls["rejected"] > 4 * CALLS_PER_OP
