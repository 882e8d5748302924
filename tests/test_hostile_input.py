"""Hostile input and concurrency in one process: a peer's negotiation message is validated
field by field (fuzzed: a corrupt message raises an error naming the peer, never crashes);
the timeline survives start/stop from many threads and keeps a bounded number of tracks; and a
handle whose failure was raised is released, not kept forever."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import threading
import time

import gradfuse
import pytest
import torch
from gradfuse import _C

T = _C._testing


def valid_message():
    return T.encode_requests(
        [
            ("grad.w1", 0, "float32", "cpu", [3, 4]),
            ("grad.b1", 1, "float16", "cuda:0", [7]),
            ("a2a", 4, "int64", "cpu", [2, 5]),
        ]
    )


def test_valid_message_round_trips():
    assert T.decode_requests(valid_message(), 5) == 3
    assert T.decode_requests(b"", 5) == 0


@pytest.mark.parametrize(
    "offset, value, field",
    [
        (4 + 7, 9, "invalid operation"),  # name "grad.w1" is 7 bytes, then op
        (4 + 7 + 1, 11, "invalid reduce op"),
        (4 + 7 + 2, 127, "invalid dtype"),
        (4 + 7 + 3, 13, "invalid device type"),
    ],
)
def test_invalid_fields_name_the_peer(offset, value, field):
    data = bytearray(valid_message())
    data[offset] = value
    with pytest.raises(RuntimeError, match=f"rank 5 sent a negotiation message with an {field}"):
        T.decode_requests(bytes(data), 5)


def test_negative_dimension_and_huge_counts():
    data = bytearray(valid_message())
    dim0 = 4 + 7 + 4 + 4 + 1  # name length, name, op/reduce/dtype/device, root, ndim
    data[dim0 : dim0 + 8] = struct.pack("<q", -3)
    with pytest.raises(RuntimeError, match=r"invalid dimension \(-3\)"):
        T.decode_requests(bytes(data), 5)
    # A name length past the end of the message.
    with pytest.raises(RuntimeError, match="truncated negotiation message from rank 5"):
        T.decode_requests(struct.pack("<I", 0x7FFFFFF0) + b"abc", 5)
    # A cache index no rank holds.
    with pytest.raises(RuntimeError, match="rank 5 names response cache entry 77"):
        T.decode_requests(struct.pack("<I", 0x80000000 | 77), 5)


def test_fuzzed_messages_raise_or_decode_never_crash():
    seed = random.randrange(2**31)
    print(f"fuzz seed {seed}")
    rng = random.Random(seed)
    base = valid_message()
    outcomes = {"decoded": 0, "raised": 0}
    for _ in range(3000):
        data = bytearray(base)
        kind = rng.randrange(4)
        if kind == 0:  # flip a few bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # truncate
            data = data[: rng.randrange(len(data))]
        elif kind == 2:  # random tail
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        else:  # random bytes
            data = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 80)))
        try:
            T.decode_requests(bytes(data), 5)
            outcomes["decoded"] += 1
        except RuntimeError as e:
            assert "rank 5" in str(e), str(e)
            outcomes["raised"] += 1
    print(outcomes)
    assert outcomes["raised"] > 1000


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    gradfuse.init()
    yield
    gradfuse.shutdown()


def test_timeline_start_stop_from_many_threads(one_rank, tmp_path):
    errors = []

    def churn(k):
        try:
            for i in range(20):
                gradfuse.start_timeline(str(tmp_path / f"t{k}.{i}.json"))
                gradfuse.allreduce(torch.ones(2), name=f"tl.{k}.{i}", op=gradfuse.Sum)
                gradfuse.stop_timeline()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "start/stop hung"
    assert errors == []
    gradfuse.stop_timeline()
    # Every file that was written is a complete JSON array.
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 120
    for f in files:
        assert isinstance(json.loads(f.read_text()), list), f


def test_timeline_tracks_are_bounded(one_rank, tmp_path):
    path = tmp_path / "many.json"
    gradfuse.start_timeline(str(path))
    n = 4096 + 50  # Timeline::kMaxTracks + 50
    gradfuse.grouped_allreduce([torch.ones(1)] * n, name="many", op=gradfuse.Sum)
    gradfuse.stop_timeline()
    events = json.loads(path.read_text())
    tracks = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert len(tracks) == 4096
    assert tracks[4096].startswith("(more tensors")
    # Names past the cap still have their events, on the shared track, named in args.
    last = f"many.{n - 1}"
    shared = [e for e in events if e.get("ph") == "X" and e["args"]["tensor"] == last]
    assert shared and all(e["tid"] == 4096 for e in shared)


def test_a_failed_handle_is_released_once_raised():
    before = _C.engine_handle_count()
    work = T.FakeDeviceWork()
    h = T.handle_with_device_work("fails", work)
    assert _C.engine_handle_count() == before + 1
    work.fail("gradfuse: the transport said no")
    with pytest.raises(RuntimeError, match="the transport said no"):
        gradfuse.synchronize(h)
    assert _C.engine_handle_count() == before
    with pytest.raises(ValueError, match="unknown"):
        gradfuse.synchronize(h)


def test_ctrl_c_interrupts_a_wait_and_keeps_the_handle():
    work = T.FakeDeviceWork()
    h = T.handle_with_device_work("interrupted", work)
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            gradfuse.synchronize(h)
        assert time.monotonic() - start < 5, "Ctrl-C took too long to end the wait"
        # The handle is intact: it completes once its work does.
        assert not gradfuse.poll(h)
        work.finish()
        assert gradfuse.poll(h)
    finally:
        timer.cancel()
        T.discard_handle(h)
