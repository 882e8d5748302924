"""Allreduce of sparse COO tensors, as Horovod's sparse_allreduce_async: every rank's indices and
values are allgathered (a sparse tensor's nonzeros differ per rank, so they cannot be summed
in place), and the result is the sparse tensor holding all of them: duplicates are summed
when it is coalesced or used. Average divides the values by the process set's size."""

from __future__ import annotations

import torch

from . import process_sets as _sets
from .collectives import (
    Average,
    CompositeHandle,
    Sum,
    _name,
    allgather_async,
    poll,
    submitted_together,
    synchronize,
)
from .process_sets import global_process_set


class SparseHandle(CompositeHandle):
    """A sparse allreduce in flight. Horovod returns a function that waits and gives the
    result; this handle is that function (call it), and synchronize() accepts it too."""

    def __init__(self, like, indices_handle, values_handle, op, process_set):
        self._like = like  # the input: the result's shape, dtype and device
        self._indices_handle = indices_handle
        self._values_handle = values_handle
        self._op = op
        self._process_set = process_set

    def poll(self) -> bool:
        return poll(self._indices_handle) and poll(self._values_handle)

    def wait(self) -> torch.Tensor:
        # Both are waited for even when one fails, so neither is left dangling.
        try:
            values = synchronize(self._values_handle)
        finally:
            indices = synchronize(self._indices_handle)
        if self._op == Average:
            n = _sets._size(self._process_set)
            if values.is_floating_point() or values.is_complex():
                values = values / n
            else:  # integer Average truncates toward zero, as the engine's dense one
                values = torch.div(values, n, rounding_mode="trunc")
        # Indices travelled as (nnz, sparse_dim), so they concatenate along dim 0.
        return torch.sparse_coo_tensor(
            indices.t(), values, self._like.shape, dtype=self._like.dtype
        )

    __call__ = wait


def sparse_allreduce_async(
    tensor, name=None, op=Average, process_set=global_process_set
) -> SparseHandle:
    """Starts the allreduce of a sparse COO `tensor` over `process_set` (default: all ranks;
    same shape on every rank, its nonzeros may differ). op: Sum or Average (divides by the
    set's size). Returns a handle: call it, or synchronize() it, for the reduced sparse
    tensor (uncoalesced: every member's nonzeros, duplicates summed on use)."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_coo:
        got = tensor.layout if isinstance(tensor, torch.Tensor) else type(tensor)
        raise TypeError(
            f"gradfuse.sparse_allreduce_async: tensor must be a sparse COO torch.Tensor "
            f"(layout torch.sparse_coo), got {got}"
        )
    if op not in (Sum, Average):
        raise ValueError(
            f"gradfuse.sparse_allreduce_async: op must be gradfuse.Sum or Average, got {op!r}"
        )
    # Checked before naming: a rank outside the set gets a ValueError with nothing submitted.
    ps = _sets._check(process_set, "sparse_allreduce_async")
    base = _name(name, "sparse_allreduce", ps)
    indices = tensor._indices().t().contiguous()
    with submitted_together():
        indices_handle = allgather_async(indices, name=f"{base}.indices", process_set=ps)
        values_handle = allgather_async(tensor._values(), name=f"{base}.values", process_set=ps)
    return SparseHandle(tensor, indices_handle, values_handle, op, ps)
