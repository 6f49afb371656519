"""`muse-jax eval`: score a trained workdir (text alignment, FID, tokenizer, sweeps).

Writes into OUT:
  eval.json                the main evaluation at the given decoding settings
  samples.png              the generated images, one row per prompt group
  sweep_steps.{json,png}   quality and time per image against decoding steps (with --sweep)
  sweep_guidance.{json,png} ... against the guidance scale (with --sweep)
  curve.{json,png}         text alignment at evenly spaced checkpoints of training (with --curve-points)
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image

from muse_jax import image_ops
from muse_jax import workdir as workdir_lib
from muse_jax.data import shapes
from muse_jax.evaluation import alignment, scores, sweep
from muse_jax.evaluation import tokenizer as tokenizer_eval

GROUPS = ("one_seen", "one_heldout", "relation", "places")


def _load_inception(path: str | None):
    if not path:
        return None
    from muse_jax.evaluation import inception

    return inception.load_inception(path)


def generate_images(pipe, prompts: Sequence[str], seed: int, overrides: dict) -> tuple[np.ndarray, float]:
    """(images, seconds per image) of the prompts in batches of the pipeline's batch size, each
    batch generated with `seed` (the zero-shot evaluation draws one seed per batch instead)."""
    return scores.timed_generation(lambda ps: scores.generate_batch(pipe, ps, seed=seed, overrides=overrides),
                                   prompts, pipe.options.batch_size)


def _generate_and_score(pipe, prompts: Sequence[str], cache_dir: str, seed: int, overrides: dict,
                        inception_variables=None) -> tuple[np.ndarray, dict[str, Any]]:
    images, sec = generate_images(pipe, prompts, seed, overrides)
    result = scores.evaluate_images(images, prompts, cache_dir=cache_dir, seed=0,
                                    inception_variables=inception_variables)
    result["sec_per_image"] = sec
    result["settings"] = {k: v for k, v in overrides.items() if v is not None}
    return images, result


def stage_breakdown(pipe, num: int, seed: int = 0, overrides: dict | None = None,
                    objects: int = 1) -> dict[str, Any]:
    """Where the cascade loses text alignment, on the first `num` test images (and captions) of
    `objects` objects (1: one-object scenes; 2: relation and places scenes).

    Rows (each an `alignment.alignment_report` without groups): the real images; the tokenizer's
    reconstructions at full and at base resolution; the super-res stage given the real images' base
    tokens; the base stage's own samples; the whole cascade. Base-resolution images are judged
    upsampled by pixel repetition to the full size.
    """
    if num < 1:
        raise ValueError(f"the stage-by-stage evaluation needs at least one image, got num={num}")
    if objects not in (1, 2):
        raise ValueError(f"shapes scenes hold 1 or 2 objects, got objects={objects}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    images, captions = [], []
    for index in range(100 * num):
        if len(images) == num:
            break
        ex = shapes.make_example(seed, "test", index)
        if (alignment.parse_caption(ex["caption"])["kind"] == "one") == (objects == 1):
            images.append(ex["image"])
            captions.append(ex["caption"])
    images = np.stack(images)
    if images.shape[1] != pipe.image_size:
        raise ValueError(f"the shapes images are {images.shape[1]} px, this pipeline makes {pipe.image_size} px")
    r = pipe.image_size // pipe.base_image_size
    up = lambda x: image_ops.upsample_nearest(x, r)  # noqa: E731
    true_base = pipe.encode_images(images, "base")
    rows = {"real images": images,
            "tokenizer, full size": pipe.decode_tokens(pipe.encode_images(images)),
            "tokenizer, base size": up(pipe.decode_tokens(true_base, "base"))}
    if pipe.superres is not None:
        rows["super-res from the real base tokens"] = pipe.decode_tokens(
            pipe.superres_tokens(true_base, captions, seed=seed, **overrides), "superres")
    base, sr = pipe.generate_tokens(captions, seed=seed, **overrides)
    rows["base stage samples"] = up(pipe.decode_tokens(base, "base"))
    if sr is not None:
        rows["whole cascade"] = pipe.decode_tokens(sr, "superres")
    out = {}
    for name, imgs in rows.items():
        rep = alignment.alignment_report(imgs, captions)
        out[name] = {"num": rep["num"], "all": rep["all"], "attributes": rep["attributes"]}
    return out


def curve_steps(workdir, points: int) -> list[dict[str, int]]:
    """The checkpoints of a training curve: {stage: step} at 1/points, 2/points, ... 1 of each trained
    stage's schedule (config.train.num_steps); they must have been kept (config.train.keep_every)."""
    if points < 1:
        raise ValueError(f"a training curve needs at least one point, got points={points}")
    schedules = {s: (int(workdir_lib.load_stage_config(workdir, s).train.num_steps), workdir_lib.checkpoint_steps(workdir, s))
                 for s in ("base", "superres") if workdir_lib.checkpoint_dir(workdir, s).is_dir()}
    rows = []
    for k in range(1, points + 1):
        row = {}
        for stage, (total, kept) in schedules.items():
            step = round(total * k / points)
            if step not in kept:
                raise FileNotFoundError(
                    f"training curve: {stage} has no checkpoint of step {step} ({k}/{points} of {total} steps; kept: "
                    f"{kept}); set config.train.keep_every (and checkpoint_every) to divide {step}")
            row[stage] = step
        rows.append(row)
    return rows


