"""``gradfuse-bench allreduce``: allreduce time and bandwidth across message sizes, gradfuse's
engine against torch.distributed on the same bytes, in one job (allreduce_worker.py).

Bandwidths as nccl-tests defines them: algorithm bandwidth = bytes / time, bus bandwidth =
algorithm bandwidth * 2 (n - 1) / n (what each rank's link carries in a ring allreduce)."""

from __future__ import annotations

from .jobs import run_worker

METHODS = [
    ("torch_flat", "torch flat"),
    ("torch_per_tensor", "torch per-tensor"),
    ("gradfuse", "gradfuse fused"),
    ("gradfuse_hierarchical", "gradfuse hier."),
    ("gradfuse_hybrid", "gradfuse hybrid"),
]


def default_sizes() -> list[int]:
    return [1024 * 4**i for i in range(10)]  # 1 KiB ... 256 MiB


def run(
    ranks: int, sizes: list[int], hybrid_bytes: int | None = None, idle_seconds: float = 10.0
) -> dict:
    """hybrid_bytes: also time the hybrid allreduce, hierarchical for fused messages up to it
    and flat above (with 4+ ranks, as two simulated nodes like the hierarchical row);
    idle_seconds: how long the idle CPU is measured, with and without the engine."""
    args = ["--sizes", ",".join(map(str, sizes)), "--idle-seconds", str(idle_seconds)]
    if hybrid_bytes is not None:
        args += ["--hybrid-threshold", str(hybrid_bytes)]
    result = run_worker(ranks, "gradfuse.bench.allreduce_worker", args)
    n = result["ranks"]
    for row in result["rows"]:
        for key, _ in METHODS:
            if key in row:
                algbw = row["bytes"] / row[key] / 1e9
                row[f"{key}_algbw"] = algbw
                row[f"{key}_busbw"] = algbw * 2 * (n - 1) / n
    return result


def _size(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def format_table(result: dict) -> str:
    methods = [(k, label) for k, label in METHODS if k in result["rows"][0]]
    head = f"{'size':>9} {'tensors':>7}" + "".join(f" | {label:>22}" for _, label in methods)
    sub = f"{'':>9} {'':>7}" + "".join(f" | {'ms':>9} {'busbw GB/s':>12}" for _ in methods)
    hybrid = result.get("hybrid_threshold")
    lines = [
        f"allreduce, {result['ranks']} CPU ranks over Gloo (busbw = algbw * 2(n-1)/n)"
        + (f"; hybrid: hierarchical up to {_size(hybrid)}, flat above" if hybrid else ""),
        head,
        sub,
    ]
    for row in result["rows"]:
        cells = "".join(f" | {row[k] * 1e3:9.3f} {row[f'{k}_busbw']:12.3f}" for k, _ in methods)
        lines.append(f"{_size(row['bytes']):>9} {row['tensors']:>7}{cells}")
    lat, idle = result["latency"], result["idle"]
    lines.append(
        f"1 KiB latency: engine {lat['engine_s'] * 1e6:.0f} us, direct Gloo "
        f"{lat['direct_s'] * 1e6:.0f} us ({lat['engine_s'] / lat['direct_s']:.2f}x; direct "
        f"before init {lat['direct_before_init_s'] * 1e6:.0f} us); "
        f"{lat['inline_reduced']} of {lat['engine_tensors']} reduced inline, "
        f"{lat['fast_cycles']} fast negotiation rounds"
    )
    lines.append(
        f"idle CPU over {idle['seconds']:g} s (busiest rank, % of one core): "
        f"{idle['with_engine_pct']:.2f} with the engine, {idle['without_engine_pct']:.2f} without"
    )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sizes = [row["bytes"] for row in result["rows"]]
    for key, label in METHODS:
        if key in result["rows"][0]:
            ax.plot(sizes, [row[f"{key}_busbw"] for row in result["rows"]], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"allreduce, {result['ranks']} CPU ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
