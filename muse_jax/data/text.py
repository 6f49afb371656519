"""Prompts -> token ids: a sentencepiece wrapper that batches like T5, and the frozen text encoder.

Conventions (the same for every prompt, the empty one included):
  * Each prompt is encoded to pieces and ends with EOS, as T5 does; ids beyond it are padding.
  * The empty prompt "" (the unconditional prompt of classifier-free guidance) is just EOS
    followed by padding: ids [eos, pad, ...], mask [True, False, ...].
  * Prompts longer than `max_length` are cut to `max_length - 1` pieces plus EOS, with a
    `UserWarning` naming how many were cut.
The shapes default trains its own vocabulary (`train_sentencepiece`), stored in the workdir as
W/text/spm.model (`muse_jax.workdir.text_tokenizer`); any sentencepiece `.model` (e.g. T5's 32k
vocabulary) loads too.
"""
from __future__ import annotations

import io
import os
import pathlib
import uuid
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm


def _as_text(prompt) -> str:
    if isinstance(prompt, bytes):
        return prompt.decode("utf-8")
    if isinstance(prompt, np.ndarray) and prompt.ndim == 0:
        return _as_text(prompt.item())
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be str or bytes, got {type(prompt).__name__}: {prompt!r}")
    return prompt


class TextTokenizer:
    """Sentencepiece tokenizer: list of prompts -> (ids int32 [B, L], mask bool [B, L])."""

    def __init__(self, model_path: str | os.PathLike, max_length: int):
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        from muse_jax import paths

        path = paths.as_path(model_path)  # local or a URI (gs://...)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} does not exist")
        self.model_path = str(path)
        self.max_length = int(max_length)
        self._init(path.read_bytes())

    def _init(self, proto: bytes):
        self.model_proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {self.model_path} defines no EOS piece (T5 needs one)")
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else 0  # padding positions are masked out anyway

    def __getstate__(self):  # picklable for data-loader workers
        return {"model_path": self.model_path, "max_length": self.max_length, "model_proto": self.model_proto}

    def __setstate__(self, state):
        self.model_path, self.max_length = state["model_path"], state["max_length"]
        self._init(state["model_proto"])

    def unknown_pieces(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        """The prompts holding text the vocabulary lacks (encoded as <unk>, e.g. emoji) -> those pieces."""
        unk = int(self._sp.unk_id())
        out = {}
        for text in dict.fromkeys(_as_text(p) for p in prompts):
            ids, pieces = self._sp.encode(text), self._sp.encode(text, out_type=str)
            missing = [piece for i, piece in zip(ids, pieces) if i == unk]
            if missing:
                out[text] = missing
        return out

    @property
    def vocab_size(self) -> int:
        """Number of pieces; the text encoder's embedding needs at least this many rows."""
        return int(self._sp.get_piece_size())

    def __call__(self, prompts: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes a batch: -> ids int32 [B, max_length], mask bool [B, max_length]."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("TextTokenizer expects a list of prompts, got a single string; wrap it in a list")
        texts = [_as_text(p) for p in prompts]
        pieces = self._sp.encode(texts) if texts else []
        n = len(texts)
        ids = np.full((n, self.max_length), self.pad_id, np.int32)
        mask = np.zeros((n, self.max_length), bool)
        cut = []
        for i, p in enumerate(pieces):
            if len(p) + 1 > self.max_length:
                cut.append((i, len(p) + 1))
                p = p[: self.max_length - 1]
            row = list(p) + [self.eos_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        if cut:
            i, n_tok = cut[0]
            warnings.warn(  # counted over distinct prompts: a prompt sampled 4 times is one prompt
                f"{len({texts[j] for j, _ in cut})} of {len(set(texts))} distinct prompts truncated to "
                f"max_length={self.max_length} tokens (e.g. {n_tok} with EOS: {texts[i][:60]!r})",
                UserWarning,
                stacklevel=2,
            )
        return ids, mask

    def decode(self, ids: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """ids [B, L] (+ mask) -> prompts, dropping EOS and padding."""
        ids = np.asarray(ids)
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
        rows = [[int(t) for t, m in zip(r, mr) if m and t != self.eos_id] for r, mr in zip(ids, mask)]
        return self._sp.decode(rows)


def train_sentencepiece(
    captions: Iterable[str | bytes],
    path: str | os.PathLike,
    vocab_size: int = 256,
    model_type: str = "bpe",
) -> pathlib.Path:
    """Trains a sentencepiece model on `captions` in-process and writes it to `path`.

    Ids follow T5: pad=0, eos=1, unk=2, no BOS. `vocab_size` is a soft limit (a small caption
    set may yield fewer pieces). BPE is the default because on the shapes captions (34 words,
    very repetitive) unigram keeps only ~62 pieces and splits common words into characters.
    """
    texts = [_as_text(c) for c in captions]
    if not texts:
        raise ValueError("train_sentencepiece: no captions")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=int(vocab_size), model_type=model_type,
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )
    from muse_jax import paths

    path = paths.as_path(path)  # local or a URI (gs://...)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")  # processes may share a bucket
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path



def make_encode_fn(tokenizer: TextTokenizer, model, params, batch_size: int | None = None):
    """Frozen text encoder: prompts -> (embeddings np [B, L, D], mask np bool [B, L]).

    Runs `model.apply({"params": params}, ids, mask)` jitted, without gradients; with
    `batch_size`, batches are padded to that size so only one shape is ever compiled.
    """
    import jax

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ValueError(f"text encoder vocab_size={vocab} < tokenizer vocab_size={tokenizer.vocab_size}")

    @jax.jit
    def apply(params, ids, mask):
        out = model.apply({"params": params}, ids, mask, deterministic=True)
        return jax.lax.stop_gradient(out)

    def encode(prompts):
        ids, mask = tokenizer(prompts)
        n = ids.shape[0]
        if batch_size and n < batch_size:
            ids = np.concatenate([ids, np.full((batch_size - n, ids.shape[1]), tokenizer.pad_id, np.int32)])
            m = np.zeros((batch_size - n, ids.shape[1]), bool)
            m[:, 0] = True  # keep padded rows well defined (one real position)
            mask_in = np.concatenate([mask, m])
        else:
            mask_in = mask
        emb = np.asarray(apply(params, ids, mask_in))[:n]
        return emb, mask

    return encode
