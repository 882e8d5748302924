"""Grouped collectives (Horovod's grouped_* names): one collective per tensor of a list, all
submitted together (collectives.submitted_together) so the engine negotiates them as one and
fuses what fits. The *_async forms return one GroupedHandle, which synchronize() turns into
the list of outputs and poll() reports on, as Horovod's single grouped handle. The blocking
forms are differentiable with Horovod's gradients (those of the single-tensor collectives,
applied tensor by tensor). Every form takes Horovod's process_set= (default: all ranks); the
backward passes reduce over the same set."""

from __future__ import annotations

import torch

from . import _engine
from . import process_sets as _sets
from .collectives import (
    Average,
    CompositeHandle,
    _check_compression,
    _check_submittable,
    _check_writable,
    _finite_factor,
    _name,
    _reducescatter_grad_scaled,
    _reducescatter_op,
    _refuse_inside_hold,
    _require_differentiable,
    _resolve_op,
    allgather,
    allgather_async,
    allreduce_async,
    allreduce_async_,
    poll,
    reducescatter_async,
    submitted_together,
    synchronize,
)
from .process_sets import global_process_set


class GroupedHandle(CompositeHandle):
    """The handles of one grouped collective, one per tensor, in the list's order."""

    def __init__(self, handles):
        self.handles = list(handles)

    def poll(self) -> bool:
        return all(poll(h) for h in self.handles)

    def wait(self) -> list:
        # Every handle is waited for even when one fails, so none is left dangling; the
        # first failure is then raised.
        outputs, error = [], None
        for h in self.handles:
            try:
                outputs.append(synchronize(h))
            except RuntimeError as exc:
                error = error or exc
        if error is not None:
            raise error
        return outputs


