"""One rank of the multi-process training tests (DistributedOptimizer, compression, broadcast
helpers). Started N times by gradfuse.run; runs every check named on the command line in one
process group and writes its results with tests/multiproc.py.

The data is scikit-learn's bundled digits set (1,797 8x8 images, no download). Each rank
trains on its shard of every global batch; the reference is the same model trained by one
process on the whole batch, computed locally on every rank.

Device: the model, its optimizer state, every batch and every tensor handed to the engine live
on the test device (multiproc.device(): the CPU, or this rank's GPU with
GRADFUSE_TEST_DEVICE=cuda), and so do the local references, so a comparison measures the
reduction and not a CPU-vs-GPU difference. The data set is loaded on the CPU; each batch moves
to the device (:func:`batch_of`)."""

from __future__ import annotations

import copy
import sys
import warnings

import gradfuse as hvd
import torch
from gradfuse.data import DistributedBatchSampler
from gradfuse.optim import _has_one_pass_kernels
from multiproc import checks_of, device, full, ones, worker_main, zeros
from sklearn.datasets import load_digits

GLOBAL_BATCH = 32


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(y)


def batch_of(x, y, rows):
    """Rows `rows` of the CPU data set (x, y), as a batch on the test device."""
    return x[rows].to(device()), y[rows].to(device())


def make_model(seed=0):
    torch.manual_seed(seed)  # built on the CPU, then moved: the same weights on every device
    # No BatchNorm: batch statistics would differ between a shard and the whole batch. Average
    # pooling, not max: a max switching on a last-bit difference makes the gradient jump, and
    # the comparison would measure that chaos instead of the reduction.
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    ).to(device())


HELD_OUT = 300  # the last 300 images never appear in a training batch


def global_batches(rows, steps, seed=1):
    """`steps` global batches drawn from `rows` (reshuffled on every pass over them)."""
    order = torch.utils.data.RandomSampler(
        rows, generator=torch.Generator().manual_seed(seed), num_samples=steps * GLOBAL_BATCH
    )
    return [
        [rows[i] for i in batch]
        for batch in torch.utils.data.BatchSampler(order, GLOBAL_BATCH, True)
    ]


def optimizer_for(kind, params):
    if kind == "sgd":
        # lr 0.05: at 0.1 (a 1.0 effective step with momentum) one-thread runs sit on a
        # ReLU/pooling discontinuity and 1e-7 summation-order differences grow to 1e-4.
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "sgd_nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return hvd.optim.LARS(params, lr=0.05, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02)


def train(kind, steps, compression=hvd.Compression.none, distributed=True, passes=1):
    """Trains `steps` steps; returns the model. distributed=False is the one-process reference
    on the whole global batch."""
    x, y = digits()
    rows = list(range(len(x) - HELD_OUT))
    model = make_model()
    opt = optimizer_for(kind, model.parameters())
    if distributed:
        opt = hvd.DistributedOptimizer(
            opt,
            named_parameters=model.named_parameters(),
            compression=compression,
            backward_passes_per_step=passes,
        )
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        sampler = DistributedBatchSampler(
            global_batches(rows, steps * passes), hvd.size(), hvd.rank()
        )
    else:
        sampler = global_batches(rows, steps * passes)
    for i, rows in enumerate(sampler):
        xb, yb = batch_of(x, y, rows)
        loss = torch.nn.functional.cross_entropy(model(xb), yb) / passes
        loss.backward()
        if (i + 1) % passes == 0:
            opt.step()
            opt.zero_grad()
    return model


