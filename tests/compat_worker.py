"""One rank of tests/test_horovod_compat.py: broadcast_parameters in every form Horovod takes
(and its refusals), and DistributedOptimizer(groups=/num_groups=), Horovod's explicit buckets.
Device-parametric (multiproc.device()); values differ per rank."""

from __future__ import annotations

import sys
import warnings

import gradfuse as hvd
import numpy as np
import torch
from multiproc import checks_of, device, worker_main

# ---- broadcast_parameters --------------------------------------------------------------------


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).to(device())


def assert_model_is(model, want):
    for (name, got), (_, ref) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(got, ref), (name, got, ref)


def root():
    return hvd.size() - 1  # not rank 0, so a broadcast from 0 by mistake shows


def trained_once(seed):
    """A model that rank `seed` would have: its initial values, and BatchNorm's running
    statistics after one forward pass on its data (buffers differ per rank too)."""
    model = make_model(seed)
    g = torch.Generator().manual_seed(100 + seed)
    model(torch.randn(6, 4, generator=g).to(device()))
    return model


def check_broadcast_parameters_state_dict():
    model = trained_once(seed=hvd.rank())
    hvd.broadcast_parameters(model.state_dict(), root_rank=root())
    assert_model_is(model, trained_once(seed=root()))
    assert all(p.is_leaf and p.requires_grad for p in model.parameters())


def check_broadcast_parameters_named_pairs():
    model = make_model(seed=hvd.rank())
    hvd.broadcast_parameters(list(model.named_parameters()), root_rank=root())
    assert_model_is(model, make_model(seed=root()))


def check_broadcast_parameters_bare_tensors():
    # Horovod's list(model.parameters()), and (gradfuse only) the generator itself and a tuple.
    for form in (list, lambda params: params, tuple):
        model = make_model(seed=hvd.rank())
        hvd.broadcast_parameters(form(model.parameters()), root_rank=root())
        assert_model_is(model, make_model(seed=root()))
        assert all(p.is_leaf and p.requires_grad for p in model.parameters())


def check_broadcast_parameters_pairs_and_tensors_mixed():
    a = torch.full((3,), float(hvd.rank()), device=device())
    b = torch.full((2, 2), 10.0 + hvd.rank(), device=device())
    c = torch.full((1,), 20.0 + hvd.rank(), device=device())
    hvd.broadcast_parameters([("a", a), b, (None, c)], root_rank=root())
    assert torch.equal(a.cpu(), torch.full((3,), float(root())))
    assert torch.equal(b.cpu(), torch.full((2, 2), 10.0 + root()))
    assert torch.equal(c.cpu(), torch.full((1,), 20.0 + root()))


def check_broadcast_parameters_integer_roots():
    # Horovod's binding takes any integer: numpy's, a 0-dim integer tensor.
    for r in (np.int64(root()), torch.tensor(root())):
        t = torch.full((4,), float(hvd.rank()), device=device())
        hvd.broadcast_parameters({"t": t}, root_rank=r)
        assert torch.equal(t.cpu(), torch.full((4,), float(root())))


def expect_error(kind, fn, *words):
    try:
        fn()
    except kind as e:
        for word in words:
            assert word in str(e), (word, str(e))
        return e
    raise AssertionError(f"no {kind.__name__} (expected one mentioning {words})")


def check_broadcast_parameters_refusals_submit_nothing():
    mine = torch.full((3,), float(hvd.rank()), device=device())
    model = make_model(seed=0)
    bp = hvd.broadcast_parameters
    expect_error(TypeError, lambda: bp(mine, 0), "params must be", "got a Tensor")
    expect_error(TypeError, lambda: bp(7, 0), "params must be", "int")
    expect_error(TypeError, lambda: bp(model, 0), "params[0]", "Linear")
    expect_error(TypeError, lambda: bp([mine, 5], 0), "params[1]", "int")
    expect_error(TypeError, lambda: bp([(1, mine)], 0), "params[0]", "name")
    expect_error(TypeError, lambda: bp({"w": mine, "n": 3}, 0), "params['n']", "int")
    expect_error(ValueError, lambda: bp([("w", mine), ("w", mine.clone())], 0), "'w'", "twice")
    sparse = torch.zeros(4, device=device()).to_sparse()
    expect_error(ValueError, lambda: bp([mine, sparse], 0), "dense")
    expect_error(ValueError, lambda: bp([mine, torch.ones(1).expand(3)], 0), "share memory")
    expect_error(TypeError, lambda: bp([mine], True), "root_rank")
    expect_error(TypeError, lambda: bp([mine], 1.0), "root_rank")
    expect_error(ValueError, lambda: bp([mine], hvd.size()), "root_rank")
    expect_error(ValueError, lambda: bp([mine], -1), "root_rank")
    # Every refusal came before anything was sent: `mine` (first in most lists) kept its value.
    hvd.barrier()
    assert torch.equal(mine.cpu(), torch.full((3,), float(hvd.rank())))
    hvd.broadcast_parameters([mine], root_rank=0)  # the same names work afterwards
    assert torch.equal(mine.cpu(), torch.zeros(3))


def check_broadcast_parameters_empty():
    hvd.broadcast_parameters({}, root_rank=0)
    hvd.broadcast_parameters([], root_rank=0)


# ---- DistributedOptimizer(groups=...) ---------------------------------------------------------


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).to(device())  # fmt: skip


def batch(step):
    g = torch.Generator().manual_seed(1000 * step + hvd.rank())  # data differs per rank
    return torch.randn(5, 6, generator=g).to(device())


