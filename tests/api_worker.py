"""One rank of tests/test_horovod_api.py: Horovod's build queries, HorovodInternalError, the
node layout the launcher reports, and broadcast_optimizer_state across torch's optimizers.
Device-parametric (multiproc.device()): models and optimizer state live on the test device."""

from __future__ import annotations

import json
import os
import sys

import gradfuse as hvd
import torch
import torch.distributed as dist
from gradfuse import _engine
from multiproc import checks_of, device, ones, worker_main

# ---- build queries and errors -----------------------------------------------------------------


def check_build_queries():
    assert hvd.mpi_built() is False and hvd.mpi_enabled() is False
    try:
        hvd.mpi_threads_supported()
        raise AssertionError("mpi_threads_supported() answered without MPI")
    except ValueError as e:
        assert "MPI is not enabled" in str(e), str(e)
    assert hvd.gloo_built() is True and hvd.gloo_enabled() is True
    assert hvd.cuda_built() is hvd.build_info()["cuda"]
    nccl = hvd.nccl_built()
    assert type(nccl) is int
    assert (nccl > 0) == (hvd.cuda_built() and dist.is_nccl_available()), nccl
    assert hvd.ccl_built() is False and hvd.ddl_built() is False
    assert hvd.rocm_built() is (hvd.cuda_built() and torch.version.hip is not None)
    assert hvd.is_homogeneous() is True


def check_layout_under_gradfuse_run():
    # gradfuse.run: LOCAL_RANK / LOCAL_WORLD_SIZE on one host, no GROUP_RANK: one node.
    assert (hvd.local_rank(), hvd.local_size()) == (hvd.rank(), hvd.size())
    assert (hvd.cross_rank(), hvd.cross_size()) == (0, 1)


def expect_error(kind, fn):
    try:
        fn()
    except kind as e:
        return e
    raise AssertionError(f"no {kind.__name__}")


def check_mismatch_is_internal_error():
    # Shapes differ between ranks: every rank's synchronize raises HorovodInternalError, which
    # is a RuntimeError; the engine goes on.
    e = expect_error(
        hvd.HorovodInternalError, lambda: hvd.allreduce(ones(hvd.rank() + 1), name="mismatch")
    )
    assert isinstance(e, RuntimeError) and "mismatch" in str(e), str(e)
    out = hvd.allreduce(ones(2), name="after.mismatch", op=hvd.Sum)
    assert torch.equal(out.cpu(), torch.full((2,), float(hvd.size())))


def check_usage_errors_keep_their_types():
    e = expect_error(ValueError, lambda: hvd.allreduce(ones(2), op=17))
    assert not isinstance(e, hvd.HorovodInternalError)
    with hvd.submitted_together():
        e = expect_error(RuntimeError, lambda: hvd.allreduce(ones(2), name="held"))
    assert not isinstance(e, hvd.HorovodInternalError), e
    bad_root = expect_error(ValueError, lambda: hvd.broadcast(ones(1), root_rank=99))
    assert "root_rank" in str(bad_root)


def check_dead_peer_is_internal_error():
    # Last check of its group. Rank 1 writes its results and vanishes; rank 0's next
    # collective fails with HorovodInternalError naming it (within GRADFUSE_TIMEOUT).
    names = sys.argv[1:]
    hvd.allreduce(ones(1), name="before.death")
    if hvd.rank() == 1:
        with open(f"{os.environ['WORKER_RESULTS']}.rank1.json", "w") as f:
            json.dump(dict.fromkeys(names, "ok"), f)  # every earlier check passed to get here
        os._exit(0)
    for step in range(10000):
        try:
            hvd.allreduce(ones(1), name=f"after.death.{step}")
        except hvd.HorovodInternalError as e:
            assert "rank 1" in str(e), str(e)
            break
    else:
        raise AssertionError("no HorovodInternalError after rank 1 died")
    e = expect_error(hvd.HorovodInternalError, lambda: hvd.allreduce(ones(1), name="later"))
    assert "rank 1" in str(e), str(e)  # submitting to the stopped engine: the same error


# ---- broadcast_optimizer_state ------------------------------------------------------------------


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(
        device()
    )
    g = torch.Generator().manual_seed(100 + hvd.rank())  # data differs per rank
    x = torch.randn(8, 6, generator=g).to(device())
    return model, x


def two_groups(model, lr):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "lr": lr / 2}]


def make_optimizer(name, model, lr):
    kwargs = {"SGD": {"momentum": 0.9}, "RMSprop": {"momentum": 0.5, "centered": True}}
    cls = getattr(torch.optim, name)
    if name == "LBFGS":  # one param group only
        return cls(model.parameters(), lr=lr, history_size=3, max_iter=4)
    return cls(two_groups(model, lr), lr=lr, **kwargs.get(name, {}))


def train(opt, model, x, steps):
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        if isinstance(opt, torch.optim.LBFGS):
            opt.step(closure)
        else:
            closure()
            opt.step()


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def assert_same(got, want, where):
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want), (where, got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), (where, got.keys(), want.keys())
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def assert_root_state(opt, label, root_rank=0):
    mine = to_cpu(opt.state_dict())
    root = hvd.broadcast_object(mine, root_rank, name=f"root.state.{label}")
    assert_same(mine, root, label)


OPTIMIZERS = [
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "ASGD",
    "NAdam",
    "RAdam",
    "Rprop",
    "LBFGS",
]


def check_optimizer_state_root_stepped_others_not():
    for name in OPTIMIZERS:
        model, x = model_and_batch()
        opt = make_optimizer(name, model, lr=0.01 * (hvd.rank() + 1))
        if hvd.rank() == 0:
            train(opt, model, x, steps=2)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        assert_root_state(opt, name)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        train(opt, model, x, steps=1)  # the loaded state works on every rank


