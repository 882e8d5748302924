"""``gradfuse-bench calibrate``: measures this machine for ``gradfuse-bench plan`` and writes a
profile (plan_profiles.py describes the fields).

- Links: allreduce and allgather times across message sizes on the engine's transport (Gloo
  for CPU, NCCL for CUDA; calibrate_worker.py; on this host, or across hosts by running the
  worker under the cluster's launcher, e.g. ``torchrun --nnodes 2 --nproc-per-node 8 -m
  gradfuse.bench.calibrate_worker --sizes 4096,...,4194304 --device cuda --out pts.json``,
  then ``gradfuse-bench calibrate --points pts.json``), fitted to time = a + b * bytes by least
  relative error. A ring allreduce on m ranks is 2(m - 1) steps moving 2(m - 1)/m of the
  bytes, so alpha = a / (2(m - 1)) and beta = b * m / (2(m - 1)). Inside a node, "intra"; across
  hosts (a job spanning several), "inter", with beta per node (its k rings share the NICs).
- Pack and unpack (fusion buffer copies) and the fused LARS update, timed in this process.
- Compute: the ``train`` benchmark's model, forward + backward, as effective FLOP/s (3 x the
  forward FLOPs per step). On CPU both with one thread (what each rank of a multi-rank job
  gets: gradfuse.run sets OMP_NUM_THREADS=1) and with all of them (a lone rank); and at each
  measured rank count, with every rank computing at once (``compute_by_ranks``): ranks that
  share a host's cores and memory bandwidth compute slower than one alone, by an amount no
  core count predicts (2 one-thread ranks on this 2-core VM: 10-20% each)."""

from __future__ import annotations

import datetime
import math
import os
import socket

import torch

from .jobs import run_worker
from .timing import median_seconds


def default_sizes(max_bytes: int = 4 << 20) -> list[int]:
    return [s for s in (4096 * 4**i for i in range(8)) if s <= max_bytes]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of t = a + b * n minimising the sum of squared relative errors, both >= 0."""
    if len(points) < 2:
        raise ValueError(f"a line needs at least two sizes, got {len(points)}")
    w = [1.0 / t**2 for _, t in points]
    sw = sum(w)
    sn = sum(wi * n for wi, (n, _) in zip(w, points))
    st = sum(wi * t for wi, (_, t) in zip(w, points))
    snn = sum(wi * n * n for wi, (n, _) in zip(w, points))
    snt = sum(wi * n * t for wi, (n, t) in zip(w, points))
    det = sw * snn - sn * sn
    b = (sw * snt - sn * st) / det
    a = (st - b * sn) / sw
    if b < 0:  # no visible bandwidth cost: all latency
        a, b = st / sw, 0.0
    if a < 0:  # no visible latency: the line through the origin
        a, b = 0.0, snt / snn
    return a, b


def ring_link(rows: list[dict], members: int, per_node_rings: int = 1) -> dict:
    """alpha and beta of a ring of `members` ranks from its allreduce points; with
    per_node_rings rings sharing each node's NICs, beta per node."""
    a, b = fit_line([(r["bytes"], r["allreduce_s"]) for r in rows])
    steps = 2 * (members - 1)
    ag_a, ag_b = fit_line([(r["bytes"], r["allgather_s"]) for r in rows])
    return {
        "alpha_s": a / steps,
        "beta_s_per_byte": b * members / steps / per_node_rings,
        "allgather_alpha_s": ag_a / (members - 1),
        "allgather_beta_s_per_byte": ag_b * members / (members - 1) / per_node_rings,
        "fit_error": _fit_error(rows, a, b),
    }


def _fit_error(rows, a, b) -> float:
    """Largest relative error of the allreduce line over the measured sizes."""
    return max(abs(a + b * r["bytes"] - r["allreduce_s"]) / r["allreduce_s"] for r in rows)


def measure_links(
    ranks: list[int], device: str, sizes: list[int], model: str | None = None, batch: int = 32
) -> dict:
    """{np: {level: link}} for each rank count (one gradfuse.run job each, on this host); with
    `model`, each also holds "compute_step_s", that model's step with every rank computing."""
    args = ["--sizes", ",".join(map(str, sizes)), "--device", device]
    if model:
        args += ["--model", model, "--batch-size", str(batch)]
    return {n: links_of(run_worker(n, "gradfuse.bench.calibrate_worker", args)) for n in ranks}


def links_of(result: dict) -> dict:
    """The fitted links of one calibrate_worker job's points (its --out JSON)."""
    k = result["ranks_per_node"]
    levels = {}
    for level, data in result["levels"].items():
        rings = k if level == "inter" else 1
        levels[level] = ring_link(data["rows"], data["ranks"], rings)
        levels[level]["points"] = data["rows"]
    return {
        "levels": levels,
        "ranks_per_node": k,
        "nodes": result["nodes"],
        "compute_step_s": result.get("compute_step_s"),
        "compute_model": result.get("compute_model"),
    }


