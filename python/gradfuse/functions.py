"""Model/optimizer synchronization and Python-object collectives over the engine.

- :func:`broadcast_parameters` — every parameter/buffer from ``root_rank`` (start of training,
  or after restoring a checkpoint on the root only).
- :func:`broadcast_optimizer_state` — the whole optimizer state (tensors and Python scalars,
  types kept) from ``root_rank``.
- :func:`broadcast_object` / :func:`allgather_object` — any picklable object.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Mapping

import torch

from . import collectives
from . import process_sets as _sets
from ._engine import rank
from .process_sets import global_process_set


def broadcast_parameters(params, root_rank: int, process_set=global_process_set) -> None:
    """Overwrite ``params`` on every rank (of ``process_set``) with the root's values, in place.

    ``params``: a ``state_dict()`` (mapping name -> tensor) or an iterable of ``(name,
    tensor)`` pairs such as ``model.named_parameters()``.

    Example::

        gradfuse.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if isinstance(params, Mapping):
        items = list(params.items())
    elif isinstance(params, Iterable):
        items = list(params)
        if any(not (isinstance(x, tuple) and len(x) == 2) for x in items):
            raise ValueError(
                "broadcast_parameters: params must be a state_dict or (name, tensor) pairs"
            )
    else:
        raise TypeError(
            f"broadcast_parameters: params must be a state_dict or (name, tensor) "
            f"pairs, got {type(params)}"
        )
    handles = []
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"broadcast_parameters: {name} is a {type(tensor)}, not a tensor")
        # .data: parameters are leaves that require grad; this is not a differentiable op.
        target = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        handles.append(
            collectives.broadcast_async_(
                target, root_rank, name=f"broadcast.param.{name}", process_set=process_set
            )
        )
    for handle in handles:
        collectives.synchronize(handle)


def broadcast_object(
    obj=None, root_rank: int = 0, name: str | None = None, process_set=global_process_set
):
    """The root's ``obj`` on every rank of ``process_set`` (pickled; other ranks' ``obj`` is
    ignored; ``root_rank`` is a global rank).

    Example::

        epoch = gradfuse.broadcast_object(checkpoint_epoch if rank == 0 else None, 0)
    """
    name = name or "broadcast_object"
    _sets._set_rank(_sets._check(process_set, "broadcast_object"), root_rank, "broadcast_object")
    payload = pickle.dumps(obj) if rank() == root_rank else b""
    length = torch.tensor([len(payload)], dtype=torch.int64)
    collectives.broadcast_(length, root_rank, name=f"{name}.length", process_set=process_set)
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
    name = name or "allgather_object"
    _sets._check(process_set, "allgather_object")
    payload = pickle.dumps(obj)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    lengths = collectives.allgather(
        torch.tensor([len(payload)], dtype=torch.int64),
        name=f"{name}.length",
        process_set=process_set,
    )
    gathered = collectives.allgather(data, name=f"{name}.data", process_set=process_set)
    out, offset = [], 0
    for n in lengths.tolist():
        out.append(pickle.loads(gathered[offset : offset + n].numpy().tobytes()))
        offset += n
    return out


def broadcast_optimizer_state(
    optimizer: torch.optim.Optimizer, root_rank: int, process_set=global_process_set
) -> None:
    """Make every rank's (of ``process_set``) optimizer state (and hyper-parameters) the
    root's.

    The root's ``state_dict()`` travels serialized by ``torch.save``, so every state tensor
    and Python scalar arrives with its type, including state other ranks have not created
    yet (e.g. Adam before its first step). Works for any torch optimizer whose
    ``load_state_dict`` accepts its own ``state_dict``.

    Example::

        if gradfuse.rank() == 0:
            optimizer.load_state_dict(torch.load("checkpoint.pt")["optimizer"])
        gradfuse.broadcast_optimizer_state(optimizer, root_rank=0)
    """
    if rank() == root_rank:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        blob = buffer.getvalue()
    else:
        blob = None
    blob = broadcast_object(
        blob, root_rank, name="broadcast.optimizer_state", process_set=process_set
    )
    if rank() != root_rank:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state)


__all__ = [
    "allgather_object",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
]
