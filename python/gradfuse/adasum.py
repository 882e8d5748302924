"""Adasum (Maleki et al., 2020), Horovod's ``op=hvd.Adasum`` reduction.

Two vectors combine as ``a' = (1 - a.b / (2 |a|^2)) a + (1 - a.b / (2 |b|^2)) b`` (a
coefficient is 1 where that squared norm is below 1e-8, so a zero vector is the identity), and
the ranks combine pairwise up a binary tree: ranks 0+1 and 2+3, then (0+1)+(2+3), ... — the
order of Horovod's vector-halving distance-doubling (VHDD) reduction. Each tensor has its own
coefficients (Horovod's per-tensor dot products inside a fused buffer).

CUDA tensors follow Horovod's GPU (NCCL) build: the ranks of a node are summed, the node sums
combine by Adasum across nodes, and the result is divided by the node's size (so on one node
Adasum is the average).

How it runs here: every rank allgathers every rank's tensor (one engine allgather, negotiated,
fused and checked like any other) and combines them itself, in the same tree order, in float64
on the tensor's device, rounding once at the end: every rank computes the same bits. This costs
size x the tensor in receive memory and bandwidth per rank, plus a float64 copy of it, where
Horovod's VHDD moves about 2x the tensor per rank and needs one extra buffer; it suits the
modest tensors and rank counts Adasum is used with, not a 1000-rank job.

Everything is checked when the result is collected (synchronize), after the allgather, so a
tensor that is wrong on some ranks only still raises on every rank instead of leaving the others
waiting.
"""

from __future__ import annotations

import functools

import torch

from . import _engine, collectives

# Horovod's Adasum works on 16/32/64-bit floats; bfloat16 is combined the same way (in float64).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Below this squared norm a vector keeps coefficient 1 (Horovod's threshold).
_MIN_NORM_SQ = 1e-8


def allreduce_async(tensor, name, into, prescale, postscale, fn) -> int:
    """Submits the allgather behind an Adasum allreduce of `tensor`; synchronize() of the
    returned handle gives the combined tensor (copied into `into` when it is not None)."""
    shape, dtype, device = tensor.shape, tensor.dtype, tensor.device
    row = tensor.detach().contiguous().view(1, *shape)  # one row per rank, shapes checked
    handle = collectives._enqueue(name, collectives._ALLGATHER, row, None)
    finish = functools.partial(
        _finish,
        shape=shape,
        dtype=dtype,
        device_type=device.type,
        prescale=float(prescale),
        postscale=float(postscale),
        fn=fn,
    )
    collectives._set_finisher(handle, finish, into)
    return handle


def _finish(gathered, *, shape, dtype, device_type, prescale, postscale, fn):
    """The Adasum of the rows of `gathered` (one per rank, in rank order)."""
    groups = _rank_groups(device_type, gathered.shape[0], dtype, fn)
    vectors = gathered.reshape(gathered.shape[0], -1).to(torch.float64)
    if prescale != 1.0:
        vectors = vectors * prescale
    # Ranks in one group (a node, for CUDA tensors) are summed first, in rank order.
    leaves = [vectors[group].sum(dim=0) for group in groups]
    result = combine(leaves)
    scale = postscale / len(groups[0])
    if scale != 1.0:
        result = result * scale
    return result.to(dtype).reshape(shape)


def _rank_groups(device_type, rows, dtype, fn):
    """The groups of ranks whose sums Adasum combines, in tree order: each rank alone for CPU
    tensors, each node for CUDA ones. Raises for what Horovod does not support."""
    state = _engine._require()
    if dtype not in DTYPES:
        raise TypeError(
            f"gradfuse.{fn}: op=Adasum works on float16, bfloat16, float32 and float64 "
            f"tensors, got {dtype}"
        )
    if rows != state.size:
        raise RuntimeError(
            f"gradfuse.{fn}: op=Adasum cannot run while a rank has joined (it got "
            f"{rows} of {state.size} ranks' tensors); call it before join()"
        )
    if device_type != "cuda":
        if not _power_of_two(state.size):
            raise NotImplementedError(
                f"gradfuse.{fn}: op=Adasum needs a power-of-2 number of ranks, as in Horovod; "
                f"this job has {state.size}"
            )
        return [[r] for r in range(state.size)]
    sizes = sorted({len(node) for node in state.nodes})
    if len(sizes) > 1:
        raise NotImplementedError(
            f"gradfuse.{fn}: op=Adasum on CUDA tensors needs the same number of ranks on every "
            f"node, as in Horovod; nodes have {', '.join(str(len(n)) for n in state.nodes)}"
        )
    if not _power_of_two(len(state.nodes)):
        raise NotImplementedError(
            f"gradfuse.{fn}: op=Adasum on CUDA tensors needs a power-of-2 number of nodes, as "
            f"in Horovod; this job has {len(state.nodes)}"
        )
    return state.nodes


def _power_of_two(n):
    return n > 0 and n & (n - 1) == 0


def combine(vectors):
    """Adasum of float64 vectors, pairing neighbours up a binary tree (left half, right half)."""
    if len(vectors) == 1:
        return vectors[0]
    half = len(vectors) // 2
    return pair(combine(vectors[:half]), combine(vectors[half:]))


def pair(a, b):
    """Adasum of two float64 vectors."""
    dot = torch.sum(a * b)
    a_coeff = _coefficient(dot, torch.sum(a * a))
    b_coeff = _coefficient(dot, torch.sum(b * b))
    return a_coeff * a + b_coeff * b


def _coefficient(dot, norm_sq):
    # On the tensor's device, without a host sync: 1 - dot / (2 |v|^2), or 1 for a tiny |v|.
    return torch.where(norm_sq >= _MIN_NORM_SQ, 1.0 - dot / norm_sq * 0.5, 1.0)
