#!/usr/bin/env bash
# The prepared GPU check: doctor, tour and every benchmark on CUDA, in one go, in under ~8 minutes.
# Usage (from the repository root, on a machine with at least one NVIDIA GPU):
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_results/
# Each step's output goes to OUT_DIR/<step>.txt, and a summary to OUT_DIR/summary.txt; copy the figures,
# with the device name, into benchmarks/README.md. Uses `python3` (or $PYTHON) with labkit from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_results}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name: $*" | tee -a "$summary"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "   rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$summary"
  tail -n 25 "$OUT/$name.txt" >> "$summary"
}
step device        20 nvidia-smi
step doctor        90 "$PY" -m labkit doctor
step tour         120 "$PY" -m labkit tour
step bench_launch  60 "$PY" -m labkit bench launch --quick
step bench_collectives 90 "$PY" -m labkit bench collectives --quick
step bench_ddp     60 "$PY" -m labkit bench ddp --quick
step bench_pipeline 90 "$PY" -m labkit bench pipeline --quick
step bench_kmeans 300 "$PY" -m labkit bench kmeans --gpu
step bench_ablation 120 "$PY" -m labkit bench ablation --quick
# lab 09: ResNet-50 at batch 256 (fp32 with TF32 off and on, bf16, fp16 + GradScaler, channels_last, compile,
# cudnn.benchmark, pinned memory), and the memory calculator against torch.cuda.max_memory_allocated
step bench_hardware 420 "$PY" -m labkit bench hardware --device cuda --trials 7
# lab 10: ZeRO-1/2/3, torch's ZeRO and FSDP2; NCCL when there is one GPU per rank, else gloo (it says which)
step bench_zero 180 "$PY" -m labkit bench zero --quick
# lab 11: the transformer on dp × pp × tp grids against one process; NCCL for tp and dp when every rank has its own
# GPU (the pipeline's messages go through gloo), else gloo on CPU (it says which)
step bench_capstone 180 "$PY" -m labkit bench capstone --grid 2x1x1 --grid 1x2x1 --grid 1x1x2 --grid 2x2x2 --rounds 2
echo "results in $OUT/ (summary: $summary)"
