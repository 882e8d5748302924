"""pytest-benchmark suite of the allreduce comparison (gradfuse-bench allreduce), one job per
rank count: the benchmark times the whole job once, and the per-size times and bus bandwidths
of every method land in the saved results as ``extra_info``.

    python -m pytest bench/test_bench_allreduce.py --benchmark-json=allreduce.json
"""

from __future__ import annotations

import pytest
from gradfuse.bench import allreduce

SIZES = [1024 * 4**i for i in range(9)]  # 1 KiB ... 64 MiB (256 MiB: gradfuse-bench)


@pytest.mark.benchmark(group="allreduce sweep")
@pytest.mark.parametrize("ranks", [2, 4])
def test_allreduce_sweep(benchmark, ranks):
    result = benchmark.pedantic(allreduce.run, args=(ranks, SIZES), rounds=1, iterations=1)
    benchmark.extra_info["ranks"] = result["ranks"]
    benchmark.extra_info["rows"] = result["rows"]
    print("\n" + allreduce.format_table(result))
