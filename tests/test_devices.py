"""Per-rank devices, checked without a GPU (issue 11, items 1, 2, 4 and 5).

Ranks agree on the device *type* of a collective; the index is each rank's own (rank 0 trains
on cuda:0, rank 1 on cuda:1). The negotiation of several ranks is simulated with the engine's
own code (gradfuse._C._testing.simulate_negotiation: each rank has its own controller and
response cache, encodes its requests to bytes and decides from every rank's bytes), so the
"mismatched device" failure of the first multi-GPU job is reproduced here, with no process
group. The device decisions (engine/devices.h) and handles that wait for device work
(engine/handles.h) are driven the same way."""

from __future__ import annotations

import threading
import time

import gradfuse
import pytest
import torch
from gradfuse import _C, _engine
from gradfuse import config as gf_config

T = _C._testing
ALLREDUCE, ALLGATHER, BROADCAST = 0, 1, 2


def req(name, device, shape=(4,), dtype="float32", op=ALLREDUCE):
    return (name, op, dtype, device, list(shape))


def simulate(rounds, size, cache_capacity=64, threshold=1 << 20):
    return T.simulate_negotiation(size, cache_capacity, threshold, rounds)


def same_on_every_rank(results):
    """Every rank decided the same responses and batches; returns rank 0's."""
    first = results[0]
    for r, res in enumerate(results):
        assert res.responses == first.responses, f"rank {r} decided differently"
        assert res.batches == first.batches, f"rank {r} batched differently"
    return first


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_on_different_gpus_pair_up(size):
    # Rank r holds its gradients on cuda:r, as with torchrun and one GPU per rank.
    names = ["w1", "b1", "w2"]
    rounds = [
        [
            [req(n, f"cuda:{r}", (r + 5,) if n == "b1" else (3, 4)) for n in names]
            for r in range(size)
        ]
    ]
    # b1 differs in shape per rank on purpose: a real mismatch must still be reported.
    res = same_on_every_rank(simulate(rounds, size)[0])
    kinds = {name: (kind, dev, err) for kind, name, dev, err in res.responses}
    assert kinds["w1"] == ("run", "cuda", "")
    assert kinds["w2"] == ("run", "cuda", "")
    assert kinds["b1"][0] == "error" and "mismatched shape" in kinds["b1"][2]
    assert "device" not in kinds["b1"][2]
    # The two agreeing CUDA tensors fuse into one batch on every rank.
    assert res.batches == [["w1", "w2"]]


def test_cpu_against_cuda_still_raises_on_every_rank():
    rounds = [[[req("g", "cpu")], [req("g", "cuda:1")], [req("g", "cuda:2")]]]
    res = same_on_every_rank(simulate(rounds, 3)[0])
    ((kind, name, _dev, error),) = res.responses
    assert (kind, name) == ("error", "g")
    assert "mismatched device type for tensor 'g'" in error
    assert "cpu on rank 0" in error and "cuda on ranks 1, 2" in error
    assert res.batches == []


def test_response_cache_hits_on_every_rank_despite_different_indices():
    # Before: the cache stored rank 0's request (cuda:0), so rank 1 (cuda:1) never hit.
    step = [[req(f"t{i}", f"cuda:{r}", (i + 1, 2)) for i in range(5)] for r in range(2)]
    first, second, third = simulate([step, step, step], 2)
    for r in range(2):
        assert (first[r].cache_hits, first[r].cache_misses) == (0, 5)
        assert (second[r].cache_hits, second[r].cache_misses) == (5, 0)
        assert (third[r].cache_hits, third[r].cache_misses) == (5, 0)
    for results in (first, second, third):
        res = same_on_every_rank(results)
        assert [k for k, *_ in res.responses] == ["run"] * 5
        assert res.batches == [[f"t{i}" for i in range(5)]]


def test_cpu_and_cuda_tensors_batch_separately_and_alike():
    per_rank = [
        [req("c1", "cpu"), req("g1", f"cuda:{r}"), req("c2", "cpu"), req("g2", f"cuda:{r}")]
        for r in range(2)
    ]
    res = same_on_every_rank(simulate([per_rank], 2)[0])
    assert res.batches == [["c1", "c2"], ["g1", "g2"]]


def test_barrier_and_join_carry_no_device():
    # join(device=...) puts its empty marker on a GPU on one rank and not on another: the
    # engine announces barrier/join as CPU, so they still agree (the simulation takes the
    # device as given, so this checks the controller sees no difference for equal types).
    rounds = [[[req("b", "cpu", (0,), op=5)], [req("b", "cpu", (0,), op=5)]]]
    res = same_on_every_rank(simulate(rounds, 2)[0])
    assert [k for k, *_ in res.responses] == ["run"]


@pytest.mark.parametrize(
    "device, built, group, expected",
    [
        ("cpu", False, False, None),
        ("cuda:0", True, True, None),
        ("cuda:1", False, False, ["built without CUDA", "GRADFUSE_CUDA=ON", "cuda:1"]),
        ("cuda:0", True, False, ["no process group for CUDA tensors", "is_available"]),
        ("meta", True, True, ["CPU and CUDA tensors only", "meta"]),
    ],
)
def test_device_support_errors(device, built, group, expected):
    message = T.device_error("allreduce", device, built, group)
    if expected is None:
        assert message == ""
    else:
        assert message.startswith(f"gradfuse.allreduce: tensor is on {device}")
        for part in expected:
            assert part in message


