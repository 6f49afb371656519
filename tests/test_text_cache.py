"""Text-embedding cache: each process encodes its own shard once, unpadded; rebuilt when its stamp changes."""
import json

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from muse_jax import config as config_lib
from muse_jax.data import loader, stage_data, text, text_cache
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


def test_build_reuse_and_rebuild_on_stamp_mismatch(tmp_path, setup):
    captions, spm = setup
    tok = text.TextTokenizer(spm, 24)
    model = t5.T5Encoder(CFG)
    params = _params(0)
    encode = Counting(text.make_encode_fn(tok, model, params, batch_size=16))
    ident = text_cache.encoder_identity(CFG, params, tok, tok.max_length)
    cache = text_cache.build_or_load(tmp_path, captions, encode, ident, batch_size=16, process_index=0,
                                     process_count=1)
    assert encode.n == 40 and len(cache) == 40 and (cache.start, cache.stop) == (0, 40)
    assert cache.path == tmp_path / "train_0of1" and isinstance(cache.embeddings, np.memmap)
    # Same values as encoding directly (the last, padded batch of 8 included). A batch of 16 and one of
    # 10 are different programs whose float32 sums round differently (seen: 1.5e-6 on values ~0.1).
    emb, mask = text.make_encode_fn(tok, model, params)(captions[30:])
    np.testing.assert_allclose(cache[30:40]["text_embeddings"], emb * mask[..., None], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache[30:40]["text_mask"], mask)

    # Same encoder (a fresh identity computed from equal inputs): reused, nothing encoded.
    ident2 = text_cache.encoder_identity(t5.T5Config(**CFG.to_dict()), _params(0), spm, 24)
    assert ident2 == ident
    again = text_cache.build_or_load(tmp_path, captions, encode, ident2, batch_size=16, process_index=0,
                                     process_count=1)
    assert encode.n == 40 and again.path == cache.path
    # Changed parameters, config, tokenizer model or max length: a new identity.
    other_spm = text.train_sentencepiece(captions[:20], tmp_path / "other.model", 64)
    changed = [
        text_cache.encoder_identity(CFG, _params(1), tok, 24),
        text_cache.encoder_identity(t5.T5Config(**{**CFG.to_dict(), "layer_norm_epsilon": 1e-5}), params, tok, 24),
        text_cache.encoder_identity(CFG, params, other_spm, 24),
        text_cache.encoder_identity(CFG, params, tok, 25),
    ]
    assert len(set(changed + [ident])) == 5
    # A stamp that does not match (another identity, other captions, another dtype): the shard is rebuilt.
    before = np.asarray(cache[0:40]["text_embeddings"])
    enc1 = Counting(text.make_encode_fn(tok, model, _params(1)))
    rebuilt = text_cache.build_or_load(tmp_path, captions, enc1, changed[0], batch_size=16, process_index=0,
                                       process_count=1)
    assert enc1.n == 40 and rebuilt.meta["identity"] == changed[0]
    assert np.abs(rebuilt[0:40]["text_embeddings"] - before).max() > 1e-2
    enc0 = Counting(encode.fn)
    other = text_cache.build_or_load(tmp_path, captions[:-1] + ["a red circle"], enc0, ident, process_index=0,
                                     process_count=1)
    assert enc0.n == 40 and other.meta["captions_digest"] == text_cache.captions_digest(captions[:-1] + ["a red circle"])
    text_cache.build_or_load(tmp_path, captions[:-1] + ["a red circle"], enc0, ident, dtype="float16",
                             process_index=0, process_count=1)
    assert enc0.n == 80
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["train_0of1"]  # no temporary left


def test_unpadded_storage_is_smaller_by_the_valid_token_ratio(tmp_path, setup):
    captions, spm = setup
    tok = text.TextTokenizer(spm, 24)
    encode = text.make_encode_fn(tok, t5.T5Encoder(CFG), _params(0))
    cache = text_cache.build_or_load(tmp_path, captions, encode, "id", process_index=0, process_count=1)
    emb, mask = encode(captions)
    valid = int(mask.sum())
    assert 0 < valid < mask.size and cache.embeddings.shape == (valid, 16)
    stored = (cache.path / "embeddings.bin").stat().st_size
    padded = mask.size * 16 * 4  # [N, L, D] float32
    assert stored == valid * 16 * 4 and stored / padded == pytest.approx(valid / mask.size)
    assert (cache.path / "offsets.npy").stat().st_size < 0.05 * stored
    got = cache[np.arange(40)]
    assert got["text_embeddings"].shape == (40, 24, 16)
    np.testing.assert_allclose(got["text_embeddings"], emb * mask[..., None], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["text_mask"], mask)
    one = cache[7]
    assert one["text_embeddings"].shape == (24, 16) and one["text_mask"].sum() == mask[7].sum()


