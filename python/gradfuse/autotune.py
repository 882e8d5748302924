"""Autotune (Horovod's HOROVOD_AUTOTUNE): with ``init(autotune=True)`` (or GRADFUSE_AUTOTUNE=1,
HOROVOD_AUTOTUNE=1), DistributedOptimizer measures its step times and tunes the engine's fusion
threshold, its cycle time and the optimizer's bucket size, then keeps the best settings for the
rest of training. A setting given explicitly (init() keyword, GRADFUSE_* / HOROVOD_* variable,
``bucket_cap_mb=`` / ``groups=``) is left as given, as Horovod leaves fixed parameters.

How it stays identical on every rank:
  - every step, each rank times its optimizer step (end of one ``step()`` to the end of the
    next); after ``autotune_steps_per_sample`` steps one float64 allreduce (op Max: the slowest
    rank sets the pace) gives every rank the same times, and the sample's score is their
    median (seconds per step, lower is better);
  - every rank runs the same deterministic search (:class:`CoordinateSearch`) on those
    identical scores, so every rank picks the same next settings at the same step;
  - the bucket size changes on the Python side at that step boundary; the fusion threshold and
    cycle time go to the engine through :func:`request_engine_settings`, which switches them at
    the same negotiation cycle on every rank (cpp/engine/settings.h).

The search: Horovod fits a Gaussian process (Bayesian optimisation) over fusion threshold and
cycle time. gradfuse runs a coordinate search over a fixed grid instead: measure the starting
settings, then for each knob in turn (bucket size, fusion threshold, cycle time) try each of its
candidate values with the other knobs at their best so far, and keep the best value before
moving to the next knob; stop after ``autotune_max_samples`` samples (or when every candidate was
tried). It has no model and no random state, so the same scores give the same choices, and the
log reads as a plain table. The first ``autotune_warmup_samples`` samples (at the starting
settings) are discarded, as Horovod's warm-up samples are.

``autotune_log`` (GRADFUSE_AUTOTUNE_LOG, HOROVOD_AUTOTUNE_LOG): rank 0 of the optimizer's process
set writes one CSV row per sample (``sample,phase,bucket_cap_mb,fusion_threshold_bytes,
cycle_time_ms,step_time_s``; phase ``warmup``, ``sample`` or ``best``, the last row the settings
kept, as Horovod's log ends with its best parameters).
"""

from __future__ import annotations

import math
import time

import torch

from . import _engine, collectives
from . import process_sets as _sets
from .process_sets import ProcessSet, global_process_set

_MB = 1 << 20
# The grid each knob is searched over (the starting value is added where it is not on it).
CANDIDATES = {
    "bucket_cap_mb": (1.0, 5.0, 10.0, 25.0, 50.0, 100.0),
    "fusion_threshold_bytes": (1 * _MB, 4 * _MB, 16 * _MB, 32 * _MB, 64 * _MB, 128 * _MB),
    "cycle_time_ms": (0.5, 1.0, 2.0, 5.0, 10.0),
}
_LOG_COLUMNS = (
    "sample",
    "phase",
    "bucket_cap_mb",
    "fusion_threshold_bytes",
    "cycle_time_ms",
    "step_time_s",
)


# ---- the engine's agreed settings ------------------------------------------------------------


def request_engine_settings(
    fusion_threshold_bytes=None, cycle_time_ms=None, process_set: ProcessSet = global_process_set
) -> int:
    """Asks the engine of ``process_set`` for a new fusion threshold (bytes) and cycle time
    (ms); None keeps the value in force. Returns at once with the request's generation (this
    rank's request count). The settings take effect at the first negotiation cycle in which
    every rank of the set has made as many requests, the same cycle everywhere, so every rank
    must make the same requests in the same order (ranks asking different settings as the same
    request fail the engine on every rank). A bad value raises ValueError, a bad type
    TypeError, naming the argument."""
    _engine._require()
    ps = _sets._check(process_set, "request_engine_settings")
    current = engine_settings(ps)
    if fusion_threshold_bytes is None:
        fusion_threshold_bytes = current["fusion_threshold_bytes"]
    if cycle_time_ms is None:
        cycle_time_ms = current["cycle_time_ms"]
    if isinstance(fusion_threshold_bytes, bool) or not isinstance(fusion_threshold_bytes, int):
        raise TypeError(
            "fusion_threshold_bytes must be an integer >= 0 (bytes), got "
            f"{fusion_threshold_bytes!r}"
        )
    if isinstance(cycle_time_ms, bool) or not isinstance(cycle_time_ms, (int, float)):
        raise TypeError(
            f"cycle_time_ms must be a finite number > 0 (milliseconds), got {cycle_time_ms!r}"
        )
    return _engine._C().engine_request_settings(
        ps.process_set_id, fusion_threshold_bytes, float(cycle_time_ms)
    )


def engine_settings(process_set: ProcessSet = global_process_set) -> dict:
    """The settings the engine of ``process_set`` runs with: ``generation`` (the last request
    every rank made; 0: init()'s settings), ``fusion_threshold_bytes``, ``cycle_time_ms``,
    ``since_cycle`` (the negotiation cycle that switched to them, the same on every rank) and
    ``requested_generation`` (this rank's last request)."""
    _engine._require()
    ps = _sets._check(process_set, "engine_settings")
    return _engine._C().engine_settings(ps.process_set_id)


# ---- the search ------------------------------------------------------------------------------


