"""One rank of the multi-process tests of the grouped collectives, the collectives' gradients,
reducescatter's scale factors and sparse allreduce (DistributedOptimizer's sparse path
included). Started N times by tests/test_grouped.py; runs every check named on the command
line and writes {check: "ok" | traceback} per rank (tests/multiproc.py).

Every rank's data differs; expected values are computed locally, in float64, by regenerating
every rank's input from the same seeds. Gradients are compared with torch autograd run in
one process over every rank's inputs: the ranks' losses L_k (each rank's output weighted by
its own weights) summed, times Horovod's factor for the collective (1 for allreduce and
alltoall, 1/size for allgather and broadcast, whose gradients Horovod averages, size for
reducescatter, whose gradient Horovod multiplies by size for Sum and leaves for Average)."""

from __future__ import annotations

import sys
import time

import gradfuse as hvd
import torch
from engine_worker import expect_error
from multiproc import checks_of, device, full, ones, worker_main

F64 = torch.float64


def rand(rank, seed, shape, dtype=F64):
    """Rank `rank`'s input for `seed`: random floats drawn on the CPU, placed on the device."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g, dtype=F64).to(device(), dtype)


def ints(rank, seed, shape, dtype):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randint(-9, 10, shape, generator=g).to(device(), dtype)


def assert_close(actual, expected, tol=1e-12):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual.double(), expected.double(), rtol=tol, atol=tol), (
        actual,
        expected,
    )


def rows_of(dim0, n, k):
    """Rank k's rows of a reducescatter: the first dim0 % n ranks get one row more."""
    base, extra = divmod(dim0, n)
    start = k * base + min(k, extra)
    return slice(start, start + base + (1 if k < extra else 0))


def reduced(op, tensors, pre=1.0, post=1.0):
    total = sum(t.double() * pre for t in tensors)
    return post * (total / len(tensors) if op == hvd.Average else total)


# ---- grouped collectives: results ------------------------------------------------------------


def check_grouped_allreduce_forms():
    n, r = hvd.size(), hvd.rank()
    shapes = [(5,), (2, 3), (4, 1, 2)]
    dtypes = [F64, torch.float32, F64]
    for op, pre, post in [(hvd.Sum, 1.0, 1.0), (hvd.Average, 1.0, 1.0), (hvd.Sum, 0.5, 3.0)]:
        seed = 100 + 10 * op + int(post)
        mine = [rand(r, seed + i, s, d) for i, (s, d) in enumerate(zip(shapes, dtypes))]
        expected = [
            reduced(op, [rand(k, seed + i, s, d) for k in range(n)], pre, post)
            for i, (s, d) in enumerate(zip(shapes, dtypes))
        ]
        kw = {"op": op, "prescale_factor": pre, "postscale_factor": post}
        handle = hvd.grouped_allreduce_async(mine, name=f"ga.{seed}", **kw)
        outs = hvd.synchronize(handle)
        assert isinstance(outs, list) and len(outs) == 3
        polled = hvd.grouped_allreduce_async(mine, name=f"ga.poll.{seed}", **kw)
        deadline = time.monotonic() + 60
        while not hvd.poll(polled):
            assert time.monotonic() < deadline, "poll() of a grouped handle never said done"
            time.sleep(0.01)
        for out, exp in zip(hvd.synchronize(polled), expected):
            assert_close(out, exp, 1e-5)
        for out, exp, d in zip(outs, expected, dtypes):
            assert out.dtype == d
            assert_close(out, exp, 1e-12 if d == F64 else 1e-5)
        for out, exp in zip(hvd.grouped_allreduce(mine, name=f"gb.{seed}", **kw), expected):
            assert_close(out, exp, 1e-5)
        copies = [t.clone() for t in mine]
        back = hvd.grouped_allreduce_(copies, name=f"gc.{seed}", **kw)
        assert all(b is c for b, c in zip(back, copies)), "in place: the same tensors back"
        for c, exp in zip(copies, expected):
            assert_close(c, exp, 1e-5)
        copies = [t.clone() for t in mine]
        back = hvd.synchronize(hvd.grouped_allreduce_async_(copies, name=f"gd.{seed}", **kw))
        assert all(b is c for b, c in zip(back, copies))
        for c, exp in zip(copies, expected):
            assert_close(c, exp, 1e-5)


