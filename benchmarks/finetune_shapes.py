"""Fine-tunes a random small aMUSEd on the embedded shapes data and scores what it draws, before and after.

    python benchmarks/finetune_shapes.py                                  # trains a shapes VQGAN first
    python benchmarks/finetune_shapes.py --tokenizer-from WS --steps 800  # WS/tokenizer: a shapes VQGAN
    python benchmarks/finetune_shapes.py --tokenizer-from WS --lora       # LoRA adapters only

  1. The image tokenizer: WS/tokenizer (`--tokenizer-from WS`, a workdir of `muse-jax train-tokenizer
     --config shapes`), else one trained that way (`--tokenizer-steps`) into a scratch workdir.
  2. A random `AmusedPipeline` (tests/_amused_fixture.py, sizes `--size`) whose UVit2D predicts that
     VQGAN's codes on its token grid (64 px / f4: 16x16), saved and imported with `muse-jax import-amused`;
     W/tokenizer (the pipeline's random VQModel of the same factor) is then replaced by the shapes VQGAN.
  3. `--num-train` train images exported as `muse-jax data shapes --out` writes them, and W fine-tuned on
     that folder (`amused_256_finetune`, or `amused_256_lora` with `--lora`, at 64 px; `muse-jax train`).
  4. The first `--eval` captions of the test split sampled from W before and after fine-tuning (same
     seed and settings), each image scored against its caption by the shapes detector
     (muse_jax/evaluation/alignment.py). The VQGAN's reconstructions of the captions' own test images
     are scored too: what a perfect transformer could reach through this tokenizer.

Prints one row per image source: the fraction of captions whose object count, colours, shapes, and
every stated attribute at once ("all": size, position and background included where stated) the
detector finds; the fine-tune's steps, minutes, and mean loss over its first and last tenth of steps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _amused_fixture as fixture  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402

from muse_jax import amused, cascade, cli, image_ops  # noqa: E402
from muse_jax import config as config_lib  # noqa: E402
from muse_jax import workdir as workdir_lib  # noqa: E402
from muse_jax.data import export, shapes  # noqa: E402
from muse_jax.evaluation import alignment  # noqa: E402
from muse_jax.training import loop  # noqa: E402

# UVit2D and CLIP text sizes of the random pipeline; the codebook and token grid come from the VQGAN. A grid
# of 16x16 or more is halved by a stride-2 convolution before the transformer (amused-512's layout; ~3.5x
# cheaper steps at 16x16 here).
SIZES = {
    "tiny": fixture.TINY,
    "small": dict(fixture.TINY, hidden=128, heads=4, layers=4, mlp=512, channels=64, in_channels=32, res_blocks=3,
                  block_heads=2, text_width=64, projection=64, micro_dim=16),
}
ATTRIBUTES = ("count", "color", "shape", "all")
COLUMNS = [("images", "images", ""), ("step", "step", "d"), ("minutes", "train min", ".1f"),
           ("loss_first", "loss first", ".3f"), ("loss_last", "loss last", ".3f"),
           *[(a, a, ".3f") for a in ATTRIBUTES], ("one_object_all", "all, one object", ".3f")]


@contextlib.contextmanager
def phase(name: str):
    """Prints the wall-clock and CPU seconds of a phase to stderr."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    print(f"# {name}: {time.perf_counter() - t0:.1f} s ({time.process_time() - c0:.1f} s CPU)", file=sys.stderr,
          flush=True)


