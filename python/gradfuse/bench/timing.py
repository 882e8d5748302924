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


def paired_median_seconds(
    fns: list[Callable[[], object]], device: torch.device, reps: int = 15, warmup: int = 3
) -> tuple[list[float], float]:
    """Times `fns` alternately, one call of each per round, so that load on a shared machine
    hits them alike. Returns each one's median seconds and the median over rounds of
    time(fns[1]) / time(fns[0]) (the ratio of a pair measured back to back)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync(device)
            t.append(time.perf_counter() - start)
    ratio = statistics.median(b / a for a, b in zip(times[0], times[1]))
    return [statistics.median(t) for t in times], ratio


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
