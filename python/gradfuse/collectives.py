"""Horovod-style collectives over the C++ engine. Tensors reach the engine through
torch.ops.gradfuse._enqueue; the returned integer handle is waited on with _C.engine_wait
(GIL released) and the output collected with torch.ops.gradfuse._engine_result."""

from __future__ import annotations

import abc
import contextlib
import math
import operator
import threading

import torch

from . import _engine
from . import process_sets as _sets
from .compression import Compression
from .exceptions import HorovodInternalError
from .process_sets import global_process_set

# Reduce ops; the values are the engine's ReduceOp enum (cpp/engine/message.h).
Sum, Average, Min, Max, Product = 0, 1, 2, 3, 4
# Not an engine op: an allgather combined by adasum.py, never sent to the engine as an op.
Adasum = 5
_OP_NAMES = {
    Sum: "Sum",
    Average: "Average",
    Min: "Min",
    Max: "Max",
    Product: "Product",
    Adasum: "Adasum",
}
_ALLREDUCE, _ALLGATHER, _BROADCAST = 0, 1, 2
_KIND_NAMES = [
    "allreduce",
    "allgather",
    "broadcast",
    "reducescatter",
    "alltoall",
    "barrier",
    "join",
]

# handle -> the caller's tensor for in-place calls (synchronize returns it), else None. For a
# non-contiguous in-place tensor the engine works on a contiguous copy, copied back then.
_pending: dict[int, torch.Tensor | None] = {}
_pending_lock = threading.Lock()
# handle -> a function synchronize() applies to the engine's raw result before returning it (or
# copying it into the in-place tensor): for collectives built on another one (Adasum on an
# allgather). Set with _set_finisher().
_finishers: dict = {}
# handle -> the factor synchronize() multiplies the output by: scaling the engine does not do
# for this kind of collective (reducescatter's postscale; see reducescatter_async).
_postscales: dict[int, float] = {}


def _scaled(tensor, factor):
    """tensor * factor as a new tensor of tensor's dtype, as the engine scales: floats at
    their precision, integers in float64 then truncated toward zero. Factor 1: tensor itself."""
    factor = float(factor)
    if factor == 1.0:
        return tensor
    if tensor.is_floating_point() or tensor.is_complex():
        return tensor * factor
    return (tensor.double() * factor).to(tensor.dtype)


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


def _name(name, kind, process_set=None):
    """`name`, checked, or (None) the next automatic name of `kind` in `process_set`."""
    if name is None:
        return _sets._auto_name(kind, _sets._check(process_set, kind))
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string or None, got {name!r}")
    return name


def _check_tensor(tensor, fn, what="tensor"):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"gradfuse.{fn}: {what} must be a torch.Tensor, got {type(tensor)}")
    if tensor.layout != torch.strided:
        raise ValueError(f"gradfuse.{fn}: {what} must be dense (strided), got {tensor.layout}")


def _check_writable(tensor, fn, what="tensor"):
    """An in-place collective writes every element: an expanded view (elements sharing memory)
    would fail only after the collective ran on every rank, so it is refused at the call."""
    if any(stride == 0 and n > 1 for stride, n in zip(tensor.stride(), tensor.shape)):
        raise ValueError(
            f"gradfuse.{fn}: {what} has elements that share memory (an expanded view, strides "
            f"{tensor.stride()}); an in-place collective needs its own storage: .clone() it"
        )


