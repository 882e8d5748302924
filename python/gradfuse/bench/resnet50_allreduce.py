"""``gradfuse-bench resnet50-allreduce``: allreduce of ResNet-50's gradients across CPU ranks
over Gloo, gradfuse's engine (separate tensors and views of one buffer) against torch's
per-tensor calls, DDP-style buckets and the one-flat-buffer floor, plus the 1 KiB latency
against a direct Gloo call; all in one job (resnet50_allreduce_worker.py)."""

from __future__ import annotations

from .jobs import run_worker

ROWS = [
    ("a", "(a) gradfuse fused allreduce"),
    ("a_views", "(a') (a) on views of one flat buffer"),
    ("b", "(b) per-tensor dist.all_reduce loop"),
    ("c", "(c) one flat dist.all_reduce (floor)"),
    ("d", "(d) DDP-style 25 MiB buckets"),
    ("e", "(e) (a), hierarchical, nodes of 2 ranks"),
    ("f", "(f) the fusion copies alone (pack + unpack)"),
    ("c_plus_f", "(c) + (f): the floor with the copies"),
]


def run(ranks: int, iters: int, latency_iters: int, scale: float = 1.0) -> dict:
    args = ["--iters", str(iters), "--latency-iters", str(latency_iters), "--scale", str(scale)]
    result = run_worker(ranks, "gradfuse.bench.resnet50_allreduce_worker", args)
    result["c_plus_f"] = result["c"] + result["f"]
    result["vs_floor"] = {key: result[key] / result["c"] for key, _ in ROWS if key in result}
    result["latency_vs_direct"] = result["lat_engine"] / result["lat_direct"]
    return result


def format_table(r: dict) -> str:
    nbytes = r["values"] * 4
    title = (
        f"ResNet-50 gradients: {r['tensors']} tensors, {r['values'] / 1e6:.1f}M fp32 "
        f"({nbytes / 2**20:.0f} MiB), {r['ranks']} CPU ranks, Gloo, median of {r['iters']}"
        + (f" (--scale {r['scale']:g}: 1-D, that share of each)" if r["scale"] != 1 else "")
    )
    lines = [
        title,
        f"{'method':<44}{'time ms':>10}{'vs (c)':>9}{'algbw GB/s':>12}",
    ]
    for key, label in ROWS:
        if key in r:
            t = r[key]
            lines.append(
                f"{label:<44}{t * 1e3:>10.1f}{r['vs_floor'][key]:>8.2f}x{nbytes / t / 1e9:>12.2f}"
            )
    st, sv = r["stats"], r["stats_views"]
    lines.append(
        f"engine during (a): {st['busy_cycles']} busy negotiation cycles, {st['collectives']} "
        f"collectives for {st['tensors']} tensors "
        f"({st['tensors'] / max(st['collectives'], 1):.1f} tensors per collective)"
    )
    lines.append(
        f"engine during (a'): {sv['in_place']} of {sv['collectives']} collectives in place"
    )
    hier = f", gradfuse hierarchical {r['lat_hier'] * 1e6:.0f} us" if "lat_hier" in r else ""
    lines.append(
        f"1 KiB allreduce latency: gradfuse {r['lat_engine'] * 1e6:.0f} us, direct "
        f"dist.all_reduce {r['lat_direct'] * 1e6:.0f} us ({r['latency_vs_direct']:.2f}x){hier}"
    )
    lines.append(
        f"separate tensors: (a) is {r['a'] / r['c_plus_f']:.2f}x the floor with the copies; "
        f"the copies alone are {r['f'] / r['c']:.2f}x of (c)"
    )
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, r[key] * 1e3) for key, label in ROWS if key in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([label for label, _ in rows][::-1], [ms for _, ms in rows][::-1])
    ax.set_xlabel("ms per allreduce of all gradients")
    ax.set_title(f"ResNet-50 gradients, {r['ranks']} CPU ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
