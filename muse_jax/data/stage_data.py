"""What a masked-transformer stage trains on: a random-access source of token and text arrays.

    data = from_token_cache(config, stage, cache, text)     # shapes: tokens cached once
    data = synthetic(config, stage)                         # tests and benchmarks

`text` is a `TextInputs`: the captions' sentencepiece ids for a T5 trained jointly with the
stage (`config.text.trainable`), or a frozen T5's cached embeddings (`frozen_text_embeddings`).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from muse_jax.data.sources import ArraySource

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StageData:
    """What a stage trains on: a random-access source of token arrays (shapes, synthetic), or
    `batches(local_batch_size)` streaming images and text ids whose tokens `prepare` (a
    `training.online.Prepare`) computes inside the step; the empty prompt's text inputs, and a
    few preview examples."""

    source: ArraySource | None
    empty_text: dict[str, np.ndarray]
    preview: dict[str, np.ndarray] | None = None
    tokenizer: object = None  # the ImageTokenizer that decodes previews
    prompts: list[str] | None = None
    batches: object = None  # streaming: local batch size -> a checkpointable iterator of batches
    example: dict[str, np.ndarray] | None = None  # streaming: one example (shapes and dtypes)
    prepare: object = None  # streaming: the in-step tokenizers (and frozen T5)

    def first_example(self) -> dict[str, np.ndarray]:
        return self.source[0] if self.source is not None else self.example


class TextBatches:
    """Batches of images and captions -> images and the captions' sentencepiece ids.

    Passes the inner iterator's checkpoint protocol (get_state / set_state / start_prefetch) and
    its skip counts (`skipped`, `metrics()`) through.
    """

    def __init__(self, batches, spm):
        self.batches, self.spm = batches, spm

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = next(self.batches)
        ids, mask = self.spm(list(b["caption"]))
        return {"image": b["image"], "text_ids": ids.astype(np.int32), "text_mask": mask}

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
    """Per-caption text arrays ({"text_ids"|"text_emb", "text_mask"}) and the empty prompt's."""

    arrays: dict[str, np.ndarray]
    empty: dict[str, np.ndarray]


def sentencepiece_inputs(spm, captions) -> TextInputs:
    """Token ids of the captions for a jointly trained T5."""
    ids, mask = spm(captions)
    empty_ids, empty_mask = spm([""])
    return TextInputs({"text_ids": ids.astype(np.int32), "text_mask": mask},
                      {"text_ids": empty_ids[0], "text_mask": empty_mask[0]})


def frozen_text_embeddings(config, spm, captions, cache_dir) -> TextInputs:
    """A frozen T5's embeddings of the captions, computed once into `cache_dir` (data/text_cache.py).

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
    cache = text_cache.build_or_load(cache_dir, captions, encode, identity, dtype=config.text.get("cache_dtype", "float32"))
    empty_emb, empty_mask = encode([""])
    return TextInputs({"text_emb": cache.embeddings, "text_mask": cache.mask},
                      {"text_emb": np.asarray(empty_emb, cache.embeddings.dtype)[0], "text_mask": empty_mask[0]})


def from_token_cache(config, stage: str, cache: dict, text: TextInputs, tokenizer=None) -> StageData:
    """A stage's data from a token cache (`data/token_cache.py`): the base stage predicts the
    downsampled images' tokens ("lo"), the super-res stage the full-size ones ("hi") given "lo"."""
    n = len(cache["captions"])
    arrays = dict(text.arrays)
    if stage == "base":
        arrays["tokens"] = cache["lo"].reshape(n, -1).astype(np.int32)
    else:
        arrays["tokens"] = cache["hi"].reshape(n, -1).astype(np.int32)
        arrays["lowres_tokens"] = cache["lo"].reshape(n, -1).astype(np.int32)
    g = config[stage].grid_size
    if arrays["tokens"].shape[1] != g * g:
        raise ValueError(f"cached tokens have {arrays['tokens'].shape[1]} per image; config.{stage} expects {g}x{g}")
    k = int(config.train.num_samples)
    preview = {key: v[:k] for key, v in arrays.items()}
    return StageData(ArraySource(arrays), text.empty, preview, tokenizer=tokenizer, prompts=cache["captions"][:k])


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
