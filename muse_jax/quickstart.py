"""`muse-jax quickstart`: the whole Muse pipeline on the embedded shapes default.

Stages run in order (dataset, tokenizer, text encoder + transformers, a sample grid, the
evaluation and W/report.md); each resumes from what the workdir already holds, so re-running
with the same workdir continues instead of starting over. The workdir layout: muse_jax/workdir.py.
"""
from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import PIL.Image

from muse_jax import config as config_lib
from muse_jax import image_ops
from muse_jax import workdir as workdir_lib
from muse_jax.data import sources

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
    source = sources.make_source(cfg.data, "train", workdir_lib.data_dir(workdir))
    exs = [source[i] for i in range(min(num, len(source)))]
    out = workdir / "samples" / "dataset_grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(image_ops.image_grid(np.stack([e["image"] for e in exs]), scale=2)).save(out)
    (out.parent / "dataset_grid.txt").write_text("".join(f"{i:2d}: {e['caption']}\n" for i, e in enumerate(exs)))
    return out


def sample_grid(workdir: pathlib.Path, num_per_prompt: int = 4, seed: int = 0) -> pathlib.Path:
    """Samples `num_per_prompt` images for each of `PROMPTS`: one row per prompt."""
    from muse_jax.cascade import Pipeline

    pipe = Pipeline.from_workdir(workdir)
    images = pipe.generate(list(PROMPTS), num_per_prompt=num_per_prompt, seed=seed)
    out = workdir / "samples" / "prompts_grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(image_ops.image_grid(images, cols=num_per_prompt, scale=2)).save(out)
    out.with_suffix(".txt").write_text("".join(f"row {i}: {p}\n" for i, p in enumerate(PROMPTS)))
    return out


def _up_to_date(stamp_path: pathlib.Path, stamp: dict, *outputs: pathlib.Path) -> bool:
    """True when `outputs` exist and were made from the same `stamp` (trained steps, settings)."""
    if not all(p.is_file() for p in outputs) or not stamp_path.is_file():
        return False
    try:
        return json.loads(stamp_path.read_text()) == json.loads(json.dumps(stamp))  # tuples read back as lists
    except json.JSONDecodeError:
        return False


def _preempted(workdir: pathlib.Path) -> None:
    print(f"\nstopped on SIGTERM or Ctrl-C with every checkpoint saved; the same command resumes (--workdir {workdir})", flush=True)


def run(workdir: str, config_spec: str = "shapes", overrides=()) -> pathlib.Path | None:
    """Runs (or resumes) every stage; returns the path of the report, or None when SIGTERM stopped a
    training stage (its checkpoint is saved and no later stage starts; running again resumes)."""
    from muse_jax.evaluation import report
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
        sources.make_source(cfg.data, split, workdir_lib.data_dir(workdir))
    print(f"sample grid of the dataset: {dataset_grid(cfg, workdir)}")
    timings["dataset"] = time.time() - t

    names = sorted({workdir_lib.stage_tokenizer(cfg, s) for s in config_lib.STAGES})  # "": one shared
    t = _stage(f"2/5 image tokenizer{'s' if len(names) > 1 else ''} (VQGAN): {', '.join(n or 'shared' for n in names)}")
    for name in names:
        tok = train_tokenizer.train(cfg, workdir, name=name)
        if tok["status"] == "preempted":
            return _preempted(workdir)
        print(f"tokenizer {name or '(shared)'}: psnr {tok['psnr']:.2f} dB (half size: {tok['psnr_lowres']:.2f} dB), "
              f"codebook usage {tok['usage']:.1%}")
    timings["tokenizer"] = time.time() - t

    t = _stage("3/5 text encoder + base and super-resolution transformers")
    if any(r["status"] == "preempted" for r in loop.train(cfg, workdir)):
        return _preempted(workdir)
    timings["transformers"] = time.time() - t

    # The grid and the evaluation are redone only when a stage trained further or their settings changed.
    made = [f"tokenizer/{n}" if n else "tokenizer" for n in names] + list(config_lib.STAGES)
    trained = {stage: workdir_lib.checkpoint_steps(workdir, stage)[-1:] for stage in made}
    t = _stage("4/5 sampling the prompt grid")
    grid, stamp = workdir / "samples" / "prompts_grid.png", {"trained": trained, "sample": cfg.sample.to_dict()}
    if _up_to_date(grid.with_suffix(".stamp.json"), stamp, grid):
        print(f"samples: {grid} (up to date)")
    else:
        print(f"samples: {sample_grid(workdir)}")
        grid.with_suffix(".stamp.json").write_text(json.dumps(stamp))
    timings["sampling"] = time.time() - t

    t = _stage("5/5 evaluation")
    q = cfg.quickstart
    ev_path, stamp = workdir / "eval" / "eval.json", {**stamp, "quickstart": q.to_dict()}
    if _up_to_date(ev_path.with_suffix(".stamp.json"), stamp, ev_path):
        print(f"evaluation: {ev_path} (up to date)")
        ev = json.loads(ev_path.read_text())
    else:
        ev = eval_run.run(workdir, workdir / "eval", num_prompts=q.eval_prompts, sweep_steps=tuple(q.sweep_steps),
                          sweep_guidance=tuple(q.sweep_guidance), sweep_prompts=q.sweep_prompts,
                          num_tokenizer_images=q.tokenizer_images, num_detector_images=q.detector_images,
                          num_stage_images=q.get("stage_images", 0), curve_points=q.get("curve_points", 0))
        ev_path.with_suffix(".stamp.json").write_text(json.dumps(stamp))
    timings["evaluation"] = time.time() - t
    timings["total"] = time.time() - t_all
    path = report.write_report(workdir, cfg, ev, timings)
    print(f"\nreport: {path} (total {timings['total'] / 60:.1f} min)")
    return path
