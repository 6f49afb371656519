"""`muse-jax`: the one command-line entry point, with a subcommand per job.

Subcommands parse their arguments and call the library; they hold no logic of their own.
Commands that take `--config` also accept `--config.field=value` overrides.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys


def _data_shapes(args, overrides):
    from muse_jax.data import export

    out = export.export_shapes(args.out, args.num, args.split, args.seed)
    print(f"wrote {args.num} {args.split} images and captions.jsonl to {out}")


def _data_tokenize(args, overrides):
    from muse_jax import config as config_lib
    from muse_jax import distributed
    from muse_jax.training import tokenize

    cfg = config_lib.load_config(args.config, overrides)
    distributed.initialize(cfg)  # multi-host: every process tokenizes its own share
    tokenize.run(cfg, args.workdir, args.split, out=args.out, chunk_size=args.chunk_size, batch_size=args.batch_size)


def _eval(args, overrides):
    floats = lambda text: [float(v) for v in text.split(",") if v] if text else []
    if args.prompts:  # zero-shot FID and CLIP score on a caption set
        from muse_jax.evaluation import zero_shot

        if args.num is None:
            raise ValueError("--prompts needs --num (how many captions to generate from)")
        zero_shot.run(
            args.workdir, args.prompts, args.out, num=args.num, reference=args.reference,
            tfds_data_dir=args.tfds_data_dir, inception_path=args.inception, resize=args.resize,
            clip_path=args.clip, clip_model=args.clip_model, seed=args.seed, steps=args.steps,
            sr_steps=args.sr_steps, guidance=args.guidance, sweep_guidance=floats(args.sweep_guidance),
            sweep_temperature=floats(args.sweep_temperature), save_images=args.save_images,
        )
        return
    from muse_jax import amused
    from muse_jax.evaluation import run as eval_run

    if amused.is_amused(args.workdir):
        raise ValueError(f"{args.workdir} holds an imported aMUSEd pipeline, scored on a caption set: give --prompts "
                         "and --num (the shapes evaluation is for workdirs trained on shapes)")

    eval_run.run(
        args.workdir, args.out, num_prompts=args.num_prompts, seed=args.seed, steps=args.steps,
        sr_steps=args.sr_steps, guidance=args.guidance,
        sweep_steps=[int(v) for v in floats(args.sweep_steps)], sweep_guidance=floats(args.sweep_guidance),
        sweep_prompts=args.sweep_prompts, num_stage_images=args.stage_images, curve_points=args.curve_points,
        inception_path=args.inception,
    )


def _quickstart(args, overrides):
    from muse_jax import quickstart

    quickstart.run(args.workdir, args.config, overrides)


def _train_tokenizer(args, overrides):
    from muse_jax import config as config_lib
    from muse_jax.training import train_tokenizer

    cfg = config_lib.load_config(args.config, overrides)
    from muse_jax import distributed

    distributed.initialize(cfg)  # multi-host, as for `train` (no-op for one process)
    for name in tokenizers_to_train(cfg, args.tokenizer):
        result = train_tokenizer.train(cfg, args.workdir, name=name)
        if result["status"] == "preempted":
            break
        if "psnr" not in result:
            continue
        print(
            f"tokenizer {name or '(shared)'} eval on {result['num_images']} test images: psnr={result['psnr']:.2f} dB "
            f"(half size: {result['psnr_lowres']:.2f} dB) "
            f"usage={result['usage']:.1%} perplexity={result['perplexity']:.1f} "
            f"palette_acc={result['palette_acc']:.4f} ({result['train_seconds']:.0f}s training)"
        )


def tokenizers_to_train(cfg, flag: str | None) -> list[str]:
    """`train-tokenizer --tokenizer FLAG`: a name ("" = the shared W/tokenizer), "all" (every section of
    config.tokenizers), or None: those the config's stages read (`config.<stage>.tokenizer`)."""
    from muse_jax import config as config_lib
    from muse_jax import workdir as workdir_lib

    if flag is None:
        return sorted({workdir_lib.stage_tokenizer(cfg, s) for s in config_lib.STAGES})
    if flag == "all":
        return sorted(cfg.get("tokenizers", {}) or {}) or [""]
    return [flag]


