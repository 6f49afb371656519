"""`muse-jax quickstart`: the whole pipeline on the embedded shapes default.

Stages run in order and each one is skipped when its output is already in the workdir,
so re-running with the same workdir resumes. Workdir layout:
  W/config.json          the resolved config
  W/data/                the tfds shapes dataset (array_record)
  W/samples/             sample grids
"""
from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import PIL.Image

from muse_jax import config as config_lib
from muse_jax.data import export, pipeline


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.time()


def dataset_grid(cfg, workdir: pathlib.Path, num: int = 32) -> pathlib.Path:
    """A grid of the first `num` training examples, with their captions beside it."""
    source = pipeline.make_source(cfg.data, "train", workdir / "data")
    exs = [pipeline.Canonicalize().map(source[i]) for i in range(min(num, len(source)))]
    out = workdir / "samples" / "dataset_grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(export.image_grid(np.stack([e["image"] for e in exs]), scale=2)).save(out)
    (out.parent / "dataset_grid.txt").write_text(
        "".join(f"{i:2d}: {e['caption']}\n" for i, e in enumerate(exs))
    )
    return out


def run(workdir: str, config_spec: str = "shapes", overrides=()) -> None:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = config_lib.load_config(config_spec, overrides)
    config_lib.save_config(cfg, workdir / "config.json")

    t = _stage(f"dataset: shapes, {cfg.data.num_train} train / {cfg.data.num_test} test")
    for split in ("train", "test"):
        pipeline.make_source(cfg.data, split, workdir / "data")
    grid = dataset_grid(cfg, workdir)
    print(f"dataset ready in {time.time() - t:.1f}s; sample grid: {grid}")
    print(json.dumps({"workdir": str(workdir), "dataset_grid": str(grid)}))
