"""Running a benchmark worker module on N local ranks and reading the JSON its rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_worker(ranks: int, module: str, args: list[str]):
    """`python -m gradfuse.run -np ranks -m module args... --out PATH`; returns PATH's JSON.
    A failing job raises RuntimeError with the end of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "gradfuse.run",
            "-np",
            str(ranks),
            "-m",
            module,
            *args,
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{module}: {ranks} ranks failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        return json.loads(out.read_text())
