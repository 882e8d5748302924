"""Fake (meta) implementations of the custom ops, so they trace under FakeTensor /
torch.compile and pass torch.library.opcheck. They compute output shapes only."""

from __future__ import annotations

import torch

from . import _build  # noqa: F401  (the ops must be registered before register_fake)


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
    return None


@torch.library.register_fake("gradfuse::pack_")
def _pack_fake(tensors, out, scale=1.0, nonfinite=None):
    return None


@torch.library.register_fake("gradfuse::unpack_")
def _unpack_fake(flat, tensors, scale=1.0, accumulate=False, nonfinite=None):
    return None


@torch.library.register_fake("gradfuse::topk_compress")
def _topk_compress_fake(grad, residual, ratio, sampled=False, index_dtype=None, seed=0):
    # How many elements are selected depends on the data (sampled mode) -> a dynamic size.
    count = torch.library.get_ctx().new_dynamic_size()
    values = residual.new_empty((count,))
    indices = residual.new_empty((count,), dtype=index_dtype or torch.int64)
    return values, indices


@torch.library.register_fake("gradfuse::topk_decompress")
def _topk_decompress_fake(values, indices, numel):
    return values.new_empty((numel,))
