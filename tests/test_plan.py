"""gradfuse-bench plan and calibrate: the cost model's algebra (step counts, bytes on the wire,
monotonicity, the hybrid crossover), the step simulation, the built-in profiles (the seeds'
published ResNet-50 runs reproduced from theirs), the CLI, and init(plan=...). No timings:
calibrate's fit is checked on synthetic points."""

from __future__ import annotations

import json
import math

import pytest
from gradfuse import config
from gradfuse.bench import calibrate, plan, plan_model, plan_profiles, plan_validate
from gradfuse.bench.__main__ import main
from gradfuse.bench.plan_model import Link
from gradfuse.bench.plan_step import Choice, predict
from gradfuse.bench.plan_workload import from_json, resnet50

INTRA = Link(10e-6, 1 / 10e9)
INTER = Link(25e-6, 1 / 2.5e9)


# ---- algebra --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 8, 1024, 4096])
def test_ring_steps_are_2_p_minus_1(p):
    assert plan_model.ring_steps(p) == 2 * (p - 1)


def test_seeds_hierarchical_step_counts():
    # The slides: 4(k-1) + 2(p/k-1) against the ring's 2(p-1); p=1024, k=16 is their best.
    p = 1024
    assert plan_model.tencent_hierarchical_steps(p, 16) == 4 * 15 + 2 * 63 == 186
    assert plan_model.ring_steps(p) == 2046
    counts = {k: plan_model.tencent_hierarchical_steps(p, k) for k in (2, 4, 8, 16, 32, 64, 128)}
    assert counts[16] == min(counts.values())
    # gradfuse's own (reduce-scatter / allgather in the node): 2(k-1) + 2(p/k-1).
    assert plan_model.hierarchical_steps(p, 8) == 2 * 7 + 2 * 127


def test_wire_bytes():
    n, p, k = 1 << 20, 64, 8
    assert plan_model.flat_wire_bytes(n, p) == pytest.approx(2 * 63 / 64 * n)
    inside, across = plan_model.hierarchical_wire_bytes(n, p, k)
    assert inside == pytest.approx(2 * 7 / 8 * n)
    # Each rank sends 1/k of the ring's cross-node bytes (its shard), over 8 nodes.
    assert across == pytest.approx(2 * 7 / 8 * n / 8)


def test_single_node_every_algorithm_is_the_intra_ring():
    n = 4 << 20
    ring = plan_model.ring_time(n, 8, INTRA)
    for algorithm in plan_model.ALGORITHMS:
        assert plan_model.allreduce_time(algorithm, n, 8, 8, INTRA, INTER) == pytest.approx(ring)
    assert ring == pytest.approx(14 * INTRA.alpha_s + 2 * 7 / 8 * n * INTRA.beta_s_per_byte)


def test_times_grow_with_bytes_and_ranks():
    sizes = [0, 1 << 10, 1 << 20, 1 << 26]
    for algorithm in plan_model.ALGORITHMS:
        for p in (16, 128, 1024):
            times = [plan_model.allreduce_time(algorithm, n, p, 8, INTRA, INTER) for n in sizes]
            assert times == sorted(times) and times[0] == 0.0
        by_p = [
            plan_model.allreduce_time(algorithm, 1 << 20, p, 8, INTRA, INTER)
            for p in (16, 64, 256, 1024)
        ]
        assert by_p == sorted(by_p), algorithm


def test_hybrid_crossover():
    p, k = 1024, 8
    cross = plan_model.crossover_bytes(p, k, INTRA, INTER)
    assert cross is not None
    hier = plan_model.hierarchical_time
    flat = plan_model.flat_time
    assert hier(cross / 2, p, k, INTRA, INTER) < flat(cross / 2, p, k, INTRA, INTER)
    assert hier(cross * 2, p, k, INTRA, INTER) > flat(cross * 2, p, k, INTRA, INTER)
    assert hier(cross, p, k, INTRA, INTER) == pytest.approx(flat(cross, p, k, INTRA, INTER), 1e-3)
    # One node: nothing to choose.
    assert plan_model.crossover_bytes(8, 8, INTRA, INTER) is None


