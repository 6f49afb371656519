"""Times muse_jax's full jitted decode: 12 guided MaskGIT steps of the base transformer.

    python benchmarks/sample.py --config medium                   # batch 8, guidance 3, 12 steps
    python benchmarks/sample.py --config small --json
    python benchmarks/sample.py --config medium --dtype bfloat16
    python benchmarks/sample.py --config muse_632m                # GPU: paper-size base model, bf16
    python benchmarks/sample.py --config medium --loop-only       # the decode loop alone (no model)
    # smoke: --depth 1 --width 64 --heads 2 --tokens 16 --codebook 64 --text-len 4 --text-width 32 \\
    #        --batch 2 --steps 2 --warmup 1

What is timed is the program `muse-jax sample` runs for a stage (`muse_jax.cascade`'s
stage program: `sampling.decode` over `sampling.guided_logits_fn`, guidance as one batched
forward of 2B, all one XLA program) on `MuseBase` with random weights, from a fully masked
start to tokens (no VQGAN decode). Text embeddings are random inputs (no T5 is timed); the
unconditional branch gets another random "empty prompt" embedding. Compilation (lower +
XLA compile) is timed separately; then `--warmup` untimed and `--steps` timed decodes, each
with a new seed. Reported: median seconds per batch, images/s, model FLOPs per batch
(analytic, and XLA's cost analysis of one 2B forward x steps) and MFU against the measured
JAX matmul peak in the same dtype (2048^3 on CPU, 8192^3 on a GPU; see train_step.py).
`--loop-only` times the decode loop's own work
(sampling, confidences, ranking) around a fixed logits table of [B, N, K], per step.
"""
from __future__ import annotations

import argparse
import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from train_step import device_info, muse_config

from muse_jax import cascade, precision, sampling
from muse_jax.models import transformer
from muse_jax.training import step as step_lib


def random_text_encoder(shape: common.ModelShape, seed: int):
    """A stand-in frozen encoder: prompts -> random embeddings [n, L, D], all-true mask [n, L]."""

    def encode(prompts):
        rng = np.random.default_rng([seed, int(all(p == "" for p in prompts))])
        emb = rng.standard_normal((len(prompts), shape.text_len, shape.text_width), dtype=np.float32)
        return emb, np.ones((len(prompts), shape.text_len), bool)

    return encode


def build_program(shape: common.ModelShape, args: argparse.Namespace):
    """(program, call_args): the jitted stage program of `muse-jax sample` and its arguments (a list)."""
    config = muse_config(shape, matmul_precision=common.jax_matmul_precision(args.matmul))
    model = transformer.build(config.base)
    dummy = transformer.dummy_inputs(model, 1, shape.text_len)
    params = nn.unbox(jax.jit(lambda r: transformer.init_params(model, r, dummy))(jax.random.key(args.seed)))
    stage = cascade.Stage.from_model("base", model, params, None, text_encode=random_text_encoder(shape, args.seed))
    guided = not args.no_guidance
    options = sampling.DecodeOptions(num_steps=args.decode_steps, mask_schedule="cosine", choice_temperature=4.5)
    program = cascade._stage_program(stage, options, guided, "constant",
                                      matmul_precision=config.train.matmul_precision)
    b = shape.batch
    put = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    call_args = [params, jnp.full((b, stage.num_tokens), stage.mask_token_id, jnp.int32),
                 put(stage.prepare_text(["a prompt"] * b)), put(stage.prepare_text([""] * b)) if guided else None,
                 None, jax.random.key(args.seed), jnp.float32(args.guidance)]
    return program, call_args


