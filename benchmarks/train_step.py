"""Times muse_jax's jitted training step of the base transformer (random weights and inputs).

    python benchmarks/train_step.py --config medium               # the medium model, float32
    python benchmarks/train_step.py --config medium --dtype bfloat16
    python benchmarks/train_step.py --config small --json         # one JSON object
    python benchmarks/train_step.py --config muse_632m            # GPU: paper-size base model, bf16
    python benchmarks/train_step.py --config small --patch 2      # the blocks on 2x2 patches of tokens
    python benchmarks/train_step.py --tokens 256 --codebook 1024 --width 512 --depth 8 --heads 8 \\
        --mlp-ratio 4 --text-len 32 --text-width 512 --batch 8 --dtype float32 --steps 20 --warmup 3
    # smoke: --depth 1 --width 64 --heads 2 --tokens 16 --codebook 64 --text-len 4 --text-width 32 \\
    #        --batch 2 --steps 3 --warmup 1

What is timed is the project's own step, `muse_jax.training.step.make_train_step` (arccos mask
schedule, caption dropout 0.1, forward, label-smoothed masked cross-entropy, backward,
clip + AdamW update, donated state) on `muse_jax.models.transformer.MuseBase`, configured
from the flags over the shapes config's `train` section. Text embeddings are random inputs
[B, text_len, text_width] (the frozen-encoder path: no T5 runs inside the step), and
so are the image tokens. Reported: median ms/step of `--steps` (>= 20) timed steps after
compilation and `--warmup` steps, image tokens/s, parameters, model FLOPs per step (analytic:
3 x forward matmuls; and XLA's cost analysis of the compiled step, which on CPU also counts
elementwise work and the optimizer, and on GPU leaves out the cuBLAS matmul calls, so there it
reads far low), and MFU = analytic FLOPs / time / the measured matmul FLOP/s of JAX in the same
dtype on the same device in the same run (2048^3 on CPU; 8192^3 on a GPU, which a 2048^3
product cannot fill: an H100 gave 134 TFLOP/s bf16 at 2048^3, ~800 at 8192^3).
"""
from __future__ import annotations

import argparse
import sys
import time

import common
import jax
import ml_collections
import numpy as np
from flax import linen as nn

from muse_jax import config as config_lib
from muse_jax import partitioning, planning, precision
from muse_jax.models import transformer
from muse_jax.training import optimizer
from muse_jax.training import step as step_lib


def muse_config(shape: common.ModelShape, remat: bool = False, matmul_precision: str = "default", patch: int = 1
                ) -> ml_collections.ConfigDict:
    """The shapes config with `base` sized by the flags, frozen (precomputed) text, AdamW."""
    config = config_lib.load_config("shapes")
    with config.unlocked():
        config.base = ml_collections.ConfigDict(dict(
            codebook_size=shape.codebook, grid_size=shape.grid, num_layers=shape.depth, width=shape.width,
            mlp_dim=shape.mlp_dim, num_heads=shape.heads, text_dim=shape.text_width, dropout_rate=0.0,
            attention_dropout_rate=0.0, layer_norm_epsilon=1e-6, dtype=shape.dtype, remat=remat,
            lowres_grid_size=0, num_lowres_layers=0, patch_size=patch))
        config.text.trainable = False
        config.text.max_length = shape.text_len
        config.train.optimizer = "adamw"
        config.train.batch_size = shape.batch
        config.train.ema_decay = 0.0
        config.train.matmul_precision = matmul_precision
    return config


def random_batch(shape: common.ModelShape, seed: int) -> dict[str, np.ndarray]:
    """Random image tokens [B, N], text embeddings [B, L, D] and an all-true text mask [B, L]."""
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, shape.codebook, (shape.batch, shape.tokens), dtype=np.int32),
        "text_emb": rng.standard_normal((shape.batch, shape.text_len, shape.text_width), dtype=np.float32),
        "text_mask": np.ones((shape.batch, shape.text_len), bool),
    }


def empty_text(shape: common.ModelShape, seed: int) -> dict[str, np.ndarray]:
    """A stand-in for the empty prompt's embedding [L, D] and mask [L] (caption dropout)."""
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros((shape.text_len,), bool)
    mask[0] = True
    return {"text_emb": rng.standard_normal((shape.text_len, shape.text_width), dtype=np.float32),
            "text_mask": mask}


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled executable from XLA's cost analysis (None when unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def device_info() -> dict[str, str]:
    d = jax.devices()[0]
    return {"device": d.device_kind, "platform": d.platform, "num_devices": jax.device_count(),
            "framework": f"jax {jax.__version__}"}


