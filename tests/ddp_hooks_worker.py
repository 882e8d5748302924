"""One rank of the gradfuse.ddp tests (tests/test_ddp_hooks.py): real torch DDP models with
gradfuse's comm hooks, compared with DDP's own hooks and with no hook. The process group is
torch's (Gloo on the CPU, NCCL on a GPU); gradfuse.init() is never called.

Model and data are training_worker's (the digits CNN); each rank trains on its own shard."""

from __future__ import annotations

import copy
import os
import sys

import gradfuse
import gradfuse.ddp as gddp
import torch
import torch.distributed as dist
from multiproc import checks_of, device, torch_distributed_worker_main
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP
from training_worker import (
    GLOBAL_BATCH,
    HELD_OUT,
    batch_of,
    digits,
    global_batches,
    held_out_accuracy,
    make_model,
)


def ddp(module, bucket_cap_mb=0.005):
    ids = [device().index] if device().type == "cuda" else None
    # Small buckets: every model has several, and DDP rebuilds them after the first iteration.
    return DDP(module, device_ids=ids, bucket_cap_mb=bucket_cap_mb)


def my_batches(steps, seed=1):
    """This rank's shard of `steps` global batches of the training rows."""
    x, y = digits()
    rows = list(range(len(x) - HELD_OUT))
    size, rank = dist.get_world_size(), dist.get_rank()
    for batch in global_batches(rows, steps, seed):
        yield batch_of(x, y, batch[rank::size])


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def every_rank(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def assert_same_on_every_rank(t, what):
    for r, theirs in enumerate(every_rank(t)):
        assert torch.equal(theirs, t), f"{what}: rank {r} differs from rank {dist.get_rank()}"


def backward(model, xb, yb, scale=1.0):
    model.zero_grad()
    (torch.nn.functional.cross_entropy(model(xb), yb) * scale).backward()


# ---- fp16 / bf16 -----------------------------------------------------------------------------


def matches_torch_hook(theirs, wire, eps):
    """Our hook's averaged gradients against DDP's own on the same batches: within one
    rounding of each rank's term (|g_r| / ws) per element; bit for bit where every term is a
    normal 16-bit number and the world size is a power of two (dividing by it is then exact,
    so rounding before or after it is the same)."""
    size = dist.get_world_size()
    pow2 = size & (size - 1) == 0
    tiny = torch.finfo(wire).tiny
    local = make_model()
    a, b = ddp(make_model()), ddp(make_model())
    a.register_comm_hook(gddp.CastState(), getattr(gddp, f"{wire_name(wire)}_hook"))
    b.register_comm_hook(None, theirs)
    for xb, yb in my_batches(4):
        backward(a, xb, yb)
        backward(b, xb, yb)
        backward(local, xb, yb)
        for ga, gb, gl in zip(grads(a), grads(b), grads(local)):
            terms = torch.stack(every_rank(gl)).abs() / size
            # Per term, ours rounds once and torch's twice (3 eps); then both round at each of
            # the size - 1 additions (2 eps each); below the normal range a rounding is off by
            # up to one subnormal step (2 * eps * tiny).
            bound = (1 + 2 * size) * eps * terms.sum(0) + 4 * size * eps * tiny
            diff = (ga - gb).abs()
            assert (diff <= bound).all(), f"differs by {(diff - bound).max():.3g} past the bound"
            if pow2:
                normal = ((terms >= tiny) | (terms == 0)).all(0)
                assert torch.equal(ga[normal], gb[normal]), "not bitwise where both are exact"
            assert_same_on_every_rank(ga, "fp16 hook gradient")


def wire_name(dtype):
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def check_fp16_matches_ddp_fp16_compress_hook():
    matches_torch_hook(default_hooks.fp16_compress_hook, torch.float16, 2**-11)


def torch_bf16_hook(state, bucket):
    """DDP's bf16_compress_hook under another name: register_comm_hook refuses that name
    without NCCL, though Gloo reduces bfloat16 (gradfuse's bf16_hook works on both)."""
    return default_hooks.bf16_compress_hook(state, bucket)


def check_bf16_matches_ddp_bf16_compress_hook():
    matches_torch_hook(torch_bf16_hook, torch.bfloat16, 2**-8)


def scaled_linear_grad(model, per_rank):
    """One backward of a 1x4 linear layer whose gradient is `per_rank[rank]` (every
    element); returns the averaged gradient."""
    x = torch.full((1, 4), per_rank[dist.get_rank()], device=device())
    model.zero_grad()
    model(x).sum().backward()
    return model.module.weight.grad


def check_fp16_scale_before_rounding_and_overflow_flag():
    """Gradients above fp16's 65504 whose average fits: torch's hook overflows (it rounds
    before dividing), ours does not; an average that does not fit sets found_inf on every
    rank, counted once, and the next backward clears it."""
    size = dist.get_world_size()
    big = [70000.0 if r == 0 else 1000.0 for r in range(size)]
    mean = sum(big) / size

    def linear():
        torch.manual_seed(0)
        return ddp(torch.nn.Linear(4, 1, bias=False).to(device()))

    theirs = linear()
    theirs.register_comm_hook(None, default_hooks.fp16_compress_hook)
    assert torch.isinf(scaled_linear_grad(theirs, big)).all(), "torch's hook no longer overflows"

    ours, state = linear(), gddp.CastState()
    ours.register_comm_hook(state, gddp.fp16_hook)
    g = scaled_linear_grad(ours, big)
    assert torch.isfinite(g).all() and ((g - mean).abs() <= mean * 2**-9).all(), g
    assert state.found_inf.item() == 0 and state.overflow_count == 0

    huge = [65504.0 * size * 2] * size  # the average itself overflows fp16
    assert torch.isinf(scaled_linear_grad(ours, huge)).all()
    assert state.found_inf.item() == 1 and state.overflow_count == 1
    assert_same_on_every_rank(state.found_inf, "found_inf")
    scaled_linear_grad(ours, big)
    assert state.found_inf.item() == 0 and state.overflow_count == 1


# ---- top-k -----------------------------------------------------------------------------------


def topk_setup(module, sampled=False):
    model = ddp(module)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    compression = gradfuse.Compression.topk(0.02, warmup_steps=10, sampled=sampled, min_numel=64)
    state = gddp.TopKHookState(model, compression, opt)
    model.register_comm_hook(state, gddp.topk_hook)
    return model, opt, state


def topk_steps(model, opt, state, batches):
    for xb, yb in batches:
        backward(model, xb, yb)
        with state.optimizer_step():
            opt.step()


def topk_ranks_identical(sampled):
    model, opt, state = topk_setup(make_model(), sampled)
    topk_steps(model, opt, state, my_batches(30))
    assert state.step == 30
    params = flat_params(model)
    assert torch.isfinite(params).all()
    assert_same_on_every_rank(params, f"top-k (sampled={sampled}) parameters after 30 steps")
    assert not torch.equal(params, flat_params(make_model())), "the model did not train"


def check_topk_exact_ranks_identical():
    topk_ranks_identical(sampled=False)


def check_topk_sampled_ranks_identical():
    topk_ranks_identical(sampled=True)


def check_topk_checkpoint_round_trip():
    """Saved halfway (mid warm-up: the step count matters) and loaded into a fresh model,
    optimizer and state, training goes on exactly as without the break. A fresh DDP lays its
    buckets out anew, which the state (kept per parameter) does not see."""
    batches = list(my_batches(16, seed=5))
    model, opt, state = topk_setup(make_model())
    topk_steps(model, opt, state, batches[:8])
    saved = copy.deepcopy(
        {"model": model.module.state_dict(), "opt": opt.state_dict(), "topk": state.state_dict()}
    )
    assert saved["topk"]["topk"]["memory"], "no residuals saved"
    topk_steps(model, opt, state, batches[8:])

    fresh = make_model(seed=9)
    fresh.load_state_dict(saved["model"])
    model2, opt2, state2 = topk_setup(fresh)
    opt2.load_state_dict(saved["opt"])
    state2.load_state_dict(saved["topk"])
    assert state2.step == 8
    topk_steps(model2, opt2, state2, batches[8:])
    p1, p2 = flat_params(model), flat_params(model2)
    # Two ranks add in one order whatever the buckets; more may sum the dense part's
    # elements in an order that depends on their place in the bucket.
    if dist.get_world_size() == 2:
        assert torch.equal(p1, p2), f"differs by {(p1 - p2).abs().max():.3g}"
    else:
        torch.testing.assert_close(p2, p1, rtol=1e-5, atol=1e-6)


def train_for_accuracy(hook, state_of, steps, bucket_cap_mb=0.005):
    model = ddp(make_model(), bucket_cap_mb)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = state_of(model, opt) if state_of else None
    if hook is not None:
        model.register_comm_hook(state, hook)
    stepping = state.optimizer_step if isinstance(state, gddp.TopKHookState) else None
    for xb, yb in my_batches(steps):
        backward(model, xb, yb)
        if stepping:
            with stepping():
                opt.step()
        else:
            opt.step()
    return held_out_accuracy(model.module)


# Held-out accuracy, absolute, on 300 digits (12 images): the runs differ by about this much
# from one batch order to the next, compressed or not.
ACCURACY_MARGIN = 0.04


def check_topk_accuracy_vs_powersgd_and_dense():
    """On a learnable task, 1%-dense top-k with momentum correction (taken over from the SGD;
    no warm-up) reaches the held-out accuracy of uncompressed DDP and of DDP's PowerSGD hook
    (rank 1, error feedback) after the same 8 epochs, within ACCURACY_MARGIN. Measured at 2
    ranks: dense 0.897, PowerSGD 0.897, top-k 0.893 (other batch orders: dense 0.897 /
    0.880, top-k 0.870 / 0.883)."""
    steps = 8 * (len(digits()[0]) - HELD_OUT) // GLOBAL_BATCH
    dense = train_for_accuracy(None, None, steps)
    power = train_for_accuracy(
        powerSGD_hook.powerSGD_hook,
        lambda m, o: powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2
        ),
        steps,
        # One bucket: PowerSGD launches collectives from its futures' callbacks, which Gloo's
        # threads run in whatever order the buckets finish, different on each rank.
        bucket_cap_mb=25,
    )
    topk = train_for_accuracy(
        gddp.topk_hook,
        lambda m, o: gddp.TopKHookState(m, gradfuse.Compression.topk(0.01), o),
        steps,
    )
    report = f"held-out accuracy: dense {dense:.3f}, PowerSGD {power:.3f}, top-k 1% {topk:.3f}"
    print(report, flush=True)
    assert dense > 0.85, f"the task was not learned: {report}"
    assert topk >= dense - ACCURACY_MARGIN and topk >= power - ACCURACY_MARGIN, report


