"""One rank of the multi-process process-set tests (tests/test_process_sets.py): every
collective on subsets of the ranks, sets running side by side, a stall in one set, misuse.
Started N times; runs the checks named on the command line and writes {check: "ok" |
traceback} per rank (tests/multiproc.py).

init() is called with process_sets=[INIT_SET]: ranks [0, n-1] on 3+ ranks, [1] on 2 ranks (the
only multi-rank set of 2 ranks is the global one). Every rank's data differs; expected values
are computed locally by regenerating the members' inputs from the same seeds."""

from __future__ import annotations

import os
import sys
import time

import gradfuse as hvd
import torch
from engine_worker import close, data, expect_error, reference
from multiproc import checks_of, device, ones, run_checks, tensor

DTYPES = [torch.int32, torch.float32, torch.float64]
OPS = [hvd.Sum, hvd.Average, hvd.Min, hvd.Max, hvd.Product]


def init_set_ranks(n):
    return [0, n - 1] if n > 2 else [1]


INIT_SET = None  # the ProcessSet given to init(); set by main()


def get_or_add(ranks, added):
    """The registered set with these ranks: INIT_SET, or one added now (appended to `added`,
    for the caller to remove). Every rank calls it with the same ranks, in the same order."""
    wanted = ranks.ranks if isinstance(ranks, hvd.ProcessSet) else sorted(ranks)
    if wanted == INIT_SET.ranks:
        return INIT_SET
    added.append(hvd.add_process_set(ranks))
    return added[-1]


def subsets():
    """Non-global sets to run collectives on: the one from init(), a singleton added here, and
    on 3+ ranks a pair that overlaps the init set (rank 1 and the last)."""
    n = hvd.size()
    added = []
    sets = [INIT_SET, get_or_add([0], added)]
    if n > 2:
        sets.append(get_or_add(hvd.ProcessSet([n - 1, 1]), added))
    return sets, added


def sync_all(tag):
    """Every rank meets on the global set (the checks leave no rank behind)."""
    hvd.allreduce(ones(1), name=f"sync.{tag}", op=hvd.Sum)


# ---- registration and queries ----------------------------------------------------------------


def check_init_process_sets():
    n, r = hvd.size(), hvd.rank()
    g = hvd.global_process_set
    assert g.process_set_id == 0 and g.ranks == list(range(n)), g
    assert (g.size(), g.rank(), g.included()) == (n, r, True)
    ps = INIT_SET
    assert ps.process_set_id == 1 and ps.ranks == init_set_ranks(n), ps
    assert ps.size() == len(ps.ranks)
    assert ps.included() == (r in ps.ranks)
    if r in ps.ranks:
        assert ps.rank() == ps.ranks.index(r)
    else:
        expect_error(ValueError, ps.rank, f"rank {r} is not a member")
    assert str(ps) == f"ProcessSet(process_set_id=1, ranks={ps.ranks}, mpi_comm=None)"
    assert repr(ps) == str(ps)
    fresh = hvd.ProcessSet([2, 0, 1])
    assert fresh.ranks == [0, 1, 2] and fresh.process_set_id is None
    assert (fresh.size(), fresh.rank()) == (None, None)
    expect_error(ValueError, lambda: hvd.ProcessSet([0, "1"]), "list of ints")
    expect_error(ValueError, lambda: hvd.ProcessSet(3), "list of ints")
    expect_error(ValueError, lambda: hvd.ProcessSet([1, 1]), "repeat")
    for name in ("ProcessSet", "add_process_set", "remove_process_set", "global_process_set"):
        assert name in hvd.__all__, name


# ---- every collective on a subset ------------------------------------------------------------


