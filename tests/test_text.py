"""Sentencepiece tokenizer: training on shapes captions, EOS, padding, truncation, empty prompt."""
import pickle

import numpy as np
import pytest

from muse_jax import workdir
from muse_jax.config import load_config
from muse_jax.data import text
from muse_jax.data.shapes import make_example


@pytest.fixture(scope="module")
def captions():
    return [make_example(0, "train", i)["caption"] for i in range(300)]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory, captions):
    cfg = load_config("shapes").text
    path = tmp_path_factory.mktemp("w") / workdir.SPM_MODEL
    return text.train_sentencepiece(captions, path, cfg.vocab_size, cfg.spm_model_type)


def test_round_trip_and_eos(spm_path, captions):
    tok = text.TextTokenizer(spm_path, max_length=32)
    assert 40 < tok.vocab_size <= 256 and tok.eos_id == 1 and tok.pad_id == 0
    ids, mask = tok(captions)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (300, 32)
    assert tok.decode(ids, mask) == captions
    lengths = mask.sum(1)
    rows = np.arange(len(captions))
    np.testing.assert_array_equal(ids[rows, lengths - 1], tok.eos_id)  # EOS ends every prompt
    np.testing.assert_array_equal(((ids == tok.eos_id) & mask).sum(1), 1)  # and only EOS is EOS
    assert (ids[~mask] == tok.pad_id).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # mask is a prefix: real tokens, then padding
    # Bytes (as tfds returns captions) tokenize the same as str.
    ids_b, mask_b = tok([c.encode() for c in captions[:5]])
    np.testing.assert_array_equal(ids_b, ids[:5])
    # Picklable (data-loader workers) with identical output.
    ids_p, _ = pickle.loads(pickle.dumps(tok))(captions[:5])
    np.testing.assert_array_equal(ids_p, ids[:5])


def test_shapes_config_fits_every_caption(spm_path):
    cfg = load_config("shapes").text
    tok = text.TextTokenizer(spm_path, cfg.max_length)
    caps = [make_example(0, split, i)["caption"] for split in ("train", "test") for i in range(300, 500)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation
        _, mask = tok(caps)
    assert mask.sum(1).max() < cfg.max_length
    assert cfg.encoder.vocab_size >= tok.vocab_size


def test_truncation_warns_and_keeps_eos(spm_path, captions):
    tok = text.TextTokenizer(spm_path, max_length=5)
    long = captions[0] + " and " + captions[1]
    with pytest.warns(UserWarning, match=r"1 of 2 distinct prompts truncated to max_length=5"):
        ids, mask = tok([long, "a"])
    with pytest.warns(UserWarning, match=r"1 of 1 distinct prompts truncated"):  # one prompt, sampled twice
        tok([long, long])
    assert mask[0].all() and ids[0, -1] == tok.eos_id
    full, _ = text.TextTokenizer(spm_path, max_length=64)([long])
    np.testing.assert_array_equal(ids[0, :4], full[0, :4])
    assert mask[1].sum() == 2  # "a" + EOS, untouched


def test_empty_prompt_is_eos_then_padding(spm_path):
    tok = text.TextTokenizer(spm_path, max_length=8)
    ids, mask = tok(["", "red"])
    np.testing.assert_array_equal(ids[0], [tok.eos_id] + [tok.pad_id] * 7)
    np.testing.assert_array_equal(mask[0], [True] + [False] * 7)
    assert tok([])[0].shape == (0, 8)


def test_bad_input(spm_path, tmp_path):
    tok = text.TextTokenizer(spm_path, max_length=8)
    with pytest.raises(TypeError, match="single string"):
        tok("a red circle")
    with pytest.raises(TypeError, match="str or bytes"):
        tok([3])
    with pytest.raises(ValueError, match="max_length"):
        text.TextTokenizer(spm_path, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.TextTokenizer(tmp_path / "nope.model", 8)


def test_workdir_tokenizer_trains_once(tmp_path, captions):
    cfg = load_config("shapes").text
    calls = []

    def caps():
        calls.append(1)
        return captions

    tok = workdir.text_tokenizer(tmp_path, cfg, caps)
    assert (tmp_path / "text" / "spm.model").is_file() and tok.max_length == cfg.max_length
    again = workdir.text_tokenizer(tmp_path, cfg, caps)
    assert len(calls) == 1 and again.model_proto == tok.model_proto


def test_text_the_vocabulary_lacks_is_found(spm_path):
    tok = text.TextTokenizer(spm_path, max_length=16)
    unknown = tok.unknown_pieces(["a red circle", "a red circle \U0001F600", "a red circle \U0001F600"])
    assert list(unknown) == ["a red circle \U0001F600"] and "\U0001F600" in "".join(unknown["a red circle \U0001F600"])


def test_sampling_warns_about_text_the_vocabulary_lacks(spm_path):
    from muse_jax import cascade

    tok = text.TextTokenizer(spm_path, max_length=16)
    with pytest.warns(UserWarning, match="1 of 2 distinct prompts hold text the vocabulary lacks"):
        cascade._warn_unknown(tok, ["a red circle", "a red circle \U0001F600", "a red circle \U0001F600"])