def check_grouped_allgather():
    n, r = hvd.size(), hvd.rank()
    dims = [[1, 3, 0, 2][k % 4] for k in range(n)]  # rows per rank differ (one rank: none)
    seeds = [200, 201, 202]
    mine = [rand(r, s, (dims[r] + i, 2, i + 1)) for i, s in enumerate(seeds)]
    outs = hvd.synchronize(hvd.grouped_allgather_async(mine, name="gag"))
    outs2 = hvd.grouped_allgather(mine, name="gag2")
    for i, s in enumerate(seeds):
        expected = torch.cat([rand(k, s, (dims[k] + i, 2, i + 1)) for k in range(n)])
        assert torch.equal(outs[i], expected) and torch.equal(outs2[i], expected), i


def check_grouped_reducescatter():
    n, r = hvd.size(), hvd.rank()
    dim0s = [1, n, 2 * n + 1]  # fewer rows than ranks, even, uneven
    for op in (hvd.Sum, hvd.Average):
        seed = 300 + 10 * op
        mine = [rand(r, seed + i, (d, 3)) for i, d in enumerate(dim0s)]
        outs = hvd.synchronize(hvd.grouped_reducescatter_async(mine, name=f"grs.{op}", op=op))
        outs2 = hvd.grouped_reducescatter(mine, name=f"grs2.{op}", op=op)
        for i, d in enumerate(dim0s):
            full_result = reduced(op, [rand(k, seed + i, (d, 3)) for k in range(n)])
            assert_close(outs[i], full_result[rows_of(d, n, r)])
            assert_close(outs2[i], full_result[rows_of(d, n, r)])


def check_reducescatter_scale_factors():
    n, r = hvd.size(), hvd.rank()
    seed = 400
    for dtype, tol in [(F64, 1e-12), (torch.float32, 1e-5)]:
        for op in (hvd.Sum, hvd.Average):
            for pre, post in [(0.25, 1.0), (1.0, 3.5), (2.0, 0.125)]:
                seed += 1
                shape = (2 * n + 1, 2)
                mine = rand(r, seed, shape, dtype)
                expected = reduced(op, [rand(k, seed, shape, dtype) for k in range(n)], pre, post)
                expected = expected[rows_of(shape[0], n, r)]
                kw = {"op": op, "prescale_factor": pre, "postscale_factor": post}
                out = hvd.reducescatter(mine, name=f"rss.{seed}", **kw)
                assert out.dtype == dtype
                assert_close(out, expected, tol)
                out = hvd.synchronize(hvd.reducescatter_async(mine, name=f"rsa.{seed}", **kw))
                assert_close(out, expected, tol)
                assert torch.equal(mine, rand(r, seed, shape, dtype)), "input changed"
                [out] = hvd.grouped_reducescatter([mine], name=f"rsg.{seed}", **kw)
                assert_close(out, expected, tol)
    # Integers: the engine's scaling, in float64 truncated toward zero, before the sum (the
    # prescale) and after it (the postscale, with Average's 1/size folded in, so the result is
    # truncated once, as allreduce's and Horovod's).
    for op in (hvd.Sum, hvd.Average):
        seed += 1
        inputs = [ints(k, seed, (n + 1,), torch.int32) for k in range(n)]
        pre = [(t.double() * 0.5).trunc() for t in inputs]
        post = 3.0 / n if op == hvd.Average else 3.0
        expected = (sum(pre) * post).to(torch.int32)[rows_of(n + 1, n, r)]
        out = hvd.reducescatter(
            inputs[r], name=f"rsi.{seed}", op=op, prescale_factor=0.5, postscale_factor=3.0
        )
        assert out.dtype == torch.int32 and torch.equal(out, expected), (out, expected)


# ---- gradients -------------------------------------------------------------------------------


def reference_grads(global_fn, inputs, weights, rank, factor):
    """d/d inputs[rank][i] of factor * sum_k sum((weights[k][j] * out[k][j])), where
    out = global_fn(inputs) gives every rank's outputs from every rank's inputs."""
    inputs = [[t.detach().double().requires_grad_() for t in per_rank] for per_rank in inputs]
    outs = global_fn(inputs)
    loss = sum((w.double() * o).sum() for ws, os in zip(weights, outs) for w, o in zip(ws, os))
    grads = torch.autograd.grad(loss, inputs[rank], allow_unused=True)
    # An input no output depends on (broadcast off the root) has gradient zero.
    return [factor * (torch.zeros_like(x) if g is None else g) for x, g in zip(inputs[rank], grads)]


