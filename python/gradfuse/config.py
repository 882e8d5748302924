"""Engine configuration: keyword arguments to init(), defaulting to GRADFUSE_* variables, then
to Horovod's HOROVOD_* equivalents (so a Horovod launch script keeps its settings)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _flag(raw):
    """A boolean from True/False or the strings 1/0, true/false, yes/no, on/off."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        value = {"1": True, "true": True, "yes": True, "on": True}.get(raw.strip().lower())
        if value is None and raw.strip().lower() in ("0", "false", "no", "off"):
            value = False
        if value is not None:
            return value
    raise ValueError(raw)


# name -> (environment variable, parser, default, check, what a valid value is)
_OPTIONS = {
    "fusion_threshold_bytes": (
        "GRADFUSE_FUSION_THRESHOLD",
        int,
        64 << 20,
        lambda v: v >= 0,
        "an integer >= 0 (bytes)",
    ),
    "cache_capacity": (
        "GRADFUSE_CACHE_CAPACITY",
        int,
        1024,
        lambda v: 0 <= v <= 1 << 24,
        "an integer in [0, 16777216] (response cache entries; 0 disables the cache)",
    ),
    "cycle_time_ms": (
        "GRADFUSE_CYCLE_TIME",
        float,
        1.0,
        lambda v: v > 0,
        "a number > 0 (milliseconds)",
    ),
    "timeout_s": (
        "GRADFUSE_TIMEOUT",
        float,
        300.0,
        lambda v: v > 0,
        "a number > 0 (seconds a peer may stay silent before it counts as dead or stuck)",
    ),
    "stall_warning_s": (
        "GRADFUSE_STALL_WARNING_TIME",
        float,
        60.0,
        lambda v: v > 0,
        "a number > 0 (seconds before a tensor missing on some ranks is reported)",
    ),
    "stall_shutdown_s": (
        "GRADFUSE_STALL_SHUTDOWN_TIME",
        float,
        0.0,
        lambda v: v >= 0,
        "a number >= 0 (seconds before a stalled tensor fails; 0: never)",
    ),
    "pending_names_limit": (
        "GRADFUSE_PENDING_NAMES_LIMIT",
        int,
        65536,
        lambda v: v >= 0,
        "an integer >= 0 (names submitted by some ranks and not yet by all; 0: no limit)",
    ),
    "timeline": (
        "GRADFUSE_TIMELINE",
        str,
        "",
        lambda v: True,
        "a file path (Chrome-trace JSON written by rank 0)",
    ),
    "hierarchical_allreduce": (
        "GRADFUSE_HIERARCHICAL_ALLREDUCE",
        _flag,
        False,
        lambda v: True,
        "a boolean (True/False, 1/0)",
    ),
    # Hybrid all-reduce (needs hierarchical_allreduce): a fused message of at most this many
    # bytes goes hierarchical (fewer latency steps), a larger one flat (one ring, bandwidth-
    # optimal). -1: every message hierarchical. `gradfuse-bench plan` prints the crossover.
    "hierarchical_threshold_bytes": (
        "GRADFUSE_HIERARCHICAL_THRESHOLD",
        int,
        -1,
        lambda v: v >= -1,
        "an integer >= -1 (bytes; -1: every message hierarchical)",
    ),
    # The process group for CUDA tensors. "nccl" (one GPU per rank) is what training uses;
    # "gloo" lets several ranks share one GPU (Gloo copies through host memory), which is how
    # scripts/gpu_check.sh runs the multi-rank engine tests on a machine with one GPU.
    "cuda_backend": (
        "GRADFUSE_CUDA_BACKEND",
        str,
        "nccl",
        lambda v: v in ("nccl", "gloo"),
        '"nccl" or "gloo" (the transport of CUDA tensors)',
    ),
    # Autotune (gradfuse.autotune): DistributedOptimizer tunes the fusion threshold, the cycle
    # time and its bucket size from measured step times, then keeps the best.
    "autotune": (
        "GRADFUSE_AUTOTUNE",
        _flag,
        False,
        lambda v: True,
        "a boolean (True/False, 1/0)",
    ),
    "autotune_log": (
        "GRADFUSE_AUTOTUNE_LOG",
        str,
        "",
        lambda v: True,
        "a file path (CSV of every autotune sample, written by rank 0)",
    ),
    "autotune_warmup_samples": (
        "GRADFUSE_AUTOTUNE_WARMUP_SAMPLES",
        int,
        3,
        lambda v: v >= 0,
        "an integer >= 0 (samples measured and discarded before tuning)",
    ),
    "autotune_steps_per_sample": (
        "GRADFUSE_AUTOTUNE_STEPS_PER_SAMPLE",
        int,
        10,
        lambda v: v >= 1,
        "an integer >= 1 (optimizer steps per sample)",
    ),
    "autotune_max_samples": (
        "GRADFUSE_AUTOTUNE_MAX_SAMPLES",
        int,
        20,
        lambda v: v >= 1,
        "an integer >= 1 (settings tried before the best is kept)",
    ),
    # Test only: pretend each node has this many ranks (consecutive ranks form a node), so one
    # host can exercise the hierarchical paths as several nodes. 0: nodes are real hosts.
    "test_local_size": (
        "GRADFUSE_TEST_LOCAL_SIZE",
        int,
        0,
        lambda v: v >= 0,
        "an integer >= 0 (test only: ranks per simulated node; 0 = real hosts)",
    ),
}
# GRADFUSE_* variables that belong to the build and test scripts or to the CPU kernels
# (GRADFUSE_CPU_SIMD, read by cpp/ops/cpu/dispatch.cpp), not to the engine. The GRADFUSE_TEST_*
# ones here choose the device and rank count of the multi-process tests (tests/multiproc.py), and
# GRADFUSE_TEST_FAULT makes one rank's engine fail (cpp/engine/fault_injection.h),
# GRADFUSE_TEST_REMOTE_PEERS=1 puts each process on a machine of its own for the liveness
# monitor (cpp/engine/peer_board.h: no peer is seen in /proc);
# GRADFUSE_GPU_CHECK_SKIP_BUILD belongs to scripts/gpu_check.sh, GRADFUSE_WHEEL* to
# scripts/build_wheels.sh and scripts/ci_wheel_check.sh.
_NOT_ENGINE = {
    "GRADFUSE_CPU_SIMD",
    "GRADFUSE_CUDA",
    "GRADFUSE_PYTHON",
    "GRADFUSE_BUILD_DIR",
    "GRADFUSE_VENV",
    "GRADFUSE_REQUIREMENTS",
    "GRADFUSE_TEST_DEVICE",
    "GRADFUSE_TEST_RANKS",
    "GRADFUSE_TEST_FAULT",
    "GRADFUSE_TEST_REMOTE_PEERS",
    "GRADFUSE_GPU_CHECK_SKIP_BUILD",
    "GRADFUSE_WHEELHOUSE",
    "GRADFUSE_WHEEL_BUILD",
    "GRADFUSE_WHEEL_MATRIX",
}


