#!/usr/bin/env bash
# Checks gradfuse on a machine with an NVIDIA GPU, in one command and within 9 minutes:
#
#   bash scripts/gpu_check.sh [OUTDIR]       (default OUTDIR: ${OUT:-gpu_check_out})
#
# Builds gradfuse against this machine's torch (CUDA on, this GPU's architecture), then runs
#   1. the CUDA op tests (tests/test_ops_cuda.py),
#   2. the engine, collectives and training tests on CUDA tensors: 1 rank over NCCL, 2 ranks
#      sharing the GPU over Gloo (GRADFUSE_CUDA_BACKEND=gloo),
#   3. compute-sanitizer memcheck and racecheck over a fast subset of the op tests,
#   4. scripts/gpu_check.py: no host sync on the hot path, CUDA-graph replay equal to eager,
#      every op on a tensor above 2**31 elements,
#   5. gradfuse-bench ops --device cuda (achieved vs measured copy bandwidth),
# each under its own timeout, and writes OUTDIR/gpu_check.md (machine, one verdict per step,
# figures) with every step's raw log beside it. Exit status 1 when a step failed; the report is
# written in every case (a step that times out is recorded as failed, and the run goes on).
#
# Without a usable GPU (no nvidia-smi, or torch.cuda.is_available() false) it prints one line
# and exits 0, building nothing.
#
#   PYTHON                          interpreter with torch (default: python3); gradfuse is
#                                   pip-installed into its environment (no network needed)
#   GRADFUSE_GPU_CHECK_SKIP_BUILD=1 reuse the gradfuse already importable by $PYTHON
#   CUDACXX, CUDA_TOOLKIT_ROOT_DIR  nvcc and the CUDA toolkit (default: found, see below)
#
# Time budget (one H100/H200, 16 cores): the whole run stops starting steps after
# BUDGET_S = 515 s and clips each step's timeout to the time left, so it ends within 9 minutes
# even if every step hangs. Per-step limits, in order: probe 60, build 200, op tests 90,
# engine 1 rank 105, engine 2 ranks 120, memcheck 60, racecheck 60, sync 40, graph 40,
# bandwidth 45, huge 90, bench 60 (the engine steps were 75 and 90 before the training tests
# joined them; those take ~8 s at 1 rank and ~12 s at 2 on 2 CPU cores, plus each rank's CUDA start, and
# the deadline still bounds the whole run). They add up to more than the budget on purpose:
# each is generous for its own worst case, and the deadline keeps the sum honest.
set -uo pipefail # no -e: a failed step is recorded and the next one still runs

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET_S=515

# ---- a usable GPU, or one line and exit 0 -----------------------------------------------------
no_gpu() {
  echo "gpu_check: needs an NVIDIA GPU and found none ($1); nothing was built or run"
  exit 0
}
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "no nvidia-smi on PATH"
nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi -L failed"
timeout 120 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  >/dev/null 2>&1 || no_gpu "torch.cuda.is_available() is false for $PYTHON"

out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
steps="$out/steps.tsv" # one line per step: id, title, status, seconds, summary
: >"$steps"
start=$SECONDS
deadline=$((start + BUDGET_S))
# Marks every process a step starts (the ranks too: tests/multiproc.py keeps non-GRADFUSE_
# variables), so what a timed-out step left behind can be found and killed by process id.
run_id="gpu-check-$$-$RANDOM"
log() { printf '[gpu_check %3ds] %s\n' $((SECONDS - start)) "$*" >&2; }

record() { # id title status seconds summary
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(echo "$5" | tr '\t\n' '  ' | cut -c1-400)" >>"$steps"
  log "$1 ($2): $3 in $4 s: $5"
}