class CoordinateSearch:
    """Deterministic coordinate search that minimises a score: ``current`` is the settings to
    measure next (None once done), ``report(score)`` records its score. The first trial is
    ``start``; then each knob of ``candidates`` in order, each value (other than the best so
    far, and any settings already measured) with the other knobs at their best; at most
    ``max_samples`` trials. Ties keep the earlier trial."""

    def __init__(self, start: dict, candidates: dict, max_samples: int):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.best = dict(start)
        self.best_score = math.inf
        self._plan = [(knob, value) for knob, values in candidates.items() for value in values]
        self._left = max_samples
        self._tried = set()
        self.current = dict(start)

    def report(self, score: float) -> None:
        if self.current is None:
            raise RuntimeError("CoordinateSearch.report() after the search ended")
        if score < self.best_score:
            self.best, self.best_score = dict(self.current), score
        self._tried.add(_key(self.current))
        self._left -= 1
        self.current = self._next() if self._left > 0 else None

    def _next(self):
        while self._plan:
            knob, value = self._plan.pop(0)
            trial = {**self.best, knob: value}
            if _key(trial) not in self._tried:
                return trial
        return None

    @property
    def done(self) -> bool:
        return self.current is None


def _key(settings: dict):
    return tuple(sorted(settings.items()))


# ---- the tuner a DistributedOptimizer runs -----------------------------------------------------


class Autotuner:
    """Tunes one DistributedOptimizer and its process set's engine (see the module docstring).
    ``set_bucket_cap_mb(mb)`` rebuilds the optimizer's buckets; None when they are fixed."""

    def __init__(self, cfg, process_set, bucket_cap_mb, set_bucket_cap_mb):
        self._ps = process_set
        self._set_bucket_cap_mb = set_bucket_cap_mb
        self._steps_per_sample = cfg.autotune_steps_per_sample
        self._warmup_left = cfg.autotune_warmup_samples
        start = {
            "bucket_cap_mb": float(bucket_cap_mb) if bucket_cap_mb is not None else None,
            "fusion_threshold_bytes": cfg.fusion_threshold_bytes,
            "cycle_time_ms": cfg.cycle_time_ms,
        }
        tuned = {
            "bucket_cap_mb": set_bucket_cap_mb is not None,
            "fusion_threshold_bytes": "fusion_threshold_bytes" not in cfg.explicit,
            "cycle_time_ms": "cycle_time_ms" not in cfg.explicit,
        }
        candidates = {
            knob: tuple(sorted({*values, start[knob]}))
            for knob, values in CANDIDATES.items()
            if tuned[knob]
        }
        self.search = CoordinateSearch(start, candidates, cfg.autotune_max_samples)
        self.active = bool(candidates)
        self._applied = dict(start)
        self._times = []
        self._last = None
        self._samples = 0
        writes = process_set.rank() == 0 and cfg.autotune_log
        self._log = _open_log(cfg.autotune_log) if writes else None

    def after_step(self) -> None:
        """Called at the end of every optimizer step (every rank of the set, the same steps)."""
        if not self.active:
            return
        now = time.perf_counter()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now
        if len(self._times) == self._steps_per_sample:
            self._end_sample(self._agreed_score())
            self._last = time.perf_counter()  # the agreement's allreduce is not a step

    def _agreed_score(self) -> float:
        """The median over the sample's steps of the slowest rank's time: one float64
        allreduce (Max), so every rank gets the same bits."""
        times = torch.tensor(self._times, dtype=torch.float64)
        self._times = []
        name = f"gradfuse.autotune.{self._samples}"
        slowest = collectives.allreduce(times, name=name, op=collectives.Max, process_set=self._ps)
        return float(slowest.median())

    def _end_sample(self, score: float) -> None:
        self._samples += 1
        if self._warmup_left > 0:
            self._warmup_left -= 1
            self._write("warmup", self._applied, score)
            return
        self._write("sample", self._applied, score)
        self.search.report(score)
        if self.search.done:
            self.active = False
            self._apply(self.search.best)
            self._write("best", self.search.best, self.search.best_score)
            if self._log is not None:
                self._log.close()
        else:
            self._apply(self.search.current)

    def _apply(self, settings: dict) -> None:
        """Every rank applies the same settings at the same step."""
        if settings["bucket_cap_mb"] != self._applied["bucket_cap_mb"]:
            self._set_bucket_cap_mb(settings["bucket_cap_mb"])
        engine_keys = ("fusion_threshold_bytes", "cycle_time_ms")
        if any(settings[k] != self._applied[k] for k in engine_keys):
            request_engine_settings(*(settings[k] for k in engine_keys), process_set=self._ps)
        self._applied = dict(settings)

    def _write(self, phase: str, settings: dict, score: float) -> None:
        if self._log is None:
            return
        row = (self._samples, phase, *(settings[k] for k in _LOG_COLUMNS[2:5]), f"{score:.9g}")
        self._log.write(",".join("" if v is None else str(v) for v in row) + "\n")
        self._log.flush()


def _open_log(path):
    log = open(path, "w")  # noqa: SIM115  (open for the tuner's life, closed when it ends)
    log.write(",".join(_LOG_COLUMNS) + "\n")
    return log


def attach(process_set, bucket_cap_mb, set_bucket_cap_mb):
    """The Autotuner of a new DistributedOptimizer, or None: when autotune is off, when this
    rank is outside the set, or when another optimizer already tunes that set's engine (one
    tuner per engine, the first optimizer's)."""
    state = _engine._require()
    if not state.cfg.autotune or not process_set.included():
        return None
    if process_set.process_set_id in state.autotuned_sets:
        return None
    state.autotuned_sets.add(process_set.process_set_id)
    return Autotuner(state.cfg, process_set, bucket_cap_mb, set_bucket_cap_mb)


__all__ = ["CoordinateSearch", "engine_settings", "request_engine_settings"]