def _import_tokenizer(args, overrides):
    from muse_jax import workdir as workdir_lib

    out = workdir_lib.import_diffusers_tokenizer(args.workdir, args.diffusers, name=args.tokenizer,
                                                 image_size=args.image_size)
    tok = workdir_lib.load_image_tokenizer(args.workdir, name=args.tokenizer)
    print(f"imported {args.diffusers} into {out}: f{tok.factor}, {tok.codebook_size} codes, {args.image_size} px")


def _import_amused(args, overrides):
    from muse_jax import amused

    s = amused.import_pipeline(args.workdir, args.source)
    print(f"imported {args.source} into {s['workdir']}: aMUSEd {s['resolution']} px ({s['grid_size']}x{s['grid_size']} "
          f"tokens), UVit2D {s['uvit_params'] / 1e6:.1f}M and CLIP text {s['text_params'] / 1e6:.1f}M parameters; "
          f"sample with `muse-jax sample --workdir {s['workdir']} --prompt ... --out grid.png`")


def _train(args, overrides):
    from muse_jax import config as config_lib
    from muse_jax.training import finetune, loop

    if args.init_from:
        spec = args.config or finetune.init_config(args.init_from)
    else:
        spec = args.config or finetune.default_config(args.workdir)
    cfg = config_lib.load_config(spec, overrides)
    from muse_jax import distributed

    distributed.initialize(cfg)  # multi-host: config.distributed / MUSE_* / SLURM / TPU pod (no-op alone)
    if args.init_from:
        finetune.init_workdir(args.workdir, args.init_from)
    stages = config_lib.STAGES if args.stage == "all" else (args.stage,)
    loop.train(cfg, args.workdir, stages)


def _lora_merge(args, overrides):
    from muse_jax.training import finetune

    s = finetune.merge_lora(args.workdir, args.out)
    print(f"merged the LoRA adapters of step {s['step']} ({s['adapters']} parameters) into {s['workdir']}; "
          f"sample it with `muse-jax sample --workdir {s['workdir']} --prompt ... --out grid.png`")


def _ema(args, overrides):
    from muse_jax import distributed
    from muse_jax import workdir as workdir_lib
    from muse_jax.training import ema

    distributed.initialize(workdir_lib.load_stage_config(args.workdir, args.stage))  # as `train` (no-op alone)
    _, meta = ema.run(args.workdir, args.stage, decay=args.decay, every=args.every)
    print(f"{args.stage}: EMA (decay {meta['decay']}) of the checkpoints of steps {meta['steps']} -> "
          f"{workdir_lib.ema_dir(args.workdir, args.stage)}; sample, edit and eval now use it")


def _reconstruct(args, overrides):
    from muse_jax.evaluation import tokenizer as tokenizer_eval

    psnrs = tokenizer_eval.reconstruct_folder(args.workdir, getattr(args, "in"), args.out)
    for name, value in psnrs.items():
        print(f"{name}: psnr={value:.2f} dB")
    print(f"mean psnr over {len(psnrs)} images: {sum(psnrs.values()) / len(psnrs):.2f} dB -> {args.out}")


def _sampling_overrides(args) -> dict:
    return dict(steps=args.steps, sr_steps=args.sr_steps, guidance=args.guidance,
                guidance_schedule=args.guidance_schedule, negative_prompt=args.negative_prompt,
                temperature=args.temperature, top_k=args.top_k, choice_temperature=args.choice_temperature,
                matmul_precision=args.matmul_precision, micro_conditioning=_floats(args.micro_conditioning))


