"""Horovod-style collectives over the C++ engine. Tensors reach the engine through
torch.ops.gradfuse._enqueue; the returned integer handle is waited on with _C.engine_wait
(GIL released) and the output collected with torch.ops.gradfuse._engine_result."""

from __future__ import annotations

import contextlib
import itertools
import threading

import torch

from . import _engine

# Reduce ops; the values are the engine's ReduceOp enum (cpp/engine/message.h).
Sum, Average, Min, Max, Product = 0, 1, 2, 3, 4
_OP_NAMES = {Sum: "Sum", Average: "Average", Min: "Min", Max: "Max", Product: "Product"}
_ALLREDUCE, _ALLGATHER, _BROADCAST = 0, 1, 2

# handle -> the caller's tensor for in-place calls (synchronize returns it), else None. For a
# non-contiguous in-place tensor the engine works on a contiguous copy, copied back then.
_pending: dict[int, torch.Tensor | None] = {}
_pending_lock = threading.Lock()
_auto_names = itertools.count()


# Per thread: how deep in submitted_together() blocks it is, and the handles it submitted
# there. Those are held until its outermost block ends, so this thread waiting for one inside
# the block would wait forever: synchronize() raises instead.
_held = threading.local()


@contextlib.contextmanager
def submitted_together():
    """Collectives submitted inside this block reach the other ranks together, after it ends:
    one negotiation and, where they fit the fusion threshold, one fused collective. Without
    it, the engine's thread may pick up the first submission before the rest arrive. Blocks
    nest; the handles are synchronized after the block. Inside it, use the *_async forms: a
    blocking collective (or synchronize() of a handle submitted in the block) raises a
    RuntimeError, since what it waits for is held until the block ends."""
    from . import _C

    _engine._require()
    _C.engine_hold()
    depth = getattr(_held, "depth", 0)
    if depth == 0:
        _held.handles = set()
    _held.depth = depth + 1
    try:
        yield
    finally:
        _held.depth = depth
        if depth == 0:
            _held.handles = set()
        _C.engine_release()


def _refuse_inside_hold(fn):
    """A blocking collective inside submitted_together() would wait for its own submission,
    which is held until the block ends: refused before anything is submitted."""
    if getattr(_held, "depth", 0):
        raise RuntimeError(
            f"gradfuse.{fn}: a blocking collective cannot run inside submitted_together(): "
            "what it submits is held until the block ends, so it would wait forever. Inside "
            "the block use the *_async forms (allreduce_async, ...) and synchronize after it."
        )


def _note_submitted(handle):
    if getattr(_held, "depth", 0):
        _held.handles.add(handle)


def _name(name, kind):
    if name is None:
        # Ranks calling the same unnamed collectives in the same order get the same names.
        return f"{kind}.noname.{next(_auto_names)}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string or None, got {name!r}")
    return name


def _check_tensor(tensor, fn):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"gradfuse.{fn}: tensor must be a torch.Tensor, got {type(tensor)}")


def _resolve_op(average, op, fn):
    if average is not None:
        if op is not None:
            raise ValueError(f"gradfuse.{fn}: give op or the deprecated average, not both")
        return Average if average else Sum
    if op is None:
        return Average  # Horovod's default
    if op not in _OP_NAMES:
        raise ValueError(
            f"gradfuse.{fn}: op must be gradfuse.Sum, Average, Min, Max or Product, got {op!r}"
        )
    return op


def _enqueue(name, kind, tensor, output, root=0, op=Sum, prescale=1.0, postscale=1.0):
    _engine._require()
    in_place = output if output is tensor else None
    if output is not None and not output.is_contiguous():
        output = torch.empty_like(output, memory_format=torch.contiguous_format)
    handle = torch.ops.gradfuse._enqueue(
        name,
        kind,
        tensor.detach(),
        None if output is None else output.detach(),
        root,
        op,
        float(prescale),
        float(postscale),
    )
    with _pending_lock:
        _pending[handle] = in_place
    _note_submitted(handle)
    return handle


def poll(handle: int) -> bool:
    """True when the operation behind `handle` has finished (synchronize() will not block)."""
    from . import _C

    return _C.engine_poll(handle)


