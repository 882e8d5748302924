"""One rank of the top-k training test: DistributedOptimizer with Compression.topk for 200
steps, then every rank's parameters compared bit for bit (tests/test_topk_training.py). The
model, data and training loop are training_worker's; the device is multiproc.device()."""

from __future__ import annotations

import sys

import gradfuse as hvd
import torch
from multiproc import checks_of, worker_main
from training_worker import train

STEPS = 200


def assert_every_rank_identical(model, label):
    mine = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = hvd.allgather(mine.unsqueeze(0), name=f"params.{label}")
    for rank in range(hvd.size()):
        same = torch.equal(everyone[rank].view(torch.int32), mine.view(torch.int32))
        assert same, f"{label}: rank {rank}'s parameters differ from rank {hvd.rank()}'s"


def topk_run(sampled):
    # min_numel 64: every weight goes sparse, the biases dense. 1% density, so several ranks
    # often pick the same index and its values are summed from the gathered picks.
    compression = hvd.Compression.topk(0.01, sampled=sampled, min_numel=64)
    model = train("sgd", STEPS, compression=compression)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "non-finite"
    assert_every_rank_identical(model, f"sampled={sampled}")


def check_topk_exact_ranks_stay_bitwise_identical():
    topk_run(sampled=False)


def check_topk_sampled_ranks_stay_bitwise_identical():
    topk_run(sampled=True)


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