def markdown(rows, columns) -> str:
    """A markdown table of (key, header, format) columns."""
    cells = [[common._fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def shapes_tokenizer(args, scratch: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """(the workdir holding the shapes VQGAN, its test evaluation): `--tokenizer-from`, or trained here."""
    if args.tokenizer_from:
        ws = pathlib.Path(args.tokenizer_from)
        ev = ws / "tokenizer" / "eval.json"
        return ws, dict(json.loads(ev.read_text()) if ev.is_file() else {}, seconds=None)
    ws = scratch / "WS"
    t0 = time.perf_counter()
    argv = ["train-tokenizer", "--config", "shapes", "--workdir", str(ws), "--config.data.source=procedural",
            f"--config.train_tokenizer.num_steps={args.tokenizer_steps}",
            f"--config.train_tokenizer.eval_batch_size={min(100, args.tokenizer_eval_images)}",
            f"--config.train_tokenizer.eval_max_batches={math.ceil(args.tokenizer_eval_images / 100)}"]
    print(f"# muse-jax {' '.join(argv)}", file=sys.stderr, flush=True)
    if cli.main(argv) != 0:
        raise SystemExit("train-tokenizer failed")
    ev = ws / "tokenizer" / "eval.json"
    return ws, dict(json.loads(ev.read_text()) if ev.is_file() else {}, seconds=time.perf_counter() - t0)


def amused_workdir(args, ws: pathlib.Path, scratch: pathlib.Path, image_size: int) -> pathlib.Path:
    """A random aMUSEd of `--size` taking `image_size` px through WS's VQGAN (its grid and codebook), imported,
    with that VQGAN as W/tokenizer."""
    vq = workdir_lib.load_image_tokenizer(ws)
    levels = int(round(math.log2(vq.factor))) + 1  # the random VQModel only sets the factor: image_size / grid
    grid = image_size // vq.factor
    sizes = dict(SIZES[args.size], **args.sizes, codebook=vq.codebook_size, grid=grid, vq_channels=(8,) * levels,
                 vq_latent=8)
    downsample = grid >= 16 if args.downsample == "auto" else args.downsample == "on"
    fixture.write_pipeline(scratch / "src", sizes, downsample=downsample, seed=args.seed)
    w = scratch / "W"
    if cli.main(["import-amused", "--workdir", str(w), str(scratch / "src")]) != 0:
        raise SystemExit("import-amused failed")
    shutil.rmtree(workdir_lib.tokenizer_dir(w))
    shutil.copytree(workdir_lib.tokenizer_dir(ws), workdir_lib.tokenizer_dir(w),
                    ignore=shutil.ignore_patterns("LOCK*", "tb", "samples", "cache"))
    # what import-amused checks of its own VQGAN holds for the shapes one
    stage, tok = amused.stage_config(w), workdir_lib.load_image_tokenizer(w)
    assert stage["uvit"]["codebook_size"] == tok.codebook_size, (stage["uvit"]["codebook_size"], tok.codebook_size)
    assert stage["image_size"] == image_size == stage["base"]["grid_size"] * tok.factor, (stage, image_size)
    return w


def finetune_config(args, train_dir: pathlib.Path, image_size: int, extra=()):
    name = "amused_256_lora" if args.lora else "amused_256_finetune"
    overrides = ["--config.data.source=folder", f"--config.data.train_files={train_dir}",
                 f"--config.data.image_size={image_size}", f"--config.train.batch_size={args.batch}",
                 f"--config.train.num_steps={args.steps}", f"--config.train.lr={args.lr}",
                 f"--config.train.warmup_steps={args.warmup}", f"--config.train.end_lr_fraction={args.end_lr}",
                 f"--config.train.log_every={max(1, args.steps // 10)}",
                 f"--config.train.checkpoint_every={args.steps}",
                 f"--config.train.matmul_precision={common.jax_matmul_precision(args.matmul)}"]
    if args.lora:
        overrides.append(f"--config.lora.rank={args.lora_rank}")
    return config_lib.load_config(name, [*overrides, *extra])


def score(images, captions) -> dict:
    """Alignment of images (upsampled to the detector's 64 px) with their captions: count, color, shape, all."""
    images = np.asarray(images)
    r = alignment.alignment_report(image_ops.upsample_nearest(images, shapes.IMAGE_SIZE // images.shape[1]), captions)
    one = [r["groups"][g] for g in ("one_seen", "one_heldout") if g in r["groups"]]
    return dict({a: r["attributes"].get(a) for a in ATTRIBUTES[:-1]}, all=r["all"],
                one_object_all=sum(g["all"] * g["num"] for g in one) / max(1, sum(g["num"] for g in one)))


def sample(args, w: pathlib.Path, captions) -> np.ndarray:
    overrides = {} if args.guidance is None else {"guidance": args.guidance}
    if args.scheduler == "muse":
        overrides.update(scheduler="muse", strength=0.0, choice_temperature=4.5)
    pipe = cascade.Pipeline.from_workdir(w, batch_size=args.sample_batch,
                                         matmul_precision=common.jax_matmul_precision(args.matmul), **overrides)
    return np.asarray(pipe.generate(captions, seed=args.seed))


def _sizes(text: str) -> dict[str, int]:
    pairs = [kv.split("=") for kv in text.split(",") if kv]
    if any(len(kv) != 2 or kv[0] not in fixture.TINY for kv in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=INT,... with keys of {sorted(fixture.TINY)}, got {text!r}")
    return {k: int(v) for k, v in pairs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="--config.FIELD=VALUE arguments override the fine-tuning config")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="the random UVit2D and CLIP text sizes")
    p.add_argument("--sizes", type=_sizes, default={}, metavar="KEY=INT,...",
                   help="override the preset's sizes (tests/_amused_fixture.py's keys), e.g. layers=2,res_blocks=2")
    p.add_argument("--downsample", choices=["auto", "on", "off"], default="auto",
                   help="the transformer on the token grid halved by a stride-2 convolution (auto: for 16x16 or more)")
    p.add_argument("--tokenizer-from", help="a workdir whose W/tokenizer is a shapes VQGAN (else one is trained)")
    p.add_argument("--tokenizer-steps", type=int, default=1200, help="its training steps (shapes' default: 1200)")
    p.add_argument("--tokenizer-eval-images", type=int, default=300, help="test images it is evaluated on (PSNR)")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels of the fine-tune and samples (default: the VQGAN's training size, 64; 32 = the "
                        "shapes base stage's, 8x8 tokens); scored upsampled to 64")
    p.add_argument("--num-train", type=int, default=4000, help="train images exported for the fine-tune")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--end-lr", type=float, default=1.0, help="cosine decay to lr * this (1: constant, the recipe's)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (amused_256_lora)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--eval", type=int, default=64, help="test captions sampled and scored")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--guidance", type=float, default=None, help="sampling guidance (default: W's, aMUSEd's 9)")
    p.add_argument("--scheduler", choices=["amused", "muse"], default="amused",
                   help="sampling: aMUSEd's scheduler (W's default), or Muse's (choice temperature 4.5)")
    p.add_argument("--matmul", choices=common.MATMULS, default=None,
                   help="float32: float32 multiplies; default: the project's (bfloat16 on AMX CPUs)")
    p.add_argument("--seed", type=int, default=0, help="the random pipeline's and the sampling seed")
    p.add_argument("--keep", help="keep the scratch workdirs in this folder (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    args, extra = p.parse_known_args(argv)
    if any(not a.startswith("--config.") for a in extra):
        p.error(f"unrecognized arguments: {' '.join(a for a in extra if not a.startswith('--config.'))}")
    command = "python benchmarks/finetune_shapes.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = pathlib.Path(args.keep or tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        with phase("tokenizer"):
            ws, tok_eval = shapes_tokenizer(args, scratch)
        image_size = args.image_size or int(workdir_lib.tokenizer_meta(ws)["image_size"])
        with phase("random pipeline, import-amused"):
            w = amused_workdir(args, ws, scratch, image_size)
        with phase("export"):
            export.export_shapes(scratch / "train", args.num_train, "train")

        with phase("untouched W: sampling and scoring"):
            examples = [shapes.make_example(0, "test", i) for i in range(args.eval)]
            captions = [e["caption"] for e in examples]
            vq = workdir_lib.load_image_tokenizer(w)
            real = image_ops.downsample_area(np.stack([e["image"] for e in examples]), shapes.IMAGE_SIZE // image_size)
            recon = np.asarray(vq.decode(vq.encode(real)))
            rows = [dict(images="test images through the VQGAN", **score(recon, captions))]
            before = sample(args, w, captions)
            rows.append(dict(images="untouched W", step=0, **score(before, captions)))

        with phase("fine-tune"):
            t0 = time.perf_counter()
            r = loop.train_stage(finetune_config(args, scratch / "train", image_size, extra), w, "base", quiet=True)
            minutes = (time.perf_counter() - t0) / 60
        losses = [r["losses"][s] for s in sorted(r["losses"])]
        tenth = max(1, len(losses) // 10)
        with phase("fine-tuned W: sampling and scoring"):
            after = sample(args, w, captions)
            rows.append(dict(images=f"fine-tuned W{' (LoRA)' if args.lora else ''}", step=r["final_step"],
                             minutes=minutes, loss_first=float(np.mean(losses[:tenth])),
                             loss_last=float(np.mean(losses[-tenth:])), **score(after, captions)))
        if args.keep:
            import PIL.Image

            grid = np.concatenate([real[:16], recon[:16], before[:16], after[:16]])
            PIL.Image.fromarray(image_ops.image_grid(grid, cols=16, scale=2)).save(scratch / "samples.png")

    info = dict(command=command, size=args.size, params=int(r["params"]), s_per_step=r["seconds_per_step"],
                batch=args.batch, lr=args.lr, eval=args.eval, tokenizer_psnr=tok_eval.get("psnr"),
                tokenizer_minutes=None if tok_eval["seconds"] is None else tok_eval["seconds"] / 60)
    if args.json:
        common.emit([dict(row, **info) for row in rows], True)
        return
    print(markdown(rows, COLUMNS))
    print(f"\n{args.eval} test captions; fine-tune: {args.size} UVit2D ({info['params']:,} trained parameters), "
          f"batch {args.batch}, lr {args.lr:g}, {info['s_per_step']:.3f} s/step; tokenizer: PSNR "
          f"{common._fmt(info['tokenizer_psnr'], '.2f')} dB"
          + ("" if info["tokenizer_minutes"] is None else f", trained here in {info['tokenizer_minutes']:.1f} min"))
    print(f"command: {command}")


if __name__ == "__main__":
    main()
