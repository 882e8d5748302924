"""Autotune (gradfuse.autotune): the search and the tuner with fake timings (no engine), the
GRADFUSE_AUTOTUNE* / HOROVOD_AUTOTUNE* options, and real ranks (tests/autotune_worker.py, 2 and
3 ranks): the engine's settings switch at the same negotiation cycle on every rank, a training
run with autotune on."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import autotune_worker
from gradfuse import autotune, config
from multiproc import assert_check_ok, ranks_override, run_ranks

# ---- the search ------------------------------------------------------------------------------

CANDIDATES = {"a": (1, 2, 3, 4), "b": (10, 20, 30)}


def run_search(score, max_samples=20, start=None):
    """The trials a CoordinateSearch makes when each trial scores score(trial)."""
    search = autotune.CoordinateSearch(start or {"a": 2, "b": 20}, CANDIDATES, max_samples)
    trials = []
    while not search.done:
        trials.append(dict(search.current))
        search.report(score(search.current))
    return trials, search


def bowl(trial):  # lowest at a=4, b=10
    return (trial["a"] - 4) ** 2 + (trial["b"] - 10) ** 2 / 100 + 1.0


def test_search_tries_each_knob_in_turn_and_keeps_the_best():
    trials, search = run_search(bowl)
    assert trials == [
        {"a": 2, "b": 20},  # the start
        {"a": 1, "b": 20},
        {"a": 3, "b": 20},
        {"a": 4, "b": 20},  # a's best is 4: b is searched with it
        {"a": 4, "b": 10},
        {"a": 4, "b": 30},
    ]
    assert search.best == {"a": 4, "b": 10} and search.best_score == 1.0


def test_search_is_deterministic_given_the_same_scores():
    noisy = torch.Generator().manual_seed(7)
    scores = torch.rand(20, generator=noisy, dtype=torch.float64).tolist()

    def replay():
        it = iter(scores)
        return run_search(lambda trial: next(it))

    (trials1, s1), (trials2, s2) = replay(), replay()
    assert trials1 == trials2 and s1.best == s2.best and s1.best_score == s2.best_score
    # And the outcome follows the scores: the best is the trial with the lowest score.
    assert s1.best == trials1[min(range(len(trials1)), key=lambda i: scores[i])]


def test_search_stops_at_its_budget_and_ties_keep_the_earlier_trial():
    trials, search = run_search(lambda trial: 5.0, max_samples=3)
    assert len(trials) == 3 and search.done
    assert search.best == {"a": 2, "b": 20}  # equal scores: the start stays best
    with pytest.raises(RuntimeError, match="ended"):
        search.report(1.0)
    with pytest.raises(ValueError, match="max_samples"):
        autotune.CoordinateSearch({"a": 1}, {"a": (1,)}, 0)


# ---- the tuner, with fake clocks, allreduce and engine -----------------------------------------


class FakeWorld:
    """Stands in for the engine: a clock the test advances, an allreduce that takes the max
    with another rank's times, and the settings requests and bucket changes the tuner makes."""

    def __init__(self, monkeypatch, other_rank_times=None):
        self.now, self.requests, self.buckets = 0.0, [], []
        self.other = other_rank_times or {}
        monkeypatch.setattr(autotune.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(autotune.collectives, "allreduce", self.allreduce)
        monkeypatch.setattr(
            autotune,
            "request_engine_settings",
            lambda t, c, process_set: self.requests.append((t, c)),
        )

    def allreduce(self, times, name, op, process_set):
        assert times.dtype == torch.float64 and op == autotune.collectives.Max
        other = self.other.get(name, torch.zeros_like(times))
        return torch.maximum(times, other)


def tuner(tmp_path, explicit=(), warmup=1, steps=3, max_samples=4, log=True, set_bucket=None):
    cfg = SimpleNamespace(
        autotune_steps_per_sample=steps,
        autotune_warmup_samples=warmup,
        autotune_max_samples=max_samples,
        autotune_log=str(tmp_path / "tune.csv") if log else "",
        fusion_threshold_bytes=64 << 20,
        cycle_time_ms=1.0,
        explicit=frozenset(explicit),
    )
    process_set = SimpleNamespace(rank=lambda: 0)
    return autotune.Autotuner(cfg, process_set, 25, set_bucket)


def run_steps(world, t, step_times):
    t.after_step()  # the first step only starts the clock
    for dt in step_times:
        world.now += dt
        t.after_step()


def test_tuner_scores_the_median_of_the_slowest_rank_and_logs(monkeypatch, tmp_path):
    # The other rank is slower in the warm-up's second step and in sample 1's third.
    other = {
        "gradfuse.autotune.0": torch.tensor([0.0, 9.0, 0.0], dtype=torch.float64),
        "gradfuse.autotune.1": torch.tensor([0.0, 0.0, 9.0], dtype=torch.float64),
    }
    world = FakeWorld(monkeypatch, other)
    buckets = []
    t = tuner(tmp_path, set_bucket=buckets.append, max_samples=3)
    # warm-up (discarded), then 3 samples: the start, then bucket_cap_mb 1 and 5.
    run_steps(world, t, [1.0, 1.0, 1.0] + [2.0, 3.0, 1.0] + [1.5] * 3 + [0.5] * 3)
    assert not t.active
    assert buckets == [1.0, 5.0]  # tried in turn; 5 is the best and stays
    assert world.requests == []  # the engine's settings never left the start
    lines = (tmp_path / "tune.csv").read_text().splitlines()
    assert lines == [
        "sample,phase,bucket_cap_mb,fusion_threshold_bytes,cycle_time_ms,step_time_s",
        "1,warmup,25.0,67108864,1.0,1",
        "2,sample,25.0,67108864,1.0,3",  # median of max(2, 0), max(3, 0), max(1, 9)
        "3,sample,1.0,67108864,1.0,1.5",
        "4,sample,5.0,67108864,1.0,0.5",
        "4,best,5.0,67108864,1.0,0.5",
    ]
    run_steps(world, t, [1.0] * 6)  # frozen: nothing more is measured or changed
    assert buckets == [1.0, 5.0] and len(lines) == len(
        (tmp_path / "tune.csv").read_text().splitlines()
    )


def test_tuner_leaves_explicit_settings_and_fixed_buckets(monkeypatch, tmp_path):
    world = FakeWorld(monkeypatch)
    t = tuner(tmp_path, explicit={"cycle_time_ms"}, warmup=0, steps=1, max_samples=3, log=False)
    assert set(t.search.best) == {"bucket_cap_mb", "fusion_threshold_bytes", "cycle_time_ms"}
    run_steps(world, t, [3.0, 2.0, 1.0])
    # No bucket knob (set_bucket None), cycle time explicit: fusion threshold alone is tuned.
    assert world.requests == [(1 << 20, 1.0), (4 << 20, 1.0)]
    assert not t.active and t.search.best["fusion_threshold_bytes"] == 4 << 20
    t = tuner(tmp_path, explicit={"cycle_time_ms", "fusion_threshold_bytes"}, log=False)
    assert not t.active  # nothing left to tune


# ---- options -----------------------------------------------------------------------------------


@pytest.fixture
def env(monkeypatch):
    for var in list(__import__("os").environ):
        if var.startswith(("GRADFUSE_", "HOROVOD_")):
            monkeypatch.delenv(var)
    return lambda **kv: [monkeypatch.setenv(k, v) for k, v in kv.items()]


def test_autotune_options_from_gradfuse_and_horovod_variables(env):
    cfg = config.resolve()
    assert (cfg.autotune, cfg.autotune_log) == (False, "")
    assert (cfg.autotune_warmup_samples, cfg.autotune_steps_per_sample) == (3, 10)
    assert cfg.autotune_max_samples == 20 and cfg.explicit == frozenset()
    env(
        HOROVOD_AUTOTUNE="1",
        HOROVOD_AUTOTUNE_LOG="/tmp/h.csv",
        HOROVOD_AUTOTUNE_WARMUP_SAMPLES="0",
        HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE="5",
        HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES="7",
        HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE="0.8",  # no counterpart: ignored
        HOROVOD_CYCLE_TIME="2",
    )
    cfg = config.resolve()
    assert (cfg.autotune, cfg.autotune_log, cfg.autotune_warmup_samples) == (True, "/tmp/h.csv", 0)
    assert (cfg.autotune_steps_per_sample, cfg.autotune_max_samples) == (5, 7)
    assert "cycle_time_ms" in cfg.explicit and "fusion_threshold_bytes" not in cfg.explicit
    env(GRADFUSE_AUTOTUNE="0", GRADFUSE_AUTOTUNE_MAX_SAMPLES="9")
    cfg = config.resolve(fusion_threshold_bytes=1024)
    assert (cfg.autotune, cfg.autotune_max_samples) == (False, 9)
    assert "fusion_threshold_bytes" in cfg.explicit


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("GRADFUSE_AUTOTUNE", "maybe"),
        ("GRADFUSE_AUTOTUNE_STEPS_PER_SAMPLE", "0"),
        ("GRADFUSE_AUTOTUNE_MAX_SAMPLES", "0"),
        ("GRADFUSE_AUTOTUNE_WARMUP_SAMPLES", "-1"),
        ("HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE", "ten"),
    ],
)
def test_bad_autotune_option_raises_naming_it(env, var, raw):
    env(**{var: raw})
    with pytest.raises(ValueError, match=var):
        config.resolve()


# ---- real ranks ----------------------------------------------------------------------------------

# In this order: the mismatch fails the engine (the check restarts it); training restarts
# gradfuse with autotune on.
CHECKS = [
    "agreement_waits_for_every_rank",
    "staggered_requests_switch_at_one_cycle",
    "bad_values_raise_naming_the_argument",
    "different_requests_fail_every_rank",
    "training_with_autotune",
]
assert sorted(CHECKS) == sorted(autotune_worker.CHECKS)
CONFIGS = [ranks_override(0)] if ranks_override(0) else [2, 3]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda n: f"{n}ranks")
def group(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"autotune{n}")
    checks = CHECKS if n > 1 else [c for c in CHECKS if c != "different_requests_fail_every_rank"]
    return n, run_ranks(tmp, n, "gradfuse.run", HERE / "autotune_worker.py", checks, timeout=300)


@pytest.mark.timeout(360)
@pytest.mark.parametrize("check", CHECKS)
def test_autotune_check(group, check):
    n, (proc, results) = group
    if n == 1 and check == "different_requests_fail_every_rank":
        pytest.skip("needs two ranks")
    assert_check_ok(proc, results, check)