def _allreduce_family(ps, members, me, seed):
    for dtype in DTYPES:
        for op in OPS:
            seed += 1
            small = op == hvd.Product
            expected = reference(op, [data(k, seed, (5,), dtype, small) for k in members])
            mine = data(me, seed, (5,), dtype, small)
            close(hvd.allreduce(mine, name=f"ar.{seed}", op=op, process_set=ps), expected, dtype)
            h = hvd.allreduce_async(mine, name=f"ara.{seed}", op=op, process_set=ps)
            close(hvd.synchronize(h), expected, dtype)
            inplace = mine.clone()
            hvd.allreduce_(inplace, name=f"ar_.{seed}", op=op, process_set=ps)
            close(inplace, expected, dtype)
            inplace = mine.clone()
            hvd.synchronize(hvd.allreduce_async_(inplace, op=op, process_set=ps))
            close(inplace, expected, dtype)
    # Unnamed, grouped, scaled: Average divides by the set's size.
    seed += 1
    tensors = [data(me, seed + i, (3, i + 1), torch.float64) for i in range(3)]
    expected = [
        reference(hvd.Average, [data(k, seed + i, (3, i + 1), torch.float64) for k in members])
        for i in range(3)
    ]
    for out, exp in zip(hvd.grouped_allreduce(tensors, process_set=ps), expected):
        close(out, exp, torch.float64)
    outs = hvd.synchronize(hvd.grouped_allreduce_async(tensors, op=hvd.Sum, process_set=ps))
    for out, exp in zip(outs, expected):
        close(out, exp * len(members), torch.float64)
    out = hvd.allreduce(
        tensors[0], op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5, process_set=ps
    )
    close(out, expected[0] * len(members), torch.float64)
    return seed + 3


def _gather_and_broadcast(ps, members, me, seed):
    # allgather: rank k contributes k+1 rows; members' rows in set order.
    seed += 1
    rows = {k: data(k, seed, (k + 1, 2), torch.float32) for k in members}
    expected = torch.cat([rows[k] for k in members])
    assert torch.equal(hvd.allgather(rows[me], process_set=ps), expected)
    assert torch.equal(hvd.synchronize(hvd.allgather_async(rows[me], process_set=ps)), expected)
    # broadcast from every member (root_rank is a global rank).
    for root in members:
        seed += 1
        mine, root_value = data(me, seed, (4,), torch.int64), data(root, seed, (4,), torch.int64)
        assert torch.equal(hvd.broadcast(mine, root, process_set=ps), root_value)
        assert torch.equal(mine, data(me, seed, (4,), torch.int64)), "broadcast changed its input"
        h = hvd.broadcast_async(mine, root, process_set=ps)
        assert torch.equal(hvd.synchronize(h), root_value)
        t = mine.clone()
        hvd.broadcast_(t, root, name=f"b_.{seed}", process_set=ps)
        assert torch.equal(t, root_value)
        t = mine.clone()
        hvd.synchronize(hvd.broadcast_async_(t, root, process_set=ps))
        assert torch.equal(t, root_value)
    return seed


