"""Writes OUTDIR/gpu_check.md from what scripts/gpu_check.sh left in OUTDIR.

    python scripts/gpu_check_report.py OUTDIR

Reads machine.txt ("key: value" lines), steps.tsv (id, title, status, seconds, summary per
step) and bench_ops.json (gradfuse-bench ops --json) when present. Standard library only: the
report must come out even when torch or gradfuse cannot be imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}


def read_steps(out: Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        fields = line.split("\t")
        if len(fields) == 5:
            steps.append(dict(zip(("id", "title", "status", "seconds", "summary"), fields)))
    return steps


def machine_lines(out: Path) -> list[str]:
    path = out / "machine.txt"
    if not path.exists():
        return ["- (machine.txt is missing)"]
    return [f"- {line}" for line in path.read_text().splitlines() if line.strip()]


def bench_table(out: Path) -> list[str]:
    path = out / "bench_ops.json"
    if not path.exists():
        return ["No benchmark results (bench_ops.json is missing: see bench.log)."]
    try:
        data = json.loads(path.read_text())
        rows = data["rows"]
        copy = float(data["copy_bandwidth_gbps"])
    except (ValueError, KeyError, TypeError) as e:
        return [f"bench_ops.json is unreadable: {e}"]
    lines = [
        (
            f"ResNet-50's 161 gradients (25.6M values). Measured device copy bandwidth "
            f"(read + write): **{copy:.0f} GB/s**; `% copy` is each row's achieved bandwidth over it."
        ),
        "",
        "| op | implementation | median ms | speed-up | GB/s | % copy |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = "ref" if r.get("speedup") is None else f"{r['speedup']:.1f}x"
        lines.append(
            f"| {r['op']} | {r['impl']} | {r['ms']:.3f} | {speedup} | {r['gbps']:.0f} | "
            f"{100 * r['share_of_copy']:.0f}% |"
        )
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    steps = read_steps(out)
    counts = {s: sum(1 for x in steps if x["status"] == s) for s in MARK}
    total_s = sum(int(x["seconds"]) for x in steps if x["seconds"].isdigit())
    verdict = "FAILED" if counts["failed"] else "PASSED"
    lines = [
        "# gradfuse GPU check",
        "",
        "## Machine",
        "",
        *machine_lines(out),
        "",
        "## Steps",
        "",
        (
            f"**{verdict}**: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped; {total_s} s in steps."
        ),
        "",
        "| step | verdict | s | summary | log |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for s in steps:
        log = f"{s['id']}.log" if (out / f"{s['id']}.log").exists() else ""
        summary = s["summary"].replace("|", "\\|")
        lines.append(
            f"| {s['title']} | {MARK.get(s['status'], s['status'])} | {s['seconds']} | "
            f"{summary} | {log} |"
        )
    lines += [
        "",
        (
            "Step 2 runs tests/test_engine.py and tests/test_collectives.py with "
            "GRADFUSE_TEST_DEVICE=cuda: (a) 1 rank, engine CUDA backend NCCL (checks that need two "
            "ranks skip); (b) 2 ranks sharing the GPU, engine CUDA backend Gloo."
        ),
        "",
        "## Benchmark: `gradfuse-bench ops --device cuda`",
        "",
        *bench_table(out),
        "",
    ]
    (out / "gpu_check.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
