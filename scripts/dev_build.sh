#!/usr/bin/env bash
# Developer loop: configure + build with CMake directly into build/dev and drop the extension
# into python/gradfuse/, so `PYTHONPATH=python python -m pytest` tests the working tree without
# a pip install. Uses the interpreter in $GRADFUSE_PYTHON (default: .venv/bin/python).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${GRADFUSE_PYTHON:-$root/.venv/bin/python}"
build="${GRADFUSE_BUILD_DIR:-$root/build/dev}"
cmake_bin="$("$py" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')"
"$cmake_bin" -S "$root" -B "$build" -G Ninja -DPython_EXECUTABLE="$py" \
  -DCMAKE_MAKE_PROGRAM="$(dirname "$py")/ninja" "$@" >/dev/null
"$cmake_bin" --build "$build"
cp "$build"/_C*.so "$build/_build_info.py" "$root/python/gradfuse/"
