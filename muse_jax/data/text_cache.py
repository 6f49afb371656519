"""Text-embedding cache: a frozen encoder's outputs computed once per dataset, memory-mapped.

Training with a frozen T5 reads embeddings from here instead of running T5 every step.

Layout: `cache_dir/<key>/` with
  embeddings.npy  [N, L, D] float32 / float16, or bfloat16 stored as uint16 bits (np.load mmap)
  mask.npy        [N, L] bool (True = real token)
  meta.json       identity, captions digest, dtype, shape; written last, so a directory
                  without it is an interrupted build and is rebuilt.
`key` hashes the encoder identity (`encoder_identity`: encoder config + parameters +
sentencepiece model + max length), the captions and the storage dtype, so a changed encoder,
tokenizer or dataset never reuses stale embeddings; an unchanged one reuses them. Old keys
are left in place (delete `cache_dir` to reclaim space).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_DTYPES = ("float32", "float16", "bfloat16")


def _hash_params(h, params) -> None:
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())


def _config_json(config: Any) -> str:
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.dumps(config, sort_keys=True, default=str)


def encoder_identity(config: Any, params: Any, spm_model: Any, max_length: int) -> str:
    """sha256 hex of encoder config + parameters + sentencepiece model + max length.

    spm_model: the model's bytes, a path to the .model file, or a `TextTokenizer`.
    """
    if hasattr(spm_model, "model_proto"):
        spm_bytes = spm_model.model_proto
    elif isinstance(spm_model, bytes):
        spm_bytes = spm_model
    else:
        spm_bytes = pathlib.Path(spm_model).read_bytes()
    h = hashlib.sha256()
    h.update(b"config:" + _config_json(config).encode())
    h.update(b"|spm:" + hashlib.sha256(spm_bytes).hexdigest().encode())
    h.update(f"|max_length:{int(max_length)}|params:".encode())
    _hash_params(h, params)
    return h.hexdigest()


def _captions(captions_or_source) -> list[str]:
    """A list of captions from a sequence of str/bytes or a source of dicts with "caption"."""
    out = []
    for i in range(len(captions_or_source)):
        c = captions_or_source[i]
        if isinstance(c, dict):
            if "caption" not in c:
                raise ValueError(f"text cache: source item {i} has no 'caption' key (keys: {sorted(c)})")
            c = c["caption"]
        if isinstance(c, np.ndarray):
            c = c.item()
        if isinstance(c, bytes):
            c = c.decode("utf-8")
        if not isinstance(c, str):
            raise TypeError(f"text cache: caption {i} is {type(c).__name__}, expected str or bytes")
        out.append(c)
    return out


def captions_digest(captions: Sequence[str]) -> str:
    """sha256 hex of the captions, in order."""
    h = hashlib.sha256()
    for c in captions:
        b = c.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


@dataclasses.dataclass
class TextEmbeddingCache:
    """Cached embeddings [N, L, D] and mask [N, L] (memory-mapped), addressed by example index."""

    path: pathlib.Path
    embeddings: np.ndarray
    mask: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Example(s) `index` -> dict(text_embeddings [.., L, D], text_mask [.., L])."""
        return {"text_embeddings": np.asarray(self.embeddings[index]), "text_mask": np.asarray(self.mask[index])}


def load(path: str | os.PathLike) -> TextEmbeddingCache:
    """Opens a finished cache directory (memory-mapped)."""
    path = pathlib.Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"text cache {path} is incomplete or missing (no meta.json)")
    meta = json.loads(meta_file.read_text())
    emb = np.load(path / "embeddings.npy", mmap_mode="r")
    if meta["dtype"] == "bfloat16":
        import ml_dtypes

        emb = emb.view(ml_dtypes.bfloat16)
    mask = np.load(path / "mask.npy", mmap_mode="r")
    if list(emb.shape) != meta["shape"] or mask.shape != emb.shape[:2]:
        raise ValueError(f"text cache {path}: arrays {emb.shape}/{mask.shape} do not match meta {meta['shape']}")
    return TextEmbeddingCache(path, emb, mask, meta)


def build_or_load(
    cache_dir: str | os.PathLike,
    captions_or_source,
    encode_fn: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    identity: str,
    *,
    batch_size: int = 64,
    dtype: str = "float32",
) -> TextEmbeddingCache:
    """Loads the cache for (identity, captions, dtype), building it first if absent.

    captions_or_source: a sequence of captions (str/bytes) or a random-access source whose
    items are dicts with "caption". encode_fn: list of B captions -> (embeddings [B, L, D],
    mask [B, L]), e.g. `muse_jax.text.make_encode_fn(...)`. identity: `encoder_identity(...)`.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"text cache dtype {dtype!r}; expected one of {_DTYPES}")
    captions = _captions(captions_or_source)
    if not captions:
        raise ValueError("text cache: no captions")
    digest = captions_digest(captions)
    key = hashlib.sha256(f"{identity}|{digest}|{dtype}".encode()).hexdigest()[:24]
    final = pathlib.Path(cache_dir) / key
    if (final / "meta.json").is_file():
        cache = load(final)
        if cache.meta.get("identity") == identity and cache.meta.get("captions_digest") == digest:
            return cache
    if final.exists():
        shutil.rmtree(final)  # interrupted or inconsistent build

    tmp = pathlib.Path(cache_dir) / f"{key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    emb_file = mask_file = None
    n = len(captions)
    for start in range(0, n, batch_size):
        batch = captions[start:start + batch_size]
        emb, mask = encode_fn(batch)
        emb, mask = np.asarray(emb), np.asarray(mask, bool)
        if emb.ndim != 3 or emb.shape[0] != len(batch):
            raise ValueError(f"text cache: encode_fn returned embeddings {emb.shape} for {len(batch)} captions")
        if emb_file is None:
            _, length, width = emb.shape
            store = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
            emb_file = np.lib.format.open_memmap(tmp / "embeddings.npy", "w+", store, (n, length, width))
            mask_file = np.lib.format.open_memmap(tmp / "mask.npy", "w+", np.bool_, (n, length))
        stop = start + emb.shape[0]
        if emb.shape[1:] != emb_file.shape[1:] or mask.shape != (emb.shape[0], emb_file.shape[1]):
            raise ValueError(f"text cache: encode_fn returned {emb.shape}/{mask.shape}, expected "
                             f"[{emb.shape[0]}, {emb_file.shape[1]}, {emb_file.shape[2]}] and a matching mask")
        if dtype == "bfloat16":
            import ml_dtypes

            emb_file[start:stop] = emb.astype(ml_dtypes.bfloat16).view(np.uint16)
        else:
            emb_file[start:stop] = emb.astype(dtype)
        mask_file[start:stop] = mask
    emb_file.flush()
    mask_file.flush()
    del emb_file, mask_file
    meta = {"identity": identity, "captions_digest": digest, "dtype": dtype, "num": n,
            "shape": [n, *np.load(tmp / "embeddings.npy", mmap_mode="r").shape[1:]]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same key first
        shutil.rmtree(tmp, ignore_errors=True)
    return load(final)
