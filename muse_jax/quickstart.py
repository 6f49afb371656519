"""`muse-jax quickstart`: the whole Muse pipeline on the embedded shapes default.

Stages run in order; each resumes from what the workdir already holds, so re-running with
the same workdir continues instead of starting over. Workdir layout:
  W/config.json        the resolved config (sample/edit/eval read it)
  W/data/              the tfds shapes dataset (array_record)
  W/tokenizer/         the VQGAN image tokenizer (config + Orbax checkpoints)
  W/text/spm.model     the sentencepiece vocabulary trained on the captions
  W/cache/             image tokens of the training set (computed once)
  W/base/, W/superres/ the masked transformers (Orbax checkpoints, TensorBoard logs)
  W/samples/           sample grids
  W/eval/              eval.json, samples.png, sweep plots
  W/report.md          the report: samples, metrics, and the commands to go further
"""
from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import PIL.Image

from muse_jax import config as config_lib
from muse_jax.data import export, pipeline

# Fixed prompts of the sample grid: seen pairs, held-out pairs, relations, places.
PROMPTS = (
    "a large red circle in the center on a black background",
    "a small blue square in the top left on a white background",
    "a large green triangle at the bottom on a gray background",
    "a small pink cross on the right on a black background",
    "a large purple triangle in the center on a white background",
    "a small cyan circle in the bottom right on a gray background",
    "a yellow circle to the left of a blue square on a black background",
    "a red cross above a green circle on a white background",
    "an orange triangle in the top left and a pink square in the bottom right on a gray background",
)


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.time()


def dataset_grid(cfg, workdir: pathlib.Path, num: int = 32) -> pathlib.Path:
    """A grid of the first `num` training examples, with their captions beside it."""
    source = pipeline.make_source(cfg.data, "train", workdir / "data")
    exs = [pipeline.Canonicalize().map(source[i]) for i in range(min(num, len(source)))]
    out = workdir / "samples" / "dataset_grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(export.image_grid(np.stack([e["image"] for e in exs]), scale=2)).save(out)
    (out.parent / "dataset_grid.txt").write_text("".join(f"{i:2d}: {e['caption']}\n" for i, e in enumerate(exs)))
    return out


def sample_grid(workdir: pathlib.Path, num_per_prompt: int = 4, seed: int = 0) -> pathlib.Path:
    """Samples `num_per_prompt` images for each of `PROMPTS`: one row per prompt."""
    from muse_jax.pipeline import Pipeline

    pipe = Pipeline.from_workdir(workdir)
    images = pipe.generate(list(PROMPTS), num_per_prompt=num_per_prompt, seed=seed)
    out = workdir / "samples" / "prompts_grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(export.image_grid(images, cols=num_per_prompt, scale=2)).save(out)
    out.with_suffix(".txt").write_text("".join(f"row {i}: {p}\n" for i, p in enumerate(PROMPTS)))
    return out


def _pct(x) -> str:
    return f"{100 * x:.1f} %"


def _stage_lines(stages: dict | None) -> list[str]:
    """Markdown: the stage-by-stage tables (`evaluation.run.stage_breakdown`), if they were run."""
    if not stages:
        return []
    lines = [
        "### Stage by stage", "",
        "Where the cascade loses what the caption says: real images, the tokenizer alone, the super-res "
        "stage given the real images' base tokens, the base stage alone (upsampled), the whole cascade. "
        "A stage's row bounds what the stages after it can reach.", "",
    ]
    for kind, rows in stages.items():
        first = next(iter(rows.values()))
        attrs = sorted(first["attributes"])
        lines += [
            f"{first['num']} test captions of {kind}:", "",
            "| images | fully correct | " + " | ".join(attrs) + " |", "|---|---|" + "---|" * len(attrs),
            *[f"| {name} | {_pct(r['all'])} | " + " | ".join(_pct(r["attributes"][k]) for k in attrs) + " |"
              for name, r in rows.items()], "",
        ]
    return lines