def distributed_grads(local_fn, mine, my_weights):
    xs = [t.clone().requires_grad_() for t in mine]
    outs = local_fn(xs)
    sum((w * o).sum() for w, o in zip(my_weights, outs)).backward()
    return [x.grad for x in xs]


def grad_case(seed, in_shapes, out_shapes, local_fn, global_fn, factor):
    """Checks local_fn's gradient on this rank against global_fn's, computed in one process."""
    n, r = hvd.size(), hvd.rank()
    inputs = [[rand(k, seed + i, s(k)) for i, s in enumerate(in_shapes)] for k in range(n)]
    weights = [[rand(k, seed + 50 + i, s(k)) for i, s in enumerate(out_shapes)] for k in range(n)]
    got = distributed_grads(local_fn, inputs[r], weights[r])
    expected = reference_grads(global_fn, inputs, weights, r, factor)
    for g, e in zip(got, expected):
        assert_close(g, e)


def grouped_allreduce_grad_case(op, pre, post):
    n = hvd.size()
    scales = {"op": op, "prescale_factor": pre, "postscale_factor": post}
    grad_case(
        530 + op,
        [lambda k: (4,), lambda k: (2, 3)],
        [lambda k: (4,), lambda k: (2, 3)],
        lambda xs: hvd.grouped_allreduce(xs, name=f"g.gar.{op}", **scales),
        lambda xss: [[reduced(op, [xs[i] for xs in xss], pre, post) for i in range(2)]] * n,
        1,
    )


def reducescatter_grad_case(op, pre, post):
    n = hvd.size()
    scales = {"op": op, "prescale_factor": pre, "postscale_factor": post}
    dims = [2 * n + 1, n]
    part = lambda i: lambda k: (len(range(dims[i])[rows_of(dims[i], n, k)]), i + 2)
    whole = lambda i: lambda k: (dims[i], i + 2)
    grad_case(
        540 + 3 * op + int(post),
        [whole(0)],
        [part(0)],
        lambda xs: [hvd.reducescatter(xs[0], name=f"g.rs.{op}.{post}", **scales)],
        lambda xss: [
            [reduced(op, [xs[0] for xs in xss], pre, post)[rows_of(dims[0], n, k)]]
            for k in range(n)
        ],
        n,
    )
    grad_case(
        560 + 3 * op + int(post),
        [whole(0), whole(1)],
        [part(0), part(1)],
        lambda xs: hvd.grouped_reducescatter(xs, name=f"g.grs.{op}.{post}", **scales),
        lambda xss: [
            [
                reduced(op, [xs[i] for xs in xss], pre, post)[rows_of(dims[i], n, k)]
                for i in range(2)
            ]
            for k in range(n)
        ],
        n,
    )


def check_gradients():
    n = hvd.size()

    def rows(k):  # rows per rank: uneven
        return k % 3 + 1

    gathered = sum(rows(j) for j in range(n))
    # allgather and grouped_allgather: Horovod averages the gradients.
    grad_case(
        500,
        [lambda k: (rows(k), 2)],
        [lambda k: (gathered, 2)],
        lambda xs: [hvd.allgather(xs[0], name="g.ag")],
        lambda xss: [[torch.cat([xs[0] for xs in xss])]] * n,
        1 / n,
    )
    grad_case(
        510,
        [lambda k: (rows(k), 2), lambda k: (rows(k), 3)],
        [lambda k: (gathered, 2), lambda k: (gathered, 3)],
        lambda xs: hvd.grouped_allgather(xs, name="g.gag"),
        lambda xss: [[torch.cat([xs[i] for xs in xss]) for i in range(2)]] * n,
        1 / n,
    )
    # broadcast: the root gets the average, the others zeros.
    root = n - 1
    grad_case(
        520,
        [lambda k: (3, 2)],
        [lambda k: (3, 2)],
        lambda xs: [hvd.broadcast(xs[0], root, name="g.bc")],
        lambda xss: [[xss[root][0]]] * n,
        1 / n,
    )
    # grouped_allreduce: the gradients grouped-allreduced with the same op and scales.
    for op, pre, post in [(hvd.Sum, 1.0, 1.0), (hvd.Average, 2.0, 0.25)]:
        grouped_allreduce_grad_case(op, pre, post)
    # reducescatter and grouped_reducescatter: Horovod's gradient is size times that of the
    # summed losses (Sum and Average alike), times the scale factors.
    for op, pre, post in [(hvd.Sum, 1.0, 1.0), (hvd.Average, 1.0, 1.0), (hvd.Sum, 0.5, 3.0)]:
        reducescatter_grad_case(op, pre, post)


