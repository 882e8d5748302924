"""Model/optimizer synchronization and Python-object collectives over the engine.

- :func:`broadcast_parameters` — every parameter/buffer from ``root_rank`` (start of training,
  or after restoring a checkpoint on the root only).
- :func:`broadcast_optimizer_state` — the whole optimizer state (tensors, Python scalars and
  nested state, types kept) from ``root_rank``.
- :func:`broadcast_object` / :func:`allgather_object` — any picklable object.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Mapping

import torch

from . import collectives
from . import process_sets as _sets
from ._engine import rank, size
from .process_sets import global_process_set


def broadcast_parameters(params, root_rank: int, process_set=global_process_set) -> None:
    """Overwrite ``params`` on every rank (of ``process_set``) with the root's values, in place.

    ``params`` takes every form Horovod's does: a ``state_dict()`` (any mapping name ->
    tensor), a list of ``(name, tensor)`` pairs such as ``list(model.named_parameters())``,
    or a list of bare tensors such as ``list(model.parameters())`` (pairs and bare tensors
    may be mixed; a bare tensor, or a pair whose name is None, is named by its position).
    Unlike Horovod, any other iterable of those works too (``model.parameters()`` itself,
    a tuple). Everything is checked before anything is sent, so a bad entry raises here
    without leaving a broadcast half submitted.

    Example::

        gradfuse.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    fn = "broadcast_parameters"
    named = _named_tensors(params)
    root_rank = collectives._check_root(root_rank, fn)
    process_set = _sets._check(process_set, fn)
    _sets._set_rank(process_set, root_rank, fn)
    for name, tensor in named:
        collectives._check_tensor(tensor, f"{fn} ({name})")
        collectives._check_writable(tensor, f"{fn} ({name})")
    handles = [
        collectives.broadcast_async_(
            tensor, root_rank, name=f"broadcast.param.{name}", process_set=process_set
        )
        for name, tensor in named
    ]
    for handle in handles:
        collectives.synchronize(handle)


def _named_tensors(params) -> list[tuple[str, torch.Tensor]]:
    """broadcast_parameters' `params` as (name, tensor) pairs with unique names; TypeError or
    ValueError (naming the entry) for anything that is not one of its forms."""
    expected = (
        "a state_dict, a list of (name, tensor) pairs (model.named_parameters()) or a list of "
        "tensors (model.parameters())"
    )
    if isinstance(params, Mapping):
        entries = [(key, tensor, f"params[{key!r}]") for key, tensor in params.items()]
    elif isinstance(params, (torch.Tensor, str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            f"broadcast_parameters: params must be {expected}, got a {type(params).__name__}"
        )
    else:
        entries = [_entry(i, item, expected) for i, item in enumerate(params)]
    named, seen = [], set()
    for key, tensor, where in entries:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"broadcast_parameters: {where} must be a tensor, got a {type(tensor).__name__}"
            )
        name = str(key)
        if name in seen:
            raise ValueError(f"broadcast_parameters: the name {name!r} appears twice in params")
        seen.add(name)
        named.append((name, tensor))
    return named


def _entry(index, item, expected):
    """(key, tensor, where) for one entry of a params list: a bare tensor or a None name is
    named by its position ("#index", which no named_parameters() name looks like)."""
    if isinstance(item, tuple) and len(item) == 2:
        key, tensor = item
        if key is not None and not isinstance(key, str):
            raise TypeError(
                f"broadcast_parameters: params[{index}] is a pair whose name is a "
                f"{type(key).__name__}, not a str"
            )
        return (f"#{index}" if key is None else key), tensor, f"params[{index}][1]"
    if isinstance(item, torch.Tensor):
        return f"#{index}", item, f"params[{index}]"
    raise TypeError(
        f"broadcast_parameters: params must be {expected}; params[{index}] is a "
        f"{type(item).__name__}"
    )


def _object_name(name, default):
    return default if name is None else collectives._name(name, default)


def _pickled(obj):
    """(payload, None), or (b"", why) when obj cannot be pickled."""
    try:
        return pickle.dumps(obj), None
    except Exception as e:  # noqa: BLE001  (pickle raises many types; every rank is told)
        return b"", f"{type(e).__name__}: {e}"


def broadcast_object(
    obj=None, root_rank: int = 0, name: str | None = None, process_set=global_process_set
):
    """The root's ``obj`` on every rank of ``process_set`` (pickled; other ranks' ``obj`` is
    ignored; ``root_rank`` is a global rank).

    Example::

        epoch = gradfuse.broadcast_object(checkpoint_epoch if rank == 0 else None, 0)
    """
    name = _object_name(name, "broadcast_object")
    _sets._set_rank(_sets._check(process_set, "broadcast_object"), root_rank, "broadcast_object")
    payload, error = _pickled(obj) if rank() == root_rank else (b"", None)
    # A root that cannot pickle sends length -1, so every rank raises (not only the root).
    length = torch.tensor([-1 if error else len(payload)], dtype=torch.int64)
    collectives.broadcast_(length, root_rank, name=f"{name}.length", process_set=process_set)
    if length.item() < 0:
        raise TypeError(
            f"gradfuse.broadcast_object: the root (rank {root_rank}) could not pickle obj"
            + (f": {error}" if error else "")
        )
    data = torch.zeros(int(length.item()), dtype=torch.uint8)
    if rank() == root_rank:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    collectives.broadcast_(data, root_rank, name=f"{name}.data", process_set=process_set)
    return obj if rank() == root_rank else pickle.loads(data.numpy().tobytes())