def max_rel_diff(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def held_out_accuracy(model):
    xb, yb = batch_of(*digits(), slice(-HELD_OUT, None))
    with torch.no_grad():
        return (model(xb).argmax(1) == yb).float().mean().item()


# ---- checks ----------------------------------------------------------------------------------


def equivalence(kind):
    dist, ref = train(kind, 50), train(kind, 50, distributed=False)
    diff = max_rel_diff(dist, ref)
    assert diff < 1e-5, f"{kind}: {hvd.size()} ranks differ from one process by {diff:.2e}"
    # And every rank holds the same model.
    mine = torch.cat([p.detach().flatten() for p in dist.parameters()])
    assert torch.equal(hvd.broadcast(mine, 0, name=f"equal.{kind}"), mine)


def check_equivalence_sgd():
    equivalence("sgd")


def check_equivalence_adam():
    equivalence("adam")


def check_equivalence_lars():
    equivalence("lars")


def check_lars_takes_grad_norms_from_the_engine():
    """Behind DistributedOptimizer, LARS's gradient norms are written by the engine as it
    unpacks the reduced gradients (bitwise what sum_squares gives, every rank the same), and the
    one-pass step they feed equals the two-pass op on the same reduced gradients. Two steps, so
    the second uses the weight norms the first update took."""
    x, y = digits()
    model = make_model(seed=3)
    opt = hvd.DistributedOptimizer(
        optimizer_for("lars", model.parameters()), named_parameters=model.named_parameters()
    )
    params = list(model.parameters())
    one_pass = _has_one_pass_kernels(device())  # CPU, and CUDA in a CUDA build
    ref = [p.detach().clone() for p in params]
    ref_bufs = [torch.zeros_like(p) for p in params]
    use = [p.ndim > 1 for p in params]
    for step in range(2):
        rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[
            : 16 * hvd.size()
        ]
        xb, yb = batch_of(x, y, rows.view(hvd.size(), -1)[hvd.rank()])  # differs per rank
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.synchronize()
        slots = opt._norms._grad_slots
        if one_pass:
            got = torch.cat([slots[p] for p in params])
            assert torch.equal(got, hvd.ops.sum_squares([p.grad for p in params]))
            every = hvd.allgather(got.view(1, -1))
            assert all(torch.equal(every[r], got) for r in range(hvd.size()))
        else:
            assert not slots
        grads = [p.grad.clone() for p in params]
        with opt.skip_synchronize():
            opt.step()
        assert not opt._norms._grad_marks  # used once
        hvd.ops.lars_update_(
            ref,
            grads,
            ref_bufs,
            lr=0.05,
            momentum=0.9,
            weight_decay=1e-4,
            trust_coefficient=0.02,
            use_lars=use,
            use_weight_decay=use,
        )
        for p, r in zip(params, ref):
            assert torch.equal(p, r)


def check_backward_passes_per_step():
    dist, ref = train("sgd", 20, passes=2), train("sgd", 20, distributed=False, passes=2)
    assert max_rel_diff(dist, ref) < 1e-5


def reduced_gradients(compression, seed=5):
    """One backward on this rank's own data; returns (reduced grads, exact float64 average)."""
    x, y = digits()
    model = make_model()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        compression=compression,
    )
    rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:64]
    xb, yb = batch_of(x, y, rows.view(hvd.size(), -1)[hvd.rank()])
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    opt.synchronize()
    exact = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for r in range(hvd.size()):  # every rank's gradient, recomputed here in float64
        twin = make_model().double()
        xb, yb = batch_of(x, y, rows.view(hvd.size(), -1)[r])
        torch.nn.functional.cross_entropy(twin(xb.double()), yb).backward()
        for e, p in zip(exact, twin.parameters()):
            e += p.grad / hvd.size()
    return [p.grad for p in model.parameters()], exact


def check_fp16_and_bf16_compression():
    # One step: the reduced gradient is the exact average up to 16-bit rounding (each rank's
    # scaled gradient rounded once, the sum rounded once per addition).
    for compression, unit in ((hvd.Compression.fp16, 2**-11), (hvd.Compression.bf16, 2**-8)):
        grads, exact = reduced_gradients(compression)
        for g, e in zip(grads, exact):
            err = ((g.double() - e).norm() / e.norm()).item()
            assert err < 2 * hvd.size() * unit, f"{compression}: one-step error {err:.2e}"
    # Over 50 steps of momentum SGD those roundings add up; the documented bound on the drift
    # from one-process training is 3% (measured 0.9% fp16 / 0.7% bf16 at 2 ranks, 0.9% / 0.9%
    # at 4).
    ref = train("sgd", 50, distributed=False)
    for compression in (hvd.Compression.fp16, hvd.Compression.bf16):
        diff = max_rel_diff(train("sgd", 50, compression=compression), ref)
        assert diff < 0.03, f"{compression}: {diff:.3e} after 50 steps"


