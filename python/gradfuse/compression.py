"""Gradient compression for DistributedOptimizer: Horovod's ``Compressor`` interface.

A compressor turns a gradient into what travels (``compress(tensor) -> (tensor, ctx)``) and
back (``decompress(tensor, ctx) -> tensor``). DistributedOptimizer compresses each gradient
before its allreduce and decompresses the result, as Horovod does, so a user's own
:class:`Compressor` subclass (passed as the class, as Horovod's built-ins are, or as an
instance) works unchanged.

- ``Compression.none``: gradients travel as they are.
- ``Compression.fp16`` / ``Compression.bf16``: floating-point gradients travel as 16-bit floats
  (integer tensors pass through untouched, as in Horovod). Inside DistributedOptimizer the cast
  is the fused ``pack_`` kernel with the pre-scale applied in fp32 *before* rounding (so a sum
  of many ranks' fp16 gradients does not overflow where the averaged value would not), and the
  way back is ``unpack_`` with the post-scale.
- ``Compression.topk(ratio, ...)``: Deep Gradient Compression (Lin et al., 2018). Its state
  (residuals, velocities) is per optimizer: each DistributedOptimizer binds its own
  :class:`TopKState`, so one ``Compression.topk(...)`` object may serve several optimizers.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from . import ops


class Compressor:
    """Horovod's interface for compressing a gradient before its allreduce.

    ``compress(tensor)`` returns ``(compressed, ctx)``; ``compressed`` is allreduced and then
    ``decompress(reduced, ctx)`` returns the gradient (its shape; it is copied into ``.grad``).
    Override both, as static methods (then pass the class) or as methods (pass an instance).
    """

    @staticmethod
    def compress(tensor):
        raise NotImplementedError("a Compressor subclass must define compress(tensor)")

    @staticmethod
    def decompress(tensor, ctx):
        raise NotImplementedError("a Compressor subclass must define decompress(tensor, ctx)")


class NoneCompressor(Compressor):
    """Identity: the gradient itself is reduced."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor

    def __repr__(self):
        return "Compression.none"


class CastCompressor(Compressor):
    """Floating-point tensors travel as ``dtype`` (16-bit); others pass through untouched.
    ``ctx`` is the original dtype. :meth:`pack` / :meth:`unpack` are the fused forms
    DistributedOptimizer uses, with the allreduce's pre/post-scale applied in the cast."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name = name
        self.wire_dtype = dtype

    def compress(self, tensor):
        if not tensor.is_floating_point():
            return tensor, tensor.dtype
        return self.pack(tensor, 1.0), tensor.dtype

    def decompress(self, tensor, ctx):
        if not ctx.is_floating_point:
            return tensor
        out = torch.empty(tensor.shape, dtype=ctx, device=tensor.device)
        self.unpack(tensor, out, 1.0)
        return out

    def pack(self, tensor: torch.Tensor, prescale: float) -> torch.Tensor:
        """``round(prescale * tensor)`` as ``wire_dtype``, scaled in fp32 before rounding."""
        wire = torch.empty(tensor.shape, dtype=self.wire_dtype, device=tensor.device)
        ops.pack_([tensor.contiguous()], wire, prescale)
        return wire

    def unpack(self, wire: torch.Tensor, out: torch.Tensor, postscale: float) -> None:
        """``out = postscale * wire``, converted to ``out``'s dtype with one rounding."""
        wire = wire.contiguous()
        if out.is_contiguous():
            ops.unpack_(wire, [out], postscale)
        else:
            tmp = torch.empty_like(out, memory_format=torch.contiguous_format)
            ops.unpack_(wire, [tmp], postscale)
            out.copy_(tmp)

    def __repr__(self):
        return f"Compression.{self.name}"


class _Momentum(NamedTuple):
    """What momentum correction applies to one parameter (torch SGD's update rule)."""

    momentum: float
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False


# The SGD hyperparameters momentum correction takes over, and the values under which the
# wrapped SGD's own step applies none of them (it then steps by the reduced velocity).
_TAKEN_OVER = {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}