def allgather_object(obj, name: str | None = None, process_set=global_process_set) -> list:
    """Every rank's ``obj``, as a list indexed by rank (with ``process_set``: its ranks', by
    their place in the set).

    Example::

        losses = gradfuse.allgather_object(epoch_loss)   # [loss of rank 0, rank 1, ...]
    """
    name = _object_name(name, "allgather_object")
    process_set = _sets._check(process_set, "allgather_object")
    payload, error = _pickled(obj)
    # A rank that cannot pickle sends length -1, so every rank raises (not only that one).
    lengths = collectives.allgather(
        torch.tensor([-1 if error else len(payload)], dtype=torch.int64),
        name=f"{name}.length",
        process_set=process_set,
    )
    failed = [_sets._global_rank(process_set, r) for r, n in enumerate(lengths.tolist()) if n < 0]
    if failed:
        raise TypeError(
            f"gradfuse.allgather_object: rank(s) {failed} could not pickle obj"
            + (f"; here: {error}" if error else "")
        )
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    gathered = collectives.allgather(data, name=f"{name}.data", process_set=process_set)
    out, offset = [], 0
    for n in lengths.tolist():
        out.append(pickle.loads(gathered[offset : offset + n].numpy().tobytes()))
        offset += n
    return out


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int, process_set=global_process_set
) -> None:
    """Make every rank's (of ``process_set``) optimizer state and hyper-parameters the root's.

    The root's ``state_dict()`` travels serialized by ``torch.save``, so every entry arrives
    with its type: state other ranks have not created yet (Adam before its first step),
    hyper-parameters given as tensors (``lr=torch.tensor(0.01)``, kept on each rank's own
    device), and nested non-tensor state (LBFGS's history lists and counters). Works for any
    torch optimizer whose ``load_state_dict`` accepts its own ``state_dict``, LBFGS and
    SparseAdam included (Horovod refuses LBFGS). Unlike Horovod, a root with no state yet
    sends none (it does not step with zero gradients to create some), and the other ranks'
    state is cleared to match. For a gradfuse ``DistributedOptimizer``, the wrapped
    optimizer's state and the step count travel; each rank keeps its own top-k residuals
    (its unsent gradient, which is not the root's).

    Every rank checks first that its parameters have the root's layout (groups, and the
    shape of each parameter); if not, every rank raises the same ValueError naming the ranks.

    Example::

        if gradfuse.rank() == 0:
            optimizer.load_state_dict(torch.load("checkpoint.pt")["optimizer"])
        gradfuse.broadcast_optimizer_state(optimizer, root_rank=0)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "broadcast_optimizer_state: optimizer must be a torch.optim.Optimizer, "
            f"got {type(optimizer).__name__}"
        )
    root_rank = collectives._check_root(root_rank, "broadcast_optimizer_state")
    process_set = _sets._check(process_set, "broadcast_optimizer_state")
    _sets._set_rank(process_set, root_rank, "broadcast_optimizer_state")
    _check_same_layout(optimizer, root_rank, process_set)
    blob = None
    if rank() == root_rank:
        buffer = io.BytesIO()
        torch.save(_shared_state(optimizer), buffer)
        blob = buffer.getvalue()
    blob = broadcast_object(
        blob, root_rank, name="broadcast.optimizer_state", process_set=process_set
    )
    if rank() != root_rank:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        _load_shared_state(optimizer, state)


def _layout(optimizer) -> list[list[tuple]]:
    return [[tuple(p.shape) for p in group["params"]] for group in optimizer.param_groups]


def _check_same_layout(optimizer, root_rank: int, process_set) -> None:
    """The root's state fits only parameters shaped like the root's: compared on every rank
    of the set (load_state_dict would fail on the odd rank alone, or not at all for a shape)."""
    gathered = allgather_object(
        _layout(optimizer), name="broadcast.optimizer_state.layout", process_set=process_set
    )
    ranks = range(size()) if process_set.process_set_id == 0 else process_set.ranks
    layouts = dict(zip(ranks, gathered))  # global rank -> its layout
    root = layouts[root_rank]
    differing = [r for r, layout in layouts.items() if layout != root]
    if differing:
        per_rank = "; ".join(f"rank {r}: {_describe(layouts[r])}" for r in differing)
        raise ValueError(
            "broadcast_optimizer_state: the optimizer's parameters differ from the root's, so "
            f"its state cannot be shared. Root rank {root_rank}: {_describe(root)}; {per_rank}"
        )


def _describe(layout) -> str:
    groups = ", ".join("[" + ", ".join(str(list(s)) for s in g) + "]" for g in layout)
    return f"{len(layout)} param group(s) of shapes {groups}"


def _shared_state(optimizer) -> dict:
    """What the other ranks take from the root. A gradfuse DistributedOptimizer shares its
    wrapped optimizer's state and step count, not its top-k residuals."""
    base = getattr(optimizer, "_gf_base", None)
    if base is None:
        return {"optimizer": optimizer.state_dict()}
    topk = getattr(optimizer, "_gf_topk", None)  # its warm-up step count is shared
    return {"optimizer": base.state_dict(optimizer), "topk_step": topk.step if topk else None}


def _load_shared_state(optimizer, shared: dict) -> None:
    # Tensor hyper-parameters stay on this rank's device (the root's may be another GPU).
    devices = [
        {k: v.device for k, v in group.items() if isinstance(v, torch.Tensor)}
        for group in optimizer.param_groups
    ]
    base = getattr(optimizer, "_gf_base", None)
    if base is None:
        optimizer.load_state_dict(shared["optimizer"])
    else:
        base.load_state_dict(optimizer, shared["optimizer"])
        if shared["topk_step"] is not None and optimizer._gf_topk is not None:
            optimizer._gf_topk.step = shared["topk_step"]
    for group, kept in zip(optimizer.param_groups, devices):
        for key, device in kept.items():
            if isinstance(group.get(key), torch.Tensor):
                group[key] = group[key].to(device)


__all__ = [
    "allgather_object",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
]