def check_topk_compression_accuracy():
    # Momentum SGD with Compression.topk(0.01) as it comes (momentum correction taken over
    # from the SGD, momentum factor masking, error feedback, no warm-up) reaches within 2
    # points of dense momentum SGD on images it never trained on, after the same 8 epochs
    # (measured at 2 ranks: dense 0.897, top-k 0.903; without momentum correction 0.887).
    steps = 8 * (len(digits()[0]) - HELD_OUT) // GLOBAL_BATCH
    dense = train("sgd", steps)
    sparse = train("sgd", steps, compression=hvd.Compression.topk(0.01))
    a_dense, a_sparse = held_out_accuracy(dense), held_out_accuracy(sparse)
    print(f"held-out accuracy: dense {a_dense:.3f}, top-k 1% {a_sparse:.3f}", flush=True)
    assert a_sparse >= a_dense - 0.02, f"top-k {a_sparse:.3f} vs dense {a_dense:.3f}"


def check_topk_momentum_correction_sent_dense_is_momentum_sgd():
    # Every tensor sent dense (min_numel above them all): momentum correction is linear, so
    # averaging the ranks' velocities and stepping without momentum is momentum SGD on the
    # averaged gradient (nesterov and weight decay included). Applying the momentum twice,
    # or losing the weight decay, would be far off.
    for kind in ("sgd", "sgd_nesterov"):
        ref = train(kind, 20)
        dense = train(kind, 20, compression=hvd.Compression.topk(0.01, min_numel=10**9))
        diff = max_rel_diff(dense, ref)
        assert diff < 1e-5, f"{kind}: {diff:.2e}"


def check_user_compressor():
    # A user's Compressor (Horovod's interface) is applied to each rank's gradient before the
    # allreduce and its decompress to the result: rounding to halves is not linear, so the
    # average of the ranks' rounded gradients differs from the rounded average.
    class RoundToHalves(hvd.compression.Compressor):
        @staticmethod
        def compress(tensor):
            return torch.round(tensor * 2).double(), tensor.dtype

        @staticmethod
        def decompress(tensor, ctx):
            return (tensor / 2).to(ctx)

    class Counting(RoundToHalves):  # an instance, with its own counters
        def __init__(self):
            self.calls = {"compress": 0, "decompress": 0}

        def compress(self, tensor):
            self.calls["compress"] += 1
            return super().compress(tensor)

        def decompress(self, tensor, ctx):
            self.calls["decompress"] += 1
            return super().decompress(tensor, ctx)

    def coefficients(rank):  # the gradient of (w * c).sum() on rank `rank`
        return torch.linspace(-3.3, 2.9, 7) * (rank + 1) + 0.3 * rank

    expected = sum(torch.round(coefficients(r).double() * 2) for r in range(hvd.size()))
    expected = (expected / hvd.size() / 2).float().to(device())
    plain = sum(coefficients(r) for r in range(hvd.size())) / hvd.size()
    assert not torch.allclose(expected.cpu(), plain, atol=1e-3)  # the compressor matters
    for compression, bucket_cap_mb in ((RoundToHalves, 25), (Counting(), 0)):
        w = torch.nn.Parameter(zeros(7))
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD([w], lr=1.0),
            named_parameters=[("w", w)],
            compression=compression,
            bucket_cap_mb=bucket_cap_mb,
        )
        for _ in range(2):
            (w * coefficients(hvd.rank()).to(device())).sum().backward()
            opt.synchronize()
            assert w.grad.dtype == torch.float32
            torch.testing.assert_close(w.grad, expected, rtol=0, atol=1e-6)
            with opt.skip_synchronize():
                opt.step()
            opt.zero_grad()
    assert compression.calls == {"compress": 2, "decompress": 2}


