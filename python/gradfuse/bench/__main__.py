"""gradfuse-bench: the benchmark tables.

  gradfuse-bench ops [--device cpu|cuda]             fused ops vs the torch code doing the same work
  gradfuse-bench allreduce --np 4                    allreduce sizes 1 KiB-256 MiB, vs torch
  gradfuse-bench resnet50-allreduce --np 4           ResNet-50's gradients: engine vs floor
  gradfuse-bench train --np 1,2,4 --model mlp        synthetic training, gradfuse vs DDP
      [--ddp-hook fp16,topk,powersgd,...]            and DDP with comm hooks beside it
  gradfuse-bench calibrate --out me.json             this machine's alpha/beta, pack, LARS
  gradfuse-bench plan --model resnet50 --gpus 8,64,1024,4096 --profile dgx-h100
                                                     predicted step time and best settings
  gradfuse-bench plan --validate                     predictions vs measured train steps

Every subcommand prints a table; --json PATH writes the results, --plot PATH.png draws them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .ddp_hooks import HOOKS


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--np must be like 1,2,4, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--np needs rank counts >= 1, got {text!r}")
    return ranks


def _hooks(text: str) -> list[str]:
    hooks = text.split(",")
    unknown = [h for h in hooks if h not in HOOKS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"--ddp-hook takes a comma list of {', '.join(HOOKS)}; got {', '.join(unknown)}"
        )
    return hooks


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
    resnet50 = sub.add_parser(
        "resnet50-allreduce",
        help="ResNet-50's 161 gradients: engine (separate tensors, views), torch, the floor",
    )
    resnet50.add_argument("--np", type=int, default=4, help="ranks on this host")
    resnet50.add_argument("--iters", type=int, default=10, help="timed iterations per row")
    resnet50.add_argument(
        "--latency-iters", type=int, default=200, help="timed 1 KiB allreduces per row"
    )
    resnet50.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="each gradient's share of its values, in (0, 1] (below 1: a quick run)",
    )
    allreduce.add_argument(
        "--hybrid",
        type=int,
        metavar="BYTES",
        help="also time hybrid allreduce: hierarchical up to BYTES per message, flat above",
    )
    allreduce.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="how long the idle CPU is measured, with and without the engine",
    )
    train = _train_parser(sub)
    plan = sub.add_parser("plan", help="predicted step time and best settings at scale")
    _plan_args(plan)
    for p in (ops, allreduce, resnet50, train, plan):
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
        p.add_argument("--plot", metavar="PATH", help="also draw the results (PNG)")
    calibrate = sub.add_parser("calibrate", help="measure this machine for plan (a profile)")
    calibrate.add_argument(
        "--np", type=_ranks, default=[2], help="rank counts to measure links with, e.g. 2,4,8"
    )
    calibrate.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (NCCL) where a GPU is present, else cpu (Gloo)",
    )
    calibrate.add_argument(
        "--max-size", type=int, default=4 << 20, help="largest message in bytes (4 KiB * 4^i)"
    )
    calibrate.add_argument("--model", choices=["mlp", "resnet18-like"], default="resnet18-like")
    calibrate.add_argument("--batch-size", type=int, default=32, help="per rank, for compute")
    calibrate.add_argument("--out", default="gradfuse_profile.json", help="the profile (JSON)")
    calibrate.add_argument(
        "--points",
        nargs="+",
        metavar="JSON",
        help="fit these calibrate_worker results (a multi-host job) instead of measuring here",
    )
    return parser


def _train_parser(sub) -> argparse.ArgumentParser:
    from .models import MODELS
    from .train_worker import BUCKET_VIEWS

    train = sub.add_parser("train", help="synthetic training throughput, gradfuse vs DDP")
    train.add_argument("--np", type=_ranks, default=[1, 2, 4], help="rank counts, e.g. 1,2,4")
    train.add_argument("--model", choices=sorted(MODELS), default="resnet18-like")
    train.add_argument("--batch-size", type=int, help="per rank (default: 8 for resnet50, else 32)")
    train.add_argument("--steps", type=int, default=10, help="timed steps per round")
    train.add_argument("--rounds", type=int, default=3, help="alternating rounds per framework")
    train.add_argument(
        "--bucket-view",
        choices=sorted(BUCKET_VIEWS),
        default="both",
        help="gradient_as_bucket_view of DistributedOptimizer and DDP: off, on or both rows",
    )
    train.add_argument(
        "--timeline",
        metavar="PATH",
        help="after the rounds, record one gradfuse step's engine timeline (rank 0) to PATH "
        "(PATH.npN.json with several --np) and summarize it",
    )
    train.add_argument(
        "--ddp-hook",
        type=_hooks,
        default=[],
        help="DDP rows with comm hooks, a comma list of " + ",".join(HOOKS),
    )
    return train


def _positive(parser, **values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _plan_args(plan) -> None:
    from .plan_profiles import BUILTIN

    plan.add_argument(
        "--model", default="resnet50", help="resnet50, or a JSON file (plan_workload.from_json)"
    )
    plan.add_argument(
        "--gpus", type=_gpus, default=[8, 64, 1024, 4096], help="GPU counts, e.g. 8,64,1024"
    )
    plan.add_argument("--gpus-per-node", type=int, help="default: the profile's")
    plan.add_argument(
        "--profile",
        default="dgx-h100",
        help=f"a calibrate JSON file or a built-in: {', '.join(BUILTIN)}",
    )
    plan.add_argument("--batch-per-gpu", type=int, default=64)
    plan.add_argument(
        "--wire", choices=["fp32", "fp16"], default="fp32", help="gradient dtype on the wire"
    )
    plan.add_argument(
        "--validate",
        action="store_true",
        help="instead: calibrate this machine, measure `train` at --np ranks, compare with the "
        "predictions; and predict the seeds' published runs",
    )
    plan.add_argument("--np", type=_ranks, default=[1, 2, 4, 8], help="--validate: rank counts")
    plan.add_argument(
        "--train-model",
        choices=["mlp", "resnet18-like"],
        default="resnet18-like",
        help="--validate: the train benchmark's model",
    )
    plan.add_argument("--batch-size", type=int, default=32, help="--validate: per rank")


def _gpus(text: str) -> list[int]:
    try:
        return _ranks(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--gpus must be like 8,64,1024, got {text!r}") from None


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

        _positive(parser, np=args.np)
        sizes = [s for s in bench.default_sizes() if s <= args.max_size]
        if not sizes:
            parser.error(f"--max-size must be at least 1024, got {args.max_size}")
        if args.hybrid is not None and args.hybrid < 0:
            parser.error(f"--hybrid must be >= 0 bytes, got {args.hybrid}")
        if args.idle_seconds <= 0:
            parser.error(f"--idle-seconds must be > 0, got {args.idle_seconds}")
        results = bench.run(args.np, sizes, args.hybrid, args.idle_seconds)
        print(bench.format_table(results))
        if args.plot:
            bench.plot(results, args.plot)
    elif args.command == "resnet50-allreduce":
        from . import resnet50_allreduce as bench

        _positive(parser, np=args.np, iters=args.iters, latency_iters=args.latency_iters)
        if not 0 < args.scale <= 1:
            parser.error(f"--scale must be in (0, 1], got {args.scale}")
        results = bench.run(args.np, args.iters, args.latency_iters, args.scale)
        print(bench.format_table(results))
        if args.plot:
            bench.plot(results, args.plot)
    elif args.command == "calibrate":
        return _calibrate(parser, args)
    elif args.command == "plan":
        results = _plan(parser, args)
    else:
        from . import train as bench

        _positive(parser, batch_size=args.batch_size, steps=args.steps, rounds=args.rounds)
        if args.model == "resnet50" and args.batch_size == 1:
            # Its last stage is 1x1 on 32x32 images: BatchNorm needs two values per channel.
            parser.error("--model resnet50 needs --batch-size >= 2, got 1")
        results = bench.run(
            args.np,
            args.model,
            args.batch_size,
            args.steps,
            args.rounds,
            bucket_view=args.bucket_view,
            timeline=args.timeline,
            ddp_hooks=args.ddp_hook,
        )
        print(bench.format_table(results))
        if args.plot:
            bench.plot(results, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _calibrate(parser, args) -> int:
    from . import calibrate

    if min(args.np) < 2:
        parser.error(f"--np: calibrating links needs at least 2 ranks, got {args.np}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    sizes = calibrate.default_sizes(args.max_size)
    if len(sizes) < 2:
        parser.error(f"--max-size must be at least 16384 (two sizes), got {args.max_size}")
    points = []
    for path in args.points or []:
        try:
            with open(path) as f:
                points.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--points {path}: cannot read calibrate_worker results: {e}")
    try:
        profile = calibrate.run(
            args.np, args.device, sizes, args.model, args.batch_size, points=points
        )
    except (KeyError, TypeError, ValueError) as e:
        parser.error(f"--points: not calibrate_worker results ({e!r})" if points else str(e))
    print(calibrate.format_table(profile))
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=2)
    print(f"profile written to {args.out}: gradfuse-bench plan --profile {args.out} ...")
    return 0


def _plan(parser, args):
    from . import plan

    if args.validate:
        from . import plan_validate

        if args.plot:
            parser.error("--plot draws a plan; --validate prints a table (and --json)")
        results = plan_validate.run(args.np, args.train_model, args.batch_size)
        print(plan_validate.format_table(results))
        return results
    if args.batch_per_gpu < 1:
        parser.error(f"--batch-per-gpu must be >= 1, got {args.batch_per_gpu}")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        parser.error(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    try:
        results = plan.run(
            args.model,
            args.gpus,
            args.gpus_per_node,
            args.profile,
            args.batch_per_gpu,
            args.wire,
        )
    except ValueError as e:
        parser.error(str(e))
    print(plan.format_table(results))
    if args.plot:
        plan.plot(results, args.plot)
    return results


if __name__ == "__main__":
    sys.exit(main())