def test_enqueue_rejects_unsupported_devices_with_the_reason(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    gradfuse.init()
    try:
        with pytest.raises(ValueError, match="tensor is on meta; gradfuse runs collectives on CPU"):
            gradfuse.allreduce(torch.empty(3, device="meta"), name="on_meta")
        assert gradfuse.allreduce(torch.ones(3), name="on_cpu").tolist() == [1.0, 1.0, 1.0]
    finally:
        gradfuse.shutdown()


def test_one_cuda_device_per_rank():
    out = T.device_binding(
        [
            ("placeholder", "cuda:3"),  # nothing bound: the current device (index given)
            ("bind", "cuda:1"),
            ("bind", "cuda:1"),
            ("placeholder", "cuda:0"),  # the bound device, whatever the current one is
            ("placeholder", "cpu"),
            ("bind", "cuda:0"),
            ("bind_if_unbound", "cuda:2"),  # join(device=2) after training on cuda:1: ignored
            ("placeholder", "cuda:0"),
        ]
    )
    assert out[0] == "cuda:3"
    assert out[1:3] == ["", ""]
    assert out[3] == "cuda:1"
    assert out[4] == "cpu"
    assert "gradfuse.allreduce: tensor is on cuda:0" in out[5]
    assert "this rank's engine runs on cuda:1" in out[5]
    assert "torch.cuda.set_device" in out[5]
    assert out[6] == ""
    assert out[7] == "cuda:1"


def test_join_device_binds_when_nothing_is_bound():
    out = T.device_binding(
        [("bind_if_unbound", "cuda:2"), ("placeholder", "cuda:0"), ("bind", "cuda:1")]
    )
    assert out[1] == "cuda:2"
    assert "runs on cuda:2" in out[2]


def start_waiter(handle):
    """A thread waiting on `handle`; the errors its wait raised are collected in the list."""
    errors = []

    def waiter():
        try:
            _C.engine_wait(handle)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    return thread, errors


def test_handle_is_done_only_when_its_device_work_is():
    work = T.FakeDeviceWork()
    h = T.handle_with_device_work("dev", work)
    try:
        assert not _C.engine_poll(h)
        assert not _C.engine_poll(h)
        work.finish()
        assert _C.engine_poll(h)
        _C.engine_wait(h)  # returns at once, no error
    finally:
        T.discard_handle(h)


def test_wait_blocks_until_the_device_work_finishes():
    work = T.FakeDeviceWork()
    h = T.handle_with_device_work("dev", work)
    finished = threading.Event()

    def waiter():
        _C.engine_wait(h)
        finished.set()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        assert not finished.is_set(), "wait() returned before the device work finished"
        work.finish()
        assert finished.wait(5), "wait() did not return after the device work finished"
    finally:
        T.discard_handle(h)


def test_device_failure_reaches_the_waiting_handle():
    work = T.FakeDeviceWork()
    h = T.handle_with_device_work("dev", work)
    thread, errors = start_waiter(h)
    try:
        time.sleep(0.1)
        work.fail("the NCCL transport reported on rank 1 that a peer failed")
        thread.join(5)
        assert not thread.is_alive(), "wait() hung after the device work failed"
        assert errors == ["the NCCL transport reported on rank 1 that a peer failed"]
        assert _C.engine_poll(h)
    finally:
        T.discard_handle(h)


def test_engine_stop_fails_handles_still_waiting_for_the_device():
    work = T.FakeDeviceWork()
    waiting = T.handle_with_device_work("dev", work)
    finished_work = T.FakeDeviceWork()
    finished_work.finish()
    finished = T.handle_with_device_work("done", finished_work)
    thread, errors = start_waiter(waiting)
    try:
        time.sleep(0.1)
        assert _C.engine_poll(finished)  # finished on its device: not failed below
        assert T.fail_device_pending("gradfuse: rank 1 is dead") == 1
        thread.join(5)
        assert not thread.is_alive(), "wait() hung after the engine failed its device work"
        assert errors == ["gradfuse: rank 1 is dead"]
        _C.engine_wait(finished)  # still a success
    finally:
        T.discard_handle(waiting)
        T.discard_handle(finished)


def test_cuda_backend_option():
    assert gf_config.resolve().cuda_backend == "nccl"
    assert gf_config.resolve(cuda_backend="gloo").cuda_backend == "gloo"
    with pytest.raises(ValueError, match=r'cuda_backend=...\) must be "nccl" or "gloo"'):
        gf_config.resolve(cuda_backend="mpi")


def test_cuda_backend_env(monkeypatch):
    monkeypatch.setenv("GRADFUSE_CUDA_BACKEND", "gloo")
    assert gf_config.resolve().cuda_backend == "gloo"
    monkeypatch.setenv("GRADFUSE_CUDA_BACKEND", "ucc")
    with pytest.raises(ValueError, match="GRADFUSE_CUDA_BACKEND must be"):
        gf_config.resolve()


@pytest.mark.parametrize(
    "built, cuda, nccl, backend, expected",
    [
        (False, True, True, "nccl", None),  # CPU-only gradfuse: never a group it cannot use
        (True, False, True, "nccl", None),  # no GPU
        (True, True, False, "nccl", None),  # torch without NCCL
        (True, True, False, "gloo", "gloo"),
        (True, True, True, "nccl", "nccl"),
    ],
)
def test_engine_creates_only_cuda_groups_it_can_use(
    monkeypatch, built, cuda, nccl, backend, expected
):
    monkeypatch.setattr(_C, "with_cuda", built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    cfg = gf_config.resolve(cuda_backend=backend)
    assert _engine._cuda_backend(cfg) == expected