def check_buckets_fuse_each_step():
    xb, yb = batch_of(*digits(), list(range(hvd.rank() * 16, hvd.rank() * 16 + 16)))

    def collectives_per_step(bucket_cap_mb):
        model = make_model()
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05),
            named_parameters=model.named_parameters(),
            bucket_cap_mb=bucket_cap_mb,
        )
        counts = []
        for _ in range(3):
            before = hvd.stats()["collectives"]
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
            counts.append(hvd.stats()["collectives"] - before)
        return model, counts

    bucketed, counts = collectives_per_step(25)
    # The model (6 tensors, 24 KiB) is one bucket, submitted as one group on every rank: it
    # becomes ready everywhere in one negotiation and runs as one fused collective.
    assert counts == [1, 1, 1], counts
    unbucketed, _ = collectives_per_step(0)
    assert max_rel_diff(bucketed, unbucketed) < 1e-6
    try:
        hvd.DistributedOptimizer(torch.optim.SGD(bucketed.parameters(), lr=0.1), bucket_cap_mb=-1)
        raise AssertionError("no ValueError for bucket_cap_mb=-1")
    except ValueError as exc:
        assert "bucket_cap_mb" in str(exc), exc


def check_gradient_as_bucket_view():
    xb, yb = batch_of(*digits(), list(range(hvd.rank() * 16, hvd.rank() * 16 + 16)))

    def run(**options):
        model = make_model()
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            named_parameters=model.named_parameters(),
            **options,
        )
        in_place = []
        for step in range(4):
            before = hvd.stats()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            after = hvd.stats()
            in_place.append(
                (
                    after["in_place"] - before["in_place"],
                    after["collectives"] - before["collectives"],
                )
            )
            if step == 1:
                model.zero_grad()  # sets .grad to None: the next backward makes new tensors
            elif step == 2:
                opt.zero_grad(set_to_none=False)  # the views, zeroed
            else:
                opt.zero_grad()
        return model, opt, in_place

    viewed, opt, in_place = run(gradient_as_bucket_view=True)
    # One bucket, reduced in place every step, including after model.zero_grad() and
    # opt.zero_grad() replaced the gradients (the hook copies them back into the views).
    assert in_place == [(1, 1)] * 4, in_place
    # zero_grad() sets them to None (torch's default, as DDP's bucket views); set_to_none=False
    # gives back the views of one buffer, zeroed.
    assert all(p.grad is None for p in viewed.parameters())
    opt.zero_grad(set_to_none=False)
    grads = [p.grad for p in viewed.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    storages = {g.untyped_storage().data_ptr() for g in grads}
    assert len(storages) == 1, "the gradients are not views of one buffer"
    plain, _, _ = run(bucket_cap_mb=0)
    assert max_rel_diff(viewed, plain) < 1e-6
    try:
        hvd.DistributedOptimizer(
            torch.optim.SGD(viewed.parameters(), lr=0.1),
            compression=hvd.Compression.fp16,
            gradient_as_bucket_view=True,
        )
        raise AssertionError("no ValueError for gradient_as_bucket_view with fp16")
    except ValueError as exc:
        assert "gradient_as_bucket_view" in str(exc), exc


def check_second_gradient_before_step_raises():
    # Without buckets the first gradient is already being reduced; with them it waits in a
    # bucket that layer 1 (unused) never completes. Either way a second one is an error.
    for options in ({"bucket_cap_mb": 0}, {}):
        model = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]).to(device())
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            named_parameters=model.named_parameters(),
            **options,
        )
        model[0](ones(2, 4)).sum().backward()
        try:
            model[0](ones(2, 4)).sum().backward()
            raise AssertionError(f"{options}: no error for a second gradient before step()")
        except RuntimeError as exc:
            assert "more than backward_passes_per_step=1 times" in str(exc), exc
        opt.synchronize()  # every rank reduces what it has; the job goes on
        assert torch.equal(model[1].bias.grad, zeros(4))


