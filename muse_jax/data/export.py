"""Exports dataset examples as PNG files plus `captions.jsonl`."""
from __future__ import annotations

import json
import pathlib

import PIL.Image
import tqdm

from muse_jax.data import shapes


def export_shapes(out: str | pathlib.Path, num: int, split: str, seed: int = 0) -> pathlib.Path:
    """Writes examples 0..num-1 of `split` as `{index:06d}.png` and `captions.jsonl`.

    Each jsonl line holds file, caption, index and the scene's attributes.
    """
    if num <= 0:
        raise ValueError(f"--num must be positive, got {num}")
    shapes.pair_allowed("red", "circle", split)  # validates the split name
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions.jsonl", "w") as f:
        for index in tqdm.trange(num, desc=f"shapes {split}", unit="img", mininterval=1.0):
            ex = shapes.make_example(seed, split, index)
            name = f"{index:06d}.png"
            PIL.Image.fromarray(ex["image"]).save(out / name)
            record = {"file": name, "caption": ex["caption"], "index": index, "split": split,
                      "seed": seed, "attributes": json.loads(ex["attributes"])}
            f.write(json.dumps(record) + "\n")
    return out
