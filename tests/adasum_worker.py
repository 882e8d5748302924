"""One rank of the multi-process Adasum tests (tests/test_adasum.py): allreduce(op=Adasum) in
every form against a float64 reference of Horovod's pairwise formula, and
DistributedOptimizer(op=Adasum) training against the same formula applied by hand.

Every rank's data differs; each rank regenerates every other rank's input from the same seeds
to compute the expected value."""

from __future__ import annotations

import sys

import gradfuse as hvd
import torch
from engine_worker import expect_error
from multiproc import checks_of, device, worker_main

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(1,), (2,), (3,), (7,), (31,), (1009,), (3, 5), (), (0,), (2, 0)]
# Tolerance of the result against the float64 reference, relative to its largest entry: one
# rounding to the dtype (the combination runs in float64).
RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-12}


# ---- the reference: Horovod's formula, level by level as its VHDD pairs ranks --------------


def reference_pair(a, b):
    dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
    ca = 1.0 - dot / (2.0 * aa) if aa >= 1e-8 else 1.0
    cb = 1.0 - dot / (2.0 * bb) if bb >= 1e-8 else 1.0
    return ca * a + cb * b


def reference_adasum(vectors, prescale=1.0, postscale=1.0, device_type=None):
    """Adasum of per-rank tensors (float64 CPU copies), grouped as gradfuse groups them: per
    rank for CPU tensors, per node (summed, then divided by the node size) for CUDA ones."""
    groups = rank_groups(device_type or device().type)
    flat = [v.detach().cpu().double().reshape(-1) * prescale for v in vectors]
    level_values = [sum(flat[r] for r in group) for group in groups]
    level = 1
    while level < len(level_values):  # rank i pairs with i + level at each level
        for i in range(0, len(level_values), 2 * level):
            level_values[i] = reference_pair(level_values[i], level_values[i + level])
        level *= 2
    return level_values[0] * (postscale / len(groups[0]))


