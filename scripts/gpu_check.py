"""GPU checks that the op tests cannot make (step 4 of scripts/gpu_check.sh).

    python scripts/gpu_check.py [--device cuda|cpu] [--small] [--only PART[,PART]] [--json PATH]

Parts (each reports passed / failed / skipped with a reason; exit 1 when one failed):

- ``sync``: the steady-state hot path — lars_update_, the one-pass LARS step from
  sum_squares / unpack_'s sq_norms, pack_/unpack_, exact topk_compress and topk_decompress, and one gradfuse.DistributedOptimizer step at world size 1 — runs under
  ``torch.cuda.set_sync_debug_mode("error")`` after a warm-up: any host synchronization raises.
- ``graph``: LARS (two-pass and one-pass) + pack + unpack with sq_norms + sum_squares captured
  in a CUDA graph and replayed give the same bits as eager execution on the same inputs (the
  norms are deterministic: no atomics decide their low bits).
- ``topk``: sampled topk_compress at density 0.001 on 25.6M values (ResNet-50's size) is at
  least 10x faster than ``torch.topk`` alone, on a dense and on a 0.1%-non-zero gradient; the
  bytes moved per parameter and the achieved bandwidth are printed. Then 3 DistributedOptimizer
  steps with exact top-k compression run under ``set_sync_debug_mode("error")``.
- ``bandwidth``: on ResNet-50's 161 fp32 tensors (25.6M parameters), the one-pass LARS step
  (``lars_update_from_norms_``, 20 B/param) and ``pack_`` to fp16 (6 B/param) each reach at
  least 85% of the measured device copy bandwidth (CUDA-event timing over back-to-back calls);
  the two-pass ``lars_update_``, ``unpack_`` with ``sq_norms`` and ``sum_squares`` are printed
  beside them, each with its bytes moved per parameter.
- ``huge``: pack_, unpack_, lars_update_ (and sum_squares) and topk_compress on one tensor of
  more than 2**31 elements (64-bit index math). Inputs repeat a short random pattern, so the reference for every
  element comes from the pattern (computed on the CPU in float64) and every element is checked.

``--device cpu --small`` runs what it can on the CPU with tiny sizes (``huge`` with ~100K
elements, ``sync``'s workload without the sync check), so CI keeps this script working on
machines without a GPU; the CUDA-only parts say so and are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch

PARTS = ("sync", "graph", "topk", "bandwidth", "huge")
# Length of the repeating input pattern: a prime, so the pattern does not line up with the
# kernels' chunk sizes (powers of two) and a misplaced element shows.
PERIOD = 65521
PERIOD_SMALL = 1021


class Skip(Exception):
    """A part that cannot run here (the reason is its message)."""


# ---- helpers ----------------------------------------------------------------------------------


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def pattern(gen, n, lo, hi, dtype, signed=False):
    """n values in [lo, hi) (with random signs when signed), exactly representable in dtype."""
    x = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    if signed:
        x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x)
    return x.to(dtype)


def tile(base, numel, dev, dtype=None):
    """A 1-D tensor of numel elements on dev whose element i is base[i % len(base)]; built with
    no temporary the size of the result."""
    p = base.numel()
    out = torch.empty(numel, dtype=dtype or base.dtype, device=dev)
    rows = numel // p
    src = base.to(dev, out.dtype)
    if rows:
        out[: rows * p].view(rows, p).copy_(src.expand(rows, p))
    out[rows * p :].copy_(src[: numel - rows * p])
    return out


def assert_periodic(name, x, expected, rtol=0.0, atol=0.0):
    """Every element x[j] matches expected[j % len(expected)] (exactly, or within
    atol + rtol * |expected|), compared in slices of whole periods so the float64 temporaries
    stay ~1 GiB. Raises naming the first wrong index, its value and the expected one."""
    p = expected.numel()
    want_period = expected.to(x.device, torch.float64)
    slice_len = max(1, (1 << 27) // p) * p  # whole periods: every slice starts at phase 0
    for start in range(0, x.numel(), slice_len):
        part = x[start : start + slice_len].double()
        rows, rest = divmod(part.numel(), p)
        want = torch.cat([want_period.repeat(rows), want_period[:rest]])
        ok = (part - want).abs() <= atol + rtol * want.abs()
        if not bool(ok.all()):
            j = int((~ok).nonzero()[0])
            raise AssertionError(
                f"{name}: element {start + j} is {part[j].item()!r}, "
                f"expected {want[j].item()!r} (of {x.numel()} elements)"
            )


def assert_equal(name, a, b):
    """a == b element for element (compared as float32, in slices: no full-size temporary)."""
    assert a.numel() == b.numel(), (name, a.numel(), b.numel())
    step = 1 << 27
    for start in range(0, a.numel(), step):
        x, y = a[start : start + step].float(), b[start : start + step].float()
        bad = x != y
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise AssertionError(
                f"{name}: element {start + j} is {x[j].item()}, want {y[j].item()}"
            )


def free_between(dev):
    """Drop the previous op's tensors from the caching allocator before the next big one."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- sync: no host synchronization on the hot path ---------------------------------------------


