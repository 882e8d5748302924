"""``topk_hook``: Deep Gradient Compression (Lin et al., 2018) inside DDP, on the same state as
``Compression.topk`` in DistributedOptimizer (compression.TopKState): per parameter a residual
(error feedback) and a velocity (momentum correction, with momentum factor masking), and the
density warm-up.

Per bucket, each rank sends the top-k entries of each large parameter's accumulated update
(values and bucket positions, one allgather each) and small parameters dense (one allreduce);
every rank scatter-adds the gathered picks in rank order (``topk_decompress``, deterministic),
so every rank steps with the same bits.

State is kept per parameter, not per bucket index: DDP rebuilds its buckets after the first
iteration (indices then name other parameters), and a checkpoint must load into a model whose
buckets are laid out afresh. The buckets only group the exchange."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import ops
from ..compression import TopKCompressor, TopKState
from ._common import (
    IterationClock,
    agree,
    all_gather_single,
    check_bucket,
    check_state,
    offset_in,
    resolve_group,
)

_WHO = "gradfuse.ddp.TopKHookState"


class TopKHookState:
    """The state of :func:`topk_hook`.

    Args:
        model: the model (DDP's or the module inside): its ``parameters()`` order numbers the
            state in :meth:`state_dict`.
        compression: ``gradfuse.Compression.topk(ratio, ...)``, its settings.
        optimizer: a ``torch.optim.SGD`` with momentum whose momentum (and weight decay,
            nesterov) momentum correction takes over, as DistributedOptimizer does: its
            ``step()`` must then run inside ``with state.optimizer_step():`` (which turns
            them off for that step). Or None, with ``Compression.topk(momentum=m)`` and a
            momentum-free optimizer; without either there is no momentum correction.
        process_group: DDP's group (None: the default group).

    Made on every rank of the group at once (it checks that they agree).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        compression: TopKCompressor,
        optimizer: torch.optim.Optimizer | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{_WHO}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(compression, TopKCompressor):
            raise TypeError(
                f"{_WHO}: compression must be gradfuse.Compression.topk(ratio, ...), got "
                f"{compression!r}"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{_WHO}: optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}"
            )
        self.process_group = resolve_group(process_group, _WHO)
        self.settings = compression
        self._params = list(model.parameters())
        # Ranks that disagree would gather picks of different lengths: raise at once instead.
        shapes = [tuple(p.shape) for p in self._params]
        agree(
            self.process_group,
            _WHO,
            "the settings and parameter shapes",
            (repr(compression), shapes),
        )
        self._dgc = TopKState(compression, optimizer)
        self._clock = IterationClock()
        self._unstepped = False  # an iteration's gradients not yet stepped inside optimizer_step

    @property
    def step(self) -> int:
        """DDP iterations so far (the warm-up's clock)."""
        return self._dgc.step

    @contextlib.contextmanager
    def optimizer_step(self):
        """Around ``optimizer.step()`` when momentum is taken over from the SGD (see above)."""
        with self._dgc.momentum_off():
            yield
        self._unstepped = False

    def state_dict(self) -> dict:
        """Residuals, velocities and the step count; parameters by position in ``model``."""
        return {"topk": self._dgc.state_dict(self._params)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "topk" not in state:
            raise ValueError(
                f"{_WHO}.load_state_dict: expected a dict from state_dict(), got {state!r:.80}"
            )
        memory = state["topk"]["memory"]
        bad = [i for i in memory if not 0 <= i < len(self._params)]
        if bad:
            raise ValueError(
                f"{_WHO}.load_state_dict: the state numbers parameters {bad[:5]}, but the model "
                f"has {len(self._params)}: it was saved from another model"
            )
        self._dgc.load_state_dict(state["topk"], self._params)

    def _begin(self, bucket: dist.GradBucket) -> None:
        if not self._clock.begins(bucket):
            return
        if self._unstepped and self._dgc.takes_over_momentum:
            raise RuntimeError(
                "gradfuse.ddp.topk_hook applies the SGD's momentum before compression, so "
                "optimizer.step() must run inside `with state.optimizer_step():` (else the "
                "momentum is applied twice); the last iteration's step did not"
            )

    def _end(self, bucket: dist.GradBucket) -> None:
        if bucket.is_last():
            self._dgc.step += 1
            self._unstepped = True

    def _compress(self, bucket: dist.GradBucket):
        """Per parameter of the bucket: ``dense`` [(offset, tensor)] to allreduce, and the top-k
        picks as (float32 values, int64 positions in the bucket) to allgather."""
        buffer = bucket.buffer()
        dense, values, positions = [], [], []
        for grad, param in zip(bucket.gradients(), bucket.parameters()):
            payload, _ = self._dgc.compress(grad, param)
            if isinstance(payload, tuple):
                picked, where = payload
                values.append(picked.float())
                positions.append(where.to(torch.int64) + offset_in(buffer, grad))
            else:
                dense.append((offset_in(buffer, grad), payload.reshape(-1)))
        return dense, values, positions


def _lengths(tensor: torch.Tensor, group: dist.ProcessGroup) -> list[int]:
    """Every rank's ``tensor.numel()`` (sampled selection sends between k and 2k values)."""
    mine = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    every = mine.new_empty(group.size())
    all_gather_single(every, mine, group=group)
    return every.tolist()


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, longest: int):
    """Every rank's ``tensor``, each padded to ``longest``, back to back (and the future)."""
    if tensor.numel() < longest:
        tensor = torch.cat([tensor, tensor.new_zeros(longest - tensor.numel())])
    out = tensor.new_empty(group.size() * longest)
    work = all_gather_single(out, tensor, group=group, async_op=True)
    return out, work.get_future()


