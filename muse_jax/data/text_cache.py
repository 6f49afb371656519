"""Text-embedding cache: a frozen encoder's outputs computed once per dataset, memory-mapped.

Training with a frozen T5 reads embeddings from here instead of running T5 every step. Each
process encodes and stores only its own shard of the captions: the records [start, stop) the
training loader gives it (`muse_jax/data/loader.py: process_shard`, contiguous ranges of
N // P captions; the last process also keeps the N % P the loader drops, so the shards of a job
cover every caption). Embeddings are stored unpadded, the valid tokens of one caption after
another, and read back padded to the encoder's length with zeros (and the mask) by index.

Layout: `cache_dir/<name>_<p>of<P>/` (name: the split) with
  embeddings.bin  [T, D] raw float32 / float16 / bfloat16, the T valid tokens of the shard (np.memmap)
  offsets.npy     [stop - start + 1] int64: caption i's tokens are rows offsets[i - start]:offsets[i - start + 1]
  meta.json       the stamp (encoder identity, captions digest, dtype, N, start, stop) and the shapes
The directory is built under a temporary name and renamed when complete, so an interrupted build
leaves nothing that is read. A stamp that differs from the request (another encoder, tokenizer,
caption list, dtype or process count) rebuilds the shard. `identity` is `encoder_identity`:
encoder config + parameters + sentencepiece model + max length.
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


def shard_range(num: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Captions [start, stop) of process p of P: the loader's contiguous N // P, plus the N % P
    records it drops for the last process."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    per = num // process_count
    if per == 0:
        raise ValueError(f"text cache: {num} captions cannot be shared over {process_count} processes")
    start = process_index * per
    return start, (num if process_index == process_count - 1 else start + per)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass
class TextEmbeddingCache:
    """One process's shard [start, stop) of the captions' embeddings, addressed by caption index.

    `embeddings` [T, D] holds the valid tokens of the shard's captions one after another
    (memory-mapped); caption i's are rows `offsets[i - start]:offsets[i - start + 1]`.
    """

    path: pathlib.Path
    embeddings: np.ndarray
    offsets: np.ndarray
    meta: dict

    @property
    def start(self) -> int:
        return self.meta["start"]

    @property
    def stop(self) -> int:
        return self.meta["stop"]

    @property
    def length(self) -> int:
        return self.meta["length"]

    @property
    def dtype(self) -> np.dtype:
        return self.embeddings.dtype

    def __len__(self) -> int:
        """All captions of the dataset (indices are global; this process reads [start, stop))."""
        return self.meta["num"]

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        """Caption(s) `index` (int, slice or int array) -> dict(text_embeddings [.., L, D] (zeros
        past the valid tokens), text_mask [.., L])."""
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        idx = np.asarray(index, np.int64)
        rows = idx.reshape(-1)
        if rows.size and (rows.min() < self.start or rows.max() >= self.stop):
            bad = rows[(rows < self.start) | (rows >= self.stop)][:5].tolist()
            raise IndexError(f"text cache {self.path} holds captions [{self.start}, {self.stop}) of process "
                             f"{self.meta['process_index']} of {self.meta['process_count']}, not {bad}")
        lo, hi = self.offsets[rows - self.start], self.offsets[rows - self.start + 1]
        emb = np.zeros((rows.size, self.length, self.embeddings.shape[1]), self.dtype)
        for r, (a, b) in enumerate(zip(lo, hi)):
            emb[r, : b - a] = self.embeddings[a:b]
        mask = np.arange(self.length)[None] < (hi - lo)[:, None]
        shape = idx.shape
        return {"text_embeddings": emb.reshape(*shape, *emb.shape[1:]), "text_mask": mask.reshape(*shape, -1)}


def load(path: str | os.PathLike) -> TextEmbeddingCache:
    """Opens a finished shard directory (memory-mapped)."""
    path = pathlib.Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"text cache {path} is incomplete or missing (no meta.json)")
    meta = json.loads(meta_file.read_text())
    dtype = _np_dtype(meta["dtype"])
    shape = (meta["tokens"], meta["width"])
    data = path / "embeddings.bin"
    if data.stat().st_size != shape[0] * shape[1] * dtype.itemsize:
        raise ValueError(f"text cache {path}: {data} holds {data.stat().st_size} bytes, not {shape} {dtype}")
    emb = np.memmap(data, dtype, "r", shape=shape) if shape[0] else np.zeros(shape, dtype)
    offsets = np.load(path / "offsets.npy")
    if offsets.shape != (meta["stop"] - meta["start"] + 1,) or offsets[-1] != shape[0]:
        raise ValueError(f"text cache {path}: offsets {offsets.shape} do not match meta {meta}")
    return TextEmbeddingCache(path, emb, offsets, meta)


def build_or_load(
    cache_dir: str | os.PathLike,
    captions_or_source,
    encode_fn: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    identity: str,
    *,
    name: str = "train",
    batch_size: int = 64,
    dtype: str = "float32",
    process_index: int | None = None,
    process_count: int | None = None,
) -> TextEmbeddingCache:
    """This process's shard of the cache for (identity, captions, dtype), encoded first if absent or stale.

    captions_or_source: a sequence of captions (str/bytes) or a random-access source whose
    items are dicts with "caption". encode_fn: list of B captions -> (embeddings [B, L, D],
    mask [B, L], True on a prefix), e.g. `muse_jax.text.make_encode_fn(...)`. identity:
    `encoder_identity(...)`. process_index / process_count default to this JAX process's.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"text cache dtype {dtype!r}; expected one of {_DTYPES}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    captions = _captions(captions_or_source)
    if not captions:
        raise ValueError("text cache: no captions")
    start, stop = shard_range(len(captions), process_index, process_count)
    stamp = {"identity": identity, "captions_digest": captions_digest(captions), "dtype": dtype,
             "num": len(captions), "start": start, "stop": stop}
    final = pathlib.Path(cache_dir) / f"{name}_{process_index}of{process_count}"
    if (final / "meta.json").is_file():
        try:
            cache = load(final)
        except (OSError, ValueError, KeyError):
            cache = None  # unreadable: rebuilt below
        if cache is not None and all(cache.meta.get(k) == v for k, v in stamp.items()):
            return cache

    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    store = _np_dtype(dtype)
    offsets, length, width = [0], None, None
    with open(tmp / "embeddings.bin", "wb") as f:
        for lo in range(start, stop, batch_size):
            batch = captions[lo:min(lo + batch_size, stop)]
            emb, mask = encode_fn(batch)
            emb, mask = np.asarray(emb), np.asarray(mask, bool)
            if emb.ndim != 3 or emb.shape[0] != len(batch):
                raise ValueError(f"text cache: encode_fn returned embeddings {emb.shape} for {len(batch)} captions")
            if length is None:
                length, width = emb.shape[1:]
            if emb.shape[1:] != (length, width) or mask.shape != emb.shape[:2]:
                raise ValueError(f"text cache: encode_fn returned {emb.shape}/{mask.shape}, expected "
                                 f"[{emb.shape[0]}, {length}, {width}] and a matching mask")
            lengths = mask.sum(1)
            if (mask != (np.arange(length)[None] < lengths[:, None])).any():
                raise ValueError("text cache: the mask must mark a prefix of each row (padding at the end)")
            f.write(np.ascontiguousarray(emb[mask].astype(store)).tobytes())  # [sum(lengths), D], row-major
            offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
    np.save(tmp / "offsets.npy", np.asarray(offsets, np.int64))
    meta = {**stamp, "length": int(length), "width": int(width), "tokens": int(offsets[-1]),
            "process_index": process_index, "process_count": process_count}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)  # stale or interrupted
    os.replace(tmp, final)
    return load(final)
