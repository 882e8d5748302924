"""topk_compress / topk_decompress: exact set, sampled bounds, error feedback, bad input."""

import pytest
import torch
from gradfuse import ops
from references import check_error_feedback, expected_k, randn


@pytest.mark.parametrize("numel", [1, 2, 7, 9, 33, 4097, 100003, 1_000_003])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_exact_mode_selects_the_topk_set(simd, gen, numel, ratio):
    grad = randn(gen, numel)
    residual = randn(gen, numel, scale=0.5)
    before = residual.clone()
    values, indices = ops.topk_compress(grad, residual, ratio, seed=int(gen.initial_seed()))
    k = expected_k(numel, ratio)
    assert values.shape == indices.shape == (k,)
    assert indices.dtype == torch.int64
    assert bool((indices[1:] > indices[:-1]).all())  # ascending, no index twice
    acc = check_error_feedback(grad, before, residual, values, indices)
    # A top-k set: nothing left out is larger than anything selected. (Not torch.topk's exact
    # set: among a million float32 values, two can tie at the k-th magnitude.)
    selected = torch.zeros(numel, dtype=torch.bool)
    selected[indices] = True
    if k < numel:
        assert acc.abs()[selected].min() >= acc.abs()[~selected].max()


@pytest.mark.parametrize("numel", [1, 100, 4097, 100003, 2_000_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_sampled_mode_stays_within_k_and_2k(simd, gen, numel, ratio):
    grad = randn(gen, numel)
    residual = torch.zeros(numel)
    values, indices = ops.topk_compress(grad, residual, ratio, sampled=True)
    k = expected_k(numel, ratio)
    assert k <= indices.numel() <= 2 * k
    acc = check_error_feedback(grad, torch.zeros(numel), residual, values, indices)
    # A top-m set: nothing left out is larger than the smallest selected.
    assert residual.abs().max() <= values.abs().min() if numel > indices.numel() else True
    assert torch.equal(indices, indices.sort().values)
    assert torch.equal(acc[indices], values)


def test_error_feedback_sends_everything_eventually(gen):
    # A constant gradient with magnitudes in [0.5, 1): a coordinate left out keeps growing in
    # the residual until it beats the freshly sent ones, so within 60 steps of 50 every one is
    # sent, and nothing is lost: sum(sent) + residual == steps * grad.
    magnitude = torch.rand(1000, generator=gen) * 0.5 + 0.5
    grad = torch.where(torch.rand(1000, generator=gen) < 0.5, -magnitude, magnitude)
    residual = torch.zeros(1000)
    sent = torch.zeros(1000, dtype=torch.float64)
    for _ in range(60):
        values, indices = ops.topk_compress(grad, residual, 0.05)
        sent += ops.topk_decompress(values.double(), indices, 1000)
    torch.testing.assert_close(sent + residual.double(), 60 * grad.double(), rtol=1e-5, atol=1e-5)
    assert (sent != 0).all()


def test_half_precision_gradients_and_int32_indices(gen):
    for dtype in (torch.float16, torch.bfloat16):
        grad = randn(gen, 5000, dtype=dtype)
        residual = randn(gen, 5000)
        before = residual.clone()
        values, indices = ops.topk_compress(grad, residual, 0.01, index_dtype=torch.int32)
        assert indices.dtype == torch.int32 and values.dtype == torch.float32
        acc = check_error_feedback(grad, before, residual, values, indices)
        assert torch.equal(indices.long(), torch.topk(acc.abs(), 50).indices.sort().values)


def test_nan_and_inf_are_always_selected(simd, gen):
    grad = randn(gen, 10000)
    grad[17], grad[9000], grad[4] = float("nan"), float("inf"), -float("inf")
    residual = torch.zeros(10000)
    values, indices = ops.topk_compress(grad, residual, 0.001)  # k = 10
    assert {4, 17, 9000} <= set(indices.tolist())
    assert values[indices == 17].isnan().all()
    assert not residual.isnan().any() and not residual.isinf().any()


def test_ties_and_zeros(gen):
    # All-zero gradients: any k positions are a valid top-k; exactly k come back, all zero.
    residual = torch.zeros(1000)
    values, indices = ops.topk_compress(torch.zeros(1000), residual, 0.01)
    assert indices.numel() == 10 and (values == 0).all()
    # A few large values over many equal small ones: the large ones are chosen.
    grad = torch.ones(5000)
    grad[[3, 1000, 4999]] = 5.0
    values, indices = ops.topk_compress(grad, torch.zeros(5000), 0.0006)  # k = 3
    assert indices.tolist() == [3, 1000, 4999]


def test_empty_tensor():
    values, indices = ops.topk_compress(torch.empty(0), torch.empty(0), 0.5)
    assert values.numel() == 0 and indices.numel() == 0


def test_huge_tensor_exact(gen):
    n = 25_000_000
    grad = randn(gen, n)
    residual = torch.zeros(n)
    values, indices = ops.topk_compress(grad, residual, 0.001)
    reference = torch.topk(grad.abs(), 25_000).indices.sort().values
    assert torch.equal(indices, reference)
    assert torch.equal(values, grad[indices])


def test_decompress_scatter_adds_duplicates(gen):
    values = randn(gen, 6, dtype=torch.float64)
    indices = torch.tensor([5, 0, 5, 2, 0, 5])
    dense = ops.topk_decompress(values, indices, 8)
    ref = torch.zeros(8, dtype=torch.float64)
    for v, i in zip(values.tolist(), indices.tolist()):
        ref[i] += v
    torch.testing.assert_close(dense, ref, rtol=1e-15, atol=0)
    assert ops.topk_decompress(values[:0], indices[:0], 3).tolist() == [0.0, 0.0, 0.0]


def test_opcheck(gen):
    grad, residual = randn(gen, 1000), torch.zeros(1000)
    torch.library.opcheck(torch.ops.gradfuse.topk_compress, (grad, residual, 0.01))
    torch.library.opcheck(
        torch.ops.gradfuse.topk_compress, (grad, residual, 0.1, True, torch.int32, 3)
    )
    torch.library.opcheck(
        torch.ops.gradfuse.topk_decompress, (randn(gen, 4), torch.tensor([0, 3, 3, 1]), 5)
    )


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got"):
        ops.topk_compress(torch.zeros(10), torch.zeros(10), ratio)


@pytest.mark.parametrize(
    "grad, residual, kwargs, error, message",
    [
        (
            torch.zeros(10),
            torch.zeros(11),
            {},
            ValueError,
            r"residual must have the shape of grad \[10\], got \[11\]",
        ),
        (
            torch.zeros(10),
            torch.zeros(10, dtype=torch.half),
            {},
            TypeError,
            "residual must be Float",
        ),
        (
            torch.zeros(10, dtype=torch.int32),
            torch.zeros(10),
            {},
            TypeError,
            "grad must be float32, float16 or bfloat16, got Int",
        ),
        (torch.zeros(4, 4).t(), torch.zeros(4, 4), {}, ValueError, "grad must be contiguous"),
        (
            torch.zeros(10),
            torch.zeros(10),
            {"index_dtype": torch.int16},
            TypeError,
            "index_dtype must be torch.int32 or torch.int64, got Short",
        ),
    ],
)
def test_compress_bad_input(grad, residual, kwargs, error, message):
    with pytest.raises(error, match=message):
        ops.topk_compress(grad, residual, 0.1, **kwargs)


def test_decompress_bad_input():
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\), got values from 0 to 4"):
        ops.topk_decompress(torch.ones(2), torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\), got values from -1"):
        ops.topk_decompress(torch.ones(2), torch.tensor([-1, 2]), 4)
    with pytest.raises(ValueError, match="indices must have as many elements as values"):
        ops.topk_decompress(torch.ones(2), torch.tensor([1]), 4)
    with pytest.raises(TypeError, match="indices must be int32 or int64, got Float"):
        ops.topk_decompress(torch.ones(2), torch.ones(2), 4)
    with pytest.raises(ValueError, match="numel must be >= 0, got -1"):
        ops.topk_decompress(torch.ones(0), torch.ones(0, dtype=torch.long), -1)
