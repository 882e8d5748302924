"""gradfuse inside torch DDP: communication hooks for ``model.register_comm_hook(state, hook)``.

They use DDP's own process group (Gloo or NCCL); ``gradfuse.init()`` is not needed.

- :func:`fp16_hook` / :func:`bf16_hook` (state :class:`CastState`): the bucket travels as 16-bit
  floats, cast by the fused ``pack_`` with the 1/world_size average applied before rounding;
  ``state.found_inf`` flags an overflow, the same on every rank.
- :func:`topk_hook` (state :class:`TopKHookState`): Deep Gradient Compression, top-k with error
  feedback and momentum correction, checkpointable, every rank stepping with the same bits.
- :func:`hierarchical_hook` (state :class:`HierarchicalState`): reduce-scatter within the node,
  allreduce across nodes, allgather within the node.

Example::

    model = DDP(net)
    state = gradfuse.ddp.CastState()
    model.register_comm_hook(state, gradfuse.ddp.fp16_hook)
"""

from .cast import CastState, bf16_hook, fp16_hook
from .hierarchical import HierarchicalState, hierarchical_allreduce, hierarchical_hook
from .topk import TopKHookState, topk_hook

__all__ = [
    "CastState",
    "HierarchicalState",
    "TopKHookState",
    "bf16_hook",
    "fp16_hook",
    "hierarchical_allreduce",
    "hierarchical_hook",
    "topk_hook",
]
