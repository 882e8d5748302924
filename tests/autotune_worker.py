"""One rank of tests/test_autotune.py: the engine's agreed settings (a change takes effect at
the same negotiation cycle on every rank, and only once every rank asked), bad values, ranks
asking different settings, and a training run with autotune on. Device-parametric
(multiproc.device()); tensors differ per rank. The checks run in the order given: the mismatch
check fails the engine, and the training check restarts gradfuse with autotune on."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import gradfuse as hvd
import torch
from gradfuse import autotune
from gradfuse.collectives import submitted_together
from multiproc import arange, checks_of, device, run_checks

MB = 1 << 20


def wait_for_generation(generation, seconds=60.0):
    deadline = time.monotonic() + seconds
    while autotune.engine_settings()["generation"] < generation:
        assert time.monotonic() < deadline, (generation, autotune.engine_settings())
        time.sleep(0.002)
    return autotune.engine_settings()


def same_on_every_rank(value):
    values = hvd.allgather_object(value)
    assert all(v == values[0] for v in values), values
    return values[0]


def batched_allreduces(count=4, numel=64):
    """`count` float32 allreduces of numel values each (different per rank), submitted
    together; checks the sums and returns how many collectives the engine ran for them."""
    before = hvd.stats()["collectives"]
    tensors = [arange(numel, dtype=torch.float32) * (hvd.rank() + 1) + i for i in range(count)]
    with submitted_together():
        handles = [
            hvd.allreduce_async(t, name=f"batch.{i}", op=hvd.Sum) for i, t in enumerate(tensors)
        ]
    n = hvd.size()
    for i, h in enumerate(handles):
        want = arange(numel, dtype=torch.float32) * (n * (n + 1) // 2) + i * n
        assert torch.equal(hvd.synchronize(h), want), i
    return hvd.stats()["collectives"] - before


def check_agreement_waits_for_every_rank():
    n, r = hvd.size(), hvd.rank()
    last = n - 1
    start = autotune.engine_settings()
    assert start["generation"] == 0 and start["since_cycle"] == 0, start
    hvd.barrier()
    if r != last:
        # Every rank but the last asks; nothing changes while the last has not, whatever runs.
        assert autotune.request_engine_settings(256, 2.0) == 1
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            now = autotune.engine_settings()
            assert now["generation"] == 0 and now["requested_generation"] == 1, now
            assert now["fusion_threshold_bytes"] == start["fusion_threshold_bytes"], now
        assert batched_allreduces() == 1  # still fused under the old (64 MiB) threshold
    else:
        assert batched_allreduces() == 1
    hvd.barrier()
    assert autotune.engine_settings()["generation"] == 0
    if r == last:
        assert autotune.request_engine_settings(256, 2.0) == 1
    agreed = wait_for_generation(1)
    assert agreed["fusion_threshold_bytes"] == 256 and agreed["cycle_time_ms"] == 2.0, agreed
    same_on_every_rank(agreed["since_cycle"])  # the same negotiation cycle everywhere
    assert batched_allreduces() == 4  # 256 bytes each: one collective per tensor now


def check_staggered_requests_switch_at_one_cycle():
    # Rank r asks twice, sleeping 30 ms x r before each: the ranks ask at different times, and
    # rank 0 is two requests ahead of the last for a while.
    r = hvd.rank()
    hvd.barrier()
    for generation, threshold in ((2, 64 * MB), (3, 512)):
        time.sleep(0.03 * r)
        assert autotune.request_engine_settings(threshold, 1.0) == generation
    agreed = wait_for_generation(3)
    assert agreed["fusion_threshold_bytes"] == 512 and agreed["cycle_time_ms"] == 1.0, agreed
    same_on_every_rank((agreed["generation"], agreed["since_cycle"]))
    assert batched_allreduces() == 2  # two 256-byte tensors per 512-byte batch
    # None keeps what is in force.
    assert autotune.request_engine_settings(cycle_time_ms=3.0) == 4
    agreed = wait_for_generation(4)
    assert (agreed["fusion_threshold_bytes"], agreed["cycle_time_ms"]) == (512, 3.0), agreed
    same_on_every_rank(agreed["since_cycle"])


def expect_error(exc_type, fn, *needles):
    try:
        fn()
    except exc_type as e:
        for needle in needles:
            assert needle in str(e), f"{needle!r} not in {e}"
        return
    raise AssertionError(f"{exc_type.__name__} not raised")


def check_bad_values_raise_naming_the_argument():
    before = autotune.engine_settings()
    request = autotune.request_engine_settings
    expect_error(ValueError, lambda: request(-1), "fusion_threshold_bytes", ">= 0", "-1")
    expect_error(ValueError, lambda: request(cycle_time_ms=0.0), "cycle_time_ms", "> 0")
    expect_error(ValueError, lambda: request(cycle_time_ms=float("nan")), "cycle_time_ms")
    expect_error(ValueError, lambda: request(cycle_time_ms=float("inf")), "cycle_time_ms")
    expect_error(TypeError, lambda: request("64MB"), "fusion_threshold_bytes", "'64MB'")
    expect_error(TypeError, lambda: request(1.5), "fusion_threshold_bytes")
    expect_error(TypeError, lambda: request(True), "fusion_threshold_bytes")
    expect_error(TypeError, lambda: request(cycle_time_ms="1"), "cycle_time_ms")
    expect_error(TypeError, lambda: request(process_set=1), "process_set")
    assert autotune.engine_settings() == before  # nothing was asked
    assert batched_allreduces(count=2) == 1  # 512: both fit one batch; the engine is healthy


def check_different_requests_fail_every_rank():
    # Ranks asking different settings as the same request: the engine fails on every rank,
    # naming both ranks' settings, and gradfuse starts again after shutdown().
    r = hvd.rank()
    autotune.request_engine_settings(1000 + r, 1.0)
    expect_error(
        RuntimeError,
        lambda: hvd.allreduce(arange(3, dtype=torch.float32), name="after.mismatch"),
        "different engine settings",
        "fusion_threshold_bytes=1000",
        "fusion_threshold_bytes=1001",
    )
    hvd.shutdown()
    hvd.init()
    assert autotune.engine_settings()["generation"] == 0
    assert batched_allreduces(count=2) == 1


# ---- a training run with autotune on -----------------------------------------------------------

STEPS_PER_SAMPLE, WARMUP, MAX_SAMPLES = 2, 1, 8
STEPS = (WARMUP + MAX_SAMPLES) * STEPS_PER_SAMPLE + 4  # the tuner ends before the last steps


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(
        device(), torch.float64
    )


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    return x.to(device()), x.sum(1, keepdim=True).expand(6, 4).sin().to(device())


def train(model, opt, ranks, steps):
    """`ranks`: the ranks whose batches make this process's loss (its own in a distributed
    run; every rank's in the one-process reference, whose mean gradient is the average)."""
    for step in range(steps):
        opt.zero_grad()
        losses = [
            torch.nn.functional.mse_loss(model(x), y) for x, y in (batch(r, step) for r in ranks)
        ]
        (sum(losses) / len(ranks)).backward()
        opt.step()