def _factor(value, arg, fn):
    """A scale factor as a float (its finiteness is checked by the engine)."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"gradfuse.{fn}: {arg} must be a number, got {value!r}")


def _finite_factor(value, arg, fn):
    """A scale factor as a finite float, checked here: for the collectives that scale in Python
    (reducescatter) or submit several tensors (grouped), which must refuse a bad factor before
    anything is submitted."""
    factor = _factor(value, arg, fn)
    if not math.isfinite(factor):
        raise ValueError(f"gradfuse.{fn}: {arg} must be a finite number, got {factor}")
    return factor


def _resolve_op(average, op, fn):
    if average is not None:
        if op is not None:
            raise ValueError(f"gradfuse.{fn}: give op or the deprecated average, not both")
        return Average if average else Sum
    if op is None:
        return Average  # Horovod's default
    if isinstance(op, bool) or not isinstance(op, int) or op not in _OP_NAMES:
        raise ValueError(
            f"gradfuse.{fn}: op must be gradfuse.Sum, Average, Min, Max, Product or Adasum, "
            f"got {op!r}"
        )
    return op


def _enqueue(
    name,
    kind,
    tensor,
    output,
    root=0,
    op=Sum,
    prescale=1.0,
    postscale=1.0,
    splits=(),
    process_set=global_process_set,
    sq_norm=None,
):
    """Submits one collective to `process_set`'s engine and returns its handle. `name` is the
    user's (None: named automatically, per set); `root` is a global rank; a rank outside the
    set gets a ValueError here, before anything is submitted. A new collective supports process
    sets by taking `process_set=global_process_set` and passing it on here."""
    _engine._require()
    ps = _sets._check(process_set, _KIND_NAMES[kind])
    prescale = _factor(prescale, "prescale_factor", _KIND_NAMES[kind])
    postscale = _factor(postscale, "postscale_factor", _KIND_NAMES[kind])
    name = _name(name, _KIND_NAMES[kind], ps)
    try:
        if kind == _BROADCAST:
            root = _sets._set_rank(ps, root, "broadcast")
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
            prescale,
            postscale,
            list(splits),
            ps.process_set_id,
            sq_norm,
        )
    except (ValueError, TypeError):  # refused here: the other ranks never saw this name
        _sets._unused_name(name, ps)
        raise
    except RuntimeError as e:  # the engine stopped (a peer failed, shutdown): as Horovod
        raise _internal_error(e) from e
    with _pending_lock:
        _pending[handle] = in_place
        if kind == _ALLTOALL:
            _alltoall_handles.add(handle)
    _note_submitted(handle)
    return handle


class CompositeHandle(abc.ABC):
    """What a collective built from several engine operations returns from its *_async form
    (grouped collectives, sparse allreduce): poll() and synchronize() accept it as they accept
    an engine handle, and defer to its poll() and wait()."""

    @abc.abstractmethod
    def poll(self) -> bool: ...

    @abc.abstractmethod
    def wait(self): ...


def _set_finisher(handle, finish, into=None):
    """synchronize(handle) will return finish(raw result), copied into `into` when given
    (an in-place call), instead of the raw result."""
    with _pending_lock:
        _finishers[handle] = finish
        _pending[handle] = into


def _check_handle(handle, fn):
    if isinstance(handle, bool) or not isinstance(handle, int):
        raise TypeError(f"{fn}: handle must be an int from an *_async call, got {handle!r}")
    if not -(2**63) <= handle < 2**63:
        raise ValueError(f"gradfuse: handle {handle} is unknown (never returned by an async call)")


def poll(handle) -> bool:
    """True when the operation behind `handle` has finished (synchronize() will not block)."""
    from . import _C

    if isinstance(handle, CompositeHandle):
        return handle.poll()
    _check_handle(handle, "poll")
    return _C.engine_poll(handle)


_WAIT_SLICE_S = 0.1  # how long synchronize() waits in C++ before checking for Ctrl-C


def _internal_error(e: RuntimeError) -> HorovodInternalError:
    """The engine's RuntimeError as Horovod reports a failed collective. Errors found before
    submission (ValueError, TypeError, misuse) are not passed here."""
    if isinstance(e, HorovodInternalError):
        return e
    return HorovodInternalError(str(e))


def synchronize(handle):
    """Waits for `handle` (GIL released) and returns its output; raises the operation's error
    as HorovodInternalError (a RuntimeError) if it failed, e.g. a dead peer, a cross-rank
    mismatch or shutdown. A grouped collective's handle gives the list of outputs, a sparse
    allreduce's the sparse result."""
    from . import _C

    if isinstance(handle, CompositeHandle):
        return handle.wait()
    _check_handle(handle, "synchronize")
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
    except RuntimeError as e:
        # The failure is reported here, once: the handle is released rather than kept for
        # a result that will never come (a second synchronize says it is unknown).
        _C.engine_forget(handle)
        with _pending_lock:
            _pending.pop(handle, None)
            _finishers.pop(handle, None)
            _alltoall_handles.discard(handle)
            _postscales.pop(handle, None)
        raise _internal_error(e) from e
    with _pending_lock:
        in_place = _pending.pop(handle, None)
        finish = _finishers.pop(handle, None)
        received_splits = handle in _alltoall_handles
        _alltoall_handles.discard(handle)
        postscale = _postscales.pop(handle, 1.0)
    if received_splits:  # alltoall: (output, the rows received from each rank)
        splits = torch.ops.gradfuse._engine_aux(handle)
        return torch.ops.gradfuse._engine_result(handle), splits
    out = _scaled(torch.ops.gradfuse._engine_result(handle), postscale)
    if finish is not None:
        out = finish(out)
    if in_place is None:
        return out
    if out.data_ptr() != in_place.data_ptr() or not in_place.is_contiguous():
        with torch.no_grad():
            in_place.copy_(out)  # the engine worked on a contiguous copy
    return in_place


