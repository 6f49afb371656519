"""What a masked-transformer stage trains on: a random-access source of token and text arrays.

    data = from_token_cache(config, stage, cache, text)     # shapes: tokens cached once
    data = synthetic(config, stage)                         # tests and benchmarks

`text` is a `TextInputs`: the captions' sentencepiece ids for a T5 trained jointly with the
stage (`config.text.trainable`), or a frozen T5's cached embeddings (`frozen_text_embeddings`),
of which each process holds and reads only its own shard of the captions.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from muse_jax.data.sources import ArraySource
from muse_jax.models import vqgan

log = logging.getLogger(__name__)


class InStepInputs(Protocol):
    """Computes a streamed batch's model inputs inside the jitted step: `fn(frozen, batch)`, with the
    frozen models' parameters `frozen` placed on `shardings` (training/online.py's `Prepare`: the
    stages' VQGAN encoders, a frozen T5 or CLIP)."""

    fn: Callable[[Any, dict], dict]
    frozen: Any
    shardings: Any
    image_size: int  # pixels of the images the batch must hold


@dataclasses.dataclass
class StageData:
    """What a stage trains on: a random-access source of token arrays (shapes, synthetic), or
    `batches(local_batch_size)` streaming images and text ids whose tokens `prepare` computes inside
    the step; the empty prompt's text inputs, and a few preview examples."""

    source: ArraySource | None
    empty_text: dict[str, np.ndarray]
    preview: dict[str, np.ndarray] | None = None
    tokenizer: vqgan.ImageTokenizer | None = None  # decodes previews
    prompts: list[str] | None = None
    # Streaming: local batch size -> a checkpointable iterator of batches (get_state / set_state).
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]] | None = None
    example: dict[str, np.ndarray] | None = None  # one example (shapes and dtypes); None: source[0]
    prepare: InStepInputs | None = None  # streaming: the in-step tokenizers (and frozen text encoder)

    def first_example(self) -> dict[str, np.ndarray]:
        return self.example if self.example is not None else self.source[0]


class TextBatches:
    """Batches of images and captions -> the `keep` fields (images) and the captions' token ids
    (`text_tokenizer(captions) -> (ids, mask)`: sentencepiece for T5, CLIP's BPE for aMUSEd).

    Passes the inner iterator's checkpoint protocol (get_state / set_state / start_prefetch) and
    its skip counts (`skipped`, `metrics()`) through.
    """

    def __init__(self, batches, text_tokenizer, keep: tuple[str, ...] = ("image",)):
        self.batches, self.spm, self.keep = batches, text_tokenizer, tuple(keep)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self.batches)
        ids, mask = self.spm(list(b["caption"]))
        return {**{k: b[k] for k in self.keep}, "text_ids": ids.astype(np.int32), "text_mask": mask}

    @property
    def skipped(self) -> dict[str, int]:
        return self.batches.skipped

    def metrics(self) -> dict[str, int]:
        return self.batches.metrics()

    def get_state(self) -> bytes:
        return self.batches.get_state()

    def set_state(self, state: bytes) -> None:
        self.batches.set_state(state)

    def start_prefetch(self) -> None:
        self.batches.start_prefetch()


@dataclasses.dataclass
class TextInputs:
    """Per-caption text arrays ({"text_ids"|"text_emb", "text_mask"}) and the empty prompt's; for a
    frozen T5, `cache` (this process's shard of the embeddings, read by caption index) and `first`,
    the arrays of the first captions (previews, which every process shows)."""

    arrays: dict[str, np.ndarray]
    empty: dict[str, np.ndarray]
    cache: object = None  # a `data.text_cache.TextEmbeddingCache`
    first: dict[str, np.ndarray] | None = None


def sentencepiece_inputs(spm, captions) -> TextInputs:
    """Token ids of the captions for a jointly trained T5."""
    ids, mask = spm(captions)
    empty_ids, empty_mask = spm([""])
    return TextInputs({"text_ids": ids.astype(np.int32), "text_mask": mask},
                      {"text_ids": empty_ids[0], "text_mask": empty_mask[0]})


def frozen_text_embeddings(config, spm, captions, cache_dir, *, split: str = "train", process_index=None,
                           process_count=None) -> TextInputs:
    """A frozen T5's embeddings of the captions, computed once into `cache_dir` (data/text_cache.py):
    this process's shard of them (`process_index` of `process_count`, default JAX's).

    Parameters from `config.text.checkpoint` (a Hugging Face T5, converted by `t5.load_hf`): required,
    since a frozen, randomly initialised T5 conditions nothing.
    """
    from muse_jax.data import text as text_lib
    from muse_jax.data import text_cache
    from muse_jax.models import t5

    if not config.text.get("checkpoint", ""):
        raise ValueError("config.text.trainable=False needs config.text.checkpoint (a Hugging Face T5 checkpoint "
                         "directory): a frozen, randomly initialised T5 cannot condition anything")
    tcfg = t5.T5Config.coerce(config.text.encoder)
    encoder = t5.T5Encoder(tcfg)
    params = t5.load_hf(config.text.checkpoint, tcfg)
    encode = text_lib.make_encode_fn(spm, encoder, params, batch_size=64)
    identity = text_cache.encoder_identity(tcfg.to_dict(), params, spm, int(config.text.max_length))
    cache = text_cache.build_or_load(cache_dir, captions, encode, identity, name=split,
                                     dtype=config.text.get("cache_dtype", "float32"),
                                     process_index=process_index, process_count=process_count)
    return cached_text_inputs(cache, encode, captions[: max(1, int(config.train.num_samples))])


