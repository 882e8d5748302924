"""Fake (meta) implementations of the custom ops, so they trace under FakeTensor /
torch.compile and pass torch.library.opcheck. They compute output shapes only."""

from __future__ import annotations

import torch

from . import _build  # noqa: F401  (the ops must be registered before register_fake)


def _check_one_device(op, named):
    """The real kernels' device check (a meta tensor among real ones dispatches here); sizes
    are left alone, as they may be symbolic while tracing."""
    (first_name, first), *rest = [(n, t) for n, t in named if t is not None]
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(
                f"{op}: all tensors must be on one device; {name} is on {t.device} but "
                f"{first_name} is on {first.device}"
            )


def _named(name, tensors):
    return [(f"{name}[{i}]", t) for i, t in enumerate(tensors)]


def _lars_named(params, grads, momentum_bufs, model_copies, grad_scale, found_inf):
    """The (argument name, tensor) pairs both LARS ops must hold on one device."""
    return (
        _named("params", params)
        + _named("grads", grads)
        + _named("momentum_bufs", momentum_bufs)
        + _named("model_copies", model_copies)
        + [("grad_scale", grad_scale), ("found_inf", found_inf)]
    )


@torch.library.register_fake("gradfuse::lars_update_")
def _lars_update_fake(
    params,
    grads,
    momentum_bufs,
    model_copies,
    use_lars,
    use_weight_decay,
    lr,
    momentum,
    weight_decay,
    trust_coefficient,
    eps,
    nesterov,
    lr_in_momentum,
    grad_scale=None,
    found_inf=None,
):
    if params:
        _check_one_device(
            "lars_update_",
            _lars_named(params, grads, momentum_bufs, model_copies, grad_scale, found_inf),
        )


@torch.library.register_fake("gradfuse::lars_update_from_norms_")
def _lars_update_from_norms_fake(
    params,
    grads,
    momentum_bufs,
    model_copies,
    use_lars,
    use_weight_decay,
    grad_sq_norms,
    param_sq_norms,
    lr,
    momentum,
    weight_decay,
    trust_coefficient,
    eps,
    nesterov,
    lr_in_momentum,
    grad_scale=None,
    found_inf=None,
):
    _check_one_device(
        "lars_update_from_norms_",
        [("grad_sq_norms", grad_sq_norms), ("param_sq_norms", param_sq_norms)]
        + _lars_named(params, grads, momentum_bufs, model_copies, grad_scale, found_inf),
    )


@torch.library.register_fake("gradfuse::sum_squares")
def _sum_squares_fake(tensors):
    device = tensors[0].device if tensors else "cpu"
    return torch.empty((len(tensors),), dtype=torch.float64, device=device)


@torch.library.register_fake("gradfuse::pack_")
def _pack_fake(tensors, out, scale=1.0, nonfinite=None):
    _check_one_device(
        "pack_", [("out", out)] + _named("tensors", tensors) + [("nonfinite", nonfinite)]
    )


@torch.library.register_fake("gradfuse::unpack_")
def _unpack_fake(flat, tensors, scale=1.0, accumulate=False, nonfinite=None, sq_norms=None):
    _check_one_device(
        "unpack_",
        [("flat", flat)]
        + _named("tensors", tensors)
        + [("nonfinite", nonfinite), ("sq_norms", sq_norms)],
    )


@torch.library.register_fake("gradfuse::topk_compress")
def _topk_compress_fake(grad, residual, ratio, sampled=False, index_dtype=None, seed=0):
    # How many elements are selected depends on the data (sampled mode) -> a dynamic size.
    count = torch.library.get_ctx().new_dynamic_size()
    values = residual.new_empty((count,))
    indices = residual.new_empty((count,), dtype=index_dtype or torch.int64)
    return values, indices


@torch.library.register_fake("gradfuse::topk_decompress")
def _topk_decompress_fake(values, indices, numel):
    _check_one_device("topk_decompress", [("values", values), ("indices", indices)])
    return values.new_empty((numel,))