def check_optimizer_state_every_rank_stepped_differently():
    root = hvd.size() - 1
    for name in OPTIMIZERS:
        model, x = model_and_batch(seed=hvd.rank())
        opt = make_optimizer(name, model, lr=0.02)
        train(opt, model, x, steps=1 + hvd.rank())
        hvd.broadcast_optimizer_state(opt, root_rank=root)
        assert_root_state(opt, f"{name}.from{root}", root_rank=root)


def check_optimizer_state_root_without_state():
    model, x = model_and_batch()
    opt = make_optimizer("Adam", model, lr=0.01)
    if hvd.rank() != 0:
        train(opt, model, x, steps=1)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.state_dict()["state"] == {}
    assert_root_state(opt, "fresh.root")


def check_optimizer_state_sparse_adam():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True).to(device())
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.01 * (hvd.rank() + 1))
    if hvd.rank() == 0:
        emb(torch.tensor([1, 3, 3], device=device())).sum().backward()
        opt.step()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert_root_state(opt, "SparseAdam")


def check_optimizer_state_tensor_hyperparameters():
    model, x = model_and_batch()
    lr = torch.tensor(0.01 * (hvd.rank() + 1), device=device())
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99 - 0.01 * hvd.rank()))
    if hvd.rank() == 0:
        train(opt, model, x, steps=1)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert_root_state(opt, "tensor.lr")
    got = opt.param_groups[0]["lr"]
    assert isinstance(got, torch.Tensor) and got.device == device(), got
    assert got.item() == torch.tensor(0.01).item() and opt.param_groups[0]["betas"] == (0.9, 0.99)
    train(opt, model, x, steps=1)


def check_optimizer_state_distributed_optimizer():
    model, x = model_and_batch()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.topk(0.2, min_numel=4),
    )
    train(opt, model, x, steps=1)  # every rank steps: the reductions pair up
    if hvd.rank() == 0:  # as if the root had restored a checkpoint
        opt._gf_topk.step = 7
        for group in opt.param_groups:
            group["lr"] = 0.05
    # Each rank's own unsent gradient and velocity (DGC's local accumulation).
    memory = {p: {k: v.clone() for k, v in s.items()} for p, s in opt._gf_topk.memory.items()}
    assert any("residual" in s for s in memory.values()), "top-k compression keeps residuals"
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt._gf_topk.step == 7
    assert all(group["lr"] == 0.05 for group in opt.param_groups)
    base = to_cpu(opt._gf_base.state_dict(opt))
    assert_same(base, hvd.broadcast_object(base, 0, name="root.base"), "wrapped state")
    for p, s in opt._gf_topk.memory.items():  # each rank keeps its own
        assert s.keys() == memory[p].keys()
        assert all(torch.equal(v, memory[p][k]) for k, v in s.items())


def check_optimizer_state_layout_mismatch_raises_everywhere():
    model, _ = model_and_batch()
    params = list(model.parameters())
    if hvd.rank() == 1:
        params = params[:-1]  # one parameter short
    opt = torch.optim.SGD(params, lr=0.1)
    e = expect_error(ValueError, lambda: hvd.broadcast_optimizer_state(opt, root_rank=0))
    assert "differ from the root's" in str(e) and "rank 1: 1 param group(s)" in str(e), str(e)
    assert "rank 0" not in str(e).split("Root rank 0")[1], str(e)


def check_optimizer_state_bad_arguments():
    model, _ = model_and_batch()
    e = expect_error(TypeError, lambda: hvd.broadcast_optimizer_state(model, root_rank=0))
    assert "torch.optim.Optimizer" in str(e)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    e = expect_error(ValueError, lambda: hvd.broadcast_optimizer_state(opt, root_rank=hvd.size()))
    assert "root_rank" in str(e)


# ---- node layout from the launcher (started with tests/test_horovod_api.py's spawn) ----------


def check_torchrun_two_nodes_on_one_host():
    # 4 ranks, GROUP_RANK = rank // 2, LOCAL_RANK = rank % 2: two torchrun nodes on one host.
    r = hvd.rank()
    assert (hvd.local_rank(), hvd.local_size()) == (r % 2, 2)
    assert (hvd.cross_rank(), hvd.cross_size()) == (r // 2, 2)
    assert hvd.is_homogeneous()
    groups = _engine._state.groups  # the hierarchy follows the same layout
    assert dist.get_process_group_ranks(groups["local"]) == [r - r % 2, r - r % 2 + 1]
    assert dist.get_process_group_ranks(groups["cross"]) == [r % 2, r % 2 + 2]
    x = torch.arange(7, dtype=torch.float64, device=device()) * (r + 1)
    out = hvd.allreduce(x, op=hvd.Sum, name="hierarchical")
    want = torch.arange(7, dtype=torch.float64) * sum(range(1, hvd.size() + 1))
    assert torch.equal(out.cpu(), want), out


CHECKS = checks_of(globals())


def expect_init_error():
    """For a layout the launcher reports inconsistently: init() raises ValueError on this rank
    (as on every other); the message is the result."""
    rank = int(os.environ["RANK"])
    try:
        hvd.init()
        outcome = "init() succeeded"
    except ValueError as e:
        outcome = "ValueError: " + str(e)
    with open(f"{os.environ['WORKER_RESULTS']}.rank{rank}.json", "w") as f:
        json.dump({"init": outcome}, f)


if __name__ == "__main__":
    if sys.argv[1:] == ["--expect-init-error"]:
        expect_init_error()
    else:
        worker_main(CHECKS, sys.argv[1:])
