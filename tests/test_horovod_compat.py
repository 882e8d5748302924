"""A Horovod program after `import horovod.torch as hvd` -> `import gradfuse as hvd`: Horovod's
module paths (gradfuse.mpi_ops, ...), its HOROVOD_* launch variables (unit tests with fake
environments), and, on real ranks (2 and 3, tests/compat_worker.py), broadcast_parameters in
every form Horovod takes and DistributedOptimizer(groups=/num_groups=)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import gradfuse
import pytest
from gradfuse import config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compat_worker
from multiproc import assert_check_ok, ranks_override, run_ranks

# ---- module paths: horovod.torch.X -> gradfuse.X ----------------------------------------------

# The public names of horovod/torch/<module>.py in Horovod 0.28 (autograd Function classes and
# private helpers left out: see gradfuse/mpi_ops.py).
HOROVOD_MODULES = {
    "mpi_ops": """init shutdown is_initialized start_timeline stop_timeline size local_size
        cross_size rank local_rank cross_rank mpi_threads_supported mpi_enabled mpi_built
        gloo_enabled gloo_built nccl_built ddl_built ccl_built cuda_built rocm_built
        is_homogeneous Average Sum Adasum Min Max Product ProcessSet global_process_set
        add_process_set remove_process_set allreduce allreduce_async allreduce_
        allreduce_async_ grouped_allreduce grouped_allreduce_async grouped_allreduce_
        grouped_allreduce_async_ sparse_allreduce_async allgather allgather_async
        grouped_allgather grouped_allgather_async broadcast broadcast_async broadcast_
        broadcast_async_ alltoall alltoall_async reducescatter reducescatter_async
        grouped_reducescatter grouped_reducescatter_async poll synchronize join barrier""",
    "functions": "broadcast_parameters broadcast_optimizer_state broadcast_object allgather_object",
    "optimizer": "DistributedOptimizer",
    "compression": "Compressor NoneCompressor FP16Compressor Compression",
    "sync_batch_norm": "SyncBatchNorm",
}


@pytest.mark.parametrize("module", sorted(HOROVOD_MODULES))
def test_horovod_module_path_has_its_names(module):
    mod = importlib.import_module(f"gradfuse.{module}")
    assert getattr(gradfuse, module) is mod  # hvd.mpi_ops.X works after `import gradfuse`
    missing = [n for n in HOROVOD_MODULES[module].split() if not hasattr(mod, n)]
    assert not missing, f"gradfuse.{module} lacks {missing}"
    for name in HOROVOD_MODULES[module].split():
        if hasattr(gradfuse, name):  # the same object as the top-level name, not a copy
            assert getattr(mod, name) is getattr(gradfuse, name), name


def test_fp16_compressor_is_horovods():
    torch = pytest.importorskip("torch")
    from gradfuse.compression import FP16Compressor

    x = torch.randn(5, dtype=torch.float64)
    wire, ctx = FP16Compressor.compress(x)  # static: the class itself is the compressor
    assert wire.dtype == torch.float16
    back = FP16Compressor.decompress(wire, ctx)
    assert back.dtype == torch.float64 and torch.allclose(back, x, rtol=1e-3, atol=1e-3)
    ints = torch.arange(4)
    assert FP16Compressor.decompress(*FP16Compressor.compress(ints)) is ints


# ---- HOROVOD_* environment variables ----------------------------------------------------------


@pytest.fixture
def env(monkeypatch):
    """A fake environment with no GRADFUSE_* or HOROVOD_* variable; set() adds some."""
    import os

    for var in list(os.environ):
        if var.startswith(("GRADFUSE_", "HOROVOD_")):
            monkeypatch.delenv(var)

    def set_vars(**variables):
        for k, v in variables.items():
            monkeypatch.setenv(k, v)

    return set_vars


def test_horovod_variables_are_fallbacks(env):
    env(
        HOROVOD_FUSION_THRESHOLD="1048576",
        HOROVOD_CYCLE_TIME="2.5",
        HOROVOD_CACHE_CAPACITY="0",
        HOROVOD_HIERARCHICAL_ALLREDUCE="1",
        HOROVOD_TIMELINE="/tmp/tl.json",
        HOROVOD_STALL_CHECK_TIME_SECONDS="30",
        HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="120",
    )
    cfg = config.resolve()
    assert cfg.fusion_threshold_bytes == 1 << 20
    assert cfg.cycle_time_ms == 2.5
    assert cfg.cache_capacity == 0
    assert cfg.hierarchical_allreduce is True
    assert cfg.timeline == "/tmp/tl.json"
    assert (cfg.stall_warning_s, cfg.stall_shutdown_s) == (30.0, 120.0)


def test_gradfuse_variables_and_init_arguments_win(env):
    env(
        HOROVOD_FUSION_THRESHOLD="1048576",
        GRADFUSE_FUSION_THRESHOLD="2048",
        HOROVOD_CYCLE_TIME="2.5",
        HOROVOD_TIMELINE="/tmp/horovod.json",
        GRADFUSE_TIMELINE="",  # set, though empty: gradfuse's says no timeline
    )
    cfg = config.resolve(cycle_time_ms=7.0)
    assert (cfg.fusion_threshold_bytes, cfg.cycle_time_ms, cfg.timeline) == (2048, 7.0, "")


def defaults():
    return config.Config(**{key: option[2] for key, option in config._OPTIONS.items()})


def test_defaults_without_any_variable(env):
    assert config.resolve() == defaults()


@pytest.mark.parametrize(
    ("raw", "on"), [("1", True), ("2", True), ("0", False), ("true", True), ("off", False)]
)
def test_horovod_flags_are_integers_on_when_positive(env, raw, on):
    env(HOROVOD_HIERARCHICAL_ALLREDUCE=raw)
    assert config.resolve().hierarchical_allreduce is on


def test_horovod_timeline_dynamic_starts_none(env):
    env(HOROVOD_TIMELINE="DYNAMIC")
    assert config.resolve().timeline == ""


def test_horovod_stall_check_disable(env):
    env(
        HOROVOD_STALL_CHECK_DISABLE="1",
        HOROVOD_STALL_CHECK_TIME_SECONDS="5",
        HOROVOD_STALL_SHUTDOWN_TIME_SECONDS="10",
    )
    cfg = config.resolve()  # Horovod's inspector off: no warning, no shutdown
    assert cfg.stall_warning_s >= 1e9 and cfg.stall_shutdown_s == 0.0
    env(HOROVOD_STALL_CHECK_DISABLE="0")
    assert (config.resolve().stall_warning_s, config.resolve().stall_shutdown_s) == (5.0, 10.0)
    env(HOROVOD_STALL_CHECK_DISABLE="1", GRADFUSE_STALL_WARNING_TIME="3")
    assert config.resolve().stall_warning_s == 3.0  # gradfuse's own variable still wins


@pytest.mark.parametrize(
    ("var", "raw", "words"),
    [
        ("HOROVOD_FUSION_THRESHOLD", "64MB", "integer >= 0"),
        ("HOROVOD_FUSION_THRESHOLD", "-1", "integer >= 0"),
        ("HOROVOD_CYCLE_TIME", "fast", "number > 0"),
        ("HOROVOD_CYCLE_TIME", "0", "number > 0"),
        ("HOROVOD_CACHE_CAPACITY", "1.5", "integer"),
        ("HOROVOD_HIERARCHICAL_ALLREDUCE", "maybe", "boolean"),
        ("HOROVOD_STALL_CHECK_TIME_SECONDS", "soon", "number > 0"),
        ("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "-5", "number >= 0"),
        ("HOROVOD_STALL_CHECK_DISABLE", "yes please", "flag"),
    ],
)
def test_malformed_horovod_value_raises_naming_it(env, var, raw, words):
    env(**{var: raw})
    with pytest.raises(ValueError, match=var) as info:
        config.resolve()
    assert words in str(info.value) and repr(raw) in str(info.value), str(info.value)


def test_malformed_horovod_value_is_not_read_when_gradfuse_sets_it(env):
    env(HOROVOD_FUSION_THRESHOLD="64MB", GRADFUSE_FUSION_THRESHOLD="100")
    assert config.resolve().fusion_threshold_bytes == 100


def test_other_horovod_variables_are_ignored(env):
    env(
        HOROVOD_AUTOTUNE_GAUSSIAN_PROCESS_NOISE="0.5",  # no counterpart (gradfuse.autotune)
        HOROVOD_GPU_OPERATIONS="NCCL",
        HOROVOD_TIMELINE_MARK_CYCLES="1",
        HOROVOD_NO_SUCH_THING="whatever",
    )
    assert config.resolve() == defaults()


# ---- real ranks: broadcast_parameters and DistributedOptimizer(groups=) -----------------------

CHECKS = sorted(compat_worker.CHECKS)
CONFIGS = [2, 3]
# GRADFUSE_TEST_RANKS=n: one group of n ranks instead (scripts/gpu_check.sh on one GPU).
if ranks_override(0):
    CONFIGS = [ranks_override(0)]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda n: f"{n}ranks")
def group(request, tmp_path_factory):
    n = request.param
    tmp = tmp_path_factory.mktemp(f"compat{n}")
    return run_ranks(tmp, n, "gradfuse.run", HERE / "compat_worker.py", CHECKS, timeout=400)


@pytest.mark.timeout(450)
@pytest.mark.parametrize("check", CHECKS)
def test_compat_check(group, check):
    proc, results = group
    assert_check_ok(proc, results, check)
