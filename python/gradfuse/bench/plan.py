"""``gradfuse-bench plan``: predicted step time of data-parallel training at each GPU count,
split into compute, exposed communication, pack and optimizer, for each allreduce algorithm,
with the best fusion threshold and cycle time for each, the best choice overall and the
settings (init(plan=...) or environment variables) that make the engine run it.

The algebra is plan_model.py, the step simulation plan_step.py, the machines
plan_profiles.py, the models plan_workload.py."""

from __future__ import annotations

import json

from . import plan_model, plan_profiles, plan_workload
from .plan_step import Choice, StepPrediction, predict

THRESHOLDS_MB = (1, 2, 4, 8, 16, 32, 64, 128)
CYCLES_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
WIRE_BYTES = {"fp32": 4, "fp16": 2}
# What gradfuse runs itself; "tree" is NCCL's (NCCL_ALGO=Tree), reported for comparison.
ENGINE_ALGORITHMS = ("flat", "hierarchical", "hybrid")


def load_workload(model: str, batch_per_gpu: int) -> plan_workload.Workload:
    if model == "resnet50":
        return plan_workload.resnet50()
    return plan_workload.from_json(model, batch_per_gpu)


def best_choice(workload, profile, p, k, batch, wire_bytes, algorithm, hybrid_bytes=None):
    """The fusion threshold and cycle time that minimise the step for one algorithm."""
    best: StepPrediction | None = None
    for mb in THRESHOLDS_MB:
        for cycle in CYCLES_MS:
            choice = Choice(algorithm, mb << 20, cycle, hybrid_bytes)
            pred = predict(workload, profile, p, k, batch, wire_bytes, choice)
            if best is None or pred.total_s < best.total_s - 1e-12:
                best = pred
    return best


def plan_one(workload, profile, p: int, k: int, batch: int, wire: str) -> dict:
    wire_bytes = WIRE_BYTES[wire]
    k = min(k, p)
    nodes = p // k
    single = predict(workload, profile, 1, 1, batch, wire_bytes, Choice("flat", 64 << 20, 1.0))
    algorithms = {"flat": best_choice(workload, profile, p, k, batch, wire_bytes, "flat")}
    crossover = None
    if nodes > 1:
        intra, inter = profile.links(p, k)
        for algorithm in ("hierarchical", "tree"):
            algorithms[algorithm] = best_choice(
                workload, profile, p, k, batch, wire_bytes, algorithm
            )
        crossover = plan_model.crossover_bytes(p, k, intra, inter)
        if crossover is not None:
            hybrid = best_choice(workload, profile, p, k, batch, wire_bytes, "hybrid", crossover)
            # Only worth a row when some fused message exceeds the crossover.
            if hybrid.total_s < algorithms["hierarchical"].total_s * (1 - 1e-9):
                algorithms["hybrid"] = hybrid
    runnable = {a: pred for a, pred in algorithms.items() if a in ENGINE_ALGORITHMS}
    best = min(runnable, key=lambda a: runnable[a].total_s)
    return {
        "gpus": p,
        "nodes": nodes,
        "crossover_bytes": crossover,
        "single_gpu_step_s": single.total_s,
        "algorithms": {a: _prediction_json(pred, single) for a, pred in algorithms.items()},
        "best": best,
        "settings": settings(algorithms[best]),
        "env": env(algorithms[best]),
    }


def settings(pred: StepPrediction) -> dict:
    """What init(plan=...) takes from the plan (gradfuse.config.PLAN_SETTINGS)."""
    c = pred.choice
    hierarchical = c.algorithm in ("hierarchical", "hybrid")
    return {
        "fusion_threshold_bytes": c.fusion_threshold_bytes,
        "cycle_time_ms": c.cycle_time_ms,
        "hierarchical_allreduce": hierarchical,
        "hierarchical_threshold_bytes": (
            c.hybrid_threshold_bytes if c.algorithm == "hybrid" else -1
        ),
    }


def env(pred: StepPrediction) -> dict:
    s = settings(pred)
    out = {
        "GRADFUSE_FUSION_THRESHOLD": str(s["fusion_threshold_bytes"]),
        "GRADFUSE_CYCLE_TIME": f"{s['cycle_time_ms']:g}",
        "GRADFUSE_HIERARCHICAL_ALLREDUCE": "1" if s["hierarchical_allreduce"] else "0",
    }
    if s["hierarchical_threshold_bytes"] >= 0:
        out["GRADFUSE_HIERARCHICAL_THRESHOLD"] = str(s["hierarchical_threshold_bytes"])
    return out


