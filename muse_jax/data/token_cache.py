"""Image tokens of a whole split, computed once with the stages' tokenizers and kept in one npz.

    cache = build_or_load(W/cache, "train", source, {"base": (tok_b, 32), "superres": (tok_s, 64)}, stamp)
    cache["base"]      int16 [N, h, w]  the base stage's tokens: its tokenizer on the images
                                        area-downsampled to its pixel size
    cache["superres"]  int16 [N, H, W]  the super-res stage's tokens, likewise
    cache["captions"]                   the captions, in index order

`stamp` (any JSON value: the data config, the tokenizers' identities) is stored with the tokens;
a cache whose stamp differs is rebuilt. Fits in memory for the shapes default only.
"""
from __future__ import annotations

import json
import logging
import time

import grain.python as grain
import jax
import numpy as np

from muse_jax import image_ops, paths
from muse_jax.data import loader as loader_lib

log = logging.getLogger(__name__)


def build_or_load(cache_dir, split: str, source, encoders: dict, stamp, batch_size: int = 250,
                  progress=None) -> dict:
    """Tokens of every `split` image for each stage of `encoders` ({stage: (tokenizer, pixel size)}:
    the images area-downsampled to that size, then encoded) and the captions."""
    cache_dir = paths.as_path(cache_dir)
    path, cap_path = cache_dir / f"tokens_{split}.npz", cache_dir / f"captions_{split}.json"
    stamp = {"num": len(source), "sizes": {s: int(px) for s, (_, px) in encoders.items()}, **stamp}
    if path.is_file() and cap_path.is_file():
        with path.open("rb") as f, np.load(f) as z:
            if json.loads(str(z["stamp"])) == stamp:
                return {**{s: z[s] for s in encoders}, "captions": json.loads(cap_path.read_text())}
    loader = loader_lib.make_loader(source, batch_size=batch_size, shuffle=False, num_epochs=1,
                                    shard_options=grain.NoSharding(), drop_remainder=False)
    n = len(source)
    tokens, captions = {s: [] for s in encoders}, [None] * n
    t0 = time.time()
    batches = loader if progress is None else progress(loader, total=-(-n // batch_size), desc=f"tokenizing {split}")
    for batch in batches:
        images = batch["image"]
        for stage, (tokenizer, px) in encoders.items():
            if images.shape[1] % px:
                raise ValueError(f"the {stage} stage's {px} px do not divide the {images.shape[1]} px images")
            small = image_ops.downsample_area(images, images.shape[1] // px) if images.shape[1] != px else images
            tokens[stage].append(np.asarray(tokenizer.encode(small)).astype(np.int16))
        for i, c in zip(batch["index"], batch["caption"]):
            captions[int(i)] = str(c)
    tokens = {s: np.concatenate(t) for s, t in tokens.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tokens_{split}.tmp-{jax.process_index()}.npz"  # processes may share a bucket
    with tmp.open("wb") as f:
        np.savez(f, **tokens, stamp=json.dumps(stamp))
    tmp.replace(path)
    cap_path.write_text(json.dumps(captions))
    log.info("token cache %s: %d images in %.1fs", path, n, time.time() - t0)
    return {**tokens, "captions": captions}
