"""CLIP's BPE tokenizer (muse_jax/data/clip_bpe.py): the same ids and masks as transformers'
`CLIPTokenizer(texts, padding="max_length", truncation=True, max_length=...)` on a small vocabulary
(the 256 byte symbols, their end-of-word forms, merges learned on a few captions, the two special
tokens), read from vocab.json / merges.txt with three kinds of tokenizer config, and from the
tokenizer.json that transformers' save_pretrained writes."""
import collections
import json
import re

import numpy as np
import pytest

from muse_jax.data import clip_bpe

CORPUS = [
    "a photo of a cat sitting on the table", "the quick brown fox jumps over the lazy dog",
    "a red circle and a blue square on the left", "don't stop, it's what we'll do", "painting of the sea at sunset",
    "two green crosses and a yellow triangle", "an astronaut riding a horse on the moon",
]

TEXTS = [
    "A Photo of a CAT", "don't DON'T it's I'M we'll they've you're she'd", "''s 'S \"quoted\" it’s",
    "  multiple   spaces\tand\nnewlines  ", "tab\x0bvt\x0cff\rcr", "nb\xa0sp\u3000x\u200by\u2028z\x85w",
    "1234 3.14 ½ ² ③ 10,000", "hello!!! ?? ... (x) [y] #z a-b_c/d\\e", "café cafe\u0301 naïve Ångström",
    "emoji 🐱🚀👩‍👩‍👧 and 猫 中文 日本語", "ΟΔΟΣ İstanbul straße", "ctrl\x00a\x1cb\x1fc",
    "a <|endoftext|> b", "a <|ENDOFTEXT|> b <|startoftext|>", "x <|STARTOFTEXT|> y<|startoftext|><|endoftext|>z",
    "the quick brown fox jumps over the lazy dog " * 4,  # longer than any max_length below
    "", "   ",
]


def _learn_merges(corpus, count):
    """Plain BPE training on byte-level words (each ending in </w>), ties broken by the larger pair."""
    chars = clip_bpe.bytes_to_unicode()
    words = collections.Counter()
    for text in corpus:
        for piece in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
            symbols = [chars[b] for b in piece.encode()]
            words[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


@pytest.fixture(scope="module")
def vocab_and_merges():
    merges = _learn_merges(CORPUS, 80)
    chars = list(clip_bpe.bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP's vocabulary
    return {t: i for i, t in enumerate(tokens)}, merges


def _write(folder, vocab, merges, config=None):
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _configs(vocab):
    def added(content, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
                "special": True}

    return {
        "files_only": None,  # defaults: pad = eos = unk = <|endoftext|>, 77 tokens
        # OpenAI's layout: added_tokens_decoder, <|startoftext|> matched in the normalised text.
        "openai": {"added_tokens_decoder": {str(vocab["<|startoftext|>"]): added("<|startoftext|>", True),
                                            str(vocab["<|endoftext|>"]): added("<|endoftext|>", False)},
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"},
        # Stable Diffusion 2's: pad "!" (id 0), which then is a special token in texts too.
        "pad_bang": {"pad_token": "!", "model_max_length": 20},
    }


def _assert_same(ours, hf, max_length):
    ref = hf(TEXTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = ours(TEXTS)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(TEXTS), max_length)
    for i, text in enumerate(TEXTS):
        assert ids[i].tolist() == ref["input_ids"][i].tolist(), text
        assert mask[i].tolist() == ref["attention_mask"][i].astype(bool).tolist(), text


@pytest.mark.parametrize("layout", ["files_only", "openai", "pad_bang"])
@pytest.mark.parametrize("max_length", [None, 12])
def test_matches_transformers(layout, max_length, vocab_and_merges, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = vocab_and_merges
    folder = _write(tmp_path / "tok", vocab, merges, _configs(vocab)[layout])
    ours = clip_bpe.CLIPTokenizer.from_dir(folder, max_length)
    expected_length = max_length or {"pad_bang": 20}.get(layout, 77)
    assert ours.max_length == expected_length
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert ours.pad_id == hf.pad_token_id and ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id
    _assert_same(ours, hf, expected_length)

    # transformers 5 saves tokenizer.json (and no vocab.json / merges.txt): read that too.
    hf.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "vocab.json").exists()
    _assert_same(clip_bpe.CLIPTokenizer.from_dir(tmp_path / "saved", expected_length), hf, expected_length)


def test_truncation_and_counts(vocab_and_merges, tmp_path):
    vocab, merges = vocab_and_merges
    tok = clip_bpe.CLIPTokenizer.from_dir(_write(tmp_path / "tok", vocab, merges), 8)
    texts = ["", "a cat", "a b c d e f g h i j"]
    ids, mask = tok(texts)
    n = tok.num_tokens(texts)
    assert n.tolist() == [2, 2 + len(tok.encode("a cat")), 12]
    assert (n > tok.max_length).tolist() == [False, False, True]  # the last prompt is cut
    assert ids[0, :2].tolist() == [tok.bos_id, tok.eos_id] and (ids[0, 2:] == tok.pad_id).all()
    assert mask.sum(1).tolist() == [2, n[1], 8]
    assert ids[2, -1] == tok.eos_id and ids[2, 1:-1].tolist() == tok.encode("a b c d e f")  # <eos> kept last
    assert tok("a cat")[0].tolist() == ids[1:2].tolist()  # a str is one text
    assert tok.encode("The") == tok.encode("the") == [vocab["the</w>"]]  # learned merge, lowercased


def test_bytes_to_unicode_is_a_bijection_to_printables():
    table = clip_bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_clear_errors(vocab_and_merges, tmp_path):
    vocab, merges = vocab_and_merges
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder .*nowhere"):
        clip_bpe.CLIPTokenizer.from_dir(tmp_path / "nowhere")
    folder = _write(tmp_path / "tok", vocab, merges)
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        clip_bpe.CLIPTokenizer.from_dir(folder)
    no_specials = {k: v for k, v in vocab.items() if not k.startswith("<|")}
    with pytest.raises(ValueError, match="not in the vocabulary"):
        clip_bpe.CLIPTokenizer.from_dir(_write(tmp_path / "tok2", no_specials, merges))
    with pytest.raises(ValueError, match="max_length"):
        clip_bpe.CLIPTokenizer(vocab, merges, max_length=1)
