"""Optimizers on the fused kernels.

- :class:`LARS` — layer-wise adaptive rate scaling with momentum, one fused one-pass
  ``lars_update_from_norms_`` call per (device, dtype) bucket per step (each parameter's
  squared norm is kept from the previous step's update, each gradient's comes from
  DistributedOptimizer's unpack of the reduced gradient, or one read pass without it); bias
  and normalization parameters are excluded from LARS scaling and weight decay by default (the
  large-batch recipe of Goyal et al. and Tencent's "ImageNet in 4 minutes"). A plain torch
  optimizer: no gradfuse.init() needed; torch.compile traces its step whole; sharded
  parameters (FSDP2, DTensor) get the trust ratio of the full tensors.
- :class:`LARSWrapper` — LARC-style trust-ratio scaling of the gradients in front of any
  existing optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import ops

try:  # sharded parameters (FSDP2, DTensor): their norms are summed over the shards
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = None


def _is_bias_or_norm(p: torch.Tensor) -> bool:
    """Biases and normalization weights/biases are the 1-D (or scalar) parameters."""
    return p.ndim <= 1


class LARS(torch.optim.Optimizer):
    """LARS with momentum on the fused multi-tensor kernel.

    Args:
        params: parameters or parameter groups. A group may override any option below,
            e.g. ``{"params": head.parameters(), "exclude_bias_and_norm": False}``.
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty folded into the LARS direction (``d = g + wd * w``).
        trust_coefficient: eta in ``trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)``.
        eps: added to the denominator of the trust ratio.
        nesterov: Nesterov momentum.
        exclude_bias_and_norm: skip LARS scaling and weight decay for 1-D parameters (biases,
            BatchNorm/LayerNorm weights); they get plain momentum SGD.
        lr_in_momentum: ``False`` (default): ``v = m*v + trust*d; w -= lr*v`` (torch SGD
            placement, the learning rate can change without rescaling the buffers);
            ``True``: ``v = m*v + lr*trust*d; w -= v`` (You et al., 2017).

    Sharded parameters (DTensors, e.g. from FSDP2's ``fully_shard``) are stepped shard by
    shard with the full tensors' norms: each rank's squared norms are summed over the process
    groups of the mesh dimensions the parameter is sharded over (one small allreduce per
    bucket), so every rank computes the trust ratio single-process LARS would.

    Works with ``torch.amp.GradScaler``: ``scaler.step(opt)`` hands this optimizer the scale
    and the found-inf flag, which the kernel applies on the device (no unscale pass, no sync).

    Example::

        opt = gradfuse.optim.LARS(model.parameters(), lr=0.1, weight_decay=5e-5)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    _step_supports_amp_scaling = True  # GradScaler sets self.grad_scale / self.found_inf

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        exclude_bias_and_norm: bool = True,
        lr_in_momentum: bool = False,
    ):
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("trust_coefficient", trust_coefficient),
            ("eps", eps),
        ):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"LARS: {name} must be a non-negative number, got {value!r}")
        if nesterov and momentum == 0:
            raise ValueError("LARS: nesterov=True needs a momentum > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "nesterov": nesterov,
            "exclude_bias_and_norm": exclude_bias_and_norm,
            "lr_in_momentum": lr_in_momentum,
        }
        super().__init__(params, defaults)
        self._norms = _NormCache()

    def forget_norms(self):
        """Drop the squared norms kept for the one-pass step (after writing parameters or
        gradients through ``.data``, which torch's version counters do not see)."""
        self._norms.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            self._step_group(group, grad_scale, found_inf)
        return loss

    def _step_group(self, group, grad_scale, found_inf):
        for (device, _, _, norm_groups), bucket in _buckets(self, group).items():
            # Non-contiguous parameters are updated through a contiguous copy.
            flat_params = [p if p.is_contiguous() else p.contiguous() for p in bucket.params]
            hyper = {
                "lr": group["lr"],
                "momentum": group["momentum"],
                "weight_decay": group["weight_decay"],
                "trust_coefficient": group["trust_coefficient"],
                "eps": group["eps"],
                "nesterov": group["nesterov"],
                "lr_in_momentum": group["lr_in_momentum"],
                "use_lars": bucket.use_lars,
                "use_weight_decay": bucket.use_lars,
                "grad_scale": None if grad_scale is None else grad_scale.to(device),
                "found_inf": None if found_inf is None else found_inf.to(device),
            }
            if norm_groups or _has_one_pass_kernels(device):
                g_sq, w_sq = self._sq_norms(bucket, flat_params, norm_groups, device)
                ops.lars_update_from_norms_(
                    flat_params, bucket.grads, bucket.bufs, g_sq, w_sq, **hyper
                )
                if not torch.compiler.is_compiling():
                    # The kernel left the updated (local) parameters' squared norms in w_sq.
                    self._norms.keep_param_sq_norms(bucket.owners, bucket.params, w_sq)
            else:
                ops.lars_update_(flat_params, bucket.grads, bucket.bufs, **hyper)
            for p, fp in zip(bucket.params, flat_params):
                if fp is not p:
                    p.copy_(fp)

    def _sq_norms(self, bucket, flat_params, norm_groups, device):
        """The bucket's squared gradient and parameter norms: kept ones where still valid
        (eager only: the cache reads data pointers, which a compiled graph cannot), otherwise
        one read pass; for sharded parameters this rank's partial sums, summed over the shards'
        process groups into the full tensors' norms."""
        if not _has_one_pass_kernels(device):
            raise NotImplementedError(
                f"LARS: parameters sharded as DTensors on {device} need the one-pass kernel "
                f"lars_update_from_norms_, which this build lacks for {device.type}"
            )
        compiling = torch.compiler.is_compiling()
        g_sq = None if compiling else self._norms.grad_sq_norms(bucket.owners)
        if g_sq is None:
            g_sq = ops.sum_squares(bucket.grads)
        w_sq = None if compiling else self._norms.param_sq_norms(bucket.owners, bucket.params)
        if w_sq is None:
            w_sq = ops.sum_squares(flat_params)
        if not norm_groups:
            return g_sq, w_sq
        both = torch.cat([g_sq, w_sq])
        for process_group in norm_groups:  # one small allreduce per sharded mesh dimension
            torch.distributed.all_reduce(both, group=process_group)
        n = len(bucket.params)
        return both[:n], both[n:].clone()  # the kernel refuses norms that share memory

    def __setstate__(self, state):
        super().__setstate__(state)
        self._norms = _NormCache()

    # DistributedOptimizer's side of the one-pass step (gradfuse.distributed_optimizer).
    def _gf_grad_sq_norm_out(self, p):
        """The one-element float64 tensor the engine writes p's reduced gradient's sum of
        squares to, or None where this optimizer's kernels cannot take it (then the step
        computes the norm itself)."""
        if not _has_one_pass_kernels(p.device):
            return None
        return self._norms.grad_slot(p)

    def _gf_grad_sq_norm_written(self, p):
        """The engine wrote p's slot for the current p.grad."""
        self._norms.note_grad(p)


