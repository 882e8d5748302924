"""``gradfuse-bench train``: synthetic-data throughput in the manner of Horovod's synthetic
benchmark, gradfuse and torch DDP side by side, at several rank counts on this host.

Each rank count is one ``gradfuse.run`` job running every configuration in the same processes
(train_worker.py), alternating rounds. Reported per configuration: the median over rounds of
samples/s per rank, the scaling efficiency ``rate(N) / rate(1)`` against the 1-rank run of the
same configuration, and gradfuse/DDP: the median over rounds of the ratio of the two rates
measured back to back (> 1: gradfuse is faster)."""

from __future__ import annotations

import statistics
from pathlib import Path

from .ddp_hooks import POWERSGD_RANK, TOPK_DENSITY
from .jobs import run_worker
from .models import DEFAULT_BATCH
from .train_worker import BUCKET_VIEWS, config_name


def _timeline_path(timeline: str, ranks: int, several: bool) -> str:
    path = Path(timeline)
    return str(path.with_name(f"{path.stem}.np{ranks}{path.suffix}")) if several else timeline


def run(
    ranks: list[int],
    model: str,
    batch_size: int | None,
    steps: int,
    rounds: int,
    bucket_view: str = "both",
    timeline: str | None = None,
    ddp_hooks=(),
) -> list[dict]:
    """``ddp_hooks``: names from ddp_hooks.HOOKS, each a DDP row with that comm hook ("none"
    is the plain DDP row every run has)."""
    batch_size = batch_size or DEFAULT_BATCH[model]
    hooks = [h for h in ddp_hooks if h != "none"]
    results = []
    for n in ranks:
        args = ["--model", model, "--batch-size", str(batch_size), "--steps", str(steps)]
        args += ["--rounds", str(rounds), "--bucket-view", bucket_view]
        args += ["--ddp-hooks", ",".join(hooks)]
        path = timeline and _timeline_path(timeline, n, len(ranks) > 1)
        if path:
            args += ["--timeline", path]
        result = run_worker(n, "gradfuse.bench.train_worker", args)
        result["bucket_view"] = bucket_view
        result["ddp_hooks"] = hooks
        if path:
            from . import timeline_summary

            result["timeline"] = {"path": path, **timeline_summary.summarize_file(path)}
        results.append(result)
    _add_ratios_and_efficiency(results)
    return results


def _add_ratios_and_efficiency(results: list[dict]) -> None:
    names = list(results[0]["rounds"])
    base = {
        name: next((r[f"{name}_per_rank"] for r in results if r["ranks"] == 1), None)
        for name in names
    }
    for r in results:
        for name in names:
            r[f"{name}_total"] = r[f"{name}_per_rank"] * r["ranks"]
            r[f"{name}_efficiency"] = r[f"{name}_per_rank"] / base[name] if base[name] else None
        for view in BUCKET_VIEWS[r["bucket_view"]]:
            ours, ddp = config_name("gradfuse", view), config_name("ddp", view)
            r[f"{ours}_vs_ddp"] = statistics.median(
                a / b for a, b in zip(r["rounds"][ours], r["rounds"][ddp])
            )


def format_table(results: list[dict]) -> str:
    first = results[0]
    size = first["image_size"]
    rounds = len(next(iter(first["rounds"].values())))
    title = (
        f"synthetic training, model {first['model']} ({first['parameters'] / 1e6:.2f}M "
        f"parameters), batch {first['batch_per_rank']} x 3x{size}x{size} per rank, CPU ranks "
        f"over Gloo, medians of {rounds} alternating rounds"
    )
    header = (
        f"{'ranks':>5} | {'bucket view':>11} | {'gradfuse/rank':>13} {'eff.':>6} | "
        f"{'DDP/rank':>9} {'eff.':>6} | {'gradfuse/DDP':>12}"
    )
    lines = [title, header]

    def eff(x):
        return f"{100 * x:5.0f}%" if x is not None else "     -"

    for r in results:
        for view in BUCKET_VIEWS[r["bucket_view"]]:
            ours, ddp = config_name("gradfuse", view), config_name("ddp", view)
            lines.append(
                f"{r['ranks']:>5} | {'on' if view else 'off':>11} | "
                f"{r[f'{ours}_per_rank']:>13.1f} {eff(r[f'{ours}_efficiency'])} | "
                f"{r[f'{ddp}_per_rank']:>9.1f} {eff(r[f'{ddp}_efficiency'])} | "
                f"{r[f'{ours}_vs_ddp']:>11.2f}x"
            )
    lines.append(
        "samples/s per rank; eff. = rate at N ranks / rate at 1 rank; gradfuse/DDP = median over "
        "rounds of the two rates measured back to back; bucket view = gradient_as_bucket_view "
        "(DistributedOptimizer's and DDP's)"
    )
    lines += _hook_table(results)
    for r in results:
        if "timeline" in r:
            from . import timeline_summary

            lines.append(f"{r['ranks']} ranks: " + timeline_summary.format_summary(r["timeline"]))
    return "\n".join(lines)


def _hook_table(results: list[dict]) -> list[str]:
    """DDP with each comm hook beside plain DDP, per rank count."""
    if not results[0]["ddp_hooks"]:
        return []
    lines = [
        "",
        (
            f"torch DDP with comm hooks (gradfuse.ddp's, and DDP's own torch-fp16 and powersgd; "
            f"topk at density {TOPK_DENSITY}, powersgd at rank {POWERSGD_RANK})"
        ),
        f"{'ranks':>5} | {'hook':<13} | {'samples/s/rank':>14} {'total':>8} | {'vs DDP':>6}",
    ]
    for r in results:
        ddp = config_name("ddp", False) if "ddp_total" in r else config_name("ddp", True)
        for hook in r["ddp_hooks"]:
            per_rank, total = r[f"ddp_{hook}_per_rank"], r[f"ddp_{hook}_total"]
            lines.append(
                f"{r['ranks']:>5} | {hook:<13} | {per_rank:>14.1f} {total:>8.1f} | "
                f"{total / r[f'{ddp}_total']:>5.2f}x"
            )
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["ranks"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"gradfuse": "o-", "gradfuse_views": "^-", "ddp": "s--", "ddp_views": "v--"}
    for name in results[0]["rounds"]:
        label = name.replace("_views", ", gradient_as_bucket_view").replace("ddp", "torch DDP")
        ax.plot(ranks, [r[f"{name}_total"] for r in results], styles.get(name, "x:"), label=label)
    ax.set_xlabel("ranks")
    ax.set_ylabel("samples/s (total)")
    ax.set_xticks(ranks)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{results[0]['model']}: synthetic training throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
