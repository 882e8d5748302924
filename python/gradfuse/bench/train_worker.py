"""One rank of ``gradfuse-bench train``: synthetic-data training throughput of the same model
with gradfuse's DistributedOptimizer and with torch DDP, in the same processes, alternating
rounds so both see the same machine state. Each framework runs with and (or) without its
gradients as views of the communication buckets (``gradient_as_bucket_view`` in both).
Rank 0 writes the result as JSON, with every round's rate.

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

IMAGE_SIZE = 32  # every model takes 3x32x32 images (ResNet-50 too: a short CPU step)
# --bucket-view: which gradient layouts run ("off": separate gradients, "on": bucket views).
BUCKET_VIEWS = {"off": (False,), "on": (True,), "both": (False, True)}


def config_name(framework: str, bucket_view: bool) -> str:
    """The result key of one configuration: gradfuse, gradfuse_views, ddp, ddp_views."""
    return framework + ("_views" if bucket_view else "")


def _step_fn(model, optimizer, batch, labels, stepping=contextlib.nullcontext):
    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        with stepping():
            optimizer.step()

    return step


def _gradfuse(model_name, bucket_view):
    model = MODELS[model_name]()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        named_parameters=model.named_parameters(),
        gradient_as_bucket_view=bucket_view,
    )
    return model, opt


def _ddp(model_name, bucket_view):
    model = torch.nn.parallel.DistributedDataParallel(
        MODELS[model_name](), gradient_as_bucket_view=bucket_view
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def configurations(args) -> dict:
    """Configuration name -> (model, optimizer, stepping), in the order the rounds run them;
    `stepping` is the context optimizer.step() runs in (a comm hook's state may need one)."""
    configs = {}
    for view in BUCKET_VIEWS[args.bucket_view]:
        configs[config_name("gradfuse", view)] = (*_gradfuse(args.model, view), None)
        configs[config_name("ddp", view)] = (*_ddp(args.model, view), None)
    for hook in filter(None, args.ddp_hooks.split(",")):
        configs[f"ddp_{hook}"] = ddp_hooks.make(hook, MODELS[args.model](), lr=0.01, momentum=0.9)
    return configs


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


def _record_timeline(step, path):
    """One more step of `step` with the engine's timeline on (rank 0 writes `path`)."""
    hvd.start_timeline(path)
    try:
        step()
    finally:
        hvd.stop_timeline()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--batch-size", type=int, required=True, help="per rank")
    p.add_argument("--steps", type=int, required=True, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bucket-view", choices=sorted(BUCKET_VIEWS), default="both")
    p.add_argument("--timeline", help="write a timeline of one gradfuse step here")
    p.add_argument("--ddp-hooks", default="", help="comma list of ddp_hooks.HOOKS")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    hvd.init()
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.randint(0, 10, (args.batch_size,))
    configs = configurations(args)
    steps = {
        name: _step_fn(model, opt, batch, labels, stepping or contextlib.nullcontext)
        for name, (model, opt, stepping) in configs.items()
    }
    for step in steps.values():  # warm-up: allocator, first negotiation, DDP's buckets
        for _ in range(2):
            step()
    rates = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(_samples_per_second(step, args.batch_size, args.steps))
    if args.timeline:
        _record_timeline(
            next(s for n, s in steps.items() if n.startswith("gradfuse")), args.timeline
        )
    if hvd.rank() == 0:
        model = next(iter(configs.values()))[0]
        result = {
            "model": args.model,
            "ranks": hvd.size(),
            "batch_per_rank": args.batch_size,
            "image_size": IMAGE_SIZE,
            "parameters": sum(p.numel() for p in model.parameters()),
            "rounds": rates,
            **{f"{name}_per_rank": statistics.median(r) for name, r in rates.items()},
        }
        with open(args.out, "w") as f:
            json.dump(result, f)
    hvd.shutdown()


if __name__ == "__main__":
    main()
