"""One rank of the 2-rank fuzz of the collectives' arguments (tests/test_fuzz_collectives.py).

For every collective, hypothesis draws (derandomized, so every rank draws the same sequence) a
valid call and spoils one of its arguments: a wrong dtype, layout or device, a non-tensor, a
0-d tensor, an expanded or aliased tensor for an in-place call, a NaN/inf/non-number scale, a
bad op, name, root, process set, splits, handle or device. The draws are plain data; each rank
checks that the other drew the same calls, then runs them in order. A spoiled value that is in
fact valid (a root in range, a set this rank belongs to, an expanded tensor of one row) is
decided per call by `judge` and must succeed on every rank of its set and match a reference
built from the seeds; a bad one must raise TypeError/ValueError/RuntimeError/
NotImplementedError naming the argument, at the call, on the calling rank, before anything is
submitted (no handle left behind). Counts per collective are printed and checked."""

from __future__ import annotations

import collections
import hashlib
import math
import os
import threading
import time

import gradfuse as hvd
import torch
from gradfuse import _C
from gradfuse.exceptions import HorovodInternalError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from multiproc import checks_of, device, worker_main

BAD_CALLS = 1000  # at least, per collective
TRACE = os.environ.get("FUZZ_TRACE") == "1"  # print every call before making it
INT_DTYPES = ["uint8", "int8", "int16", "int32", "int64"]
DTYPES = INT_DTYPES + ["float16", "bfloat16", "float32", "float64"]
BAD_DTYPES = ["bool", "complex64", "complex128"]
GOOD_LAYOUTS = ["plain", "noncontig", "expanded"]
NOT_TENSORS = [None, 3, 2.5, "tensor", [1.0, 2.0], (1,)]
OPS = [hvd.Sum, hvd.Average, hvd.Min, hvd.Max, hvd.Product]
BAD_OPS = [True, False, 1.5, "Sum", -1, 6, 99, 2**70, 0.0]
# Valid scale factors (exact on integer-valued data) and bad ones.
FLOAT_FACTORS = [0.5, -1.0, 1e300]
INT_FACTORS = [2, -1]
BAD_FACTORS = [math.nan, math.inf, -math.inf, "2", None, True, 1j, [1.0]]
BAD_NAMES = ["", 5, b"x", 1.5, ["a"], 0]
# Process sets: registered ones (set0 = [0], set1 = [1]), a removed one, unregistered ones.
PROCESS_SETS = ["omit", None, "global", "set0", "set1", "removed", 0, "global_ps", [0, 1]]
ROOTS = [0, 1, -1, 2, 3, 2**31, 2**63, 2**64, -(2**63), True, False, 0.0, 1.0, "0", None]
BAD_SPLITS = [5, 2**63, "ab", [1.5, 0.5], [True, False], "h62", "h63", "h-63", "len", "neg", "sum"]
HUGE_SPLITS = {"h62": [2**62, 2**62], "h63": [2**63, 0], "h-63": [-(2**63), 0]}
DEVICES = [None, -1, "cpu", "cpu_device", 0, 1, "cuda", "cuda:0", 2**40, "meta", "banana", -2]
DEVICES += [True, 1.5, [0], "cuda:-1"]

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # no shrinking: a failure is reported once, at the call
    suppress_health_check=list(HealthCheck),
)
counts = collections.Counter()  # (collective, "bad" | "valid") -> calls
agreed = []  # results every rank must share (e.g. join's last rank), compared at the end
sets = {}  # the process sets of PROCESS_SETS, made by check_setup


# ---- drawing calls (plain data, identical on every rank) -------------------------------------


@st.composite
def tensor_spec(draw, min_dim=0, same_dim0=True, dtypes=DTYPES):
    """("T", dtype, dim 0 per rank (None: 0-d), other dims, layout, seed)."""
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(min_dim, 3))
    dim0s = None
    if ndim:
        d = draw(st.integers(0, 4))
        dim0s = (d, d) if same_dim0 else (d, draw(st.integers(0, 4)))
    rest = tuple(draw(st.integers(0, 3)) for _ in range(max(ndim - 1, 0)))
    layout = draw(st.sampled_from(GOOD_LAYOUTS))
    return ("T", dtype, dim0s, rest, layout, draw(st.integers(0, 2**20)))


@st.composite
def any_tensor(draw, min_dim=0, same_dim0=True):
    """A tensor spec, good or spoiled (bad dtype, sparse, meta, 0-d, not a tensor)."""
    how = draw(st.sampled_from(["good", "dtype", "sparse", "meta", "zerodim", "not"]))
    # At least 1-D where spoiled, so that a 0-d tensor's own problem does not come first.
    t = draw(tensor_spec(1 if how in ("dtype", "sparse", "meta") else min_dim, same_dim0))
    if how == "dtype":  # plain: one problem per call
        return draw(tensor_spec(1, same_dim0, BAD_DTYPES))[:4] + ("plain",) + t[5:]
    if how in ("sparse", "meta"):
        return t[:4] + (how,) + t[5:]
    if how == "zerodim":
        return t[:2] + (None, ()) + t[4:]
    if how == "not":
        return draw(st.sampled_from(NOT_TENSORS))
    return t