def test_bad_layouts_are_value_errors():
    with pytest.raises(ValueError, match="do not fill nodes"):
        plan_model.flat_time(1, 12, 8, INTRA, INTER)
    with pytest.raises(ValueError, match="algorithm must be"):
        plan_model.allreduce_time("star", 1, 8, 8, INTRA, INTER)
    with pytest.raises(ValueError, match="alpha_s >= 0"):
        Link(-1.0, 0.0)


# ---- workloads and the step ------------------------------------------------------------------


def test_resnet50_workload():
    w = resnet50()
    assert w.parameters == 25_557_032 and len(w.numels) == 161
    assert w.forward_flops_per_sample == pytest.approx(8.18e9, rel=0.01)  # 4.09 GMACs
    assert sum(w.backward_shares) == pytest.approx(1.0)
    ready = w.ready_fractions()
    assert ready[0] == pytest.approx(1.0)  # the stem's gradient is ready last
    assert ready == sorted(ready, reverse=True)


def _profile(name="p40-25gbe"):
    return plan_profiles.load(name)


def test_step_parts_add_up_and_one_gpu_has_no_communication():
    w, prof = resnet50(), _profile()
    one = predict(w, prof, 1, 8, 64, 2, Choice("flat", 64 << 20, 1.0))
    assert one.comm_exposed_s == one.pack_exposed_s == 0 and one.messages == 0
    many = predict(w, prof, 1024, 8, 64, 2, Choice("hierarchical", 16 << 20, 1.0))
    assert many.total_s == pytest.approx(
        many.compute_s + many.comm_exposed_s + many.pack_exposed_s + many.optimizer_s
    )
    assert many.compute_s == pytest.approx(one.compute_s)
    assert many.total_s > one.total_s and many.comm_total_s > many.comm_exposed_s


def test_step_monotone_in_gpus_and_network():
    w, prof = resnet50(), _profile()
    choice = Choice("flat", 64 << 20, 1.0)
    steps = [predict(w, prof, p, 8, 64, 2, choice).total_s for p in (8, 64, 512, 4096)]
    assert steps == sorted(steps)
    slow = plan_profiles.Profile(
        {
            **plan_profiles.BUILTIN["p40-25gbe"],
            "inter": {"alpha_s": 25e-6, "beta_s_per_byte": 1 / 0.5e9},
        },
        "slow",
    )
    assert (
        predict(w, slow, 1024, 8, 64, 2, choice).total_s
        > predict(w, prof, 1024, 8, 64, 2, choice).total_s
    )


def test_threshold_zero_sends_every_tensor_alone():
    w = resnet50()
    # With no overlap (every gradient ready at once: shared cores) and threshold 0, one message
    # per tensor; with a threshold above the model's size, one message.
    shared = plan_profiles.Profile(
        {**plan_profiles.BUILTIN["p40-25gbe"], "cores_per_node": 1}, "shared"
    )
    alone = predict(w, shared, 8, 8, 64, 4, Choice("flat", 0, 1.0))
    fused = predict(w, shared, 8, 8, 64, 4, Choice("flat", 1 << 30, 1.0))
    assert alone.messages == 161 and fused.messages == 1
    assert alone.detail["core_sharing"] == 8 and not alone.detail["overlap"]
    assert alone.total_s > fused.total_s


