"""Masked transformers: paper-size parameter counts, shapes, masks, dtype/remat options."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.config import load_config
from muse_jax.models import transformer as T


def _closed_form(c: T.TransformerConfig) -> int:
    """Parameter count of the architecture written out by hand (independent of the code)."""
    W, M, K = c.width, c.mlp_dim, c.codebook_size
    attn = 4 * W * W + 3 * W  # q, k, v, out kernels; q, v, out biases
    ln = 2 * W
    mlp = 2 * W * M + M + W
    cross_block = 2 * attn + mlp + 3 * ln
    self_block = attn + mlp + 2 * ln
    n = c.text_dim * W + W  # text projection
    n += (K + 1) * W + c.grid_size**2 * W + ln  # [MASK]-extended embedding, 2-D positions
    n += c.num_layers * cross_block + ln  # decoder + final norm
    n += W * W + W + ln + W * K + K  # MLP head
    if c.is_superres:
        n += K * W + c.lowres_grid_size**2 * W + ln + c.num_lowres_layers * self_block + ln
        n += (W * W + W) * c.lowres_add  # projection of the upsampled low-res encoding
    if c.patch_size > 1:  # patch projections in (p*p*W -> W) and out (W -> p*p*W)
        pp = c.patch_size**2
        n += (pp * W * W + W) + (W * pp * W + pp * W)
    return n


def _abstract_count(cfg) -> int:
    model = T.build(cfg)
    abstract = jax.eval_shape(lambda r: T.init_params(model, r, T.dummy_inputs(model, 1, 8)), jax.random.key(0))
    return T.count_params(abstract)


@pytest.mark.parametrize(
    "name,stage,paper,tol",
    [
        ("muse_632m", "base", 632e6, 0.05),
        # The paper's "3B" is rounded: 48 x (self + cross + MLP) blocks at 2048/8192 are 3.27e9.
        ("muse_3b", "base", 3.0e9, 0.10),
        # 16 + 32 blocks at 1024/4096 cannot total 268M (see muse_jax/configs/paper.py): the
        # count is checked against the closed form only, and the gap recorded here.
        ("superres_268m", "superres", 7.74e8, 0.01),
    ],
)
def test_paper_configs_parameter_counts(name, stage, paper, tol):
    cfg = T.TransformerConfig.coerce(load_config(name)[stage])
    n = _abstract_count(cfg)
    assert n == _closed_form(cfg)
    assert abs(n - paper) / paper <= tol, f"{name}: {n / 1e6:.1f}M vs {paper / 1e6:.0f}M"


def _jit_apply(model):
    return jax.jit(lambda p, x: T.apply(model, p, x))


def _jit_init(model, rng, x):
    return jax.jit(lambda r: T.init_params(model, r, x))(rng)


TINY = dict(codebook_size=16, grid_size=4, num_layers=1, width=32, mlp_dim=64, num_heads=4, text_dim=24)


def _inputs(model, b=2, L=5, seed=0):
    rng = np.random.default_rng(seed)
    c = model.config
    out = {
        "tokens": jnp.asarray(rng.integers(0, c.codebook_size + 1, (b, c.num_tokens)), jnp.int32),
        "text_emb": jnp.asarray(rng.normal(size=(b, L, c.text_dim)), jnp.float32),
        "text_mask": jnp.asarray(np.arange(L)[None, :] < np.array([[3], [5]])[:b]),
    }
    if c.is_superres:
        out["lowres_tokens"] = jnp.asarray(rng.integers(0, c.codebook_size, (b, c.lowres_grid_size**2)), jnp.int32)
    return out


def test_base_shapes_padding_mask_and_logical_names():
    model = T.build(TINY)
    assert model.mask_token_id == 16 == model.codebook_size
    x = _inputs(model)
    boxed = _jit_init(model, jax.random.key(0), x)
    fwd = _jit_apply(model)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda l: isinstance(l, nn.Partitioned))
    assert all(isinstance(l, nn.Partitioned) for l in leaves)  # every parameter is named
    assert _closed_form(model.config) == T.count_params(boxed)
    params = nn.unbox(boxed)
    logits = fwd(params, x)
    assert logits.shape == (2, 16, 16) and logits.dtype == jnp.float32
    # Text at padded positions (example 0 has 3 real tokens) must not matter ...
    y = dict(x, text_emb=x["text_emb"].at[0, 3:].set(100.0))
    np.testing.assert_allclose(fwd(params, y), logits, atol=1e-5)
    # ... while real text does.
    z = dict(x, text_emb=x["text_emb"].at[0, 0].set(100.0))
    assert np.abs(np.asarray(fwd(params, z)[0] - logits[0])).max() > 1e-5
    with pytest.raises(ValueError, match="expected tokens"):
        T.apply(model, params, dict(x, tokens=x["tokens"][:, :5]))


def test_superres_uses_lowres_tokens_and_counts():
    model = T.build(dict(TINY, grid_size=8, lowres_grid_size=4, num_lowres_layers=1))
    x = _inputs(model)
    boxed = _jit_init(model, jax.random.key(1), x)
    fwd = _jit_apply(model)
    assert _closed_form(model.config) == T.count_params(boxed)
    params = nn.unbox(boxed)
    logits = fwd(params, x)
    assert logits.shape == (2, 64, 16)
    other = dict(x, lowres_tokens=(x["lowres_tokens"] + 1) % 16)
    assert np.abs(np.asarray(fwd(params, other) - logits)).max() > 1e-5
    positional = jax.jit(model.apply)({"params": params}, x["tokens"], x["text_emb"], x["text_mask"], x["lowres_tokens"])
    np.testing.assert_array_equal(positional, logits)


def test_superres_lowres_add_puts_each_lowres_token_under_the_tokens_it_covers():
    model = T.build(dict(TINY, grid_size=8, lowres_grid_size=4, num_lowres_layers=1, lowres_add=True))
    x = _inputs(model)
    boxed = _jit_init(model, jax.random.key(1), x)
    assert _closed_form(model.config) == T.count_params(boxed)
    params = nn.unbox(boxed)
    _, state = jax.jit(lambda p: model.apply({"params": p}, **{k: x[k] for k in x}, capture_intermediates=True))(params)
    low = state["intermediates"]["lowres_encoder"]["__call__"][0]  # [B, 16, W] after the encoder
    added = state["intermediates"]["lowres_add"]["__call__"][0]  # [B, 64, W] added to the embeddings
    kernel, bias = params["lowres_add"]["kernel"], params["lowres_add"]["bias"]
    rows, cols = np.divmod(np.arange(64), 8)
    expected = (low @ kernel + bias)[:, (rows // 2) * 4 + cols // 2]  # high-res (r, c) <- low-res (r//2, c//2)
    np.testing.assert_allclose(added, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(added[:, 0] - added[:, 2])).max() > 1e-3  # neighbouring low-res tokens differ
    with pytest.raises(ValueError, match="lowres_add needs grid_size"):
        T.build(dict(TINY, grid_size=6, lowres_grid_size=4, num_lowres_layers=1, lowres_add=True))


@pytest.mark.parametrize("superres", [False, True])
def test_patches_group_each_square_of_tokens_and_map_back_to_them(superres):
    """patch_size=2 on a 4x4 grid: the stack sees 4 positions, each the 4 tokens of one 2x2 square
    (row-major within it), and each token's logits come from its own slice of its square's output."""
    extra = dict(lowres_grid_size=2, num_lowres_layers=1, lowres_add=True) if superres else {}
    model = T.build(dict(TINY, patch_size=2, **extra))
    assert model.config.num_positions == 4
    x = _inputs(model)
    boxed = _jit_init(model, jax.random.key(4), x)
    assert _closed_form(model.config) == T.count_params(boxed)
    params = nn.unbox(boxed)
    apply = jax.jit(lambda p: model.apply({"params": p}, **x, capture_intermediates=True))
    logits, state = apply(params)
    assert logits.shape == (2, 16, 16)
    emb = state["intermediates"]["tokens"]["__call__"][0]  # [B, 16, W], row-major 4x4
    if superres:
        emb = emb + state["intermediates"]["lowres_add"]["__call__"][0]
    got = state["intermediates"]["patch_in"]["__call__"][0]  # [B, 4, W]
    rows, cols = np.divmod(np.arange(16), 4)
    square = (rows // 2) * 2 + cols // 2  # the position of each token
    slot = (rows % 2) * 2 + cols % 2  # its place inside the square
    order = np.lexsort((slot, square))  # tokens by (square, slot)
    patches = np.asarray(emb)[:, order].reshape(2, 4, 4 * 32)
    kernel, bias = params["patch_in"]["kernel"], params["patch_in"]["bias"]
    np.testing.assert_allclose(got, patches @ kernel + bias, rtol=1e-5, atol=1e-5)
    # The output slice of slot s reaches exactly the tokens in slot s of their squares.
    for s in range(4):
        bumped = jax.tree.map(lambda a: a, params)
        bumped["patch_out"]["bias"] = params["patch_out"]["bias"].at[s * 32:(s + 1) * 32].add(1.0)
        changed = np.abs(np.asarray(apply(bumped)[0] - logits)).max(axis=(0, 2)) > 1e-4
        np.testing.assert_array_equal(changed, slot == s)
    with pytest.raises(ValueError, match="patch_size 3 must be positive and divide grid_size 4"):
        T.build(dict(TINY, patch_size=3))


def test_remat_and_bf16_match_float32():
    ref_model = T.build(TINY)
    x = _inputs(ref_model)
    params = nn.unbox(_jit_init(ref_model, jax.random.key(2), x))

    def loss(model, p):
        return jnp.mean(T.apply(model, p, x) ** 2)

    g_ref = jax.jit(jax.grad(lambda p: loss(ref_model, p)))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(T.build(dict(TINY, remat=True)), p)))(params)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    bf16 = _jit_apply(T.build(dict(TINY, dtype="bfloat16")))(params, x)
    assert bf16.dtype == jnp.float32
    ref = _jit_apply(ref_model)(params, x)
    assert np.abs(np.asarray(bf16 - ref)).max() < 0.05 * np.abs(np.asarray(ref)).max() + 0.05


def test_joint_text_encoder_and_config_errors():
    t5 = dict(vocab_size=40, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = T.build(TINY, t5)
    ids = jnp.asarray([[5, 6, 1, 0], [1, 0, 0, 0]], jnp.int32)
    mask = ids > 0
    inputs = {"tokens": jnp.zeros((2, 16), jnp.int32), "text_ids": ids, "text_mask": mask}
    params = nn.unbox(_jit_init(model, jax.random.key(3), inputs))
    assert "text_encoder" in params
    emb = jax.jit(lambda p: model.apply({"params": p}, ids, mask, method=model.encode_text))(params)
    direct = jax.jit(lambda p, e: model.apply({"params": p}, inputs["tokens"], e, mask))(params, emb)
    np.testing.assert_allclose(direct, _jit_apply(model)(params, inputs), atol=1e-6)
    with pytest.raises(ValueError, match="text encoder d_model 24 != transformer text_dim 16"):
        T.build(dict(TINY, text_dim=16), t5)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        T.build(dict(TINY, num_heads=5))
    with pytest.raises(ValueError, match="unknown transformer config fields"):
        T.build(dict(TINY, depth=3))