def factor(dtype):
    """Valid factors for `dtype` (exact on its integer-valued data), or bad ones."""
    good = INT_FACTORS if dtype in INT_DTYPES else FLOAT_FACTORS
    if dtype == "uint8":
        good = [2]
    return st.sampled_from(good + BAD_FACTORS)


@st.composite
def call(draw, fns, args, tensor=None):
    """(fn, {arg: value}, spoiled arg): a valid call of one of `fns` with `args` drawn from
    their valid values, then one argument redrawn from its spoil strategy."""
    fn = draw(st.sampled_from(fns))
    kw = {k: draw(good) for k, (good, _) in args.items()}
    if tensor is not None:
        kw["tensor"] = draw(tensor[0])
    spoilable = sorted(args) + (["tensor"] if tensor is not None else [])
    arg = draw(st.sampled_from(spoilable))
    spoil = tensor[1] if arg == "tensor" else args[arg][1]
    kw[arg] = draw(spoil if isinstance(spoil, st.SearchStrategy) else spoil(kw))
    return fn, kw, arg


def generate(strategy, examples):
    """`examples` draws of `strategy`, the same on every rank (derandomized)."""
    out = []

    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def collect(spec):
        out.append(spec)

    collect()
    return out


# ---- building arguments from the drawn data --------------------------------------------------


def build(spec, rank):
    """The argument `spec` stands for on `rank` (tensor specs become tensors)."""
    if not (isinstance(spec, tuple) and spec and spec[0] == "T"):
        return spec
    _, dtype, dim0s, rest, layout, seed = spec
    shape = ((dim0s[rank],) if dim0s is not None else ()) + rest
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed * 4 + rank)
    if layout == "expanded" and shape:
        values = torch.randint(1, 4, (1, *shape[1:]), generator=g).expand(shape)
    else:
        values = torch.randint(1, 4, shape, generator=g)
    if layout == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if layout == "sparse":
        return values.to(device(), dtype).to_sparse()
    if layout == "noncontig":
        buf = torch.zeros((*shape, 2), dtype=dtype, device=device())
        buf[..., 0] = values.to(dtype)
        return buf[..., 0]
    if layout == "expanded" and shape:
        return values[:1].to(device(), dtype).expand(shape)
    return values.to(device(), dtype)


def process_set(token):
    return sets[token] if isinstance(token, str) and token in sets else token


def kwargs_of(kw, rank, *names):
    """The keyword arguments `names` of a call, built ('omit' process sets left out)."""
    out = {}
    for k in names:
        if k not in kw or (k == "process_set" and kw[k] == "omit"):
            continue
        out[k] = process_set_value(kw[k]) if k == "process_set" else build(kw[k], rank)
    return out


# ---- judging: is the call valid on this rank, and if not, what must it raise -----------------


def bad(exc, *needles):
    return (exc if isinstance(exc, tuple) else (exc,), needles)


def set_ranks(token):
    """The ranks of a valid process_set argument; None where it is bad."""
    if token in ("omit", None, "global"):
        return [0, 1]
    if token in ("set0", "set1"):
        return sets[token].ranks
    return None


def judge_process_set(token, rank):
    if token in (0, "global_ps") or isinstance(token, list):
        return bad(TypeError, "process_set")
    ranks = set_ranks(token)
    if ranks is None:  # removed
        return bad(ValueError, "process_set", "not registered")
    if rank not in ranks:
        return bad(ValueError, "not a member", "process_set")
    return None


@st.composite
def unregistered_set(draw):
    ranks = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True))
    return ("unregistered", tuple(ranks))


def any_process_set():
    return st.one_of(st.sampled_from(PROCESS_SETS), unregistered_set(), st.integers(-5, 2**40))


NAME_ARGS = {"name": (st.sampled_from([None, "custom"]), st.sampled_from(["custom", *BAD_NAMES]))}
PS_ANY = {"process_set": (st.sampled_from(["omit", None]), any_process_set())}


def process_set_value(token):
    if isinstance(token, tuple) and token[0] == "unregistered":
        return hvd.ProcessSet(list(token[1]))
    return process_set(token)


def judge_any_process_set(token, rank):
    if isinstance(token, tuple):
        return bad(ValueError, "process_set", "not registered")
    if isinstance(token, int) and token is not None:
        return bad(TypeError, "process_set")
    return judge_process_set(token, rank)


def set_kwargs(kw):
    token = kw.get("process_set", "omit")
    return {} if token == "omit" else {"process_set": process_set_value(token)}


def judge_tensor(t, rank, min_dim=0, in_place=False, what="tensor"):
    if not (isinstance(t, tuple) and t and t[0] == "T"):
        return bad(TypeError, what)
    _, dtype, dim0s, _, layout, _ = t
    if dtype in BAD_DTYPES:
        return bad(ValueError, what, "dtype")
    if layout == "sparse":
        return bad(ValueError, what, "dense")
    if layout == "meta":
        return bad(ValueError, what, "meta")
    if dim0s is None and min_dim:
        return bad(ValueError, what, "dimension")
    if in_place and layout == "expanded" and dim0s is not None and dim0s[rank] > 1:
        return bad(ValueError, what, "share memory")
    return None


