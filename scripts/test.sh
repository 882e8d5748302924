#!/usr/bin/env bash
# The whole test suite: builds gradfuse into .venv, checks style, then runs pytest
# (single-process op tests and multi-process engine tests). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$GRADFUSE_ROOT"

log "ruff"
"$GRADFUSE_VENV/bin/ruff" check python tests bench scripts

log "pytest"
# Run from a directory where ./python is not importable, so the installed package is tested.
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