def train(model, opt, steps=3, first=0):
    for step in range(first, first + steps):
        opt.zero_grad()
        model(batch(step)).square().mean().backward()
        opt.step()


def trained_reference(steps=3):
    """The same model trained with default buckets: groups change only what is submitted
    together, never the result."""
    model = mlp()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    train(model, opt, steps)
    return model


def assert_close(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), (name, (p - q).abs().max())


def check_groups_lists_are_the_buckets():
    model = mlp()
    w1, b1, w2, b2, w3, b3 = model.parameters()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        groups=[[w1, b3], (w2,)],
    )
    assert opt._gf_buckets == [(w1, b3), (w2,)], opt._gf_buckets
    assert set(opt._gf_order[3:]) == {b1, b2, w3}  # the rest are reduced one by one
    opt.zero_grad()
    model(batch(0)).square().mean().backward()
    # Every gradient came: each group went when its last one did, the rest one by one.
    assert set(opt._gf_pending) == set(model.parameters()) and not opt._gf_waiting
    opt.step()
    train(model, opt, steps=2, first=1)
    assert_close(model, trained_reference())


def check_groups_count_splits_like_horovod():
    model = mlp()
    params = list(model.parameters())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), groups=4)
    # Horovod's split_list: 6 parameters in 4 groups of 2, 2, 1, 1, in param_groups order.
    want = [tuple(params[0:2]), tuple(params[2:4]), (params[4],), (params[5],)]
    assert opt._gf_buckets == want, opt._gf_buckets
    train(model, opt)
    assert_close(model, trained_reference())
    # More groups than parameters: one each, no empty bucket.
    many = hvd.DistributedOptimizer(torch.optim.SGD(mlp().parameters(), lr=0.1), groups=9)
    assert [len(b) for b in many._gf_buckets] == [1] * 6


def check_num_groups_is_deprecated_groups():
    model = mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            named_parameters=model.named_parameters(),
            num_groups=3,
        )
    assert any(issubclass(w.category, DeprecationWarning) for w in caught), caught
    assert [len(b) for b in opt._gf_buckets] == [2, 2, 2]
    train(model, opt)
    assert_close(model, trained_reference())


def check_group_waits_for_its_last_gradient():
    # Rank 0 uses the whole model; the others skip its last layer, so their group
    # [first layer's weight, last layer's weight] is incomplete after backward and goes in
    # synchronize() (with a zero gradient), as the default buckets do.
    model = mlp()
    w1, _, _, _, w3, _ = model.parameters()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        groups=[[w1, w3]],
    )
    for step in range(2):
        opt.zero_grad()
        x = batch(step)
        out = model(x) if hvd.rank() == 0 else model[:4](x)
        out.square().mean().backward()
        if hvd.rank() != 0:
            assert w1 not in opt._gf_pending and opt._gf_waiting == {0: {w1}}, opt._gf_waiting
        opt.step()
    # The last layer's gradient is rank 0's alone, averaged over all ranks.
    reference = mlp()
    for step in range(2):
        reference.zero_grad()
        x = batch(step)
        out = reference(x) if hvd.rank() == 0 else reference[:4](x)
        out.square().mean().backward()
        for i, p in enumerate(reference.parameters()):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.data -= 0.1 * hvd.allreduce(grad, name=f"ref.{step}.{i}", op=hvd.Average)
    assert_close(model, reference)


def check_groups_other_tensors_and_generators():
    # Horovod ignores tensors of groups this optimizer does not train (frozen parameters,
    # another model's); gradfuse also reads a generator as a group.
    model = mlp()
    model[0].bias.requires_grad_(False)
    w1, b1, w2, b2, w3, b3 = model.parameters()
    stranger = torch.zeros(3, device=device())
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        groups=[[w1, b1, stranger], model[2].parameters()],
    )
    assert opt._gf_buckets == [(w1,), (w2, b2)], opt._gf_buckets
    assert opt._gf_order[3:] == [w3, b3]  # reduced one by one; b1 and stranger not at all


def check_groups_refusals():
    model = mlp()
    w1, b1, w2, *_ = model.parameters()

    def make(**kwargs):
        return hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)

    expect_error(ValueError, lambda: make(groups=[[w1, b1], [w2, w1]]), "groups[1][1]", "[0][0]")
    expect_error(ValueError, lambda: make(groups=[[w1, "b1"]]), "groups[0][1]", "str")
    expect_error(ValueError, lambda: make(groups=[w1, b1]), "groups[0] is a Parameter")
    expect_error(ValueError, lambda: make(groups=0), "groups must be", "0")
    expect_error(ValueError, lambda: make(groups=-2), "groups must be")
    expect_error(ValueError, lambda: make(groups=True), "groups must be")
    expect_error(ValueError, lambda: make(groups="all"), "groups must be")
    expect_error(ValueError, lambda: make(num_groups=-1), "num_groups")
    expect_error(ValueError, lambda: make(num_groups=2.0), "num_groups")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        expect_error(ValueError, lambda: make(num_groups=2, groups=[[w1]]), "not both")
    expect_error(ValueError, lambda: make(groups=2, bucket_cap_mb=5), "bucket_cap_mb")
    topk = hvd.Compression.topk(0.5)
    expect_error(ValueError, lambda: make(groups=2, compression=topk), "topk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(groups=2, op=hvd.Adasum)
    assert any("ignores groups" in str(w.message) for w in caught), caught


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
