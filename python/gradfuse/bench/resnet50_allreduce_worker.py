"""One rank of ``gradfuse-bench resnet50-allreduce``: ResNet-50's 161 gradients (25.6M fp32
values) reduced (a) by gradfuse's engine as separate tensors, (a') by the engine as views of
one flat buffer (DistributedOptimizer's gradient_as_bucket_view layout: reduced in place, no
fusion copies), (b) by one torch all_reduce per tensor, (c) by one torch all_reduce of a flat
buffer of the same size (the floor), (d) in DDP-style 25 MiB buckets, (e) as (a) with
hierarchical allreduce, the ranks as nodes of 2 (even rank counts), (f) the fusion copies
alone: gradfuse's pack_ and unpack_ of the same tensors, on every rank at once, one thread each
(as the engine's executor runs them), so that (c) + (f) is the floor for separate tensors that
are copied into a buffer and back; plus one 1 KiB allreduce through the engine against a direct
all_reduce. The baselines run before gradfuse.init(), so
the engine's background thread takes no CPU from them. Rank 0 writes the result as JSON.

Started by ``python -m gradfuse.run -np N -m gradfuse.bench.resnet50_allreduce_worker ...``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import torch
import torch.distributed as dist

import gradfuse as hvd
from gradfuse import ops

from .shapes import resnet50_shapes
from .timing import slowest_rank_median_seconds as timed

BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb


def _engine_allreduce(tensors, tag, together=False):
    """All of `tensors` through the engine; `together`: in one submission (one negotiation)."""

    def call():
        with hvd.submitted_together() if together else contextlib.nullcontext():
            handles = [
                hvd.allreduce_async_(t, name=f"{tag}{i}", op=hvd.Sum) for i, t in enumerate(tensors)
            ]
        for h in handles:
            hvd.synchronize(h)

    return call


def _ddp_buckets(grads):
    """DDP's layout: buckets of about 25 MiB in backward (reverse) order, each copied into a
    flat buffer, reduced and copied back."""
    buckets, current, current_bytes = [], [], 0
    for g in reversed(grads):
        current.append(g)
        current_bytes += g.numel() * g.element_size()
        if current_bytes >= BUCKET_BYTES:
            buckets.append(current)
            current, current_bytes = [], 0
    if current:
        buckets.append(current)

    def call():
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            torch._foreach_copy_(
                bucket,
                [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in bucket]), bucket)],
            )

    return call


def _copies_seconds(grads, iters):
    """(f): pack_ every gradient into one buffer and unpack_ it back, with one thread (the
    engine's executor runs ATen alone), every rank at once."""
    buffer = torch.empty(sum(g.numel() for g in grads))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timed(lambda: (ops.pack_(grads, buffer), ops.unpack_(buffer, grads)), iters)
    finally:
        torch.set_num_threads(threads)


def _scaled(shape, scale):
    """ResNet-50's shape, or at scale < 1 a 1-D tensor of that share of its values (a quick
    run with the same 161 tensors in the same proportions)."""
    return shape if scale == 1 else (max(1, round(math.prod(shape) * scale)),)


def _stats_during(fn, iters):
    """(seconds, the engine's counters over the timed calls)."""
    before = hvd._C.engine_stats()
    seconds = timed(fn, iters)
    after = hvd._C.engine_stats()
    return seconds, {k: after[k] - before[k] for k in after}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--latency-iters", type=int, required=True)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    dist.init_process_group("gloo")  # the user's group; gradfuse.init() adopts it later
    size = dist.get_world_size()
    grads = [torch.randn(_scaled(s, args.scale)) for s in resnet50_shapes()]
    total = sum(g.numel() for g in grads)
    flat = torch.randn(total)
    # The same gradients as views of one flat buffer, back to back in submission order.
    views = [
        v.view(g.shape) for v, g in zip(torch.randn(total).split([g.numel() for g in grads]), grads)
    ]
    small = torch.randn(256)  # 1 KiB

    res = {
        "ranks": size,
        "tensors": len(grads),
        "values": total,
        "iters": args.iters,
        "scale": args.scale,
        "b": timed(lambda: [dist.all_reduce(g) for g in grads], args.iters),
        "c": timed(lambda: dist.all_reduce(flat), args.iters),
        "d": timed(_ddp_buckets(grads), args.iters),
        "f": _copies_seconds(grads, args.iters),
        "lat_direct": timed(lambda: dist.all_reduce(small), args.latency_iters, warmup=10),
    }
    hvd.init()
    res["a"], res["stats"] = _stats_during(_engine_allreduce(grads, "g"), args.iters)
    res["a_views"], res["stats_views"] = _stats_during(
        _engine_allreduce(views, "v", together=True), args.iters
    )
    res["lat_engine"] = timed(_engine_allreduce([small], "small"), args.latency_iters, warmup=10)
    hvd.shutdown()
    if size % 2 == 0:
        hvd.init(hierarchical_allreduce=True, test_local_size=2)
        res["e"] = timed(_engine_allreduce(grads, "g"), args.iters)
        res["lat_hier"] = timed(_engine_allreduce([small], "small"), args.latency_iters, warmup=10)
        hvd.shutdown()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
