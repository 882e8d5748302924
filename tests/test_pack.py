"""pack_ / unpack_ against float64 references: conversion, scale, one rounding, flags."""

import math

import pytest
import torch
from conftest import AWKWARD_SIZES
from gradfuse import ops
from gradfuse.bench.shapes import resnet50_shapes
from references import ULP, as_f32, assert_bits_equal, math_dtype, randn

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_matches(out, ref, *dtypes):
    if torch.float64 in dtypes:
        # fp64 -> 16-bit may round through fp32 in torch's reference conversion: 1 ulp slack.
        torch.testing.assert_close(out, ref, rtol=ULP[out.dtype], atol=0)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_pack_converts_and_rounds_once(simd, gen, src, dst):
    tensors = [randn(gen, n, dtype=src) for n in AWKWARD_SIZES] + [randn(gen, 3, 5, dtype=src)]
    total = sum(t.numel() for t in tensors)
    out = torch.full((total + 3,), 7.0, dtype=dst)  # poisoned, with a tail that must survive
    flag = torch.zeros(1)
    scale = as_f32(0.37)
    ops.pack_(tensors, out, scale, flag)
    math = math_dtype(src, dst)
    ref = torch.cat([t.to(math).flatten() * scale for t in tensors]).to(dst)
    assert_matches(out[:total], ref, src, dst)
    assert torch.equal(out[total:], torch.full((3,), 7.0, dtype=dst))
    assert flag.item() == 0.0


@pytest.mark.parametrize("dst", [torch.float16, torch.bfloat16])
def test_pack_rounds_to_nearest_even(simd, dst):
    # Exactly halfway between two representable values: ties go to the even mantissa.
    one_ulp = 2.0**-10 if dst == torch.float16 else 2.0**-7
    x = torch.tensor([1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2)] * 3)
    out = torch.empty(x.numel(), dtype=dst)
    ops.pack_([x], out)
    assert torch.equal(out, x.to(dst))  # torch's own conversion is round-to-nearest-even


def test_fp16_overflow_is_reported(simd, gen):
    x = randn(gen, 1001)
    out = torch.empty(1001, dtype=torch.float16)
    flag = torch.zeros(1)
    ops.pack_([x], out, 1.0, flag)
    assert flag.item() == 0.0
    x[500] = 65519.0  # rounds down to 65504: still finite
    ops.pack_([x], out, 1.0, flag)
    assert flag.item() == 0.0 and out[500].item() == 65504.0
    x[999] = 65520.0  # rounds to inf
    ops.pack_([x], out, 1.0, flag)
    assert flag.item() == 1.0 and out[999].isinf()
    flag.zero_()
    ops.pack_([x * 0.5], out, 1.0, flag)  # scaling first keeps it finite
    assert flag.item() == 0.0
    ops.pack_([x], out, 1.0, flag)
    ops.pack_([x * 0.5], out, 1.0, flag)
    assert flag.item() == 1.0  # the flag is sticky: only set, never cleared


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_are_reported_and_kept(simd, gen, bad):
    for dst in (torch.float32, torch.bfloat16):
        x = randn(gen, 37)
        x[36] = bad
        out = torch.empty(37, dtype=dst)
        flag = torch.zeros(1)
        ops.pack_([x], out, 2.0, flag)
        assert flag.item() == 1.0
        assert torch.equal(out[36].isnan(), torch.tensor(math.isnan(bad)))