def _floats(text):
    return None if text is None else tuple(float(v) for v in text.split(","))


def _sample(args, overrides):
    from muse_jax import cascade

    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give exactly one of --prompt and --prompts-file")
    if args.num < 1:
        raise ValueError(f"--num must be positive, got {args.num}")
    if args.out is None and args.out_dir is None:
        raise ValueError("give --out (a grid PNG) or --out-dir (one PNG per sample)")
    prompts = [args.prompt] if args.prompt is not None else cascade.read_prompts_file(args.prompts_file)
    pipe = cascade.Pipeline.from_workdir(args.workdir)
    written = cascade.sample_to_files(pipe, prompts, num=args.num, seed=args.seed, out=args.out,
                                       out_dir=args.out_dir, **_sampling_overrides(args))
    print(f"wrote {len(written)} file(s): {written[0]}{' ...' if len(written) > 1 else ''}")


def _edit(args, overrides):
    from muse_jax import cascade

    pipe = cascade.Pipeline.from_workdir(args.workdir)
    image = cascade.load_image(args.image, pipe.image_size)
    kw = dict(_sampling_overrides(args), edit_iterations=args.iterations, edit_fraction=args.fraction,
              strength=args.strength)
    if args.mask is not None:
        mask = cascade.load_mask(args.mask, args.image, pipe.image_size)
        out = pipe.inpaint(image, mask, [args.prompt], seed=args.seed, **kw)
    else:
        out = pipe.edit(image, [args.prompt], seed=args.seed, **kw)
    print(f"wrote {cascade.save_png(out[0], args.out)}")