def _prediction_json(pred: StepPrediction, single: StepPrediction) -> dict:
    return {
        "step_s": pred.total_s,
        "compute_s": pred.compute_s,
        "comm_exposed_s": pred.comm_exposed_s,
        "pack_exposed_s": pred.pack_exposed_s,
        "optimizer_s": pred.optimizer_s,
        "comm_total_s": pred.comm_total_s,
        "messages": pred.messages,
        "efficiency": single.total_s / pred.total_s,
        "fusion_threshold_bytes": pred.choice.fusion_threshold_bytes,
        "cycle_time_ms": pred.choice.cycle_time_ms,
        **pred.detail,
    }


def run(
    model: str, gpus: list[int], gpus_per_node: int | None, profile: str, batch: int, wire: str
) -> dict:
    prof = plan_profiles.load(profile)
    workload = load_workload(model, batch)
    k = gpus_per_node or prof.gpus_per_node
    return {
        "model": workload.name,
        "parameters": workload.parameters,
        "profile": prof.where,
        "profile_name": prof.name,
        "gpus_per_node": k,
        "batch_per_gpu": batch,
        "wire": wire,
        "runs": [plan_one(workload, prof, p, k, batch, wire) for p in gpus],
    }


def _mb(nbytes) -> str:
    return f"{nbytes / (1 << 20):.4g}"


def format_table(result: dict) -> str:
    lines = [
        (
            f"plan: {result['model']} ({result['parameters'] / 1e6:.1f}M parameters, "
            f"{result['wire']} gradients on the wire, batch {result['batch_per_gpu']} per GPU)"
        ),
        (
            f"  on {result['profile']}: {result['profile_name']}, {result['gpus_per_node']} "
            "GPUs per node"
        ),
        (
            f"{'GPUs':>5} {'nodes':>5}  {'algorithm':<13}{'step ms':>9} = {'compute':>8} + "
            f"{'comm':>7} + {'pack':>6} + {'optim':>6} {'eff.':>6} {'msgs':>5} "
            f"{'fusion MB':>9} {'cycle ms':>8}"
        ),
    ]
    for run in result["runs"]:
        for name, a in run["algorithms"].items():
            mark = "*" if name == run["best"] else " "
            label = name if name in ENGINE_ALGORITHMS else f"{name} (NCCL)"
            lines.append(
                f"{run['gpus']:>5} {run['nodes']:>5} {mark}{label:<13}"
                f"{a['step_s'] * 1e3:>8.1f} = {a['compute_s'] * 1e3:>8.1f} + "
                f"{a['comm_exposed_s'] * 1e3:>7.1f} + {a['pack_exposed_s'] * 1e3:>6.1f} + "
                f"{a['optimizer_s'] * 1e3:>6.1f} {100 * a['efficiency']:>5.1f}% "
                f"{a['messages']:>5} {_mb(a['fusion_threshold_bytes']):>9} "
                f"{a['cycle_time_ms']:>8g}"
            )
    lines.append(
        "* best that gradfuse runs; comm and pack: the part not hidden behind backward; eff. = "
        "1-GPU step / N-GPU step (same batch per GPU); hybrid: hierarchical for fused "
        "messages up to the crossover, flat above"
    )
    for run in result["runs"]:
        cross = run["crossover_bytes"]
        where = f", crossover {_mb(cross)} MiB" if cross is not None else ""
        env_line = " ".join(f"{k}={v}" for k, v in run["env"].items())
        lines.append(f"{run['gpus']:>5} GPUs: {run['best']}{where}: {env_line}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    gpus = [r["gpus"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({a for r in runs for a in r["algorithms"]}, key=_order)
    for name in names:
        xs = [r["gpus"] for r in runs if name in r["algorithms"]]
        ys = [100 * r["algorithms"][name]["efficiency"] for r in runs if name in r["algorithms"]]
        left.plot(xs, ys, "o-" if name in ENGINE_ALGORITHMS else "x--", label=name)
    left.set_xscale("log", base=2)
    left.set_xticks(gpus, [str(g) for g in gpus])
    left.set_xlabel("GPUs")
    left.set_ylabel("scaling efficiency (%)")
    left.set_ylim(0, 105)
    left.legend()
    left.set_title(f"{result['model']} on {result['profile']}")
    parts = ("compute_s", "comm_exposed_s", "pack_exposed_s", "optimizer_s")
    bottom = [0.0] * len(runs)
    for part in parts:
        values = [1e3 * r["algorithms"][r["best"]][part] for r in runs]
        right.bar([str(g) for g in gpus], values, bottom=bottom, label=part[:-2])
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xlabel("GPUs (best algorithm)")
    right.set_ylabel("predicted step (ms)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _order(name: str) -> int:
    return ("flat", "hierarchical", "hybrid", "tree").index(name)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
