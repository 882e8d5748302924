"""One rank of ``gradfuse-bench allreduce``: for each message size, the same bytes as 16
tensors reduced four ways — one torch all_reduce of a flat buffer (the floor), one torch
all_reduce per tensor, gradfuse's engine (fused), and gradfuse with hierarchical allreduce
(nodes of size/2 ranks); with --hybrid-threshold, a fifth: hybrid (hierarchical for fused
messages up to the threshold, flat above). torch is measured first, before the engine runs, so
the engine's idle negotiation does not slow it. Then the 1 KiB latency (engine against a direct
Gloo allreduce) and the CPU an idle process uses with and without the engine. Rank 0 writes the
result as JSON.

Started by ``python -m gradfuse.run -np N -m gradfuse.bench.allreduce_worker ...``."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import gradfuse as hvd

from .timing import slowest_rank_median_seconds

TENSORS = 16  # each message is this many equal tensors (fewer when it is tiny)


def _iters(nbytes: int) -> int:
    return max(3, min(30, (64 << 20) // max(nbytes, 1)))


def _engine_call(tensors, tag):
    def call():
        handles = [
            hvd.allreduce_async_(t, name=f"{tag}.{i}", op=hvd.Sum) for i, t in enumerate(tensors)
        ]
        for h in handles:
            hvd.synchronize(h)

    return call


def _cpu_percent_while_idle(seconds):
    """This process's CPU time (every thread: the engine's, Gloo's) over `seconds` of sleep, as
    a percentage of one core; the maximum over ranks."""
    dist.barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    pct = 100 * (time.process_time() - cpu) / (time.perf_counter() - wall)
    t = torch.tensor([pct], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


LATENCY_ROUNDS, LATENCY_ITERS = 5, 60


def _direct_latency(t):
    """A direct Gloo allreduce of `t` on the default group: the median over rounds."""
    rounds = [
        slowest_rank_median_seconds(lambda: dist.all_reduce(t), LATENCY_ITERS)
        for _ in range(LATENCY_ROUNDS)
    ]
    return statistics.median(rounds)


def _latency(direct_before_init_s, rounds=LATENCY_ROUNDS, iters=LATENCY_ITERS):
    """1 KiB allreduce: the engine against a direct Gloo call on the default group (with the
    engine idle), alternating rounds; medians over rounds, and how the engine ran them."""
    t = torch.randn(256)
    direct, engine = [], []
    before = hvd.stats()
    for _ in range(rounds):
        direct.append(slowest_rank_median_seconds(lambda: dist.all_reduce(t), iters))
        engine.append(
            slowest_rank_median_seconds(lambda: hvd.allreduce_(t, name="lat", op=hvd.Sum), iters)
        )
    after = hvd.stats()
    delta = {k: after[k] - before[k] for k in ("tensors", "inline_reduced", "fast_cycles")}
    return {
        "direct_before_init_s": direct_before_init_s,
        "direct_s": statistics.median(direct),
        "engine_s": statistics.median(engine),
        "engine_tensors": delta["tensors"],
        "inline_reduced": delta["inline_reduced"],
        "fast_cycles": delta["fast_cycles"],
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True, help="comma-separated message sizes in bytes")
    p.add_argument("--hybrid-threshold", type=int, help="also time hybrid allreduce (bytes)")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    dist.init_process_group("gloo")  # the user's group; gradfuse.init() adopts it later
    size = dist.get_world_size()
    messages = {}
    for nbytes in sizes:
        count = max(1, min(TENSORS, nbytes // 1024))
        numel = max(1, nbytes // 4 // count)
        messages[nbytes] = [torch.randn(numel) for _ in range(count)]
    rows = {n: {"bytes": n, "tensors": len(ts)} for n, ts in messages.items()}

    for nbytes, tensors in messages.items():
        flat = torch.cat(tensors)
        rows[nbytes]["torch_flat"] = slowest_rank_median_seconds(
            lambda f=flat: dist.all_reduce(f), _iters(nbytes)
        )
        rows[nbytes]["torch_per_tensor"] = slowest_rank_median_seconds(
            lambda ts=tensors: [dist.all_reduce(t) for t in ts], _iters(nbytes)
        )

    idle = {"without_engine_pct": _cpu_percent_while_idle(args.idle_seconds)}
    direct_before_init = _direct_latency(torch.randn(256))
    hvd.init()
    latency = _latency(direct_before_init)
    idle["with_engine_pct"] = _cpu_percent_while_idle(args.idle_seconds)
    idle["seconds"] = args.idle_seconds
    for nbytes, tensors in messages.items():
        rows[nbytes]["gradfuse"] = slowest_rank_median_seconds(
            _engine_call(tensors, f"flat{nbytes}"), _iters(nbytes)
        )
    hvd.shutdown()
    if size >= 4 and size % 2 == 0:
        variants = [("gradfuse_hierarchical", "hier", -1)]
        if args.hybrid_threshold is not None:
            variants.append(("gradfuse_hybrid", "hybrid", args.hybrid_threshold))
        for key, tag, threshold in variants:
            hvd.init(
                hierarchical_allreduce=True,
                hierarchical_threshold_bytes=threshold,
                test_local_size=size // 2,
            )
            for nbytes, tensors in messages.items():
                rows[nbytes][key] = slowest_rank_median_seconds(
                    _engine_call(tensors, f"{tag}{nbytes}"), _iters(nbytes)
                )
            hvd.shutdown()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            out = {"ranks": size, "rows": list(rows.values()), "latency": latency, "idle": idle}
            if args.hybrid_threshold is not None:
                out["hybrid_threshold"] = args.hybrid_threshold
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