kill_leftovers() {
  local p pid
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    [ "$pid" = "$$" ] && continue
    # (Processes vanish while we look, and others' environments are unreadable: no noise.)
    if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qx "GPU_CHECK_RUN=$run_id"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

# run_step ID LIMIT_S CMD...: runs CMD in the repository root under a timeout of LIMIT_S clipped
# to the time left, output in $out/ID.log. Sets STEP_RC (124 or 137: timed out), STEP_S,
# STEP_LIMIT; returns 1 without running when no time is left.
run_step() {
  local id=$1 limit=$2 left
  shift 2
  left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    STEP_RC=-1 STEP_S=0 STEP_LIMIT=0
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  STEP_LIMIT=$limit
  log "$id: $* (timeout ${limit} s)"
  local t0=$SECONDS
  (cd "$root" && exec env GPU_CHECK_RUN="$run_id" timeout --kill-after=10 "$limit" "$@") \
    >"$out/$id.log" 2>&1
  STEP_RC=$?
  STEP_S=$((SECONDS - t0))
  kill_leftovers
  return 0
}

timed_out() { [ "$STEP_RC" = 124 ] || [ "$STEP_RC" = 137 ]; }

# pytest's last line ("3 passed, 2 skipped in 4.1s") from a log, or "".
pytest_summary() {
  grep -E '[0-9]+ (passed|failed|skipped|error|errors|deselected)' "$1" | tail -1 | sed 's/=//g' |
    sed 's/^ *//; s/ *$//'
}

# record_pytest ID TITLE [NOTE]: the verdict of a pytest step from its exit status and summary.
# All tests skipped counts as skipped (a GPU test that skipped proves nothing), not passed.
record_pytest() {
  local id=$1 title=$2 note=${3:-} summary status
  summary="$(pytest_summary "$out/$id.log")"
  if timed_out; then
    status=failed summary="timed out after $STEP_LIMIT s; ${summary:-no summary}"
  elif [ "$STEP_RC" = 0 ] && echo "$summary" | grep -q ' passed'; then
    status=passed
  elif [ "$STEP_RC" = 0 ] || [ "$STEP_RC" = 5 ]; then
    status=skipped summary="nothing ran: ${summary:-no tests collected}"
  else
    status=failed summary="exit $STEP_RC; ${summary:-no pytest summary (see the log)}"
  fi
  record "$id" "$title" "$status" "$STEP_S" "${note:+$note; }$summary"
}

no_time() { record "$1" "$2" skipped 0 "not started: the ${BUDGET_S} s budget was used up"; }

write_report() {
  if ! "$PYTHON" "$root/scripts/gpu_check_report.py" "$out" >"$out/report.log" 2>&1; then
    # The report writer failed: keep the verdicts readable anyway.
    {
      echo "# gradfuse GPU check (plain report: scripts/gpu_check_report.py failed)"
      echo
      cat "$out/machine.txt" 2>/dev/null
      echo
      echo '```'
      cat "$steps"
      cat "$out/report.log"
      echo '```'
    } >"$out/gpu_check.md"
  fi
  echo "gpu_check: report $out/gpu_check.md"
}
trap 'kill_leftovers; write_report; exit 130' INT TERM

py_in_root() { (cd "$root" && "$PYTHON" "$@"); }

# ---- the machine ----------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
  echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
  echo "gpus: $(nvidia-smi -L | wc -l)"
  echo "cpus: $(nproc)"
  echo "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])') ($PYTHON)"
  timeout 60 "$PYTHON" -c '
import torch
print("torch:", torch.__version__, "(CUDA", torch.version.cuda, ")")
print("compute capability: %d.%d" % torch.cuda.get_device_capability())
'
} >"$out/machine.txt" 2>&1
capability="$(sed -n 's/^compute capability: //p' "$out/machine.txt")"

