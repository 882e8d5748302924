"""The fused-op benchmark: each gradfuse op against the torch code doing the same work, in the
same run, on ResNet-50's 161 gradient tensors (25.6M values).

Columns: median time, speed-up over the torch reference (reference time / gradfuse time),
achieved bandwidth (the bytes the op must move, over its time) and that as a share of the
device's measured copy bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .. import ops
from .shapes import resnet50_shapes
from .timing import copy_bandwidth, median_seconds


@dataclass
class Row:
    op: str
    impl: str
    ms: float
    speedup: float | None  # reference time / this time (None for the reference itself)
    gbps: float | None
    share_of_copy: float | None


def _python_lars(params, grads, bufs, lr, momentum, wd, trust_coef, eps):
    """A per-parameter LARS with torch ops, as a user would write it."""
    for p, g, v in zip(params, grads, bufs):
        w_norm, g_norm = p.norm(), g.norm()
        trust = torch.where(
            (w_norm > 0) & (g_norm > 0), trust_coef * w_norm / (g_norm + wd * w_norm + eps), 1.0
        )
        d = g.add(p, alpha=wd)
        v.mul_(momentum).add_(d * trust)
        p.sub_(v, alpha=lr)


def run(device: str = "cpu", density: float = 0.001, reps: int = 11) -> tuple[list[Row], float]:
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = resnet50_shapes()
    numel = sum(math.prod(s) for s in shapes)
    copy_bw = copy_bandwidth(dev)
    rows: list[Row] = []

    def add(op, impl, seconds, reference_s, nbytes):
        gbps = nbytes / seconds / 1e9 if nbytes else None
        rows.append(
            Row(
                op,
                impl,
                seconds * 1e3,
                None if reference_s is None else reference_s / seconds,
                gbps,
                None if gbps is None else gbps * 1e9 / copy_bw,
            )
        )

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=dev) * scale

    # ---- LARS: 20 bytes per parameter (read w, g, v; write w, v) ---------------------------
    params = [randn(*s) for s in shapes]
    grads = [randn(*s, scale=1e-3) for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    hyper = {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-5,
        "trust_coefficient": 0.001,
        "eps": 1e-8,
    }
    use_lars = [len(s) > 1 for s in shapes]
    t_python = median_seconds(
        lambda: _python_lars(params, grads, bufs, 0.1, 0.9, 5e-5, 1e-3, 1e-8), dev, reps
    )
    sgd = torch.optim.SGD(
        [torch.nn.Parameter(p) for p in params], lr=0.1, momentum=0.9, foreach=True
    )
    for p, g in zip(sgd.param_groups[0]["params"], grads):
        p.grad = g
    t_sgd = median_seconds(sgd.step, dev, reps)
    t_lars = median_seconds(
        lambda: ops.lars_update_(
            params, grads, bufs, **hyper, use_lars=use_lars, use_weight_decay=use_lars
        ),
        dev,
        reps,
    )
    lars_bytes = 20 * numel
    add("lars step", "python per-param LARS", t_python, None, lars_bytes)
    add("lars step", "torch SGD momentum foreach", t_sgd, None, lars_bytes)
    add("lars step", "gradfuse lars_update_", t_lars, t_python, lars_bytes)
    rows[-1].op = f"lars step (vs SGD foreach: {t_sgd / t_lars:.2f}x)"
    del params, bufs, sgd

    # ---- pack fp32 -> fp16: 6 bytes per element ---------------------------------------------
    flat = torch.empty(numel, dtype=torch.float16, device=dev)
    t_cat = median_seconds(lambda: torch.cat([g.flatten() for g in grads]).half(), dev, reps)
    t_pack = median_seconds(lambda: ops.pack_(grads, flat), dev, reps)
    restored = [torch.empty_like(g) for g in grads]
    t_split = median_seconds(
        lambda: [
            r.copy_(c.view_as(r)) for r, c in zip(restored, flat.split([g.numel() for g in grads]))
        ],
        dev,
        reps,
    )
    t_unpack = median_seconds(lambda: ops.unpack_(flat, restored), dev, reps)
    add("pack fp32->fp16", "torch.cat + half", t_cat, None, 6 * numel)
    add("pack fp32->fp16", "gradfuse pack_", t_pack, t_cat, 6 * numel)
    add("unpack fp16->fp32", "torch split + copy_", t_split, None, 6 * numel)
    add("unpack fp16->fp32", "gradfuse unpack_", t_unpack, t_split, 6 * numel)
    del flat, restored

    # ---- top-k with error feedback at `density` on the flattened gradients -------------------
    grad = torch.cat([g.flatten() for g in grads])
    del grads
    residual = torch.zeros_like(grad)
    k = max(1, math.ceil(density * numel))

    def torch_topk_with_feedback():
        residual.add_(grad)
        idx = torch.topk(residual.abs(), k, sorted=False).indices
        values = residual[idx]
        residual[idx] = 0
        return values, idx

    t_ref = median_seconds(torch_topk_with_feedback, dev, reps)
    t_topk_only = median_seconds(lambda: torch.topk(grad.abs(), k, sorted=False), dev, reps)
    t_exact = median_seconds(lambda: ops.topk_compress(grad, residual, density), dev, reps)
    t_sampled = median_seconds(
        lambda: ops.topk_compress(grad, residual, density, sampled=True), dev, reps
    )
    # Floor: read grad and residual, write residual (12 bytes per element).
    label = f"top-k {density:g} + error feedback"
    add(label, "torch add_ + topk(abs) + scatter", t_ref, None, 12 * numel)
    add(label, "torch.topk(abs) alone", t_topk_only, None, 4 * numel)
    add(label, "gradfuse exact", t_exact, t_ref, 12 * numel)
    rows[-1].impl += f" ({t_topk_only / t_exact:.1f}x topk alone)"
    add(label, "gradfuse sampled (DGC)", t_sampled, t_ref, 12 * numel)
    rows[-1].impl += f" ({t_topk_only / t_sampled:.1f}x topk alone)"
    return rows, copy_bw


def format_table(rows: list[Row], copy_bw: float, device: str) -> str:
    lines = [
        f"gradfuse ops on {device} ({torch.get_num_threads()} threads), ResNet-50 gradients: "
        f"161 tensors, 25.6M values; copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)",
        f"{'op':44} {'implementation':46} {'median ms':>10} {'speedup':>8} {'GB/s':>7} "
        f"{'% copy':>7}",
    ]
    for r in rows:
        speed = f"{r.speedup:.1f}x" if r.speedup is not None else "ref"
        gbps = f"{r.gbps:.1f}" if r.gbps is not None else "-"
        share = f"{100 * r.share_of_copy:.0f}%" if r.share_of_copy is not None else "-"
        lines.append(f"{r.op:44} {r.impl:46} {r.ms:10.2f} {speed:>8} {gbps:>7} {share:>7}")
    return "\n".join(lines)


def to_json(rows: list[Row], copy_bw: float) -> dict:
    return {"copy_bandwidth_gbps": copy_bw / 1e9, "rows": [asdict(r) for r in rows]}