def hot_path_workload(dev):
    """(setup, step): one fused LARS over several tensors, a pack_ of the grads to fp16 and an
    unpack_ back, and one DistributedOptimizer step (forward, backward, reduction, LARS) at world
    size 1."""
    import gradfuse
    from gradfuse import ops
    from gradfuse.optim import LARS

    gen = torch.Generator().manual_seed(0)
    shapes = [(256, 128), (128,), (64, 64, 3), (10,)]
    params = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dev) * 1e-2 for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float16, device=dev)
    restored = [torch.empty_like(g) for g in grads]
    nonfinite = torch.zeros(1, device=dev)

    gradfuse.init()
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).to(dev)
    opt = gradfuse.DistributedOptimizer(
        LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        named_parameters=model.named_parameters(),
    )
    x = torch.randn(16, 32, generator=gen).to(dev)
    y = torch.randn(16, 10, generator=gen).to(dev)
    # Top-k: exact mode and decompress take every decision on the device.
    topk_grad = torch.randn(100_003, generator=gen).to(dev)
    topk_residual = torch.zeros_like(topk_grad)

    g_sq = torch.zeros(len(grads), dtype=torch.float64, device=dev)

    def step():
        ops.lars_update_(params, grads, bufs, lr=0.1, weight_decay=1e-4)
        ops.pack_(grads, flat, scale=0.5, nonfinite=nonfinite)
        ops.unpack_(flat, restored, scale=2.0, sq_norms=g_sq)
        w_sq = ops.sum_squares(params)
        ops.lars_update_from_norms_(params, restored, bufs, g_sq, w_sq, lr=0.1, weight_decay=1e-4)
        values, indices = ops.topk_compress(topk_grad, topk_residual, 0.01)
        ops.topk_decompress(values.repeat(4), indices.repeat(4), topk_grad.numel())
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    def check():
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "non-finite"
        assert nonfinite.item() == 0.0, "pack_ reported a non-finite value"

    return step, check


def part_sync(dev, small):
    import gradfuse

    step, check = hot_path_workload(dev)
    try:
        for _ in range(3):  # warm-up: allocations, response cache, lazy CUDA module loading
            step()
        sync(dev)
        if dev.type != "cuda":
            step()
            check()
            raise Skip("sync debug mode is CUDA only: ran the workload on the CPU without it")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sync(dev)
        check()
        return (
            "3 steady-state steps (LARS two-pass and one-pass, sum_squares, pack_, unpack_ with "
            "sq_norms, exact top-k, decompress, DistributedOptimizer + one-pass LARS) without a sync"
        )
    finally:
        gradfuse.shutdown()


# ---- graph: CUDA graph capture and replay equal eager, bit for bit ----------------------------