def write_report(workdir: pathlib.Path, cfg, ev: dict, timings: dict) -> pathlib.Path:
    """W/report.md: the sample grids, the metrics, and the commands to sample and edit."""
    gen, tok = ev["generation"], ev["tokenizer"]
    align = gen["alignment"]
    lines = [
        "# muse_jax quickstart report", "",
        f"Workdir `{workdir}`; config `{cfg.get('name', 'shapes')}`; dataset {cfg.data.num_train} train / "
        f"{cfg.data.num_test} test images (shapes spec v1).", "",
        "## Samples", "",
        "One row per prompt (`samples/prompts_grid.txt` lists them):", "",
        "![samples](samples/prompts_grid.png)", "",
        "Evaluation prompts, one row per group (one object seen, held-out pair, relation, places):", "",
        "![eval samples](eval/samples.png)", "",
        "## Text alignment (fully correct: every stated attribute right)", "",
        "| group | prompts | fully correct | " + " | ".join(sorted(align["attributes"])) + " |",
        "|---|---|---|" + "---|" * len(align["attributes"]),
    ]
    for g, r in list(align["groups"].items()) + [("all", {"num": align["num"], **align})]:
        lines.append(f"| {g} | {r['num']} | {_pct(r['all'])} | " + " | ".join(
            _pct(r["attributes"][k]) if k in r["attributes"] else "-" for k in sorted(align["attributes"])) + " |")
    lines += [
        "", f"In-domain FID (shapes features) against 1000 test images: {gen['fid_shapes']:.2f}; "
        f"sampling {gen['sec_per_image'] * 1000:.0f} ms per image (after compilation).", "",
        *_stage_lines(ev.get("stages")),
        "## Tokenizer", "",
        f"PSNR {tok['psnr']:.2f} dB (at the base stage's 32 px: {tok.get('psnr_lowres', float('nan')):.2f} dB), "
        f"SSIM {tok['ssim']:.4f}, reconstruction FID (shapes features) "
        f"{tok['rfid_shapes']:.2f}, codebook usage {_pct(tok['codebook']['fraction_used'])} "
        f"(perplexity {tok['codebook']['perplexity']:.1f}) on {tok['num_images']} test images.", "",
        "## Time", "",
        "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()], "",
        "## Go further", "", "```bash",
        f'muse-jax sample --workdir {workdir} --prompt "a large blue circle in the center" --num 8 --out grid.png',
        f'muse-jax sample --workdir {workdir} --prompts-file prompts.txt --out-dir samples/',
        f'muse-jax edit --workdir {workdir} --image in.png --mask mask.png --prompt "a red square in the center" '
        "--out inpainted.png",
        f'muse-jax edit --workdir {workdir} --image in.png --prompt "a green cross on the left" --out edited.png',
        f"muse-jax eval --workdir {workdir} --out {workdir}/eval --sweep-steps 4,8,12,24 --sweep-guidance 0,1,3,5",
        "```", "",
    ]
    path = workdir / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(workdir: str, config_spec: str = "shapes", overrides=()) -> pathlib.Path:
    """Runs (or resumes) every stage; returns the path of the report."""
    from muse_jax.evaluation import run as eval_run
    from muse_jax.training import loop, train_tokenizer

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config_lib.load_config(config_spec, overrides)
    saved = workdir / "config.json"
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("data") != cfg.data.to_dict():
            raise ValueError(f"{workdir} was made with other data settings ({old.get('data')}); "
                             "use a fresh --workdir to change them")
    config_lib.save_config(cfg, saved)
    timings, t_all = {}, time.time()

    t = _stage(f"1/5 dataset: shapes, {cfg.data.num_train} train / {cfg.data.num_test} test images")
    for split in ("train", "test"):
        pipeline.make_source(cfg.data, split, workdir / "data")
    print(f"sample grid of the dataset: {dataset_grid(cfg, workdir)}")
    timings["dataset"] = time.time() - t

    t = _stage("2/5 image tokenizer (VQGAN)")
    tok = train_tokenizer.train(cfg, workdir)
    print(f"tokenizer: psnr {tok['psnr']:.2f} dB (32 px: {tok['psnr_lowres']:.2f} dB), codebook usage {tok['usage']:.1%}")
    timings["tokenizer"] = time.time() - t

    t = _stage("3/5 text encoder + base and super-resolution transformers")
    loop.train(cfg, workdir)
    timings["transformers"] = time.time() - t

    t = _stage("4/5 sampling the prompt grid")
    print(f"samples: {sample_grid(workdir)}")
    timings["sampling"] = time.time() - t

    t = _stage("5/5 evaluation")
    q = cfg.quickstart
    ev = eval_run.run(workdir, workdir / "eval", num_prompts=q.eval_prompts, sweep_steps=tuple(q.sweep_steps),
                      sweep_guidance=tuple(q.sweep_guidance), sweep_prompts=q.sweep_prompts,
                      num_tokenizer_images=q.tokenizer_images, num_detector_images=q.detector_images,
                      num_stage_images=q.get("stage_images", 0))
    timings["evaluation"] = time.time() - t
    timings["total"] = time.time() - t_all
    path = write_report(workdir, cfg, ev, timings)
    print(f"\nreport: {path} (total {timings['total'] / 60:.1f} min)")
    return path