@pytest.mark.parametrize("flat_dtype", FLOATS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_inverts_pack(simd, gen, flat_dtype, accumulate):
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    tensors = [randn(gen, n, dtype=dtypes[i % 4]) for i, n in enumerate(AWKWARD_SIZES)]
    flat = randn(gen, sum(t.numel() for t in tensors) + 5, dtype=flat_dtype)
    before = [t.clone() for t in tensors]
    scale = as_f32(0.3)
    ops.unpack_(flat, tensors, scale, accumulate)
    offset = 0
    for t, b in zip(tensors, before):
        math = math_dtype(t.dtype, flat_dtype)
        part = flat[offset : offset + t.numel()].to(math) * scale
        ref = (b.to(math) + part if accumulate else part).to(t.dtype)
        offset += t.numel()
        assert_matches(t, ref, t.dtype, flat_dtype)


# Scales a float cannot hold exactly (1/size for 3 ranks, a postscale, their product as the
# engine forms it for Average): a float64 tensor scaled through a float would be off by up
# to ~3e-8 relative, where float64 arithmetic is exact to the last bit.
F64_SCALES = [1 / 3, 1 / 7, 0.1, (1 / 7) * (1 / 3)]
# Around the 8-lane vectors and the 64K-element chunks.
F64_SIZES = [0, 1, 3, 4, 5, 7, 33, 4097, 65537]


def misaligned(t):
    """A contiguous copy of t that starts one element into its storage."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = base[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("scale", F64_SCALES)
@pytest.mark.parametrize(
    "src, dst",
    [
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_pack_scales_float64_in_double(simd, gen, scale, src, dst):
    tensors = [randn(gen, n, dtype=src) for n in F64_SIZES] + [
        misaligned(randn(gen, 5, 7, dtype=src))
    ]
    total = sum(t.numel() for t in tensors)
    # A misaligned output with a poisoned tail.
    out = misaligned(torch.full((total + 3,), float("nan"), dtype=dst))
    flag = torch.zeros(1)
    ops.pack_(tensors, out, scale, flag)
    # The exact double product, rounded once to the output dtype.
    ref = torch.cat([t.double().flatten() * scale for t in tensors]).to(dst)
    assert_bits_equal(out[:total], ref)
    assert out[total:].isnan().all()
    assert flag.item() == 0.0


@pytest.mark.parametrize("scale", F64_SCALES)
@pytest.mark.parametrize("flat_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_unpack_scales_float64_in_double(simd, gen, scale, flat_dtype, accumulate):
    sizes = [*F64_SIZES, 35]
    flat = misaligned(randn(gen, sum(sizes) + 5, dtype=flat_dtype))
    if accumulate:
        tensors = [randn(gen, n, dtype=torch.float64) for n in sizes]
    else:
        tensors = [torch.full((n,), float("nan"), dtype=torch.float64) for n in sizes]  # poisoned
    tensors[-1] = misaligned(tensors[-1].view(5, 7))
    before = [t.clone() for t in tensors]
    ops.unpack_(flat, tensors, scale, accumulate)
    offset = 0
    for t, b in zip(tensors, before):
        # Product rounded, then the sum rounded: the same two roundings as torch's b + x * s.
        part = flat[offset : offset + t.numel()].double().view(t.shape) * scale
        assert_bits_equal(t, b + part if accumulate else part)
        offset += t.numel()


def test_float32_keeps_its_float_scale(simd, gen):
    # fp32 data is scaled as before: the scale rounded to float, the product in fp32.
    x, y = randn(gen, 4097), randn(gen, 4097)
    out = torch.full((4097,), float("nan"))
    ops.pack_([x], out, 1 / 3)
    assert_bits_equal(out, x * as_f32(1 / 3))
    expected = out + y * as_f32(0.1)
    ops.unpack_(y, [out], 0.1, True)
    assert_bits_equal(out, expected)


def test_resnet50_gradients_round_trip_through_fp16(gen):
    grads = [randn(gen, *s, scale=1e-2) for s in resnet50_shapes()]
    flat, flag = ops.pack(grads, torch.float16, scale=4.0)
    assert flat.numel() == 25_557_032 and flag.item() == 0.0
    restored = [torch.full_like(g, float("nan")) for g in grads]
    ops.unpack_(flat, restored, 0.25)
    for g, r in zip(grads, restored):
        assert torch.equal(r, (g * 4.0).half().float() * 0.25)  # exact: powers of two


def test_one_huge_tensor(gen):
    x = randn(gen, 25_000_001)
    flat, flag = ops.pack([x], torch.bfloat16)
    assert torch.equal(flat, x.to(torch.bfloat16)) and flag.item() == 0.0


def test_empty_list_and_empty_tensors():
    out = torch.full((4,), 3.0)
    ops.pack_([], out)
    ops.pack_([torch.empty(0), torch.empty(0, 5)], out)
    assert torch.equal(out, torch.full((4,), 3.0))
    ops.unpack_(out, [torch.empty(0)])


def test_opcheck(gen):
    tensors = [randn(gen, 3), randn(gen, 4, 2, dtype=torch.float16)]
    out = torch.empty(11, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.gradfuse.pack_, (tensors, out, 2.0, torch.zeros(1)))
    torch.library.opcheck(torch.ops.gradfuse.unpack_, (out, tensors, 2.0, True, torch.zeros(1)))


@pytest.mark.parametrize(
    "tensors, out, error, message",
    [
        ([torch.zeros(5)], torch.zeros(4), ValueError, "out has 4 elements but the tensors hold 5"),
        (
            [torch.zeros(2, dtype=torch.int32)],
            torch.zeros(4),
            TypeError,
            r"tensors\[0\] must be float32, float16, bfloat16 or float64, got Int",
        ),
        (
            [torch.zeros(2)],
            torch.zeros(4, dtype=torch.int64),
            TypeError,
            "out must be float32, float16, bfloat16 or float64, got Long",
        ),
        (
            [torch.zeros(1), torch.zeros(4, 2).t()],
            torch.zeros(10),
            ValueError,
            r"tensors\[1\] must be contiguous",
        ),
        ([torch.zeros(2)], torch.zeros(8)[::2], ValueError, "out must be contiguous"),
    ],
)
def test_pack_bad_input(tensors, out, error, message):
    with pytest.raises(error, match=message):
        ops.pack_(tensors, out)


def test_bad_flag_and_unpack_messages():
    with pytest.raises(ValueError, match="nonfinite must have exactly one element"):
        ops.pack_([torch.zeros(2)], torch.zeros(2), 1.0, torch.zeros(2))
    with pytest.raises(TypeError, match="nonfinite must be Float"):
        ops.pack_([torch.zeros(2)], torch.zeros(2), 1.0, torch.zeros(1, dtype=torch.half))
    with pytest.raises(ValueError, match="unpack_: flat has 1 elements but the tensors hold 2"):
        ops.unpack_(torch.zeros(1), [torch.zeros(2)])
    with pytest.raises(ValueError, match="pack: tensors must not be empty"):
        ops.pack([])


def at_offset(t, k):
    """A contiguous copy of t starting k elements into its storage (k > 0: off 16-byte
    alignment for every k the vector width does not divide)."""
    base = torch.full((t.numel() + k,), float("nan"), dtype=t.dtype)
    view = base[k:].view(t.shape)
    view.copy_(t)
    return view


# Every size class around the 8-lane vectors and 4096-element norm blocks, and many tiny ones.
SIZE_CLASSES = [0, 1, 7, 8, 9, 1023, 4097] + [1, 2, 3, 5] * 12


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_offset", [0, 1, 4, 7])
@pytest.mark.parametrize("out_offset", [0, 2, 5, 7])
def test_any_alignment_is_bitwise_torch_rounding(simd, gen, low, in_offset, out_offset):
    # fp32 -> fp16/bf16 and back at every alignment of the inputs and outputs: the vector body
    # and the scalar tail write what torch's .to() writes, and nothing past the end.
    tensors = [at_offset(randn(gen, n, scale=100.0), in_offset) for n in SIZE_CLASSES]
    total = sum(t.numel() for t in tensors)
    out = at_offset(torch.full((total + 9,), 7.0, dtype=low), out_offset)  # poisoned, a tail
    flag = torch.zeros(1)
    ops.pack_(tensors, out, 1.0, flag)
    ref = torch.cat([t.flatten() for t in tensors])
    assert torch.equal(out[:total], ref.to(low))
    assert torch.equal(out[total:], torch.full((9,), 7.0, dtype=low))
    assert flag.item() == 0.0
    # The float64 view of the same: each value within half an ulp of the exact one.
    err = (out[:total].double() - ref.double()).abs()
    assert (err <= ref.double().abs() * ULP[low] / 2 + torch.finfo(low).tiny).all()

    back = [at_offset(torch.full_like(t, float("nan")), out_offset) for t in tensors]
    sq = torch.full((len(back),), float("nan"), dtype=torch.float64)
    ops.unpack_(out, back, 1.0, False, flag, sq)
    assert torch.equal(torch.cat([b.flatten() for b in back]), out[:total].float())
    assert torch.equal(sq, ops.sum_squares(back)) and flag.item() == 0.0


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 3])
def test_specials_at_any_lane_are_kept_and_flagged(simd, low, offset):
    # NaN, +-inf, fp16 overflow (65520 rounds to inf), signed zero and values that underflow,
    # in the vector body and in the tail.
    specials = [float("nan"), float("inf"), -float("inf"), 65520.0, -0.0, 1e-9, 65519.0, -3e38]
    x = torch.tensor(specials * 3 + [1.5] * 5)  # 29 elements: 3 vectors and a tail of 5
    for i in range(x.numel()):
        clean = x.clone()
        clean[:] = 1.0
        clean[i] = x[i]
        src = at_offset(clean, offset)
        out = at_offset(torch.empty(x.numel(), dtype=low), offset)
        flag = torch.zeros(1)
        ops.pack_([src], out, 1.0, flag)
        expected = clean.to(low)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        assert flag.item() == float(not expected.isfinite().all()), (i, clean[i])