def part_graph(dev, small):
    if dev.type != "cuda":
        raise Skip("CUDA graphs need a GPU")
    from gradfuse import ops

    gen = torch.Generator().manual_seed(1)
    numels = [100003, 4097, 1, 65536, 33]
    pristine = {
        "params": [torch.randn(n, generator=gen) for n in numels],
        "grads": [torch.randn(n, generator=gen) * 1e-2 for n in numels],
        "bufs": [torch.randn(n, generator=gen) * 1e-3 for n in numels],
    }
    # The graph reads and writes these tensors; only their contents change between runs.
    static = {k: [t.to(dev) for t in v] for k, v in pristine.items()}
    flat = torch.empty(sum(numels), dtype=torch.bfloat16, device=dev)
    restored = [torch.zeros(n, device=dev) for n in numels]
    nonfinite = torch.zeros(1, device=dev)
    g_sq = torch.zeros(len(numels), dtype=torch.float64, device=dev)
    w_sq = torch.zeros(len(numels), dtype=torch.float64, device=dev)

    def reset():
        for k, tensors in static.items():
            for t, src in zip(tensors, pristine[k]):
                t.copy_(src)
        flat.zero_()
        for t in restored:
            t.zero_()
        nonfinite.zero_()
        g_sq.zero_()
        w_sq.zero_()

    def step():
        ops.lars_update_(
            static["params"],
            static["grads"],
            static["bufs"],
            lr=0.1,
            weight_decay=1e-4,
            use_lars=[n > 1 for n in numels],
            nesterov=True,
        )
        ops.pack_(static["params"], flat, scale=0.25, nonfinite=nonfinite)
        ops.unpack_(flat, restored, scale=4.0, accumulate=True, sq_norms=g_sq)
        w_sq.copy_(ops.sum_squares(static["params"]))
        ops.lars_update_from_norms_(
            static["params"], restored, static["bufs"], g_sq, w_sq, lr=0.01, weight_decay=1e-4
        )

    def outputs():
        sync(dev)
        tensors = static["params"] + static["bufs"] + restored + [flat, nonfinite, g_sq, w_sq]
        return [t.clone() for t in tensors]

    reset()
    step()
    eager = outputs()

    # Warm up on a side stream (as torch.cuda.graphs asks), then capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        reset()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    reset()
    sync(dev)
    with torch.cuda.graph(graph):
        step()
    for replay in range(2):  # twice: a replay must not depend on what the last one left
        reset()
        graph.replay()
        got = outputs()
        for i, (a, b) in enumerate(zip(got, eager)):
            if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                raise AssertionError(f"replay {replay}: output tensor {i} differs from eager")
    return (
        f"captured LARS (two-pass, one-pass) + pack_ + unpack_ with sq_norms + sum_squares over "
        f"{len(numels)} tensors; 2 replays equal eager, norms included"
    )


# ---- topk: sampled top-k against torch.topk -----------------------------------------------------

# Bytes per parameter of topk_compress: the fused pass reads grad and residual and writes the
# residual (12), the candidates' compaction re-reads the residual (4).
TOPK_BYTES_PER_PARAM = 16


