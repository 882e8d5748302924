"""The gradfuse demo: data-parallel training of a small CNN on scikit-learn's bundled digits.

Run on 4 CPU ranks with ``python -m gradfuse.run -np 4 -m gradfuse.demo`` (what
``bash scripts/demo.sh`` does). It shows the whole recipe of the seeds: parameters broadcast
from rank 0, class-balanced batches sharded across ranks, fused LARS (no LARS or weight decay
on biases and BatchNorm) behind DistributedOptimizer with fp16 gradient compression, the loss
all-reduced for logging, rank 0 saving the checkpoint, and held-out accuracy at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import gradfuse as hvd
from gradfuse import _C
from gradfuse.data import BalancedBatchSampler, DistributedBatchSampler

HELD_OUT = 360  # the last images of the data set, never trained on

COMPRESSIONS = {
    "none": hvd.Compression.none,
    "fp16": hvd.Compression.fp16,
    "bf16": hvd.Compression.bf16,
}


def load_digits_tensors():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(y)


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 4 * 4, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def evaluate(model, x, y) -> float:
    """Held-out accuracy over all ranks: each scores a slice, the counts are all-reduced."""
    model.eval()
    mine = torch.arange(hvd.rank(), len(x), hvd.size())
    with torch.no_grad():
        correct = (model(x[mine]).argmax(1) == y[mine]).sum().double()
    total = hvd.allreduce(correct, op=hvd.Sum, name="eval.correct")
    model.train()
    return total.item() / len(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gradfuse.demo", description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over ranks")
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--trust-coefficient", type=float, default=0.01)
    p.add_argument("--compression", choices=sorted(COMPRESSIONS), default="fp16")
    p.add_argument("--checkpoint", type=Path, default=Path("build/demo/digits.pt"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the {size} ranks")
    torch.manual_seed(1234 + rank)  # different on purpose: broadcast_parameters aligns them

    x, y = load_digits_tensors()
    x_train, y_train, x_test, y_test = x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
    model = make_model()
    optimizer = hvd.DistributedOptimizer(
        hvd.optim.LARS(
            model.parameters(),
            lr=args.lr,
            momentum=0.9,
            weight_decay=5e-4,
            trust_coefficient=args.trust_coefficient,
        ),
        named_parameters=model.named_parameters(),
        compression=COMPRESSIONS[args.compression],
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    sampler = DistributedBatchSampler(
        BalancedBatchSampler(y_train, args.batch_size, seed=0), size, rank
    )
    steps_per_epoch = len(sampler)
    total_steps = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.25
    )

    progress = None
    if rank == 0:
        from tqdm import tqdm

        print(
            f"gradfuse demo: {size} ranks, global batch {args.batch_size} "
            f"({args.batch_size // size} per rank), LARS + {args.compression} gradients, "
            f"{args.epochs} epochs x {steps_per_epoch} steps",
            flush=True,
        )
        progress = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
    step_times = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            mean_loss = hvd.allreduce(loss.detach(), name="loss")  # for logging only
            step_times.append(time.perf_counter() - t0)
            if progress is not None:
                progress.set_postfix(epoch=epoch, loss=f"{mean_loss.item():.3f}")
                progress.update()
    elapsed = time.perf_counter() - start
    if progress is not None:
        progress.close()

    accuracy = evaluate(model, x_test, y_test)
    if rank == 0:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epochs": args.epochs,
            },
            args.checkpoint,
        )
    engine = _C.engine_stats()  # counters of this rank's engine
    if rank == 0:
        samples = total_steps * args.batch_size
        fused = engine["tensors"] / max(engine["collectives"], 1)
        rows = [
            ("held-out accuracy", f"{100 * accuracy:.1f}% of {HELD_OUT} unseen images"),
            ("final loss (mean over ranks)", f"{mean_loss.item():.4f}"),
            ("time per step (median)", f"{1e3 * statistics.median(step_times):.1f} ms"),
            ("training time", f"{elapsed:.1f} s, {samples / elapsed:.0f} samples/s"),
            ("bytes all-reduced by this rank", f"{engine['bytes'] / 1e6:.1f} MB"),
            (
                "collectives / tensors",
                f"{engine['collectives']} / {engine['tensors']} ({fused:.1f} per collective)",
            ),
            ("checkpoint (rank 0)", str(args.checkpoint)),
        ]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
