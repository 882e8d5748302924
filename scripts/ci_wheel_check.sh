#!/usr/bin/env bash
# The package is a wheel users install: build it from the dev venv (no build isolation), then
# install it into a brand-new venv holding only the same torch, and import it from outside the
# source tree. Needs scripts/_env.sh to have run (scripts/test.sh does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "building the wheel"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps \
  "$GRADFUSE_ROOT" -w "$work/dist"
wheel="$(ls "$work"/dist/gradfuse-*.whl)"
log "built $(basename "$wheel")"

torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
log "fresh venv with torch==$torch_version and the wheel"
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_version" numpy
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$wheel"
cd "$work"
"$work/venv/bin/python" -c '
import torch, gradfuse
info = gradfuse.build_info()
print("wheel import ok:", info)
x = [torch.randn(5), torch.randn(3)]
flat, flag = gradfuse.ops.pack(x, torch.float16)
assert torch.equal(flat, torch.cat(x).half()) and flag.item() == 0.0
'
