# Sourced by demo.sh and test.sh: create or reuse a virtual environment, install the pinned
# dependencies when they changed, and build + install gradfuse into it (incremental: the CMake
# build directory under build/ is kept between runs).
#
#   GRADFUSE_VENV   where the venv lives (default: .venv in the repository)
#   PYTHON          the interpreter that creates it (default: python3)
#   GRADFUSE_REQUIREMENTS  the pinned requirements file (default: scripts/requirements.txt)
set -euo pipefail

GRADFUSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GRADFUSE_VENV="${GRADFUSE_VENV:-$GRADFUSE_ROOT/.venv}"
GRADFUSE_REQUIREMENTS="${GRADFUSE_REQUIREMENTS:-$GRADFUSE_ROOT/scripts/requirements.txt}"

log() { printf '[gradfuse] %s\n' "$*" >&2; }

if [ ! -x "$GRADFUSE_VENV/bin/python" ]; then
  log "creating $GRADFUSE_VENV"
  "${PYTHON:-python3}" -m venv "$GRADFUSE_VENV"
fi
PY="$GRADFUSE_VENV/bin/python"

# Reinstall the pinned dependencies only when the requirements file changed.
stamp="$GRADFUSE_VENV/.gradfuse-requirements.sha256"
want="$(sha256sum "$GRADFUSE_REQUIREMENTS" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned dependencies from ${GRADFUSE_REQUIREMENTS#"$GRADFUSE_ROOT"/}"
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$GRADFUSE_REQUIREMENTS"
  echo "$want" >"$stamp"
fi

log "building and installing gradfuse into $GRADFUSE_VENV"
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps \
  "$GRADFUSE_ROOT"
