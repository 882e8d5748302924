"""``gradfuse-bench plan --validate``: the cost model against what can be checked.

1. Here: calibrate this machine (links at each rank count, pack, LARS, compute), measure the
   ``train`` benchmark's gradfuse step at each rank count, and predict the same steps from the
   calibrated profile with the settings train runs with (init()'s defaults: flat allreduce,
   64 MiB fusion, 1 ms cycle). All ranks are on this host, so they share its cores
   (plan_step.py says how the model treats that).
2. The seeds' published runs (shared/seeds/002): ResNet-50, batch 64K, 90 epochs on 1,024 and
   2,048 Tesla P40 in 8.7 and 6.6 minutes, predicted from the built-in p40-25gbe profile (its
   source lists what had to be assumed). No measurement."""

from __future__ import annotations

from . import calibrate, plan, plan_profiles, train
from .models import MODELS
from .plan_step import Choice, predict
from .plan_workload import from_module, resnet50

# init()'s defaults, which the train benchmark runs with.
ENGINE_DEFAULTS = Choice("flat", 64 << 20, 1.0)


def seeds_rows() -> list[dict]:
    """The seeds' two ResNet-50 runs against the model's best gradfuse algorithm."""
    profile = plan_profiles.load(plan_profiles.SEEDS["profile"])
    workload = resnet50()
    rows = []
    for gpus in sorted(plan_profiles.SEEDS["runs"]):
        batch = plan_profiles.SEEDS["batch"] // gpus
        run = plan.plan_one(
            workload, profile, gpus, profile.gpus_per_node, batch, plan_profiles.SEEDS["wire"]
        )
        best = run["algorithms"][run["best"]]
        published = plan_profiles.seeds_step_s(gpus)
        rows.append(
            {
                "gpus": gpus,
                "batch_per_gpu": batch,
                "published_step_s": published,
                "predicted_step_s": best["step_s"],
                "error": best["step_s"] / published - 1,
                "algorithm": run["best"],
                "breakdown": best,
                "flat_step_s": run["algorithms"]["flat"]["step_s"],
            }
        )
    return rows


def measured_rows(ranks: list[int], model: str, batch: int) -> tuple[list[dict], dict]:
    link_ranks = sorted({n for n in ranks if n >= 2}) or [2]
    spec = calibrate.run(link_ranks, "cpu", calibrate.default_sizes(), model, batch)
    profile = plan_profiles.Profile(spec, "calibrated here")
    workload = from_module(model, MODELS[model](), (3, 32, 32))
    rows = []
    for r in train.run(ranks, model, batch, steps=10, rounds=3, bucket_view="off"):
        p = r["ranks"]
        pred = predict(workload, profile, p, p, batch, 4, ENGINE_DEFAULTS)
        measured = batch / r["gradfuse_per_rank"]
        rows.append(
            {
                "ranks": p,
                "measured_step_s": measured,
                "predicted_step_s": pred.total_s,
                "error": pred.total_s / measured - 1,
                "compute_s": pred.compute_s,
                "comm_exposed_s": pred.comm_exposed_s,
                "pack_exposed_s": pred.pack_exposed_s,
                "optimizer_s": pred.optimizer_s,
                "core_sharing": pred.detail.get("core_sharing", 1.0),
            }
        )
    return rows, spec


def run(ranks: list[int], model: str, batch: int) -> dict:
    rows, profile = measured_rows(ranks, model, batch)
    return {
        "model": model,
        "batch_per_rank": batch,
        "here": rows,
        "profile": profile,
        "seeds": seeds_rows(),
    }


def format_table(result: dict) -> str:
    lines = [
        (
            f"validation here: train --model {result['model']}, batch {result['batch_per_rank']} "
            f"per rank, CPU ranks over Gloo on {result['profile']['cores_per_node']} cores"
        ),
        (
            f"{'ranks':>5} {'measured ms':>11} {'predicted ms':>12} {'error':>7} | "
            f"{'compute':>8} {'comm':>7} {'pack':>6} {'optim':>6} {'cores shared':>12}"
        ),
    ]
    for r in result["here"]:
        lines.append(
            f"{r['ranks']:>5} {r['measured_step_s'] * 1e3:>11.1f} "
            f"{r['predicted_step_s'] * 1e3:>12.1f} {100 * r['error']:>+6.0f}% | "
            f"{r['compute_s'] * 1e3:>8.1f} {r['comm_exposed_s'] * 1e3:>7.1f} "
            f"{r['pack_exposed_s'] * 1e3:>6.1f} {r['optimizer_s'] * 1e3:>6.1f} "
            f"{r['core_sharing']:>11.1f}x"
        )
    lines.append("")
    lines += format_seeds(result["seeds"])
    return "\n".join(lines)


def format_seeds(rows: list[dict]) -> list[str]:
    lines = [
        (
            "the seeds' ResNet-50 runs (batch 64K, 90 epochs, fp16 gradients) on the built-in "
            "p40-25gbe profile"
        ),
        (
            f"{'GPUs':>5} {'batch/GPU':>9} {'published ms':>12} {'predicted ms':>12} {'error':>7} "
            f"{'algorithm':>13} {'flat ring ms':>12}"
        ),
    ]
    for r in rows:
        lines.append(
            f"{r['gpus']:>5} {r['batch_per_gpu']:>9} {r['published_step_s'] * 1e3:>12.1f} "
            f"{r['predicted_step_s'] * 1e3:>12.1f} {100 * r['error']:>+6.0f}% "
            f"{r['algorithm']:>13} {r['flat_step_s'] * 1e3:>12.1f}"
        )
    lines.append(
        "published step = minutes x 60 / (1,281,167 x 90 / 65,536 steps); the profile's "
        "source says what was assumed"
    )
    return lines
