"""Times the sampler: compile time and per-batch decode time of each stage (random weights).

    python benchmarks/sample_decode.py [--config shapes] [--batch 16] [--repeats 5] [--no-guidance]
    python benchmarks/sample_decode.py --overhead 8,4096,8192,8   # the loop alone: B,N,K,steps

Builds the base and super-res transformers of the config (with their joint T5) at random
initialisation and runs the stage programs of `muse_jax.cascade` (text encoding + the
fixed-step decode loop with guidance as one batched 2B forward). Prints one JSON line per
stage: compile seconds (lower + XLA compile) and the median seconds per batch.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from muse_jax import cascade
from muse_jax import config as config_lib
from muse_jax.models import transformer


def random_stage(config, name, text_length):
    model = transformer.build(config[name], config.text.encoder if config.text.trainable else None)
    dummy = transformer.dummy_inputs(model, 1, text_length)
    params = nn.unbox(jax.jit(lambda r: transformer.init_params(model, r, dummy))(jax.random.key(0)))
    vocab = int(config.text.encoder.vocab_size)

    def text_tokenizer(prompts):
        ids = np.zeros((len(prompts), text_length), np.int32)
        for i, p in enumerate(prompts):
            row = [3 + (ord(c) % (vocab - 3)) for c in p[: text_length - 1]] + [1]
            ids[i, : len(row)] = row
        return ids, ids > 0

    return cascade.Stage.from_model(name, model, params, text_tokenizer)


def loop_overhead(batch, tokens, codebook, steps, repeats):
    """The decode loop's own cost per step (sampling, confidences, ranking) with a table for a model."""
    from muse_jax import sampling

    table = jax.random.normal(jax.random.key(0), (batch, tokens, codebook), jnp.float32)

    @jax.jit
    def run(table, rng):
        fn = lambda t, s: table + 0.0 * t[..., None]  # noqa: E731  (depends on the tokens)
        start = jnp.full((batch, tokens), codebook, jnp.int32)
        return sampling.decode(fn, start, rng, mask_token_id=codebook, options=sampling.DecodeOptions(num_steps=steps))

    t0 = time.perf_counter()
    run(table, jax.random.key(0)).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        run(table, jax.random.key(r + 1)).block_until_ready()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"overhead": True, "device": jax.devices()[0].device_kind, "batch": batch, "tokens": tokens,
                      "codebook": codebook, "steps": steps, "first_call_s": round(compile_s, 3),
                      "ms_per_step": round(1000 * float(np.median(times)) / steps, 3)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-guidance", action="store_true")
    ap.add_argument("--overhead", help="B,N,K,steps: time the loop alone with a fixed logits table")
    args, overrides = ap.parse_known_args()
    if args.overhead:
        loop_overhead(*map(int, args.overhead.split(",")), args.repeats)
        return
    config = config_lib.load_config(args.config, overrides)
    opts = cascade.SampleOptions.from_config(config.sample, batch_size=args.batch)
    text_length = int(config.text.max_length)
    b = args.batch
    guided = not args.no_guidance
    prompts = [f"a red circle number {i}" for i in range(b)]
    lowres = None
    for name in config_lib.STAGES:
        stage = random_stage(config, name, text_length)
        dec = opts.decode_options(name)
        program = cascade._stage_program(stage, dec, guided, opts.guidance_schedule)
        put = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
        call_args = (stage.params, jnp.full((b, stage.num_tokens), stage.mask_token_id, jnp.int32),
                     put(stage.prepare_text(prompts)), put(stage.prepare_text([""] * b)) if guided else None,
                     lowres, jax.random.key(0), jnp.float32(opts.guidance))
        t0 = time.perf_counter()
        compiled = program.lower(*call_args).compile()
        compile_s = time.perf_counter() - t0
        out = compiled(*call_args).block_until_ready()  # warm-up
        times = []
        for r in range(args.repeats):
            a = list(call_args)
            a[5] = jax.random.key(r + 1)
            t0 = time.perf_counter()
            out = compiled(*a).block_until_ready()
            times.append(time.perf_counter() - t0)
        lowres = out
        print(json.dumps({
            "stage": name, "device": jax.devices()[0].device_kind, "batch": b, "steps": dec.num_steps,
            "tokens": stage.num_tokens, "guidance": guided, "compile_s": round(compile_s, 3),
            "decode_s_per_batch": round(float(np.median(times)), 5),
            "ms_per_step": round(1000 * float(np.median(times)) / dec.num_steps, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
