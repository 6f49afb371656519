"""Text-embedding cache: built once, reused for the same encoder, rebuilt when it changes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from muse_jax.data import text, text_cache
from muse_jax.data.shapes import ShapesSource, make_example
from muse_jax.models import t5

CFG = t5.T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)


def _params(seed):
    boxed = jax.eval_shape(lambda: t5.T5Encoder(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), nn.unbox(boxed)["params"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    captions = [make_example(0, "train", i)["caption"] for i in range(40)]
    spm = text.train_sentencepiece(captions, tmp_path_factory.mktemp("spm") / "spm.model", 128)
    return captions, spm


class Counting:
    """encode_fn wrapper that counts the captions it encodes."""

    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, captions):
        self.n += len(captions)
        return self.fn(captions)


def test_build_reuse_and_invalidation(tmp_path, setup):
    captions, spm = setup
    tok = text.TextTokenizer(spm, 24)
    model = t5.T5Encoder(CFG)
    params = _params(0)
    encode = Counting(text.make_encode_fn(tok, model, params, batch_size=16))
    ident = text_cache.encoder_identity(CFG, params, tok, tok.max_length)
    cache = text_cache.build_or_load(tmp_path, captions, encode, ident, batch_size=16)
    assert encode.n == 40 and len(cache) == 40 and cache.embeddings.shape == (40, 24, 16)
    assert isinstance(cache.embeddings, np.memmap)
    # Same values as encoding directly (the last, padded batch of 8 included). A batch of 16 and one of
    # 10 are different programs whose float32 sums round differently (seen: 1.5e-6 on values ~0.1).
    emb, mask = text.make_encode_fn(tok, model, params)(captions[30:])
    np.testing.assert_allclose(cache[30:40]["text_embeddings"], emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache[30:40]["text_mask"], mask)

    # Same encoder (a fresh identity computed from equal inputs): reused, nothing encoded.
    ident2 = text_cache.encoder_identity(t5.T5Config(**CFG.to_dict()), _params(0), spm, 24)
    assert ident2 == ident
    again = text_cache.build_or_load(tmp_path, captions, encode, ident2, batch_size=16)
    assert encode.n == 40 and again.path == cache.path
    # Changed parameters, config, tokenizer model or max length: a new identity and a rebuild.
    other_spm = text.train_sentencepiece(captions[:20], tmp_path / "other.model", 64)
    changed = [
        text_cache.encoder_identity(CFG, _params(1), tok, 24),
        text_cache.encoder_identity(t5.T5Config(**{**CFG.to_dict(), "layer_norm_epsilon": 1e-5}), params, tok, 24),
        text_cache.encoder_identity(CFG, params, other_spm, 24),
        text_cache.encoder_identity(CFG, params, tok, 25),
    ]
    assert len(set(changed + [ident])) == 5
    params1 = _params(1)
    enc1 = Counting(text.make_encode_fn(tok, model, params1))
    rebuilt = text_cache.build_or_load(tmp_path, captions, enc1, changed[0], batch_size=16)
    assert enc1.n == 40 and rebuilt.path != cache.path
    assert np.abs(rebuilt.embeddings - cache.embeddings).max() > 1e-2
    # Changed captions: rebuilt too.
    enc0 = Counting(encode.fn)
    text_cache.build_or_load(tmp_path, captions[:-1] + ["a red circle"], enc0, ident, batch_size=16)
    assert enc0.n == 40


def test_interrupted_build_is_redone_and_source_and_bf16(tmp_path, setup):
    captions, spm = setup
    tok = text.TextTokenizer(spm, 24)
    params = _params(0)
    encode = Counting(text.make_encode_fn(tok, t5.T5Encoder(CFG), params))
    source = ShapesSource("train", 40, seed=0)  # items are dicts with "caption"
    ident = text_cache.encoder_identity(CFG, params, tok, 24)
    f32 = text_cache.build_or_load(tmp_path, captions, encode, ident)
    bf16 = text_cache.build_or_load(tmp_path, source, encode, ident, dtype="bfloat16")
    assert encode.n == 80 and bf16.embeddings.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16.embeddings, np.float32), f32.embeddings, rtol=1e-2, atol=1e-2)
    assert json.loads((bf16.path / "meta.json").read_text())["dtype"] == "bfloat16"
    (f32.path / "meta.json").unlink()  # as if the build had been killed before finishing
    again = text_cache.build_or_load(tmp_path, captions, encode, ident)
    assert encode.n == 120
    np.testing.assert_array_equal(again.embeddings, np.asarray(f32.embeddings))
    with pytest.raises(ValueError, match="dtype"):
        text_cache.build_or_load(tmp_path, captions, encode, ident, dtype="int8")
    with pytest.raises(ValueError, match="returned embeddings"):
        text_cache.build_or_load(tmp_path / "x", captions, lambda c: encode(c[:1]), ident)
