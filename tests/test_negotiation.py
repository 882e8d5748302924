"""Negotiation's steady state (issue 15): the fast path (every rank sent the same response-cache
references, nothing pending: the round runs them as they are, no per-name comparison) and
inline allreduce (a small cached allreduce's input rides in the negotiation slot and is reduced
from there, with no data collective). Simulated ranks drive the engine's own Negotiator
(gradfuse._C._testing.simulate_negotiation); the inline reduction itself runs on 3 real ranks
(engine_worker.py; test_engine.py runs the same checks at 2 and 4)."""

from __future__ import annotations

from pathlib import Path

import engine_worker
import pytest
from gradfuse import _C
from multiproc import assert_check_ok, run_ranks

T = _C._testing
ALLREDUCE, ALLGATHER, JOIN = 0, 1, 6
HERE = Path(__file__).parent


def req(name, shape=(4,), dtype="float32", op=ALLREDUCE, device="cpu"):
    return (name, op, dtype, device, list(shape))


def simulate(rounds, size, cache_capacity=64, threshold=1 << 20, inline=None):
    return T.simulate_negotiation(size, cache_capacity, threshold, rounds, inline or [])


def agreed(results):
    """Every rank decided the same responses, batches and inline completions; returns rank 0's."""
    first = results[0]
    for r, res in enumerate(results):
        assert res.responses == first.responses, f"rank {r} decided differently"
        assert res.batches == first.batches, f"rank {r} batched differently"
        assert res.inline_responses == first.inline_responses, f"rank {r} inlined differently"
        assert res.fast == first.fast, f"rank {r} took another path"
    return first


STEP = [req("w1", (3, 4)), req("b1", (7,)), req("w2", (5,), "float16"), req("g", (2,), op=1)]


@pytest.mark.parametrize("size", [2, 3])
def test_all_hit_is_a_fast_round_with_the_same_outcome(size):
    rounds = [[STEP] * size] * 3
    first, second, third = (agreed(res) for res in simulate(rounds, size))
    assert not first.fast and second.fast and third.fast
    # The same responses, in submission order, and the same batches as the full negotiation.
    assert first.responses == second.responses == third.responses
    assert [name for _, name, _, _ in second.responses] == ["w1", "b1", "w2", "g"]
    assert first.batches == second.batches == [["w1", "b1"], ["w2"], ["g"]]


def test_one_rank_differs_in_an_attribute_falls_back_and_fails_everywhere():
    changed = [req("w1", (3, 4)), req("b1", (8,)), req("w2", (5,), "float16")]
    rounds = [[STEP[:3]] * 3, [STEP[:3]] * 3, [STEP[:3], STEP[:3], changed], [STEP[:3]] * 3]
    results = [agreed(res) for res in simulate(rounds, 3)]
    assert [res.fast for res in results] == [False, True, False, True]
    kinds = {name: (kind, err) for kind, name, _, err in results[2].responses}
    assert kinds["w1"] == ("run", "") and kinds["w2"] == ("run", "")
    assert kinds["b1"][0] == "error" and "mismatched shape" in kinds["b1"][1]
    assert "[7] on ranks 0, 1; [8] on rank 2" in kinds["b1"][1]


def test_one_rank_misses_or_reorders_no_fast_round_same_responses():
    reordered = list(reversed(STEP))
    rounds = [[STEP, STEP], [STEP, reordered], [STEP + [req("new")], STEP + [req("new")]]]
    results = simulate(rounds, 2)
    res = [agreed(r) for r in results]
    assert [r.fast for r in res] == [False, False, False]
    # Different order on each rank: every name still runs, in the last rank's order.
    assert [name for _, name, _, _ in res[1].responses] == ["g", "w2", "b1", "w1"]
    assert all(kind == "run" for kind, _, _, _ in res[1].responses + res[2].responses)
    assert (results[2][0].cache_hits, results[2][0].cache_misses) == (4, 1)


def test_straggler_is_no_fast_round_but_runs_without_comparison_errors():
    a, b = req("a"), req("b")
    rounds = [[[a, b], [a, b]], [[a, b], []], [[], [a, b]]]
    res = [agreed(r) for r in simulate(rounds, 2)]
    assert [r.fast for r in res] == [False, False, False]
    assert res[1].responses == [] and [n for _, n, _, _ in res[2].responses] == ["a", "b"]