def check_unused_parameters_do_not_hang():
    for options in ({}, {"gradient_as_bucket_view": True}):
        model = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]).to(device())
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            named_parameters=model.named_parameters(),
            **options,
        )
        # Rank r only uses layer r % 2: the other layer's gradient never arrives on this rank.
        layer = model[hvd.rank() % 2]
        layer(ones(2, 4)).sum().backward()
        opt.step()
        # Each layer's gradient is the average over ranks of the ones that used it.
        users = (
            [r for r in range(hvd.size()) if r % 2 == 0],
            [r for r in range(hvd.size()) if r % 2 == 1],
        )
        for i, lin in enumerate(model):
            share = len(users[i]) / hvd.size()
            assert torch.allclose(lin.bias.grad, full((4,), 2.0 * share)), (options, i)


def check_errors_and_warnings():
    model = make_model()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    xb, yb = batch_of(*digits(), slice(0, 8))
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    try:
        opt.zero_grad()
        raise AssertionError("zero_grad with reductions in flight did not raise")
    except RuntimeError as exc:
        assert "reductions are in flight" in str(exc)
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert len(caught) == 1 and "skip_synchronize" in str(caught[0].message)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opt.skip_synchronize():
            opt.step()
    assert caught == []
    named = list(model.named_parameters())
    for bad, needle in (
        ([named[0], named[0]] + named[1:], "duplicate names"),
        (named[:2], "have no name"),
    ):
        try:
            hvd.DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=bad
            )
            raise AssertionError(f"no ValueError for {needle}")
        except ValueError as exc:
            assert needle in str(exc), exc


def check_grad_scaler_skips_on_every_rank():
    model = make_model()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    hvd.broadcast_parameters(model.state_dict(), 0)
    scaler = torch.amp.GradScaler(device().type, init_scale=256.0)
    xb, yb = batch_of(*digits(), slice(0, 8))
    before = copy.deepcopy(model.state_dict())

    def overflow(grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad

    # One rank's gradient overflows during backward: a tensor hook runs before the gradient is
    # accumulated and submitted (writing it after backward would race with its reduction).
    if hvd.rank() == hvd.size() - 1:
        next(model.parameters()).register_hook(overflow)
    scaler.scale(torch.nn.functional.cross_entropy(model(xb), yb)).backward()
    opt.synchronize()
    with opt.skip_synchronize():
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 128.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} moved although a rank overflowed"


def check_user_compressor_errors():
    # A user's compressor returning something that is not a gradient raises, on every rank
    # (each compresses its own gradient), and the ranks go on in step.
    class WrongShape(hvd.compression.Compressor):
        @staticmethod
        def compress(tensor):
            return tensor, None

        @staticmethod
        def decompress(tensor, ctx):
            return tensor.view(-1)[:2]

    class NotATensor(WrongShape):
        @staticmethod
        def compress(tensor):
            return tensor.tolist(), None

    w = torch.nn.Parameter(ones(3, 4))
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD([w], lr=0.1), named_parameters=[("w", w)], compression=WrongShape
    )
    (w * (hvd.rank() + 1)).sum().backward()
    try:
        opt.synchronize()
        raise AssertionError("no ValueError for a decompressed tensor of the wrong shape")
    except ValueError as exc:
        assert "must return a tensor of the gradient's shape [3, 4] for allreduce.w" in str(exc)
    v = torch.nn.Parameter(ones(3, 4))  # w's optimizer would reduce w again
    hvd.DistributedOptimizer(
        torch.optim.SGD([v], lr=0.1), named_parameters=[("w", v)], compression=NotATensor
    )
    try:
        v.sum().backward()
        raise AssertionError("no TypeError for a compress that returns a list")
    except TypeError as exc:
        assert "compress must return (tensor, ctx), got a list for allreduce.w" in str(exc)