def test_measured_sharing_replaces_the_core_count():
    # calibrate's compute_by_ranks (every rank computing at once) sets how much slower a rank
    # computes and steps with that many ranks on its host; without it, ranks / cores.
    w = resnet50()
    base = {**plan_profiles.BUILTIN["p40-25gbe"], "cores_per_node": 2}
    rate = base["compute_flops_per_s"]
    measured = plan_profiles.Profile({**base, "compute_by_ranks": {"2": rate / 1.25}}, "m")
    counted = plan_profiles.Profile(base, "c")
    choice = Choice("flat", 64 << 20, 1.0)
    two = predict(w, measured, 2, 2, 64, 4, choice)
    assert two.detail["core_sharing"] == pytest.approx(1.25)
    assert two.compute_s == pytest.approx(1.25 * predict(w, counted, 2, 2, 64, 4, choice).compute_s)
    # 4 ranks were not measured: the core count decides.
    assert predict(w, measured, 4, 4, 64, 4, choice).detail["core_sharing"] == 2
    # One rank alone is never shared; a faster measurement never speeds a rank up.
    assert predict(w, measured, 1, 1, 64, 4, choice).total_s == pytest.approx(
        predict(w, counted, 1, 1, 64, 4, choice).total_s
    )
    fast = plan_profiles.Profile({**base, "compute_by_ranks": {"2": 2 * rate}}, "f")
    assert predict(w, fast, 2, 2, 64, 4, choice).detail["core_sharing"] == 1
    with pytest.raises(ValueError, match="rates must be > 0"):
        plan_profiles.Profile({**base, "compute_by_ranks": {"2": 0}}, "z")


def test_a_lone_cpu_rank_pays_the_engine_copies():
    # One rank: no collective, but the engine still copies each fused message into its buffer
    # and back; a GPU hides that behind backward, a CPU rank computing on every core does not.
    w = resnet50()
    base = plan_profiles.BUILTIN["p40-25gbe"]
    gpu = predict(w, plan_profiles.Profile(base, "g"), 1, 1, 64, 4, Choice("flat", 1 << 30, 1.0))
    cpu_profile = plan_profiles.Profile({**base, "cores_per_node": 2}, "c")
    cpu = predict(w, cpu_profile, 1, 1, 64, 4, Choice("flat", 1 << 30, 1.0))
    assert gpu.pack_exposed_s == 0 and gpu.comm_exposed_s == cpu.comm_exposed_s == 0
    assert cpu.pack_exposed_s == pytest.approx(2 * 4 * w.parameters / base["pack_bytes_per_s"])
    # Every tensor alone (threshold 0): fp32 tensors are reduced in place, nothing is copied.
    alone = predict(w, cpu_profile, 1, 1, 64, 4, Choice("flat", 0, 1.0))
    assert alone.pack_exposed_s == 0 and alone.messages == 0


def test_seeds_1024_gpu_step_reproduced_within_25_percent():
    rows = {r["gpus"]: r for r in plan_validate.seeds_rows()}
    # 8.7 min for 90 epochs of 64K-image steps.
    assert rows[1024]["published_step_s"] == pytest.approx(522 / (1_281_167 * 90 / 65_536))
    assert abs(rows[1024]["error"]) < 0.25, rows[1024]
    assert rows[1024]["batch_per_gpu"] == 64 and rows[2048]["batch_per_gpu"] == 32
    # Hierarchical is what the seeds used and what the model picks; the flat ring is slower.
    assert rows[1024]["algorithm"] in ("hierarchical", "hybrid")
    assert rows[1024]["flat_step_s"] > rows[1024]["predicted_step_s"]


# ---- profiles, plan, CLI ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(plan_profiles.BUILTIN))
def test_builtin_profiles_load_and_cite_sources(name):
    prof = _profile(name)
    assert len(plan_profiles.BUILTIN[name]["source"]) > 80
    assert prof.inter is not None and prof.gpus_per_node == 8


def test_profile_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in"):
        plan_profiles.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"intra": {"alpha_s": 1e-6}}))
    with pytest.raises(ValueError, match="not a valid profile"):
        plan_profiles.load(str(bad))
    one_host = tmp_path / "host.json"
    spec = {k: v for k, v in plan_profiles.BUILTIN["p40-25gbe"].items() if k != "inter"}
    one_host.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="no inter-node link"):
        plan.run("resnet50", [16], 8, str(one_host), 64, "fp32")


