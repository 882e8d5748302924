"""What every DDP comm hook here needs: its process group, checks of its state and bucket
(bad input raises before any collective, on every rank alike), and where DDP's iterations
begin, which only the order of the hook's calls tells."""

import torch
import torch.distributed as dist


def resolve_group(process_group, who: str) -> dist.ProcessGroup:
    """``process_group``, or the default group for None (as DDP's own hooks take it)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{who}: torch.distributed is not initialized; call dist.init_process_group() "
            f"(the group DDP uses) before making the hook's state"
        )
    if process_group is None:
        return dist.distributed_c10d._get_default_group()
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{who}: this rank is not a member of process_group")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{who}: process_group must be a torch.distributed ProcessGroup or None (the "
            f"default group), got {type(process_group).__name__}"
        )
    return process_group


def check_state(state, cls: type, hook: str):
    if not isinstance(state, cls):
        raise TypeError(
            f"gradfuse.ddp.{hook}: the state passed to register_comm_hook(state, {hook}) must "
            f"be a gradfuse.ddp.{cls.__name__}, got {type(state).__name__}"
        )
    return state


def _device_types(group: dist.ProcessGroup) -> set[str]:
    """The device types `group` has a transport for: 'cpu:gloo,cuda:nccl' -> {cpu, cuda}."""
    return {part.split(":")[0] for part in dist.get_backend_config(group).split(",")}


def check_bucket(group: dist.ProcessGroup, buffer: torch.Tensor, hook: str) -> None:
    """The bucket must be on a device the group can move: else torch would fail deep in the
    collective (or, for a group this rank is not in, not at all)."""
    types = _device_types(group)
    if buffer.device.type not in types:
        raise ValueError(
            f"gradfuse.ddp.{hook}: the bucket's gradients are on {buffer.device.type} but the "
            f"state's process group (backend {dist.get_backend_config(group)!r}) has no "
            f"transport for {buffer.device.type} tensors; give the state DDP's own group"
        )


class IterationClock:
    """DDP calls a hook once per bucket, in bucket order, the last marked ``is_last()``; its
    bucket indices change when it rebuilds the buckets after the first iteration, but that
    order does not."""

    def __init__(self):
        self._between = True

    def begins(self, bucket: dist.GradBucket) -> bool:
        """Call once per bucket, first: True for the first bucket of an iteration."""
        first = self._between
        self._between = bucket.is_last()
        return first


def offset_in(buffer: torch.Tensor, view: torch.Tensor) -> int:
    """Where ``view`` (one of ``bucket.gradients()``) starts in the flat bucket ``buffer``."""
    return (view.data_ptr() - buffer.data_ptr()) // buffer.element_size()


# torch 2.13 renamed the one-tensor collectives (the old names warn); older torch has only
# the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def agree(group: dist.ProcessGroup, who: str, what: str, value) -> None:
    """Raises the same ValueError on every rank of ``group`` unless every rank passes an
    equal ``value`` (a collective: made where every rank makes the state)."""
    every = [None] * group.size()
    dist.all_gather_object(every, value, group=group)
    if any(v != every[0] for v in every):
        per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(every))
        raise ValueError(f"{who}: {what} must be the same on every rank, got {per_rank}")