def _check_tensors(tensors, fn, min_dim=0):
    """The list of tensors, checked before anything is submitted (a group half submitted on
    one rank would leave the others waiting)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(
            f"gradfuse.{fn}: tensors must be a list of torch.Tensor, got {type(tensors).__name__}"
        )
    if not tensors:
        raise ValueError(f"gradfuse.{fn}: tensors must be a non-empty list, got an empty one")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradfuse.{fn}: tensors[{i}] must be a torch.Tensor, got {type(t)}")
        _check_submittable(t, fn, f"tensors[{i}]")
        if t.dim() < min_dim:
            raise ValueError(
                f"gradfuse.{fn}: tensors[{i}] must have at least one dimension (the one split "
                f"or gathered along), got a {t.dim()}-D tensor"
            )
    devices = sorted({str(t.device) for t in tensors})
    if len(devices) > 1:
        raise ValueError(f"gradfuse.{fn}: tensors must all be on one device, got {devices}")
    # Everything the engine would refuse, checked for every tensor first: a group whose third
    # tensor is refused must not have submitted the first two.
    for i, t in enumerate(tensors):
        _check_submittable(t, fn, f"tensors[{i}]")
    return list(tensors)


def _check_in_place(tensors, fn):
    """In place, every tensor is written: none may share memory with itself (an expanded view)
    or another (the same tensor twice, overlapping views), whose result would depend on the
    order the engine writes them in."""
    for i, t in enumerate(tensors):
        _check_writable(t, fn, f"tensors[{i}]")
    for j, b in enumerate(tensors):
        for i, a in enumerate(tensors[:j]):
            if _overlap(a, b):
                raise ValueError(
                    f"gradfuse.{fn}: tensors[{i}] and tensors[{j}] share memory; an in-place "
                    "grouped collective writes each of them: pass distinct tensors"
                )


def _overlap(a, b) -> bool:
    """Whether a and b have an element in common: exact for views of one element size (checked
    over the span they share only), by byte ranges otherwise."""
    if 0 in (a.numel(), b.numel()) or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr():
        return True

    def span(t):  # first and one past the last element's storage offset
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return t.storage_offset(), last + 1

    (a0, a1), (b0, b1) = span(a), span(b)
    size = a.element_size()
    if a1 * size <= b0 * b.element_size() or b1 * b.element_size() <= a0 * size:
        return False
    if b.element_size() != size:
        return True
    # Interleaved views (columns of one matrix) have overlapping spans but no common element.
    lo, hi = min(a0, b0), max(a1, b1)
    index = torch.arange(lo, hi)

    def offsets(t):
        return torch.as_strided(index, t.shape, t.stride(), t.storage_offset() - lo).flatten()

    return bool(torch.isin(offsets(a), offsets(b)).any())


def _check_factors(prescale, postscale, fn):
    _finite_factor(prescale, "prescale_factor", fn)
    _finite_factor(postscale, "postscale_factor", fn)


def _submit(tensors, name, kind, process_set, fn, submit_one):
    """submit_one(tensor, name) for each tensor, named <base>.<i>, as one group on
    `process_set`. The set is checked first: a rank outside it gets a ValueError before
    anything is submitted (with a `name`, _name alone would not check it)."""
    base = _name(name, kind, _sets._check(process_set, fn))
    with submitted_together():
        return GroupedHandle(submit_one(t, f"{base}.{i}") for i, t in enumerate(tensors))


# ---- allreduce -------------------------------------------------------------------------------


def grouped_allreduce_async(
    tensors,
    average=None,
    name=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> GroupedHandle:
    tensors = _check_tensors(tensors, "grouped_allreduce_async")
    op = _resolve_op(average, op, "grouped_allreduce_async")
    _check_factors(prescale_factor, postscale_factor, "grouped_allreduce_async")
    return _submit(
        tensors,
        name,
        "grouped_allreduce",
        process_set,
        "grouped_allreduce_async",
        lambda t, n: allreduce_async(
            t,
            name=n,
            op=op,
            prescale_factor=prescale_factor,
            postscale_factor=postscale_factor,
            process_set=process_set,
        ),
    )


def grouped_allreduce_async_(
    tensors,
    average=None,
    name=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> GroupedHandle:
    """In place: synchronize(handle) returns `tensors` themselves, reduced."""
    tensors = _check_tensors(tensors, "grouped_allreduce_async_")
    _check_in_place(tensors, "grouped_allreduce_async_")
    op = _resolve_op(average, op, "grouped_allreduce_async_")
    _check_factors(prescale_factor, postscale_factor, "grouped_allreduce_async_")
    return _submit(
        tensors,
        name,
        "grouped_allreduce",
        process_set,
        "grouped_allreduce_async_",
        lambda t, n: allreduce_async_(
            t,
            name=n,
            op=op,
            prescale_factor=prescale_factor,
            postscale_factor=postscale_factor,
            process_set=process_set,
        ),
    )


def grouped_allreduce_(
    tensors,
    average=None,
    name=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> list[torch.Tensor]:
    _refuse_inside_hold("grouped_allreduce_")
    return synchronize(
        grouped_allreduce_async_(
            tensors, average, name, op, prescale_factor, postscale_factor, process_set
        )
    )


class _GroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, prescale, postscale, process_set, *tensors):
        ctx.op, ctx.prescale, ctx.postscale = op, prescale, postscale
        ctx.process_set = process_set
        handle = grouped_allreduce_async(
            list(tensors),
            name=name,
            op=op,
            prescale_factor=prescale,
            postscale_factor=postscale,
            process_set=process_set,
        )
        return tuple(synchronize(handle))

    @staticmethod
    def backward(ctx, *grads):
        _require_differentiable(ctx.op, "grouped_allreduce")
        handle = grouped_allreduce_async(
            list(grads),
            op=ctx.op,
            prescale_factor=ctx.prescale,
            postscale_factor=ctx.postscale,
            process_set=ctx.process_set,
        )
        return (None, None, None, None, None, *synchronize(handle))


def grouped_allreduce(
    tensors,
    average=None,
    name=None,
    compression=None,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> list[torch.Tensor]:
    """Allreduce of each tensor of a list over `process_set` (default: all; default op:
    Average, which divides by the set's size), submitted together so the engine negotiates
    them at once and fuses them. Returns new tensors; differentiable for Sum and Average (the
    gradients are grouped-allreduced the same way, over the same set)."""
    _refuse_inside_hold("grouped_allreduce")
    tensors = _check_tensors(tensors, "grouped_allreduce")
    _check_compression(compression, "grouped_allreduce")
    op = _resolve_op(average, op, "grouped_allreduce")
    name = _name(name, "grouped_allreduce", process_set)
    return list(
        _GroupedAllreduce.apply(name, op, prescale_factor, postscale_factor, process_set, *tensors)
    )


# ---- allgather -------------------------------------------------------------------------------


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> GroupedHandle:
    tensors = _check_tensors(tensors, "grouped_allgather_async", min_dim=1)
    return _submit(
        tensors,
        name,
        "grouped_allgather",
        process_set,
        "grouped_allgather_async",
        lambda t, n: allgather_async(t, name=n, process_set=process_set),
    )


class _GroupedAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, process_set, *tensors):
        ctx.dims, ctx.process_set = [t.shape[0] for t in tensors], process_set
        handle = grouped_allgather_async(list(tensors), name=name, process_set=process_set)
        return tuple(synchronize(handle))

    @staticmethod
    def backward(ctx, *grads):
        # Horovod's gradient, as allgather's: the set's gradients averaged, this rank's rows.
        ps = ctx.process_set
        reduced = synchronize(grouped_allreduce_async(list(grads), op=Average, process_set=ps))
        # (set size, len(tensors)): every member's rows of each tensor.
        dims = allgather(torch.tensor([ctx.dims], dtype=torch.int64), process_set=ps)
        me = _sets._set_rank(ps, _engine.rank(), "grouped_allgather", "rank")
        starts = dims[:me].sum(0).tolist()
        return (None, None, *(g.narrow(0, s, d) for g, s, d in zip(reduced, starts, ctx.dims)))


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> list[torch.Tensor]:
    """Allgather of each tensor of a list over `process_set` (default: all; dim 0 may differ
    per rank and per tensor), submitted together. Differentiable (Horovod's gradient, as
    allgather's)."""
    _refuse_inside_hold("grouped_allgather")
    tensors = _check_tensors(tensors, "grouped_allgather", min_dim=1)
    name = _name(name, "grouped_allgather", process_set)
    return list(_GroupedAllgather.apply(name, process_set, *tensors))


# ---- reducescatter ---------------------------------------------------------------------------


def grouped_reducescatter_async(
    tensors,
    name=None,
    op=Average,
    process_set=global_process_set,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> GroupedHandle:
    tensors = _check_tensors(tensors, "grouped_reducescatter_async", min_dim=1)
    op = _reducescatter_op(op, "grouped_reducescatter_async")
    _check_factors(prescale_factor, postscale_factor, "grouped_reducescatter_async")
    return _submit(
        tensors,
        name,
        "grouped_reducescatter",
        process_set,
        "grouped_reducescatter_async",
        lambda t, n: reducescatter_async(
            t,
            name=n,
            op=op,
            prescale_factor=prescale_factor,
            postscale_factor=postscale_factor,
            process_set=process_set,
        ),
    )


class _GroupedReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, prescale, postscale, process_set, *tensors):
        ctx.op, ctx.scale = op, float(prescale) * float(postscale)
        ctx.process_set = process_set
        handle = grouped_reducescatter_async(
            list(tensors),
            name=name,
            op=op,
            process_set=process_set,
            prescale_factor=prescale,
            postscale_factor=postscale,
        )
        return tuple(synchronize(handle))

    @staticmethod
    def backward(ctx, *grads):
        ps = ctx.process_set
        scaled = [_reducescatter_grad_scaled(g, ctx.op, ctx.scale, ps) for g in grads]
        gathered = synchronize(grouped_allgather_async(scaled, process_set=ps))
        return (None, None, None, None, None, *gathered)


def grouped_reducescatter(
    tensors,
    name=None,
    compression=None,
    op=Average,
    process_set=global_process_set,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> list[torch.Tensor]:
    """Reducescatter of each tensor of a list over `process_set` (default: all; op: Sum or
    Average), submitted together. Horovod's argument order: process_set before the scale
    factors. Differentiable (Horovod's gradient, as reducescatter's)."""
    _refuse_inside_hold("grouped_reducescatter")
    tensors = _check_tensors(tensors, "grouped_reducescatter", min_dim=1)
    _check_compression(compression, "grouped_reducescatter")
    op = _reducescatter_op(op, "grouped_reducescatter")
    _check_factors(prescale_factor, postscale_factor, "grouped_reducescatter")
    name = _name(name, "grouped_reducescatter", process_set)
    return list(
        _GroupedReducescatter.apply(
            name, op, prescale_factor, postscale_factor, process_set, *tensors
        )
    )
