"""One rank of the multi-process training tests (DistributedOptimizer, compression, broadcast
helpers). Started N times by gradfuse.run; runs every check named on the command line in one
process group and writes {check: "ok" | traceback} to $GRADFUSE_TEST_OUT.rank<r>.json.

The data is scikit-learn's bundled digits set (1,797 8x8 images, no download). Each rank
trains on its shard of every global batch; the reference is the same model trained by one
process on the whole batch, computed locally on every rank."""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
import warnings

import gradfuse as hvd
import torch
from gradfuse.data import DistributedBatchSampler
from sklearn.datasets import load_digits

GLOBAL_BATCH = 32


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(y)


def make_model(seed=0):
    torch.manual_seed(seed)
    # No BatchNorm: batch statistics would differ between a shard and the whole batch.
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 10),
    )


def global_batches(n, steps, seed=1):
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(
            range(n),
            generator=torch.Generator().manual_seed(seed),
            num_samples=steps * GLOBAL_BATCH,
        ),
        GLOBAL_BATCH,
        True,
    )
    return sampler


def optimizer_for(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return hvd.optim.LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4)


def train(kind, steps, compression=hvd.Compression.none, distributed=True, passes=1):
    """Trains `steps` steps; returns the model. distributed=False is the one-process reference
    on the whole global batch."""
    x, y = digits()
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
            global_batches(len(x), steps * passes), hvd.size(), hvd.rank()
        )
    else:
        sampler = global_batches(len(x), steps * passes)
    for i, batch in enumerate(sampler):
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch]) / passes
        loss.backward()
        if (i + 1) % passes == 0:
            opt.step()
            opt.zero_grad()
    return model


def max_rel_diff(a, b):
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a.parameters(), b.parameters()))


def accuracy(model, held_out):
    x, y = digits()
    with torch.no_grad():
        return (model(x[held_out]).argmax(1) == y[held_out]).float().mean().item()


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


def check_backward_passes_per_step():
    dist, ref = train("sgd", 20, passes=2), train("sgd", 20, distributed=False, passes=2)
    assert max_rel_diff(dist, ref) < 1e-5


def check_fp16_and_bf16_compression():
    ref = train("sgd", 50, distributed=False)
    # Documented tolerance: 16-bit gradients over 50 steps stay within 1% (fp16) / 5% (bf16).
    for compression, tol in ((hvd.Compression.fp16, 1e-2), (hvd.Compression.bf16, 5e-2)):
        diff = max_rel_diff(train("sgd", 50, compression=compression), ref)
        assert diff < tol, f"{compression}: {diff:.3e}"


def check_topk_compression_accuracy():
    # 1% density with error feedback reaches within 2 points of dense training.
    x, _ = digits()
    held_out = torch.arange(len(x))[-300:]
    steps = 300
    dense = train("sgd", steps)
    sparse = train(
        "sgd", steps, compression=hvd.Compression.topk(0.01, warmup_steps=50, min_numel=64)
    )
    a_dense, a_sparse = accuracy(dense, held_out), accuracy(sparse, held_out)
    assert a_sparse >= a_dense - 0.02, f"top-k {a_sparse:.3f} vs dense {a_dense:.3f}"


def check_unused_parameters_do_not_hang():
    model = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    # Rank r only uses layer r % 2: the other layer's gradient never arrives on this rank.
    layer = model[hvd.rank() % 2]
    layer(torch.ones(2, 4)).sum().backward()
    opt.step()
    for p in model.parameters():
        assert p.grad is not None


def check_errors_and_warnings():
    model = make_model()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    x, y = digits()
    torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
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
    torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
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
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = digits()
    before = copy.deepcopy(model.state_dict())
    scaler.scale(torch.nn.functional.cross_entropy(model(x[:8]), y[:8])).backward()
    if hvd.rank() == hvd.size() - 1:  # one rank's gradient overflows
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    opt.synchronize()
    with opt.skip_synchronize():
        scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 128.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} moved although a rank overflowed"


def check_state_dict_round_trip():
    model = train("sgd", 3)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.topk(0.1, min_numel=64),
    )
    x, y = digits()
    torch.nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    opt.step()
    state = opt.state_dict()
    assert state["gradfuse"]["topk"], "the top-k residuals are part of the state"
    opt2 = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.topk(0.1, min_numel=64),
    )
    opt2.load_state_dict(state)
    assert opt2._gf_step == 1
    for p in opt2._gf_topk_state:
        assert torch.equal(opt2._gf_topk_state[p]["residual"], opt._gf_topk_state[p]["residual"])


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


def check_broadcast_optimizer_state_for_every_optimizer():
    x, y = digits()
    for name in OPTIMIZERS:
        model = make_model()
        kwargs = {"lr": 0.01 * (hvd.rank() + 1)}
        if name == "SGD":
            kwargs["momentum"] = 0.9
        opt = getattr(torch.optim, name)(model.parameters(), **kwargs)
        if hvd.rank() == 0:  # only the root has stepped: the others have no state yet
            torch.nn.functional.cross_entropy(model(x[:16]), y[:16]).backward()
            opt.step()
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        mine = opt.state_dict()
        root = hvd.broadcast_object(mine, 0, name=f"state.{name}")
        assert mine["param_groups"] == root["param_groups"], name
        for pid, entry in root["state"].items():
            for key, value in entry.items():
                got = mine["state"][pid][key]
                assert type(got) is type(value), (name, key, type(got), type(value))
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got, value), (name, key)
                else:
                    assert got == value, (name, key)


def check_object_collectives():
    obj = {"rank": hvd.rank(), "payload": list(range(hvd.rank() * 3))}
    assert hvd.broadcast_object(obj, 1, name="bo") == {"rank": 1, "payload": [0, 1, 2]}
    gathered = hvd.allgather_object(obj, name="ao")
    assert [g["rank"] for g in gathered] == list(range(hvd.size()))
    assert gathered[2]["payload"] == [0, 1, 2, 3, 4, 5] if hvd.size() > 2 else True


def main(checks):
    hvd.init()
    results = {}
    for name in checks:
        try:
            globals()[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001  (every failure is reported with its traceback)
            results[name] = traceback.format_exc()
    with open(f"{os.environ['GRADFUSE_TEST_OUT']}.rank{hvd.rank()}.json", "w") as f:
        json.dump(results, f)
    hvd.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
