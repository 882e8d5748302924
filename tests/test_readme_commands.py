"""Every command of the README's Benchmarks block runs, as written, against the installed
gradfuse, at its smallest sizes: the test appends the options below (argparse keeps the last
of a repeated option) and checks what each wrote. A command added to the block without an
entry here fails the test. The numbers are not checked (no timing thresholds in tests)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from multiproc import worker_env

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The Benchmarks section's bash block, one command per line, without comments and
    [optional] parts."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Benchmarks") :]
    block = section[section.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]
    lines = [re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).strip() for line in block.splitlines()]
    return [" ".join(line.split()) for line in lines if line]


def key(command: str) -> str | None:
    """The longest SMOKE entry the command starts with (whole words), or None."""
    keys = [k for k in SMOKE if command == k or command.startswith(k + " ")]
    return max(keys, key=len, default=None)


def check_ops(out, result, _):
    assert "gradfuse lars_update_" in out and "copy bandwidth" in out
    assert {r["impl"].split(" (")[0] for r in result["rows"]} >= {
        "gradfuse lars_update_",
        "gradfuse pack_",
        "gradfuse exact",
        "gradfuse sampled",
    }


def check_allreduce(out, result, _):
    assert result["ranks"] == 2 and [r["bytes"] for r in result["rows"]] == [1024, 4096]
    assert all(r["gradfuse_busbw"] > 0 and r["torch_flat_busbw"] > 0 for r in result["rows"])
    assert "busbw" in out
    assert "1 KiB latency" in out and "idle CPU" in out
    assert result["latency"]["engine_s"] > 0 and result["latency"]["direct_s"] > 0
    assert result["idle"]["with_engine_pct"] >= 0


def check_resnet50_allreduce(out, result, _):
    assert result["ranks"] == 2 and result["tensors"] == 161
    assert {"a", "a_views", "b", "c", "d", "e", "f", "c_plus_f"} <= set(result["vs_floor"])
    assert result["c_plus_f"] == result["c"] + result["f"] and "the floor with the copies" in out
    assert result["stats_views"]["in_place"] > 0  # (a') ran in place
    assert result["lat_engine"] > 0 and result["lat_direct"] > 0
    assert "(a') (a) on views of one flat buffer" in out and "1 KiB allreduce latency" in out


def check_train(out, result, _):
    assert [r["ranks"] for r in result] == [1, 2]
    for r in result:
        names = {"gradfuse", "gradfuse_views", "ddp", "ddp_views"}
        assert set(r["rounds"]) == names and all(r[f"{n}_per_rank"] > 0 for n in names)
        assert r["gradfuse_vs_ddp"] > 0 and r["gradfuse_views_vs_ddp"] > 0
    assert "gradfuse/DDP" in out


def check_train_hooks(out, result, _):
    """A DDP row per comm hook, beside plain DDP (1 rank, tiny sizes: numbers not checked)."""
    hooks = ["fp16", "bf16", "topk", "hierarchical", "torch-fp16", "powersgd"]
    (r,) = result
    assert r["ddp_hooks"] == hooks
    assert set(r["rounds"]) == {"gradfuse", "ddp"} | {f"ddp_{h}" for h in hooks}
    assert all(r[f"ddp_{h}_per_rank"] > 0 for h in hooks)
    assert "torch DDP with comm hooks" in out and "powersgd" in out


def check_calibrate(out, _result, tmp):
    profile = json.loads((tmp / "me.json").read_text())
    # A smoke run's few small sizes may fit a zero slope (the fit keeps it non-negative).
    link = profile["intra"]
    assert link["alpha_s"] >= 0 and link["beta_s_per_byte"] >= 0, link
    assert profile["compute_flops_per_s"] > 0 and "profile written to" in out
    # --np 2: both ranks timed the model at once.
    assert list(profile["compute_by_ranks"]) == ["2"] and profile["compute_by_ranks"]["2"] > 0
    assert "compute with 2 ranks at once" in out


def check_plan(out, result, _):
    assert [r["gpus"] for r in result["runs"]] == [8, 64, 1024]
    assert "GRADFUSE_FUSION_THRESHOLD=" in out


def check_plan_validate(out, result, _):
    assert [r["ranks"] for r in result["here"]] == [1, 2]
    assert all(r["measured_step_s"] > 0 and r["predicted_step_s"] > 0 for r in result["here"])
    assert result["seeds"] and "validation here" in out


def check_pytest(out, _result, _):
    assert " passed" in out and "failed" not in out


def check_bench_engine(out, _result, outdir):
    train = json.loads((outdir / "train-mlp.json").read_text())
    summary = train[0]["timeline"]
    assert summary["collectives"] and summary["tensors"] > 0
    assert (outdir / "timeline-mlp.json").exists() and (outdir / "resnet50-allreduce.json").exists()
    assert "negotiation overlaps the previous collective:" in out
    assert (outdir / "bench_engine.txt").read_text().strip().endswith(" s")


# key -> (options appended for the smallest run, check(stdout, JSON written, tmp dir))
SMOKE = {
    "gradfuse-bench ops": (["--reps", "1"], check_ops),
    "gradfuse-bench allreduce": (
        ["--np", "2", "--max-size", "4096", "--idle-seconds", "0.5"],
        check_allreduce,
    ),
    "gradfuse-bench resnet50-allreduce": (
        ["--np", "2", "--iters", "1", "--latency-iters", "2", "--scale", "0.001"],
        check_resnet50_allreduce,
    ),
    "gradfuse-bench train": (
        ["--np", "1,2", "--steps", "1", "--rounds", "1", "--batch-size", "2"],
        check_train,
    ),
    "gradfuse-bench train --np 1,2,4 --ddp-hook": (
        ["--np", "1", "--model", "mlp", "--steps", "1", "--rounds", "1", "--batch-size", "2"]
        + ["--bucket-view", "off"],
        check_train_hooks,
    ),
    "gradfuse-bench calibrate": (
        ["--out", "{tmp}/me.json", "--max-size", "16384", "--model", "mlp", "--batch-size", "2"],
        check_calibrate,
    ),
    "gradfuse-bench plan": ([], check_plan),
    "gradfuse-bench plan --validate": (
        ["--np", "1,2", "--train-model", "mlp", "--batch-size", "2"],
        check_plan_validate,
    ),
    "python -m pytest bench/test_bench_ops.py": (
        ["--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        check_pytest,
    ),
    "bash scripts/bench_engine.sh": ([], check_bench_engine),
}
COMMANDS = readme_commands()


def test_every_readme_command_has_a_smoke_run():
    assert COMMANDS, "no commands found in the README's Benchmarks block"
    missing = [c for c in COMMANDS if key(c) not in SMOKE]
    assert not missing, f"README Benchmarks commands without an entry in SMOKE: {missing}"


def argv(command: str, tmp_path: Path) -> tuple[list[str], dict]:
    """The command as a process runs it here, and its extra environment."""
    options = [w.replace("{tmp}", str(tmp_path)) for w in SMOKE[key(command)][0]]
    words = shlex.split(command) + options
    env = {}
    if words[0] == "gradfuse-bench":
        script = Path(sys.executable).parent / "gradfuse-bench"  # the installed entry point
        assert script.exists(), f"gradfuse-bench is not installed beside {sys.executable}"
        words = [str(script), *words[1:]]
        if words[1] != "calibrate":  # calibrate writes its profile to --out
            words += ["--json", str(tmp_path / "out.json")]
    elif words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "bash":  # the script's OUTDIR, its interpreter, its smallest sizes
        words.append(str(tmp_path))
        env = {"PYTHON": sys.executable, "BENCH_SMOKE": "1"}
    return words, env


@pytest.mark.timeout(400)
@pytest.mark.parametrize("command", [c for c in COMMANDS if key(c) in SMOKE])
def test_readme_command_runs(command, tmp_path):
    words, extra = argv(command, tmp_path)
    proc = subprocess.run(
        words,
        cwd=ROOT,
        env=worker_env(tmp_path, 0, extra),
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert proc.returncode == 0, f"{' '.join(words)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    out_json = tmp_path / "out.json"
    result = json.loads(out_json.read_text()) if out_json.exists() else None
    SMOKE[key(command)][1](proc.stdout, result, tmp_path)
