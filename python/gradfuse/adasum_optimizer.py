"""DistributedOptimizer(op=gradfuse.Adasum): Horovod's _DistributedAdasumOptimizer.

Adasum combines *updates*, not gradients: when a parameter's gradient is ready (after
backward_passes_per_step backward passes), this rank runs the wrapped optimizer's step on that
parameter alone, takes the change it made (the delta), puts the parameter back, and submits the
delta for an Adasum allreduce; ``step()`` waits and adds the combined delta to the parameter.
So each rank's optimizer state (momentum, Adam moments) evolves from its own gradients, while
the parameters stay identical on every rank.

Differences from Horovod: the parameter is restored right after its local step (Horovod leaves
the delta in it until step()), so backward never sees a half-updated parameter; misuse raises
RuntimeError/ValueError where Horovod asserts.
"""

from __future__ import annotations

import torch

from . import collectives
from ._engine import size
from .collectives import Average
from .compression import Compression
from .distributed_optimizer import (
    DistributedOptimizer,
    _DistributedOptimizer,
    _subclass_sharing_state,
)


def _wire_dtypes():
    # Compression for Adasum is a cast of the delta (Horovod's fp16 compressor); top-k has no
    # meaning for a combination that is not a sum.
    return {
        Compression.none: None,
        Compression.fp16: torch.float16,
        Compression.bf16: torch.bfloat16,
    }


class _DistributedAdasumOptimizer:
    """Methods mixed into a subclass of the wrapped optimizer's class (see adasum_optimizer)."""

    def _gf_setup(self, named_parameters, compression, backward_passes_per_step):
        if backward_passes_per_step < 1:
            raise ValueError(
                f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}"
            )
        wire = _wire_dtypes()
        if compression not in wire:
            raise ValueError(
                "DistributedOptimizer(op=Adasum): compression must be Compression.none, fp16 or "
                f"bf16, got {compression!r}"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        self._gf_names = _DistributedOptimizer._gf_resolve_names(named_parameters, params)
        self._gf_params = [p for p in params if p.requires_grad]
        self._gf_wire_dtype = wire[compression]
        self._gf_passes = backward_passes_per_step
        self._gf_delay = {p: backward_passes_per_step for p in self._gf_params}
        self._gf_pending = {}  # param -> (handle, delta on the wire), reduction in flight
        self._gf_hook_handles = [
            p.register_post_accumulate_grad_hook(self._gf_hook) for p in self._gf_params
        ]

    def _gf_hook(self, p):
        if p in self._gf_pending:
            raise RuntimeError(
                f"the gradient of {self._gf_names[p]} was computed more than "
                f"backward_passes_per_step={self._gf_passes} times before step(); raise "
                f"backward_passes_per_step or call step() more often"
            )
        self._gf_delay[p] -= 1
        if self._gf_delay[p] == 0:
            self._gf_pending[p] = self._gf_reduce_delta_async(p)

    def _gf_reduce_delta_async(self, p):
        """Steps the wrapped optimizer on `p` alone, restores `p` and submits the delta."""
        with torch.no_grad():
            start = p.detach().clone()
            self._gf_step_only(p)
            delta = p.detach() - start
            p.copy_(start)
        if self._gf_wire_dtype is not None:
            delta = delta.to(self._gf_wire_dtype)
        handle = collectives.allreduce_async_(delta, name=self._gf_names[p], op=collectives.Adasum)
        return handle, delta

    def _gf_step_only(self, p):
        """The wrapped optimizer's step with every param group but p's emptied (Horovod's
        approach: per-parameter state such as momentum buffers is kept as usual)."""
        stashed = [group["params"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["params"] = [q for q in group["params"] if q is p]
            self._gf_base.step(self)
        finally:
            for group, params in zip(self.param_groups, stashed):
                group["params"] = params

    def synchronize(self):
        """Nothing to do: the combined deltas are applied by step() (as in Horovod)."""

    def skip_synchronize(self):
        raise RuntimeError(
            "skip_synchronize() is not supported with DistributedOptimizer(op=Adasum): the "
            "reduced values are parameter updates, applied by step() itself"
        )

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Parameters whose hook did not fire here (unused on this rank, or fewer backward passes
        # than backward_passes_per_step) step now, so every rank submits every parameter.
        missing = [p for p in self._gf_params if p not in self._gf_pending]
        with collectives.submitted_together():
            for p in missing:
                self._gf_pending[p] = self._gf_reduce_delta_async(p)
        pending, self._gf_pending = self._gf_pending, {}
        self._gf_delay = {p: self._gf_passes for p in self._gf_params}
        errors = []
        for p, (handle, _) in pending.items():
            try:
                combined = collectives.synchronize(handle)
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
                errors.append(exc)  # wait for the others: none left dangling
                continue
            with torch.no_grad():
                p.add_(combined.to(p.dtype))
        if errors:
            raise errors[0]
        return loss

    def zero_grad(self, set_to_none: bool = True):
        if self._gf_pending:
            raise RuntimeError(
                "optimizer.zero_grad() was called while Adasum reductions are in flight "
                "(after backward() and before step()). Call step() first."
            )
        return self._gf_base.zero_grad(self, set_to_none)


def adasum_optimizer(
    optimizer,
    named_parameters,
    compression,
    backward_passes_per_step,
    gradient_predivide_factor,
    gradient_as_bucket_view,
):
    """DistributedOptimizer(optimizer, op=Adasum): a subclass of ``type(optimizer)`` sharing its
    state, with _DistributedAdasumOptimizer's methods. On one rank, as in Horovod, the plain
    DistributedOptimizer (the Adasum of one update is that update)."""
    if gradient_predivide_factor != 1.0:
        raise ValueError("gradient_predivide_factor is only valid with op=gradfuse.Average")
    if gradient_as_bucket_view:
        raise ValueError(
            "gradient_as_bucket_view=True is not supported with op=Adasum (it reduces "
            "parameter updates one by one, not gradient buckets)"
        )
    if size() == 1:
        return DistributedOptimizer(
            optimizer, named_parameters, compression, backward_passes_per_step, Average
        )
    wrapped = _subclass_sharing_state(optimizer, _DistributedAdasumOptimizer)
    wrapped._gf_setup(named_parameters, compression, backward_passes_per_step)
    return wrapped
