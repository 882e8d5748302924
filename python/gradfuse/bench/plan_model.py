"""The alpha-beta cost algebra of ``gradfuse-bench plan``: how long one allreduce of n bytes
takes on p ranks, k per node, by each algorithm.

A link is (alpha, beta): a step costs alpha seconds of latency plus beta seconds per byte.
`intra` is one rank's link inside a node (NVLink, PCIe, shared memory); `inter` is a node's
network link, beta per byte through the node's NICs together (NCCL runs one ring per NIC, so
every ring crossing a node shares them).

- flat ring over all p ranks: 2(p - 1) steps of n/p bytes each (reduce-scatter then
  allgather). A step ends when its slowest hop does: across nodes, that is the network.
- hierarchical, as gradfuse's engine runs it (cpp/engine/hierarchical.cpp): reduce-scatter in
  the node (k - 1 steps), a ring allreduce of each shard across the p/k nodes among the ranks
  with the same local rank (2(p/k - 1) steps, the k shards together cross the node's NICs),
  allgather in the node (k - 1 steps): 2(k - 1) + 2(p/k - 1) steps.
- The seed slides' hierarchical variant (reduce to one rank per group of k, ring across the
  p/k group leaders, broadcast back) takes 4(k - 1) + 2(p/k - 1): `tencent_hierarchical_steps`.
- tree (NCCL's double binary tree across nodes, a chain inside): 2 log2(p/k) + 2(k - 1)
  latency steps, and each rank sends and receives about n per direction. gradfuse does not
  run it; NCCL does when NCCL_ALGO allows, so the plan reports it where it would help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("flat", "hierarchical", "tree")


@dataclass(frozen=True)
class Link:
    alpha_s: float  # seconds per step
    beta_s_per_byte: float  # seconds per byte

    def __post_init__(self):
        if not (self.alpha_s >= 0 and self.beta_s_per_byte >= 0):
            raise ValueError(f"a link needs alpha_s >= 0 and beta_s_per_byte >= 0, got {self}")


def _check(p: int, k: int) -> int:
    """The node count of p ranks, k per node (p <= k: one node holding all p)."""
    if p < 1 or k < 1:
        raise ValueError(f"ranks and ranks per node must be >= 1, got p={p}, k={k}")
    if p > k and p % k:
        raise ValueError(f"{p} ranks do not fill nodes of {k}")
    return max(1, p // k)


def ring_steps(p: int) -> int:
    return 2 * (p - 1)


def hierarchical_steps(p: int, k: int) -> int:
    """Latency steps of gradfuse's hierarchical allreduce (see the module docstring)."""
    nodes = _check(p, k)
    k = min(k, p)
    return 2 * (k - 1) + 2 * (nodes - 1)


def tencent_hierarchical_steps(p: int, k: int) -> int:
    """The seed slides' count for p GPUs in p/k groups: 4(k - 1) + 2(p/k - 1)."""
    groups = _check(p, k)
    return 4 * (min(k, p) - 1) + 2 * (groups - 1)


def ring_time(nbytes: float, p: int, link: Link) -> float:
    if p == 1 or nbytes == 0:
        return 0.0
    return ring_steps(p) * link.alpha_s + 2 * (p - 1) / p * nbytes * link.beta_s_per_byte


def flat_wire_bytes(nbytes: float, p: int) -> float:
    """Bytes each rank sends (and receives) in a ring allreduce of nbytes."""
    return 2 * (p - 1) / p * nbytes


def hierarchical_wire_bytes(nbytes: float, p: int, k: int) -> tuple[float, float]:
    """(inside the node, across nodes) bytes each rank sends in the hierarchical allreduce."""
    nodes = _check(p, k)
    k = min(k, p)
    return 2 * (k - 1) / k * nbytes, 2 * (nodes - 1) / nodes * nbytes / k


def flat_time(nbytes: float, p: int, k: int, intra: Link, inter: Link) -> float:
    nodes = _check(p, k)
    if nodes == 1:
        return ring_time(nbytes, p, intra)
    if p == 1 or nbytes == 0:
        return 0.0
    beta = max(intra.beta_s_per_byte, inter.beta_s_per_byte)
    return ring_steps(p) * inter.alpha_s + flat_wire_bytes(nbytes, p) * beta


def hierarchical_time(nbytes: float, p: int, k: int, intra: Link, inter: Link) -> float:
    nodes = _check(p, k)
    if nodes == 1:
        return ring_time(nbytes, p, intra)
    if nbytes == 0:
        return 0.0
    inside, _ = hierarchical_wire_bytes(nbytes, p, k)
    # The k shards cross the node's NICs together: n bytes per node per ring direction.
    across = 2 * (nodes - 1) / nodes * nbytes
    return (
        2 * (k - 1) * intra.alpha_s
        + inside * intra.beta_s_per_byte
        + ring_steps(nodes) * inter.alpha_s
        + across * inter.beta_s_per_byte
    )


def tree_time(nbytes: float, p: int, k: int, intra: Link, inter: Link) -> float:
    nodes = _check(p, k)
    if nodes == 1 or nbytes == 0:
        return ring_time(nbytes, p, intra) if nodes == 1 else 0.0
    k = min(k, p)
    latency = 2 * math.ceil(math.log2(nodes)) * inter.alpha_s + 2 * (k - 1) * intra.alpha_s
    beta = max(intra.beta_s_per_byte, inter.beta_s_per_byte)
    return latency + 2 * nbytes * beta


_TIMES = {"flat": flat_time, "hierarchical": hierarchical_time, "tree": tree_time}


def allreduce_time(
    algorithm: str, nbytes: float, p: int, k: int, intra: Link, inter: Link
) -> float:
    try:
        fn = _TIMES[algorithm]
    except KeyError:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}") from None
    return fn(nbytes, p, k, intra, inter)


def crossover_bytes(
    p: int, k: int, intra: Link, inter: Link, lo: float = 1.0, hi: float = float(1 << 40)
) -> int | None:
    """The largest message size (bytes) at which hierarchical is no slower than flat, when
    hierarchical wins below it and flat above (the hybrid's threshold); None when one of them
    wins at every size in [lo, hi]."""

    def hier_wins(n):
        return hierarchical_time(n, p, k, intra, inter) <= flat_time(n, p, k, intra, inter)

    if not hier_wins(lo) or hier_wins(hi):
        return None
    # Both times are affine in n, so there is one crossing: bisect it in log space.
    while hi / lo > 1.0001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if hier_wins(mid) else (lo, mid)
    return int(lo)
