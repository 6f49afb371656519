"""T5 encoder: parity with Hugging Face `T5EncoderModel` (v1.0 and v1.1), masking, presets."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from muse_jax.config import load_config
from muse_jax.models import t5

TINY = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)


def _hf_model(feed_forward_proj, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hc = transformers.T5Config(**TINY, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie,
                               dropout_rate=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(hc).eval()
    with torch.no_grad():  # perturb everything (norm scales start at 1) so each mapping matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _ids_with_padding(length=40):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (3, length))
    mask = np.ones((3, length), bool)
    mask[1, 25:] = False  # longer than max_distance: logarithmic buckets are exercised
    mask[2, 3:] = False
    return ids, mask


def _hf_forward(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("proj,tie", [("relu", True), ("gated-gelu", False)], ids=["v1_0", "v1_1"])
def test_hf_parity(proj, tie, tmp_path):
    model = _hf_model(proj, tie)
    ids, mask = _ids_with_padding()
    ref = _hf_forward(model, ids, mask)
    # From the state dict (cfg given) and from a save_pretrained directory (cfg from config.json).
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    cfg = t5.T5Config.from_hf(model.config)
    assert cfg.feed_forward_proj == proj
    text_cfg = load_config("shapes").text.to_dict()
    text_cfg.update(checkpoint=str(tmp_path), encoder=cfg.to_dict())
    from_config, params_from_config = t5.from_text_config(ml_collections.ConfigDict(text_cfg))
    assert from_config.config == cfg
    for params in (t5.load_hf(model.state_dict(), cfg), t5.load_hf(tmp_path), params_from_config):
        out = t5.T5Encoder(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
        assert out.shape == (3, 40, cfg.d_model) and out.dtype == jnp.float32
        assert _rel_err(np.asarray(out), ref) <= 1e-5


def test_relative_position_bucket_matches_hf():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    rel = np.arange(-700, 701)
    for nb, md in ((32, 128), (8, 20), (16, 64)):
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.tensor(rel), bidirectional=True, num_buckets=nb, max_distance=md).numpy()
        np.testing.assert_array_equal(t5.relative_position_bucket(rel, nb, md), ref)


def test_load_hf_rejects_wrong_config():
    model = _hf_model("gated-gelu", False)
    with pytest.raises(ValueError, match="lacks encoder"):
        t5.load_hf(model.state_dict(), t5.T5Config(**TINY, feed_forward_proj="relu"))
    with pytest.raises(ValueError, match="shape"):
        t5.load_hf(model.state_dict(), t5.T5Config(**{**TINY, "vocab_size": 64}))
    with pytest.raises(ValueError, match="pass cfg"):
        t5.load_hf(model.state_dict())


def _tiny_model(**kw):
    """Tiny encoder with random parameters drawn in numpy (compiling `init` costs seconds on CPU)."""
    cfg = t5.T5Config(**{**TINY, **kw})
    model = t5.T5Encoder(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    rng = np.random.default_rng(0)

    def draw(path, s):
        noise = rng.normal(0.0, 0.3, s.shape).astype(np.float32)
        return noise + 1.0 if "scale" in jax.tree_util.keystr(path) else noise

    params = jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed)["params"])
    return cfg, model, boxed, {"params": params}


def test_padding_does_not_change_real_tokens():
    cfg, model, _, variables = _tiny_model()
    apply = jax.jit(model.apply)
    real = np.random.default_rng(1).integers(3, 100, (2, 6))
    outs = []
    for length in (6, 24):
        ids = np.random.default_rng(length).integers(0, 100, (2, length))  # garbage in the padding
        ids[:, :6] = real
        mask = np.zeros((2, length), bool)
        mask[:, :6] = True
        outs.append(np.asarray(apply(variables, ids, mask))[:, :6])
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    # And the mask matters: attending to the padding changes the real positions.
    no_mask = np.asarray(apply(variables, ids, np.ones_like(mask)))[:, :6]
    assert np.abs(no_mask - outs[0]).max() > 1e-3


def test_logical_axes_dropout_bf16_and_gradients():
    cfg, model, boxed, variables = _tiny_model(dropout_rate=0.5)
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["token_embedder"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["layers_0"]["attention"]["query"]) == ("embed", "heads", "kv")
    assert tuple(specs["layers_1"]["attention"]["out"]) == ("heads", "kv", "embed")
    assert tuple(specs["layers_0"]["mlp"]["wi_0"]) == ("embed", "mlp")
    assert tuple(specs["layers_0"]["mlp"]["wo"]) == ("mlp", "embed")
    assert tuple(specs["relpos_bias"]["rel_embedding"]) == (None, "heads")
    params = variables["params"]
    ids = np.random.default_rng(0).integers(0, 100, (2, 10))
    mask = np.ones((2, 10), bool)
    apply = jax.jit(model.apply, static_argnames="deterministic")
    f32 = apply({"params": params}, ids, mask)  # deterministic=True (the default): no dropout
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
    train = apply({"params": params}, ids, mask, deterministic=False, rngs=rngs)
    assert np.abs(np.asarray(train) - np.asarray(f32)).max() > 1e-3
    # Frozen bf16: bf16 parameters and compute, close to float32.
    bf16 = t5.T5Encoder(t5.T5Config(**{**TINY, "dropout_rate": 0.5}, dtype="bfloat16"))
    out = jax.jit(bf16.apply)({"params": jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)}, ids, mask)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(np.asarray(out, np.float32), np.asarray(f32)) < 0.05
    # Trainable: gradients reach every parameter.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, mask) ** 2)))(params)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_presets():
    xxl = t5.T5Config.from_preset("t5-v1_1-xxl")
    assert (xxl.d_model, xxl.d_ff, xxl.num_layers, xxl.num_heads, xxl.output_dim) == (4096, 10240, 24, 64, 4096)
    assert t5.T5Config.from_preset("flan-t5-xl") == t5.T5Config.from_preset("t5-v1_1-xl")
    assert t5.T5Config.from_preset("t5-base").feed_forward_proj == "relu"
    with pytest.raises(ValueError, match="unknown T5 preset"):
        t5.T5Config.from_preset("t5-v1_1-huge")
    # XXL parameter count from shapes alone (encoder only: ~4.76B, public figure ~4.8B).
    shapes = jax.eval_shape(lambda: t5.T5Encoder(xxl).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(nn.unbox(shapes)))
    assert 4.6e9 < n < 4.9e9
    # ConfigDict round trip, muse_jax/configs/t5.py and the shapes section.
    model, params = t5.from_text_config(load_config("shapes").text)
    assert params is None and model.config.d_model == 128 and model.config.feed_forward_proj == "gated-gelu"
    c = load_config("t5:flan-t5-small")
    assert t5.T5Encoder.from_config(c.encoder).config == t5.T5Config.from_preset("flan-t5-small")
    with pytest.raises(ValueError, match="unknown T5Config fields"):
        t5.T5Config.coerce({"d_modle": 3})
