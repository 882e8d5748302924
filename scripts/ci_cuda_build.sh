#!/usr/bin/env bash
# CI for the CUDA build on a machine without a GPU: proves that the CUDA kernels (cuda/) and
# their torch glue (cpp/ops/cuda/) compile and link against the CUDA 13 torch, that the
# installed package imports with CUDA on and its ops registered for the CUDA dispatch key, and
# that a wheel built the same way installs into a brand-new venv holding only the same torch and
# imports there, outside the source tree. Running the kernels needs a GPU:
# tests/test_ops_cuda.py does that where one exists (it skips here).
#
#   GRADFUSE_CUDA_VENV    the build venv (default: .venv-cuda in the repository; reused)
#   TORCH_CUDA_ARCH_LIST  GPU architectures (default: 8.0;9.0)
#   PYTHON                the interpreter that creates the venvs (default: python3)
#   CUDACXX               nvcc, when it is not on PATH (default: PATH, then /usr/local/cuda*)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GRADFUSE_CUDA_VENV:-$root/.venv-cuda}"
torch_req="torch==2.14.1"  # CUDA 13.0 build: the one nvcc 13 compiles against
export GRADFUSE_CUDA=ON    # fail the build, rather than fall back to CPU only
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
pip_quiet=(--quiet --disable-pip-version-check)
# Its own CMake build directory: the CPU build of the same checkout uses build/<wheel tag>.
build_dir=(--config-settings=build-dir=build/cuda-{wheel_tag})
start=$SECONDS
log() { printf '[ci-cuda %4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
  for candidate in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -x "$candidate" ]; then export CUDACXX="$candidate"; fi
  done
fi
log "nvcc: ${CUDACXX:-$(command -v nvcc || echo 'not found (the build will say so)')}"

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
log "installing $torch_req and the build tools into $venv"
"$py" -m pip install "${pip_quiet[@]}" "$torch_req" "cmake>=3.26" ninja scikit-build-core==1.1.2 \
  numpy

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Imports gradfuse from outside the source tree and checks that CUDA is compiled in and every
# op with a CUDA kernel has one registered.
check_import() {
  (cd "$work" && "$1" - <<'EOF'
import gradfuse
import torch

info = gradfuse.build_info()
print("gradfuse build_info:", info)
assert info["cuda"], "gradfuse was built without CUDA"
for op in ("lars_update_", "pack_", "unpack_", "topk_compress"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{op}", "CUDA"), op
print("CUDA kernels registered for lars_update_, pack_, unpack_, topk_compress")
EOF
  )
}

log "building and installing gradfuse (CUDA ON, architectures $TORCH_CUDA_ARCH_LIST)"
"$py" -m pip install "${pip_quiet[@]}" "${build_dir[@]}" --no-build-isolation --no-deps \
  --force-reinstall "$root"
check_import "$py"

log "building the wheel"
"$py" -m pip wheel "${pip_quiet[@]}" "${build_dir[@]}" --no-build-isolation --no-deps "$root" \
  -w "$work/dist"
wheel="$(ls "$work"/dist/gradfuse-*.whl)"
log "built $(basename "$wheel")"

log "fresh venv with only $torch_req and the wheel"
"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install "${pip_quiet[@]}" "$torch_req" numpy
"$work/venv/bin/pip" install "${pip_quiet[@]}" --no-deps "$wheel"
check_import "$work/venv/bin/python"

log "done"