def _scatter_alltoall_barrier_join(ps, members, me, seed):
    k, i = len(members), members.index(me)
    # reducescatter: 7 rows split over the set, the first 7 % k ranks one row more.
    seed += 1
    for op in (hvd.Sum, hvd.Average):
        full_result = reference(op, [data(m, seed, (7, 2), torch.float64) for m in members])
        counts = [7 // k + (1 if j < 7 % k else 0) for j in range(k)]
        start = sum(counts[:i])
        expected = full_result[start : start + counts[i]]
        mine = data(me, seed, (7, 2), torch.float64)
        close(hvd.reducescatter(mine, op=op, process_set=ps), expected, torch.float64)
        h = hvd.reducescatter_async(mine, None, op, ps)  # Horovod's positional order
        close(hvd.synchronize(h), expected, torch.float64)
        out = hvd.reducescatter(mine, None, None, op, ps, 0.5, 3.0)
        close(out, expected * 1.5, torch.float64)
    # alltoall: set rank a sends (a + b) % 2 + 1 rows to set rank b.
    seed += 1

    def sent(a):
        splits = [(a + b) % 2 + 1 for b in range(k)]
        return data(members[a], seed, (sum(splits), 3), torch.float32), splits

    mine, splits = sent(i)
    chunks, received = [], []
    for a in range(k):
        t, s = sent(a)
        chunks.append(t[sum(s[:i]) : sum(s[: i + 1])])
        received.append(s[i])
    out, got = hvd.alltoall(mine, splits, process_set=ps)
    assert torch.equal(out, torch.cat(chunks)) and got.tolist() == received, (out, got)
    out, got = hvd.synchronize(hvd.alltoall_async(mine, splits, process_set=ps))
    assert torch.equal(out, torch.cat(chunks)) and got.tolist() == received
    even = data(me, seed, (2 * k, 1), torch.float32)
    expected = torch.cat(
        [data(m, seed, (2 * k, 1), torch.float32)[2 * i : 2 * i + 2] for m in members]
    )
    assert torch.equal(hvd.alltoall(even, process_set=ps), expected)
    hvd.barrier(process_set=ps)
    assert hvd.join(process_set=ps) in members
    return seed


def check_every_collective_on_subsets():
    me = hvd.rank()
    sets, added = subsets()
    seed = 0
    for ps in sets:
        if ps.included():
            seed = _allreduce_family(ps, ps.ranks, me, 1000 * ps.process_set_id)
            seed = _gather_and_broadcast(ps, ps.ranks, me, seed)
            _scatter_alltoall_barrier_join(ps, ps.ranks, me, seed)
            assert hvd.stats(process_set=ps)["tensors"] > 0
    sync_all("every_collective")
    for ps in added:
        assert hvd.remove_process_set(ps)


def check_sets_run_concurrently():
    """Every rank submits to every set it is in (and the global one) before waiting for any,
    in an order that differs between ranks; inside submitted_together too."""
    n, me = hvd.size(), hvd.rank()
    sets, added = subsets()
    sets = [hvd.global_process_set, *sets]
    mine = [ps for ps in sets if ps.included()]
    if me % 2:
        mine.reverse()
    for round_ in range(2):
        seed = 5000 + 100 * round_
        if round_:
            with hvd.submitted_together():
                handles = [
                    (
                        ps,
                        hvd.allreduce_async(
                            data(me, seed, (6,), torch.float64), op=hvd.Sum, process_set=ps
                        ),
                    )
                    for ps in mine
                ]
        else:
            handles = [
                (
                    ps,
                    hvd.allreduce_async(
                        data(me, seed, (6,), torch.float64), op=hvd.Sum, process_set=ps
                    ),
                )
                for ps in mine
            ]
        for ps, h in handles:
            expected = reference(hvd.Sum, [data(k, seed, (6,), torch.float64) for k in ps.ranks])
            close(hvd.synchronize(h), expected, torch.float64)
    assert n == hvd.size()
    for ps in added:
        assert hvd.remove_process_set(ps)


def check_helpers_on_a_set():
    me = hvd.rank()
    ps = INIT_SET
    if ps.included():
        root = ps.ranks[-1]
        got = hvd.broadcast_object({"from": me}, root_rank=root, process_set=ps)
        assert got == {"from": root}, got
        assert hvd.allgather_object(me * 10, process_set=ps) == [k * 10 for k in ps.ranks]
        params = {"w": torch.full((3,), float(me)), "b": torch.tensor([me])}
        hvd.broadcast_parameters(params, root_rank=root, process_set=ps)
        assert torch.equal(params["w"], torch.full((3,), float(root)))
        assert params["b"].item() == root
    sync_all("helpers")


# ---- DistributedOptimizer on a set ----------------------------------------------------------


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2).double()


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(
        8, 2, generator=g, dtype=torch.float64
    )


