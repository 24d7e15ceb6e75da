#!/usr/bin/env bash
# The GPU runs behind benchmarks/RESULTS.md, one after another, from the repository root.
#
#   benchmarks/gpu_suite.sh OUT_DIR GROUP...     GROUP: smoke attention train dic generate extra large_k
#
# Every report is appended as one JSON line to OUT_DIR/reports.jsonl, every
# log to OUT_DIR/suite.log. A run that fails, runs out of memory or passes
# its time limit (RUN_LIMIT seconds, default 420) is logged with its exit code
# and the suite goes on. `smoke` (tiny models, seconds) stops the suite if the
# package does not run at all, before the big models are built.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR GROUP...}
shift
mkdir -p "$out"
py=${PYTHON:-python3}

run() {  # run NAME SCRIPT ARGS...
  local name=$1 script=$2 start rc
  shift 2
  echo "=== $name: $script $*" | tee -a "$out/suite.log"
  start=$(date +%s)
  PYTHONUNBUFFERED=1 timeout "${RUN_LIMIT:-420}" "$py" "benchmarks/$script" "$@" --json_out "$out/reports.jsonl" \
    >>"$out/suite.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - start)) s" | tee -a "$out/suite.log"
  return $rc
}

for group in "$@"; do
  case $group in
    smoke)
      run smoke-train train_benchmark.py --steps 2 --no_torch || { echo "the package does not run here"; exit 1; } ;;
    attention)
      run attention attention_check.py --full --dtype bfloat16 --batch 8 ;;
    train)
      run train-ti train_benchmark.py --full --dtype bfloat16 --classes 37 --steps 10
      run train-mcti train_benchmark.py --full --dtype bfloat16 --classes 37 --steps 10 --mcti ;;
    dic)
      run dic-64 dic_benchmark.py --full --dtype bfloat16 --preset pets --classes 37 --batch_size 64 --images 4 ;;
    generate)
      run generate-bf16 generate_benchmark.py --full --dtype bfloat16 --prompts 2 --n 8 --repeats 2 ;;
    extra)  # what the memory allows: XLA attention, float32, larger K, a larger DiC batch
      MCTI_ATTENTION=xla run train-ti-xla train_benchmark.py --full --dtype bfloat16 --classes 37 --steps 10 \
        --no_torch
      run train-ti-fp32-remat train_benchmark.py --full --dtype float32 --classes 37 --steps 5 --remat
      run dic-128 dic_benchmark.py --full --dtype bfloat16 --preset pets --classes 37 --batch_size 128 --images 4 \
        --no_torch
      run train-ti-k74 train_benchmark.py --full --dtype bfloat16 --classes 74 --steps 5 --no_torch
      run train-ti-fp32-k8-remat train_benchmark.py --full --dtype float32 --classes 8 --steps 5 --remat \
        --no_torch ;;
    large_k)  # K = 1000 on one device in passes that fit (class_chunk=auto), against K = 37 in one pass
      run train-ti-k37 train_benchmark.py --full --dtype bfloat16 --classes 37 --steps 5 --no_torch
      RUN_LIMIT=900 run train-ti-k1000-auto train_benchmark.py --full --dtype bfloat16 --classes 1000 --steps 2 \
        --class_chunk auto --no_torch ;;
    *) echo "unknown group $group" >&2; exit 2 ;;
  esac
done