def build_step(shape: common.ModelShape, seed: int = 0, remat: bool = False, matmul_precision: str = "default",
               patch: int = 1):
    """(jitted step, state, batch, rng): the project's training step for `shape`, not yet compiled.

    Call the jitted step inside `partitioning.axis_rules(step.mesh, step.rules)`.
    """
    config = muse_config(shape, remat, matmul_precision, patch)
    model = transformer.build(config.base)
    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.logical_rules(config)
    tx = optimizer.make_optimizer(config.train)
    inputs = transformer.dummy_inputs(model, 1, shape.text_len)

    def create(rng):
        return step_lib.create_state(model, tx, rng, inputs)

    abstract = jax.eval_shape(create, jax.random.key(seed))
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    host_batch = random_batch(shape, seed)
    batch_keys = {k: v.ndim for k, v in host_batch.items()}
    train_step = step_lib.make_train_step(config, model, mesh, shardings, empty_text=empty_text(shape, seed),
                                          rules=rules, batch_keys=batch_keys)
    with partitioning.axis_rules(mesh, rules):
        state = jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings)(jax.random.key(seed))
        batch = partitioning.shard_batch(host_batch, mesh, rules)
    return train_step, state, batch, jax.random.key(seed + 1)


def run(shape: common.ModelShape, args: argparse.Namespace) -> dict:
    """Builds the state and the step, compiles, times; returns the result row."""
    mp = common.jax_matmul_precision(args.matmul)
    train_step, state, batch, rng = build_step(shape, args.seed, args.remat, mp, args.patch)
    with partitioning.axis_rules(train_step.mesh, train_step.rules):
        t0 = time.perf_counter()
        compiled = train_step.jitted.lower(state, batch, rng, None).compile()
        compile_s = time.perf_counter() - t0
    params = transformer.count_params(state.params)

    holder = {"state": state, "metrics": None}

    def one_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, rng, None)
        return holder["state"], holder["metrics"]

    times = common.time_calls(one_step, jax.block_until_ready, args.steps, args.warmup)
    loss = float(holder["metrics"]["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"training step produced a non-finite loss {loss}")
    step_s = common.median(times)
    flops = common.train_step_flops(shape)
    if args.patch > 1:  # the blocks run on (tokens / patch^2) positions: the planner's analytic count
        base = transformer.TransformerConfig.coerce(muse_config(shape, patch=args.patch).base)
        flops = 3.0 * planning.analytic_forward_flops(base, shape.batch, shape.text_len)
    counted = xla_flops(compiled)
    peak_n = common.peak_size(args.peak_size, jax.devices()[0].platform)
    peak = None if args.no_peak else common.jax_matmul_peak(shape.dtype, peak_n, matmul_precision=mp)
    return {
        "bench": "train_step", "impl": "muse_jax", **shape.describe(), **device_info(), "remat": args.remat,
        "patch": args.patch,
        "matmul": precision.multiplies(mp), "matmul_precision": mp,
        "ms_per_step": 1e3 * step_s, "image_tokens_per_s": shape.batch * shape.tokens / step_s,
        "timing": common.spread(times), "steps": args.steps, "warmup": args.warmup,
        "params": params, "model_gflops": flops / 1e9, "measured_gflops": None if counted is None else counted / 1e9,
        "measured_flops_source": "XLA cost analysis of the compiled step",
        "achieved_gflops_per_s": flops / step_s / 1e9,
        "peak_gflops_per_s": None if peak is None else peak / 1e9,
        "peak_matmul": f"{peak_n}^3 jnp.dot {shape.dtype}, matmul_precision {mp}",
        "mfu": None if peak is None else flops / step_s / peak,
        "compile_s": compile_s, "loss": loss, "text": "random embeddings (no T5 in the step)",
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap)
    ap.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    ap.add_argument("--patch", type=int, default=1,
                    help="tokens per side of one position of the blocks (config.base.patch_size; 1: one per token)")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    ap.add_argument("--peak-size", type=int, default=0,
                    help="n of the n^3 matmul peak (0: 2048 on CPU, 8192 on a GPU, which 2048 cannot fill)")
    args = ap.parse_args(argv)
    try:
        shape = common.shape_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    warning = common.check_repetitions(args)
    row = run(shape, args)
    if warning:
        row["warning"] = warning
    common.emit([row], args.json, common.TRAIN_COLUMNS)
    if not args.json:
        print(f"device: {row['device']} ({row['framework']}); text: {row['text']}; "
              f"XLA-counted GFLOP/step: {row['measured_gflops']}", file=sys.stdout)


if __name__ == "__main__":
    main()