def _unpadded(gathered: torch.Tensor, lengths: list[int], longest: int) -> torch.Tensor:
    if all(n == longest for n in lengths):
        return gathered
    return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(lengths)])


def _exchange(state: TopKHookState, buffer: torch.Tensor, dense, values, positions):
    """Launches the bucket's collectives (here, in bucket order on every rank: the callbacks
    below launch none, so Gloo's threads cannot reorder them) and returns the future of the
    averaged bucket."""
    group = state.process_group
    futures = []
    dense_flat = None
    if dense:
        dense_flat = torch.cat([t for _, t in dense])
        futures.append(dist.all_reduce(dense_flat, group=group, async_op=True).get_future())
    gathered = None
    if values:
        values, positions = torch.cat(values), torch.cat(positions)
        # Exact selection sends k per parameter on every rank; sampled, between k and 2k.
        lengths = _lengths(values, group) if state.settings.sampled else [values.numel()]
        longest = max(lengths)
        gathered_values, f1 = _all_gather(values, group, longest)
        gathered_positions, f2 = _all_gather(positions, group, longest)
        futures += [f1, f2]
        gathered = (gathered_values, gathered_positions, lengths, longest)

    def average(fut):
        for f in fut.wait():
            f.wait()  # raises a failed collective's error
        if gathered is None:
            buffer.zero_()
        else:
            gv, gp, lengths, longest = gathered
            gv, gp = _unpadded(gv, lengths, longest), _unpadded(gp, lengths, longest)
            buffer.copy_(ops.topk_decompress(gv, gp, buffer.numel()))
        start = 0
        for offset, t in dense:
            buffer[offset : offset + t.numel()] = dense_flat[start : start + t.numel()]
            start += t.numel()
        buffer.div_(group.size())
        return buffer

    return torch.futures.collect_all(futures).then(average)


def topk_hook(state, bucket):  # unannotated: see cast.fp16_hook
    """Average the bucket by DGC top-k. ``model.register_comm_hook(TopKHookState(...),
    topk_hook)``."""
    state = check_state(state, TopKHookState, "topk_hook")
    check_bucket(state.process_group, bucket.buffer(), "topk_hook")
    state._begin(bucket)
    dense, values, positions = state._compress(bucket)
    state._end(bucket)
    return _exchange(state, bucket.buffer(), dense, values, positions)