def _grads(model, rank, step):
    model.zero_grad()
    x, y = _batch(rank, step)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def check_distributed_optimizer_on_a_set():
    """The set's members start from its root's parameters and step on the gradient averaged
    over the set; a rank outside it keeps its own parameters and steps on its own gradients."""
    me = hvd.rank()
    ps = INIT_SET
    model = _model(seed=me)  # differs per rank
    start = {k: v.clone() for k, v in model.state_dict().items()}
    if ps.included():
        hvd.broadcast_parameters(model.state_dict(), root_rank=ps.ranks[0], process_set=ps)
        start = {k: v.clone() for k, v in _model(seed=ps.ranks[0]).state_dict().items()}
        assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        process_set=ps,
    )
    if ps.included():
        hvd.broadcast_optimizer_state(opt, root_rank=ps.ranks[0], process_set=ps)
    reference_model = _model(seed=0)
    reference_model.load_state_dict(start)
    contributors = ps.ranks if ps.included() else [me]
    for step in range(3):
        per_rank = [_grads(reference_model, k, step) for k in contributors]
        with torch.no_grad():
            for i, p in enumerate(reference_model.parameters()):
                p -= 0.1 * sum(g[i] for g in per_rank) / len(contributors)
        opt.zero_grad()
        x, y = _batch(me, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.allclose(p, q, atol=1e-12), (p, q)
    if ps.included():  # the members hold identical parameters
        for p in model.parameters():
            gathered = hvd.allgather(p.detach().reshape(1, -1), process_set=ps)
            assert all(torch.equal(row, gathered[0]) for row in gathered)
    sync_all("optimizer")


# ---- grouped collectives, sparse allreduce and Adasum on a subset ----------------------------

SCALES = {"prescale_factor": 0.5, "postscale_factor": 3.0}  # 1.5 in all
SHAPES = [(5,), (3, 2), (7, 2)]


def _closes(outs, expected):
    assert len(outs) == len(expected), (len(outs), len(expected))
    for out, exp in zip(outs, expected):
        close(out, exp, torch.float64)


def _grouped_allreduce_on(ps, me, seed):
    """Every grouped allreduce form (unnamed, named, in place, Horovod's positional order),
    Sum and Average (divided by the set's size), scaled; and its gradient over the set."""
    for op in (hvd.Sum, hvd.Average):
        seed += 10
        mine = [data(me, seed + i, s, torch.float64) for i, s in enumerate(SHAPES)]
        expected = [
            reference(op, [data(k, seed + i, s, torch.float64) for k in ps.ranks]) * 1.5
            for i, s in enumerate(SHAPES)
        ]
        _closes(hvd.grouped_allreduce(mine, op=op, process_set=ps, **SCALES), expected)
        h = hvd.grouped_allreduce_async(mine, None, f"gar.{seed}", op, 0.5, 3.0, ps)
        _closes(hvd.synchronize(h), expected)
        inplace = [t.clone() for t in mine]
        outs = hvd.grouped_allreduce_(inplace, op=op, process_set=ps, **SCALES)
        assert all(a is b for a, b in zip(outs, inplace))
        _closes(inplace, expected)
        inplace = [t.clone() for t in mine]
        hvd.synchronize(hvd.grouped_allreduce_async_(inplace, op=op, process_set=ps, **SCALES))
        _closes(inplace, expected)
        # Gradient: the weights' reduction over the set with the same op and scales.
        xs = [t.clone().requires_grad_() for t in mine]
        ys = hvd.grouped_allreduce(xs, op=op, process_set=ps, **SCALES)
        sum(
            (data(me, seed + 5 + i, y.shape, torch.float64) * y).sum() for i, y in enumerate(ys)
        ).backward()
        _closes(
            [x.grad for x in xs],
            [
                reference(op, [data(k, seed + 5 + i, s, torch.float64) for k in ps.ranks]) * 1.5
                for i, s in enumerate(SHAPES)
            ],
        )
    return seed


def _grouped_allgather_on(ps, me, seed):
    """Rank k contributes k + 1 + i rows to tensor i; blocks in set order. The gradient is the
    set's weights averaged, this rank's rows."""
    seed += 10
    rows = {
        k: [data(k, seed + i, (k + 1 + i, 2), torch.float64) for i in range(3)] for k in ps.ranks
    }
    expected = [torch.cat([rows[k][i] for k in ps.ranks]) for i in range(3)]
    _closes(hvd.grouped_allgather(rows[me], process_set=ps), expected)
    _closes(hvd.synchronize(hvd.grouped_allgather_async(rows[me], f"gag.{seed}", ps)), expected)
    xs = [t.clone().requires_grad_() for t in rows[me]]
    ys = hvd.grouped_allgather(xs, process_set=ps)
    sum(
        (data(me, seed + 5 + i, y.shape, torch.float64) * y).sum() for i, y in enumerate(ys)
    ).backward()
    start = sum(k + 1 for k in ps.ranks[: ps.rank()])
    for i, x in enumerate(xs):
        w = reference(
            hvd.Average, [data(k, seed + 5 + i, ys[i].shape, torch.float64) for k in ps.ranks]
        )
        close(x.grad, w[start + i * ps.rank() : start + i * ps.rank() + me + 1 + i], torch.float64)
    return seed


def _grouped_reducescatter_on(ps, me, seed):
    """7 and 4 rows split over the set (the first dim0 % size ranks one row more); the
    gradient is the members' weights allgathered, times the scales (and the set's size for
    Sum)."""
    k, j = len(ps.ranks), ps.rank()

    def rows_of(n):
        counts = [n // k + (1 if r < n % k else 0) for r in range(k)]
        return counts, sum(counts[:j])

    dims = [7, 4]
    for op in (hvd.Sum, hvd.Average):
        seed += 10
        mine = [data(me, seed + i, (n, 2), torch.float64) for i, n in enumerate(dims)]
        expected = []
        for i, n in enumerate(dims):
            full = reference(op, [data(m, seed + i, (n, 2), torch.float64) for m in ps.ranks])
            counts, start = rows_of(n)
            expected.append(full[start : start + counts[j]] * 1.5)
        _closes(hvd.grouped_reducescatter(mine, None, None, op, ps, 0.5, 3.0), expected)
        h = hvd.grouped_reducescatter_async(mine, f"grs.{seed}", op, ps, 0.5, 3.0)
        _closes(hvd.synchronize(h), expected)
        xs = [t.clone().requires_grad_() for t in mine]
        ys = hvd.grouped_reducescatter(xs, op=op, process_set=ps, **SCALES)
        # Each member's weights for its own rows of each output.
        weights = {
            m: [
                data(m, seed + 5 + i, (rows_of(n)[0][a], 2), torch.float64)
                for i, n in enumerate(dims)
            ]
            for a, m in enumerate(ps.ranks)
        }
        sum((w * y).sum() for w, y in zip(weights[me], ys)).backward()
        factor = 1.5 * (k if op == hvd.Sum else 1)
        _closes(
            [x.grad for x in xs],
            [torch.cat([weights[m][i] for m in ps.ranks]) * factor for i in range(len(dims))],
        )
    return seed


def _sparse_on(ps, me, seed):
    """Each member's nonzero rows differ; the result (coalesced) is the members' dense sum,
    divided by the set's size for Average. Horovod's positional order: (tensor, name, op,
    process_set)."""
    seed += 10

    def sparse_of(k):
        rows = torch.tensor([[k % 6, (k + 2) % 6]])
        return torch.sparse_coo_tensor(rows, data(k, seed, (2, 3), torch.float64), (6, 3))

    dense_sum = sum(sparse_of(k).to_dense() for k in ps.ranks)
    for op, expected in ((hvd.Sum, dense_sum), (hvd.Average, dense_sum / len(ps.ranks))):
        handle = hvd.sparse_allreduce_async(sparse_of(me), f"sp.{seed}.{op}", op, ps)
        close(handle().coalesce().to_dense(), expected, torch.float64)
        out = hvd.synchronize(hvd.sparse_allreduce_async(sparse_of(me), op=op, process_set=ps))
        assert out.is_sparse and out.shape == (6, 3)
        close(out.to_dense(), expected, torch.float64)
    return seed


def check_grouped_and_sparse_on_subsets():
    me = hvd.rank()
    sets, added = subsets()
    for ps in sets:
        if ps.included():
            seed = 20000 + 1000 * ps.process_set_id
            seed = _grouped_allreduce_on(ps, me, seed)
            seed = _grouped_allgather_on(ps, me, seed)
            seed = _grouped_reducescatter_on(ps, me, seed)
            _sparse_on(ps, me, seed)
    sync_all("grouped_and_sparse")
    for ps in added:
        assert hvd.remove_process_set(ps)


def _adasum_refused_on(ps):
    """On a member of `ps`: every allreduce form with op=Adasum raises NotImplementedError."""
    t = ones(4)
    kw = {"op": hvd.Adasum, "process_set": ps}
    calls = {
        "allreduce": lambda: hvd.allreduce(t, **kw),
        "allreduce_async": lambda: hvd.allreduce_async(t, **kw),
        "allreduce_": lambda: hvd.allreduce_(t, name="ada_", **kw),
        "allreduce_async_": lambda: hvd.allreduce_async_(t, **kw),
        "grouped_allreduce": lambda: hvd.grouped_allreduce([t], **kw),
        "grouped_allreduce_async": lambda: hvd.grouped_allreduce_async([t, t], name="gada", **kw),
        "grouped_allreduce_": lambda: hvd.grouped_allreduce_([t], **kw),
        "grouped_allreduce_async_": lambda: hvd.grouped_allreduce_async_([t], **kw),
    }
    for fn, call in calls.items():
        try:
            expect_error(NotImplementedError, call, "Adasum", "global process set")
        except AssertionError as e:
            raise AssertionError(f"{fn} on {ps}: {e}") from None


def _adasum_optimizer(ps):
    model = torch.nn.Linear(2, 1)
    return hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum, process_set=ps
    )


def check_adasum_on_a_set_raises():
    """op=Adasum on a set other than the global one: NotImplementedError on every member, at
    the call (nothing submitted); DistributedOptimizer refuses it on every rank."""
    sets, added = subsets()
    before = hvd._C.engine_handle_count()
    for ps in sets:
        expect_error(
            NotImplementedError, lambda ps=ps: _adasum_optimizer(ps), "Adasum", "global process set"
        )
        if ps.included():
            _adasum_refused_on(ps)
    assert hvd._C.engine_handle_count() == before, "a refused call left a handle behind"
    # The sets still work after the refusals (nothing half-submitted is left waiting).
    for ps in sets:
        if ps.included():
            out = hvd.grouped_allreduce([ones(2)], op=hvd.Sum, process_set=ps)
            assert torch.equal(out[0], ones(2) * len(ps.ranks)), out
    sync_all("adasum")
    for ps in added:
        assert hvd.remove_process_set(ps)


# ---- misuse: outside ranks, removed sets, mismatches -----------------------------------------


def check_rank_outside_the_set_errors_at_the_call():
    n, me = hvd.size(), hvd.rank()
    # Set k leaves rank k out; every rank registers every set, in rank order.
    added = []
    sets = [
        get_or_add([k for k in range(n) if k != other] if n > 2 else [1 - other], added)
        for other in range(n)
    ]
    outside = sets[me]
    before = hvd._C.engine_handle_count()
    t = ones(4)
    calls = {
        "allreduce": lambda: hvd.allreduce(t, process_set=outside),
        "allreduce_async": lambda: hvd.allreduce_async(t, process_set=outside),
        "allreduce_": lambda: hvd.allreduce_(t, process_set=outside),
        "allreduce_async_": lambda: hvd.allreduce_async_(t, process_set=outside),
        "grouped_allreduce": lambda: hvd.grouped_allreduce([t], process_set=outside),
        "allgather": lambda: hvd.allgather(t, process_set=outside),
        "broadcast": lambda: hvd.broadcast(t, outside.ranks[0], process_set=outside),
        "broadcast_": lambda: hvd.broadcast_(t, outside.ranks[0], process_set=outside),
        "reducescatter": lambda: hvd.reducescatter(t, process_set=outside),
        "alltoall": lambda: hvd.alltoall(t, process_set=outside),
        "barrier": lambda: hvd.barrier(process_set=outside),
        "join": lambda: hvd.join(process_set=outside),
        "broadcast_object": lambda: hvd.broadcast_object(1, outside.ranks[0], process_set=outside),
        "allgather_object": lambda: hvd.allgather_object(1, process_set=outside),
        "broadcast_parameters": lambda: hvd.broadcast_parameters(
            {"t": t}, outside.ranks[0], process_set=outside
        ),
        "stats": lambda: hvd.stats(process_set=outside),
        # Named ones too: a name given skips the automatic naming, which checks the set.
        "grouped_allreduce named": lambda: hvd.grouped_allreduce(
            [t], name="o.gar", process_set=outside
        ),
        "grouped_allreduce_async": lambda: hvd.grouped_allreduce_async(
            [t, t], name="o.gara", process_set=outside
        ),
        "grouped_allreduce_": lambda: hvd.grouped_allreduce_([t], process_set=outside),
        "grouped_allreduce_async_": lambda: hvd.grouped_allreduce_async_(
            [t], name="o.gar_", process_set=outside
        ),
        "grouped_allgather": lambda: hvd.grouped_allgather([t], process_set=outside),
        "grouped_allgather_async": lambda: hvd.grouped_allgather_async(
            [t], name="o.gag", process_set=outside
        ),
        "grouped_reducescatter": lambda: hvd.grouped_reducescatter([t], process_set=outside),
        "grouped_reducescatter named": lambda: hvd.grouped_reducescatter(
            [t], name="o.grs", process_set=outside
        ),
        "grouped_reducescatter_async": lambda: hvd.grouped_reducescatter_async(
            [t], name="o.grsa", process_set=outside
        ),
        "sparse_allreduce_async": lambda: hvd.sparse_allreduce_async(
            t.to_sparse(), process_set=outside
        ),
        "sparse_allreduce_async named": lambda: hvd.sparse_allreduce_async(
            t.to_sparse(), "o.sp", hvd.Sum, outside
        ),
        "allreduce Adasum": lambda: hvd.allreduce(t, op=hvd.Adasum, process_set=outside),
        "grouped_allreduce Adasum": lambda: hvd.grouped_allreduce_async(
            [t], name="o.gada", op=hvd.Adasum, process_set=outside
        ),
    }
    for fn, call in calls.items():
        try:
            expect_error(ValueError, call, f"rank {me} is not a member", "process_set_id=")
        except AssertionError as e:
            raise AssertionError(f"{fn}: {e}") from None
    assert hvd._C.engine_handle_count() == before, "a refused call left a handle behind"
    expect_error(TypeError, lambda: hvd.allreduce(t, process_set=[0]), "process_set must be")
    # A root outside the set, on a member.
    mine = INIT_SET
    if mine.included():
        stranger = next((k for k in range(n) if k not in mine.ranks), None)
        if stranger is not None:
            expect_error(
                ValueError, lambda: hvd.broadcast(t, stranger, process_set=mine), "root_rank"
            )
    for ps in added:
        assert hvd.remove_process_set(ps)
    sync_all("outside")


def check_add_remove_add_again():
    n, me = hvd.size(), hvd.rank()
    ps = hvd.add_process_set([0])
    first_id = ps.process_set_id
    assert first_id > 1
    if me == 0:
        assert torch.equal(hvd.allreduce(tensor([2.0]), op=hvd.Sum, process_set=ps), tensor([2.0]))
    assert hvd.remove_process_set(ps) is True
    assert ps.process_set_id is None and ps.ranks == [0]
    assert hvd.remove_process_set(ps) is False  # no longer registered
    assert hvd.remove_process_set(hvd.global_process_set) is False
    expect_error(ValueError, lambda: hvd.allreduce(ones(1), process_set=ps), "not registered")
    again = hvd.add_process_set(ps)  # the same object, registered again under a new id
    assert again is ps and ps.process_set_id > first_id
    if me == 0:
        assert torch.equal(hvd.allreduce(tensor([3.0]), op=hvd.Sum, process_set=ps), tensor([3.0]))
    # Duplicates of a registered set (or of the global set) are refused on every rank.
    expect_error(ValueError, lambda: hvd.add_process_set([0]), "duplicate")
    expect_error(ValueError, lambda: hvd.add_process_set(list(range(n))), "duplicate")
    expect_error(ValueError, lambda: hvd.add_process_set([0, n]), f"[0, {n})")
    expect_error(ValueError, lambda: hvd.add_process_set([]), "at least one rank")
    # A set removed while a tensor is pending on it fails that tensor instead of hanging.
    if n > 2:
        pair = hvd.add_process_set([0, 1])
        h = hvd.allreduce_async(ones(1), name="lonely", process_set=pair) if me == 0 else None
        assert hvd.remove_process_set(pair)
        if h is not None:
            expect_error(RuntimeError, lambda: hvd.synchronize(h), "lonely")
    assert hvd.remove_process_set(ps)
    sync_all("add_remove")


def check_mismatched_add_raises_on_every_rank():
    n, me = hvd.size(), hvd.rank()
    t0 = time.monotonic()
    # Each rank asks for a different set: every rank raises, naming every rank's call.
    expect_error(
        ValueError,
        lambda: hvd.add_process_set([me]),
        "same order",
        *[f"rank {k}: [{k}]" for k in range(n)],
    )
    # One rank's call is invalid: every rank raises, naming it.
    bad = [0, 99] if me == n - 1 else [0]
    expect_error(ValueError, lambda: hvd.add_process_set(bad), f"rank {n - 1}", "[0, ")
    # Removing different sets.
    added = []
    a, b = get_or_add([0], added), get_or_add([n - 1], added)
    expect_error(ValueError, lambda: hvd.remove_process_set(a if me == 0 else b), "same order")
    assert a.process_set_id is not None and b.process_set_id is not None
    assert time.monotonic() - t0 < 60, "the mismatches took too long to raise"
    # The failed calls registered and removed nothing: the sets still work and go away.
    if me == 0:
        hvd.barrier(process_set=a)
    for ps in added:
        assert hvd.remove_process_set(ps)
    sync_all("mismatch")


def check_stall_in_one_set_does_not_block_another():
    """A tensor only one member of set T submits stalls there; meanwhile collectives on other
    sets (and the global one) complete, and the stall fails it after stall_shutdown_s."""
    global INIT_SET
    n, me = hvd.size(), hvd.rank()
    hvd.shutdown()
    hvd.init(stall_shutdown_s=15.0, stall_warning_s=1.0)
    stalled = hvd.add_process_set([0, 1]) if n > 2 else hvd.global_process_set
    other = hvd.add_process_set([0, n - 1] if n > 2 else [0])
    h = hvd.allreduce_async(ones(2), name="stuck", process_set=stalled) if me == 0 else None
    t0 = time.monotonic()
    if other.included():
        seed = 9000
        expected = reference(hvd.Sum, [data(k, seed, (4,), torch.float64) for k in other.ranks])
        for _ in range(3):
            got = hvd.allreduce(data(me, seed, (4,), torch.float64), op=hvd.Sum, process_set=other)
            close(got, expected, torch.float64)
    sync_all("during_stall")
    if h is not None:
        assert not hvd.poll(h), f"'stuck' finished early ({time.monotonic() - t0:.1f} s)"
        msg = expect_error(
            RuntimeError, lambda: hvd.synchronize(h), "stall", "stuck", "missing on rank 1"
        )
        if n > 2:
            assert "process set" in msg, msg
    # Met outside the engine first: a collective submitted while rank 0 still waits for the
    # stall would be as old as 'stuck' when rank 0 joins it, and the inspector could give up on
    # it too.
    torch.distributed.barrier()
    if stalled.included():
        hvd.barrier(process_set=stalled)  # every member has handled the stall by now
        assert hvd.stats(process_set=stalled)["stalled"] == 1
    hvd.shutdown()
    INIT_SET = hvd.ProcessSet(init_set_ranks(n))
    hvd.init(process_sets=[INIT_SET])


def check_shutdown_invalidates_sets():
    global INIT_SET
    n = hvd.size()
    ps = INIT_SET
    hvd.shutdown()
    assert ps.process_set_id is None
    assert hvd.global_process_set.process_set_id == 0
    fresh = hvd.ProcessSet(init_set_ranks(n))
    hvd.init(process_sets=[fresh])
    assert fresh.process_set_id == 1 and fresh.included() == (hvd.rank() in fresh.ranks)
    INIT_SET = fresh


CHECKS = checks_of(globals())


def main():
    global INIT_SET
    device()
    INIT_SET = hvd.ProcessSet(init_set_ranks(int(os.environ["EXPECT_SIZE"])))
    hvd.init(process_sets=[INIT_SET])
    try:
        run_checks(CHECKS, sys.argv[1:], hvd.rank())
    finally:
        hvd.shutdown()


if __name__ == "__main__":
    main()