def training_curve(workdir, out_dir, points: int, *, num_prompts: int = 200, seed: int = 0,
                   overrides: dict | None = None, say=print) -> dict[str, Any]:
    """Text alignment of the cascade at `points` evenly spaced checkpoints of training (`curve_steps`),
    on the same prompts and decoding settings at each; writes OUT/curve.{json,png}."""
    from muse_jax.cascade import Pipeline

    prompts = alignment.eval_prompts(num_prompts, seed=seed)
    rows = []
    for steps in curve_steps(workdir, points):
        pipe = Pipeline.from_workdir(workdir, steps=steps)
        images, _ = generate_images(pipe, prompts, seed, overrides or {})
        align = alignment.alignment_report(images, prompts)
        rows.append({"steps": steps, "all": align["all"],
                     "groups": {g: align["groups"][g]["all"] for g in GROUPS if g in align["groups"]},
                     "attributes": {g: align["groups"][g]["attributes"] for g in GROUPS if g in align["groups"]}})
        say(f"  curve {steps}: all {align['all']:.1%}; " + ", ".join(f"{g} {v:.1%}" for g, v in rows[-1]["groups"].items()))
    out_dir = pathlib.Path(out_dir)
    scores.write_json({"results": rows}, str(out_dir / "curve.json"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["steps"]["base"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for g in GROUPS:
        ax.plot(x, [r["groups"].get(g, float("nan")) for r in rows], marker="o", label=g)
    ax.plot(x, [r["all"] for r in rows], marker="s", color="black", label="all")
    ax.set_xticks(x, [f"{r['steps']['base']}\n" + (f"sr {r['steps']['superres']}" if "superres" in r["steps"] else "")
                      for r in rows])
    ax.set_xlabel("training steps (base; super-res)")
    ax.set_ylabel("text alignment (fully correct)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=100)
    plt.close(fig)
    return {"results": rows, "png": str(out_dir / "curve.png")}


def _samples_grid(images: np.ndarray, prompts: Sequence[str], path: pathlib.Path, per_group: int = 8) -> None:
    rows = []
    for g in GROUPS:
        idx = [i for i, p in enumerate(prompts) if alignment.prompt_group(p) == g][:per_group]
        if idx:
            rows.append(np.stack([images[i] for i in idx] + [np.full_like(images[0], 255)] * (per_group - len(idx))))
    PIL.Image.fromarray(image_ops.image_grid(np.concatenate(rows), cols=per_group, scale=2)).save(path)
    path.with_suffix(".txt").write_text("".join(
        f"{g}: " + " | ".join([p for p in prompts if alignment.prompt_group(p) == g][:per_group]) + "\n"
        for g in GROUPS))


def run(workdir, out_dir, *, num_prompts: int = 200, seed: int = 0, steps: int | None = None,
        sr_steps: int | None = None, guidance: float | None = None, sweep_steps: Sequence[int] = (),
        sweep_guidance: Sequence[float] = (), sweep_prompts: int = 64, num_tokenizer_images: int = 500,
        num_detector_images: int = 500, num_stage_images: int = 0, curve_points: int = 0,
        inception_path: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Evaluates workdir W at its default decoding settings (or the ones given); returns the report."""
    from muse_jax.cascade import Pipeline

    if num_stage_images < 0:
        raise ValueError(f"num_stage_images must be >= 0 (0: skip), got {num_stage_images}")
    workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    config = workdir_lib.load_run_config(workdir)
    inception_variables = _load_inception(inception_path)
    cache_dir = str(workdir / "eval_cache")

    t0 = time.time()
    say("validating the shapes detector on real test images ...")
    detector = scores.validate_detector(num=num_detector_images, seed=0, split="test")
    say("evaluating the tokenizer ...")
    tokenizer = tokenizer_eval.evaluate(workdir, config, num_tokenizer_images, inception_variables)
    say(f"  psnr {tokenizer['psnr']:.2f} dB (base stage at {tokenizer['base_image_size']} px: "
        f"{tokenizer['psnr_lowres']:.2f} dB), ssim {tokenizer['ssim']:.4f}, "
        f"codebook usage {tokenizer['codebook']['fraction_used']:.1%}")
    for size, kept in tokenizer.get("alignment", {}).items():
        say(f"  scenes kept fully right at {size}: " + ", ".join(f"{k} {v['all']:.1%}" for k, v in kept.items()))

    pipe = Pipeline.from_workdir(workdir)
    overrides = {"steps": steps, "sr_steps": sr_steps, "guidance": guidance}
    prompts = alignment.eval_prompts(num_prompts, seed=seed)
    say(f"generating {len(prompts)} images for the alignment evaluation ...")
    images, main = _generate_and_score(pipe, prompts, cache_dir, seed, overrides, inception_variables)
    _samples_grid(images, prompts, out_dir / "samples.png")
    align = main["alignment"]
    say(f"  fully correct: all {align['all']:.1%}; " + ", ".join(
        f"{g} {align['groups'][g]['all']:.1%}" for g in GROUPS if g in align["groups"]))

    stages = {}
    if num_stage_images:
        for objects, name in ((1, "one object"), (2, "two objects")):
            say(f"scoring each stage on {num_stage_images} test captions of {name} ...")
            stages[name] = stage_breakdown(pipe, num_stage_images, seed, overrides, objects=objects)
            say("  " + ", ".join(f"{k} {v['all']:.0%}" for k, v in stages[name].items()))

    sweeps = {}
    for name, values in (("steps", sweep_steps), ("guidance", sweep_guidance)):
        if not values:
            continue
        rows = []
        sp = alignment.eval_prompts(sweep_prompts, seed=seed + 1)
        for v in values:
            ov = dict(overrides, **({"steps": int(v)} if name == "steps" else {"guidance": float(v)}))
            _, r = _generate_and_score(pipe, sp, cache_dir, seed, ov)
            opts = pipe._options(ov)
            rows.append({"steps": opts.steps, "guidance": opts.guidance, "accuracy": r["alignment"]["all"],
                         "fid": r["fid_shapes"], "sec_per_image": r["sec_per_image"]})
            say(f"  sweep {name}={v}: accuracy {rows[-1]['accuracy']:.1%}, fid {rows[-1]['fid']:.2f}, "
                f"{rows[-1]['sec_per_image'] * 1000:.1f} ms/image")
        json_path, png_path = sweep.write_sweep(rows, str(out_dir), f"sweep_{name}", x=name)
        sweeps[name] = {"results": rows, "json": json_path, "png": png_path}

    curve = None
    if curve_points:
        say(f"text alignment at {curve_points} checkpoints of training ...")
        curve = training_curve(workdir, out_dir, curve_points, num_prompts=num_prompts, seed=seed,
                               overrides=overrides, say=say)

    result = {"workdir": str(workdir), "detector_accuracy": detector, "tokenizer": tokenizer,
              "generation": main, "stages": stages, "sweeps": sweeps, "curve": curve, "seconds": time.time() - t0}
    scores.write_json(result, str(out_dir / "eval.json"))
    say(f"wrote {out_dir / 'eval.json'} ({result['seconds']:.0f}s)")
    return result
