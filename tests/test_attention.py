"""The attention implementations compute the same function: blockwise and fused against xla."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import layers
from muse_jax.models import transformer as T

B, H, D = 2, 3, 8
LQ, LK = 37, 29  # not multiples of the block size below
BLOCK = 8


def _qkv(dtype=jnp.float32, lq=LQ, lk=LK, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, H, n, D)), dtype) for n in (lq, lk, lk))


def _bias(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(1, H, LQ, LK)), jnp.float32)  # T5's shape


def _mask(seed=2):
    """Text padding mask [B, 1, 1, LK]: example 1 has no key at all (every query row fully masked)."""
    keep = np.random.default_rng(seed).random((B, 1, 1, LK)) > 0.3
    keep[1] = False
    return jnp.asarray(keep)


def _loss_and_grads(implementation, with_bias, with_mask, scale=None):
    """jit(value_and_grad) of a weighted sum of the output, w.r.t. q, k, v and bias."""
    weights = jnp.cos(jnp.arange(D, dtype=jnp.float32))
    mask = _mask() if with_mask else None

    def loss(q, k, v, bias):
        out = layers.dot_product_attention(q, k, v, bias=bias if with_bias else None, mask=mask, scale=scale,
                                           implementation=implementation, block_size=BLOCK)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("implementation", ["blockwise", "fused"])
def test_forward_and_gradients_match_xla_with_bias_and_padding_mask(implementation):
    q, k, v = _qkv()
    bias = _bias()
    with jax.default_matmul_precision("float32"):
        (_, ref), ref_grads = _loss_and_grads("xla", True, True)(q, k, v, bias)
        (_, out), grads = _loss_and_grads(implementation, True, True)(q, k, v, bias)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
    for name, g, g_ref in zip(("q", "k", "v", "bias"), grads, ref_grads):
        np.testing.assert_allclose(g, g_ref, rtol=2e-5, atol=2e-6, err_msg=name)
    # the fully masked example averages all values, as the xla path's softmax of equal logits does
    np.testing.assert_allclose(out[1], np.broadcast_to(v[1].mean(axis=1, keepdims=True), out[1].shape),
                               rtol=2e-5, atol=2e-6)


def test_bfloat16_inputs_match_xla_within_bfloat16_rounding():
    """Self-attention as in the bf16 transformers: no bias or mask, the default 1/sqrt(d) scale."""
    q, k, v = _qkv(jnp.bfloat16)
    bias = _bias()
    (_, ref), ref_grads = _loss_and_grads("xla", False, False)(q, k, v, bias)
    (_, out), grads = _loss_and_grads("blockwise", False, False)(q, k, v, bias)
    fused = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, implementation="fused"))(q, k, v)
    for x in (out, fused):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_allclose(x.astype(np.float32), ref.astype(np.float32), rtol=2e-2, atol=2e-2)
    for name, g, g_ref in zip(("q", "k", "v"), grads, ref_grads):
        g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
        assert np.abs(g - g_ref).max() <= 3e-2 * np.abs(g_ref).max() + 1e-2, name


def test_auto_picks_blockwise_for_long_sequences_and_rejects_unknown_names():
    def uses_scan(n):
        s = jax.ShapeDtypeStruct((1, 1, n, 8), jnp.float32)
        jaxpr = jax.make_jaxpr(lambda q, k, v: layers.dot_product_attention(q, k, v, implementation="auto"))(s, s, s)
        return "scan" in str(jaxpr)

    assert jax.default_backend() != "cpu" or (uses_scan(1024) and not uses_scan(512))
    with pytest.raises(ValueError, match="attention implementation"):
        layers.dot_product_attention(*_qkv(), implementation="flash")
    with pytest.raises(ValueError, match="TransformerConfig.attention"):
        T.TransformerConfig(attention="flash")


def test_masked_transformer_blockwise_matches_xla():
    """A base model: 64-token self-attention in 8 blocks; cross-attention to 5 text keys (one padded block)."""
    cfg = dict(codebook_size=16, grid_size=8, num_layers=1, width=32, mlp_dim=64, num_heads=4, text_dim=24)
    ref_model = T.build(cfg)
    model = T.build(dict(cfg, attention="blockwise", attention_block_size=BLOCK))
    rng = np.random.default_rng(0)
    x = {
        "tokens": jnp.asarray(rng.integers(0, 17, (2, 64)), jnp.int32),
        "text_emb": jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32),
        "text_mask": jnp.asarray(np.arange(5)[None] < np.array([[3], [5]])),
    }
    # random parameters of the right shapes (cheaper than compiling the initialisers)
    abstract = nn.unbox(jax.eval_shape(lambda r: T.init_params(ref_model, r, x), jax.random.key(0)))
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), abstract)
    with jax.default_matmul_precision("float32"):
        ref = jax.jit(lambda p: T.apply(ref_model, p, x))(params)
        out = jax.jit(lambda p: T.apply(model, p, x))(params)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_blockwise_training_memory_is_smaller():
    """4096 tokens (super-res 64x64), 4 heads: XLA's compiled temporaries of forward + backward.

    The xla path keeps the [4, 4096, 4096] float32 logits and weights (512 MiB) for the backward
    pass; the blockwise one recomputes 512 x 512 tiles. (XLA:CPU fuses the xla path's forward alone
    into one kernel whose scratch it does not report, so only the training program is compared.)
    """
    s = jax.ShapeDtypeStruct((1, 4, 4096, 64), jnp.float32)

    def temp_bytes(implementation):
        f = lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v, implementation=implementation))  # noqa: E731
        mem = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(s, s, s).compile().memory_analysis()
        if mem is None or getattr(mem, "temp_size_in_bytes", None) is None:
            pytest.skip(f"the {jax.default_backend()} backend reports no compiled memory analysis")
        return mem.temp_size_in_bytes

    logits = 4 * 4096 * 4096 * 4
    xla, blockwise = temp_bytes("xla"), temp_bytes("blockwise")
    assert xla >= logits
    assert blockwise < logits / 4 and blockwise < xla / 8
