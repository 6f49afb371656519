"""Image tokens of a whole split, computed once with a trained tokenizer and kept in one npz.

    cache = build_or_load(W/cache, "train", source, tokenizer, stamp)
    cache["hi"]   int16 [N, H/f, W/f]   tokens of the full-size images (the super-res stage's)
    cache["lo"]   int16 [N, H/2f, W/2f] tokens of the images area-downsampled by 2 (the base stage's)
    cache["captions"]                   the captions, in index order

`stamp` (any JSON value: the data config, the tokenizer's identity) is stored with the tokens;
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


def build_or_load(cache_dir, split: str, source, tokenizer, stamp, batch_size: int = 250, progress=None) -> dict:
    """Tokens of every `split` image (full size -> hi, area-downsampled by 2 -> lo) and captions."""
    cache_dir = paths.as_path(cache_dir)
    path, cap_path = cache_dir / f"tokens_{split}.npz", cache_dir / f"captions_{split}.json"
    stamp = {"num": len(source), **stamp}
    if path.is_file() and cap_path.is_file():
        with path.open("rb") as f, np.load(f) as z:
            if json.loads(str(z["stamp"])) == stamp:
                return {"hi": z["hi"], "lo": z["lo"], "captions": json.loads(cap_path.read_text())}
    loader = loader_lib.make_loader(source, batch_size=batch_size, shuffle=False, num_epochs=1,
                                    shard_options=grain.NoSharding(), drop_remainder=False)
    n = len(source)
    hi, lo, captions = [], [], [None] * n
    t0 = time.time()
    batches = loader if progress is None else progress(loader, total=-(-n // batch_size), desc=f"tokenizing {split}")
    for batch in batches:
        images = batch["image"]
        hi.append(np.asarray(tokenizer.encode(images)).astype(np.int16))
        lo.append(np.asarray(tokenizer.encode(image_ops.downsample_area(images, 2))).astype(np.int16))
        for i, c in zip(batch["index"], batch["caption"]):
            captions[int(i)] = str(c)
    hi, lo = np.concatenate(hi), np.concatenate(lo)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".tokens_{split}.tmp-{jax.process_index()}.npz"  # processes may share a bucket
    with tmp.open("wb") as f:
        np.savez(f, hi=hi, lo=lo, stamp=json.dumps(stamp))
    tmp.replace(path)
    cap_path.write_text(json.dumps(captions))
    log.info("token cache %s: %d images in %.1fs", path, n, time.time() - t0)
    return {"hi": hi, "lo": lo, "captions": captions}