def time_ms(fn, dev, reps=20):
    for _ in range(3):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def part_topk(dev, small):
    from gradfuse import ops

    numel = 100_003 if small else 25_557_032  # ResNet-50's parameter count
    density = 0.001
    k = math.ceil(density * numel)
    gen = torch.Generator(device=dev).manual_seed(4)
    dense = torch.randn(numel, generator=gen, device=dev)
    sparse = torch.zeros(numel, device=dev)
    sparse[torch.randint(0, numel, (numel // 1000,), generator=gen, device=dev)] = 1.0
    report = []
    for name, grad in (("dense", dense), ("0.1% non-zero", sparse)):
        residual = torch.zeros_like(grad)

        def torch_topk(g=grad):
            return torch.topk(g.abs(), k, sorted=False)

        def ours(sampled, g=grad, r=residual):
            return ops.topk_compress(g, r, density, sampled=sampled)

        t_topk = time_ms(torch_topk, dev)
        t_sampled = time_ms(lambda: ours(True), dev)
        t_exact = time_ms(lambda: ours(False), dev)
        gbps = TOPK_BYTES_PER_PARAM * numel / t_sampled / 1e6
        line = (
            f"{name}: torch.topk {t_topk:.3f} ms, sampled {t_sampled:.3f} ms "
            f"({t_topk / t_sampled:.1f}x), exact {t_exact:.3f} ms ({t_topk / t_exact:.1f}x), "
            f"{TOPK_BYTES_PER_PARAM} B/param -> {gbps:.0f} GB/s"
        )
        print(f"gpu_check topk {line}", flush=True)
        report.append(line)
        if dev.type == "cuda":
            assert t_topk / t_sampled >= 10, f"sampled top-k below 10x torch.topk: {line}"
    if dev.type != "cuda":
        raise Skip("the 10x target is for a GPU; CPU figures: " + "; ".join(report))
    report.append(topk_optimizer_without_sync(dev))
    return "; ".join(report)


def topk_optimizer_without_sync(dev):
    """DistributedOptimizer with exact top-k (world size 1): compress in the gradient hook,
    allgather, decompress, step, under set_sync_debug_mode("error") after a warm-up."""
    import gradfuse

    gradfuse.init()
    try:
        gen = torch.Generator().manual_seed(5)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
        ).to(dev)
        opt = gradfuse.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            named_parameters=model.named_parameters(),
            compression=gradfuse.Compression.topk(0.01, sampled=False, min_numel=1024),
        )
        x = torch.randn(32, 256, generator=gen).to(dev)
        y = torch.randn(32, 10, generator=gen).to(dev)

        def step():
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        sync(dev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sync(dev)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), "non-finite"
        return "3 DistributedOptimizer steps with exact top-k without a sync"
    finally:
        gradfuse.shutdown()


# ---- bandwidth: one-pass LARS and pack against the copy bandwidth ------------------------------

BANDWIDTH_TARGET = 0.85
# Bytes each op must move per fp32 parameter: read w, g, v and write w, v (one-pass LARS); the
# two-pass op reads w and g once more for the norms; pack reads fp32 and writes fp16; unpack the
# reverse; sum_squares reads.
BYTES_PER_PARAM = {
    "one-pass LARS": 20,
    "two-pass lars_update_": 28,
    "pack_ fp32->fp16": 6,
    "unpack_ fp16->fp32 + sq_norms": 6,
    "sum_squares": 4,
}
GATED = ("one-pass LARS", "pack_ fp32->fp16")


def seconds_per_call(fn, dev, reps):
    """Seconds per call over `reps` back-to-back calls (CUDA events on a GPU: no host sync
    between calls, as in training), after a warm-up."""
    for _ in range(3):
        fn()
    sync(dev)
    if dev.type != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / reps


def copy_seconds(nbytes, gen, dev, reps):
    """Seconds of one device-to-device copy of nbytes (the buffers freed after)."""
    src = torch.randn(nbytes // 4, generator=gen, device=dev)
    dst = torch.empty_like(src)
    return seconds_per_call(lambda: dst.copy_(src), dev, reps)


def part_bandwidth(dev, small):
    from gradfuse import ops
    from gradfuse.bench.shapes import resnet50_shapes

    shapes = resnet50_shapes()[:12] if small else resnet50_shapes()
    reps = 3 if small else 50
    gen = torch.Generator(device=dev).manual_seed(6)
    params = [torch.randn(*s, generator=gen, device=dev) for s in shapes]
    grads = [torch.randn(*s, generator=gen, device=dev) * 1e-3 for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    use_lars = [len(s) > 1 for s in shapes]
    hyper = {"lr": 1e-3, "weight_decay": 5e-5, "use_lars": use_lars, "use_weight_decay": use_lars}
    flat = torch.empty(numel, dtype=torch.float16, device=dev)
    restored = [torch.empty_like(g) for g in grads]
    g_sq, w_sq = ops.sum_squares(grads), ops.sum_squares(params)

    copy_bytes = (32 << 20) if small else (1 << 30)
    copy_bw = 2 * copy_bytes / copy_seconds(copy_bytes, gen, dev, max(3, reps // 5))

    calls = {
        "one-pass LARS": lambda: ops.lars_update_from_norms_(
            params, grads, bufs, g_sq, w_sq, **hyper
        ),
        "two-pass lars_update_": lambda: ops.lars_update_(params, grads, bufs, **hyper),
        "pack_ fp32->fp16": lambda: ops.pack_(grads, flat),
        "unpack_ fp16->fp32 + sq_norms": lambda: ops.unpack_(flat, restored, sq_norms=g_sq),
        "sum_squares": lambda: ops.sum_squares(grads),
    }
    shares, report = {}, [f"{len(shapes)} tensors, {numel} params; copy {copy_bw / 1e9:.0f} GB/s"]
    for name, fn in calls.items():
        seconds = seconds_per_call(fn, dev, reps)
        gbps = BYTES_PER_PARAM[name] * numel / seconds / 1e9
        shares[name] = gbps * 1e9 / copy_bw
        line = (
            f"{name}: {seconds * 1e6:.0f} us, {BYTES_PER_PARAM[name]} B/param -> {gbps:.0f} GB/s "
            f"= {100 * shares[name]:.0f}% of copy"
        )
        print(f"gpu_check bandwidth {line}", flush=True)
        report.append(line)
    assert all(bool(torch.isfinite(p).all()) for p in params), "LARS made a non-finite weight"
    if dev.type != "cuda":
        raise Skip("the 85% targets are for a GPU; CPU figures: " + "; ".join(report))
    below = [f"{n} {100 * shares[n]:.0f}%" for n in GATED if shares[n] < BANDWIDTH_TARGET]
    assert not below, f"below {100 * BANDWIDTH_TARGET:.0f}% of copy bandwidth: {below}; " + (
        "; ".join(report)
    )
    return "; ".join(report)


# ---- huge: tensors above 2**31 elements ---------------------------------------------------------


def huge_sizes(dev, small):
    """(numel, period): above 2**31 on a GPU, ~100K on the CPU (--small)."""
    if small:
        return 100_003, PERIOD_SMALL
    if dev.type != "cuda":
        raise Skip("2**31-element tensors on the CPU would take minutes: use --small")
    numel = 2**31 + 2**20 + 3  # past 2**31, past a chunk boundary, odd tail
    need = 22 << 30  # the largest op (topk_compress): fp16 grad + fp32 residual + scratch
    free, _ = torch.cuda.mem_get_info(dev)
    if free < need:
        raise Skip(f"needs ~{need >> 30} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    return numel, PERIOD


def check_pack_unpack(dev, numel, p, gen):
    from gradfuse import ops

    # Values in [0.5, 4) with signs: scaled by 2 or 0.5 they stay exact fp16 normals, so every
    # element must come out bit-exact.
    base = pattern(gen, p, 0.5, 4.0, torch.float16, signed=True)
    head = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16, device=dev)
    big = tile(base, numel, dev)
    out = torch.full((3 + numel + 1,), 7.0, dtype=torch.float16, device=dev)  # 1 sentinel
    nonfinite = torch.zeros(1, device=dev)
    ops.pack_([head, big], out, scale=2.0, nonfinite=nonfinite)
    assert torch.equal(out[:3], head * 2), "pack_: the leading small tensor"
    assert_periodic("pack_", out[3 : 3 + numel], base.double() * 2)
    assert out[-1].item() == 7.0, "pack_ wrote past the end of its tensors"
    assert nonfinite.item() == 0.0, "pack_ reported a non-finite value"
    del big
    free_between(dev)

    # unpack_: the same buffer back into [head, big] (element 3 + i of out goes to big[i]).
    head_out = torch.empty(3, dtype=torch.float16, device=dev)
    big_out = torch.empty(numel, dtype=torch.float16, device=dev)
    ops.unpack_(out, [head_out, big_out], scale=0.5)
    assert torch.equal(head_out, head), "unpack_: the leading small tensor"
    assert_periodic("unpack_", big_out, base.double())
    del out, big_out
    free_between(dev)


def check_lars(dev, numel, p, gen):
    from gradfuse import ops

    # bf16 weights, grads and momentum (the op allows all-bf16), so 3 x 2 bytes per element.
    # Hyper-parameters make every update move each weight by far more than a bf16 rounding, so
    # an element the kernel missed cannot pass.
    lr, momentum, wd, tc, eps = 0.5, 0.9, 1e-4, 0.5, 1e-8
    w0 = pattern(gen, p, 0.5, 2.0, torch.bfloat16)
    g0 = pattern(gen, p, 0.25, 1.0, torch.bfloat16, signed=True)
    v0 = pattern(gen, p, 0.0, 0.05, torch.bfloat16, signed=True)
    w, g, v = (tile(t, numel, dev) for t in (w0, g0, v0))
    ops.lars_update_(
        [w], [g], [v], lr=lr, momentum=momentum, weight_decay=wd, trust_coefficient=tc, eps=eps
    )
    # The reference in float64 from the pattern: norms over numel elements = whole periods plus
    # the partial one.
    rows, rest = divmod(numel, p)

    def norm(t):
        t = t.double()
        return math.sqrt(rows * float((t * t).sum()) + float((t[:rest] * t[:rest]).sum()))

    w_norm, g_norm = norm(w0), norm(g0)
    # The deterministic norms over tens of thousands of chunks (g is not written by the step).
    g_sq = ops.sum_squares([g]).item()
    assert abs(g_sq - g_norm**2) <= 1e-5 * g_norm**2, f"sum_squares: {g_sq} vs {g_norm**2}"
    trust = tc * w_norm / (g_norm + wd * w_norm + eps)
    d = g0.double() + wd * w0.double()
    v_ref = momentum * v0.double() + trust * d
    w_ref = w0.double() - lr * v_ref
    # bf16 keeps 8 significant bits: rounding is within 2**-8 relative; allow 2**-6 (the kernel
    # may round v before using it) plus a little absolute slack near zero.
    assert_periodic("lars_update_ weights", w, w_ref, rtol=2**-6, atol=2**-7)
    assert_periodic("lars_update_ momentum", v, v_ref, rtol=2**-6, atol=2**-7)
    del w, g, v
    free_between(dev)


def check_topk(dev, numel, p, gen):
    from gradfuse import ops

    # Background |g| < 1 everywhere, 16 planted values 100 + j at known places (on a GPU on both
    # sides of 2**31, and the last element): they are the top-k.
    base = pattern(gen, p, 0.0, 1.0, torch.float16, signed=True)
    planted = sorted(
        {0, 5, numel // 2, numel - 2**20 if numel > 2**21 else numel // 3, numel - 1}
        | {numel - 1 - 7919 * j for j in range(1, 12)}
    )
    planted_values = [100.0 + j for j in range(len(planted))]  # exact in fp16
    grad = tile(base, numel, dev)
    grad[torch.tensor(planted, device=dev)] = torch.tensor(
        planted_values, dtype=torch.float16, device=dev
    )
    residual = torch.zeros(numel, dtype=torch.float32, device=dev)
    # ratio * numel = len(planted) - 0.5, so k = ceil(ratio * numel) = len(planted).
    ratio = (len(planted) - 0.5) / numel
    for sampled in (False, True):
        mode = "sampled" if sampled else "exact"
        values, indices = ops.topk_compress(grad, residual, ratio, sampled=sampled, seed=3)
        got = indices.cpu().tolist()
        if sampled:  # k..2k elements, each at least as large as any left out
            assert len(planted) <= len(got) <= 2 * len(planted), (mode, len(got))
        else:
            assert len(got) == len(planted), (mode, len(got))
        assert got == sorted(got), f"topk_compress ({mode}): indices not ascending"
        missing = sorted(set(planted) - set(got))
        assert not missing, f"topk_compress ({mode}): planted indices {missing} not selected"
        sel = indices.to(dev, torch.int64)
        assert_equal(f"topk_compress ({mode}) values", values, grad[sel])
        # Error feedback: the residual started at zero, so it is now the grad, with the sent
        # elements cleared.
        assert bool((residual[sel] == 0).all()), f"topk_compress ({mode}): sent, not cleared"
        residual[sel] = grad[sel].float()
        assert_equal(f"topk_compress ({mode}) residual", residual, grad)
        residual.zero_()
    del grad, residual
    free_between(dev)


def part_huge(dev, small):
    numel, p = huge_sizes(dev, small)
    gen = torch.Generator().manual_seed(2)
    done = []
    for name, fn in (
        ("pack_/unpack_", check_pack_unpack),
        ("lars_update_", check_lars),
        ("topk_compress", check_topk),
    ):
        start = time.perf_counter()
        fn(dev, numel, p, gen)
        sync(dev)
        done.append(f"{name} {time.perf_counter() - start:.1f} s")
    return f"{numel} elements, every one checked: " + ", ".join(done)


# ---- driver -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny sizes (for a CPU run in CI)")
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {PARTS}")
    ap.add_argument("--json", help="write {part: {status, seconds, detail}} here")
    args = ap.parse_args(argv)
    parts = [x for x in args.only.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: --device cuda but torch.cuda.is_available() is False")
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    functions = {
        "sync": part_sync,
        "graph": part_graph,
        "topk": part_topk,
        "bandwidth": part_bandwidth,
        "huge": part_huge,
    }

    results = {}
    for name in parts:
        start = time.perf_counter()
        try:
            detail, status = functions[name](dev, args.small), "passed"
        except Skip as e:
            detail, status = str(e), "skipped"
        except Exception as e:  # noqa: BLE001  (every failure is reported; the others still run)
            traceback.print_exc()
            detail, status = f"{type(e).__name__}: {e}".splitlines()[0][:300], "failed"
        seconds = time.perf_counter() - start
        results[name] = {"status": status, "seconds": round(seconds, 1), "detail": detail}
        print(f"gpu_check {name}: {status} ({seconds:.1f} s): {detail}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