def check_state_dict_round_trip():
    model = make_model()
    topk = hvd.Compression.topk(0.1, min_numel=64)  # one object, two optimizers
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=topk,
    )
    xb, yb = batch_of(*digits(), slice(0, 8))
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    opt.step()
    state = opt.state_dict()
    assert state["gradfuse"]["topk"]["memory"], "the top-k residuals are part of the state"
    assert state["param_groups"][0]["momentum"] == 0.9  # restored after the step
    opt2 = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=topk,
    )
    assert opt2._gf_topk.memory == {} and opt2._gf_topk.step == 0  # its own state
    opt2.load_state_dict(state)
    assert opt2._gf_topk.step == 1
    mine, theirs = opt._gf_topk.memory, opt2._gf_topk.memory
    assert mine.keys() == theirs.keys()
    for p in mine:
        assert {"residual", "momentum"} <= mine[p].keys() or p.numel() < 64
        for key in mine[p]:
            assert torch.equal(theirs[p][key], mine[p][key]), key


OPTIMIZERS = [
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
]


def on_cpu(state):
    """An optimizer state_dict with its tensors copied to the CPU, to travel by broadcast_object
    (a pickled CUDA tensor would come back on the sender's GPU, which need not be this rank's)."""
    return {
        "param_groups": state["param_groups"],
        "state": {
            pid: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            for pid, entry in state["state"].items()
        },
    }


def check_broadcast_optimizer_state_for_every_optimizer():
    xb, yb = batch_of(*digits(), slice(0, 16))
    for name in OPTIMIZERS:
        model = make_model()
        kwargs = {"lr": 0.01 * (hvd.rank() + 1)}
        if name == "SGD":
            kwargs["momentum"] = 0.9
        opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
        if hvd.rank() == 0:  # only the root has stepped: the others have no state yet
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        mine = opt.state_dict()
        root = hvd.broadcast_object(on_cpu(mine), 0, name=f"state.{name}")
        assert mine["param_groups"] == root["param_groups"], name
        params = list(model.parameters())  # state_dict's ids are positions in this order
        for pid, entry in root["state"].items():
            for key, value in entry.items():
                got = mine["state"][pid][key]
                assert type(got) is type(value), (name, key, type(got), type(value))
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got.cpu(), value), (name, key)
                    # The state travels through the CPU; per-parameter buffers (momentum,
                    # running averages) must land on their parameter's device. (Scalars such
                    # as step counts stay where torch's load_state_dict puts them.)
                    if got.shape == params[pid].shape:
                        assert got.device == params[pid].device, (name, key, got.device)
                else:
                    assert got == value, (name, key)


def check_object_collectives():
    # CPU only whatever the device under test: objects travel pickled, as CPU byte tensors.
    obj = {"rank": hvd.rank(), "payload": list(range(hvd.rank() * 3))}
    assert hvd.broadcast_object(obj, 1, name="bo") == {"rank": 1, "payload": [0, 1, 2]}
    gathered = hvd.allgather_object(obj, name="ao")
    assert [g["rank"] for g in gathered] == list(range(hvd.size()))
    assert gathered[2]["payload"] == [0, 1, 2, 3, 4, 5] if hvd.size() > 2 else True


CHECKS = checks_of(globals())
# Checks that need a second rank: meaningless at 1 rank (GRADFUSE_TEST_RANKS=1), which skips
# them. object_collectives broadcasts from rank 1; broadcast_optimizer_state_... sends rank 0's
# state to ranks that have none, and at 1 rank would compare rank 0's state with itself. (The
# others still test something at 1 rank: grad_scaler_... then overflows on the only rank, and
# unused_parameters_... sends zeros for the layer it never used.)
NEEDS_TWO_RANKS = {"broadcast_optimizer_state_for_every_optimizer", "object_collectives"}


def deterministic_cuda():
    """On a GPU, float32 matmuls and convolutions round as float32 (TF32's 10-bit mantissa is
    far outside the comparisons' 1e-5) and cuDNN picks deterministic algorithms, so the
    distributed run and the local reference differ by summation order only, as on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    if device().type == "cuda":
        deterministic_cuda()
    worker_main(CHECKS, sys.argv[1:])