# ---- allreduce -------------------------------------------------------------------------------


# The engine's dtypes (cpp/engine/enqueue_checks.cpp) and devices, for the calls that check a
# list of tensors before submitting any of them.
_ENGINE_DTYPES = (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip


def _check_submittable(tensor, fn, what="tensor"):
    """What the engine would refuse, refused before anything is submitted (for the calls that
    submit a list: one bad entry must not leave the others submitted on this rank alone)."""
    _check_tensor(tensor, fn, what)
    if tensor.dtype not in _ENGINE_DTYPES:
        raise ValueError(
            f"gradfuse.{fn}: {what} has dtype {tensor.dtype}; supported: "
            "uint8, int8, int16, int32, int64, float16, bfloat16, float32, float64"
        )
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"gradfuse.{fn}: {what} is on {tensor.device}; gradfuse runs "
            "collectives on CPU and CUDA tensors only"
        )


def allreduce_async(
    tensor,
    average=None,
    name=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> int:
    _check_tensor(tensor, "allreduce_async")
    op = _resolve_op(average, op, "allreduce_async")
    if op == Adasum:
        return _adasum_async(
            tensor, name, None, prescale_factor, postscale_factor, process_set, "allreduce"
        )
    output = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _enqueue(
        name,
        _ALLREDUCE,
        tensor,
        output,
        op=op,
        prescale=prescale_factor,
        postscale=postscale_factor,
        process_set=process_set,
    )


def allreduce_async_(
    tensor,
    average=None,
    name=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> int:
    _check_tensor(tensor, "allreduce_async_")
    _check_writable(tensor, "allreduce_async_")
    op = _resolve_op(average, op, "allreduce_async_")
    if op == Adasum:
        return _adasum_async(
            tensor, name, tensor, prescale_factor, postscale_factor, process_set, "allreduce_"
        )
    return _enqueue(
        name,
        _ALLREDUCE,
        tensor,
        tensor,
        op=op,
        prescale=prescale_factor,
        postscale=postscale_factor,
        process_set=process_set,
    )


def _allreduce_inplace_with_sq_norm(tensor, sq_norm, name, op, prescale, postscale, process_set):
    """allreduce_async_ (op not Adasum) whose engine also writes the result's sum of squares
    into `sq_norm` (one-element float64), taken while it unpacks the fusion buffer: the
    gradient norm a LARS step needs, without another pass over the gradient."""
    _check_tensor(tensor, "allreduce_async_")
    _check_writable(tensor, "allreduce_async_")
    return _enqueue(
        name,
        _ALLREDUCE,
        tensor,
        tensor,
        op=op,
        prescale=prescale,
        postscale=postscale,
        process_set=process_set,
        sq_norm=sq_norm,
    )


def _adasum_async(tensor, name, into, prescale, postscale, process_set, fn):
    from . import adasum  # it builds on this module

    if _sets._check(process_set, fn).process_set_id != 0:
        raise NotImplementedError(
            f"gradfuse.{fn}: op=Adasum works on the global process set only (as in Horovod), "
            f"got {process_set}"
        )
    return adasum.allreduce_async(tensor, _name(name, "allreduce"), into, prescale, postscale, fn)


def allreduce_(
    tensor,
    average=None,
    name=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> torch.Tensor:
    _refuse_inside_hold("allreduce_")
    return synchronize(
        allreduce_async_(
            tensor, average, name, op, prescale_factor, postscale_factor, process_set=process_set
        )
    )


def _require_differentiable(op, fn):
    if op not in (Sum, Average):
        raise RuntimeError(
            f"gradfuse.{fn}: no gradient for op {_OP_NAMES[op]} "
            "(only Sum and Average are differentiable)"
        )


class _Allreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, prescale, postscale, process_set):
        ctx.op, ctx.prescale, ctx.postscale = op, prescale, postscale
        ctx.process_set = process_set
        return synchronize(
            allreduce_async(
                tensor,
                name=name,
                op=op,
                prescale_factor=prescale,
                postscale_factor=postscale,
                process_set=process_set,
            )
        )

    @staticmethod
    def backward(ctx, grad):
        _require_differentiable(ctx.op, "allreduce")
        reduced = allreduce(
            grad,
            op=ctx.op,
            prescale_factor=ctx.prescale,
            postscale_factor=ctx.postscale,
            process_set=ctx.process_set,
        )
        return reduced, None, None, None, None, None


def allreduce(
    tensor,
    average=None,
    name=None,
    compression=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> torch.Tensor:
    """Reduces `tensor` over the ranks of `process_set` (default: all; op default: Average,
    which divides by the set's size) and returns a new tensor. Differentiable for Sum and
    Average. op=Adasum: see gradfuse.adasum."""
    _refuse_inside_hold("allreduce")
    _check_tensor(tensor, "allreduce")
    if compression is not None:
        raise ValueError("gradfuse.allreduce: compression is not supported yet; pass None")
    op = _resolve_op(average, op, "allreduce")
    name = _name(name, "allreduce", process_set)
    return _Allreduce.apply(tensor, name, op, prescale_factor, postscale_factor, process_set)


# ---- allgather -------------------------------------------------------------------------------


def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    _check_tensor(tensor, "allgather_async")
    return _enqueue(name, _ALLGATHER, tensor, None, process_set=process_set)


class _Allgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.dim0, ctx.process_set = tensor.shape[0], process_set
        return synchronize(allgather_async(tensor, name=name, process_set=process_set))

    @staticmethod
    def backward(ctx, grad):
        # Horovod's gradient: the set's gradients averaged (not summed), this rank's rows.
        ps = ctx.process_set
        grad = allreduce(grad, op=Average, process_set=ps)
        dims = synchronize(
            allgather_async(torch.tensor([ctx.dim0], dtype=torch.int64), process_set=ps)
        )
        start = int(dims[: _sets._set_rank(ps, _engine.rank(), "allgather", "rank")].sum())
        return grad.narrow(0, start, ctx.dim0), None, None


def allgather(tensor, name=None, process_set=global_process_set) -> torch.Tensor:
    """Concatenates the tensors of `process_set`'s ranks (default: all) along dim 0, in rank
    order (its size may differ per rank)."""
    _refuse_inside_hold("allgather")
    _check_tensor(tensor, "allgather")
    if tensor.dim() == 0:
        raise ValueError(
            "gradfuse.allgather: tensor must have at least one dimension (the one gathered along)"
        )
    return _Allgather.apply(tensor, _name(name, "allgather", process_set), process_set)


# ---- broadcast -------------------------------------------------------------------------------


def _check_root(root_rank, fn) -> int:
    """root_rank as an int. Integers of other types (numpy.int64, a 0-dim integer tensor) are
    taken, as Horovod's C++ binding takes them; bool and float are refused."""
    try:
        if isinstance(root_rank, bool):
            raise TypeError
        root_rank = operator.index(root_rank)
    except TypeError:
        raise TypeError(f"gradfuse.{fn}: root_rank must be an int, got {root_rank!r}") from None
    if not 0 <= root_rank < _engine.size():
        raise ValueError(
            f"gradfuse.{fn}: root_rank {root_rank} is not a rank (size {_engine.size()})"
        )
    return root_rank


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    _check_tensor(tensor, "broadcast_async")
    output = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    return _enqueue(
        name,
        _BROADCAST,
        tensor,
        output,
        root=_check_root(root_rank, "broadcast_async"),
        process_set=process_set,
    )


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    _check_tensor(tensor, "broadcast_async_")
    _check_writable(tensor, "broadcast_async_")
    return _enqueue(
        name,
        _BROADCAST,
        tensor,
        tensor,
        root=_check_root(root_rank, "broadcast_async_"),
        process_set=process_set,
    )


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set) -> torch.Tensor:
    _refuse_inside_hold("broadcast_")
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set=process_set))


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root, ctx.process_set = root_rank, process_set
        return synchronize(broadcast_async(tensor, root_rank, name=name, process_set=process_set))

    @staticmethod
    def backward(ctx, grad):
        # Only the root's input reached the outputs: it gets the ranks' gradients averaged
        # (Horovod's gradient; not summed), the others zeros.
        grad = allreduce(grad, op=Average, process_set=ctx.process_set)
        if _engine.rank() != ctx.root:
            grad = torch.zeros_like(grad)
        return grad, None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set) -> torch.Tensor:
    """Returns root_rank's tensor on every rank of `process_set` (default: all; root_rank is a
    global rank, a member of the set); `tensor` itself is left untouched."""
    _refuse_inside_hold("broadcast")
    _check_tensor(tensor, "broadcast")
    return _Broadcast.apply(
        tensor,
        _check_root(root_rank, "broadcast"),
        _name(name, "broadcast", process_set),
        process_set,
    )


