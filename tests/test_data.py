"""gradfuse.data: global batches sharded across ranks without overlap, reshuffled per epoch."""

import collections
import itertools

import pytest
import torch
from gradfuse.data import BalancedBatchSampler, DistributedBatchSampler, PKBatchSampler


def skewed_labels(gen, n=600, classes=6):
    # Class c has about (c + 1)^2 times as many samples as class 0.
    weights = torch.tensor([(c + 1.0) ** 2 for c in range(classes)])
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def shards(sampler_factory, world):
    """Each rank's batches, from independently constructed samplers (as on real ranks)."""
    return [list(DistributedBatchSampler(sampler_factory(), world, r)) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_partition_every_global_batch(gen, world):
    labels = skewed_labels(gen)
    global_batches = list(PKBatchSampler(labels, p=4, k=3, seed=7))
    per_rank = shards(lambda: PKBatchSampler(labels, p=4, k=3, seed=7), world)
    for step, batch in enumerate(global_batches):
        pieces = [per_rank[r][step] for r in range(world)]
        assert list(itertools.chain(*pieces)) == batch  # no overlap, nothing lost, same order
        assert all(len(piece) == 12 // world for piece in pieces)


def test_pk_batches_keep_classes_whole_on_each_rank(gen):
    labels = skewed_labels(gen)
    for rank_batches in shards(lambda: PKBatchSampler(labels, p=4, k=5, seed=1), 2):
        for batch in rank_batches:
            counts = collections.Counter(labels[batch].tolist())
            assert sorted(counts.values()) == [5, 5]  # 2 whole classes of K=5 per rank


def test_set_epoch_reshuffles_identically_on_every_rank(gen):
    labels = skewed_labels(gen)
    samplers = [
        DistributedBatchSampler(BalancedBatchSampler(labels, 8, seed=3), 2, r) for r in range(2)
    ]
    epoch0 = [list(s) for s in samplers]
    for s in samplers:
        s.set_epoch(1)
    epoch1 = [list(s) for s in samplers]
    assert epoch0 != epoch1
    fresh = BalancedBatchSampler(labels, 8, seed=3)
    fresh.set_epoch(1)
    assert [a + b for a, b in zip(epoch1[0], epoch1[1])] == list(fresh)


def test_balanced_sampler_evens_out_skewed_classes(gen):
    labels = skewed_labels(gen, n=6000)
    drawn = torch.tensor(list(itertools.chain(*BalancedBatchSampler(labels, 50, seed=0))))
    shares = torch.bincount(labels[drawn], minlength=6).double() / drawn.numel()
    raw = torch.bincount(labels, minlength=6).double() / labels.numel()
    assert raw.max() / raw.min() > 10  # the data are skewed ...
    assert (shares - 1 / 6).abs().max() < 0.03  # ... the batches are not


def test_torch_batch_sampler_and_dataloader():
    data = torch.utils.data.TensorDataset(torch.arange(40.0))
    inner = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(0)),
        8,
        drop_last=True,
    )
    loader = torch.utils.data.DataLoader(data, batch_sampler=DistributedBatchSampler(inner, 4, 1))
    batches = [x.tolist() for (x,) in loader]
    assert len(batches) == 5 and all(len(b) == 2 for b in batches)


def test_plain_distributed_sampler_still_works():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    seen = []
    for rank in range(2):
        s = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True)
        s.set_epoch(3)
        seen += list(s)
    assert sorted(seen) == list(range(10))


def test_bad_arguments(gen):
    labels = skewed_labels(gen)
    with pytest.raises(ValueError, match="does not split evenly over 4 ranks"):
        list(DistributedBatchSampler(PKBatchSampler(labels, p=3, k=3), 4, 0))
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        DistributedBatchSampler(PKBatchSampler(labels, p=2, k=2), 2, 2)
    with pytest.raises(ValueError, match="p must be between 1 and the 6 classes, got 7"):
        PKBatchSampler(labels, p=7, k=2)
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D sequence"):
        BalancedBatchSampler([], 4)
    with pytest.raises(RuntimeError, match="pass num_replicas and rank"):
        DistributedBatchSampler(PKBatchSampler(labels, p=2, k=2))
