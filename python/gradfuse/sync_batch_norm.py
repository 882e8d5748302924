"""SyncBatchNorm: batch normalization whose statistics cover the whole global batch (every
rank's samples), Horovod's ``hvd.SyncBatchNorm``. In training, forward output, running
statistics and gradients equal ``nn.BatchNorm`` run on the concatenation of every rank's batch.

Forward: each rank computes its per-channel count, mean and sum of squared deviations; one
allgather brings every rank's to every rank, which combines them (Chan's parallel update, in
float64, in rank order: the same bits everywhere). Backward: one allreduce of the per-channel
sums of dy and dy*(x - mean). Written with plain torch ops, so it runs on CPU and CUDA tensors
alike; the weight and bias gradients stay local (DistributedOptimizer reduces them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives
from ._engine import size


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over (N, C, ...) inputs (the shapes of BatchNorm1d/2d/3d) with
    statistics synchronized over all ranks in training. Ranks may pass different batch sizes,
    including none at all (N = 0). Arguments as torch.nn.BatchNorm*d: ``momentum=None`` is the
    cumulative moving average; in eval mode the running statistics are used (no communication)
    unless ``track_running_stats=False``."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm: expected an input of shape (N, C, ...) with at least 2 "
                f"dimensions, got {input.dim()}-D input of shape {tuple(input.shape)}"
            )

    def forward(self, input):
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm: expected {self.num_features} channels (dim 1), got input of "
                f"shape {tuple(input.shape)}"
            )
        factor = self._running_average_factor()
        use_batch_stats = self.training or not self.track_running_stats
        # Running statistics are updated only when tracked, in training.
        running = self.training and self.track_running_stats
        if not use_batch_stats or size() == 1:  # nothing to synchronize
            return F.batch_norm(
                input,
                self.running_mean,  # None when not tracked
                self.running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                factor,
                self.eps,
            )
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if running else None,
            self.running_var if running else None,
            self.eps,
            factor,
        )

    def _running_average_factor(self):
        """Counts this batch and returns the running-average factor (torch's BatchNorm rule)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def _channels_view(t, dims):
    """A per-channel vector (C,) shaped to broadcast against an (N, C, ...) input."""
    return t.view(1, -1, *([1] * (dims - 2)))


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, factor):
        dims, channels = input.dim(), input.shape[1]
        x = input.to(_compute_dtype(input.dtype))
        reduce_dims = [0, *range(2, dims)]
        count = x.numel() // channels
        if count:
            var, mean = torch.var_mean(x, dim=reduce_dims, correction=0)
        else:  # an empty batch on this rank contributes nothing
            var = mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
        local = torch.cat(
            [
                torch.tensor([count], dtype=torch.float64, device=x.device),
                mean.double(),
                (var * count).double(),
            ]
        )
        gathered = collectives.allgather(local.unsqueeze(0), name="gradfuse.sync_batch_norm.stats")
        total, mean64, m2 = _combine(gathered, channels)
        if total <= 1:
            raise ValueError(
                f"SyncBatchNorm: expected more than 1 value per channel over all ranks in "
                f"training, got {total} (input shape on this rank: {tuple(input.shape)})"
            )
        var64 = m2 / total
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_((mean64 * factor).to(running_mean.dtype))
                unbiased = m2 / (total - 1)
                running_var.mul_(1 - factor).add_((unbiased * factor).to(running_var.dtype))
        mean = mean64.to(x.dtype)
        invstd = torch.rsqrt(var64 + eps).to(x.dtype)
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        shift = -mean * scale if bias is None else bias.to(x.dtype) - mean * scale
        out = x * _channels_view(scale, dims) + _channels_view(shift, dims)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total = total
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        dims = input.dim()
        reduce_dims = [0, *range(2, dims)]
        x = input.to(mean.dtype)
        dy = grad_output.to(mean.dtype)
        xmu = x - _channels_view(mean, dims)
        # Local per-channel sums (zeros for an empty batch), summed over every rank.
        sum_dy = dy.sum(dim=reduce_dims)
        sum_dy_xmu = (dy * xmu).sum(dim=reduce_dims)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None else None
        grad_input = None
        if ctx.needs_input_grad[0]:
            both = collectives.allreduce(
                torch.cat([sum_dy, sum_dy_xmu]).double(),
                op=collectives.Sum,
                name="gradfuse.sync_batch_norm.grads",
            )
            mean_dy, mean_dy_xmu = (both / ctx.total).to(mean.dtype).chunk(2)
            w_invstd = invstd if weight is None else invstd * weight.to(mean.dtype)
            grad_input = (
                dy
                - _channels_view(mean_dy, dims)
                - xmu * _channels_view(invstd * invstd * mean_dy_xmu, dims)
            ) * _channels_view(w_invstd, dims)
            grad_input = grad_input.to(input.dtype)
        if not ctx.needs_input_grad[1]:
            grad_weight = None
        if not ctx.needs_input_grad[2]:
            grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _combine(gathered, channels):
    """(total count, mean, sum of squared deviations) of the union of the ranks' batches, from
    each rank's (count, mean, M2) rows, combined in rank order (Chan et al.)."""
    counts = gathered[:, 0]
    means = gathered[:, 1 : 1 + channels]
    m2s = gathered[:, 1 + channels :]
    total = int(counts.sum().item())
    if total == 0:
        return 0, means[0], m2s[0]
    weights = (counts / total).unsqueeze(1)
    mean = (weights * means).sum(dim=0)
    m2 = (m2s + counts.unsqueeze(1) * (means - mean) ** 2).sum(dim=0)
    return total, mean, m2