# ---- reducescatter, alltoall, barrier, join --------------------------------------------------

_REDUCESCATTER, _ALLTOALL, _BARRIER, _JOIN = 3, 4, 5, 6
_alltoall_handles: set[int] = set()  # synchronize() returns (output, received_splits) for these


def _check_compression(compression, fn):
    if compression is not None and compression is not Compression.none:
        raise ValueError(
            f"gradfuse.{fn}: compression is not supported here yet; pass None or "
            f"Compression.none, got {compression!r}"
        )


def _reducescatter_op(op, fn):
    # True == 1 == Average and 0.0 == Sum: only the ints themselves are ops.
    if isinstance(op, bool) or not isinstance(op, int) or op not in (Sum, Average):
        raise ValueError(f"gradfuse.{fn}: op must be gradfuse.Sum or Average, got {op!r}")
    return op


def reducescatter_async(
    tensor,
    name=None,
    op=Average,
    process_set=global_process_set,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> int:
    """Starts a reducescatter; synchronize(handle) returns this rank's rows of the result."""
    _check_tensor(tensor, "reducescatter_async")
    op = _reducescatter_op(op, "reducescatter_async")
    prescale_factor = _finite_factor(prescale_factor, "prescale_factor", "reducescatter_async")
    postscale_factor = _finite_factor(postscale_factor, "postscale_factor", "reducescatter_async")
    # The engine's reducescatter takes no scale factors (cpp/engine/reducescatter.cpp packs and
    # unpacks with 1 and the Average's 1/size only), so they are applied here: the prescale
    # to a copy of the input before the reduction, the postscale to the output after it (by
    # synchronize), each at the tensor's precision as the engine would.
    if op == Average and postscale_factor != 1.0 and not tensor.is_floating_point():
        # As allreduce does (and Horovod): Average's 1/size folded into the postscale, so an
        # integer result is truncated once, not after the average and again after the scale.
        size = _sets._size(_sets._check(process_set, "reducescatter_async"))
        op, postscale_factor = Sum, postscale_factor / size
    handle = _enqueue(
        name,
        _REDUCESCATTER,
        _scaled(tensor, prescale_factor),
        None,
        op=op,
        process_set=process_set,
    )
    if float(postscale_factor) != 1.0:
        with _pending_lock:
            _postscales[handle] = float(postscale_factor)
    return handle


class _Reducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, prescale, postscale, process_set):
        ctx.op, ctx.scale = op, float(prescale) * float(postscale)
        ctx.process_set = process_set
        return synchronize(
            reducescatter_async(
                tensor,
                name=name,
                op=op,
                prescale_factor=prescale,
                postscale_factor=postscale,
                process_set=process_set,
            )
        )

    @staticmethod
    def backward(ctx, grad):
        ps = ctx.process_set
        scaled = _reducescatter_grad_scaled(grad, ctx.op, ctx.scale, ps)
        return allgather(scaled, process_set=ps), None, None, None, None, None


