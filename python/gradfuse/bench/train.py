"""``gradfuse-bench train``: synthetic-data throughput in the manner of Horovod's synthetic
benchmark, gradfuse and torch DDP side by side, at several rank counts on this host.

Each rank count is one ``gradfuse.run`` job running both frameworks in the same processes
(train_worker.py). Reported: samples/s per rank and in total, and the scaling efficiency
``total(N) / (N * total(1))`` against the 1-rank run of the same framework."""

from __future__ import annotations

from .ddp_hooks import POWERSGD_RANK, TOPK_DENSITY
from .jobs import run_worker

# What each job measures: DistributedOptimizer as is, with gradient_as_bucket_view=True, and DDP.
FRAMEWORKS = ("gradfuse", "gradfuse_views", "ddp")


def run(
    ranks: list[int], model: str, batch_size: int, steps: int, rounds: int, ddp_hooks=()
) -> list[dict]:
    """``ddp_hooks``: names from ddp_hooks.HOOKS, each a DDP row with that comm hook ("none"
    is the plain DDP row every run has)."""
    hooks = [h for h in ddp_hooks if h != "none"]
    results = [
        run_worker(
            n,
            "gradfuse.bench.train_worker",
            [
                "--model",
                model,
                "--batch-size",
                str(batch_size),
                "--steps",
                str(steps),
                "--rounds",
                str(rounds),
                "--ddp-hooks",
                ",".join(hooks),
            ],
        )
        for n in ranks
    ]
    frameworks = FRAMEWORKS + tuple(f"ddp_{h}" for h in hooks)
    base = {
        fw: next((r[f"{fw}_per_rank"] for r in results if r["ranks"] == 1), None)
        for fw in frameworks
    }
    for r in results:
        r["ddp_hooks"] = hooks
        for fw in frameworks:
            r[f"{fw}_total"] = r[f"{fw}_per_rank"] * r["ranks"]
            r[f"{fw}_efficiency"] = (r[f"{fw}_per_rank"] / base[fw]) if base[fw] else None
    return results


def format_table(results: list[dict]) -> str:
    first = results[0]
    title = (
        f"synthetic training, model {first['model']} ({first['parameters'] / 1e6:.2f}M "
        f"parameters), batch {first['batch_per_rank']} per rank, CPU ranks over Gloo"
    )
    header = (
        f"{'ranks':>5} | {'gradfuse/rank':>13} {'total':>8} {'eff.':>6} | "
        f"{'DDP/rank':>9} {'total':>8} {'eff.':>6} | {'gradfuse/DDP':>12} | "
        f"{'views/rank':>10} {'views/DDP':>9}"
    )
    lines = [title, header]

    def eff(x):
        return f"{100 * x:5.0f}%" if x is not None else "     -"

    for r in results:
        lines.append(
            f"{r['ranks']:>5} | {r['gradfuse_per_rank']:>13.1f} {r['gradfuse_total']:>8.1f} "
            f"{eff(r['gradfuse_efficiency'])} | {r['ddp_per_rank']:>9.1f} {r['ddp_total']:>8.1f} "
            f"{eff(r['ddp_efficiency'])} | {r['gradfuse_total'] / r['ddp_total']:>11.2f}x | "
            f"{r['gradfuse_views_per_rank']:>10.1f} "
            f"{r['gradfuse_views_total'] / r['ddp_total']:>8.2f}x"
        )
    lines.append(
        "samples/s; efficiency = per-rank rate at N ranks / rate at 1 rank; views = "
        "DistributedOptimizer(gradient_as_bucket_view=True)"
    )
    return "\n".join(lines + _hook_table(results))


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
        for hook in r["ddp_hooks"]:
            per_rank, total = r[f"ddp_{hook}_per_rank"], r[f"ddp_{hook}_total"]
            lines.append(
                f"{r['ranks']:>5} | {hook:<13} | {per_rank:>14.1f} {total:>8.1f} | "
                f"{total / r['ddp_total']:>5.2f}x"
            )
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["ranks"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ranks, [r["gradfuse_total"] for r in results], "o-", label="gradfuse")
    ax.plot(
        ranks,
        [r["gradfuse_views_total"] for r in results],
        "^-",
        label="gradfuse, gradient_as_bucket_view",
    )
    ax.plot(ranks, [r["ddp_total"] for r in results], "s--", label="torch DDP")
    ax.set_xlabel("ranks")
    ax.set_ylabel("samples/s (total)")
    ax.set_xticks(ranks)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{results[0]['model']}: synthetic training throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