# Horovod's variables for the same settings, read when the GRADFUSE_* one is unset (units as
# gradfuse's: bytes, milliseconds, entries, seconds). Every other HOROVOD_* is ignored.
_HOROVOD = {
    "fusion_threshold_bytes": "HOROVOD_FUSION_THRESHOLD",
    "cycle_time_ms": "HOROVOD_CYCLE_TIME",
    "cache_capacity": "HOROVOD_CACHE_CAPACITY",
    "hierarchical_allreduce": "HOROVOD_HIERARCHICAL_ALLREDUCE",
    "timeline": "HOROVOD_TIMELINE",
    "stall_warning_s": "HOROVOD_STALL_CHECK_TIME_SECONDS",
    "stall_shutdown_s": "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
    "autotune": "HOROVOD_AUTOTUNE",
    "autotune_log": "HOROVOD_AUTOTUNE_LOG",
    "autotune_warmup_samples": "HOROVOD_AUTOTUNE_WARMUP_SAMPLES",
    "autotune_steps_per_sample": "HOROVOD_AUTOTUNE_STEPS_PER_SAMPLE",
    # Horovod's Bayesian optimisation's budget; gradfuse's search takes it as its own.
    # (HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE has no counterpart: the search has no model.)
    "autotune_max_samples": "HOROVOD_AUTOTUNE_BAYES_OPT_MAX_SAMPLES",
}
# HOROVOD_STALL_CHECK_DISABLE=1 turns Horovod's stall inspector off: no warning (a stall of
# 1e9 s, 31 years, is never reported) and no shutdown.
_HOROVOD_STALL_DISABLE = "HOROVOD_STALL_CHECK_DISABLE"
_STALL_CHECK_OFF = {"stall_warning_s": 1e9, "stall_shutdown_s": 0.0}


def _horovod_flag(raw: str) -> str:
    """Horovod reads its flags as integers, on when > 0 ("2" is on); words go to _flag."""
    try:
        return "1" if int(raw) > 0 else "0"
    except ValueError:
        return raw


def _from_horovod(key, parser, check, what):
    """Option `key`'s value from Horovod's variable, or None when Horovod sets nothing for it."""
    if key in _STALL_CHECK_OFF and _HOROVOD_STALL_DISABLE in os.environ:
        raw = _horovod_flag(os.environ[_HOROVOD_STALL_DISABLE])
        if _parse(key, raw, _flag, None, "a flag (1/0)", _HOROVOD_STALL_DISABLE):
            return _STALL_CHECK_OFF[key]
    env = _HOROVOD.get(key)
    if env is None or env not in os.environ:
        return None
    raw = os.environ[env]
    if key == "timeline" and raw == "DYNAMIC":
        return ""  # Horovod: no file at start, start_timeline() later (gradfuse always allows)
    if parser is _flag:
        raw = _horovod_flag(raw)
    return _parse(key, raw, parser, check, what, env)