def _reducescatter_grad_scaled(grad, op, scale, process_set):
    """Horovod's reducescatter gradient, before the allgather that returns every rank's rows:
    times the set's size for Sum (1 for Average), times the prescale and postscale."""
    return _scaled(grad, scale * (_sets._size(process_set) if op == Sum else 1))


def reducescatter(
    tensor,
    name=None,
    compression=None,
    op=Average,
    process_set=global_process_set,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> torch.Tensor:
    """Reduces `tensor` (same shape on every rank) over the ranks of `process_set` (default:
    all) and returns this rank's rows of the result. Dim 0 is split as evenly as possible over
    the set; the first (dim0 % size) ranks get one row more (Horovod's split). op: Sum or Average (default). prescale_factor multiplies the
    input before the reduction, postscale_factor the output after it. Differentiable
    (Horovod's gradient: the allgather of the output's gradient, times size() for Sum)."""
    _refuse_inside_hold("reducescatter")
    _check_tensor(tensor, "reducescatter")
    _check_compression(compression, "reducescatter")
    op = _reducescatter_op(op, "reducescatter")
    prescale_factor = _finite_factor(prescale_factor, "prescale_factor", "reducescatter")
    postscale_factor = _finite_factor(postscale_factor, "postscale_factor", "reducescatter")
    name = _name(name, "reducescatter", process_set)
    return _Reducescatter.apply(tensor, name, op, prescale_factor, postscale_factor, process_set)


def _splits_list(splits):
    if isinstance(splits, torch.Tensor):
        if splits.is_meta:
            raise ValueError("gradfuse.alltoall: splits is a meta tensor (it holds no values)")
        if (
            splits.dim() != 1
            or splits.is_floating_point()
            or splits.is_complex()
            or splits.dtype == torch.bool
        ):
            raise ValueError(
                f"gradfuse.alltoall: splits must be a 1-D integer tensor, got {splits.dim()}-D "
                f"{splits.dtype}"
            )
        values = [int(s) for s in splits.tolist()]
    else:
        values = _split_ints(splits)
    # The engine takes int64 splits; a bigger one is refused here with a clear message.
    if any(not -(2**63) <= s < 2**63 for s in values):
        raise ValueError(f"gradfuse.alltoall: splits must be 64-bit integers, got {values!r}")
    return values


def _split_ints(splits):
    try:
        values = list(splits)
    except TypeError:
        raise TypeError(
            f"gradfuse.alltoall: splits must be a list or 1-D tensor of ints, got {splits!r}"
        ) from None
    if any(isinstance(s, bool) or not isinstance(s, int) for s in values):
        raise TypeError(f"gradfuse.alltoall: splits must hold ints, got {values!r}")
    return values


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """Starts an alltoall; synchronize(handle) returns (output, received_splits)."""
    _check_tensor(tensor, "alltoall_async")
    split_list = [] if splits is None else _splits_list(splits)
    return _enqueue(name, _ALLTOALL, tensor, None, splits=split_list, process_set=process_set)


class _Alltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad, _received_grad):
        # Every row goes back to the rank it came from: an alltoall with the received splits.
        back, _ = synchronize(alltoall_async(grad, ctx.received, process_set=ctx.process_set))
        return back, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Sends rows of `tensor` to every rank of `process_set` (default: all) and returns what
    each sent here, concatenated in rank order along dim 0. `splits[k]` rows (consecutive, in
    rank order) go to the set's k-th rank; they must sum to dim 0 and may differ per rank. With
    splits, returns (output, received_splits); without, dim 0 is split evenly (it must divide
    by the set's size) and the output is returned.
    Differentiable: the gradient rows return to the ranks they came from."""
    _refuse_inside_hold("alltoall")
    _check_tensor(tensor, "alltoall")
    name = _name(name, "alltoall", process_set)
    output, received = _Alltoall.apply(tensor, splits, name, process_set)
    return output if splits is None else (output, received)


def _join_device(device):
    """join()'s device argument as a torch.device: None or -1 (the CPU), a CUDA index, or a
    torch.device / string naming the CPU or a CUDA device."""
    if device is None or (type(device) is int and device == -1):
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise TypeError(
            f"gradfuse.join: device must be None, -1, a CUDA device index or a torch.device, "
            f"got {device!r}"
        )
    if isinstance(device, int) and device < 0:
        raise ValueError(f"gradfuse.join: device must be -1 or a CUDA device index, got {device}")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"gradfuse.join: device {device!r} is not a device: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"gradfuse.join: device must be the CPU or a CUDA device, got {dev}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"gradfuse.join: device is {dev}, but CUDA is not available here "
            "(torch.cuda.is_available() is False)"
        )
    return dev


def barrier(process_set=global_process_set) -> None:
    """Returns once every rank of `process_set` (default: all) has called barrier()
    (negotiation only: no data moves)."""
    _refuse_inside_hold("barrier")
    _engine._require()
    synchronize(_enqueue(None, _BARRIER, torch.empty(0), None, process_set=process_set))


def join(device=None, process_set=global_process_set) -> int:
    """Called by a rank that has run out of data: blocks until every rank (of `process_set`,
    default: all) has called join(), and returns the (global) rank that joined last.
    Meanwhile the other ranks' allreduces (Sum, Average) go on with this rank contributing
    zeros (Average still divides by size(), as in Horovod) and their barriers go on without it.
    allgather, broadcast, alltoall, reducescatter and allreduce with Min / Max / Product raise
    RuntimeError on every rank that submitted them while a rank has joined (Horovod: the same,
    except that it lets Min / Max / Product take the zeros). `device` (Horovod's argument: a
    CUDA device index, or -1 / None for the CPU) says where this rank makes the zeros for CUDA
    collectives when it has not run one yet; once it has, they go on the GPU its tensors used."""
    _refuse_inside_hold("join")
    _engine._require()
    marker = torch.empty(0, device=_join_device(device))
    handle = _enqueue("gradfuse.join", _JOIN, marker, None, process_set=process_set)
    last = int(synchronize(handle).item())
    ps = _sets._check(process_set, "join")
    # The ranks that went on while others had joined took automatic names the joined ones did
    # not: every rank continues from the highest, so unnamed collectives pair up again.
    taken = allgather(
        torch.tensor([_sets._auto_names[ps.process_set_id]]),
        name="gradfuse.join.automatic_names",
        process_set=ps,
    )
    _sets._auto_names[ps.process_set_id] = int(taken.max())
    return _sets._global_rank(ps, last)
