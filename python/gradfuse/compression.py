"""Gradient compression for DistributedOptimizer (Horovod's ``Compression`` names).

- ``Compression.none``: gradients travel as they are.
- ``Compression.fp16`` / ``Compression.bf16``: gradients travel as 16-bit floats. The cast is
  the fused ``pack_`` kernel with the pre-scale applied in fp32 *before* rounding (so a sum of
  many ranks' fp16 gradients does not overflow where the averaged value would not), and the
  way back is ``unpack_`` with the post-scale.
- ``Compression.topk(ratio, ...)``: Deep Gradient Compression (Lin et al., 2018): top-k
  sparsification with error feedback, momentum correction and momentum factor masking, and a
  sparsity warm-up; values and indices are exchanged with allgather and decompressed by
  scatter-add (see :class:`TopKCompressor`).
"""

from __future__ import annotations

import math

import torch

from . import ops


class NoneCompressor:
    """Identity: the gradient itself is reduced."""

    name = "none"
    wire_dtype = None


class _CastCompressor:
    """Reduce in a 16-bit float dtype; compress/decompress fuse the scaling into the cast."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.wire_dtype = dtype

    def compress(self, tensor: torch.Tensor, prescale: float) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise TypeError(
                f"Compression.{self.name}: gradients must be floating point, got {tensor.dtype}"
            )
        wire = torch.empty(tensor.shape, dtype=self.wire_dtype, device=tensor.device)
        ops.pack_([tensor.contiguous()], wire, prescale)
        return wire

    def decompress(self, wire: torch.Tensor, out: torch.Tensor, postscale: float) -> None:
        if out.is_contiguous():
            ops.unpack_(wire, [out], postscale)
        else:
            tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
            ops.unpack_(wire, [tmp], postscale)
            out.copy_(tmp)

    def __repr__(self):
        return f"Compression.{self.name}"


class TopKCompressor:
    """Deep Gradient Compression settings; the per-parameter state lives in the optimizer.

    Args:
        ratio: final density (fraction of each gradient sent), in (0, 1].
        warmup_steps: steps of sparsity warm-up; the density falls geometrically from
            ``warmup_density`` to ``ratio`` over them (DGC's 75% -> 99.9% sparsity schedule).
        warmup_density: the density at step 0.
        sampled: use the sampled-threshold selection (between k and 2k values) instead of the
            exact top-k.
        momentum: the momentum of momentum correction (``u = m*u + g; v += u``; the velocity
            ``v`` is what is compressed). 0 disables momentum correction; with it on, wrap a
            momentum-free optimizer (plain SGD), since the momentum is applied here.
        min_numel: tensors smaller than this are sent dense (biases, norms).
    """

    name = "topk"
    wire_dtype = None

    def __init__(
        self,
        ratio: float,
        warmup_steps: int = 0,
        warmup_density: float = 0.25,
        sampled: bool = True,
        momentum: float = 0.0,
        min_numel: int = 1024,
    ):
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ValueError(f"Compression.topk: ratio must be in (0, 1], got {ratio!r}")
        if warmup_steps < 0:
            raise ValueError(f"Compression.topk: warmup_steps must be >= 0, got {warmup_steps}")
        if not 0 < warmup_density <= 1:
            raise ValueError(
                f"Compression.topk: warmup_density must be in (0, 1], got {warmup_density}"
            )
        if not 0 <= momentum < 1:
            raise ValueError(f"Compression.topk: momentum must be in [0, 1), got {momentum}")
        self.ratio = float(ratio)
        self.warmup_steps = int(warmup_steps)
        self.warmup_density = max(float(warmup_density), self.ratio)
        self.sampled = bool(sampled)
        self.momentum = float(momentum)
        self.min_numel = int(min_numel)

    def density(self, step: int) -> float:
        """The density at optimizer step ``step`` (0-based)."""
        if step >= self.warmup_steps:
            return self.ratio
        fraction = step / self.warmup_steps
        return math.exp(
            math.log(self.warmup_density) * (1 - fraction) + math.log(self.ratio) * fraction
        )

    def __repr__(self):
        return (
            f"Compression.topk(ratio={self.ratio}, warmup_steps={self.warmup_steps}, "
            f"sampled={self.sampled}, momentum={self.momentum})"
        )


class Compression:
    """Horovod-compatible namespace: ``Compression.none``, ``.fp16``, ``.bf16``, ``.topk()``."""

    none = NoneCompressor()
    fp16 = _CastCompressor("fp16", torch.float16)
    bf16 = _CastCompressor("bf16", torch.bfloat16)
    topk = TopKCompressor


__all__ = ["Compression", "TopKCompressor"]
