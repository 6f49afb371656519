#!/usr/bin/env bash
# Ours and the PyTorch peers, both configurations (medium, small), one run, one table of ratios.
#
#   bash benchmarks/run_all.sh                       # float32 (the default training precision)
#   DTYPES="float32 bfloat16" bash benchmarks/run_all.sh
#   COMPILE=1 bash benchmarks/run_all.sh             # + torch.compile rows for the faster peer
#   bash benchmarks/run_all.sh --depth 1 --width 64 --heads 2 --tokens 16 --codebook 64 \
#       --text-len 4 --text-width 32 --batch 2 --steps 3 --warmup 1     # smoke (flags go to every script)
#
# Every result is appended as a JSON line to $RESULTS (default benchmarks/results/run-<time>.jsonl);
# the ratio table (benchmarks/compare.py) is printed at the end. Our scripts run with $PYTHON
# (default: python, the project's environment); the peers with benchmarks/peers.sh (own venv).
# Run on an otherwise idle machine: the numbers are only comparable within one run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
CONFIGS="${CONFIGS:-medium small}"
DTYPES="${DTYPES:-float32}"
mkdir -p benchmarks/results
RESULTS="${RESULTS:-benchmarks/results/run-$(date -u +%Y%m%d-%H%M%S).jsonl}"
extra=("$@")
smoke=()
for a in "${extra[@]}"; do [[ "$a" == "--steps" ]] && smoke=(--decode-repeats 1) && break; done
peer_flags=()
[[ -n "${COMPILE:-}" ]] && peer_flags+=(--compile)

for config in $CONFIGS; do
  for dtype in $DTYPES; do
    echo "== $config $dtype: ours (train step, decode)" >&2
    "$PYTHON" benchmarks/train_step.py --config "$config" --dtype "$dtype" --json "${extra[@]}" >>"$RESULTS"
    # sample.py takes --steps as its decode repeats: smoke flags keep it short too.
    "$PYTHON" benchmarks/sample.py --config "$config" --dtype "$dtype" --json "${extra[@]}" >>"$RESULTS"
    echo "== $config $dtype: peers" >&2
    bash benchmarks/peers.sh --config "$config" --dtype "$dtype" --json "${peer_flags[@]}" "${smoke[@]}" \
      "${extra[@]}" >>"$RESULTS"
  done
done
echo "results: $RESULTS" >&2
"$PYTHON" benchmarks/compare.py "$RESULTS"