def judge_op(op, allowed=OPS):
    if op is None and allowed is OPS:
        return None
    if isinstance(op, bool) or not isinstance(op, int) or op not in allowed:
        return bad(ValueError, "op")
    return None


def judge_factor(value, arg):
    if isinstance(value, float) and not math.isfinite(value):
        return bad(ValueError, arg)
    if isinstance(value, (bool, str, complex, list)) or value is None:
        return bad(TypeError, arg)
    return None


def judge_name(name):
    if name is None or name == "custom":
        return None
    return bad((TypeError, ValueError), "name")


def judge_root(root, token, rank):
    if isinstance(root, bool) or not isinstance(root, int):
        return bad(TypeError, "root_rank")
    if not 0 <= root < 2:
        return bad(ValueError, "root_rank")
    ranks = set_ranks(token)
    if ranks is not None and root not in ranks:
        return bad(ValueError, "root_rank", "member")
    return None


# ---- running one call ------------------------------------------------------------------------


def execute(collective, i, spec, case):
    """case = (run, expected problem or None, verify(result)). A bad call must raise what
    was expected, at the call; a valid one must succeed and verify; no handle may remain."""
    run, problem, verify = case
    try:
        if problem is None:
            verify(run())
            counts[collective, "valid"] += 1
        else:
            expect_raises(run, *problem)
            counts[collective, "bad"] += 1
        assert _C.engine_handle_count() == 0, f"{_C.engine_handle_count()} handle(s) left behind"
    except Exception as e:
        raise AssertionError(f"{collective} call {i}: {spec!r}\nexpected {problem}: {e}") from e


def expect_raises(run, types, needles):
    try:
        run()
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        message = str(e)
        assert isinstance(e, types), f"raised {type(e).__name__}, expected {types}: {message}"
        assert not isinstance(e, HorovodInternalError), f"an argument error reported as {e!r}"
        missing = [n for n in needles if n not in message]
        assert not missing, f"the message does not name {missing}: {message}"
        return
    raise AssertionError("nothing raised")


def unique_name(kw, collective, i):
    return f"fz.{collective}.{i}" if kw.get("name") == "custom" else kw.get("name")


def fuzz(collective, strategy, examples, case_of):
    """Draws `examples` calls, checks every rank drew the same, runs them in order."""
    start = time.perf_counter()
    specs = generate(strategy, examples)
    drawn = time.perf_counter() - start
    digest = hashlib.sha256(repr(specs).encode()).hexdigest()
    digests = hvd.allgather_object(digest, name=f"fz.digest.{collective}")
    assert len(set(digests)) == 1, f"the ranks drew different {collective} calls: {digests}"
    for i, spec in enumerate(specs):
        if TRACE:
            print(f"rank {hvd.rank()}: {collective} {i}: {spec!r}", flush=True)
        execute(collective, i, spec, case_of(i, spec))
    print(
        f"rank {hvd.rank()}: {collective}: {counts[collective, 'bad']} bad, "
        f"{counts[collective, 'valid']} valid calls in {time.perf_counter() - start:.1f} s "
        f"(drawing them: {drawn:.1f} s)",
        flush=True,
    )
    assert counts[collective, "bad"] >= BAD_CALLS, (collective, counts[collective, "bad"])


# ---- references ------------------------------------------------------------------------------


def values(t, rank):
    return build(t, rank).contiguous().cpu()


def reduced(op, xs):
    stack = torch.stack(xs)
    if op in (hvd.Sum, hvd.Average, None):
        return stack.sum(0)
    if op == hvd.Min:
        return stack.min(0).values
    if op == hvd.Max:
        return stack.max(0).values
    return stack.prod(0)


def reference(xs, op, pre, post):
    """The reduction of the ranks' values `xs`, as Horovod defines it: each input times the
    prescale (in its dtype), reduced, then times the postscale, Average's 1/size folded into
    it, in float64 and converted once (integers truncated toward zero)."""
    dtype = xs[0].dtype
    xs = [(x.double() * float(pre)).to(dtype).double() for x in xs]
    if op in (hvd.Average, None):
        post = float(post) / len(xs)
    return (reduced(op, xs) * float(post)).to(dtype)


def allreduce_reference(t, ranks, op, pre, post):
    return reference([values(t, k) for k in ranks], op, pre, post)


