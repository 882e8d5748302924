"""Allreduce of ResNet-50's gradients (161 tensors, 25.6M fp32 values) across CPU ranks over
Gloo: (a) gradfuse's fused engine, (a') the same on gradients that are views of one flat buffer
(reduced in place, no fusion copies), (b) one torch.distributed.all_reduce per tensor, (c) one
all_reduce of a flat buffer of the same size (the floor), (d) DDP-style 25 MiB buckets; plus the
latency of one 1 KiB allreduce through the engine vs a direct all_reduce. Row (e) is (a) with
hierarchical allreduce, the ranks acting as nodes of 2 (GRADFUSE_TEST_LOCAL_SIZE's override): on
one host there are no slow links to save, so it only shows the hierarchy's overhead (three
collectives instead of one, unpipelined).

    PYTHONPATH=python python bench/bench_allreduce.py [--ranks 4] [--iters 10]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, size, port, iters, result_queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size)
    )
    torch.set_num_threads(1)  # 4 ranks share 2 cores
    import gradfuse as hvd
    from gradfuse.bench.shapes import resnet50_shapes
    from gradfuse.bench.timing import slowest_rank_median_seconds as timed

    grads = [torch.randn(s) for s in resnet50_shapes()]
    total = sum(g.numel() for g in grads)
    flat = torch.randn(total)

    def engine():
        handles = [hvd.allreduce_async_(g, name=f"g{i}", op=hvd.Sum) for i, g in enumerate(grads)]
        for h in handles:
            hvd.synchronize(h)

    # The same gradients laid out as views of one flat buffer, back to back in submission
    # order (DistributedOptimizer's gradient_as_bucket_view layout): reduced in place, no
    # fusion copies.
    flat_grads = torch.randn(total)
    views = [
        v.view(g.shape) for v, g in zip(torch.split(flat_grads, [g.numel() for g in grads]), grads)
    ]

    def engine_views():
        with hvd.submitted_together():
            handles = [
                hvd.allreduce_async_(v, name=f"v{i}", op=hvd.Sum) for i, v in enumerate(views)
            ]
        for h in handles:
            hvd.synchronize(h)

    def per_tensor():
        for g in grads:
            dist.all_reduce(g)

    def one_flat():
        dist.all_reduce(flat)

    bucket_bytes = 25 << 20
    buckets, cur, cur_bytes = [], [], 0
    for g in reversed(grads):  # DDP buckets in reverse order (backward order)
        cur.append(g)
        cur_bytes += g.numel() * 4
        if cur_bytes >= bucket_bytes:
            buckets.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        buckets.append(cur)

    def ddp_buckets():
        for bucket in buckets:
            buf = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(buf)
            offset = 0
            for g in bucket:
                g.copy_(buf[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    small = torch.randn(256)  # 1 KiB

    def engine_small():
        hvd.allreduce_(small, name="small", op=hvd.Sum)

    def direct_small():
        dist.all_reduce(small)

    # Baselines first, while the engine is not running: its background threads negotiate every
    # cycle time and would take CPU from the baselines on a small machine.
    dist.init_process_group("gloo", rank=rank, world_size=size)
    res = {
        "tensors": len(grads),
        "values": total,
        "b": timed(per_tensor, iters),
        "c": timed(one_flat, iters),
        "d": timed(ddp_buckets, iters),
        "lat_direct": timed(direct_small, 200, warmup=10),
    }
    hvd.init()
    before = hvd._C.engine_stats()
    res["a"] = timed(engine, iters)
    after = hvd._C.engine_stats()
    res["stats"] = {k: after[k] - before[k] for k in after}
    before = hvd._C.engine_stats()
    res["a_views"] = timed(engine_views, iters)
    after = hvd._C.engine_stats()
    res["stats_views"] = {k: after[k] - before[k] for k in after}
    res["lat_engine"] = timed(engine_small, 200, warmup=10)
    hvd.shutdown()
    if size % 2 == 0:
        hvd.init(hierarchical_allreduce=True, test_local_size=2)
        res["e"] = timed(engine, iters)
        res["lat_hier"] = timed(engine_small, 200, warmup=10)
        hvd.shutdown()
    if rank == 0:
        result_queue.put(res)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
    from gradfuse.launch import free_port

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(worker, args=(args.ranks, free_port(), args.iters, q), nprocs=args.ranks)
    r = q.get()
    nbytes = r["values"] * 4
    print(
        f"ResNet-50 gradients: {r['tensors']} tensors, {r['values'] / 1e6:.1f}M fp32 "
        f"({nbytes / 2**20:.0f} MiB), {args.ranks} CPU ranks, Gloo, median of {args.iters}"
    )
    print(f"{'method':<44}{'time ms':>10}{'vs (c)':>9}{'algbw GB/s':>12}")
    rows = [
        ("(a) gradfuse fused allreduce", r["a"]),
        ("(a') (a) on views of one flat buffer", r["a_views"]),
        ("(b) per-tensor dist.all_reduce loop", r["b"]),
        ("(c) one flat dist.all_reduce (floor)", r["c"]),
        ("(d) DDP-style 25 MiB buckets", r["d"]),
    ]
    if "e" in r:
        rows.append(("(e) (a), hierarchical, nodes of 2 ranks", r["e"]))
    for label, t in rows:
        print(f"{label:<44}{t * 1e3:>10.1f}{t / r['c']:>8.2f}x{nbytes / t / 1e9:>12.2f}")
    st = r["stats"]
    print(
        f"engine during (a): {st['busy_cycles']} busy negotiation cycles, {st['collectives']} "
        f"collectives for {st['tensors']} tensors ({st['tensors'] / st['collectives']:.1f} "
        f"tensors per collective)"
    )
    sv = r["stats_views"]
    print(f"engine during (a'): {sv['in_place']} of {sv['collectives']} collectives in place")
    print(
        f"1 KiB allreduce latency: gradfuse {r['lat_engine'] * 1e6:.0f} us, direct "
        f"dist.all_reduce {r['lat_direct'] * 1e6:.0f} us"
        + (f", gradfuse hierarchical {r['lat_hier'] * 1e6:.0f} us" if "lat_hier" in r else "")
    )


if __name__ == "__main__":
    main()
