"""CLIP's byte-level BPE tokenizer (Radford et al. 2021) without transformers: the ids that
transformers' `CLIPTokenizer(texts, padding="max_length", truncation=True, max_length=...)` gives.

Read from a checkpoint's tokenizer folder: vocab.json and merges.txt (or, failing them, the
tokenizers library's tokenizer.json), with tokenizer_config.json / special_tokens_map.json when
present for the special tokens (bos "<|startoftext|>", eos, unk and pad "<|endoftext|>" unless they
say otherwise) and model_max_length (default 77).

A text is encoded as:
  1. special tokens (bos, eos, unk, pad and the config's added_tokens_decoder) found in the raw
     text, case-sensitively, become their ids; the text between them goes through 2-5;
  2. normalisation: Unicode NFC, every run of whitespace -> one space, lowercase (per character);
     then the added tokens marked "normalized": true (as OpenAI's configs mark <|startoftext|>)
     found in the normalised text become their ids;
  3. pre-tokenisation by CLIP's regex: the contractions 's 't 're 've 'm 'll 'd, runs of letters
     (\\p{L}), single digits (\\p{N}), runs of anything else but whitespace; whitespace is dropped;
  4. each piece's UTF-8 bytes map to printable characters (GPT-2's `bytes_to_unicode`) and its last
     symbol gets the end-of-word suffix "</w>";
  5. BPE: the adjacent pair with the lowest rank in merges.txt is merged everywhere (left to right),
     until no pair has a rank; each symbol -> its vocab id (unk when absent).
  The row is <bos> ids <eos>, the ids cut to max_length - 2 when longer, then padded with pad.

Normalisation is that of transformers 5.x, whose `CLIPTokenizer` is the tokenizers-library one (no
ftfy, none of the older python tokenizer's BasicTokenizer cleanup): control characters are kept
as bytes, accents are kept, CJK characters are not spaced out, HTML entities are not unescaped.
OpenAI's reference implementation instead runs ftfy.fix_text and html.unescape first, and its
regex keeps <|startoftext|> / <|endoftext|> whole after lowercasing (transformers matches special
tokens not marked "normalized" in the raw text only, so "<|ENDOFTEXT|>" is spelled out); texts
where those matter (mojibake, "&amp;", such a literal) tokenise differently there. Character
classes (\\s, \\p{L}, \\p{N}) come from the `regex` package's Unicode tables, the tokenizers
library's from Oniguruma's: characters added in recent Unicode versions may be classed differently.
The lstrip / rstrip / single_word options of added tokens are not read (CLIP's are all false), nor
the "normalized" flags of the legacy AddedToken dicts in tokenizer_config.json's bos_token etc. or
special_tokens_map.json (only added_tokens_decoder's and tokenizer.json's added_tokens count: how
transformers combines the legacy ones depends on the order it registers them); they matter only
for a special token written in capitals inside a prompt.

Use:
  tokenize = CLIPTokenizer.from_dir("/path/to/checkpoint/tokenizer")
  ids, mask = tokenize(["a photo of a cat"])  # int32 [1, 77], bool [1, 77]
  tokenize.num_tokens(texts) > tokenize.max_length   # which prompts were cut
"""
from __future__ import annotations

import functools
import json
import pathlib
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import regex

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
END_OF_WORD = "</w>"
# transformers writes model_max_length = int(1e30) for "no limit"; such values mean the default.
_UNSET_MAX_LENGTH = 10**20

