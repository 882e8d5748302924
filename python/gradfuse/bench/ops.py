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
from .timing import copy_bandwidth, median_seconds, paired_median_seconds


@dataclass
class Row:
    op: str
    impl: str
    ms: float
    speedup: float | None  # reference time / this time (None for the reference itself)
    gbps: float
    share_of_copy: float


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


def torch_topk_with_feedback(grad, residual, k):
    """The same work as gradfuse's top-k in torch ops: accumulate, select, send, clear."""
    residual.add_(grad)
    idx = torch.topk(residual.abs(), k, sorted=False).indices
    values = residual[idx]
    residual[idx] = 0
    return values, idx


def _time_lars(grads, shapes, dev, reps):
    """(python LARS, torch SGD foreach, gradfuse) seconds; LARS moves 20 bytes per parameter
    (read w, g, v; write w, v)."""
    gen = torch.Generator(device=dev).manual_seed(1)
    params = [torch.randn(*s, generator=gen, device=dev) for s in shapes]
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
    return t_python, t_sgd, t_lars


def _has_kernel(name: str, dev: torch.device) -> bool:
    key = "CPU" if dev.type == "cpu" else dev.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{name}", key)


def _time_lars_one_pass(grads, shapes, dev, reps):
    """Seconds of the step LARS takes behind DistributedOptimizer: the gradients' squared norms
    came from the engine's unpack and the weights' from the previous update, so the step is
    lars_update_from_norms_ alone (20 bytes per fp32 parameter). None where the device has no
    kernel for it."""
    if not _has_kernel("lars_update_from_norms_", dev):
        return None
    gen = torch.Generator(device=dev).manual_seed(2)
    params = [torch.randn(*s, generator=gen, device=dev) for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    use_lars = [len(s) > 1 for s in shapes]
    g_sq, w_sq = ops.sum_squares(grads), ops.sum_squares(params)
    return median_seconds(
        lambda: ops.lars_update_from_norms_(
            params,
            grads,
            bufs,
            g_sq,
            w_sq,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-5,
            trust_coefficient=0.001,
            use_lars=use_lars,
            use_weight_decay=use_lars,
        ),
        dev,
        reps,
    )


def _time_norms(grads, dev, reps):
    """(torch._foreach_norm, sum_squares) seconds over the gradients (4 bytes per value read);
    None for sum_squares where the device has no kernel for it."""
    t_foreach = median_seconds(lambda: torch._foreach_norm(grads), dev, reps)
    if not _has_kernel("sum_squares", dev):
        return t_foreach, None
    return t_foreach, median_seconds(lambda: ops.sum_squares(grads), dev, reps)


def _time_pack(grads, numel, dev, reps):
    """(cat+half, pack_, split+copy_, unpack_, unpack_ with sq_norms) seconds; 6 bytes per
    element each way."""
    flat = torch.empty(numel, dtype=torch.float16, device=dev)
    restored = [torch.empty_like(g) for g in grads]
    sizes = [g.numel() for g in grads]
    t_cat = median_seconds(lambda: torch.cat([g.flatten() for g in grads]).half(), dev, reps)
    t_pack = median_seconds(lambda: ops.pack_(grads, flat), dev, reps)
    t_split = median_seconds(
        lambda: [r.copy_(c.view_as(r)) for r, c in zip(restored, flat.split(sizes))], dev, reps
    )
    t_unpack = median_seconds(lambda: ops.unpack_(flat, restored), dev, reps)
    sq = torch.empty(len(grads), dtype=torch.float64, device=dev)
    t_norms = median_seconds(lambda: ops.unpack_(flat, restored, sq_norms=sq), dev, reps)
    return t_cat, t_pack, t_split, t_unpack, t_norms


def _time_topk(grads, density, dev, reps):
    """(torch with feedback, torch.topk alone, exact, sampled) seconds on the flat gradient."""
    grad = torch.cat([g.flatten() for g in grads])
    residual = torch.zeros_like(grad)
    k = max(1, math.ceil(density * grad.numel()))

    t_ref = median_seconds(lambda: torch_topk_with_feedback(grad, residual, k), dev, reps)
    t_alone = median_seconds(lambda: torch.topk(grad.abs(), k, sorted=False), dev, reps)
    t_exact = median_seconds(lambda: ops.topk_compress(grad, residual, density), dev, reps)
    t_sampled = median_seconds(
        lambda: ops.topk_compress(grad, residual, density, sampled=True), dev, reps
    )
    return t_ref, t_alone, t_exact, t_sampled


def _time_sparse_topk(numel, density, dev, reps, gen):
    """(torch.topk alone, exact) seconds on a gradient with 0.1% non-zeros (an embedding's):
    the sampled threshold is 0 there, and the selection must stay one pass with O(k) memory."""
    grad = torch.zeros(numel, device=dev)
    nnz = numel // 1000
    grad[torch.randint(0, numel, (nnz,), generator=gen, device=dev)] = 1.0
    residual = torch.zeros_like(grad)
    k = max(1, math.ceil(density * numel))
    t_alone = median_seconds(lambda: torch.topk(grad.abs(), k, sorted=False), dev, reps)
    t_exact = median_seconds(lambda: ops.topk_compress(grad, residual, density), dev, reps)
    return t_alone, t_exact


def _time_decompress(numel, density, dev, reps, gen, ranks=4):
    """(index_add_, topk_decompress) seconds for `ranks` ranks' picks gathered rank by rank,
    and the median ratio of back-to-back pairs; the ranks pick from the same 2k positions, so
    indices repeat across ranks."""
    k = max(1, math.ceil(density * numel))
    pool = torch.randperm(numel, generator=gen, device=dev)[: 2 * k]
    picks = [
        pool[torch.randperm(2 * k, generator=gen, device=dev)[:k]].sort().values
        for _ in range(ranks)
    ]
    indices = torch.cat(picks)
    values = torch.randn(indices.numel(), generator=gen, device=dev)
    (t_add, t_ours), ratio = paired_median_seconds(
        [
            lambda: torch.zeros(numel, device=dev).index_add_(0, indices, values),
            lambda: ops.topk_decompress(values, indices, numel),
        ],
        dev,
        2 * reps + 1,
    )
    return t_add, t_ours, ratio


def run(device: str = "cpu", density: float = 0.001, reps: int = 11) -> tuple[list[Row], float]:
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = resnet50_shapes()
    numel = sum(math.prod(s) for s in shapes)
    grads = [torch.randn(*s, generator=gen, device=dev) * 1e-3 for s in shapes]
    copy_bw = copy_bandwidth(dev)
    rows: list[Row] = []

    def add(op, impl, seconds, reference_s, nbytes):
        gbps = nbytes / seconds / 1e9
        speedup = None if reference_s is None else reference_s / seconds
        rows.append(Row(op, impl, seconds * 1e3, speedup, gbps, gbps * 1e9 / copy_bw))

    t_python, t_sgd, t_lars = _time_lars(grads, shapes, dev, reps)
    add("lars step", "python per-param LARS", t_python, None, 20 * numel)
    add("lars step", "torch SGD momentum foreach", t_sgd, None, 20 * numel)
    add(
        f"lars step (vs SGD foreach: {t_sgd / t_lars:.2f}x)",
        "gradfuse lars_update_",
        t_lars,
        t_python,
        20 * numel,
    )
    t_one_pass = _time_lars_one_pass(grads, shapes, dev, reps)
    if t_one_pass is not None:
        add(
            f"lars step (vs SGD foreach: {t_sgd / t_one_pass:.2f}x)",
            "gradfuse one pass (DistributedOptimizer)",
            t_one_pass,
            t_python,
            20 * numel,
        )

    t_foreach, t_sum_squares = _time_norms(grads, dev, reps)
    add("squared norms of 161 tensors", "torch._foreach_norm", t_foreach, None, 4 * numel)
    if t_sum_squares is not None:
        add(
            "squared norms of 161 tensors",
            "gradfuse sum_squares (deterministic)",
            t_sum_squares,
            t_foreach,
            4 * numel,
        )

    t_cat, t_pack, t_split, t_unpack, t_norms = _time_pack(grads, numel, dev, reps)
    add("pack fp32->fp16", "torch.cat + half", t_cat, None, 6 * numel)
    add("pack fp32->fp16", "gradfuse pack_", t_pack, t_cat, 6 * numel)
    add("unpack fp16->fp32", "torch split + copy_", t_split, None, 6 * numel)
    add("unpack fp16->fp32", "gradfuse unpack_", t_unpack, t_split, 6 * numel)
    add("unpack fp16->fp32", "gradfuse unpack_ + sq_norms (one pass)", t_norms, t_split, 6 * numel)

    # Error feedback must read grad and residual and write residual: 12 bytes per element.
    t_ref, t_alone, t_exact, t_sampled = _time_topk(grads, density, dev, reps)
    label = f"top-k {density:g} + error feedback"
    add(label, "torch add_ + topk(abs) + scatter", t_ref, None, 12 * numel)
    add(label, "torch.topk(abs) alone", t_alone, None, 4 * numel)
    add(label, f"gradfuse exact ({t_alone / t_exact:.1f}x topk alone)", t_exact, t_ref, 12 * numel)
    add(
        label,
        f"gradfuse sampled ({t_alone / t_sampled:.1f}x topk alone)",
        t_sampled,
        t_ref,
        12 * numel,
    )

    # Bytes per parameter of exact top-k: the fused pass (grad, residual in and out) and the
    # candidates' compaction pass re-reading the residual: 16.
    t_alone, t_exact = _time_sparse_topk(numel, density, dev, reps, gen)
    label = f"top-k {density:g}, 0.1% non-zero gradient"
    add(label, "torch.topk(abs) alone", t_alone, None, 4 * numel)
    add(
        label, f"gradfuse exact ({t_alone / t_exact:.1f}x topk alone)", t_exact, t_alone, 16 * numel
    )

    # Decompress writes the dense gradient (4 bytes per element) plus the picks.
    t_add, t_ours, ratio = _time_decompress(numel, density, dev, reps, gen)
    label = f"decompress 4 ranks' top-k {density:g}"
    add(label, "torch zeros + index_add_", t_add, None, 4 * numel)
    add(
        label,
        f"gradfuse topk_decompress ({ratio:.2f}x index_add_ time)",
        t_ours,
        t_add,
        4 * numel,
    )
    return rows, copy_bw


def format_table(rows: list[Row], copy_bw: float, device: str) -> str:
    title = (
        f"gradfuse ops on {device} ({torch.get_num_threads()} threads), ResNet-50 gradients: "
        f"161 tensors, 25.6M values; copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)"
    )
    header = (
        f"{'op':44} {'implementation':46} {'median ms':>10} {'speedup':>8} {'GB/s':>7} "
        f"{'% copy':>7}"
    )
    lines = [title, header]
    for r in rows:
        speed = f"{r.speedup:.1f}x" if r.speedup is not None else "ref"
        lines.append(
            f"{r.op:44} {r.impl:46} {r.ms:10.2f} {speed:>8} {r.gbps:7.1f} "
            f"{100 * r.share_of_copy:6.0f}%"
        )
    return "\n".join(lines)


def to_json(rows: list[Row], copy_bw: float) -> dict:
    return {"copy_bandwidth_gbps": copy_bw / 1e9, "rows": [asdict(r) for r in rows]}


def plot(rows: list[Row], path: str) -> None:
    """Speed-up over the torch reference for each gradfuse row (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r.speedup is not None]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(
        [f"{r.op.split(' (')[0]}\n{r.impl.split(' (')[0]}" for r in ours], [r.speedup for r in ours]
    )
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the torch reference (same run)")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
