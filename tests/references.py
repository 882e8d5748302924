"""Float64 references and input helpers shared by the op tests (CPU and CUDA)."""

from __future__ import annotations

import math

import torch

# Default LARS hyper-parameters of the tests (a large trust coefficient so LARS matters).
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02, "eps": 1e-8}

# One unit in the last place at 1.0, per dtype.
ULP = {torch.float64: 2**-52, torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def randn(gen, *shape, dtype=torch.float32, scale=1.0, device="cpu"):
    """Fresh normal data from `gen` (drawn in float64 on the CPU, then converted)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU (the plain difference when ref is 0)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def math_dtype(*dtypes):
    """The ops compute in fp32, or fp64 when either side of a conversion is fp64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def assert_bits_equal(out, ref):
    """out and ref hold the same bits (float64 or float32), on any device; names the first
    difference."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    out, ref = out.cpu().flatten(), ref.cpu().flatten()
    bits = torch.int64 if out.dtype == torch.float64 else torch.int32
    mismatch = (out.view(bits) != ref.view(bits)).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} of {out.numel()} differ, first at {mismatch[0].item()}: "
        f"{out[mismatch[0]].item()!r} != {ref[mismatch[0]].item()!r}"
    )


def as_f32(scale: float) -> float:
    """The scale as the fp32 kernels see it (rounded to float; float64 data uses it as given)."""
    return torch.tensor(scale, dtype=torch.float32).item()


def lars_reference(
    p,
    g,
    v,
    *,
    use_lars=True,
    use_wd=True,
    nesterov=False,
    lr_in_momentum=False,
    grad_scale=1.0,
    **hyper,
):
    """One LARS step in float64 on the CPU; returns (new param, new momentum)."""
    h = {**HYPER, **hyper}
    w, g, v = p.double().cpu(), g.double().cpu() / grad_scale, v.double().cpu()
    wd = h["weight_decay"] if use_wd else 0.0
    wn, gn = w.norm().item(), g.norm().item()
    # Zero norm -> ratio 1; a NaN norm is not zero and poisons the ratio.
    if use_lars and wn != 0 and gn != 0:
        trust = h["trust_coefficient"] * wn / (gn + wd * wn + h["eps"])
    else:
        trust = 1.0
    d = g + wd * w
    step_in, step_out = (h["lr"] * trust, 1.0) if lr_in_momentum else (trust, h["lr"])
    v_new = h["momentum"] * v + step_in * d
    update = h["momentum"] * v_new + step_in * d if nesterov else v_new
    return w - step_out * update, v_new


def expected_k(numel: int, ratio: float) -> int:
    return 0 if numel == 0 else min(numel, max(1, math.ceil(ratio * numel)))


def check_error_feedback(grad, residual_before, residual_after, values, indices):
    """values are (residual + grad) at indices, zeroed there; everything else accumulated.
    Returns the accumulated fp32 values (flat, on the CPU)."""
    acc = (residual_before.cpu() + grad.cpu().float()).flatten()
    idx = indices.cpu().long()
    values, after = values.cpu(), residual_after.cpu().flatten()
    torch.testing.assert_close(values, acc[idx], rtol=0, atol=0, equal_nan=True)
    assert (after[idx] == 0).all()
    keep = torch.ones(acc.numel(), dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(after[keep], acc[keep])
    return acc


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """The ranking key of top-k as int64: |x|'s float32 bits, every NaN one NaN above +inf."""
    bits = x.detach().cpu().float().contiguous().view(torch.int32).long() & 0x7FFFFFFF
    return torch.where(bits > 0x7F800000, torch.full_like(bits, 0x7FC00000), bits)


def topk_reference(acc: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk(|acc|, k)'s set with ties broken towards the lower index (NaN largest), as
    ascending int64 indices on the CPU: a stable descending sort of the exact integer keys."""
    order = torch.sort(magnitude_keys(acc.flatten()), descending=True, stable=True).indices
    return order[:k].sort().values


def decompress_reference(values_per_rank, indices_per_rank, numel, dtype):
    """What topk_decompress returns for the ranks' picks concatenated rank by rank: the ranks'
    values added in rank order, each sum rounded to `dtype` (every rank's indices distinct)."""
    dense = torch.zeros(numel, dtype=dtype)
    for values, indices in zip(values_per_rank, indices_per_rank):
        dense[indices.cpu().long()] += values.cpu().to(dtype)
    return dense


def sample_positions(numel: int, k: int, seed: int) -> list[int]:
    """SamplePlan (cuda/sample_plan.h) in Python: where topk_compress samples."""
    mask = 2**64 - 1
    size = min(numel, max(4096, min(int(64.0 * numel / k), 1 << 17)))
    stratum = numel // size
    out = []
    for j in range(size):
        z = (seed + 0x9E3779B97F4A7C15 * (j + 1)) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append(j * stratum + z % stratum)
    return out