def run(shape: common.ModelShape, args: argparse.Namespace) -> dict:
    program, call_args = build_program(shape, args)
    params, guided, b = call_args[0], not args.no_guidance, shape.batch
    model = transformer.build(muse_config(shape).base)
    t0 = time.perf_counter()
    compiled = program.lower(*call_args).compile()
    compile_s = time.perf_counter() - t0

    counter = iter(range(1, 1 << 30))

    def one_decode():
        call_args[5] = jax.random.key(args.seed + next(counter))
        return compiled(*call_args)

    times = common.time_calls(one_decode, jax.block_until_ready, args.steps, args.warmup)
    out = np.asarray(one_decode())
    if out.min() < 0 or out.max() >= shape.codebook:
        raise RuntimeError(f"decode left tokens outside [0, {shape.codebook}): min {out.min()}, max {out.max()}")
    batch_s = common.median(times)
    flops = common.decode_flops(shape, args.decode_steps, guided)
    fwd_batch = b * (2 if guided else 1)
    abstract_params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    counted = step_lib.forward_flops(model, abstract_params, transformer.dummy_inputs(model, fwd_batch, shape.text_len))
    peak_n = common.peak_size(args.peak_size, jax.devices()[0].platform)
    mp = common.jax_matmul_precision(args.matmul)
    peak = None if args.no_peak else common.jax_matmul_peak(shape.dtype, peak_n, matmul_precision=mp)
    return {
        "bench": "decode", "impl": "muse_jax", **shape.describe(), **device_info(),
        "matmul": precision.multiplies(mp), "matmul_precision": mp,
        "decode_steps": args.decode_steps, "guidance": args.guidance if guided else None,
        "guidance_impl": "one batched 2B forward per step" if guided else "off",
        "s_per_batch": batch_s, "images_per_s": b / batch_s, "timing": common.spread(times),
        "steps": args.steps, "warmup": args.warmup, "params": transformer.count_params(params),
        "model_gflops": flops / 1e9,
        "measured_gflops": counted * args.decode_steps / 1e9 if counted else None,
        "measured_flops_source": "XLA cost analysis of one forward x decode steps",
        "achieved_gflops_per_s": flops / batch_s / 1e9,
        "peak_gflops_per_s": None if peak is None else peak / 1e9,
        "mfu": None if peak is None else flops / batch_s / peak, "compile_s": compile_s,
        "text": "random embeddings (no T5 timed)",
    }


def run_loop_only(shape: common.ModelShape, args: argparse.Namespace) -> dict:
    """The decode loop around a fixed logits table [B, N, K]: its own cost per step."""
    b, n, k, steps = shape.batch, shape.tokens, shape.codebook, args.decode_steps
    table = jax.random.normal(jax.random.key(args.seed), (b, n, k), jnp.float32)

    @jax.jit
    def run_decode(table, rng):
        fn = lambda t, s: table + 0.0 * t[..., None]  # noqa: E731  (depends on the tokens)
        start = jnp.full((b, n), k, jnp.int32)
        return sampling.decode(fn, start, rng, mask_token_id=k, options=sampling.DecodeOptions(num_steps=steps))

    t0 = time.perf_counter()
    compiled = run_decode.lower(table, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    counter = iter(range(1, 1 << 30))
    times = common.time_calls(lambda: compiled(table, jax.random.key(next(counter))), jax.block_until_ready,
                              args.steps, args.warmup)
    return {"bench": "decode_loop", "impl": "muse_jax", **shape.describe(), **device_info(),
            "decode_steps": steps, "ms_per_decode_step": 1e3 * common.median(times) / steps,
            "timing": common.spread(times), "compile_s": compile_s}


LOOP_COLUMNS = [("impl", "impl", ""), ("config", "config", ""), ("batch", "batch", "d"),
                ("tokens", "tokens", "d"), ("codebook", "K", "d"), ("ms_per_decode_step", "loop ms/step", ".3f"),
                ("compile_s", "compile s", ".1f")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_flags(ap, steps=5, warmup=1)
    ap.add_argument("--decode-steps", type=int, default=12, help="MaskGIT decoding steps")
    ap.add_argument("--guidance", type=float, default=3.0, help="g in (1 + g) cond - g uncond")
    ap.add_argument("--no-guidance", action="store_true")
    ap.add_argument("--loop-only", action="store_true", help="time the decode loop around a fixed logits table")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    ap.add_argument("--peak-size", type=int, default=0,
                    help="n of the n^3 matmul peak (0: 2048 on CPU, 8192 on a GPU, which 2048 cannot fill)")
    args = ap.parse_args(argv)
    try:
        shape = common.shape_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    if args.decode_steps < 1:
        ap.error(f"--decode-steps must be >= 1, got {args.decode_steps}")
    warning = common.check_repetitions(args, minimum=5)
    row = run_loop_only(shape, args) if args.loop_only else run(shape, args)
    if warning:
        row["warning"] = warning
    if args.loop_only:
        common.emit([row], args.json, LOOP_COLUMNS)
    else:
        common.emit([row], args.json, common.DECODE_COLUMNS)
        if not args.json:
            print(f"device: {row['device']} ({row['framework']}); text: {row['text']}; guidance: "
                  f"{row['guidance_impl']}", file=sys.stdout)


if __name__ == "__main__":
    main()
