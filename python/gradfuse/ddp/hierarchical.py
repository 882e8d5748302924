"""``hierarchical_hook``: each bucket is reduce-scattered among the ranks of a node, each shard
allreduced across the nodes (between the ranks at the same position on every node), and the
shards allgathered within the node again, as the engine's hierarchical allreduce does
(cpp/engine/hierarchical.cpp): the slow links between nodes carry 1/local_size of the bucket.

Nodes are what the launcher reports (gradfuse.launch), or, for tests on one host, runs of
GRADFUSE_TEST_LOCAL_SIZE consecutive ranks, as for gradfuse.init()."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _engine, config
from .. import launch as _launch
from ._common import (
    all_gather_single,
    check_bucket,
    check_state,
    reduce_scatter_single,
    resolve_group,
)

_WHO = "gradfuse.ddp.HierarchicalState"


def _placements(group: dist.ProcessGroup) -> list:
    """Every rank's launch.Placement; a rank whose launcher variables are bad makes every
    rank raise (it cannot raise alone: the others would wait for it)."""
    try:
        mine = (_launch.placement(), None)
    except ValueError as e:
        mine = (None, str(e))
    every = [None] * group.size()
    dist.all_gather_object(every, mine, group=group)
    errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(every) if err]
    if errors:
        raise ValueError(f"{_WHO}: cannot tell the nodes apart: " + "; ".join(errors))
    return [p for p, _ in every]


class HierarchicalState:
    """The state of :func:`hierarchical_hook`: the node layout and its process groups.

    Made collectively, on every rank at once (it creates process groups), after
    ``dist.init_process_group``; the subgroups get the default group's backend.

    - ``nodes``: the global ranks of each node.
    - ``local_group``: this rank's node; ``cross_group``: the ranks at this rank's position
      on every node.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        group = resolve_group(process_group, _WHO)
        world = dist.get_world_size()
        if group.size() != world:
            raise ValueError(
                f"{_WHO}: process_group must span every rank (the default group): its node "
                f"groups are made by dist.new_group, which every rank joins; got a group of "
                f"{group.size()} of the {world} ranks"
            )
        self.process_group = group
        nodes = _engine._nodes(_placements(group), config.resolve())
        self.nodes = [sorted(node) for node in nodes]
        sizes = sorted({len(n) for n in self.nodes})
        if len(sizes) > 1:
            raise ValueError(
                f"{_WHO}: needs the same number of ranks on every node; the nodes have "
                f"{', '.join(str(len(n)) for n in self.nodes)} ranks"
            )
        self.local_group = self.cross_group = None
        rank = dist.get_rank()
        # new_group is collective over every rank: all make every group, in the same order.
        for node in self.nodes:
            made = dist.new_group(ranks=node)
            if rank in node:
                self.local_group = made
        for position in range(sizes[0]):
            ranks = [node[position] for node in self.nodes]
            made = dist.new_group(ranks=ranks)
            if rank in ranks:
                self.cross_group = made


def hierarchical_allreduce(
    tensor: torch.Tensor, state: HierarchicalState
) -> torch.futures.Future[torch.Tensor]:
    """Sums the contiguous ``tensor`` over every rank, in place, the hierarchical way; the
    future's value is ``tensor``. The reduce-scatter and the cross-node allreduce are waited
    for here (on NCCL that is the stream's wait, not the host's), so every rank launches each
    collective in the same order; the allgather runs on while backward goes on."""
    check_state(state, HierarchicalState, "hierarchical_hook")
    if not tensor.is_contiguous():
        raise ValueError("gradfuse.ddp.hierarchical_allreduce: tensor must be contiguous")
    flat = tensor.view(-1)
    n = flat.numel()
    local, cross = state.local_group, state.cross_group
    # reduce_scatter / all_gather on one tensor need equal shards: pad with zeros.
    shard = -(-n // local.size())
    padded = shard * local.size()
    buf = flat if padded == n else torch.cat([flat, flat.new_zeros(padded - n)])
    if local.size() > 1:
        mine = buf.new_empty(shard)
        reduce_scatter_single(mine, buf, group=local, async_op=True).wait()
    else:
        mine = buf
    if cross.size() > 1:
        dist.all_reduce(mine, group=cross, async_op=True).wait()
    if local.size() > 1:
        fut = all_gather_single(buf, mine, group=local, async_op=True).get_future()
    else:
        fut = torch.futures.Future()
        fut.set_result([buf])

    def copy_back(f):
        f.wait()
        if buf is not flat:
            flat.copy_(buf[:n])
        return tensor

    return fut.then(copy_back)


def hierarchical_hook(state, bucket):  # unannotated: see cast.fp16_hook
    """Average the bucket hierarchically.
    ``model.register_comm_hook(HierarchicalState(), hierarchical_hook)``."""
    state = check_state(state, HierarchicalState, "hierarchical_hook")
    buffer = bucket.buffer()
    check_bucket(state.process_group, buffer, "hierarchical_hook")
    buffer.div_(state.process_group.size())  # first, as DDP's allreduce_hook: no overflow
    return hierarchical_allreduce(buffer, state)
