"""Times `muse_jax.models.layers.dot_product_attention`'s implementations against each other.

    python benchmarks/attention.py                                  # 256, 1024, 4096 tokens, 16 x 64, batch 1
    python benchmarks/attention.py --lengths 1024,4096 --impls xla,blockwise,fused --dtype bfloat16 --json

Self-attention of one [batch, heads, length, head_dim] q, k, v (random, float32 unless --dtype).
Per implementation and length: median ms of `--steps` calls (after compilation and `--warmup`)
of the jitted forward, and of forward + backward (gradients w.r.t. q, k, v of the output's sum);
XLA's compiled temporary bytes of each program (`memory_analysis().temp_size_in_bytes`); and the
ratios to the xla row of the same length. XLA:CPU fuses the xla path's forward into one library
kernel whose scratch it does not report (temporaries 0); its training program shows the saved
[heads, length, length] logits. Compare rows of one run only.
"""
from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models import layers

COLUMNS = [
    ("impl", "impl", ""), ("length", "tokens", "d"), ("dtype", "dtype", ""), ("fwd_ms", "fwd ms", ".1f"),
    ("fwd_bwd_ms", "fwd+bwd ms", ".1f"), ("fwd_ratio", "fwd / xla", ".2f"), ("fwd_bwd_ratio", "fwd+bwd / xla", ".2f"),
    ("fwd_temp_mib", "fwd temp MiB", ".1f"), ("fwd_bwd_temp_mib", "fwd+bwd temp MiB", ".1f"),
    ("compile_s", "compile s", ".1f"),
]


def bench(impl: str, length: int, args) -> dict:
    rng = np.random.default_rng(0)
    dt = layers.dtype(args.dtype)
    q, k, v = (jnp.asarray(rng.normal(size=(args.batch, args.heads, length, args.head_dim)), dt) for _ in range(3))

    def attend(q, k, v):
        return layers.dot_product_attention(q, k, v, implementation=impl, block_size=args.block_size)

    programs = {
        "fwd": attend,
        "fwd_bwd": jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)),
    }
    row = {"bench": "attention", "impl": impl, "length": length, "dtype": args.dtype, "heads": args.heads,
           "head_dim": args.head_dim, "batch": args.batch, "block_size": args.block_size, "compile_s": 0.0}
    for name, fn in programs.items():
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(q, k, v).compile()
        row["compile_s"] += time.perf_counter() - t0
        mem = compiled.memory_analysis()
        row[f"{name}_temp_mib"] = mem.temp_size_in_bytes / 2**20 if mem is not None else None
        times = common.time_calls(lambda: compiled(q, k, v), jax.block_until_ready, args.steps, args.warmup)
        row[f"{name}_ms"] = 1e3 * common.median(times)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024,4096", help="comma-separated token counts")
    parser.add_argument("--impls", default="xla,blockwise", help="comma-separated: xla, blockwise, fused, auto")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES)
    parser.add_argument("--steps", type=int, default=5, help="timed calls per program (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        base = None
        for impl in args.impls.split(","):
            row = bench(impl, length, args)
            base = base or row
            row["fwd_ratio"] = row["fwd_ms"] / base["fwd_ms"]
            row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            rows.append(row)
    common.emit(rows, args.json, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
