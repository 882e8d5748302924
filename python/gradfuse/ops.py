"""Typed wrappers over the fused custom ops ``torch.ops.gradfuse.*``.

Every op runs on CPU tensors and, in a CUDA build, on CUDA tensors; all tensors of one call
must be on one device and contiguous. Bad input raises with a message that names the argument.

- :func:`lars_update_` — one fused LARS-with-momentum step for a whole list of parameters.
- :func:`pack_` / :func:`unpack_` — many tensors to one flat buffer and back, with dtype
  conversion and a scale applied in fp32 (fp64 when float64 is involved) and rounded once;
  reports non-finite results.
- :func:`topk_compress` / :func:`topk_decompress` — top-k sparsification with error feedback.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from . import (
    _build,  # noqa: F401  (loads the extension, which registers the ops)
    _fake,  # noqa: F401  (fake implementations for torch.compile / opcheck)
)

_ops = torch.ops.gradfuse


# The wrappers convert Python scalars themselves, so a wrong type is a TypeError naming the
# argument rather than float()'s or the dispatcher's message.
def _float(op, arg, value):
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{op}: {arg} must be a number, got {value!r}")


def _int(op, arg, value):
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {arg} must be an int, got {value!r}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{op}: {arg} must fit in 64 bits, got {value}")
    return value


def _flags(op, arg, values, n):
    if values is None:
        return [True] * n
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{op}: {arg} must be a sequence of bools, one per param, got {values!r}")
    return [bool(x) for x in values]


def _tensor_list(op, arg, tensors):
    if isinstance(tensors, torch.Tensor) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{op}: {arg} must be a sequence of tensors, got {type(tensors)}")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {arg}[{i}] must be a tensor, got {type(t)}")
    return tensors


def lars_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_bufs: Sequence[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    nesterov: bool = False,
    lr_in_momentum: bool = False,
    use_lars: Sequence[bool] | None = None,
    use_weight_decay: Sequence[bool] | None = None,
    model_copies: Sequence[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """One fused LARS step over every tensor in ``params`` (updated in place).

    Per tensor, with ``g = grad / grad_scale`` and ``wd = weight_decay`` (0 where
    ``use_weight_decay[i]`` is False)::

        trust = trust_coefficient * ||w|| / (||g|| + wd * ||w|| + eps)
                (1 when use_lars[i] is False or either norm is 0)
        d = g + wd * w
        lr_in_momentum=False (default, torch-SGD style):  v = m*v + trust*d;     w -= lr * v
        lr_in_momentum=True  (You et al., 2017):          v = m*v + lr*trust*d;  w -= v

    ``nesterov`` steps with ``m*v + (lr*)trust*d`` instead of ``v``. ``params`` and
    ``momentum_bufs`` are fp32 master weights (or all fp16/bf16); ``grads`` may be fp32, fp16 or
    bf16. ``model_copies`` (optional, e.g. the fp16 model) receive the new weights rounded once,
    in the same pass. ``found_inf`` (a one-element float32 tensor, as GradScaler keeps) skips the
    whole update when non-zero, checked on the device.

    Example::

        gradfuse.ops.lars_update_(params, grads, bufs, lr=0.1, weight_decay=5e-5,
                                  use_lars=[p.ndim > 1 for p in params])
    """
    op = "lars_update_"
    _ops.lars_update_(
        *_lars_tensors(op, params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay),
        *_lars_hyper(
            op, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum
        ),
        grad_scale,
        found_inf,
    )


def _lars_tensors(op, params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay):
    """The tensor lists and per-tensor flags both LARS ops take, checked and in schema order."""
    params = _tensor_list(op, "params", params)
    n = len(params)
    return (
        params,
        _tensor_list(op, "grads", grads),
        _tensor_list(op, "momentum_bufs", momentum_bufs),
        _tensor_list(op, "model_copies", model_copies or []),
        _flags(op, "use_lars", use_lars, n),
        _flags(op, "use_weight_decay", use_weight_decay, n),
    )


def _lars_hyper(op, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum):
    """The hyper-parameters both LARS ops take, checked and in schema order."""
    return (
        _float(op, "lr", lr),
        _float(op, "momentum", momentum),
        _float(op, "weight_decay", weight_decay),
        _float(op, "trust_coefficient", trust_coefficient),
        _float(op, "eps", eps),
        bool(nesterov),
        bool(lr_in_momentum),
    )


def lars_update_from_norms_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_bufs: Sequence[torch.Tensor],
    grad_sq_norms: torch.Tensor,
    param_sq_norms: torch.Tensor,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    nesterov: bool = False,
    lr_in_momentum: bool = False,
    use_lars: Sequence[bool] | None = None,
    use_weight_decay: Sequence[bool] | None = None,
    model_copies: Sequence[torch.Tensor] | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """:func:`lars_update_` in one pass, from squared norms computed elsewhere.

    ``grad_sq_norms[i]`` is ``||grads[i]||^2`` (before ``grad_scale``; e.g. from
    :func:`unpack_`'s ``sq_norms``) and ``param_sq_norms[i]`` is ``||params[i]||^2``; both are
    float64, one element per param, on the params' device. Each element is then read and
    written once (20 bytes per fp32 parameter), and ``param_sq_norms`` is overwritten with the
    new parameters' squared norms, taken while they are written: the next step's input. With
    the norms :func:`lars_update_` would compute, the result is bitwise the same (on the CPU and
    on CUDA alike; given the same norms, the two devices' updates are bitwise equal too).
    """
    op = "lars_update_from_norms_"
    _ops.lars_update_from_norms_(
        *_lars_tensors(op, params, grads, momentum_bufs, model_copies, use_lars, use_weight_decay),
        grad_sq_norms,
        param_sq_norms,
        *_lars_hyper(
            op, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, lr_in_momentum
        ),
        grad_scale,
        found_inf,
    )


def sum_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum of squares, as a float64 tensor of one element per tensor (on their
    device), in one pass over all of them. Partial sums per fixed-size chunk are added in chunk
    order, so the bits depend only on the values (not on threads, timing or alignment), and
    they equal the norms :func:`unpack_` (``sq_norms``) and :func:`lars_update_from_norms_` take
    in passing on the same device (the CPU and CUDA sum in different orders: ~1e-7 apart)."""
    tensors = _tensor_list("sum_squares", "tensors", tensors)
    if not tensors:  # no tensor to dispatch on
        return torch.empty(0, dtype=torch.float64)
    return _ops.sum_squares(tensors)


def pack_(
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor,
    scale: float = 1.0,
    nonfinite: torch.Tensor | None = None,
) -> None:
    """Write ``tensors`` back to back into the flat buffer ``out``: ``round(scale * t)``.

    Conversion between float32/float16/bfloat16/float64 happens on the fly with one rounding
    (to nearest even). ``out`` may be longer than needed; elements past the total are left
    untouched. ``nonfinite`` (one-element float32) is set to 1 when any written value is inf
    or NaN, e.g. fp16 overflow above 65504; it is never cleared.

    Example::

        flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.float16)
        gradfuse.ops.pack_(grads, flat, scale=1 / world_size)
    """
    _ops.pack_(
        _tensor_list("pack_", "tensors", tensors), out, _float("pack_", "scale", scale), nonfinite
    )


def pack(
    tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate a flat buffer of ``dtype`` (default: the first tensor's) and :func:`pack_`
    into it. Returns ``(flat, nonfinite)`` where ``nonfinite`` is a one-element float32 flag."""
    tensors = _tensor_list("pack", "tensors", tensors)
    if not tensors:
        raise ValueError("pack: tensors must not be empty (the buffer's device comes from them)")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"pack: dtype must be a torch.dtype or None, got {dtype!r}")
    first = tensors[0]
    flat = torch.empty(
        sum(t.numel() for t in tensors), dtype=dtype or first.dtype, device=first.device
    )
    nonfinite = torch.zeros(1, dtype=torch.float32, device=first.device)
    pack_(tensors, flat, scale, nonfinite)
    return flat, nonfinite


def unpack_(
    flat: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    scale: float = 1.0,
    accumulate: bool = False,
    nonfinite: torch.Tensor | None = None,
    sq_norms: torch.Tensor | None = None,
) -> None:
    """The inverse of :func:`pack_`: ``t = round(scale * flat[...])``, or with ``accumulate``
    ``t = round(t + scale * flat[...])``, converting to each tensor's dtype. ``sq_norms``
    (float64, one element per tensor), when given, receives each tensor's sum of squares of
    the written values, taken in the same pass (per-chunk partials summed in a fixed order, so
    the bits do not depend on threads or timing).

    Example::

        gradfuse.ops.unpack_(flat, grads, scale=1 / world_size)
    """
    _ops.unpack_(
        flat,
        _tensor_list("unpack_", "tensors", tensors),
        _float("unpack_", "scale", scale),
        bool(accumulate),
        nonfinite,
        sq_norms,
    )


def topk_compress(
    grad: torch.Tensor,
    residual: torch.Tensor,
    ratio: float,
    *,
    sampled: bool = False,
    index_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sparsification with error feedback; returns ``(values, indices)`` (1-D).

    ``residual += grad`` (fp32, in place); the ``k = ceil(ratio * numel)`` largest magnitudes
    of the residual are selected, returned, and zeroed in the residual, which keeps what was
    not sent for the next step. Indices are flat positions in ascending order.

    - ``sampled=False`` (exact): exactly ``k`` elements, the set ``torch.topk(residual.abs(),
      k)`` picks, ties going to the lower index. On a GPU it never waits for the device.
    - ``sampled=True`` (DGC): every element at or above a threshold estimated from a random
      sample (``seed``) when that is between ``k`` and ``2k`` elements, else the exact set. On a
      GPU its output length is read back once.

    Either way O(numel) time and O(k) extra memory, sparse gradients included. NaN ranks above
    every number, as in ``torch.topk``: it is sent rather than kept.

    Example::

        values, indices = gradfuse.ops.topk_compress(p.grad, residual, 0.01)
        dense = gradfuse.ops.topk_decompress(values, indices, p.numel()).view_as(p)
    """
    op = "topk_compress"
    if not isinstance(index_dtype, torch.dtype):
        raise TypeError(
            f"{op}: index_dtype must be torch.int32 or torch.int64, got {index_dtype!r}"
        )
    return _ops.topk_compress(
        grad,
        residual,
        _float(op, "ratio", ratio),
        bool(sampled),
        index_dtype,
        _int(op, "seed", seed),
    )


def topk_decompress(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    """A dense 1-D tensor of ``numel`` zeros with ``values`` scatter-added at ``indices``
    (duplicate indices add up, as when the top-k sets of several ranks are gathered).

    Deterministic: duplicates are added in the order given, each sum rounded to the values'
    dtype, with the same bits on the CPU and the GPU, so ranks that gather the same picks in the
    same order get the same gradient. An index outside ``[0, numel)`` is a ``ValueError`` on the
    CPU and a device-side assertion on a GPU (checked without a host sync)."""
    return _ops.topk_decompress(values, indices, _int("topk_decompress", "numel", numel))


__all__ = [
    "lars_update_",
    "lars_update_from_norms_",
    "pack",
    "pack_",
    "sum_squares",
    "topk_compress",
    "topk_decompress",
    "unpack_",
]