def test_two_processes_encode_disjoint_shards_and_read_their_own(tmp_path, setup):
    captions, spm = setup
    captions = captions[:39]  # 39 = 2 x 19 + 1: the last process also keeps the record the loader drops
    tok = text.TextTokenizer(spm, 24)
    fn = text.make_encode_fn(tok, t5.T5Encoder(CFG), _params(0), batch_size=8)  # one program for every batch
    fresh, fresh_mask = text.make_encode_fn(tok, t5.T5Encoder(CFG), _params(0))(captions)
    config = config_lib.load_config("shapes", ["--config.base.grid_size=2", "--config.train.num_samples=3"])
    token_cache = {"captions": captions, "base": np.repeat(np.arange(39), 4).reshape(39, 2, 2)}  # token = index
    caches, seen = [], []
    for p in range(2):
        encode = Counting(fn)
        cache = text_cache.build_or_load(tmp_path, captions, encode, "id", batch_size=8, process_index=p,
                                         process_count=2)
        assert cache.path.name == f"train_{p}of2" and encode.n == cache.stop - cache.start
        caches.append(cache)
        # this process's loader (the shard of grain.ShardOptions(p, 2)) reads only its own records
        data = stage_data.from_token_cache(config, "base", token_cache, stage_data.cached_text_inputs(cache, fn, captions[:3]))
        it = iter(loader.make_loader(data.source, batch_size=4, seed=0, num_epochs=1, drop_remainder=False,
                                     shard_options=grain.ShardOptions(p, 2, drop_remainder=True)))
        for batch in it:
            idx = batch["tokens"][:, 0]
            assert batch["text_emb"].shape == (len(idx), 24, 16) and batch["text_mask"].shape == (len(idx), 24)
            np.testing.assert_allclose(batch["text_emb"], fresh[idx] * fresh_mask[idx, :, None], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(batch["text_mask"], fresh_mask[idx])
            seen += idx.tolist()
        # every process has the previews and one example, though process 1 holds none of the first records
        np.testing.assert_allclose(data.preview["text_emb"], fresh[:3] * fresh_mask[:3, :, None], rtol=1e-5, atol=1e-5)
        assert data.first_example()["text_emb"].shape == (24, 16)
        with pytest.raises(IndexError, match="holds captions"):
            cache[19 if p == 0 else 0]
    assert [(c.start, c.stop) for c in caches] == [(0, 19), (19, 39)]  # disjoint, covering all 39
    assert sorted(seen) == list(range(38))  # the loaders' records: each read once, by its own process
    both = np.concatenate([c[c.start:c.stop]["text_embeddings"] for c in caches])
    np.testing.assert_allclose(both, fresh * fresh_mask[..., None], rtol=1e-5, atol=1e-5)


def test_interrupted_build_is_redone_and_source_and_bf16(tmp_path, setup):
    captions, spm = setup
    tok = text.TextTokenizer(spm, 24)
    params = _params(0)
    encode = Counting(text.make_encode_fn(tok, t5.T5Encoder(CFG), params))
    source = ShapesSource("train", 40, seed=0)  # items are dicts with "caption"
    ident = text_cache.encoder_identity(CFG, params, tok, 24)
    f32 = text_cache.build_or_load(tmp_path, captions, encode, ident, process_index=0, process_count=1)
    f32_values = f32[0:40]["text_embeddings"]
    bf16 = text_cache.build_or_load(tmp_path / "b", source, encode, ident, dtype="bfloat16", process_index=0,
                                    process_count=1)
    assert encode.n == 80 and bf16.embeddings.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16[0:40]["text_embeddings"], np.float32), f32_values, rtol=1e-2, atol=1e-2)
    assert json.loads((bf16.path / "meta.json").read_text())["dtype"] == "bfloat16"
    (f32.path / "meta.json").unlink()  # as if the build had been killed before finishing
    again = text_cache.build_or_load(tmp_path, captions, encode, ident, process_index=0, process_count=1)
    assert encode.n == 120
    np.testing.assert_array_equal(again[0:40]["text_embeddings"], f32_values)
    with pytest.raises(ValueError, match="dtype"):
        text_cache.build_or_load(tmp_path, captions, encode, ident, dtype="int8")
    with pytest.raises(ValueError, match="returned embeddings"):
        text_cache.build_or_load(tmp_path / "x", captions, lambda c: encode(c[:1]), ident)