# ---- build ----------------------------------------------------------------------------------
# The CUDA toolkit root and nvcc. An nvcc on PATH may be a wrapper script (it is on the CI
# machine: /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc), which misleads torch's and
# CMake's probing, so the root is the first directory with bin/nvcc and include/cuda_runtime.h.
find_cuda_root() {
  local dir nvcc_path
  for dir in "${CUDA_TOOLKIT_ROOT_DIR:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    [ -n "$dir" ] && [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ] &&
      echo "$dir" && return
  done
  for nvcc_path in "${CUDACXX:-}" "$(command -v nvcc 2>/dev/null)"; do
    [ -n "$nvcc_path" ] || continue
    # A wrapper script: follow its "exec /path/to/nvcc" line.
    if head -c 2 "$nvcc_path" 2>/dev/null | grep -q '#!'; then
      nvcc_path="$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc_path" | head -1)"
    fi
    dir="$(dirname "$(dirname "$(readlink -f "$nvcc_path" 2>/dev/null || echo /nonexistent/x)")")"
    [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ] && echo "$dir" && return
  done
  for dir in /usr/local/cuda /usr/local/cuda-*; do
    [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ] && echo "$dir" && return
  done
}
cuda_root="$(find_cuda_root)"
echo "cuda toolkit: ${cuda_root:-not found}" >>"$out/machine.txt"