def cached_text_inputs(cache, encode, first_captions) -> TextInputs:
    """TextInputs over a text cache; the first captions' and the empty prompt's embeddings encoded
    here, as the cache would give them (zeros past the valid tokens, the cache's dtype)."""
    emb, mask = encode([*first_captions, ""])
    emb = np.where(mask[..., None], np.asarray(emb), 0).astype(cache.dtype)
    return TextInputs({}, {"text_emb": emb[-1], "text_mask": mask[-1]}, cache=cache,
                      first={"text_emb": emb[:-1], "text_mask": mask[:-1]})


class CachedTextSource:
    """A random-access source whose records are `source`'s plus the cached text_emb / text_mask of
    the same index (only this process's shard of the indices can be read)."""

    def __init__(self, source: ArraySource, cache):
        if len(source) != len(cache):
            raise ValueError(f"{len(source)} records but {len(cache)} cached captions")
        self.source, self.cache = source, cache

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        text = self.cache[i]
        return {**self.source[i], "text_emb": text["text_embeddings"], "text_mask": text["text_mask"]}

    def __repr__(self):  # stable across restarts: grain compares it when restoring an iterator
        return f"CachedTextSource({self.source!r}, text:{self.cache.dtype}[{len(self.cache)}, {self.cache.length}])"


def from_token_cache(config, stage: str, cache: dict, text: TextInputs, tokenizer=None) -> StageData:
    """A stage's data from a token cache (`data/token_cache.py`): each stage predicts its own tokens;
    the super-res stage is given the base stage's."""
    n = len(cache["captions"])
    arrays = dict(text.arrays)
    arrays["tokens"] = cache[stage].reshape(n, -1).astype(np.int32)
    if stage == "superres":
        arrays["lowres_tokens"] = cache["base"].reshape(n, -1).astype(np.int32)
    g = config[stage].grid_size
    if arrays["tokens"].shape[1] != g * g:
        raise ValueError(f"cached tokens have {arrays['tokens'].shape[1]} per image; config.{stage} expects {g}x{g}")
    k = int(config.train.num_samples)
    preview = {key: v[:k] for key, v in arrays.items()}
    source, example = ArraySource(arrays), None
    if text.cache is not None:  # records of other processes cannot be read: previews from `first`
        source = CachedTextSource(source, text.cache)
        preview.update({key: v[:k] for key, v in text.first.items()})
        example = {key: v[0] for d in (arrays, text.first) for key, v in d.items()}
    return StageData(source, text.empty, preview, tokenizer=tokenizer, prompts=cache["captions"][:k], example=example)


def synthetic(config, stage: str, num: int = 512, text_length: int = 8, seed: int = 0) -> StageData:
    """Learnable synthetic data (tests, benchmarks): tokens are a function of a caption id.

    Example i has class c = i % 16; its caption ids are [c+3, EOS(1), pad...]; its tokens are a
    fixed random pattern of class c (codebook ids) with 10 % of positions resampled.
    """
    cfg = config[stage]
    rng = np.random.default_rng(seed)
    n_tok, k = cfg.grid_size**2, cfg.codebook_size
    patterns = rng.integers(0, k, (16, n_tok))
    cls = np.arange(num) % 16
    tokens = patterns[cls]
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(0, k, tokens.shape), tokens).astype(np.int32)
    ids = np.zeros((num, text_length), np.int32)
    ids[:, 0], ids[:, 1] = cls + 3, 1
    mask = ids > 0
    arrays = {"tokens": tokens, "text_ids": ids, "text_mask": mask}
    if cfg.lowres_grid_size:
        n_lo = cfg.lowres_grid_size**2
        arrays["lowres_tokens"] = (tokens[:, :: max(1, n_tok // n_lo)][:, :n_lo] % k).astype(np.int32)
    empty_ids = np.zeros((text_length,), np.int32)
    empty_ids[0] = 1
    if not config.text.trainable:  # a stub embedding: one-hot of the ids
        d = cfg.text_dim
        arrays["text_emb"] = np.eye(d, dtype=np.float32)[ids % d] * mask[..., None]
        del arrays["text_ids"]
        empty = {"text_emb": np.eye(d, dtype=np.float32)[empty_ids % d] * (empty_ids > 0)[:, None],
                 "text_mask": empty_ids > 0}
    else:
        empty = {"text_ids": empty_ids, "text_mask": empty_ids > 0}
    return StageData(ArraySource(arrays), empty, None)