def rank_groups(device_type=None):
    n = hvd.size()
    if (device_type or device().type) != "cuda":
        return [[r] for r in range(n)]
    k = hvd.local_size()  # nodes are runs of consecutive ranks on one test host
    return [list(range(c * k, (c + 1) * k)) for c in range(n // k)]


def supported():
    """Whether this layout runs Adasum (Horovod: a power-of-2 number of ranks, or of nodes for
    CUDA tensors)."""
    count = len(rank_groups())
    return count & (count - 1) == 0


def rank_data(rank, seed, shape, dtype):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device(), dtype)


def assert_close(got, expected64, dtype, what):
    assert got.dtype == dtype and got.device.type == device().type, (got.dtype, got.device)
    got64 = got.detach().cpu().double().reshape(-1)
    scale = max(float(expected64.abs().max()) if expected64.numel() else 0.0, 1e-30)
    err = float((got64 - expected64).abs().max()) if got64.numel() else 0.0
    assert err <= RTOL[dtype] * scale, f"{what}: error {err} > {RTOL[dtype]} x {scale}"


def assert_same_on_every_rank(result, name):
    rows = hvd.allgather(result.detach().reshape(1, -1), name=name)
    for r in range(hvd.size()):
        assert torch.equal(rows[r], rows[0]), f"{name}: rank {r} differs from rank 0"


# ---- checks ---------------------------------------------------------------------------------


def check_every_form_dtype_shape():
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()
    seed = 0
    for dtype in FLOATS:
        for shape in SHAPES:
            seed += 1
            inputs = [rank_data(k, seed, shape, dtype) for k in range(n)]
            expected = reference_adasum(inputs)
            mine = inputs[r]
            what = f"{dtype} {shape}"
            out = hvd.allreduce(mine, op=hvd.Adasum, name=f"a.{seed}")
            assert out.shape == mine.shape and torch.equal(mine, inputs[r])  # input untouched
            assert_close(out, expected, dtype, f"allreduce {what}")
            assert_same_on_every_rank(out, f"same.{seed}")
            inplace = mine.clone()
            assert hvd.allreduce_(inplace, op=hvd.Adasum, name=f"b.{seed}") is inplace
            assert torch.equal(inplace, out), f"allreduce_ {what}"
            h = hvd.allreduce_async(mine, op=hvd.Adasum, name=f"c.{seed}")
            assert torch.equal(hvd.synchronize(h), out), f"allreduce_async {what}"
            inplace = mine.clone()
            h = hvd.allreduce_async_(inplace, op=hvd.Adasum, name=f"d.{seed}")
            assert hvd.synchronize(h) is inplace and torch.equal(inplace, out), what


def check_grouped_and_fused():
    # Tensors fused into one engine allgather keep their own coefficients (per tensor).
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()
    shapes = [(5,), (1,), (4, 3), (17,)]
    inputs = [
        [rank_data(k, 100 + i, s, torch.float32) for i, s in enumerate(shapes)] for k in range(n)
    ]
    outs = hvd.grouped_allreduce(inputs[r], op=hvd.Adasum, name="grouped")
    for i, out in enumerate(outs):
        expected = reference_adasum([inputs[k][i] for k in range(n)])
        assert_close(out, expected, torch.float32, f"grouped tensor {i}")
    with hvd.submitted_together():
        handles = [
            hvd.allreduce_async(t, op=hvd.Adasum, name=f"tog.{i}") for i, t in enumerate(inputs[r])
        ]
    for i, h in enumerate(handles):
        assert torch.equal(hvd.synchronize(h), outs[i])


def check_non_contiguous_inplace():
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()
    inputs = [rank_data(k, 200, (4, 6), torch.float64) for k in range(n)]
    expected = reference_adasum([t.t() for t in inputs])
    view = inputs[r].clone().t()  # not contiguous
    hvd.allreduce_(view, op=hvd.Adasum, name="noncontig")
    assert_close(view, expected, torch.float64, "non-contiguous in place")


def check_zero_and_tiny_vectors():
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()
    groups = rank_groups()
    for case, (zero_ranks, scale) in enumerate(
        [({0}, 1.0), (set(range(n)), 1.0), ({n - 1}, 1.0), (set(), 1e-6)]
    ):
        inputs = [
            torch.zeros(9, device=device(), dtype=torch.float64)
            if k in zero_ranks
            else rank_data(k, 300 + case, (9,), torch.float64) * scale
            for k in range(n)
        ]
        out = hvd.allreduce(inputs[r], op=hvd.Adasum, name=f"zero.{case}")
        expected = reference_adasum(inputs)
        assert_close(out, expected, torch.float64, f"zero case {case}")
        if zero_ranks == set(range(n)):
            assert torch.equal(out, torch.zeros_like(out))
        if scale < 1:  # every squared norm is below 1e-8: every coefficient is 1, a plain sum
            plain = sum(inputs[k].cpu() for k in range(n)) / len(groups[0])
            assert torch.allclose(out.cpu(), plain, rtol=1e-12, atol=0)


def check_known_values():
    # Hand-checkable: orthogonal vectors add; equal vectors give the vector itself.
    if not supported() or len(rank_groups()) != 2 or len(rank_groups()[0]) != 1:
        return
    r = hvd.rank()
    orth = torch.tensor([[3.0, 0.0], [0.0, 4.0]], device=device())[r]
    assert torch.equal(
        hvd.allreduce(orth, op=hvd.Adasum), torch.tensor([3.0, 4.0], device=device())
    )
    same = torch.tensor([1.0, -2.0, 2.0], device=device())
    assert torch.equal(hvd.allreduce(same, op=hvd.Adasum), same)
    opposite = same * (1 if r == 0 else -1)  # a.b = -|a|^2: both coefficients 1.5, sum 0
    assert torch.equal(hvd.allreduce(opposite, op=hvd.Adasum), torch.zeros(3, device=device()))


def check_cuda_grouping_without_a_gpu():
    # The per-node arithmetic CUDA tensors get, driven on CPU rows (4 ranks: 2 nodes x 2; on 2
    # or 3 ranks one node, where Adasum is the average).
    from gradfuse import adasum

    n = hvd.size()
    inputs = [rank_data(k, 500, (6,), torch.float64).cpu() for k in range(n)]
    got = adasum._finish(
        torch.stack(inputs),
        shape=(6,),
        dtype=torch.float64,
        device_type="cuda",
        prescale=2.0,
        postscale=0.5,
        fn="allreduce",
    )
    expected = reference_adasum(inputs, 2.0, 0.5, device_type="cuda")
    assert_close(got.to(device()), expected, torch.float64, "CUDA grouping")
    if hvd.local_size() == n:
        assert torch.allclose(got, torch.stack(inputs).mean(0), rtol=1e-12, atol=1e-15)


def check_scales():
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()
    inputs = [rank_data(k, 400, (11,), torch.float64) for k in range(n)]
    out = hvd.allreduce(inputs[r], op=hvd.Adasum, prescale_factor=0.5, postscale_factor=3.0)
    assert_close(out, reference_adasum(inputs, 0.5, 3.0), torch.float64, "scales")


def check_errors_on_every_rank():
    n, r = hvd.size(), hvd.rank()
    if not supported():
        expect_error(
            NotImplementedError,
            lambda: hvd.allreduce(torch.ones(3, device=device()), op=hvd.Adasum),
            "op=Adasum",
            "power-of-2",
            str(n),
        )
        return
    ints = torch.ones(3, dtype=torch.int32, device=device())
    expect_error(TypeError, lambda: hvd.allreduce(ints, op=hvd.Adasum), "Adasum", "torch.int32")
    # Wrong on one rank only: still an error on every rank, not a hang.
    odd = ints if r == n - 1 else ints.float()
    expect_error(
        RuntimeError, lambda: hvd.allreduce(odd, op=hvd.Adasum, name="bad.dtype"), "bad.dtype"
    )
    shaped = torch.ones((2, 3) if r == n - 1 else (3, 2), device=device())
    expect_error(
        RuntimeError, lambda: hvd.allreduce(shaped, op=hvd.Adasum, name="bad.shape"), "bad.shape"
    )
    # A rank submitting Sum where the others submit Adasum under one name.
    mixed = hvd.Sum if r == n - 1 else hvd.Adasum
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(torch.ones(3, device=device()), op=mixed, name="bad.op"),
        "bad.op",
    )
    x = torch.ones(3, device=device(), requires_grad=True)
    y = hvd.allreduce(x, op=hvd.Adasum, name="nograd")
    expect_error(RuntimeError, lambda: y.sum().backward(), "no gradient for op Adasum")
    expect_error(ValueError, lambda: hvd.allreduce(x, op=17), "Adasum", "17")
    # The engine still works after the failures.
    assert torch.equal(
        hvd.allreduce(torch.ones(2, device=device()), op=hvd.Sum).cpu(), torch.full((2,), float(n))
    )