def rows_of(full, n, me):
    """Rank `me`'s rows of a reducescatter's result (the first dim0 % n ranks get one more)."""
    d = full.shape[0]
    rows = [d // n + (1 if k < d % n else 0) for k in range(n)]
    return full[sum(rows[:me]) : sum(rows[: me + 1])]


def assert_close(out, expected):
    out = out.cpu()
    assert out.dtype == expected.dtype and out.shape == expected.shape, (out, expected)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(out.dtype, 0)
    assert torch.allclose(out.double(), expected.double(), rtol=tol, atol=0), (out, expected)


# ---- allreduce -------------------------------------------------------------------------------

ALLREDUCES = ["allreduce", "allreduce_async", "allreduce_", "allreduce_async_"]


def dtype_of(kw):
    """The dtype the scale factors must suit (a list with integers: the strictest, uint8)."""
    specs = kw["tensors"] if "tensors" in kw else [kw.get("tensor")]
    dtypes = {t[1] for t in specs if isinstance(t, tuple) and len(t) > 1 and t[1] in DTYPES}
    return "uint8" if dtypes & set(INT_DTYPES) else "float32"


def op_args(allowed=OPS, with_average=True):
    args = {
        "op": (st.sampled_from(allowed), st.sampled_from(allowed[-1:] + BAD_OPS)),
        **NAME_ARGS,
        "prescale_factor": (st.just(1.0), lambda kw: factor(dtype_of(kw))),
        "postscale_factor": (st.just(1.0), lambda kw: factor(dtype_of(kw))),
    }
    if with_average:
        args["average"] = (st.just(None), st.sampled_from([None, True, False]))
    return args


def with_process_set(args):
    return {**args, "process_set": (st.sampled_from(["omit", None]), any_process_set())}


ALLREDUCE_CALLS = call(ALLREDUCES, with_process_set(op_args()), (tensor_spec(), any_tensor()))


def judge_scales_op(kw, rank, allowed=OPS):
    if kw.get("average") is not None:
        return bad(ValueError, "average")
    return (
        judge_op(kw["op"], allowed)
        or judge_factor(kw["prescale_factor"], "prescale_factor")
        or judge_factor(kw["postscale_factor"], "postscale_factor")
        or judge_name(kw["name"])
    )


def allreduce_case(i, spec):
    fn, kw, _ = spec
    r, in_place = hvd.rank(), fn.endswith("_")
    problem = (
        judge_tensor(kw["tensor"], r, in_place=in_place)
        or judge_scales_op(kw, r)
        or judge_any_process_set(kw.get("process_set", "omit"), r)
    )
    args = kwargs_of(kw, r, "op", "average", "prescale_factor", "postscale_factor", "process_set")
    tensor = build(kw["tensor"], r)

    def run():
        out = getattr(hvd, fn)(tensor, name=unique_name(kw, "allreduce", i), **args)
        return hvd.synchronize(out) if "async" in fn else out

    def verify(out):
        ranks = set_ranks(kw.get("process_set", "omit"))
        ref = allreduce_reference(kw["tensor"], ranks, kw["op"], *scales(kw))
        assert_close(out, ref)
        assert (out is tensor) == in_place

    return run, problem, verify


def scales(kw):
    return kw["prescale_factor"], kw["postscale_factor"]


# ---- allgather, broadcast --------------------------------------------------------------------

ALLGATHER_CALLS = call(
    ["allgather", "allgather_async"],
    with_process_set(NAME_ARGS),
    (tensor_spec(1, same_dim0=False), any_tensor(same_dim0=False)),
)


def allgather_case(i, spec):
    fn, kw, _ = spec
    r = hvd.rank()
    problem = (
        judge_tensor(kw["tensor"], r, min_dim=1)
        or judge_name(kw["name"])
        or judge_any_process_set(kw.get("process_set", "omit"), r)
    )
    tensor = build(kw["tensor"], r)
    args = kwargs_of(kw, r, "process_set")

    def run():
        out = getattr(hvd, fn)(tensor, name=unique_name(kw, "allgather", i), **args)
        return hvd.synchronize(out) if "async" in fn else out

    def verify(out):
        ranks = set_ranks(kw.get("process_set", "omit"))
        assert_close(out, torch.cat([values(kw["tensor"], k) for k in ranks]))

    return run, problem, verify


BROADCAST_CALLS = call(
    ["broadcast", "broadcast_async", "broadcast_", "broadcast_async_"],
    with_process_set({**NAME_ARGS, "root_rank": (st.sampled_from([0, 1]), st.sampled_from(ROOTS))}),
    (tensor_spec(), any_tensor()),
)


def broadcast_case(i, spec):
    fn, kw, _ = spec
    r, in_place = hvd.rank(), fn.endswith("_")
    token = kw.get("process_set", "omit")
    problem = (
        judge_tensor(kw["tensor"], r, in_place=in_place)
        or judge_root(kw["root_rank"], "omit", r)
        or judge_name(kw["name"])
        or judge_any_process_set(token, r)
        or judge_root(kw["root_rank"], token, r)
    )
    tensor = build(kw["tensor"], r)
    args = kwargs_of(kw, r, "process_set")

    def run():
        out = getattr(hvd, fn)(
            tensor, kw["root_rank"], name=unique_name(kw, "broadcast", i), **args
        )
        return hvd.synchronize(out) if "async" in fn else out

    def verify(out):
        assert_close(out, values(kw["tensor"], kw["root_rank"]))
        assert (out is tensor) == in_place

    return run, problem, verify


# ---- reducescatter, alltoall -----------------------------------------------------------------

REDUCESCATTER_CALLS = call(
    ["reducescatter", "reducescatter_async"],
    with_process_set(op_args([hvd.Sum, hvd.Average], with_average=False)),
    (tensor_spec(1), any_tensor()),
)


def reducescatter_case(i, spec):
    fn, kw, _ = spec
    r = hvd.rank()
    token = kw.get("process_set", "omit")
    problem = (
        judge_tensor(kw["tensor"], r, min_dim=1)
        or judge_scales_op(kw, r, [hvd.Sum, hvd.Average])
        or judge_any_process_set(token, r)
    )
    tensor = build(kw["tensor"], r)
    args = kwargs_of(kw, r, "op", "prescale_factor", "postscale_factor", "process_set")

    def run():
        out = getattr(hvd, fn)(tensor, name=unique_name(kw, "reducescatter", i), **args)
        return hvd.synchronize(out) if "async" in fn else out

    def verify(out):
        ranks = set_ranks(token)
        me = ranks.index(r)
        full = allreduce_reference(kw["tensor"], ranks, kw["op"], *scales(kw))
        assert_close(out, rows_of(full, len(ranks), me))

    return run, problem, verify


@st.composite
def good_splits(draw, kw):
    """Per rank: None (even split; dim 0 even on every rank), a list or a 1-D tensor."""
    t = kw["tensor"]
    form = draw(st.sampled_from(["none", "list", "tensor"]))
    if form == "none":
        return None
    out = []
    for d in t[2]:
        first = draw(st.integers(0, d))
        out.append((form, (first, d - first)))
    return tuple(out)


@st.composite
def alltoall_tensor(draw):
    """Dim 0 differs per rank but is even on every rank or odd on every rank, so splits=None
    is valid on both or on neither (a call valid on one rank only would wait forever)."""
    t = draw(tensor_spec(1, same_dim0=False))
    odd = draw(st.booleans())
    return t[:2] + (tuple(2 * (d // 2) + odd for d in t[2]),) + t[3:]


def bad_splits(kw):
    return st.sampled_from(BAD_SPLITS + ["none_odd"])


ALLTOALL_CALLS = call(
    ["alltoall", "alltoall_async"],
    with_process_set({**NAME_ARGS, "splits": (st.just("derive"), bad_splits)}),
    (alltoall_tensor(), any_tensor(same_dim0=False)),
)


def splits_of(kw, rank, size):
    """The splits argument on `rank` for a set of `size` ranks: derived from dim 0 ("derive":
    None when dim 0 divides evenly, else a list or tensor), or the spoiled value."""
    s, t = kw["splits"], kw["tensor"]
    is_spec = isinstance(t, tuple) and t[0] == "T"
    dim0 = t[2][rank] if is_spec and t[2] is not None else 3
    seed = t[-1] if is_spec else 0
    if s == "derive":
        if dim0 % size == 0 and seed % 3 == 0:
            return None
        first = seed % (dim0 + 1)
        parts = [first, dim0 - first] if size == 2 else [dim0]
        return torch.tensor(parts) if seed % 2 else parts
    if s == "none_odd":
        return None  # valid where dim 0 divides
    if s == "len":
        return [dim0] + [0] * size
    if s == "neg":
        return [-1, dim0 + 1][:size] if size == 2 else [-1]
    if s == "sum":
        return [dim0 + 1] + [0] * (size - 1)
    return HUGE_SPLITS.get(s, s) if isinstance(s, str) else s


def judge_splits(splits, dim0, size):
    if splits is None:
        return None if dim0 % size == 0 else bad(ValueError, "splits")
    if isinstance(splits, torch.Tensor):
        return None if _valid_split_list(splits.tolist(), dim0, size) else bad(ValueError, "splits")
    if not isinstance(splits, (list, tuple, str)):
        return bad(TypeError, "splits")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in splits):
        return bad(TypeError, "splits")
    return None if _valid_split_list(splits, dim0, size) else bad(ValueError, "splits")


def _valid_split_list(splits, dim0, size):
    return len(splits) == size and all(s >= 0 for s in splits) and sum(splits) == dim0


def alltoall_case(i, spec):
    fn, kw, _ = spec
    r = hvd.rank()
    token = kw.get("process_set", "omit")
    ranks = set_ranks(token) or [0, 1]
    size = len(ranks)
    splits = splits_of(kw, r, size)
    problem = judge_tensor(kw["tensor"], r, min_dim=1) or judge_name(kw["name"])
    problem = problem or judge_any_process_set(token, r)
    if problem is None:
        dim0 = kw["tensor"][2][r]
        problem = judge_splits(splits, dim0, size)
    tensor = build(kw["tensor"], r)
    args = kwargs_of(kw, r, "process_set")

    def run():
        out = getattr(hvd, fn)(tensor, splits, name=unique_name(kw, "alltoall", i), **args)
        return hvd.synchronize(out) if "async" in fn else out

    def verify(out):
        output, received = out if isinstance(out, tuple) else (out, None)
        me = ranks.index(r)
        parts, got = [], []
        for k in ranks:
            sk = splits_of(kw, k, size)
            dim0 = kw["tensor"][2][k]
            sk = [dim0 // size] * size if sk is None else [int(s) for s in sk]
            start = sum(sk[:me])
            parts.append(values(kw["tensor"], k)[start : start + sk[me]])
            got.append(sk[me])
        assert_close(output, torch.cat(parts))
        if received is not None:
            assert received.tolist() == got, (received, got)

    return run, problem, verify


# ---- grouped ---------------------------------------------------------------------------------


@st.composite
def tensor_list(draw, min_dim=0, same_dim0=True):
    n = draw(st.integers(1, 4))
    return tuple(draw(tensor_spec(min_dim, same_dim0)) for _ in range(n))


@st.composite
def bad_tensor_list(draw, min_dim=0, same_dim0=True):
    """A list of tensor specs, spoiled: not a list, empty, one bad element, mixed devices,
    or aliased elements (("SAME", j): element j again; ("OVERLAP",): two overlapping views)."""
    good = draw(tensor_list(min_dim, same_dim0))
    how = draw(st.sampled_from(["not_list", "empty", "element", "same", "overlap", "good"]))
    if how == "not_list":
        return draw(st.sampled_from([good[0], 5, None, "ab"]))
    if how == "empty":
        return draw(st.sampled_from([(), []]))
    at = draw(st.integers(0, len(good)))
    if how == "element":
        return good[:at] + (draw(any_tensor(min_dim, same_dim0)),) + good[at:]
    if how == "same":  # an earlier element again
        return good + (("SAME", draw(st.integers(0, len(good) - 1))),)
    if how == "overlap":
        return good[:at] + (("OVERLAP", draw(st.sampled_from(DTYPES))),) + good[at:]
    return good


def build_list(specs, rank):
    """The tensors of a list spec on `rank`; the values each rank contributes (rank -> list)."""
    if isinstance(specs, tuple) and specs and specs[0] == "T":
        return build(specs, rank)
    if not isinstance(specs, (tuple, list)):
        return specs
    out = []
    for s in specs:
        if isinstance(s, tuple) and s and s[0] == "SAME":
            out.append(out[s[1]])
        elif isinstance(s, tuple) and s and s[0] == "OVERLAP":
            base = torch.arange(1.0, 6.0, device=device()).to(getattr(torch, s[1]))
            out.append(base[0:3])
            out.append(base[2:5])
        else:
            out.append(build(s, rank))
    return out


def judge_list(specs, rank, min_dim=0, in_place=False):
    if not isinstance(specs, (tuple, list)) or (specs and specs[0] == "T"):
        return bad(TypeError, "tensors")
    if not specs:
        return bad(ValueError, "tensors", "empty")
    # The same tensor twice shares memory only when it has elements (an empty one is never
    # written); two overlapping views always do.
    aliased = any(
        s[0] == "OVERLAP" or (s[0] == "SAME" and spec_numel(specs[s[1]], rank) > 0)
        for s in specs
        if isinstance(s, tuple) and s
    )
    # Every tensor is checked first, then (in place) that none shares memory.
    for writes in (False, True) if in_place else (False,):
        for s in specs:
            if not (isinstance(s, tuple) and s and s[0] in ("SAME", "OVERLAP")):
                problem = judge_tensor(s, rank, min_dim, writes, what="tensors")
                if problem:
                    return problem
    return bad(ValueError, "tensors", "memory") if aliased and in_place else None


def spec_numel(spec, rank):
    _, _, dim0s, rest, _, _ = spec
    return math.prod(((dim0s[rank],) if dim0s is not None else ()) + rest)


def list_values(specs, rank):
    return [t.contiguous().cpu() for t in build_list(specs, rank)]


GROUPED_ALLREDUCE_CALLS = call(
    ["grouped_allreduce", "grouped_allreduce_async", "grouped_allreduce_",
     "grouped_allreduce_async_"],
    {**op_args(), "tensors": (tensor_list(), bad_tensor_list())},
)  # fmt: skip


def grouped_allreduce_case(i, spec):
    fn, kw, _ = spec
    r, in_place = hvd.rank(), fn.endswith("_")
    problem = judge_list(kw["tensors"], r, in_place=in_place) or judge_scales_op(kw, r)
    tensors = build_list(kw["tensors"], r)
    args = kwargs_of(kw, r, "op", "average", "prescale_factor", "postscale_factor")

    def run():
        out = getattr(hvd, fn)(tensors, name=unique_name(kw, "grouped_allreduce", i), **args)
        return hvd.synchronize(out) if "async" in fn else out

    def verify(outs):
        assert len(outs) == len(tensors)
        per_rank = [list_values(kw["tensors"], k) for k in (0, 1)]
        for j, out in enumerate(outs):
            xs = [per_rank[k][j] for k in (0, 1)]
            assert_close(out, reference(xs, kw["op"], *scales(kw)))
            assert (out is tensors[j]) == in_place

    return run, problem, verify


GROUPED_ALLGATHER_CALLS = call(
    ["grouped_allgather", "grouped_allgather_async"],
    {**NAME_ARGS, "tensors": (tensor_list(1, False), bad_tensor_list(1, False))},
)


def grouped_allgather_case(i, spec):
    fn, kw, _ = spec
    r = hvd.rank()
    problem = judge_list(kw["tensors"], r, min_dim=1) or judge_name(kw["name"])
    tensors = build_list(kw["tensors"], r)

    def run():
        out = getattr(hvd, fn)(tensors, name=unique_name(kw, "grouped_allgather", i))
        return hvd.synchronize(out) if "async" in fn else out

    def verify(outs):
        per_rank = [list_values(kw["tensors"], k) for k in (0, 1)]
        for j, out in enumerate(outs):
            assert_close(out, torch.cat([per_rank[k][j] for k in (0, 1)]))

    return run, problem, verify


GROUPED_REDUCESCATTER_CALLS = call(
    ["grouped_reducescatter", "grouped_reducescatter_async"],
    {
        **op_args([hvd.Sum, hvd.Average], with_average=False),
        "tensors": (tensor_list(1), bad_tensor_list(1)),
    },
)


def grouped_reducescatter_case(i, spec):
    fn, kw, _ = spec
    r = hvd.rank()
    problem = judge_list(kw["tensors"], r, min_dim=1) or judge_scales_op(
        kw, r, [hvd.Sum, hvd.Average]
    )
    tensors = build_list(kw["tensors"], r)
    args = kwargs_of(kw, r, "op", "prescale_factor", "postscale_factor")

    def run():
        out = getattr(hvd, fn)(tensors, name=unique_name(kw, "grouped_reducescatter", i), **args)
        return hvd.synchronize(out) if "async" in fn else out

    def verify(outs):
        per_rank = [list_values(kw["tensors"], k) for k in (0, 1)]
        for j, out in enumerate(outs):
            xs = [per_rank[k][j] for k in (0, 1)]
            assert_close(out, rows_of(reference(xs, kw["op"], *scales(kw)), 2, r))

    return run, problem, verify


# ---- join, barrier, synchronize / poll, objects ----------------------------------------------

BARRIER_CALLS = call(["barrier"], PS_ANY)


def barrier_case(i, spec):
    _, kw, _ = spec
    problem = judge_any_process_set(kw.get("process_set", "omit"), hvd.rank())

    def verify(out):
        assert out is None

    return lambda: hvd.barrier(**set_kwargs(kw)), problem, verify


JOIN_CALLS = call(
    ["join"],
    {
        **PS_ANY,
        "device": (
            st.sampled_from([None, -1, "cpu"]),
            st.one_of(st.sampled_from(DEVICES), st.integers(-(2**40), 2**40)),
        ),
    },
)


def device_value(token):
    return torch.device("cpu") if token == "cpu_device" else token


def judge_device(dev):
    if dev in (None, -1, "cpu", "cpu_device") and not isinstance(dev, bool):
        return None
    if isinstance(dev, bool) or not isinstance(dev, (int, str)):
        return bad(TypeError, "device")
    if isinstance(dev, int) and dev < 0:
        return bad(ValueError, "device")
    cuda = isinstance(dev, int) or dev.startswith("cuda")
    if dev == "cuda:-1" or not cuda or not torch.cuda.is_available():
        return bad(ValueError, "device")
    index = dev if isinstance(dev, int) else int(dev.partition(":")[2] or 0)
    return None if index < torch.cuda.device_count() else bad((ValueError, RuntimeError), "device")


def join_case(i, spec):
    _, kw, _ = spec
    r = hvd.rank()
    token = kw.get("process_set", "omit")
    problem = judge_device(kw["device"]) or judge_any_process_set(token, r)

    def run():
        return hvd.join(device=device_value(kw["device"]), **set_kwargs(kw))

    def verify(last):
        ranks = set_ranks(token)
        assert last in ranks, (last, ranks)
        if len(ranks) > 1:
            agreed.append(("join", i, last))

    return run, problem, verify


@st.composite
def handle_spec(draw):
    return draw(
        st.one_of(
            st.sampled_from(["live", "stale", "live_grouped", "stale_grouped"]),
            st.sampled_from([True, False, "1", None, 1.5, [1], 2**70, -(2**70), -1]),
            st.integers(-(2**63), 2**63 - 1),
        )
    )


HANDLE_CALLS = st.tuples(st.sampled_from(["synchronize", "poll"]), handle_spec())


def handle_case(i, spec):
    fn, token = spec
    x = torch.full((3,), float(hvd.rank() + 1), device=device())

    def submit():
        if token.endswith("grouped"):
            return hvd.grouped_allreduce_async([x, x], name=f"fz.handle.{i}", op=hvd.Sum)
        return hvd.allreduce_async(x, name=f"fz.handle.{i}", op=hvd.Sum)

    def finish(out):
        outs = out if isinstance(out, list) else [out]
        for o in outs:
            assert torch.equal(o.cpu(), torch.full((3,), 3.0)), o

    if token in ("live", "live_grouped"):

        def run():
            h = submit()
            if fn == "poll":
                assert hvd.poll(h) in (True, False)
            return hvd.synchronize(h)

        return run, None, finish
    if token in ("stale", "stale_grouped"):
        return _stale_case(fn, submit, finish)
    if isinstance(token, bool) or not isinstance(token, int):
        problem = bad(TypeError, "handle")
    else:
        problem = bad(ValueError, "handle")
    return lambda: getattr(hvd, fn)(token), problem, None


def _stale_case(fn, submit, finish):
    h = submit()
    finish(hvd.synchronize(h))  # h is now stale: synchronized already
    return lambda: getattr(hvd, fn)(h), bad(ValueError, "handle", "unknown"), None


OBJECTS = [1, "text", {"a": [1, 2]}, None, (1.5,), b"\x00"]
UNPICKLABLE = ["lambda", "lock", "generator"]


def object_value(token, rank):
    if token == "lambda":
        return lambda: 1
    if token == "lock":
        return threading.Lock()
    if token == "generator":
        return (k for k in range(3))
    return (token, rank)


def judge_object(token):
    return bad(TypeError, "obj", "pickle") if token in UNPICKLABLE else None


OBJECT_ARGS = {
    "obj": (st.sampled_from(OBJECTS), st.sampled_from(OBJECTS + UNPICKLABLE)),
    **NAME_ARGS,
    **PS_ANY,
}
BROADCAST_OBJECT_CALLS = call(
    ["broadcast_object"],
    {**OBJECT_ARGS, "root_rank": (st.sampled_from([0, 1]), st.sampled_from(ROOTS))},
)


def broadcast_object_case(i, spec):
    _, kw, _ = spec
    r = hvd.rank()
    token = kw.get("process_set", "omit")
    problem = (
        judge_name(kw["name"])
        or judge_any_process_set(token, r)
        or judge_root(kw["root_rank"], token, r)
        or judge_object(kw["obj"])
    )

    def run():
        obj = object_value(kw["obj"], r)
        name = unique_name(kw, "broadcast_object", i)
        return hvd.broadcast_object(obj, kw["root_rank"], name=name, **set_kwargs(kw))

    def verify(out):
        assert out == (kw["obj"], kw["root_rank"]), out

    return run, problem, verify


ALLGATHER_OBJECT_CALLS = call(["allgather_object"], OBJECT_ARGS)


def allgather_object_case(i, spec):
    _, kw, _ = spec
    r = hvd.rank()
    token = kw.get("process_set", "omit")
    problem = judge_name(kw["name"]) or judge_any_process_set(token, r) or judge_object(kw["obj"])

    def run():
        obj = object_value(kw["obj"], r)
        return hvd.allgather_object(
            obj, name=unique_name(kw, "allgather_object", i), **set_kwargs(kw)
        )

    def verify(out):
        assert out == [(kw["obj"], k) for k in set_ranks(token)], out

    return run, problem, verify


# ---- checks ----------------------------------------------------------------------------------

# collective -> (calls drawn, their strategy, case maker); the number drawn leaves >= 1,000
# bad ones on every rank after the valid ones (counted and asserted).
FAMILIES = {
    "allreduce": (1550, ALLREDUCE_CALLS, allreduce_case),
    "allgather": (1450, ALLGATHER_CALLS, allgather_case),
    "broadcast": (1400, BROADCAST_CALLS, broadcast_case),
    "reducescatter": (1450, REDUCESCATTER_CALLS, reducescatter_case),
    "alltoall": (1350, ALLTOALL_CALLS, alltoall_case),
    "grouped_allreduce": (1550, GROUPED_ALLREDUCE_CALLS, grouped_allreduce_case),
    "grouped_allgather": (1700, GROUPED_ALLGATHER_CALLS, grouped_allgather_case),
    "grouped_reducescatter": (1450, GROUPED_REDUCESCATTER_CALLS, grouped_reducescatter_case),
    "join": (1150, JOIN_CALLS, join_case),
    "barrier": (1100, BARRIER_CALLS, barrier_case),
    "synchronize_poll": (1100, HANDLE_CALLS, handle_case),
    "broadcast_object": (1450, BROADCAST_OBJECT_CALLS, broadcast_object_case),
    "allgather_object": (1350, ALLGATHER_OBJECT_CALLS, allgather_object_case),
}


def check_setup():
    # set0 = [0] and set1 = [1] registered; "removed" registered, then removed.
    assert hvd.size() == 2, "the fuzz runs on exactly 2 ranks"
    sets["removed"] = hvd.add_process_set([1])
    assert hvd.remove_process_set(sets["removed"])
    sets["set0"] = hvd.add_process_set([0])
    sets["set1"] = hvd.add_process_set([1])
    sets["global"] = hvd.global_process_set
    sets["global_ps"] = "global_process_set"  # a string, not the set


def _family_check(collective):
    examples, strategy, case_of = FAMILIES[collective]
    return lambda: fuzz(collective, strategy, examples, case_of)


for _collective in FAMILIES:
    globals()[f"check_fuzz_{_collective}"] = _family_check(_collective)


def check_healthy_after():
    # The engine still works on every rank, results agree, and nothing is left in flight.
    out = hvd.allreduce(torch.full((5,), float(hvd.rank() + 1), device=device()), op=hvd.Sum)
    assert torch.equal(out.cpu(), torch.full((5,), 3.0)), out
    everyone = hvd.allgather_object(agreed, name="fz.agreed")
    assert everyone[0] == everyone[1], "the ranks' valid calls returned different results"
    assert _C.engine_handle_count() == 0, _C.engine_handle_count()
    table = {c: (counts[c, "bad"], counts[c, "valid"]) for c in FAMILIES}
    print(f"rank {hvd.rank()}: calls (bad, valid) per collective: {table}", flush=True)
    low = {c: n for c, (n, _) in table.items() if n < BAD_CALLS}
    assert not low, f"fewer than {BAD_CALLS} bad calls: {low}"


CHECKS = checks_of(globals())

if __name__ == "__main__":
    import sys

    worker_main(CHECKS, sys.argv[1:])