def test_json_workload(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(
        json.dumps(
            {"name": "toy", "tensors": [[4, 4], {"shape": [4], "flops": 0}], "forward_s": 0.01}
        )
    )
    w = from_json(str(path), 8)
    assert w.numels == [16, 4] and w.backward_s == pytest.approx(0.02)
    path.write_text(json.dumps({"tensors": [[4]]}))
    with pytest.raises(ValueError, match="forward_flops_per_sample"):
        from_json(str(path), 8)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="tensors"):
        from_json(str(path), 8)


def test_plan_cli_table_json_plot_and_settings(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    argv = [
        "plan",
        "--profile",
        "p40-25gbe",
        "--gpus",
        "8,1024",
        "--wire",
        "fp16",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "hierarchical" in table and "GRADFUSE_FUSION_THRESHOLD=" in table
    result = json.loads(out.read_text())
    assert [r["gpus"] for r in result["runs"]] == [8, 1024]
    assert png.stat().st_size > 1000
    for run in result["runs"]:
        assert set(run["settings"]) == set(config.PLAN_SETTINGS)
        best = run["algorithms"][run["best"]]
        assert best["step_s"] == min(
            a["step_s"] for name, a in run["algorithms"].items() if name != "tree"
        )
        known = {env for env, *_ in config._OPTIONS.values()}
        assert set(run["env"]) <= known
    # init(plan=...) takes the run for the job's size.
    settings = config.plan_settings(out, 1024)
    cfg = config.resolve(plan=str(out), plan_size=1024)
    assert cfg.fusion_threshold_bytes == settings["fusion_threshold_bytes"]
    assert cfg.hierarchical_allreduce == settings["hierarchical_allreduce"]
    # An explicit argument beats the plan.
    assert config.resolve(plan=str(out), plan_size=8, cycle_time_ms=7.0).cycle_time_ms == 7.0
    with pytest.raises(ValueError, match=r"plans for \[8, 1024\] GPUs, not for this job's 64"):
        config.resolve(plan=str(out), plan_size=64)


def test_plan_cli_bad_input(capsys):
    for argv, needle in (
        (["plan", "--gpus", "8,x"], "--gpus must be like"),
        (["plan", "--gpus", "12", "--gpus-per-node", "8"], "do not fill nodes"),
        (["plan", "--profile", "nope"], "neither a built-in"),
        (["plan", "--validate", "--plot", "x.png"], "--validate prints a table"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert needle in capsys.readouterr().err


def test_plan_file_errors(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"runs": [{"gpus": 2, "settings": {"fusion_threshold": 1}}]}))
    with pytest.raises(ValueError, match="unknown settings"):
        config.plan_settings(path, 2)
    path.write_text("{}")
    with pytest.raises(ValueError, match="is not a plan"):
        config.plan_settings(path, 2)
    with pytest.raises(ValueError, match="cannot read"):
        config.resolve(plan=str(tmp_path / "none.json"), plan_size=2)


def test_hierarchical_threshold_setting(monkeypatch):
    monkeypatch.setenv("GRADFUSE_HIERARCHICAL_THRESHOLD", "65536")
    with pytest.raises(ValueError, match="needs hierarchical_allreduce=True"):
        config.resolve()
    monkeypatch.setenv("GRADFUSE_HIERARCHICAL_ALLREDUCE", "1")
    assert config.resolve().hierarchical_threshold_bytes == 65536
    monkeypatch.setenv("GRADFUSE_HIERARCHICAL_THRESHOLD", "-2")
    with pytest.raises(
        ValueError, match="GRADFUSE_HIERARCHICAL_THRESHOLD must be an integer >= -1"
    ):
        config.resolve()
    monkeypatch.delenv("GRADFUSE_HIERARCHICAL_THRESHOLD")
    assert config.resolve().hierarchical_threshold_bytes == -1


# ---- calibrate's fit ---------------------------------------------------------------------------


def test_fit_recovers_a_ring():
    alpha, beta, m = 40e-6, 1 / 3e9, 4
    rows = [
        {
            "bytes": n,
            "allreduce_s": 2 * (m - 1) * alpha + 2 * (m - 1) / m * n * beta,
            "allgather_s": (m - 1) * alpha + (m - 1) / m * n * beta,
        }
        for n in calibrate.default_sizes(16 << 20)
    ]
    link = calibrate.ring_link(rows, m)
    assert link["alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert link["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    assert link["allgather_alpha_s"] == pytest.approx(alpha, rel=1e-6)
    assert link["fit_error"] < 1e-9
    # Across nodes, beta is per node: the k rings share its NICs.
    assert calibrate.ring_link(rows, m, per_node_rings=8)["beta_s_per_byte"] == pytest.approx(
        beta / 8, rel=1e-6
    )


def test_fit_never_goes_negative():
    a, b = calibrate.fit_line([(1, 1.0), (2, 0.5), (4, 0.25)])
    assert a >= 0 and b == 0
    a, b = calibrate.fit_line([(1, 1e-3), (1000, 1.0), (10, 1e-2)])
    assert a == 0 and b > 0 and math.isfinite(b)
    with pytest.raises(ValueError, match="at least two"):
        calibrate.fit_line([(1, 1.0)])


def test_hybrid_wins_when_a_fused_message_exceeds_the_crossover(tmp_path):
    # A 512 MiB gradient (flat is cheaper above the crossover) and small ones (hierarchical is
    # cheaper below it): the plan picks hybrid with the crossover as its threshold.
    path = tmp_path / "big.json"
    tensors = [[128 << 20]] + [[16384]] * 8
    path.write_text(json.dumps({"name": "big", "tensors": tensors, "forward_s": 0.05}))
    result = plan.run(str(path), [1024], 8, "p40-25gbe", 64, "fp32")
    (run,) = result["runs"]
    assert run["best"] == "hybrid"
    steps = {name: a["step_s"] for name, a in run["algorithms"].items()}
    assert steps["hybrid"] < min(steps["flat"], steps["hierarchical"])
    assert run["settings"]["hierarchical_threshold_bytes"] == run["crossover_bytes"]
    assert 16384 * 4 < run["crossover_bytes"] < (512 << 20)
    assert run["env"]["GRADFUSE_HIERARCHICAL_THRESHOLD"] == str(run["crossover_bytes"])


def test_links_of_a_multi_host_job():
    # calibrate_worker's points from 2 hosts x 4 ranks: intra rings of 4, inter rings of 2
    # (one per local rank, all at once), so the inter beta is per node: the ring's / 4.
    def rows(alpha, beta, m):
        return [
            {
                "bytes": n,
                "allreduce_s": 2 * (m - 1) * (alpha + n / m * beta),
                "allgather_s": (m - 1) * (alpha + n / m * beta),
            }
            for n in calibrate.default_sizes()
        ]

    result = {
        "ranks": 8,
        "nodes": 2,
        "ranks_per_node": 4,
        "device": "cuda",
        "levels": {
            "intra": {"ranks": 4, "rows": rows(2e-6, 1 / 200e9, 4)},
            "inter": {"ranks": 2, "rows": rows(8e-6, 1 / 20e9, 2)},
        },
    }
    links = calibrate.links_of(result)["levels"]
    assert links["intra"]["alpha_s"] == pytest.approx(2e-6, rel=1e-6)
    assert links["intra"]["beta_s_per_byte"] == pytest.approx(1 / 200e9, rel=1e-6)
    assert links["inter"]["alpha_s"] == pytest.approx(8e-6, rel=1e-6)
    assert links["inter"]["beta_s_per_byte"] == pytest.approx(1 / 80e9, rel=1e-6)