def _lars_and_pack(device: torch.device, numel: int) -> tuple[float, float]:
    """(LARS parameters/s, pack bytes/s): ResNet-50-like tensors of `numel` values in all."""
    from .. import ops
    from .shapes import resnet50_shapes

    shapes, total = [], 0
    for s in resnet50_shapes():
        if total >= numel:
            break
        shapes.append(s)
        total += math.prod(s)
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    bufs = [torch.zeros(s, device=device) for s in shapes]
    lars = median_seconds(
        lambda: ops.lars_update_(params, grads, bufs, lr=0.1, weight_decay=1e-4), device, reps=5
    )
    flat = torch.empty(total, device=device)
    pack = median_seconds(lambda: ops.pack_(grads, flat), device, reps=5)
    unpack = median_seconds(lambda: ops.unpack_(flat, grads), device, reps=5)
    return total / lars, 4 * total / ((pack + unpack) / 2)


def model_step(model: str, batch: int, device: torch.device):
    """One forward + backward of the train benchmark's model on a synthetic batch."""
    from .models import MODELS

    net = MODELS[model]().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()

    return step


def step_flops(model: str, batch: int) -> float:
    """Effective FLOPs of one forward + backward: 3 x the forward's."""
    from .models import MODELS
    from .plan_workload import from_module

    return 3 * from_module(model, MODELS[model](), (3, 32, 32)).forward_flops_per_sample * batch


def _step_seconds(device: torch.device, model: str, batch: int) -> float:
    """Median seconds of one forward + backward of the train benchmark's model."""
    return median_seconds(model_step(model, batch, device), device, reps=5, warmup=2)


def run(
    ranks: list[int], device: str, sizes: list[int], model: str, batch: int, points=None
) -> dict:
    """The profile; `points`: calibrate_worker results (e.g. from a multi-host torchrun job)
    to fit instead of measuring links on this host."""
    if points:
        links = {p["ranks"]: links_of(p) for p in points}
        ranks = sorted(links)
    else:
        links = measure_links(ranks, device, sizes, model, batch)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    flops = step_flops(model, batch)  # of one forward + backward, whoever times it
    threads = torch.get_num_threads()
    try:
        if device == "cpu":
            # One thread: what each rank of a multi-rank job has, and what the engine's
            # executor copies with (engine/engine_thread.h).
            torch.set_num_threads(1)
        lars_rate, pack_rate = _lars_and_pack(dev, 4 << 20)
        compute = flops / _step_seconds(dev, model, batch)
    finally:
        torch.set_num_threads(threads)
    # A lone rank gets every core; on a loaded machine torch's threads can lose to one thread,
    # and a lone rank could fall back to one, so the faster counts.
    alone = compute
    if device == "cpu":
        alone = max(compute, flops / _step_seconds(dev, model, batch))
    first = links[min(ranks)]
    transport = "NCCL" if device == "cuda" else "Gloo"
    profile = {
        "name": f"calibrated on {socket.gethostname()}: {device}, {transport}",
        "source": f"gradfuse-bench calibrate, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "gpus_per_node": max(v["ranks_per_node"] for v in links.values()),
        "intra": _plain(first["levels"]["intra"]),
        "compute_flops_per_s": compute,
        "compute_flops_per_s_alone": alone,
        "compute_model": f"{model}, batch {batch}",
        "compute_by_ranks": {
            str(n): flops / v["compute_step_s"]
            for n, v in links.items()
            if v.get("compute_step_s") and v.get("compute_model") == [model, batch]
        },
        "pack_bytes_per_s": pack_rate,
        "optimizer_params_per_s": lars_rate,
        "by_ranks": {
            str(n): {lvl: _plain(link) for lvl, link in v["levels"].items()}
            for n, v in links.items()
        },
        "measured": {str(n): v for n, v in links.items()},
    }
    if "inter" in first["levels"]:
        profile["inter"] = _plain(first["levels"]["inter"])
    if device == "cpu":
        profile["cores_per_node"] = os.cpu_count()
    return profile


def _plain(link: dict) -> dict:
    return {"alpha_s": link["alpha_s"], "beta_s_per_byte": link["beta_s_per_byte"]}


def format_table(profile: dict) -> str:
    lines = [
        profile["name"],
        (
            f"{'ranks':>5} {'level':<6} {'alpha us':>9} {'GB/s':>8} {'fit err':>8} | "
            f"{'allgather alpha us':>18} {'GB/s':>8}"
        ),
    ]
    for n, v in profile["measured"].items():
        for level, link in v["levels"].items():
            bw = 1 / link["beta_s_per_byte"] / 1e9 if link["beta_s_per_byte"] else math.inf
            ag_beta = link["allgather_beta_s_per_byte"]
            ag_bw = 1 / ag_beta / 1e9 if ag_beta else math.inf
            lines.append(
                f"{n:>5} {level:<6} {link['alpha_s'] * 1e6:>9.1f} {bw:>8.2f} "
                f"{100 * link['fit_error']:>7.0f}% | {link['allgather_alpha_s'] * 1e6:>18.1f} "
                f"{ag_bw:>8.2f}"
            )
    lines.append(
        f"compute {profile['compute_flops_per_s'] / 1e9:.1f} GFLOP/s per rank "
        f"({profile['compute_model']}; alone: {profile['compute_flops_per_s_alone'] / 1e9:.1f}), "
        f"pack {profile['pack_bytes_per_s'] / 1e9:.2f} GB/s, "
        f"LARS {profile['optimizer_params_per_s'] / 1e6:.0f} M params/s"
    )
    for n, rate in profile.get("compute_by_ranks", {}).items():
        lines.append(f"compute with {n} ranks at once: {rate / 1e9:.1f} GFLOP/s per rank")
    lines.append("GB/s = 1 / beta: per rank inside a node, per node across nodes")
    return "\n".join(lines)