def check_joined_rank_is_an_error_on_the_others():
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()
    # Rank n-1 joins first (the others' allgather runs only once it has), so another is last.
    if r < n - 1:
        expect_error(
            RuntimeError,
            lambda: hvd.allreduce(torch.ones(3, device=device()), op=hvd.Adasum, name="joined"),
            "has joined",
            f"rank {n - 1}",
        )
    assert hvd.join() in range(n - 1)


# ---- DistributedOptimizer(op=Adasum) --------------------------------------------------------


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        device(), torch.float64
    )


def batch(rank, step):
    g = torch.Generator().manual_seed(7000 + 100 * step + rank)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return x.to(device()), y.to(device())


def local_delta(model, opt_state, make_opt, x, y):
    """One local step of a copy of `model` from `opt_state`: (parameter deltas, new state)."""
    import copy

    clone = copy.deepcopy(model)
    opt = make_opt(clone.parameters())
    opt.load_state_dict(opt_state)
    opt.zero_grad()
    torch.nn.functional.mse_loss(clone(x), y).backward()
    before = [p.detach().clone() for p in clone.parameters()]
    opt.step()
    return [p.detach() - b for p, b in zip(clone.parameters(), before)], opt.state_dict()


def check_optimizer_matches_reference():
    if not supported():
        return
    n, r = hvd.size(), hvd.rank()

    def make_opt(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    model = make_model(0)
    opt = hvd.DistributedOptimizer(
        make_opt(model.parameters()), named_parameters=model.named_parameters(), op=hvd.Adasum
    )
    # The reference: every rank's optimizer state evolves from its own deltas; the shared
    # parameters move by the Adasum of every rank's delta, parameter by parameter.
    ref = make_model(0)
    states = [make_opt(ref.parameters()).state_dict() for _ in range(n)]
    for step in range(4):
        x, y = batch(r, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        deltas = []
        for k in range(n):
            d, states[k] = local_delta(ref, states[k], make_opt, *batch(k, step))
            deltas.append(d)
        with torch.no_grad():
            for i, p in enumerate(ref.parameters()):
                p += reference_adasum([d[i] for d in deltas]).to(p.device).view_as(p)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), (step, name, (p - q).abs().max())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert_same_on_every_rank(flat, "opt.same")


def check_optimizer_accumulates_and_refuses_skip():
    if not supported():
        return
    model = make_model(1)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        named_parameters=model.named_parameters(),
        op=hvd.Adasum,
        backward_passes_per_step=2,
    )
    for step in range(2):
        opt.zero_grad()
        for half in range(2):
            x, y = batch(hvd.rank(), 10 * step + half)
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert_same_on_every_rank(flat, "acc.same")
    expect_error(RuntimeError, opt.skip_synchronize, "Adasum")
    expect_error(
        ValueError,
        lambda: hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            op=hvd.Adasum,
            gradient_predivide_factor=2.0,
        ),
        "gradient_predivide_factor",
    )


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
