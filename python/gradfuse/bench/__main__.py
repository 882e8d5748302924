"""`python -m gradfuse.bench ops [--device cpu|cuda] [--json out.json]`."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradfuse-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_ops = sub.add_parser("ops", help="fused ops vs the torch code doing the same work")
    p_ops.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p_ops.add_argument("--density", type=float, default=0.001, help="top-k density")
    p_ops.add_argument("--reps", type=int, default=11, help="timed repetitions per row")
    p_ops.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    if args.command == "ops":
        from . import ops as bench_ops

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        rows, copy_bw = bench_ops.run(args.device, args.density, args.reps)
        print(bench_ops.format_table(rows, copy_bw, args.device))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(bench_ops.to_json(rows, copy_bw), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