class TopKCompressor(Compressor):
    """Deep Gradient Compression (Lin et al., 2018): settings; the per-parameter state lives
    in the :class:`TopKState` each DistributedOptimizer binds (:meth:`bind`).

    Each rank sends the ``density`` largest-magnitude entries of its accumulated update (error
    feedback keeps the rest for later steps); values and indices travel by allgather and are
    scatter-added. DGC's recipe, as applied here:

    - **Momentum correction** (the default, ``momentum=None``): when the wrapped optimizer is
      ``torch.optim.SGD`` with momentum, the velocity ``u = m*u + (g + wd*w)`` is kept per rank
      (torch SGD's rule, with its dampening, nesterov, weight decay and maximize) and the
      velocity, not the gradient, is accumulated and compressed; the SGD then steps with its
      momentum and weight decay off (restored after each step), so neither is applied twice.
      Sparsifying the raw gradient and applying momentum after the exchange instead loses
      about 9 points of accuracy at 1% density on the digits CNN; this reaches dense
      accuracy. Other optimizers keep their own update rule, applied to the sparse gradient.
      ``momentum=m`` (> 0) applies momentum ``m`` here for a momentum-free optimizer (wrapping
      an SGD with momentum then is an error); ``momentum=0`` turns the correction off.
    - **Momentum factor masking**: the velocity of an entry is zeroed when it is sent, so
      stale momentum does not keep pushing it.
    - **Warm-up**: the density falls geometrically from ``warmup_density`` to ``ratio`` over
      ``warmup_steps`` steps (DGC's 75% -> 99.9% sparsity schedule over its first epochs).
    - Tensors smaller than ``min_numel`` (biases, norms) are sent dense (after momentum
      correction, which for them is exactly the SGD's own momentum).
    - DGC's local gradient clipping is not applied: clip before compression, if needed, in a
      tensor hook (``p.register_hook``), since ``.grad`` after ``synchronize()`` holds the
      reduced velocity.

    Args:
        ratio: final density (fraction of each gradient sent), in (0, 1].
        warmup_steps: steps of sparsity warm-up.
        warmup_density: the density at step 0, in (0, 1].
        sampled: use the sampled-threshold selection (between k and 2k values) instead of the
            exact top-k.
        momentum: ``None`` (take SGD's momentum, see above), or a momentum in [0, 1).
        min_numel: tensors smaller than this are sent dense.
    """

    def __init__(
        self,
        ratio: float,
        warmup_steps: int = 0,
        warmup_density: float = 0.25,
        sampled: bool = True,
        momentum: float | None = None,
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
        if momentum is not None and not 0 <= momentum < 1:
            raise ValueError(
                f"Compression.topk: momentum must be None or in [0, 1), got {momentum}"
            )
        self.ratio = float(ratio)
        self.warmup_steps = int(warmup_steps)
        self.warmup_density = max(float(warmup_density), self.ratio)
        self.sampled = bool(sampled)
        self.momentum = None if momentum is None else float(momentum)
        self.min_numel = int(min_numel)

    def density(self, step: int) -> float:
        """The density at optimizer step ``step`` (0-based)."""
        if step >= self.warmup_steps:
            return self.ratio
        fraction = step / self.warmup_steps
        return math.exp(
            math.log(self.warmup_density) * (1 - fraction) + math.log(self.ratio) * fraction
        )

    def bind(self, optimizer: torch.optim.Optimizer) -> TopKState:
        """A fresh state for ``optimizer``'s parameters (DistributedOptimizer calls this)."""
        return TopKState(self, optimizer)

    def compress(self, tensor):
        raise TypeError(
            f"{self!r} keeps per-parameter state: use it through DistributedOptimizer, or "
            f"call compress(tensor, param) on the state that .bind(optimizer) returns"
        )

    decompress = compress

    def __repr__(self):
        return (
            f"Compression.topk(ratio={self.ratio}, warmup_steps={self.warmup_steps}, "
            f"sampled={self.sampled}, momentum={self.momentum}, min_numel={self.min_numel})"
        )


class TopKState:
    """One optimizer's DGC state: per parameter the residual (what error feedback has not sent
    yet) and the velocity (momentum correction), and the step count of the warm-up. Shared by
    DistributedOptimizer and gradfuse.ddp's ``topk_hook``; ``optimizer`` may be None (no SGD to
    take momentum over from: momentum correction then uses ``settings.momentum`` alone).

    ``compress(grad, param)`` returns ``(payload, ctx)``: ``payload`` is a dense tensor to
    allreduce, or a ``(values, indices)`` pair to allgather; ``decompress(reduced, ctx)``
    returns the dense sum over ranks (the reduced tensor itself for a dense payload).
    """

    def __init__(self, settings: TopKCompressor, optimizer: torch.optim.Optimizer | None):
        self.settings = settings
        self.step = 0
        self.memory = {}  # param -> {"residual": float32, "momentum": float32}
        # Momentum correction taken over from SGD reads each group as it is at every step, so
        # momentum schedules (and the groups a load_state_dict() puts in place) take effect.
        auto = settings.momentum is None and isinstance(optimizer, torch.optim.SGD)
        self._optimizer = optimizer if auto else None
        self._group_of_key, self._group_of_cache = None, {}
        if settings.momentum and isinstance(optimizer, torch.optim.SGD):
            with_momentum = [i for i, g in enumerate(optimizer.param_groups) if g["momentum"]]
            if with_momentum:
                raise ValueError(
                    f"{settings!r} applies momentum {settings.momentum} before compression, "
                    f"and the wrapped SGD has momentum too (param_groups {with_momentum}): "
                    f"it would be applied twice. Leave momentum=None to take the SGD's over."
                )

    def _momentum_of(self, param) -> _Momentum | None:
        group = self._group_of().get(param)
        if group is not None:
            if not group["momentum"]:
                return None
            return _Momentum(*(group[k] for k in _Momentum._fields))
        return _Momentum(self.settings.momentum) if self.settings.momentum else None

    def _direction(self, grad, param):
        """What is compressed: the gradient, or with momentum correction the update SGD would
        apply (the velocity; nesterov's look-ahead), with the velocity updated in place."""
        rule = self._momentum_of(param)
        if rule is None:
            return grad
        d = grad.float()
        if rule.maximize:
            d = -d
        if rule.weight_decay:
            d = d.add(param.detach().float(), alpha=rule.weight_decay)
        state = self.memory.setdefault(param, {})
        u = state.get("momentum")
        if u is None:  # torch SGD starts the buffer at the first gradient, undampened
            u = state["momentum"] = d.clone()
        else:
            u.mul_(rule.momentum).add_(d, alpha=1 - rule.dampening)
        return d.add(u, alpha=rule.momentum) if rule.nesterov else u

    def compress(self, grad: torch.Tensor, param: torch.Tensor):
        direction = self._direction(grad, param)
        ctx = (grad.shape, grad.numel())
        if grad.numel() < self.settings.min_numel:  # small tensors travel dense
            send = grad if direction is grad else direction.to(grad.dtype, copy=True)
            return send, ctx
        state = self.memory.setdefault(param, {})
        residual = state.setdefault("residual", torch.zeros_like(grad, dtype=torch.float32))
        values, indices = ops.topk_compress(
            direction.contiguous().view(-1),
            residual.view(-1),
            self.settings.density(self.step),
            sampled=self.settings.sampled,
        )
        if "momentum" in state:
            state["momentum"].view(-1)[indices] = 0  # momentum factor masking
        return (values, indices), ctx

    @staticmethod
    def decompress(reduced, ctx):
        if isinstance(reduced, torch.Tensor):
            return reduced
        shape, numel = ctx
        values, indices = reduced
        return ops.topk_decompress(values, indices, numel).view(shape)

    @property
    def _groups(self) -> list:
        """The SGD's param groups as they are now: load_state_dict() replaces the dicts."""
        return self._optimizer.param_groups if self._optimizer is not None else []

    def _group_of(self) -> dict:
        """param -> its SGD group, rebuilt when the groups are replaced or added to."""
        key = tuple((id(g), len(g["params"])) for g in self._groups)
        if key != self._group_of_key:
            self._group_of_cache = {p: g for g in self._groups for p in g["params"]}
            self._group_of_key = key
        return self._group_of_cache

    @property
    def takes_over_momentum(self) -> bool:
        """Whether SGD groups' momentum is applied here (then the SGD must step inside
        :meth:`momentum_off`, or :meth:`optimizer_step`)."""
        return any(g["momentum"] for g in self._groups)

    @contextlib.contextmanager
    def momentum_off(self):
        """Around the wrapped optimizer's step: the SGD groups whose momentum (and weight
        decay, nesterov, maximize) was applied before compression step with them off."""
        taken = [(g, {k: g[k] for k in _TAKEN_OVER}) for g in self._groups if g["momentum"]]
        for group, _ in taken:
            group.update(_TAKEN_OVER)
        try:
            yield
        finally:
            for group, values in taken:
                group.update(values)

    @contextlib.contextmanager
    def optimizer_step(self):
        """:meth:`momentum_off`, then the warm-up's step count advances (DistributedOptimizer
        counts steps by its optimizer's; gradfuse.ddp's hook counts DDP's iterations)."""
        with self.momentum_off():
            yield
        self.step += 1

    def state_dict(self, params) -> dict:
        """The state, parameters numbered by their position in ``params``."""
        index = {p: i for i, p in enumerate(params)}
        return {
            "step": self.step,
            "memory": {
                index[p]: {k: v.clone() for k, v in s.items()} for p, s in self.memory.items()
            },
        }

    def load_state_dict(self, state: dict, params) -> None:
        self.step = int(state["step"])
        self.memory = {
            params[i]: {k: v.to(params[i].device) for k, v in s.items()}
            for i, s in state["memory"].items()
        }


class Compression:
    """Horovod-compatible namespace: ``Compression.none``, ``.fp16``, ``.bf16``, ``.topk()``."""

    none = NoneCompressor()
    fp16 = CastCompressor("fp16", torch.float16)
    bf16 = CastCompressor("bf16", torch.bfloat16)
    topk = TopKCompressor


class FP16Compressor(Compressor):
    """Horovod's class of this name (static methods: the class itself is the compressor, and
    user compressors subclass it): floating-point tensors travel as float16. Passed to
    DistributedOptimizer it goes the generic Compressor way (cast, then allreduce);
    ``Compression.fp16`` casts the same and fuses the cast with the allreduce's scaling."""

    @staticmethod
    def compress(tensor):
        return Compression.fp16.compress(tensor)

    @staticmethod
    def decompress(tensor, ctx):
        return Compression.fp16.decompress(tensor, ctx)


__all__ = [
    "Compression",
    "Compressor",
    "FP16Compressor",
    "NoneCompressor",
    "TopKCompressor",
    "TopKState",
]