def check_training_with_autotune():
    log = os.environ["WORKER_RESULTS"] + ".autotune.csv"
    hvd.shutdown()
    hvd.init(
        autotune=True,
        autotune_log=log,
        autotune_warmup_samples=WARMUP,
        autotune_steps_per_sample=STEPS_PER_SAMPLE,
        autotune_max_samples=MAX_SAMPLES,
    )
    model = make_model()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        gradient_as_bucket_view=True,  # the tuner rebuilds the gradient views with the buckets
    )
    tuner = opt._gf_autotune
    assert tuner is not None and tuner.active
    train(model, opt, [hvd.rank()], STEPS)
    assert not tuner.active  # the budget is spent: the best settings are kept
    best = same_on_every_rank(tuner.search.best)
    settings = autotune.engine_settings()
    assert settings["generation"] >= 1, settings  # the fusion threshold was tried
    assert settings["fusion_threshold_bytes"] == best["fusion_threshold_bytes"], (settings, best)
    same_on_every_rank((settings["generation"], settings["since_cycle"]))
    # Identical parameters on every rank, equal to one process training on every rank's data.
    params = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
    gathered = hvd.allgather(params.unsqueeze(0))
    assert all(torch.equal(row, params) for row in gathered), "ranks' parameters differ"
    reference = make_model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    train(reference, ref_opt, list(range(hvd.size())), STEPS)
    want = torch.cat([p.detach().flatten() for p in reference.parameters()]).cpu()
    torch.testing.assert_close(params, want, rtol=1e-10, atol=1e-12)
    if hvd.rank() == 0:
        rows = [line.split(",") for line in Path(log).read_text().splitlines()]
        assert rows[0] == [
            "sample",
            "phase",
            "bucket_cap_mb",
            "fusion_threshold_bytes",
            "cycle_time_ms",
            "step_time_s",
        ], rows[0]
        phases = [row[1] for row in rows[1:]]
        assert phases == ["warmup"] * WARMUP + ["sample"] * MAX_SAMPLES + ["best"], phases
        assert all(float(row[5]) > 0 for row in rows[1:]), rows
        kept = rows[-1]
        assert float(kept[2]) == best["bucket_cap_mb"], (kept, best)
        assert int(kept[3]) == best["fusion_threshold_bytes"], (kept, best)
        # The bucket sizes tried first (the search's first knob), then the fusion thresholds.
        assert len({row[2] for row in rows[1:-1]}) > 1, rows
    assert (tuner._log is None) == (hvd.rank() != 0)  # rank 0 alone writes the log


CHECKS = checks_of(globals())


if __name__ == "__main__":
    device()
    hvd.init(fusion_threshold_bytes=64 * MB)
    try:
        run_checks(CHECKS, sys.argv[1:], hvd.rank())
    finally:
        hvd.shutdown()
