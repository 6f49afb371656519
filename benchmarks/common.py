"""Shared parts of the benchmarks: model flags and presets, timing, FLOP counts, output.

Standard library only: `peers.py` imports it too, inside the peers' own venv (no JAX there).

Every benchmark takes the same model flags; `--config NAME` picks a preset and any flag
given beside it overrides that preset's value:
    --tokens 256 --codebook 1024 --width 512 --depth 8 --heads 8 --mlp-ratio 4
    --text-len 32 --text-width 512 --batch 8 --dtype float32|bfloat16
Results are rows (dicts) printed as a table, or with `--json` as one JSON object per line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# Presets. medium and small are the two configurations of every comparison;
# muse_632m is the paper-size base model (muse_jax/configs/paper.py: 16 x 1536, MLP 6144, 24 heads,
# 8192 codes, 16x16 tokens, T5-XXL text of 4096 wide, 128 text tokens) for a GPU, in bf16.
PRESETS: dict[str, dict[str, Any]] = {
    "medium": dict(tokens=256, codebook=1024, width=512, depth=8, heads=8, mlp_ratio=4, text_len=32,
                   text_width=512, batch=8),
    "small": dict(tokens=64, codebook=512, width=256, depth=4, heads=4, mlp_ratio=4, text_len=16,
                  text_width=256, batch=32),
    "muse_632m": dict(tokens=256, codebook=8192, width=1536, depth=16, heads=24, mlp_ratio=4, text_len=128,
                      text_width=4096, batch=32, dtype="bfloat16"),
}
DTYPES = ("float32", "bfloat16")
MATMULS = ("float32", "bfloat16")  # --matmul: what the multiplies of a float32 matmul are rounded to
MIN_TIMED_STEPS = 20  # the fewest timed steps a reported median may come from


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The benchmarked base transformer: sizes from the command line (framework-neutral)."""

    tokens: int
    codebook: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    text_len: int
    text_width: int
    batch: int
    dtype: str = "float32"
    config: str = "custom"  # the preset's name, or "custom" when no preset was given

    def __post_init__(self):
        for f in ("tokens", "codebook", "width", "depth", "heads", "text_len", "text_width", "batch"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"--{f.replace('_', '-')} must be positive, got {getattr(self, f)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"--mlp-ratio must be positive, got {self.mlp_ratio}")
        if math.isqrt(self.tokens) ** 2 != self.tokens:
            raise ValueError(f"--tokens {self.tokens} is not a square grid (h = w): use 16, 64, 256, ...")
        if self.width % self.heads:
            raise ValueError(f"--width {self.width} is not divisible by --heads {self.heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {DTYPES}")

    @property
    def grid(self) -> int:
        return math.isqrt(self.tokens)

    @property
    def mlp_dim(self) -> int:
        return int(round(self.mlp_ratio * self.width))

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_model_flags(parser: argparse.ArgumentParser, *, steps: int = MIN_TIMED_STEPS, warmup: int = 3) -> None:
    """The shared flags: --config preset, model sizes, --dtype, --steps, --warmup, --json, --seed."""
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="preset sizes (flags given beside it override them); default: medium")
    g = parser.add_argument_group("model (default: the medium preset)")
    g.add_argument("--tokens", type=int, help="image tokens per image (a square grid)")
    g.add_argument("--codebook", type=int, help="codebook size K (the mask token is id K)")
    g.add_argument("--width", type=int)
    g.add_argument("--depth", type=int, help="transformer blocks")
    g.add_argument("--heads", type=int)
    g.add_argument("--mlp-ratio", type=float)
    g.add_argument("--text-len", type=int, help="text tokens (random embeddings: no text encoder is timed)")
    g.add_argument("--text-width", type=int, help="width of the text embeddings (e.g. T5 d_model)")
    g.add_argument("--batch", type=int)
    g.add_argument("--dtype", choices=DTYPES, help="compute dtype (parameters stay float32); default float32")
    g.add_argument("--matmul", choices=MATMULS, default=None,
                   help="multiplies of float32 matmuls (accumulation stays float32). muse_jax: default = the "
                        "project's (config.train.matmul_precision 'default': bfloat16 on a CPU with AMX-BF16 or "
                        "AVX512-BF16, see muse_jax/precision.py), float32 = 'highest'. Peers: default float32 "
                        "(PyTorch's), bfloat16 = PyTorch's bf16 fp32-matmul precision (oneDNN on CPU)")
    parser.add_argument("--steps", type=int, default=steps, help=f"timed repetitions (report needs >= {steps})")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions after compilation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per result line")


def shape_from_args(args: argparse.Namespace) -> ModelShape:
    """The ModelShape of parsed flags: the preset (default medium), then explicit flags."""
    name = args.config or "medium"
    values = {"dtype": "float32", **PRESETS[name]}
    changed = []
    for f in dataclasses.fields(ModelShape):
        v = getattr(args, f.name, None)
        if f.name != "config" and v is not None:
            if v != values.get(f.name):
                changed.append(f.name)
            values[f.name] = v
    label = name if not changed else f"{name}+{','.join(changed)}" if len(changed) <= 2 else f"{name}*"
    return ModelShape(**values, config=label)


def check_repetitions(args: argparse.Namespace, minimum: int = MIN_TIMED_STEPS) -> str | None:
    """A warning (also put in the results) when fewer than `minimum` timed repetitions were asked for."""
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    if args.steps < minimum:
        msg = f"only {args.steps} timed repetitions (< {minimum}): a smoke run, not a measurement"
        print(f"warning: {msg}", file=sys.stderr)
        return msg
    return None


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `repeats` calls of fn (each synced with `sync(result)`), after `warmup` calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> dict[str, float]:
    """min / median / max of timings in seconds."""
    return {"min_s": float(min(xs)), "median_s": median(xs), "max_s": float(max(xs))}


