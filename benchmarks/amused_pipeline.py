"""Times the whole aMUSEd pipeline, muse_jax against diffusers' `AmusedPipeline`, on the same weights.

    python benchmarks/amused_pipeline.py --size tiny --batch 1,8
    python benchmarks/amused_pipeline.py --size amused-256 --batch 1,8 --repeats 1
    python benchmarks/amused_pipeline.py --size amused-512 --batch 8 --memory-only
    python benchmarks/amused_pipeline.py --size amused-256 --batch 1,8,32 --torch-dtype float16   # on a GPU

One random aMUSEd pipeline (tests/_amused_fixture.py: amused-256's or amused-512's component sizes,
or a tiny one) is saved with `save_pretrained` and imported with `muse-jax import-amused`, so both
sides run the same weights. Timed per batch, after one untimed call (ours: compilation):
  ours      `cascade.Pipeline.generate`: CLIP text encoding, 12 guided steps of the "amused" scheduler
            and the VQGAN decode, one jitted program per stage plus the jitted decoder, to uint8
            images on the host; at --matmul default (bfloat16 multiplies where the backend rounds
            them: TPU, AMX CPUs) and float32.
  diffusers `AmusedPipeline(prompts, num_inference_steps=12, guidance_scale=10, output_type="np")`,
            eager PyTorch under no_grad, in --torch-dtype (float32 on a CPU).
Reported: seconds per batch (median), images/s, and our images/s over diffusers' at the same batch.
--memory adds, and --memory-only (nothing runs) gives, XLA's memory analysis of our compiled
sampling program for the batch (arguments = parameters and inputs, temporaries, outputs) on this
backend.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _amused_fixture as fixture  # noqa: E402
import common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from muse_jax import amused, cascade  # noqa: E402

# amused-512: amused-256's transformer with the stride-2 down/up blocks around it, 32x32 tokens.
SIZES = {"tiny": (fixture.TINY, False), "amused-256": (fixture.AMUSED_256, False),
         "amused-512": (dict(fixture.AMUSED_256, grid=32), True)}
PROMPTS = ("a photo of a cat", "an oil painting of a tree", "the red car", "the sea at night")
COLUMNS = [("impl", "impl", ""), ("size", "size", ""), ("device", "device", ""), ("dtype", "dtype", ""),
           ("batch", "batch", "d"), ("s_per_batch", "s/batch", ".3f"), ("images_per_s", "images/s", ".3f"),
           ("speedup", "x diffusers", ".2f"), ("compile_s", "first call s", ".1f")]
MEMORY_COLUMNS = [("size", "size", ""), ("batch", "batch", "d"), ("params", "params", ",d"),
                  ("argument_gib", "arguments GiB", ".2f"), ("temp_gib", "temporaries GiB", ".2f"),
                  ("output_gib", "outputs GiB", ".4f"), ("total_gib", "total GiB", ".2f")]


def _prompts(batch):
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def time_ours(workdir, batch, repeats, matmul):
    pipe = cascade.Pipeline.from_workdir(workdir, batch_size=batch, matmul_precision=matmul)
    t0 = time.perf_counter()
    pipe.generate(_prompts(batch), seed=0)
    first = time.perf_counter() - t0
    times = common.time_calls(lambda: pipe.generate(_prompts(batch), seed=1), lambda r: r, repeats)
    return dict(impl="muse_jax", dtype=f"float32 params, {'bf16' if matmul == 'default' else 'f32'} matmul",
                compile_s=first, **_rate(times, batch))


def time_diffusers(ref, batch, repeats, dtype, device):
    """diffusers' pipeline (eager: no compilation; `main` warms it up once at batch 1)."""
    import torch

    call = lambda: ref(_prompts(batch), num_inference_steps=12, guidance_scale=10.0, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        times = common.time_calls(call, lambda r: r, repeats)
    return dict(impl="diffusers", dtype=dtype, **_rate(times, batch))


def _rate(times, batch):
    s = common.median(times)
    return dict(s_per_batch=s, images_per_s=batch / s, times=times)


def memory(workdir, batch):
    """XLA's memory analysis of the compiled sampling program (abstract inputs: nothing runs)."""
    loaded = amused.load(workdir)
    stage = cascade.Stage.from_amused(loaded)
    opts = cascade.SampleOptions(**dict(amused.SAMPLE_DEFAULTS, batch_size=batch))
    program = cascade._stage_program(stage, opts.decode_options("base"), True, opts.guidance_schedule)
    n, length = stage.num_tokens, int(loaded.tokenizer.max_length)
    spec = jax.ShapeDtypeStruct
    text = {"ids": spec((batch, length), np.int32), "micro": spec((batch, 5), np.float32)}
    params = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype), stage.params)
    compiled = program.lower(params, spec((batch, n), np.int32), text, text, None, jax.random.key(0),
                             spec((), np.float32)).compile()
    m = compiled.memory_analysis()
    gib = 2.0**30
    return dict(batch=batch, argument_gib=m.argument_size_in_bytes / gib, temp_gib=m.temp_size_in_bytes / gib,
                output_gib=m.output_size_in_bytes / gib,
                total_gib=(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) / gib,
                params=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(stage.params))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch and side")
    p.add_argument("--matmul", default="default,float32", help="our matmul precisions: default and/or float32")
    p.add_argument("--torch-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-diffusers", action="store_true", help="time ours only")
    p.add_argument("--memory-only", action="store_true", help="XLA's memory analysis of our sampler; nothing runs")
    p.add_argument("--memory", action="store_true", help="also XLA's memory analysis, after the timings")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    sizes, downsample = SIZES[args.size]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        t0 = time.perf_counter()
        ref = fixture.write_pipeline(tmp / "src", sizes, downsample=downsample)
        amused.import_pipeline(tmp / "W", tmp / "src")
        print(f"# {args.size}: random pipeline written and imported in {time.perf_counter() - t0:.0f} s; "
              f"JAX on {jax.devices()[0].platform}, torch on {device}", file=sys.stderr)
        if args.memory_only:
            rows = [dict(size=args.size, **memory(tmp / "W", b)) for b in batches]
            common.emit(rows, args.json, None if args.json else MEMORY_COLUMNS)
            return
        ref = ref.to(device=device, dtype=getattr(torch, args.torch_dtype))
        ref.set_progress_bar_config(disable=True)
        if not args.no_diffusers:
            time_diffusers(ref, 1, 1, args.torch_dtype, device)  # warm-up
        rows = []
        for b in batches:
            theirs = None if args.no_diffusers else time_diffusers(ref, b, args.repeats, args.torch_dtype, device)
            for matmul in args.matmul.split(","):
                ours = time_ours(tmp / "W", b, args.repeats, common.jax_matmul_precision(matmul))
                if theirs is not None:
                    ours["speedup"] = ours["images_per_s"] / theirs["images_per_s"]
                rows.append(ours)
            if theirs is not None:
                rows.append(theirs)
            for r in rows[-(len(args.matmul.split(",")) + (theirs is not None)):]:
                r.update(size=args.size, batch=b, device=str(jax.devices()[0].platform if r["impl"] == "muse_jax"
                                                            else device), steps=12)
        common.emit(rows, args.json, None if args.json else COLUMNS)
        if args.memory:
            rows = [dict(size=args.size, **memory(tmp / "W", b)) for b in batches]
            common.emit(rows, args.json, None if args.json else MEMORY_COLUMNS)


if __name__ == "__main__":
    main()