def check_alltoall_gradient():
    n = hvd.size()
    # splits[k][j]: rows rank k sends to rank j (uneven, some zero).
    splits = [[(k + 2 * j) % 3 for j in range(n)] for k in range(n)]

    def global_fn(xss):
        parts = [torch.split(xs[0], splits[k]) for k, xs in enumerate(xss)]
        return [[torch.cat([parts[j][k] for j in range(n)])] for k in range(n)]

    def local_fn(xs):
        out, received = hvd.alltoall(xs[0], splits[hvd.rank()], name="g.a2a")
        assert received.tolist() == [splits[j][hvd.rank()] for j in range(n)]
        return [out]

    grad_case(
        600,
        [lambda k: (sum(splits[k]), 2)],
        [lambda k: (sum(splits[j][k] for j in range(n)), 2)],
        local_fn,
        global_fn,
        1,
    )
    # Without splits: only the output is returned, and it is differentiable too.
    grad_case(
        610,
        [lambda k: (2 * n, 3)],
        [lambda k: (2 * n, 3)],
        lambda xs: [hvd.alltoall(xs[0], name="g.a2a.even")],
        lambda xss: [[torch.cat([xs[0][2 * k : 2 * k + 2] for xs in xss])] for k in range(n)],
        1,
    )


# ---- bad input and failures ------------------------------------------------------------------


def check_bad_input():
    n = hvd.size()
    for fn in (
        hvd.grouped_allreduce,
        hvd.grouped_allreduce_async,
        hvd.grouped_allreduce_,
        hvd.grouped_allgather,
        hvd.grouped_allgather_async,
        hvd.grouped_reducescatter,
        hvd.grouped_reducescatter_async,
    ):
        mixed = [ones(n), torch.empty(n, device="meta")]
        for arg, exc, needles in [
            ([], ValueError, (fn.__name__, "tensors", "empty")),
            (ones(3), TypeError, (fn.__name__, "tensors", "list")),
            ([ones(3), 3.0], TypeError, ("tensors[1]", "float")),
            (mixed, ValueError, ("tensors[1]", "meta")),
        ]:
            expect_error(exc, lambda fn=fn, arg=arg: fn(arg), *needles)
    for fn in (hvd.grouped_allgather, hvd.grouped_reducescatter_async):
        expect_error(ValueError, lambda fn=fn: fn([ones(2), ones(())]), "tensors[1]", "0-D")
    expect_error(ValueError, lambda: hvd.grouped_reducescatter([ones(n)], op=hvd.Max), "op")
    expect_error(ValueError, lambda: hvd.reducescatter(ones(n), compression="fp16"), "compression")
    expect_error(TypeError, lambda: hvd.sparse_allreduce_async(ones(3)), "tensor", "sparse")
    expect_error(TypeError, lambda: hvd.sparse_allreduce_async([1, 2]), "tensor", "sparse")
    sparse = torch.sparse_coo_tensor([[0]], [1.0], (3,), device=device())
    expect_error(ValueError, lambda: hvd.sparse_allreduce_async(sparse, op=hvd.Max), "op")
    expect_error(TypeError, lambda: hvd.synchronize("h"), "handle")
    expect_error(RuntimeError, _max_backward, "grouped_allreduce", "no gradient", "Max")
    # Nothing was half submitted: the ranks are still in step.
    assert torch.equal(hvd.allreduce(ones(2), name="after.bad", op=hvd.Sum), full((2,), float(n)))


def _max_backward():
    x = ones(2, requires_grad=True)
    [y] = hvd.grouped_allreduce([x], op=hvd.Max, name="gmax")
    y.sum().backward()


def check_grouped_mismatch_fails_every_rank():
    # The last rank's second tensor has another shape: every rank's synchronize raises, naming
    # it, and the group's other tensor is still waited for (reduced correctly).
    n, r = hvd.size(), hvd.rank()
    odd = r == n - 1
    handle = hvd.grouped_allreduce_async([ones(3), ones(4 if odd else 5)], name="gmis", op=hvd.Sum)
    expect_error(RuntimeError, lambda: hvd.synchronize(handle), "gmis.1", "shape")
    assert torch.equal(hvd.allreduce(ones(2), name="after.gmis", op=hvd.Sum), full((2,), float(n)))


