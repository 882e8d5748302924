"""Distributed batch sampling: any batch-sampling logic, sharded across ranks.

WeChat's recipe (shared/seeds) needs class-balanced and triplet (P classes x K samples)
batches in data-parallel training, which torch's DistributedSampler cannot express: it shards
*indices*, and the batching logic then sees only this rank's shard. Here the batching logic
produces the *global* batch, identically on every rank (seeded by ``seed`` and the epoch), and
:class:`DistributedBatchSampler` hands each rank its contiguous slice. So N ranks together see
exactly the batches one process would, and a P x K batch split over N ranks (P divisible by N)
keeps every class whole on one rank, as a triplet loss needs.

Example::

    sampler = gradfuse.data.DistributedBatchSampler(
        gradfuse.data.PKBatchSampler(labels, p=16, k=4, seed=0))   # 64 global, 64/N per rank
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)   # same reshuffle on every rank
        for x, y in loader: ...

Plain ``torch.utils.data.DistributedSampler`` keeps working with gradfuse as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class _EpochSeededBatchSampler:
    """A fixed number of batches per epoch, drawn from a generator seeded by (seed, epoch), so
    every rank produces the same batches and ``set_epoch`` reshuffles them all alike."""

    def __init__(self, num_batches: int, seed: int):
        self.num_batches, self.seed, self.epoch = num_batches, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)


def _labels_by_class(labels: Sequence[int] | torch.Tensor) -> dict[int, torch.Tensor]:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(
            f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}"
        )
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}


class BalancedBatchSampler(_EpochSeededBatchSampler):
    """Class-balanced batches: each sample is drawn (with replacement) with probability
    inversely proportional to its class's frequency, so every class is equally likely in every
    batch however skewed the data set is. ``len(labels) // batch_size`` batches per epoch."""

    def __init__(self, labels, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        classes = _labels_by_class(labels)
        labels = torch.as_tensor(labels)
        counts = {c: idx.numel() for c, idx in classes.items()}
        self.weights = torch.tensor([1.0 / counts[int(c)] for c in labels], dtype=torch.float64)
        self.batch_size = batch_size
        super().__init__(len(labels) // batch_size, seed)

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator()
        draws = torch.multinomial(
            self.weights, self.num_batches * self.batch_size, replacement=True, generator=gen
        )
        yield from draws.view(self.num_batches, self.batch_size).tolist()


class PKBatchSampler(_EpochSeededBatchSampler):
    """Triplet-loss batches: ``p`` distinct classes, ``k`` samples of each, laid out class by
    class (``k`` consecutive indices per class). A class with fewer than ``k`` samples is drawn
    with replacement. ``len(labels) // (p * k)`` batches per epoch."""

    def __init__(self, labels, p: int, k: int, seed: int = 0):
        self.classes = _labels_by_class(labels)
        if not 1 <= p <= len(self.classes):
            raise ValueError(f"p must be between 1 and the {len(self.classes)} classes, got {p}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.p, self.k = p, k
        self.batch_size = p * k
        super().__init__(max(1, len(torch.as_tensor(labels)) // self.batch_size), seed)

    def __iter__(self) -> Iterator[list[int]]:
        gen = self._generator()
        class_ids = sorted(self.classes)
        for _ in range(self.num_batches):
            batch: list[int] = []
            for c in torch.randperm(len(class_ids), generator=gen)[: self.p].tolist():
                members = self.classes[class_ids[c]]
                if members.numel() >= self.k:
                    pick = torch.randperm(members.numel(), generator=gen)[: self.k]
                else:
                    pick = torch.randint(members.numel(), (self.k,), generator=gen)
                batch += members[pick].tolist()
            yield batch


class DistributedBatchSampler:
    """Shards the global batches of ``batch_sampler`` across ranks without overlap.

    Every rank runs the same ``batch_sampler`` (it must be deterministic given its seed and
    epoch, as :class:`BalancedBatchSampler`, :class:`PKBatchSampler` and ``torch``'s
    ``BatchSampler`` over a seeded ``RandomSampler`` are) and yields slice ``rank`` of each
    global batch split into ``num_replicas`` equal contiguous parts; the global batch size must
    divide evenly. ``num_replicas`` / ``rank`` default to torch.distributed's world size and rank.
    ``set_epoch`` is forwarded to the wrapped sampler (and its ``sampler``, if it has one).
    """

    def __init__(self, batch_sampler, num_replicas: int | None = None, rank: int | None = None):
        if num_replicas is None or rank is None:
            dist = torch.distributed
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "DistributedBatchSampler: pass num_replicas and rank, or initialize "
                    "torch.distributed (gradfuse.init() does) first"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.batch_sampler = batch_sampler
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) % self.num_replicas != 0:
                raise ValueError(
                    f"DistributedBatchSampler: a global batch of {len(batch)} samples does not "
                    f"split evenly over {self.num_replicas} ranks; use a multiple of "
                    f"{self.num_replicas} (or drop_last=True in a torch BatchSampler)"
                )
            per_rank = len(batch) // self.num_replicas
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]


__all__ = ["BalancedBatchSampler", "DistributedBatchSampler", "PKBatchSampler"]