# CLIP's pre-tokenizer regex without its leading <|startoftext|>|<|endoftext|> alternatives:
# transformers re-splits every piece with GPT-2's regex (its ByteLevel pre-tokenizer), which cuts
# those two into "<|", letters, "|>" and leaves every other piece whole.
_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_WHITESPACE = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes map to themselves, the other 68 to
    the characters from U+0100 on, so that every byte string is a string without whitespace or controls."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def normalize(text: str) -> str:
    """NFC, whitespace runs -> " ", lowercase character by character (as the tokenizers library:
    no context rules, so a final capital sigma becomes σ, not ς)."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _alternatives(tokens) -> regex.Pattern | None:
    """A pattern matching any of the tokens, longest first (so that one containing another wins)."""
    tokens = sorted(tokens, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(t) for t in tokens)) if tokens else None


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"CLIPTokenizer: cannot read {path}: {e}") from e


class CLIPTokenizer:
    """CLIP's BPE: texts -> (ids int32 [N, max_length], mask bool [N, max_length]); see the module doc."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                 max_length: int = DEFAULT_MAX_LENGTH, *, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str = EOS, unk_token: str = EOS, added_tokens: Mapping[str, int] | None = None,
                 normalized_tokens: Sequence[str] = ()):
        """added_tokens: more special tokens (content -> id); normalized_tokens: those of the special
        tokens that are matched in the normalised text rather than the raw text."""
        if max_length < 2:
            raise ValueError(f"CLIPTokenizer: max_length {max_length} leaves no room for <bos> and <eos>")
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.max_length = int(max_length)
        specials = dict(added_tokens or {})
        for token in (bos_token, eos_token, pad_token, unk_token):
            if token not in specials:
                if token not in self.vocab:
                    raise ValueError(f"CLIPTokenizer: special token {token!r} is not in the vocabulary")
                specials[token] = self.vocab[token]
        self.special_ids = specials
        self.bos_id, self.eos_id = specials[bos_token], specials[eos_token]
        self.pad_id, self.unk_id = specials[pad_token], specials[unk_token]
        self._raw_specials = _alternatives(t for t in specials if t not in normalized_tokens)
        self._normalized_specials = _alternatives(t for t in specials if t in normalized_tokens)
        self._byte_chars = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, path, max_length: int | None = None) -> CLIPTokenizer:
        """From a tokenizer folder: vocab.json + merges.txt (or tokenizer.json), and optionally
        tokenizer_config.json / special_tokens_map.json (special tokens, model_max_length).
        max_length: the padded length (default: model_max_length, else 77)."""
        folder = pathlib.Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIPTokenizer: no such tokenizer folder {folder}")
        vocab_file, merges_file, json_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        tokenizer_json = _read_json(json_file) if json_file.is_file() else {}
        if vocab_file.is_file() and merges_file.is_file():
            vocab = _read_json(vocab_file)
            lines = merges_file.read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines if line.strip() and not line.startswith("#version")]
        elif tokenizer_json:
            model = tokenizer_json.get("model") or {}
            if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
                raise ValueError(f"CLIPTokenizer: {json_file} holds no BPE model (model.vocab / model.merges)")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
        else:
            missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
            raise FileNotFoundError(f"CLIPTokenizer: {folder} lacks {' and '.join(missing)} (and has no tokenizer.json)")
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"CLIPTokenizer: malformed merges in {folder} (expected 'a b' pairs), e.g. {bad[:3]}")

        cfg_file, map_file = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        tokens = {name: _token_content(config.get(name)) for name in names}
        # Added tokens as transformers saves them: in tokenizer_config.json, else in tokenizer.json.
        decoder = config.get("added_tokens_decoder") or {t["id"]: t for t in tokenizer_json.get("added_tokens") or ()}
        if not config.get("added_tokens_decoder") and map_file.is_file():  # as transformers: the map is legacy
            token_map = _read_json(map_file)
            tokens |= {name: _token_content(token_map[name]) for name in names if token_map.get(name)}
        defaults = dict(bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
        tokens = {name: tokens[name] or defaults[name] for name in names}
        added = {_token_content(t): int(i) for i, t in decoder.items() if _token_content(t)}
        normalized = {t["content"] for t in decoder.values() if isinstance(t, Mapping) and t.get("normalized")}
        if max_length is None:
            model_max = config.get("model_max_length")
            max_length = int(model_max) if model_max and model_max < _UNSET_MAX_LENGTH else DEFAULT_MAX_LENGTH
        return cls(vocab, merges, max_length, added_tokens=added, normalized_tokens=sorted(normalized), **tokens)

    # ------------------------------------------------------------------------------------------

    def _bpe(self, piece: str) -> list[int]:
        """One pre-tokenised piece (bytes already mapped to characters) -> vocab ids."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        word = [*piece[:-1], piece[-1] + END_OF_WORD]
        ranks = self.ranks
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab.get(symbol, self.unk_id) for symbol in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def _split(self, text: str, specials: regex.Pattern | None) -> list[str | int]:
        """text cut at the special tokens that `specials` matches: the texts between them and their ids."""
        parts: list[str | int] = []
        start = 0
        for m in specials.finditer(text) if specials is not None else ():
            parts += [text[start:m.start()], self.special_ids[m.group()]]
            start = m.end()
        return parts + [text[start:]]

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without <bos> / <eos>, truncation or padding."""
        ids: list[int] = []
        for part in self._split(text, self._raw_specials):
            for sub in [part] if isinstance(part, int) else self._split(normalize(part), self._normalized_specials):
                if isinstance(sub, int):
                    ids.append(sub)
                    continue
                for piece in _PIECES.findall(sub):
                    ids += self._bpe("".join(self._byte_chars[b] for b in piece.encode("utf-8")))
        return ids

    def num_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Untruncated length of each text with <bos> and <eos>, int [N]: > max_length means it is cut."""
        texts = [texts] if isinstance(texts, str) else texts
        return np.asarray([len(self.encode(t)) + 2 for t in texts], np.int64)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [N, max_length] (<bos> tokens <eos>, the tokens cut to max_length - 2, then pad
        tokens) and mask bool [N, max_length] (True on <bos>, the tokens and <eos>). A str is one text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for row, text in enumerate(texts):
            tokens = [self.bos_id, *self.encode(text)[:self.max_length - 2], self.eos_id]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = True
        return ids, mask
