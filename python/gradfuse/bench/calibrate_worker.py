"""One rank of ``gradfuse-bench calibrate``: times torch.distributed allreduce and allgather
across message sizes on the transport the engine uses (Gloo for CPU tensors, NCCL for CUDA
ones), inside each node and, when the job spans several hosts, across nodes (the ranks with
the same local rank, all such rings at once, as the hierarchical allreduce runs them). With
--model, every rank then times the model's forward + backward at once, with no collective
between: what a rank computes at while this many ranks share the host (on a CPU host with
fewer cores than ranks, or memory bandwidth to share, it is slower than one rank alone). Rank 0
writes the (bytes, seconds) points and that time as JSON; calibrate.py fits them.

Started by ``python -m gradfuse.run -np N -m gradfuse.bench.calibrate_worker ...``."""

from __future__ import annotations

import argparse
import json
import socket

import torch
import torch.distributed as dist

from .timing import median_seconds, slowest_rank_median_seconds


def _iters(nbytes: int) -> int:
    return max(3, min(20, (16 << 20) // max(nbytes, 1)))


def _levels(device: str):
    """{level: (group, ranks in it)} for this rank: "intra" (its node) and, across hosts,
    "inter" (its local rank on every node). Every rank creates every group, in order."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    nodes: dict[str, list[int]] = {}
    for r, host in enumerate(hosts):
        nodes.setdefault(host, []).append(r)
    layout = list(nodes.values())
    backend = "nccl" if device == "cuda" else "gloo"
    me = dist.get_rank()
    if len(layout) == 1:
        return {"intra": (dist.new_group(backend=backend), len(layout[0]))}, layout
    if len({len(n) for n in layout}) > 1:
        raise ValueError(f"calibrate needs the same rank count on every host, got {layout}")
    levels = {}
    for node in layout:
        group = dist.new_group(ranks=node, backend=backend)
        if me in node:
            levels["intra"] = (group, len(node))
    for local in range(len(layout[0])):
        ranks = [node[local] for node in layout]
        group = dist.new_group(ranks=ranks, backend=backend)
        if me in ranks:
            levels["inter"] = (group, len(ranks))
    return levels, layout


def _timed(fn, device: str, iters: int) -> float:
    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    return slowest_rank_median_seconds(call, iters)


def _concurrent_compute_seconds(model: str, batch: int, device: torch.device) -> float:
    """The slowest rank's median forward + backward of `model` while every rank runs its own
    at the same time (one barrier to start them together, none between steps)."""
    from .calibrate import model_step

    step = model_step(model, batch, device)
    dist.barrier()
    t = torch.tensor([median_seconds(step, device, reps=7, warmup=2)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True, help="comma-separated message sizes in bytes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", help="also time this bench model's forward + backward on every rank")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    dist.init_process_group("gloo")
    if args.device == "cuda":
        local = dist.get_rank() % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    levels, layout = _levels(args.device)
    points = {}
    for level, (group, members) in levels.items():
        rows = []
        for nbytes in sizes:
            numel = max(members, nbytes // 4 // members * members)
            buf = torch.randn(numel, device=device)
            out = torch.empty(numel, device=device)  # allgather: nbytes in all, 1/members each
            ar = _timed(
                lambda b=buf, g=group: dist.all_reduce(b, group=g), args.device, _iters(nbytes)
            )
            ag = _timed(
                lambda o=out, b=buf, g=group, m=members: dist.all_gather_into_tensor(
                    o, b[: b.numel() // m], group=g
                ),
                args.device,
                _iters(nbytes),
            )
            rows.append({"bytes": numel * 4, "allreduce_s": ar, "allgather_s": ag})
        points[level] = {"ranks": members, "rows": rows}
    compute_s = (
        _concurrent_compute_seconds(args.model, args.batch_size, device) if args.model else None
    )
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "ranks": dist.get_world_size(),
                    "nodes": len(layout),
                    "ranks_per_node": len(layout[0]),
                    "device": args.device,
                    "levels": points,
                    "compute_step_s": compute_s,
                    "compute_model": [args.model, args.batch_size] if args.model else None,
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