class _Once(argparse.Action):
    """An option that may be given once (a second --prompt would silently replace the first)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; use --prompts-file for several prompts")
        setattr(namespace, self.dest, values)


def _add_sampling_args(p):
    p.add_argument("--workdir", required=True, help="a workdir with a trained tokenizer and stages")
    p.add_argument("--steps", type=int, help="base decoding steps (default: config.sample.steps)")
    p.add_argument("--sr-steps", type=int, help="super-resolution decoding steps (default: config.sample.sr_steps)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale g: (1+g) cond - g uncond")
    p.add_argument("--guidance-schedule", choices=["constant", "linear"], help="linear: ramp g up from 0")
    p.add_argument("--negative-prompt", help="replaces the empty prompt of the unconditional branch")
    p.add_argument("--temperature", type=float, help="sampling temperature on the logits")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--choice-temperature", type=float, help="Gumbel temperature of the confidence ranking")
    p.add_argument("--matmul-precision", choices=["default", "highest"],
                   help="default: the backend's fast matmul (bfloat16 multiplies on TPUs and AMX CPUs); highest: float32")
    p.add_argument("--micro-conditioning", metavar="W,H,TOP,LEFT,AESTHETIC",
                   help="aMUSEd workdirs: original size, crop and aesthetic score (default: S,S,0,0,6 at S px)")
    p.add_argument("--seed", type=int, default=0)


def _plan(args, overrides):
    import json
    import math

    from muse_jax import planning

    sizes = planning.parse_mesh(args.mesh)
    planning.ensure_virtual_devices(math.prod(sizes.values()))  # before JAX starts
    from muse_jax import config as config_lib

    cfg = config_lib.load_config(args.config, overrides)
    remat = {"auto": None, "on": True, "off": False}[args.remat]
    kwargs = dict(stage=args.stage, batch_size=args.batch_size, remat=remat)
    accelerators = tuple(args.accelerator.split(","))
    if args.layers_from:
        depths = tuple(int(x) for x in args.layers_from.split(","))
        result = planning.plan_extrapolated(cfg, sizes, accelerators, layers_from=depths, **kwargs)
    else:
        result = planning.plan(cfg, sizes, accelerators, **kwargs)
    print(planning.format_plan(result))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


OVERRIDES_HELP = ("Any field of the config can be set after the flags: --config.FIELD=VALUE, e.g. "
                  "--config.train.lr=1e-3 --config.mesh.fsdp=-1 (muse_jax/configs/ lists the fields).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse-jax", description=__doc__.splitlines()[0],
                                     epilog="Errors print one line; MUSE_JAX_DEBUG=1 shows the traceback.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="dataset", required=True)
    p = data.add_parser("shapes", help="export the shapes dataset as PNGs + captions.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of examples")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_data_shapes)
    p = data.add_parser("tokenize", help="compute each stage's tokens of config.data once into W/tokens/SPLIT "
                        "(then train on them with --config.data.source=tokens)")
    p.add_argument("--config", required=True, help="config name or path (its data section is read)")
    p.add_argument("--workdir", required=True, help="a workdir with the stages' tokenizers")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--out", help="output folder (default: config.data.tokens_dir for train, else W/tokens/SPLIT)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="records per ArrayRecord file: a killed run resumes after its last complete chunk")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded at once by each process")
    p.set_defaults(fn=_data_tokenize)

    p = sub.add_parser("eval", help="score a trained workdir: alignment, FID, tokenizer, sweeps; with --prompts, "
                       "zero-shot FID and CLIP score on a caption set")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="output folder (eval.json, samples.png, sweeps)")
    p.add_argument("--num-prompts", type=int, default=200, help="prompts drawn from the test split")
    p.add_argument("--steps", type=int, help="base decoding steps (default: config.sample.steps)")
    p.add_argument("--sr-steps", type=int, help="super-res decoding steps (default: config.sample.sr_steps)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: config.sample.guidance)")
    p.add_argument("--sweep-steps", help="comma-separated base step counts to sweep, e.g. 4,8,12,24")
    p.add_argument("--sweep-guidance", help="comma-separated guidance scales to sweep, e.g. 0,1,3,5")
    p.add_argument("--sweep-prompts", type=int, default=64, help="prompts per sweep point")
    p.add_argument("--stage-images", type=int, default=48,
                   help="test images of one and of two objects (each) scored stage by stage "
                        "(tokenizer, super-res, base; 0: skip)")
    p.add_argument("--curve-points", type=int, default=0,
                   help="text alignment at N evenly spaced checkpoints of training, plotted to OUT/curve.png "
                        "(they must have been kept: config.train.keep_every; 0: skip)")
    p.add_argument("--inception", help="InceptionV3 FID weights (pytorch-fid .pth or .npz) for a standard FID")
    p.add_argument("--seed", type=int, default=0)
    z = p.add_argument_group("zero-shot evaluation on a caption set (with --prompts; see evaluation/zero_shot.py)")
    z.add_argument("--prompts", help="captions: FILE.txt, FILE.jsonl (\"caption\"), a folder dataset (captions.jsonl) "
                   "or tfds:NAME[:SPLIT[+SPLIT...]] (COCO-2014 val: tfds:coco_captions:val+test+restval)")
    z.add_argument("--num", type=int, help="the first N captions (tfds: N images in a seeded order, one caption each)")
    z.add_argument("--reference", help="FID reference: pytorch-fid statistics .npz, a folder of images or "
                   "tfds:NAME[:SPLIT[+SPLIT...]]")
    z.add_argument("--tfds-data-dir", help="the folder of the prepared tfds datasets (for tfds: sources)")
    z.add_argument("--resize", choices=["clean", "legacy"], default="clean",
                   help="FID input: clean (clean-fid: PIL bicubic to 299, (x - 128) / 128) or legacy (pytorch-fid: "
                        "bilinear on the float tensor)")
    z.add_argument("--clip", help="a Hugging Face CLIP checkpoint folder, for the CLIP score")
    z.add_argument("--clip-model", choices=["vit-b-32", "vit-l-14"], help="the CLIP preset (default: its config.json)")
    z.add_argument("--sweep-temperature", help="comma-separated sampling temperatures to sweep")
    z.add_argument("--save-images", action="store_true", help="also write every generated image as a PNG")
    p.set_defaults(fn=_eval)

    p = sub.add_parser("quickstart", help="run the whole pipeline on the embedded default")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="shapes", help="config name or path (default: shapes)")
    p.set_defaults(fn=_quickstart)

    p = sub.add_parser("sample", help="text-to-image sampling with a trained workdir")
    _add_sampling_args(p)
    p.add_argument("--prompt", action=_Once, help="one prompt")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--num", type=int, default=4, help="samples per prompt")
    p.add_argument("--out", help="grid PNG (one row per prompt)")
    p.add_argument("--out-dir", help="directory for one PNG per sample: {prompt:04d}_{sample:02d}.png")
    p.set_defaults(fn=_sample)

    p = sub.add_parser("edit", help="inpaint/outpaint (--mask) or mask-free editing of an image")
    _add_sampling_args(p)
    p.add_argument("--image", required=True, help="input PNG; a square image of another size is resized "
                   "with a warning, a non-square one is refused")
    p.add_argument("--mask", help="mask PNG of the image's size, white = regenerate (omit: mask-free editing)")
    p.add_argument("--prompt", required=True, action=_Once)
    p.add_argument("--iterations", type=int, help="mask-free editing iterations (default: config.sample)")
    p.add_argument("--fraction", type=float, help="mask-free editing: share of tokens re-sampled per iteration")
    p.add_argument("--strength", type=float,
                   help="aMUSEd workdirs: image-to-image strength in (0, 1] without --mask (default: config.sample, "
                        "0.5); 0: Muse's mask-free editing")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(fn=_edit)

    p = sub.add_parser("train-tokenizer", help="train the VQGAN image tokenizer into W/tokenizer")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="shapes", help="config name or path (default: shapes)")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer of config.tokenizers (one per stage) into W/tokenizer/NAME ('' : the shared "
                        "W/tokenizer); 'all': each of them; default: those the config's stages read")
    p.set_defaults(fn=_train_tokenizer)

    p = sub.add_parser("import-tokenizer", help="a diffusers VQModel folder (e.g. aMUSEd's vqvae) as W's tokenizer")
    p.add_argument("--workdir", required=True)
    p.add_argument("--diffusers", required=True, help="a saved diffusers VQModel folder (config.json + weights)")
    p.add_argument("--tokenizer", default="", help="its name (W/tokenizer/NAME, as config.<stage>.tokenizer says)")
    p.add_argument("--image-size", type=int, default=256, help="the pixel size it tokenizes (256 for the base)")
    p.set_defaults(fn=_import_tokenizer)

    p = sub.add_parser("import-amused", help="the public aMUSEd-256/512 weights (a diffusers pipeline folder) as "
                       "a new workdir that sample, edit and eval use")
    p.add_argument("--workdir", required=True, help="a new (empty or absent) workdir")
    p.add_argument("source", help="a diffusers AmusedPipeline folder (transformer/, text_encoder/, tokenizer/, "
                   "vqvae/, scheduler/), or a hub id such as amused/amused-256 where there is network")
    p.set_defaults(fn=_import_amused)

    p = sub.add_parser("train", help="train the base and/or super-resolution transformer into W/<stage>")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="config name or path (default: shapes; for a workdir made by "
                   "import-amused: amused_256_finetune or amused_512_finetune, by its resolution)")
    p.add_argument("--stage", default="all", choices=["all", "base", "superres"],
                   help="all: base then superres (each resumes from its latest checkpoint)")
    p.add_argument("--init-from", default="", metavar="W0",
                   help="fine-tune the trained workdir W0 into the new workdir W (its stages start from W0's "
                   "weights; default config: the one W0 was trained with, or the aMUSEd fine-tuning recipe)")
    p.set_defaults(fn=_train)

    p = sub.add_parser("lora", help="LoRA fine-tunes of an aMUSEd workdir: `lora merge` folds the adapters in")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    p = lora_sub.add_parser("merge", help="a new workdir with W's newest adapters folded into its weights")
    p.add_argument("--workdir", required=True, help="an aMUSEd workdir fine-tuned with LoRA (config.lora.rank > 0)")
    p.add_argument("--out", required=True, help="the new (empty or absent) workdir")
    p.set_defaults(fn=_lora_merge)

    p = sub.add_parser("ema", help="offline EMA of a stage's checkpoints into W/<stage>/ema (sampling uses it)",
                       description="Averages the stage's kept checkpoints whose step is a multiple of --every, in "
                       "step order: ema = decay * ema + (1 - decay) * params. The result is used by sample, edit "
                       "and eval in place of the EMA kept in training (config.train.ema_decay) or the last "
                       "checkpoint; delete W/<stage>/ema.json to go back. Training keeps only the newest "
                       "config.train.keep_checkpoints; train with --config.train.keep_every=5000 to keep every "
                       "5000-step checkpoint as well.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", required=True, choices=["base", "superres"])
    p.add_argument("--decay", type=float, default=0.7, help="EMA decay per checkpoint, in (0, 1) (Muse: 0.7)")
    p.add_argument("--every", type=int, default=5000, help="average the checkpoints of multiples of this step")
    p.set_defaults(fn=_ema)

    p = sub.add_parser("reconstruct", help="encode+decode every PNG of a folder with W's tokenizer")
    p.add_argument("--workdir", required=True)
    p.add_argument("--in", required=True, help="folder of .png images")
    p.add_argument("--out", required=True, help="folder for the reconstructions (same file names)")
    p.set_defaults(fn=_reconstruct)

    p = sub.add_parser("plan", help="memory/FLOPs/step-time plan of a training step on a virtual mesh")
    p.add_argument("--config", required=True, help="config name or path, e.g. muse_3b or paper:muse_632m")
    p.add_argument("--mesh", required=True, help="axis sizes, e.g. data=1,fsdp=512,tensor=1")
    p.add_argument("--accelerator", default="tpu_v4",
                   help="comma-separated names from muse_jax.planning.ACCELERATORS (tpu_v4, tpu_v5e, tpu_v5p, h100)")
    p.add_argument("--stage", default="base", choices=["base", "superres"])
    p.add_argument("--batch-size", type=int, help="global batch (default: config.train.batch_size)")
    p.add_argument("--remat", default="auto", choices=["auto", "on", "off"], help="auto: the config's remat")
    p.add_argument("--json", help="also write the full plan as JSON here")
    p.add_argument("--layers-from", help="e.g. 2,4: compile with 2 and 4 blocks and extrapolate to the "
                   "config's depth (fast for deep models)")
    p.set_defaults(fn=_plan)
    for command in sub.choices.values():  # the commands that take --config also take overrides
        if any("--config" in a.option_strings for a in command._actions):
            command.epilog = OVERRIDES_HELP
    return parser


def one_line(e: BaseException) -> str:
    """An exception as one line that names its cause (a KeyError's message is its first argument)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    text = " ".join(text.split())
    if isinstance(e, (ValueError, FileNotFoundError)) and type(e).__module__ == "builtins":
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not hasattr(args, "config"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        args.fn(args, overrides)
    except Exception as e:  # noqa: BLE001  (every error a user can cause: one line, exit 2)
        if os.environ.get("MUSE_JAX_DEBUG", "") not in ("", "0"):
            raise
        expected = isinstance(e, (ValueError, FileNotFoundError))
        hint = "" if expected else " (MUSE_JAX_DEBUG=1 shows the traceback)"
        print(f"muse-jax {args.command}: error: {one_line(e)}{hint}", file=sys.stderr)
        from muse_jax import distributed

        distributed.exit_now(2, one_line(e))  # multi-process: leave now so the other processes stop too
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
