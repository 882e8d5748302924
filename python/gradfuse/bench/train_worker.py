"""One rank of ``gradfuse-bench train``: synthetic-data training throughput of the same model
with gradfuse's DistributedOptimizer and with torch DDP, in the same processes, alternating
rounds so both see the same machine state. Rank 0 writes the result as JSON.

Started by ``python -m gradfuse.run -np N -m gradfuse.bench.train_worker ...``."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.distributed as dist

import gradfuse as hvd

from . import ddp_hooks
from .models import MODELS


def _step_fn(model, optimizer, batch, labels, stepping=contextlib.nullcontext):
    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        with stepping():
            optimizer.step()

    return step


def _samples_per_second(step, batch_size, steps):
    """This rank's samples/s over `steps` steps, the slowest rank's view (a step ends for the
    job when the last rank finishes it)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return batch_size * steps / elapsed.item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--batch-size", type=int, required=True, help="per rank")
    p.add_argument("--steps", type=int, required=True, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ddp-hooks", default="", help="comma list of ddp_hooks.HOOKS")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    hvd.init()
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))

    ours_model = MODELS[args.model]()
    ours_opt = hvd.DistributedOptimizer(
        torch.optim.SGD(ours_model.parameters(), lr=0.01, momentum=0.9),
        named_parameters=ours_model.named_parameters(),
    )
    # The same with gradients as views of one flat buffer: reduced in place, no fusion copies.
    views_model = MODELS[args.model]()
    views_opt = hvd.DistributedOptimizer(
        torch.optim.SGD(views_model.parameters(), lr=0.01, momentum=0.9),
        named_parameters=views_model.named_parameters(),
        gradient_as_bucket_view=True,
    )
    ddp_model = torch.nn.parallel.DistributedDataParallel(MODELS[args.model]())
    ddp_opt = torch.optim.SGD(ddp_model.parameters(), lr=0.01, momentum=0.9)
    steps = {
        "gradfuse": _step_fn(ours_model, ours_opt, batch, labels),
        "gradfuse_views": _step_fn(views_model, views_opt, batch, labels),
        "ddp": _step_fn(ddp_model, ddp_opt, batch, labels),
    }
    for hook in filter(None, args.ddp_hooks.split(",")):
        hooked = ddp_hooks.make(hook, MODELS[args.model](), lr=0.01, momentum=0.9)
        steps[f"ddp_{hook}"] = _step_fn(*hooked[:2], batch, labels, hooked[2])
    for step in steps.values():  # warm-up: allocator, first negotiation, DDP's buckets
        for _ in range(2):
            step()
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(_samples_per_second(step, args.batch_size, args.steps))
    if hvd.rank() == 0:
        params = sum(p.numel() for p in ours_model.parameters())
        result = {
            "model": args.model,
            "ranks": hvd.size(),
            "batch_per_rank": args.batch_size,
            "parameters": params,
            **{f"{name}_per_rank": statistics.median(r) for name, r in rates.items()},
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
    hvd.shutdown()


if __name__ == "__main__":
    main()
