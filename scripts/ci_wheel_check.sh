#!/usr/bin/env bash
# CI for the wheels users install, on a machine without a GPU. scripts/build_wheels.sh builds and
# repairs one CPU and one CUDA wheel (for the CUDA one, compiling and linking the CUDA kernels
# against torch's CUDA build is the check a GPU-less machine can make; tests/test_ops_cuda.py
# runs them where a GPU exists). Then, for each wheel: a brand-new venv holding only its torch,
# `pip install gradfuse` from the wheelhouse as README says (pip must choose the wheel built for
# that torch and leave the torch alone), and scripts/wheel_smoke.py from outside the source tree
# (the choice, CUDA kernels registered in a CUDA wheel, ops on the CPU, a 2-rank Gloo allreduce).
# Last, each wheel forced under the other torch must refuse to import, naming both and the fix.
#
#   GRADFUSE_WHEEL_MATRIX  the wheels (default: "2.13.0:cpu 2.14.1:cu130"; see build_wheels.sh)
#   PYTHON                 the interpreter that creates the venvs (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
read -r -a matrix <<<"${GRADFUSE_WHEEL_MATRIX:-2.13.0:cpu 2.14.1:cu130}"
pip_quiet=(--quiet --disable-pip-version-check)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export GRADFUSE_WHEELHOUSE="$work/wheelhouse"
start=$SECONDS
log() { printf '[ci-wheels %4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

tag_of() { # 2.14.1:cu130 -> pt214cu130
  local version="${1%%:*}"
  local minor="${version%.*}"
  echo "pt${minor/./}${1#*:}"
}
torch_req_of() { # what build_wheels.sh installs for the entry
  local version="${1%%:*}"
  if [ "${1#*:}" = cpu ]; then echo "torch==$version+cpu"; else echo "torch==$version"; fi
}
base_version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/python/gradfuse/_version.py")"

log "building ${matrix[*]}"
bash "$root/scripts/build_wheels.sh" "${matrix[@]}"

installed_torch() { "$1/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))'; }

# The two ways README gives: the first venv pins its torch and offers pip every wheel (the pin
# makes pip choose this torch's wheel), the others name their torch build's page.
first=1
for entry in "${matrix[@]}"; do
  tag="$(tag_of "$entry")"
  venv="$work/venv-$tag"
  "${PYTHON:-python3}" -m venv "$venv"
  nice "$venv/bin/pip" install "${pip_quiet[@]}" "$(torch_req_of "$entry")"
  torch_before="$(installed_torch "$venv")"
  # ==base_version: the wheelhouse's wheels only, never a same-named project on an index.
  if [ $first = 1 ]; then
    how=("torch==${torch_before%%+*}" -f "$GRADFUSE_WHEELHOUSE")
  else
    how=(-f "$GRADFUSE_WHEELHOUSE/$tag.html")
  fi
  log "$(basename "$venv"): only torch $torch_before; pip install gradfuse ${how[*]}"
  nice "$venv/bin/pip" install "${pip_quiet[@]}" "gradfuse==$base_version" "${how[@]}"
  [ "$(installed_torch "$venv")" = "$torch_before" ] || {
    log "error: pip replaced torch $torch_before with $(installed_torch "$venv")"
    exit 1
  }
  (cd "$work" && nice "$venv/bin/python" "$root/scripts/wheel_smoke.py")
  first=0
done

for entry in "${matrix[@]}"; do
  venv="$work/venv-$(tag_of "$entry")"
  for other in "${matrix[@]}"; do
    [ "${other%.*}" != "${entry%.*}" ] || continue # the same torch minor loads
    wheel="$(ls "$GRADFUSE_WHEELHOUSE"/gradfuse-*+"$(tag_of "$other")"-*.whl)"
    log "$(basename "$wheel") forced into $(basename "$venv") must refuse to import"
    "$venv/bin/pip" install "${pip_quiet[@]}" --no-deps --force-reinstall "$wheel"
    if (cd "$work" && "$venv/bin/python" -c 'import gradfuse' 2>"$work/refusal"); then
      log "error: it imported"
      exit 1
    fi
    tail -1 "$work/refusal" >&2
    for want in "built against torch ${other%%:*}" "pip install --force-reinstall --no-deps"; do
      grep -qF "$want" "$work/refusal" || {
        log "error: the refusal does not say '$want'"
        exit 1
      }
    done
  done
done
log "done"
