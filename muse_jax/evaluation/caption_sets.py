"""Caption sets and reference images for zero-shot evaluation (FID and CLIP score on captions).

A source is one of:
  FILE.txt                one caption per non-empty line, in file order
  FILE.jsonl              one JSON object per line with a "caption"
  DIR                     a folder dataset: DIR/captions.jsonl lines {"file": ..., "caption": ...}
                          (what `muse-jax data shapes --out DIR` writes); as a reference, its
                          images (or, without captions.jsonl, every image file of DIR)
  tfds:NAME[:SPLIT]       a prepared tfds dataset (array_record, read without TensorFlow) under
                          `data_dir`; SPLIT defaults to the first of val, validation, test, and
                          may be a union A+B+...: the examples of A, then those of B, ... (e.g.
                          tfds:coco_captions:val+test+restval, the 40,504 images of COCO-2014 val)
As in COCO-30K, captions of a tfds dataset are drawn with the seed: the images (of every split
named, in that order) in a seeded random order, and one of each image's captions (a
"captions/text" sequence, or a "caption") drawn at random. As a reference, a tfds source gives
every image of its splits.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import PIL.Image

from muse_jax import cascade

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_SPLITS = ("val", "validation", "test")


def describe(source: str) -> str:
    """The source as written in stamps and reports: local paths made absolute."""
    if source.startswith("tfds:"):
        return source
    return os.path.abspath(source)


def _parse_tfds(source: str) -> tuple[str, list[str] | None]:
    """(NAME, [SPLIT, ...] or None) of tfds:NAME[:SPLIT[+SPLIT...]]."""
    parts = source[len("tfds:"):].split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError(f"expected tfds:NAME, tfds:NAME:SPLIT or tfds:NAME:SPLIT+SPLIT..., got {source!r}")
    if len(parts) == 1:
        return parts[0], None
    splits = parts[1].split("+")
    if not all(splits) or len(set(splits)) != len(splits):
        raise ValueError(f"{source}: the splits of a union must be named once each, got {parts[1]!r}")
    return parts[0], splits


class _Concatenation:
    """The examples of several data sources, one after the other: indexable and sized like one."""

    def __init__(self, sources):
        self.sources = sources
        self.starts = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.sources[k][int(i - self.starts[k])]


def _tfds_source(source: str, data_dir: str | None, skip_images: bool):
    import tensorflow_datasets as tfds

    name, wanted = _parse_tfds(source)
    if data_dir is None:
        raise ValueError(f"{source}: give the folder of the prepared tfds dataset (--tfds-data-dir)")
    builder = tfds.builder(name, data_dir=data_dir)
    splits = list(builder.info.splits)
    if wanted is None:
        wanted = [next((s for s in DEFAULT_SPLITS if s in splits), None)]
        if wanted[0] is None:
            raise ValueError(f"{source}: no split given and none of {DEFAULT_SPLITS} exists (splits: {splits})")
    for split in wanted:
        if split not in splits:
            raise ValueError(f"{source}: no split {split!r} (splits: {splits})")
    decoders = None
    if skip_images and "image" in builder.info.features.keys():
        decoders = {"image": tfds.decode.SkipDecoding()}  # captions only: leave the images encoded
    sources = [tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
               for split in wanted]
    return sources[0] if len(sources) == 1 else _Concatenation(sources)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _example_captions(example: dict, source: str) -> list[str]:
    if "captions" in example:
        captions = example["captions"]
        captions = captions["text"] if isinstance(captions, dict) else captions
    elif "caption" in example:
        captions = [example["caption"]]
    else:
        raise ValueError(f"{source}: examples hold neither 'captions' nor 'caption' (keys: {sorted(example)})")
    captions = [_text(c).strip() for c in np.atleast_1d(np.asarray(captions, dtype=object))]
    return [c for c in captions if c]


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or "caption" not in record:
            raise ValueError(f"{path}:{n} has no \"caption\"")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no captions")
    return records


def read_prompts(source: str, num: int | None = None, seed: int = 0, data_dir: str | None = None) -> list[str]:
    """The first `num` captions of a source (all with None); see the module doc."""
    if num is not None and num < 1:
        raise ValueError(f"the number of prompts must be positive, got {num}")
    if source.startswith("tfds:"):
        ds = _tfds_source(source, data_dir, skip_images=True)
        rng = np.random.default_rng(seed)
        prompts = []
        for i in rng.permutation(len(ds)):  # the first k prompts do not depend on num
            if len(prompts) == num:
                break
            captions = _example_captions(ds[int(i)], source)
            if captions:  # an image without captions gives none (and draws nothing)
                prompts.append(captions[int(rng.integers(len(captions)))])
    else:
        path = pathlib.Path(source)
        if path.is_dir():
            path = path / "captions.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{source} is a folder without captions.jsonl")
        if path.suffix == ".jsonl":
            prompts = [str(r["caption"]).strip() for r in _read_jsonl(path)]
        else:
            prompts = cascade.read_prompts_file(path)
        prompts = prompts[:num]
    if num is not None and len(prompts) < num:
        raise ValueError(f"{source} holds {len(prompts)} captions, fewer than the {num} asked for")
    return prompts


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    captions = folder / "captions.jsonl"
    if captions.is_file():
        records = _read_jsonl(captions)
        if all("file" in r for r in records):
            return [folder / r["file"] for r in records]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def square_resize(image: PIL.Image.Image, size: int) -> np.ndarray:
    """An image centre-cropped to a square and resized (PIL bicubic, antialiased) -> uint8 [size, size, 3]."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if s != size:
        image = image.resize((size, size), PIL.Image.Resampling.BICUBIC)
    return np.asarray(image, np.uint8)


def reference_images(source: str, size: int, batch_size: int = 50,
                     data_dir: str | None = None) -> tuple[int, Iterator[np.ndarray]]:
    """(number of images, iterator over uint8 [B, size, size, 3] batches) of a folder or tfds source,
    each image centre-cropped and resized to `size` (the generated images' size)."""
    if source.startswith("tfds:"):
        ds = _tfds_source(source, data_dir, skip_images=False)
        count, load = len(ds), lambda i: PIL.Image.fromarray(np.asarray(ds[i]["image"]))
    else:
        folder = pathlib.Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"reference {source} is neither a folder, a tfds:NAME dataset nor an .npz")
        files = _folder_files(folder)
        count, load = len(files), lambda i: PIL.Image.open(files[i])

    def batches():
        for start in range(0, count, batch_size):
            yield np.stack([square_resize(load(i), size) for i in range(start, min(start + batch_size, count))])

    return count, batches()