# ---- hierarchical ----------------------------------------------------------------------------


def expected_nodes():
    size = dist.get_world_size()
    k = int(os.environ.get("GRADFUSE_TEST_LOCAL_SIZE", "0")) or size
    return [list(range(s, s + k)) for s in range(0, size, k)]


def check_hierarchical_equals_flat_allreduce():
    """Integers exactly (lengths that do not divide by the node size: padding), and DDP
    gradients to float tolerance, against a flat allreduce / DDP without a hook."""
    state = gddp.HierarchicalState()
    assert state.nodes == expected_nodes(), state.nodes
    assert state.local_group.size() == len(state.nodes[0])
    assert state.cross_group.size() == len(state.nodes)
    rank = dist.get_rank()
    for n in (1, 7, 1000):
        for dtype in (torch.int64, torch.int32, torch.float64):
            t = (torch.arange(n, device=device()) * (rank + 3) - 5 * rank).to(dtype)
            flat = t.clone()
            dist.all_reduce(flat)
            got = gddp.hierarchical_allreduce(t, state).wait()
            assert got is t and torch.equal(t, flat), (n, dtype)

    a, b = ddp(make_model()), ddp(make_model())
    a.register_comm_hook(state, gddp.hierarchical_hook)
    for xb, yb in my_batches(3):
        backward(a, xb, yb)
        backward(b, xb, yb)
        for ga, gb in zip(grads(a), grads(b)):
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
            assert_same_on_every_rank(ga, "hierarchical gradient")