_WAIT_SLICE_S = 0.1  # how long synchronize() waits in C++ before checking for Ctrl-C


def synchronize(handle: int) -> torch.Tensor:
    """Waits for `handle` (GIL released) and returns its output; raises the operation's error
    (RuntimeError) if it failed, e.g. on a cross-rank mismatch or shutdown."""
    from . import _C

    if not isinstance(handle, int):
        raise TypeError(f"synchronize: handle must be an int from an *_async call, got {handle!r}")
    if getattr(_held, "depth", 0) and handle in _held.handles:
        raise RuntimeError(
            f"gradfuse.synchronize: handle {handle} was submitted inside submitted_together() "
            "on this thread and is held until the block ends, so waiting for it here would "
            "never return. Inside the block use the *_async forms (allreduce_async, ...) and "
            "synchronize after it."
        )
    try:
        # In slices, returning to the interpreter in between, so Ctrl-C (KeyboardInterrupt)
        # ends a long wait; the handle stays valid and can be synchronized again.
        while not _C.engine_wait_for(handle, _WAIT_SLICE_S):
            pass
    except RuntimeError:
        # The failure is reported here, once: the handle is released rather than kept for
        # a result that will never come (a second synchronize says it is unknown).
        _C.engine_forget(handle)
        with _pending_lock:
            _pending.pop(handle, None)
            _alltoall_handles.discard(handle)
        raise
    with _pending_lock:
        in_place = _pending.pop(handle, None)
        received_splits = handle in _alltoall_handles
        _alltoall_handles.discard(handle)
    if received_splits:  # alltoall: (output, the rows received from each rank)
        splits = torch.ops.gradfuse._engine_aux(handle)
        return torch.ops.gradfuse._engine_result(handle), splits
    out = torch.ops.gradfuse._engine_result(handle)
    if in_place is None:
        return out
    if out.data_ptr() != in_place.data_ptr() or not in_place.is_contiguous():
        with torch.no_grad():
            in_place.copy_(out)  # the engine worked on a contiguous copy
    return in_place


# ---- allreduce -------------------------------------------------------------------------------


def allreduce_async(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0
) -> int:
    _check_tensor(tensor, "allreduce_async")
    op = _resolve_op(average, op, "allreduce_async")
    output = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _enqueue(
        _name(name, "allreduce"),
        _ALLREDUCE,
        tensor,
        output,
        op=op,
        prescale=prescale_factor,
        postscale=postscale_factor,
    )


def allreduce_async_(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0
) -> int:
    _check_tensor(tensor, "allreduce_async_")
    op = _resolve_op(average, op, "allreduce_async_")
    return _enqueue(
        _name(name, "allreduce"),
        _ALLREDUCE,
        tensor,
        tensor,
        op=op,
        prescale=prescale_factor,
        postscale=postscale_factor,
    )


def allreduce_(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0
) -> torch.Tensor:
    _refuse_inside_hold("allreduce_")
    return synchronize(
        allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor)
    )


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, prescale, postscale):
        ctx.op, ctx.prescale, ctx.postscale = op, prescale, postscale
        return synchronize(
            allreduce_async(
                tensor, name=name, op=op, prescale_factor=prescale, postscale_factor=postscale
            )
        )

    @staticmethod
    def backward(ctx, grad):
        if ctx.op not in (Sum, Average):
            raise RuntimeError(
                f"gradfuse.allreduce: no gradient for op {_OP_NAMES[ctx.op]} "
                "(only Sum and Average are differentiable)"
            )
        return (
            allreduce(
                grad, op=ctx.op, prescale_factor=ctx.prescale, postscale_factor=ctx.postscale
            ),
            None,
            None,
            None,
            None,
        )