def check_grouped_inside_submitted_together():
    n = hvd.size()
    with hvd.submitted_together():
        handle = hvd.grouped_allgather_async([ones(1), ones(2)], name="held.g")
        expect_error(RuntimeError, lambda: hvd.synchronize(handle), "submitted_together")
        expect_error(RuntimeError, lambda: hvd.grouped_allreduce([ones(1)]), "submitted_together")
    outs = hvd.synchronize(handle)
    assert [o.shape[0] for o in outs] == [n, 2 * n]


# ---- sparse ----------------------------------------------------------------------------------


def sparse_input(rank, seed, shape, sparse_dim):
    """Rank `rank`'s sparse tensor: rows picked at random (duplicates and none possible)."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    nnz = int(torch.randint(0, 5, (1,), generator=g)) if rank else 0  # rank 0: no nonzeros
    idx = torch.stack([torch.randint(0, s, (nnz,), generator=g) for s in shape[:sparse_dim]])
    values = torch.randn((nnz, *shape[sparse_dim:]), generator=g, dtype=F64)
    return torch.sparse_coo_tensor(idx, values, shape).to(device())


def check_sparse_allreduce():
    n, r = hvd.size(), hvd.rank()
    for op in (hvd.Sum, hvd.Average):
        for shape, sparse_dim in [((6,), 1), ((5, 3), 1), ((4, 3), 2)]:
            seed = 700 + 10 * op + len(shape) + sparse_dim
            mine = sparse_input(r, seed, shape, sparse_dim)
            dense = [sparse_input(k, seed, shape, sparse_dim).to_dense() for k in range(n)]
            expected = reduced(op, dense)
            handle = hvd.sparse_allreduce_async(mine, name=f"sp.{seed}", op=op)
            out = handle()  # Horovod's form: the handle is a function
            assert out.is_sparse and out.shape == mine.shape and out.dtype == F64
            assert_close(out.to_dense(), expected)
            out = hvd.synchronize(hvd.sparse_allreduce_async(mine, name=f"sp2.{seed}", op=op))
            assert_close(out.to_dense(), expected)


class EmbeddingModel(torch.nn.Module):
    def __init__(self, sparse):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every rank and in the reference
        self.emb = torch.nn.Embedding(7, 3, sparse=sparse)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, idx):
        return self.head(self.emb(idx)).sum()


def batch(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randint(0, 7, (rank % 3 + 2,), generator=g)


def uses_embedding(rank, step):
    return not (step == 2 and rank == hvd.size() - 1)  # one rank skips it once


def loss_of(model, rank, step):
    idx = batch(rank, step).to(device())
    if uses_embedding(rank, step):
        return model(idx)
    return model.head(torch.zeros(3, device=device(), dtype=F64)).sum()  # embedding unused


def check_sparse_embedding_training():
    # Embedding(sparse=True) trained through DistributedOptimizer (sparse reduction, and
    # sparse_as_dense) equals dense training of the ranks' losses averaged, in one process.
    n, r = hvd.size(), hvd.rank()
    steps = 3
    reference = EmbeddingModel(sparse=False).to(device(), F64)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for step in range(steps):
        ref_opt.zero_grad()
        (sum(loss_of(reference, k, step) for k in range(n)) / n).backward()
        ref_opt.step()
    for sparse_as_dense in (False, True):
        model = EmbeddingModel(sparse=True).to(device(), F64)
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5),
            named_parameters=model.named_parameters(),
            sparse_as_dense=sparse_as_dense,
        )
        for step in range(steps):
            opt.zero_grad()
            loss_of(model, r, step).backward()
            opt.synchronize()
            assert model.emb.weight.grad.is_sparse != sparse_as_dense
            with opt.skip_synchronize():
                opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert_close(p.detach(), q.detach())
    expect_error(
        TypeError,
        lambda: hvd.DistributedOptimizer(torch.optim.SGD(model.parameters()), sparse_as_dense=1),
        "sparse_as_dense",
    )


CHECKS = checks_of(globals())

if __name__ == "__main__":
    worker_main(CHECKS, sys.argv[1:])
