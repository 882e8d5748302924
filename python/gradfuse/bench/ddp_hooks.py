"""The DDP rows of ``gradfuse-bench train --ddp-hook ...``: torch DDP with gradfuse.ddp's comm
hooks and with DDP's own (fp16_compress_hook, PowerSGD), each a model of its own in the same
processes as the other frameworks."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import gradfuse
import gradfuse.ddp as gddp

# "none" is the DDP row every run has; the others each add one.
HOOKS = ("none", "fp16", "bf16", "topk", "hierarchical", "torch-fp16", "powersgd")
TOPK_DENSITY = 0.01
POWERSGD_RANK = 1


def _model_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def make(hook: str, module: torch.nn.Module, lr: float, momentum: float):
    """(DDP model, its SGD, a context to step it in) with ``hook`` registered."""
    if hook == "powersgd":
        # One bucket: torch's PowerSGD launches collectives from its futures' callbacks, which
        # Gloo's threads run as buckets finish, in an order that differs between ranks (the
        # ranks then mismatch and abort); with one bucket there is one order.
        model = DDP(module, bucket_cap_mb=_model_bytes(module) / 2**20 + 1)
    else:
        model = DDP(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    stepping = contextlib.nullcontext
    if hook in ("fp16", "bf16"):
        model.register_comm_hook(gddp.CastState(), getattr(gddp, f"{hook}_hook"))
    elif hook == "topk":
        state = gddp.TopKHookState(model, gradfuse.Compression.topk(TOPK_DENSITY), optimizer)
        model.register_comm_hook(state, gddp.topk_hook)
        stepping = state.optimizer_step
    elif hook == "hierarchical":
        model.register_comm_hook(gddp.HierarchicalState(), gddp.hierarchical_hook)
    elif hook == "torch-fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        # Compressing from the third iteration (the bench's warm-up runs two).
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=POWERSGD_RANK, start_powerSGD_iter=2
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook != "none":
        raise ValueError(f"--ddp-hook: unknown hook {hook!r}; choose from {', '.join(HOOKS)}")
    return model, optimizer, stepping