built=no
if [ "${GRADFUSE_GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  record build "build gradfuse" skipped 0 "GRADFUSE_GPU_CHECK_SKIP_BUILD=1: using the installed gradfuse"
  built=yes
elif [ -z "$cuda_root" ]; then
  record build "build gradfuse" failed 0 "no CUDA toolkit (bin/nvcc + include/cuda_runtime.h) found"
elif [ -z "$capability" ]; then
  record build "build gradfuse" failed 0 "could not read the GPU's compute capability (machine.txt)"
else
  export CUDA_TOOLKIT_ROOT_DIR="$cuda_root" CUDACXX="${CUDACXX:-$cuda_root/bin/nvcc}"
  export GRADFUSE_CUDA=ON TORCH_CUDA_ARCH_LIST="$capability"
  # --no-index: this machine has no network, and nothing may be fetched. Its own build
  # directory, so a CPU build of the same checkout is left alone.
  pip_args=(-m pip install --no-build-isolation --no-deps --no-index --force-reinstall
    --disable-pip-version-check --config-settings=build-dir=build/gpu-check-{wheel_tag} .)
  if run_step build 200 "$PYTHON" "${pip_args[@]}"; then
    # A distribution's own Python may refuse pip (PEP 668); on a lent, disposable machine
    # installing anyway is what we want.
    if [ "$STEP_RC" != 0 ] && grep -q externally-managed-environment "$out/build.log"; then
      mv "$out/build.log" "$out/build-pep668.log"
      run_step build 200 env PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" "${pip_args[@]}"
    fi
    if [ "$STEP_RC" = 0 ]; then
      built=yes
      record build "build gradfuse" passed "$STEP_S" \
        "pip install, GRADFUSE_CUDA=ON, TORCH_CUDA_ARCH_LIST=$capability, CUDA at $cuda_root"
    elif timed_out; then
      record build "build gradfuse" failed "$STEP_S" "timed out after $STEP_LIMIT s"
    else
      record build "build gradfuse" failed "$STEP_S" "exit $STEP_RC: $(grep -m1 -iE 'error' "$out/build.log")"
    fi
  else
    no_time build "build gradfuse"
  fi
fi

# The installed gradfuse must have CUDA and CUDA kernels for every op, or nothing below means
# anything. Run from outside the repository, so the source tree's python/ cannot shadow it.
if [ "$built" = yes ]; then
  if (cd "$out" && timeout 60 "$PYTHON" -c '
import gradfuse, torch
info = gradfuse.build_info()
print("gradfuse:", gradfuse.__file__)
print("build_info:", info)
assert info["cuda"], "gradfuse was built without CUDA"
for op in ("lars_update_", "pack_", "unpack_", "topk_compress"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradfuse::{op}", "CUDA"), op
') >"$out/build_info.log" 2>&1; then
    cat "$out/build_info.log" >>"$out/machine.txt"
  else
    built=no
    record build_check "gradfuse imports with CUDA kernels" failed 0 \
      "$(tail -1 "$out/build_info.log")"
  fi
fi

if [ "$built" != yes ]; then
  for s in "1 op tests" "2 engine" "3 sanitizers" "4 checks" "5 bench"; do
    record "${s%% *}" "${s#* }" skipped 0 "no CUDA build of gradfuse to test"
  done
  write_report
  exit 1
fi

# ---- 1. CUDA op tests -------------------------------------------------------------------------
pytest_q=(-m pytest -q -p no:cacheprovider -o addopts=)
if run_step ops 90 "$PYTHON" "${pytest_q[@]}" tests/test_ops_cuda.py; then
  record_pytest ops "1. op tests (tests/test_ops_cuda.py)"
else no_time ops "1. op tests"; fi

# ---- 2. engine, collectives and training on CUDA tensors --------------------------------------
# The engine option cuda_backend (GRADFUSE_CUDA_BACKEND) lets the engine's CUDA data group be
# Gloo, so 2 ranks can share the one GPU (NCCL refuses two ranks on one device). A gradfuse
# without it runs the NCCL case only. The training tests (DistributedOptimizer, compression,
# GradScaler, broadcast helpers) train on the GPU too and need scikit-learn (the digits data).
engine_tests=(tests/test_engine.py tests/test_collectives.py tests/test_training.py
  -k "engine_check or collectives_check or training_check")
has_backend_option=no
py_in_root -c 'import sys; from gradfuse import config
sys.exit(0 if any(o[0] == "GRADFUSE_CUDA_BACKEND" for o in config._OPTIONS.values()) else 1)' \
  >/dev/null 2>&1 && has_backend_option=yes
backend_nccl=()
[ "$has_backend_option" = yes ] && backend_nccl=(GRADFUSE_CUDA_BACKEND=nccl)
if run_step engine_nccl_1rank 105 env GRADFUSE_TEST_DEVICE=cuda ${backend_nccl[@]+"${backend_nccl[@]}"} \
  GRADFUSE_TEST_RANKS=1 "$PYTHON" "${pytest_q[@]}" "${engine_tests[@]}"; then
  record_pytest engine_nccl_1rank "2a. engine + collectives + training, CUDA tensors, 1 rank, NCCL" \
    "checks that need 2 ranks skip at 1"
else no_time engine_nccl_1rank "2a. engine + training, 1 rank, NCCL"; fi
if [ "$has_backend_option" != yes ]; then
  record engine_gloo_2ranks \
    "2b. engine + collectives + training, CUDA tensors, 2 ranks on 1 GPU, Gloo" \
    skipped 0 "this gradfuse has no cuda_backend option (GRADFUSE_CUDA_BACKEND)"
elif run_step engine_gloo_2ranks 120 env GRADFUSE_TEST_DEVICE=cuda GRADFUSE_CUDA_BACKEND=gloo \
  GRADFUSE_TEST_RANKS=2 "$PYTHON" "${pytest_q[@]}" "${engine_tests[@]}"; then
  record_pytest engine_gloo_2ranks \
    "2b. engine + collectives + training, CUDA tensors, 2 ranks on 1 GPU, Gloo"
else no_time engine_gloo_2ranks "2b. engine + training, 2 ranks, Gloo"; fi

# ---- 3. compute-sanitizer ---------------------------------------------------------------------
# Every kernel on small inputs (no 25M-element cases: the tools slow kernels 10-100x).
sanitizer_k="lars_awkward_sizes or lars_grad_scale or lars_zero_norms or pack_many_small"
sanitizer_k+=" or fp16_overflow or unpack_mixed_dtypes"
sanitizer_k+=" or one_pass_grad_scale or unpack_sq_norms_empty" # chunk partials, last block
sanitizer_k+=" or (topk_exact and 4097) or (topk_sampled and 4097) or topk_nan or topk_ties"
sanitizer=""
for c in "$(command -v compute-sanitizer 2>/dev/null)" "$cuda_root/bin/compute-sanitizer" \
  "$cuda_root/compute-sanitizer/compute-sanitizer"; do
  [ -n "$c" ] && [ -x "$c" ] && sanitizer="$c" && break
done
for tool in memcheck racecheck; do
  id="sanitizer_$tool"
  title="3. compute-sanitizer --tool $tool"
  if [ -z "$sanitizer" ]; then
    record "$id" "$title" skipped 0 "compute-sanitizer not found (PATH, $cuda_root)"
    continue
  fi
  extra=()
  # Without torch's caching allocator every tensor is its own allocation, so memcheck catches an
  # out-of-bounds access into a neighbouring tensor. racecheck: gradfuse's kernels only (all in
  # namespace gradfuse::cuda), so a report names ours, not torch's.
  [ "$tool" = racecheck ] && extra=(--kernel-name kns=gradfuse)
  if ! run_step "$id" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" \
    --error-exitcode 97 --print-limit 20 ${extra[@]+"${extra[@]}"} "$PYTHON" "${pytest_q[@]}" \
    tests/test_ops_cuda.py -k "$sanitizer_k"; then
    no_time "$id" "$title"
    continue
  fi
  summary="$(grep -m1 -E 'ERROR SUMMARY: [0-9]+' "$out/$id.log" | sed 's/^=* *//')"
  tests="$(pytest_summary "$out/$id.log")"
  if timed_out; then
    record "$id" "$title" failed "$STEP_S" "timed out after $STEP_LIMIT s; ${tests:-no pytest summary}"
  elif [ -z "$summary" ]; then
    # No summary: the tool never instrumented the process (no debugger support in this
    # container, no permission, unsupported driver). Not a kernel failure.
    why="$(grep -m2 -iE 'error|not supported|permission|denied|unable' "$out/$id.log" | tr '\n' ' ')"
    record "$id" "$title" skipped "$STEP_S" "the tool could not run here: ${why:-exit $STEP_RC, see the log}"
  elif [ "$STEP_RC" = 97 ] || ! echo "$summary" | grep -q 'ERROR SUMMARY: 0 errors'; then
    record "$id" "$title" failed "$STEP_S" "$summary; $tests"
  elif [ "$STEP_RC" != 0 ]; then
    record "$id" "$title" failed "$STEP_S" "tests failed under the tool (exit $STEP_RC): $tests"
  else
    record "$id" "$title" passed "$STEP_S" "$summary; $tests"
  fi
done

# ---- 4. scripts/gpu_check.py: sync-free hot path, CUDA graphs, > 2**31 elements ---------------
# One process per part: a CUDA error that poisons the context in one cannot hide the others.
for part in sync:40 graph:40 topk:60 bandwidth:45 huge:90; do
  name="${part%%:*}"
  id="check_$name"
  title="4. gpu_check.py $name"
  if ! run_step "$id" "${part#*:}" "$PYTHON" scripts/gpu_check.py --device cuda --only "$name" \
    --json "$out/$id.json"; then
    no_time "$id" "$title"
    continue
  fi
  line="$(grep -m1 "^gpu_check $name: " "$out/$id.log" | sed "s/^gpu_check $name: //")"
  if timed_out; then
    record "$id" "$title" failed "$STEP_S" "timed out after $STEP_LIMIT s"
  elif [ -z "$line" ]; then
    record "$id" "$title" failed "$STEP_S" "exit $STEP_RC, no verdict: $(tail -1 "$out/$id.log")"
  else
    status="${line%% *}"
    record "$id" "$title" "$status" "$STEP_S" "${line#* }"
  fi
done

# ---- 5. benchmark -----------------------------------------------------------------------------
if run_step bench 60 "$PYTHON" -m gradfuse.bench ops --device cuda --json "$out/bench_ops.json"; then
  if [ "$STEP_RC" = 0 ] && [ -s "$out/bench_ops.json" ]; then
    record bench "5. gradfuse-bench ops --device cuda" passed "$STEP_S" \
      "$(grep -m1 -o 'copy bandwidth.*' "$out/bench.log")"
  elif timed_out; then
    record bench "5. gradfuse-bench ops --device cuda" failed "$STEP_S" "timed out after $STEP_LIMIT s"
  else
    record bench "5. gradfuse-bench ops --device cuda" failed "$STEP_S" "exit $STEP_RC: $(tail -1 "$out/bench.log")"
  fi
else no_time bench "5. gradfuse-bench ops"; fi

log "done in $((SECONDS - start)) s"
write_report
! grep -q $'\tfailed\t' "$steps"