def allreduce(
    tensor,
    average=None,
    name=None,
    compression=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> torch.Tensor:
    """Reduces `tensor` over all ranks (default op: Average) and returns a new tensor.
    Differentiable for Sum and Average."""
    _refuse_inside_hold("allreduce")
    _check_tensor(tensor, "allreduce")
    if compression is not None:
        raise ValueError("gradfuse.allreduce: compression is not supported yet; pass None")
    op = _resolve_op(average, op, "allreduce")
    return _Allreduce.apply(tensor, _name(name, "allreduce"), op, prescale_factor, postscale_factor)


def grouped_allreduce_async(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0
) -> list[int]:
    op = _resolve_op(average, op, "grouped_allreduce")
    base = _name(name, "grouped_allreduce")
    with submitted_together():
        return [
            allreduce_async(
                t,
                name=f"{base}.{i}",
                op=op,
                prescale_factor=prescale_factor,
                postscale_factor=postscale_factor,
            )
            for i, t in enumerate(tensors)
        ]


def grouped_allreduce(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0
) -> list[torch.Tensor]:
    """Allreduce of a list of tensors, submitted together so the engine fuses them."""
    _refuse_inside_hold("grouped_allreduce")
    handles = grouped_allreduce_async(tensors, average, name, op, prescale_factor, postscale_factor)
    return [synchronize(h) for h in handles]


# ---- allgather -------------------------------------------------------------------------------


def allgather_async(tensor, name=None) -> int:
    _check_tensor(tensor, "allgather_async")
    return _enqueue(_name(name, "allgather"), _ALLGATHER, tensor, None)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name):
        ctx.dim0 = tensor.shape[0]
        return synchronize(allgather_async(tensor, name=name))

    @staticmethod
    def backward(ctx, grad):
        # Every rank's output feeds the loss: sum the gradients, keep this rank's rows.
        grad = allreduce(grad, op=Sum)
        dims = synchronize(allgather_async(torch.tensor([ctx.dim0], dtype=torch.int64)))
        start = int(dims[: _engine.rank()].sum())
        return grad.narrow(0, start, ctx.dim0), None


def allgather(tensor, name=None) -> torch.Tensor:
    """Concatenates every rank's tensor along dim 0 (its size may differ per rank)."""
    _refuse_inside_hold("allgather")
    _check_tensor(tensor, "allgather")
    if tensor.dim() == 0:
        raise ValueError(
            "gradfuse.allgather: tensor must have at least one dimension (the one gathered along)"
        )
    return _Allgather.apply(tensor, _name(name, "allgather"))


# ---- broadcast -------------------------------------------------------------------------------


def _check_root(root_rank, fn):
    if isinstance(root_rank, bool) or not isinstance(root_rank, int):
        raise TypeError(f"gradfuse.{fn}: root_rank must be an int, got {root_rank!r}")
    return root_rank


def broadcast_async(tensor, root_rank, name=None) -> int:
    _check_tensor(tensor, "broadcast_async")
    output = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _enqueue(
        _name(name, "broadcast"),
        _BROADCAST,
        tensor,
        output,
        root=_check_root(root_rank, "broadcast_async"),
    )


def broadcast_async_(tensor, root_rank, name=None) -> int:
    _check_tensor(tensor, "broadcast_async_")
    return _enqueue(
        _name(name, "broadcast"),
        _BROADCAST,
        tensor,
        tensor,
        root=_check_root(root_rank, "broadcast_async_"),
    )


def broadcast_(tensor, root_rank, name=None) -> torch.Tensor:
    _refuse_inside_hold("broadcast_")
    return synchronize(broadcast_async_(tensor, root_rank, name))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name):
        ctx.root = root_rank
        return synchronize(broadcast_async(tensor, root_rank, name=name))

    @staticmethod
    def backward(ctx, grad):
        # Only the root's input reached the outputs: it gets the sum of all ranks' gradients.
        grad = allreduce(grad, op=Sum)
        if _engine.rank() != ctx.root:
            grad = torch.zeros_like(grad)
        return grad, None, None


def broadcast(tensor, root_rank, name=None) -> torch.Tensor:
    """Returns root_rank's tensor on every rank; `tensor` itself is left untouched."""
    _refuse_inside_hold("broadcast")
    _check_tensor(tensor, "broadcast")
    return _Broadcast.apply(tensor, _check_root(root_rank, "broadcast"), _name(name, "broadcast"))


# ---- reducescatter, alltoall, barrier, join --------------------------------------------------

_REDUCESCATTER, _ALLTOALL, _BARRIER, _JOIN = 3, 4, 5, 6
_alltoall_handles: set[int] = set()  # synchronize() returns (output, received_splits) for these