class _Bucket:
    """The parameters one fused call steps: one device, parameter dtype, gradient dtype and set
    of process groups over which the norms are summed. ``owners`` are the optimizer's
    parameters (DTensors for sharded ones); ``params``, ``grads`` and ``bufs`` the tensors the
    kernel writes (each DTensor's local shard)."""

    def __init__(self):
        self.owners, self.params, self.grads, self.bufs, self.use_lars = [], [], [], [], []


def _buckets(opt, group) -> dict:
    buckets = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("LARS does not support sparse gradients")
        state = opt.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        key = (p.device, p.dtype, p.grad.dtype, _norm_groups(p))
        bucket = buckets.setdefault(key, _Bucket())
        bucket.owners.append(p)
        bucket.params.append(_local(p))
        bucket.grads.append(_local(p.grad).contiguous())
        bucket.bufs.append(_local(state["momentum_buffer"]))
        # Excluded parameters get neither LARS scaling nor weight decay.
        bucket.use_lars.append(not (group["exclude_bias_and_norm"] and _is_bias_or_norm(p)))
    return buckets


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: writes to it update the DTensor); any other tensor."""
    return t.to_local() if _DTensor is not None and isinstance(t, _DTensor) else t


def _norm_groups(p: torch.Tensor) -> tuple:
    """The process groups over which the squared norms of p's local shard (and its gradient's)
    sum to those of the full tensors: one per device-mesh dimension p is sharded over; () for a
    tensor that is not a DTensor or is replicated."""
    if _DTensor is None or not isinstance(p, _DTensor):
        return ()
    if not isinstance(p.grad, _DTensor) or p.grad.placements != p.placements:
        got = getattr(p.grad, "placements", type(p.grad).__name__)
        raise ValueError(
            f"LARS: a DTensor parameter's gradient must be a DTensor placed like it "
            f"({p.placements}), got {got}"
        )
    if any(placement.is_partial() for placement in p.placements):
        raise ValueError(f"LARS: a parameter with a Partial placement has no norm: {p.placements}")
    return tuple(
        p.device_mesh.get_group(dim)
        for dim, placement in enumerate(p.placements)
        if placement.is_shard()
    )


@torch.compiler.assume_constant_result  # a fact of this build: a constant in compiled graphs
def _has_one_pass_kernels(device) -> bool:
    key = "CPU" if device.type == "cpu" else device.type.upper()
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{name}", key)
        for name in ("lars_update_from_norms_", "sum_squares")
    )


class _NormCache:
    """Squared norms LARS took in passing, each valid only for the exact tensor it was taken
    of: a gradient's (written by the engine as it unpacked the reduced gradient) until that
    gradient changes or the step uses it; a parameter's (written by the previous step's
    update) until the parameter changes. A change is seen through the tensor's version counter
    (every in-place torch op bumps it) and its storage; writes through ``.data`` bypass the
    counter, so after such a write call ``LARS.forget_norms()``."""

    def __init__(self):
        self._grad_slots = {}  # param -> one-element float64 tensor
        self._grad_marks = {}  # param -> (data_ptr, version) of the grad the slot holds
        self._param_sq = {}  # tuple of owner ids -> ([n] float64, [(data_ptr, version)])

    @staticmethod
    def _mark(t):
        return (t.data_ptr(), t._version)

    def grad_slot(self, p):
        slot = self._grad_slots.get(p)
        if slot is None or slot.device != p.device:
            slot = self._grad_slots[p] = torch.zeros(1, dtype=torch.float64, device=p.device)
        self._grad_marks.pop(p, None)  # being rewritten: not valid until note_grad
        return slot

    def note_grad(self, p):
        self._grad_marks[p] = self._mark(p.grad)

    def grad_sq_norms(self, params):
        """The [n] float64 squared norms of the params' grads, or None unless every one is
        known; used once (the marks are dropped)."""
        marks = [self._grad_marks.pop(p, None) for p in params]
        if any(m is None or m != self._mark(p.grad) for m, p in zip(marks, params)):
            return None
        return torch.cat([self._grad_slots[p] for p in params])

    def param_sq_norms(self, owners, params):
        """The [n] float64 squared norms kept for ``params`` (the tensors the kernel wrote:
        each owner itself, or its local shard), or None unless they are unchanged since."""
        known = self._param_sq.get(tuple(id(p) for p in owners))
        if known is None or known[1] != [self._mark(p) for p in params]:
            return None
        return known[0]

    def keep_param_sq_norms(self, owners, params, w_sq):
        self._param_sq[tuple(id(p) for p in owners)] = (w_sq, [self._mark(p) for p in params])

    def clear(self):
        self._grad_marks.clear()
        self._param_sq.clear()


class LARSWrapper:
    """LARC: scale each gradient by its LARS trust ratio, then step any optimizer.

    Before ``optimizer.step()``, every parameter's gradient becomes
    ``trust * (g + wd * w)`` with ``trust = trust_coefficient * ||w|| / (||g|| + wd * ||w|| +
    eps)`` (1 when either norm is zero or the parameter is a bias/normalization weight and
    ``exclude_bias_and_norm``), and the wrapped optimizer's own weight decay is set to 0 for
    that step, so decay is applied once, inside the ratio. With ``clip=True`` the ratio is
    ``min(trust / lr, 1)`` (NVIDIA Apex's LARC clipping mode).

    Example::

        opt = gradfuse.optim.LARSWrapper(torch.optim.SGD(model.parameters(), lr=0.1,
                                                         momentum=0.9, weight_decay=5e-5))
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
        exclude_bias_and_norm: bool = True,
    ):
        self.optimizer = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip
        self.exclude_bias_and_norm = exclude_bias_and_norm

    def __getattr__(self, name):  # param_groups, state, zero_grad, ... of the wrapped optimizer
        return getattr(self.optimizer, name)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        saved_wd = []
        for group in self.optimizer.param_groups:
            wd = group.get("weight_decay", 0.0)
            saved_wd.append(wd)
            group["weight_decay"] = 0.0
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            w_norms = torch._foreach_norm(params)
            g_norms = torch._foreach_norm([p.grad for p in params])
            for p, w_norm, g_norm in zip(params, w_norms, g_norms):
                if self.exclude_bias_and_norm and _is_bias_or_norm(p):
                    if wd:
                        p.grad.add_(p, alpha=wd)
                    continue
                trust = self.trust_coefficient * w_norm / (g_norm + wd * w_norm + self.eps)
                trust = torch.where((w_norm != 0) & (g_norm != 0), trust, torch.ones_like(trust))
                if self.clip:
                    trust = torch.clamp(trust / group["lr"], max=1.0)
                p.grad.add_(p, alpha=wd).mul_(trust)
        try:
            return self.optimizer.step(closure)
        finally:
            for group, wd in zip(self.optimizer.param_groups, saved_wd):
                group["weight_decay"] = wd


__all__ = ["LARS", "LARSWrapper"]
