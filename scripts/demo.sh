#!/usr/bin/env bash
# The main job on this machine: builds gradfuse into .venv and runs the demo
# (today: the fused-op microbenchmark table on the CPU). Extra arguments go to the demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$GRADFUSE_ROOT"
exec "$PY" -m gradfuse.bench ops "$@"