# ---- bad input -------------------------------------------------------------------------------


def expect_error(kind, text, fn):
    try:
        fn()
    except kind as e:
        assert text in str(e), f"wrong message: {e}"
        return
    raise AssertionError(f"no {kind.__name__} ({text!r})")


def backward_once(hook, state):
    model = ddp(make_model())
    model.register_comm_hook(state, hook)
    xb, yb = next(my_batches(1))
    backward(model, xb, yb)


def check_bad_input_raises_clearly():
    """Every rank raises the same clear error, before any collective (so none hangs)."""
    for hook in (gddp.fp16_hook, gddp.topk_hook, gddp.hierarchical_hook):
        expect_error(
            TypeError,
            "must be a gradfuse.ddp.",
            lambda hook=hook: backward_once(hook, dist.group.WORLD),
        )
    # A group with no transport for the bucket's device (made collectively, every rank).
    other = "cpu" if device().type == "cuda" else "cuda"
    elsewhere = dist.new_group(backend=f"{other}:gloo")
    expect_error(
        ValueError,
        f"no transport for {device().type} tensors",
        lambda: backward_once(gddp.fp16_hook, gddp.CastState(elsewhere)),
    )
    expect_error(TypeError, "ProcessGroup or None", lambda: gddp.CastState("nccl"))
    expect_error(
        TypeError,
        "Compression.topk(ratio, ...)",
        lambda: gddp.TopKHookState(make_model(), gradfuse.Compression.fp16),
    )
    ratio = 0.01 * (1 + dist.get_rank())
    expect_error(
        ValueError,
        "must be the same on every rank, got rank 0: ('Compression.topk(ratio=0.01",
        lambda: gddp.TopKHookState(make_model(), gradfuse.Compression.topk(ratio)),
    )
    first = dist.new_group([0])  # on the other ranks: GroupMember.NON_GROUP_MEMBER
    text = "must span every rank" if dist.get_rank() == 0 else "not a member of process_group"
    expect_error(ValueError, text, lambda: gddp.HierarchicalState(first))
    # SGD momentum taken over but optimizer.step() not inside state.optimizer_step().
    model, opt, state = topk_setup(make_model())
    batches = my_batches(2)
    xb, yb = next(batches)
    backward(model, xb, yb)
    opt.step()
    expect_error(
        RuntimeError,
        "inside `with state.optimizer_step():`",
        lambda: backward(model, *next(batches)),
    )
    # A checkpoint from another model.
    small = gddp.TopKHookState(torch.nn.Linear(2, 2), gradfuse.Compression.topk(0.1))
    expect_error(
        ValueError, "saved from another model", lambda: small.load_state_dict(state.state_dict())
    )


def check_hierarchical_uneven_nodes_raise_everywhere():
    """3 ranks as nodes of 2: every rank raises, before making any group."""
    os.environ["GRADFUSE_TEST_LOCAL_SIZE"] = "2"
    try:
        expect_error(ValueError, "must divide the job size 3", gddp.HierarchicalState)
    finally:
        del os.environ["GRADFUSE_TEST_LOCAL_SIZE"]


CHECKS = checks_of(globals())

if __name__ == "__main__":
    backend = "nccl" if device().type == "cuda" else "gloo"
    torch_distributed_worker_main(CHECKS, sys.argv[1:], backend)
