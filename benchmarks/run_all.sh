#!/usr/bin/env bash
# Ours and the PyTorch peers, both configurations (medium, small), one run, one table of ratios.
#
#   bash benchmarks/run_all.sh                       # float32 compute (the default training dtype)
#   DTYPES="float32 bfloat16" bash benchmarks/run_all.sh
#   OURS_MATMULS=default PEER_MATMULS=float32 bash benchmarks/run_all.sh   # the target comparison only
#   COMPILE=1 bash benchmarks/run_all.sh             # + torch.compile rows for the faster peer
#   bash benchmarks/run_all.sh --depth 1 --width 64 --heads 2 --tokens 16 --codebook 64 \
#       --text-len 4 --text-width 32 --batch 2 --steps 3 --warmup 1     # smoke (flags go to every script)
#
# Matmul multiplies (float32 compute either way; accumulation stays float32): ours at the project's
# default (config.train.matmul_precision "default": bfloat16 multiplies on an AMX-BF16 CPU) and at
# float32 ("highest"); the peers at PyTorch's default float32 and at PyTorch's bfloat16 fp32-matmul
# precision (the like-for-like row for our default).
# Every result is appended as a JSON line to $RESULTS (default benchmarks/results/run-<time>.jsonl);
# the ratio table (benchmarks/compare.py) is printed at the end. Our scripts run with $PYTHON
# (default: python, the project's environment); the peers with benchmarks/peers.sh (own venv).
# Run on an otherwise idle machine: the numbers are only comparable within one run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
CONFIGS="${CONFIGS:-medium small}"
DTYPES="${DTYPES:-float32}"
OURS_MATMULS="${OURS_MATMULS:-default float32}"
PEER_MATMULS="${PEER_MATMULS:-float32 bfloat16}"
mkdir -p benchmarks/results
RESULTS="${RESULTS:-benchmarks/results/run-$(date -u +%Y%m%d-%H%M%S).jsonl}"
extra=("$@")
smoke=()
for a in "${extra[@]}"; do [[ "$a" == "--steps" ]] && smoke=(--decode-repeats 1) && break; done
peer_flags=()
[[ -n "${COMPILE:-}" ]] && peer_flags+=(--compile)

for config in $CONFIGS; do
  for dtype in $DTYPES; do
    for m in $OURS_MATMULS; do
      mm=(); [[ "$m" != default ]] && mm=(--matmul "$m")
      echo "== $config $dtype matmul $m: ours (train step, decode)" >&2
      "$PYTHON" benchmarks/train_step.py --config "$config" --dtype "$dtype" "${mm[@]}" --json "${extra[@]}" >>"$RESULTS"
      # sample.py takes --steps as its decode repeats: smoke flags keep it short too.
      "$PYTHON" benchmarks/sample.py --config "$config" --dtype "$dtype" "${mm[@]}" --json "${extra[@]}" >>"$RESULTS"
    done
    for m in $PEER_MATMULS; do
      echo "== $config $dtype matmul $m: peers" >&2
      bash benchmarks/peers.sh --config "$config" --dtype "$dtype" --matmul "$m" --json "${peer_flags[@]}" \
        "${smoke[@]}" "${extra[@]}" >>"$RESULTS"
    done
  done
done
echo "results: $RESULTS" >&2
"$PYTHON" benchmarks/compare.py "$RESULTS"
