"""Ratio table of our rows against the peers' rows from benchmark JSON lines (run_all.sh's file).

    python benchmarks/compare.py benchmarks/results/run-*.jsonl

Rows are matched on (bench, config, dtype); every one of our rows (e.g. our default bfloat16 multiplies
and --matmul float32) against every peer row (PyTorch's float32 default and --matmul bfloat16), the
matmul precisions side by side. speed-up = peer time / our time (> 1: ours faster); also our MFU beside
each. Rows with an "error" are listed as failed.
"""
from __future__ import annotations

import json
import sys

import common


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip().startswith("{")]
    return rows


def ratios(rows):
    """One row per (bench, config, dtype, peer): our time, the peer's, and the speed-up."""
    key = {"train_step": "ms_per_step", "decode": "s_per_batch"}
    ours: dict = {}
    for r in rows:
        if r.get("impl") == "muse_jax" and "error" not in r:
            ours.setdefault((r["bench"], r["config"], r["dtype"]), []).append(r)
    out = []
    for r in rows:
        if r.get("impl") == "muse_jax" or r.get("bench") not in key:
            continue
        unit = key[r["bench"]]
        for o in ours.get((r["bench"], r["config"], r["dtype"]), [None]):
            row = {"bench": r["bench"], "config": r["config"], "dtype": r["dtype"], "peer": r["impl"],
                   "ours_matmul": o.get("matmul", "float32") if o else None,
                   "peer_matmul": r.get("matmul", "float32"),
                   "unit": "ms/step" if unit == "ms_per_step" else "s/batch",
                   "ours": o[unit] if o else None, "ours_mfu": o.get("mfu") if o else None,
                   "theirs": r.get(unit), "theirs_mfu": r.get("mfu"), "error": r.get("error")}
            if o and r.get(unit):
                row["speedup"] = r[unit] / o[unit]
            out.append(row)
    return out


COLUMNS = [("bench", "bench", ""), ("config", "config", ""), ("dtype", "dtype", ""), ("peer", "peer", ""),
           ("ours_matmul", "our matmul", ""), ("peer_matmul", "peer matmul", ""),
           ("unit", "unit", ""), ("ours", "ours", ".3f"), ("theirs", "peer", ".3f"),
           ("speedup", "speed-up (peer/ours)", ".2f"), ("ours_mfu", "our MFU", ".3f"),
           ("theirs_mfu", "peer MFU", ".3f"), ("error", "error", "")]


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        sys.exit("usage: compare.py RESULTS.jsonl [...]")
    table = ratios(load(paths))
    if not table:
        sys.exit("no peer rows to compare in " + ", ".join(paths))
    print(common.format_table(table, COLUMNS))


if __name__ == "__main__":
    main()
