"""gradfuse-bench: the benchmark tables.

  gradfuse-bench ops [--device cpu|cuda]             fused ops vs the torch code doing the same work
  gradfuse-bench allreduce --np 4                    allreduce sizes 1 KiB-256 MiB, vs torch
  gradfuse-bench train --np 1,2,4 --model mlp        synthetic training, gradfuse vs DDP

Every subcommand prints a table; --json PATH writes the results, --plot PATH.png draws them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--np must be like 1,2,4, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--np needs rank counts >= 1, got {text!r}")
    return ranks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradfuse-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ops = sub.add_parser("ops", help="fused ops vs the torch code doing the same work")
    ops.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ops.add_argument("--density", type=float, default=0.001, help="top-k density")
    ops.add_argument("--reps", type=int, default=11, help="timed repetitions per row")
    allreduce = sub.add_parser("allreduce", help="allreduce across message sizes, vs torch")
    allreduce.add_argument("--np", type=int, default=4, help="ranks on this host")
    allreduce.add_argument(
        "--max-size",
        type=int,
        default=256 << 20,
        help="largest message in bytes (sizes are 1 KiB * 4^i up to it)",
    )
    allreduce.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="how long the idle CPU is measured, with and without the engine",
    )
    train = sub.add_parser("train", help="synthetic training throughput, gradfuse vs DDP")
    train.add_argument("--np", type=_ranks, default=[1, 2, 4], help="rank counts, e.g. 1,2,4")
    train.add_argument("--model", choices=["mlp", "resnet18-like"], default="resnet18-like")
    train.add_argument("--batch-size", type=int, default=32, help="per rank")
    train.add_argument("--steps", type=int, default=10, help="timed steps per round")
    train.add_argument("--rounds", type=int, default=3, help="alternating rounds per framework")
    for p in (ops, allreduce, train):
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        p.add_argument("--plot", metavar="PATH", help="also draw the results (PNG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "ops":
        from . import ops as bench

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        rows, copy_bw = bench.run(args.device, args.density, args.reps)
        print(bench.format_table(rows, copy_bw, args.device))
        results = bench.to_json(rows, copy_bw)
        if args.plot:
            bench.plot(rows, args.plot)
    elif args.command == "allreduce":
        from . import allreduce as bench

        if args.np < 1:
            parser.error(f"--np must be >= 1, got {args.np}")
        sizes = [s for s in bench.default_sizes() if s <= args.max_size]
        if not sizes:
            parser.error(f"--max-size must be at least 1024, got {args.max_size}")
        if args.idle_seconds <= 0:
            parser.error(f"--idle-seconds must be > 0, got {args.idle_seconds}")
        results = bench.run(args.np, sizes, args.idle_seconds)
        print(bench.format_table(results))
        if args.plot:
            bench.plot(results, args.plot)
    else:
        from . import train as bench

        results = bench.run(args.np, args.model, args.batch_size, args.steps, args.rounds)
        print(bench.format_table(results))
        if args.plot:
            bench.plot(results, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
