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
from ._engine import rank


def broadcast_parameters(params, root_rank: int) -> None:
    """Overwrite ``params`` on every rank with the root's values, in place.

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
            collectives.broadcast_async_(target, root_rank, name=f"broadcast.param.{name}")
        )
    for handle in handles:
        collectives.synchronize(handle)


def _object_name(name, default):
    return default if name is None else collectives._name(name, default)


def _pickled(obj):
    """(payload, None), or (b"", why) when obj cannot be pickled."""
    try:
        return pickle.dumps(obj), None
    except Exception as e:  # noqa: BLE001  (pickle raises many types; every rank is told)
        return b"", f"{type(e).__name__}: {e}"


def broadcast_object(obj=None, root_rank: int = 0, name: str | None = None):
    """The root's ``obj`` on every rank (pickled; other ranks' ``obj`` is ignored).

    Example::

        epoch = gradfuse.broadcast_object(checkpoint_epoch if rank == 0 else None, 0)
    """
    name = _object_name(name, "broadcast_object")
    payload, error = _pickled(obj) if rank() == root_rank else (b"", None)
    # A root that cannot pickle sends length -1, so every rank raises (not only the root).
    length = torch.tensor([-1 if error else len(payload)], dtype=torch.int64)
    collectives.broadcast_(length, root_rank, name=f"{name}.length")
    if length.item() < 0:
        raise TypeError(
            f"gradfuse.broadcast_object: the root (rank {root_rank}) could not pickle obj"
            + (f": {error}" if error else "")
        )
    data = torch.zeros(int(length.item()), dtype=torch.uint8)
    if rank() == root_rank:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    collectives.broadcast_(data, root_rank, name=f"{name}.data")
    return obj if rank() == root_rank else pickle.loads(data.numpy().tobytes())


def allgather_object(obj, name: str | None = None) -> list:
    """Every rank's ``obj``, as a list indexed by rank.

    Example::

        losses = gradfuse.allgather_object(epoch_loss)   # [loss of rank 0, rank 1, ...]
    """
    name = _object_name(name, "allgather_object")
    payload, error = _pickled(obj)
    # A rank that cannot pickle sends length -1, so every rank raises (not only that one).
    lengths = collectives.allgather(
        torch.tensor([-1 if error else len(payload)], dtype=torch.int64), name=f"{name}.length"
    )
    failed = [r for r, n in enumerate(lengths.tolist()) if n < 0]
    if failed:
        raise TypeError(
            f"gradfuse.allgather_object: rank(s) {failed} could not pickle obj"
            + (f"; here: {error}" if error else "")
        )
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    gathered = collectives.allgather(data, name=f"{name}.data")
    out, offset = [], 0
    for n in lengths.tolist():
        out.append(pickle.loads(gathered[offset : offset + n].numpy().tobytes()))
        offset += n
    return out


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int) -> None:
    """Make every rank's optimizer state (and hyper-parameters) the root's.

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
    blob = broadcast_object(blob, root_rank, name="broadcast.optimizer_state")
    if rank() != root_rank:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state)


__all__ = [
    "allgather_object",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
]
