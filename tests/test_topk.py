"""topk_compress / topk_decompress: exact set, sampled bounds, error feedback, bad input."""

import os
import subprocess
import sys

import pytest
import torch
from gradfuse import ops
from references import (
    assert_bits_equal,
    check_error_feedback,
    decompress_reference,
    expected_k,
    magnitude_keys,
    randn,
    sample_positions,
    topk_reference,
)


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
    assert torch.equal(indices, topk_reference(acc, k))


@pytest.mark.parametrize("numel", [1, 100, 4097, 100003, 2_000_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_sampled_mode_stays_within_k_and_2k(simd, gen, numel, ratio):
    grad = randn(gen, numel)
    residual = torch.zeros(numel)
    values, indices = ops.topk_compress(grad, residual, ratio, sampled=True)
    k = expected_k(numel, ratio)
    assert k <= indices.numel() <= 2 * k
    acc = check_error_feedback(grad, torch.zeros(numel), residual, values, indices)
    assert_sampled_set(acc, indices, k)


def assert_sampled_set(acc, indices, k):
    """Sampled mode's set: the exact top-k, or every element at or above a threshold (all its
    ties included) when that is between k and 2k elements."""
    if indices.numel() == k:
        assert torch.equal(indices, topk_reference(acc, k))
    else:
        keys = magnitude_keys(acc)
        at_least = (keys >= keys[indices].min()).nonzero().flatten()
        assert torch.equal(indices, at_least)


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
    # All-zero gradients: ties go to the lowest indices.
    residual = torch.zeros(1000)
    values, indices = ops.topk_compress(torch.zeros(1000), residual, 0.01)
    assert indices.tolist() == list(range(10)) and (values == 0).all()
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
    assert torch.equal(indices, topk_reference(grad, 25_000))
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


# ---- sparse gradients and the planted paths of the selection --------------------------------


def sparse_grad(gen, numel, density, dtype=torch.float32):
    """A gradient with about `density` of its entries non-zero (random places and values)."""
    grad = torch.zeros(numel, dtype=dtype)
    nnz = max(1, int(numel * density))
    grad[torch.randperm(numel, generator=gen)[:nnz]] = randn(gen, nnz, dtype=dtype)
    return grad


@pytest.mark.parametrize("numel", [1, 9, 4097, 100003, 2_000_003])
@pytest.mark.parametrize("ratio", [0.0003, 0.001, 0.01])
@pytest.mark.parametrize("sampled", [False, True])
def test_sparse_gradient_selects_torch_topk_set(gen, numel, ratio, sampled):
    # 0.1% non-zeros: the sampled threshold is 0, and the set is the non-zeros (all of them when
    # fewer than k, then the lowest-index zeros; the largest of them when more than k).
    grad = sparse_grad(gen, numel, 0.001)
    residual = torch.zeros(numel)
    values, indices = ops.topk_compress(grad, residual, ratio, sampled=sampled, seed=5)
    acc = check_error_feedback(grad, torch.zeros(numel), residual, values, indices)
    k = expected_k(numel, ratio)
    if sampled:
        assert k <= indices.numel() <= 2 * k
        assert_sampled_set(acc, indices, k)
    else:
        assert torch.equal(indices, topk_reference(acc, k))


def test_threshold_above_the_kth_falls_back_to_every_element():
    # Large values exactly at the sampled positions, ones elsewhere: fewer than k pass the
    # threshold, so the k-th largest is found by a radix select over every element.
    n, ratio, seed = 100_000, 0.5, 3
    k = expected_k(n, ratio)
    grad = torch.ones(n)
    grad[sample_positions(n, k, seed)] = 10.0
    for sampled in (False, True):
        residual = torch.zeros(n)
        values, indices = ops.topk_compress(grad, residual, ratio, sampled=sampled, seed=seed)
        assert torch.equal(indices, topk_reference(grad, k))
        check_error_feedback(grad, torch.zeros(n), residual, values, indices)


def test_more_candidates_than_room_falls_back_to_every_element(gen):
    # The sample sees only zeros, the rest is noise well above 0: every element passes the
    # threshold, far more than the candidate buffer holds.
    n, ratio, seed = 1_000_000, 0.001, 11
    k = expected_k(n, ratio)
    grad = randn(gen, n)
    grad[sample_positions(n, k, seed)] = 0.0
    residual = torch.zeros(n)
    values, indices = ops.topk_compress(grad, residual, ratio, seed=seed)
    assert torch.equal(indices, topk_reference(grad, k))
    check_error_feedback(grad, torch.zeros(n), residual, values, indices)


def test_nan_and_inf_in_a_sparse_gradient(gen):
    grad = sparse_grad(gen, 100_003, 0.001)
    grad[[5, 70_000]] = float("nan")
    grad[[6, 99_999]] = torch.tensor([float("inf"), -float("inf")])
    residual = torch.zeros(100_003)
    values, indices = ops.topk_compress(grad, residual, 0.01)
    acc = check_error_feedback(grad, torch.zeros(100_003), residual, values, indices)
    assert torch.equal(indices, topk_reference(acc, 1001))
    assert {5, 6, 70_000, 99_999} <= set(indices.tolist())


def test_sparse_gradient_extra_memory_is_o_k(tmp_path):
    # 25M elements with 0.1% non-zeros at 1% density: the candidate list at threshold 0 would
    # be every element (200 MB of indices); the selection keeps O(k) instead. Measured as the
    # peak resident memory of a fresh process around the call.
    script = tmp_path / "peak.py"
    script.write_text(
        "import resource, torch\n"
        "from gradfuse import ops\n"
        "n = 25_000_000\n"
        # No temporaries of n elements: they would raise the peak before the call.
        "g = torch.zeros(n); g[torch.randint(0, n, (n // 1000,))] = 1.0 + torch.rand(n // 1000)\n"
        "r = torch.zeros(n)\n"
        "ops.topk_compress(g[:1000], r[:1000].clone(), 0.01)\n"  # warm-up: lazy allocations
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "v, i = ops.topk_compress(g, r, 0.01)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert i.numel() == 250_000 and bool((g[i] != 0).sum() > 0)\n"
        "print((after - before) * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.split()[-1])
    # k = 250,000: values + indices + candidates ~ 6 MB; every element would be 200 MB.
    assert extra < 40 * 2**20, f"{extra / 2**20:.0f} MiB above the inputs"


# ---- decompress: deterministic, in rank order ------------------------------------------------


def ranks_picks(gen, ranks, numel, k, dtype=torch.float32, overlap=True):
    """Each rank's (values, ascending distinct indices); with overlap, all ranks pick from the
    same 2k positions, so most indices arrive from several ranks."""
    pool = torch.randperm(numel, generator=gen)[: 2 * k] if overlap else None
    values, indices = [], []
    for _ in range(ranks):
        src = pool if overlap else torch.arange(numel)
        pick = src[torch.randperm(src.numel(), generator=gen)[:k]].sort().values
        indices.append(pick)
        values.append(randn(gen, k, dtype=dtype, scale=100.0))
    return values, indices


def test_decompress_8way_duplicates_bitwise_repeatable(gen):
    # 8 ranks pick the same 1000 positions: every index arrives 8 times with values of mixed
    # signs and magnitudes, where the order of the additions shows in the low bits.
    numel, k = 100_003, 1000
    pool = torch.randperm(numel, generator=gen)[:k].sort().values
    values = [randn(gen, k, scale=10.0 ** (r % 4)) for r in range(8)]
    flat_v, flat_i = torch.cat(values), pool.repeat(8)
    first = ops.topk_decompress(flat_v, flat_i, numel)
    for _ in range(20):
        assert_bits_equal(ops.topk_decompress(flat_v, flat_i, numel), first)
    assert_bits_equal(first, decompress_reference(values, [pool] * 8, numel, torch.float32))
    exact = decompress_reference(values, [pool] * 8, numel, torch.float64)
    torch.testing.assert_close(first.double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "numel, k", [(1, 1), (7, 3), (33, 33), (100_003, 997), (4_000_037, 40_000)]
)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_decompress_sums_ranks_in_order(gen, dtype, numel, k, index_dtype):
    values, indices = ranks_picks(gen, 4, numel, k, dtype=dtype, overlap=k * 2 <= numel)
    indices = [i.to(index_dtype) for i in indices]
    dense = ops.topk_decompress(torch.cat(values), torch.cat(indices), numel)
    assert dense.dtype == dtype and dense.shape == (numel,)
    assert_bits_equal(dense.double(), decompress_reference(values, indices, numel, dtype).double())


def test_decompress_nan_inf_and_unsorted_indices(gen):
    values = torch.tensor([1.0, float("nan"), 2.0, float("inf"), -float("inf"), 3.0])
    indices = torch.tensor([4, 2, 4, 0, 0, 1])
    dense = ops.topk_decompress(values, indices, 6)
    assert dense[4] == 3.0 and dense[2].isnan() and dense[0].isnan() and dense[1] == 3.0
    assert (dense[[3, 5]] == 0).all()
    # Unsorted, repeated within one "rank": still summed in the order given.
    v = randn(gen, 5000, scale=1e3)
    i = torch.randint(0, 50, (5000,), generator=gen)
    ref = torch.zeros(50)
    for value, index in zip(v.tolist(), i.tolist()):
        ref[index] = (ref[index] + torch.tensor(value)).item()
    assert_bits_equal(ops.topk_decompress(v, i, 50), ref)


def test_many_small_tensors_and_chunk_edges(gen):
    # Random small sizes, and sizes around the CPU's 2**18-element chunks.
    sizes = torch.randint(1, 5000, (60,), generator=gen).tolist() + [2**18 - 1, 2**18 + 1]
    for numel in sizes:
        ratio = float(torch.empty(()).uniform_(0.0005, 0.3, generator=gen))
        for sampled in (False, True):
            grad = randn(gen, numel)
            residual = randn(gen, numel, scale=0.5)
            before = residual.clone()
            values, indices = ops.topk_compress(grad, residual, ratio, sampled=sampled)
            acc = check_error_feedback(grad, before, residual, values, indices)
            k = expected_k(numel, ratio)
            if sampled:
                assert k <= indices.numel() <= 2 * k
                assert_sampled_set(acc, indices, k)
            else:
                assert torch.equal(indices, topk_reference(acc, k)), (numel, ratio)