def reducescatter_async(tensor, op=Average, name=None) -> int:
    _check_tensor(tensor, "reducescatter_async")
    if op not in (Sum, Average):
        raise ValueError(f"gradfuse.reducescatter: op must be gradfuse.Sum or Average, got {op!r}")
    return _enqueue(_name(name, "reducescatter"), _REDUCESCATTER, tensor, None, op=op)


def reducescatter(tensor, op=Average, name=None) -> torch.Tensor:
    """Reduces `tensor` (same shape on every rank) over all ranks and returns this rank's rows
    of the result. Dim 0 is split as evenly as possible; the first (dim0 % size) ranks get one
    row more (Horovod's split). op: Sum or Average."""
    _refuse_inside_hold("reducescatter")
    return synchronize(reducescatter_async(tensor, op=op, name=name))


def _splits_list(splits):
    if isinstance(splits, torch.Tensor):
        if splits.dim() != 1 or splits.is_floating_point() or splits.is_complex():
            raise ValueError(
                f"gradfuse.alltoall: splits must be a 1-D integer tensor, got {splits.dim()}-D "
                f"{splits.dtype}"
            )
        return [int(s) for s in splits.tolist()]
    try:
        values = list(splits)
    except TypeError:
        raise TypeError(
            f"gradfuse.alltoall: splits must be a list or 1-D tensor of ints, got {splits!r}"
        ) from None
    if any(isinstance(s, bool) or not isinstance(s, int) for s in values):
        raise TypeError(f"gradfuse.alltoall: splits must hold ints, got {values!r}")
    return values


def alltoall_async(tensor, splits=None, name=None) -> int:
    """Starts an alltoall; synchronize(handle) returns (output, received_splits)."""
    _check_tensor(tensor, "alltoall_async")
    _engine._require()
    split_list = [] if splits is None else _splits_list(splits)
    handle = torch.ops.gradfuse._enqueue(
        _name(name, "alltoall"), _ALLTOALL, tensor.detach(), None, 0, Sum, 1.0, 1.0, split_list
    )
    with _pending_lock:
        _pending[handle] = None
        _alltoall_handles.add(handle)
    _note_submitted(handle)
    return handle


def alltoall(tensor, splits=None, name=None):
    """Sends rows of `tensor` to every rank and returns what every rank sent here, concatenated
    in rank order along dim 0. `splits[k]` rows (consecutive, in rank order) go to rank k; they
    must sum to dim 0 and may differ per rank. With splits, returns (output, received_splits);
    without, dim 0 is split evenly (it must divide by size()) and the output is returned."""
    _refuse_inside_hold("alltoall")
    output, received = synchronize(alltoall_async(tensor, splits, name))
    return output if splits is None else (output, received)


def barrier() -> None:
    """Returns once every rank has called barrier() (negotiation only: no data moves)."""
    _refuse_inside_hold("barrier")
    _engine._require()
    synchronize(_enqueue(_name(None, "barrier"), _BARRIER, torch.empty(0), None))


def join(device=None) -> int:
    """Called by a rank that has run out of data: blocks until every rank has called join(),
    and returns the rank that joined last. Meanwhile the other ranks' allreduces (Sum, Average)
    go on with this rank contributing zeros (Average still divides by size(), as in Horovod)
    and their barriers go on without it. allgather, broadcast, alltoall, reducescatter and
    allreduce with Min / Max / Product raise RuntimeError on every rank that submitted them
    while a rank has joined (Horovod: the same, except that it lets Min / Max / Product take
    the zeros). `device` (Horovod's argument: a CUDA device index, or -1 / None for the CPU) says
    where this rank makes the zeros for CUDA collectives when it has not run one yet; once it
    has, they go on the GPU its tensors used."""
    _refuse_inside_hold("join")
    _engine._require()
    marker = torch.empty(0)
    if device is not None and device != -1:
        marker = torch.empty(
            0,
            device=torch.device("cuda", device)
            if isinstance(device, int)
            else torch.device(device),
        )
    return int(synchronize(_enqueue("gradfuse.join", _JOIN, marker, None)).item())