def test_cache_eviction_keeps_every_rank_alike():
    names = [req(f"t{i}") for i in range(3)]
    # Capacity 2, three names in turn: each round evicts one, so most requests miss.
    rounds = [[[names[k % 3]], [names[k % 3]]] for k in range(6)] + [[[names[2]], [names[2]]]]
    results = simulate(rounds, 2, cache_capacity=2)
    res = [agreed(r) for r in results]
    assert all(len(r.responses) == 1 and r.responses[0][0] == "run" for r in res)
    assert [r.fast for r in res] == [False] * 6 + [True]
    assert [results[k][0].cache_hits for k in range(7)] == [0] * 6 + [1]


def test_join_mid_stream_leaves_the_fast_path_and_comes_back():
    a = req("a")
    join = ("join", JOIN, "float32", "cpu", [])
    rounds = [[[a], [a]], [[a], [a]], [[a], [join]], [[join], []], [[a], [a]]]
    res = [agreed(r) for r in simulate(rounds, 2)]
    assert [r.fast for r in res] == [False, True, False, False, True]
    # Rank 1 joined: 'a' runs with it contributing zeros; then the join completes.
    assert [(k, n) for k, n, _, _ in res[2].responses] == [("run", "a")]
    assert [(k, n) for k, n, _, _ in res[3].responses] == [("run", "join")]


@pytest.mark.parametrize("size", [2, 3])
def test_inline_inputs_of_a_cached_small_allreduce(size):
    small, big = req("small", (8,)), req("big", (300,))  # 32 and 1200 bytes
    rounds = [[[small]] * size] * 3 + [[[big]] * size] * 2
    rounds += [[[req("ag", (2,), op=ALLGATHER)]] * size] * 2
    res = [agreed(r) for r in simulate(rounds, size, inline=[1024] * size)]
    assert res[0].inline_responses == []  # a miss: the peers could not size it
    for r in res[1:3]:
        # Every rank's input, in rank order; the tensor needs no batch.
        assert r.inline_responses == [("small", list(range(size)))]
        assert r.batches == [] and [n for _, n, _, _ in r.responses] == ["small"]
    # Too big for the slot, or not an allreduce: the usual way.
    assert all(r.inline_responses == [] and len(r.batches) == 1 for r in res[3:])


def test_a_group_is_fused_not_inlined():
    # Tensors submitted together share a collective (and an in-place span): none goes inline,
    # and the batch order is the submission order.
    group = [req(f"g{i}", (4,)) for i in range(4)]
    results = simulate([[group] * 2] * 3, 2, inline=[1024, 1024])
    res = [agreed(r) for r in results]
    assert all(r.inline_responses == [] and r.batches == [["g0", "g1", "g2", "g3"]] for r in res)
    assert all(results[k][r].inlined == 0 for k in range(3) for r in range(2))
    assert res[1].fast and res[2].fast


def test_inline_needs_every_rank_in_the_deciding_round():
    small = req("small", (8,))
    # Rank 1 never sends inputs inline: the usual way on every rank.
    res = [agreed(r) for r in simulate([[[small]] * 2] * 2, 2, inline=[1024, 0])]
    assert res[1].inline_responses == [] and res[1].batches == [["small"]]
    # Rank 1 submits a round late: rank 0 sends its input again, so it completes inline.
    rounds = [[[small], [small]], [[small], []], [[], [small]]]
    results = simulate(rounds, 2, inline=[1024, 1024])
    res = [agreed(r) for r in results]
    assert res[2].inline_responses == [("small", [0, 1])] and res[2].batches == []
    assert [results[k][0].inlined for k in range(3)] == [0, 1, 1]


def test_no_inline_with_a_joined_rank():
    small = req("small", (8,))
    join = ("join", JOIN, "float32", "cpu", [])
    rounds = [[[small], [small]], [[small], [join]], [[join], []]]
    res = [agreed(r) for r in simulate(rounds, 2, inline=[1024, 1024])]
    assert res[1].inline_responses == [] and res[1].batches == [["small"]]


# ---- 3 real ranks: inline results and the fast path's fallback -------------------------------

CHECKS = [
    "inline_allreduce",
    "inline_allreduce_straggler",
    "inline_allreduce_timeline",
    "fast_path_falls_back",
]


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("negotiation3")
    return run_ranks(tmp, 3, "gradfuse.run", HERE / "engine_worker.py", CHECKS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("check", CHECKS)
def test_three_ranks(three_ranks, check):
    assert check in engine_worker.CHECKS
    proc, results = three_ranks
    assert_check_ok(proc, results, check)
