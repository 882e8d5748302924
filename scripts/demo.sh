#!/usr/bin/env bash
# The main job on this machine: builds gradfuse into .venv, then trains a small CNN on
# scikit-learn's digits with 4 CPU ranks (DistributedOptimizer + fused LARS + fp16 gradient
# compression, balanced batches). Extra arguments go to the demo (--help lists them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$GRADFUSE_ROOT"
exec "$PY" -m gradfuse.run -np 4 -m gradfuse.demo "$@"
