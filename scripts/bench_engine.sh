#!/usr/bin/env bash
# Every figure of issue 15 (engine speed) in one run, against the installed gradfuse:
#   - gradfuse-bench train at 2 and 4 ranks for mlp, resnet18-like and resnet50, with and without
#     gradient_as_bucket_view (medians of 3 alternating rounds, the gradfuse/DDP ratio), each
#     with the engine timeline of one training step and whether negotiation overlaps the
#     previous collective;
#   - gradfuse-bench resnet50-allreduce at 4 ranks: ResNet-50's gradients as separate tensors
#     and as views against the one-flat-buffer floor, and the 1 KiB latency against direct Gloo;
#   - gradfuse-bench allreduce at 2 ranks, 1 KiB: the latency again (inline path counted) and
#     the CPU an idle engine costs.
#
#   bash scripts/bench_engine.sh [OUTDIR]      (default OUTDIR: bench_engine_out)
#
# About 5 minutes on the idle 2-core development VM. OUTDIR gets every table (bench_engine.txt),
# each command's JSON and the timelines (chrome://tracing). PYTHON picks the interpreter whose
# gradfuse runs (default: python3). BENCH_SMOKE=1 runs the same commands at the smallest sizes
# (2 ranks, mlp, one step), which CI does to keep this script working.
set -euo pipefail
out="${1:-bench_engine_out}"
mkdir -p "$out"
bench() { "${PYTHON:-python3}" -m gradfuse.bench "$@"; }

if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  models=(mlp) np=2 train_size=(--steps 1 --rounds 1 --batch-size 2)
  allreduce_size=(--np 2 --iters 1 --latency-iters 2 --scale 0.001) idle=(--idle-seconds 0.5)
else
  models=(mlp resnet18-like resnet50) np=2,4 train_size=(--rounds 3)
  allreduce_size=(--np 4 --iters 10 --latency-iters 200) idle=(--idle-seconds 10)
fi

start=$SECONDS
{
  for model in "${models[@]}"; do
    steps=()
    [ "$model" = resnet50 ] && steps=(--steps 5)  # about 1 s per step at 4 ranks
    bench train --np "$np" --model "$model" --bucket-view both "${train_size[@]}" "${steps[@]}" \
      --timeline "$out/timeline-$model.json" --json "$out/train-$model.json"
    echo
  done
  bench resnet50-allreduce "${allreduce_size[@]}" --json "$out/resnet50-allreduce.json"
  echo
  # 1 KiB latency (engine vs direct Gloo, inline path) and an idle engine's CPU, 2 ranks.
  bench allreduce --np 2 --max-size 1024 "${idle[@]}" --json "$out/allreduce-1k.json"
  echo
  echo "bench_engine.sh: $((SECONDS - start)) s"
} 2>&1 | tee "$out/bench_engine.txt"