@dataclass
class Config:
    fusion_threshold_bytes: int
    cache_capacity: int
    cycle_time_ms: float
    timeout_s: float
    hierarchical_allreduce: bool
    hierarchical_threshold_bytes: int
    cuda_backend: str
    test_local_size: int
    stall_warning_s: float
    stall_shutdown_s: float
    pending_names_limit: int
    timeline: str
    autotune: bool
    autotune_log: str
    autotune_warmup_samples: int
    autotune_steps_per_sample: int
    autotune_max_samples: int
    # The options the user set (keyword argument or variable); the autotuner leaves them be.
    explicit: frozenset = frozenset()


def _parse(name, raw, parser, check, what, source):
    if parser is _flag:
        try:
            return _flag(raw)
        except ValueError:
            raise ValueError(f"{source} must be {what}, got {raw!r}") from None
    if parser is str:
        if not isinstance(raw, (str, os.PathLike)) or not check(os.fspath(raw)):
            raise ValueError(f"{source} must be {what}, got {raw!r}")
        return os.fspath(raw)
    try:
        value = parser(raw) if isinstance(raw, str) else raw
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        if parser is int and not float(value).is_integer():
            raise TypeError
        value = parser(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be {what}, got {raw!r}") from None
    if not check(value):
        raise ValueError(f"{source} must be {what}, got {raw!r}")
    return value


# What a plan (`gradfuse-bench plan --json`) may set: the choices the cost model makes.
PLAN_SETTINGS = (
    "fusion_threshold_bytes",
    "cycle_time_ms",
    "hierarchical_allreduce",
    "hierarchical_threshold_bytes",
)


def plan_settings(path, size: int | None) -> dict:
    """The settings a plan file chose for a job of `size` ranks: the file's "runs" entry with
    "gpus" == size (a plan covers several GPU counts), or its only run when size is None."""
    import json

    try:
        with open(path) as f:
            plan = json.load(f)
        runs = plan["runs"]
        by_size = {int(run["gpus"]): run["settings"] for run in runs}
    except OSError as e:
        raise ValueError(f"init(plan=...): cannot read {path!r}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"init(plan=...): {path!r} is not a plan written by `gradfuse-bench plan --json` "
            f"(a JSON object with runs[].gpus and runs[].settings): {e!r}"
        ) from None
    if size is None and len(by_size) == 1:
        size = next(iter(by_size))
    if size not in by_size:
        raise ValueError(
            f"init(plan=...): {path!r} plans for {sorted(by_size)} GPUs, not for this job's "
            f"{size} ranks; run `gradfuse-bench plan --gpus {size} ...`"
        )
    settings = by_size[size]
    unknown = sorted(set(settings) - set(PLAN_SETTINGS))
    if unknown:
        raise ValueError(f"init(plan=...): {path!r} sets unknown settings {unknown}")
    return settings


def resolve(plan=None, plan_size: int | None = None, **kwargs) -> Config:
    """Each option from init()'s keyword argument, else the plan file's choice for a job of
    plan_size ranks, else GRADFUSE_*, else HOROVOD_*, else the default."""
    known_env = {env for env, *_ in _OPTIONS.values()} | _NOT_ENGINE | {"GRADFUSE_PLAN"}
    for var in os.environ:
        if var.startswith("GRADFUSE_") and var not in known_env:
            raise ValueError(
                f"unknown environment variable {var}; gradfuse reads "
                + ", ".join(sorted(env for env, *_ in _OPTIONS.values()))
            )
    for key in kwargs:
        if key not in _OPTIONS:
            raise ValueError(
                f"gradfuse.init() got an unknown option {key!r}; options: {', '.join(_OPTIONS)}"
            )
    plan = plan if plan is not None else os.environ.get("GRADFUSE_PLAN") or None
    planned = plan_settings(plan, plan_size) if plan is not None else {}
    # `explicit`: the options the user chose (argument, plan, variable), which autotune keeps.
    values, explicit = {}, set()
    for key, (env, parser, default, check, what) in _OPTIONS.items():
        if kwargs.get(key) is not None:
            values[key] = _parse(key, kwargs[key], parser, check, what, f"init({key}=...)")
        elif key in planned:
            values[key] = _parse(key, planned[key], parser, check, what, f"plan {plan!r}: {key}")
        elif env in os.environ:
            values[key] = _parse(key, os.environ[env], parser, check, what, env)
        else:
            horovod = _from_horovod(key, parser, check, what)
            values[key] = default if horovod is None else horovod
            if horovod is None:
                continue
        explicit.add(key)
    if values["hierarchical_threshold_bytes"] >= 0 and not values["hierarchical_allreduce"]:
        raise ValueError(
            "hierarchical_threshold_bytes (GRADFUSE_HIERARCHICAL_THRESHOLD) = "
            f"{values['hierarchical_threshold_bytes']} chooses between flat and hierarchical "
            "allreduce per message, so it needs hierarchical_allreduce=True "
            "(GRADFUSE_HIERARCHICAL_ALLREDUCE=1)"
        )
    return Config(**values, explicit=frozenset(explicit))