def matmul_peak(matmul: Callable[[], Any], sync: Callable[[Any], Any], n: int, repeats: int = 10) -> float:
    """FLOP/s of an n^3 matrix product `matmul()` (already compiled/warm): median of `repeats`."""
    times = time_calls(matmul, sync, repeats, warmup=2)
    return 2.0 * n**3 / median(times)


def peak_size(requested: int, platform: str) -> int:
    """n of the n^3 peak matmul: as requested, else 2048 on CPU and 8192 on an accelerator."""
    if requested < 0:
        raise ValueError(f"--peak-size must be >= 0, got {requested}")
    return requested or (2048 if platform == "cpu" else 8192)


def jax_matmul_precision(matmul: str | None) -> str:
    """--matmul -> muse_jax's matmul_precision: None (the project's default) -> "default"."""
    return "highest" if matmul == "float32" else "default"


def jax_matmul_peak(dtype: str, n: int = 2048, repeats: int = 10, matmul_precision: str = "default") -> float:
    """Measured FLOP/s of a jitted n x n x n JAX matmul in `dtype` at `matmul_precision`, default device."""
    import jax
    import jax.numpy as jnp

    from muse_jax import precision

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = precision.jit(jnp.dot, matmul_precision)
    f(a, b).block_until_ready()
    return matmul_peak(lambda: f(a, b), lambda r: r.block_until_ready(), n, repeats)


def torch_matmul_peak(dtype: str, device: str, n: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of an n x n x n torch matmul in `dtype` on `device`."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)

    def sync(r):
        if r.is_cuda:
            torch.cuda.synchronize()

    return matmul_peak(lambda: a @ b, sync, n, repeats)


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(s: ModelShape, batch: int | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one forward of muse_jax's base transformer.

    Per image: each block has self-attention (Q, K, V, out projections 8NE^2, scores and
    weighted sum 4N^2E), cross-attention to the L text tokens (Q and out 4NE^2, K and V 4LE^2,
    scores and sum 4NLE) and the MLP (4NEF); plus the text projection (2LTE) and the
    MLP head (2NE^2 + 2NEK). Elementwise work (norms, softmax, GELU) is not counted.
    """
    b = s.batch if batch is None else batch
    n, e, f, l, t, k = s.tokens, s.width, s.mlp_dim, s.text_len, s.text_width, s.codebook
    block = (8 * n * e * e + 4 * n * n * e) + (4 * n * e * e + 4 * l * e * e + 4 * n * l * e) + 4 * n * e * f
    return float(b * (s.depth * block + 2 * l * t * e + 2 * n * e * e + 2 * n * e * k))


def train_step_flops(s: ModelShape) -> float:
    """Model FLOPs of one training step: forward + backward = 3 x forward (no rematerialisation)."""
    return 3.0 * forward_flops(s)


def decode_flops(s: ModelShape, steps: int, guided: bool = True) -> float:
    """Model FLOPs of a decode: `steps` forwards of the batch (2x batch with guidance)."""
    return steps * forward_flops(s, s.batch * (2 if guided else 1))


# ----------------------------------------------------------------------------- output


def emit(rows: Iterable[dict[str, Any]], as_json: bool, columns: Sequence[tuple[str, str, str]] | None = None,
         file=None) -> None:
    """Print rows as JSON lines, or as a table of (key, header, format) columns."""
    rows = list(rows)
    file = file or sys.stdout
    if as_json:
        for r in rows:
            print(json.dumps(r, sort_keys=True), file=file, flush=True)
        return
    print(format_table(rows, columns or [(k, k, "") for k in rows[0]]), file=file, flush=True)


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if spec and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: one line per row, columns (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[_fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


TRAIN_COLUMNS = [
    ("impl", "impl", ""), ("config", "config", ""), ("dtype", "dtype", ""), ("matmul", "matmul", ""),
    ("batch", "batch", "d"), ("ms_per_step", "ms/step", ".1f"), ("image_tokens_per_s", "img tok/s", ",.0f"), ("params", "params", ",d"),
    ("model_gflops", "GFLOP/step", ".2f"), ("measured_gflops", "GFLOP/step (counted)", ".2f"),
    ("achieved_gflops_per_s", "GFLOP/s", ".1f"), ("peak_gflops_per_s", "peak GFLOP/s", ".1f"),
    ("mfu", "MFU", ".3f"), ("compile_s", "compile s", ".1f"),
]
DECODE_COLUMNS = [
    ("impl", "impl", ""), ("config", "config", ""), ("dtype", "dtype", ""), ("matmul", "matmul", ""),
    ("batch", "batch", "d"), ("decode_steps", "steps", "d"), ("s_per_batch", "s/batch", ".3f"), ("images_per_s", "images/s", ".2f"),
    ("model_gflops", "GFLOP/batch", ".1f"), ("achieved_gflops_per_s", "GFLOP/s", ".1f"),
    ("mfu", "MFU", ".3f"), ("compile_s", "compile s", ".1f"),
]


def columns_for(rows: Sequence[dict[str, Any]]):
    """Table columns for a list of rows of one kind ("train_step" or "decode")."""
    return DECODE_COLUMNS if rows and rows[0].get("bench") == "decode" else TRAIN_COLUMNS
