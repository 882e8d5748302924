"""Timing helpers shared by the benchmarks: median wall time with device synchronization,
and the device's measured copy bandwidth (the ceiling every memory-bound op is judged by)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], device: torch.device, reps: int = 15, warmup: int = 3
) -> float:
    """Median of `reps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slowest_rank_median_seconds(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Multi-rank timing: each rank's median over `iters` barrier-aligned calls of fn(), then the
    maximum over ranks (a collective ends for the job when its slowest rank finishes)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / seconds
