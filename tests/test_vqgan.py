"""The VQGAN tokenizer: shapes, quantizer round trip, straight-through gradients, errors, losses."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import partitioning
from muse_jax.models import discriminator, vqgan
from muse_jax.models import vqgan_losses as losses


def _cfg(levels=3, **kw):
    base = dict(
        channels=(8,) * levels, num_res_blocks=0, latent_channels=8, code_dim=8,
        codebook_size=32, norm_groups=4, l2_normalize=True,
    )
    base.update(kw)
    return vqgan.VQGANConfig(**base)


def _init(cfg, size=32):
    return jax.jit(lambda: nn.unbox(vqgan.init_params(cfg, jax.random.key(0), size)))()


@pytest.mark.parametrize("levels,factor", [(3, 4), (4, 8), (5, 16)])
def test_encode_decode_shapes_and_dtypes(levels, factor):
    cfg = _cfg(levels)
    assert cfg.factor == factor
    size = 2 * factor
    tok = vqgan.ImageTokenizer(cfg, _init(cfg, size))
    assert tok.factor == factor and tok.codebook_size == 32
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 2, 2) and tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < cfg.codebook_size
    # uint8 input is the same as float in [-1, 1].
    np.testing.assert_array_equal(np.asarray(tok.encode(images.astype(np.float32) / 127.5 - 1.0)), np.asarray(tokens))
    out = tok.decode(tokens)
    assert out.shape == (2, size, size, 3) and out.dtype == jnp.uint8


@pytest.mark.parametrize("l2", [True, False])
def test_codebook_round_trip_is_identity_at_the_latent_level(l2):
    cfg = _cfg(3, l2_normalize=l2)
    params = _init(cfg, 16)
    m = vqgan.VQGAN(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 4, 4), 0, cfg.codebook_size)
    images = jax.random.uniform(jax.random.key(2), (2, 16, 16, 3), minval=-1, maxval=1)

    @jax.jit
    def round_trips(p):
        apply = lambda x, method: m.apply({"params": p}, x, method=method)  # noqa: E731
        again = apply(apply(tokens, vqgan.VQGAN.lookup), vqgan.VQGAN.quantize)
        # The quantized latents of an image are codebook vectors: quantising them is a fixed point.
        t = apply(apply(images, vqgan.VQGAN.encode_latents), vqgan.VQGAN.quantize)
        return again, t, apply(apply(t, vqgan.VQGAN.lookup), vqgan.VQGAN.quantize)

    again, t, t_again = round_trips(params)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(t_again), np.asarray(t))


def test_straight_through_gradients_reach_the_encoder():
    for l2 in (True, False):
        cfg = _cfg(2, l2_normalize=l2)
        params = _init(cfg, 8)
        m = vqgan.VQGAN(cfg)
        images = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-1, maxval=1)

        @jax.jit
        def grads(p):
            def rec_loss(p):
                recon, aux = m.apply({"params": p}, images)
                return jnp.mean((recon - images) ** 2), aux
            (_, aux), g_rec = jax.value_and_grad(rec_loss, has_aux=True)(p)
            g_q = jax.grad(lambda p: m.apply({"params": p}, images)[1]["quantizer"])(p)
            # Straight-through: d/dz of a function of z_q equals its derivative at z_q.
            z = m.apply({"params": p}, images, method=vqgan.VQGAN.encode_latents)
            g_z = jax.grad(lambda z: jnp.sum(m.apply({"params": p}, z, method=lambda mod, z: mod.quantizer(z))[0] * 3.0))(z)
            return g_rec, g_q, g_z

        g_rec, g_q, g_z = grads(params)
        assert optax_norm(g_rec["encoder"]) > 0, "no gradient through the quantizer to the encoder"
        # The reconstruction loss alone does not move the codebook (argmin has no gradient)...
        assert optax_norm(g_rec["quantizer"]) == 0
        # ...the codebook loss does, and the commitment loss moves the encoder.
        assert optax_norm(g_q["quantizer"]) > 0 and optax_norm(g_q["encoder"]) > 0
        if not l2:  # with l2 normalisation the gradient is projected, not the identity
            np.testing.assert_allclose(np.asarray(g_z), 3.0)


def optax_norm(tree):
    return float(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(tree)))


def test_wrong_shapes_raise_clear_errors():
    cfg = _cfg(3)
    params = _init(cfg)
    tok = vqgan.ImageTokenizer(cfg, params)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        tok.encode(np.zeros((1, 30, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="4 channels.*expects 3"):
        tok.encode(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        tok.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        tok.encode(np.zeros((1, 32, 32, 3), np.int32))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, height, width\]"):
        tok.decode(np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match="code_dim=4 differs from latent_channels=8"):
        _cfg(3, code_dim=4)
    with pytest.raises(ValueError, match="unknown VQGAN config fields"):
        vqgan.VQGANConfig.from_dict({"channelz": (8, 8)})


def test_parameters_carry_logical_axes_and_shard():
    cfg = _cfg(3, mid_attention=True, quant_conv=True, code_dim=4)
    boxed = jax.eval_shape(lambda: vqgan.init_params(cfg, jax.random.key(0), 16))
    specs = nn.get_partition_spec(boxed)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): s
            for path, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}
    assert flat["quantizer/codebook"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert flat["encoder/conv_in/kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
    assert flat["decoder/mid/attn/to_q/kernel"] == jax.sharding.PartitionSpec("conv_in", "conv_out")
    assert all(len(s) > 0 for s in flat.values()), [k for k, s in flat.items() if len(s) == 0]
    mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    shardings = partitioning.state_shardings(boxed, mesh, partitioning.DEFAULT_RULES)
    assert len(jax.tree_util.tree_leaves(shardings)) == len(flat)


def test_codebook_stats():
    stats = vqgan.codebook_stats(jnp.array([[0, 1], [2, 3]]), 8)
    assert float(stats["usage"]) == 0.5
    np.testing.assert_allclose(float(stats["perplexity"]), 4.0, rtol=1e-6)
    stats = vqgan.codebook_stats(jnp.zeros((4, 4), jnp.int32), 8)
    np.testing.assert_allclose(float(stats["perplexity"]), 1.0, rtol=1e-6)


def test_gan_losses_and_discriminator():
    d = discriminator.PatchDiscriminator(channels=8, num_layers=3, norm_groups=4)
    x = jnp.zeros((2, 32, 32, 3))
    logits = jax.jit(lambda x: d.apply(d.init(jax.random.key(0), x), x))(x)
    assert logits.shape == (2, 2, 2, 1)
    big, small = jnp.full((4,), 5.0), jnp.full((4,), -5.0)
    for kind in ("hinge", "non_saturating"):
        # A discriminator that separates real from fake has a lower loss than one that swaps them.
        assert losses.discriminator_loss(big, small, kind) < losses.discriminator_loss(small, big, kind)
        assert losses.generator_loss(big, kind) < losses.generator_loss(small, kind)
    with pytest.raises(ValueError, match="hinge"):
        losses.generator_loss(big, "wasserstein")
    # R1 of D(x) = sum(a * x) is ||a||^2.
    a = jnp.arange(12.0).reshape(1, 2, 2, 3)
    r1 = losses.r1_penalty(lambda im: jnp.sum(im * a, (1, 2, 3)), jnp.ones((3, 2, 2, 3)))
    np.testing.assert_allclose(float(r1), float(jnp.sum(a**2)))
    assert float(losses.lecam_penalty(big, small, 0.0, 0.0)) == 50.0
    assert float(losses.lecam_penalty(small, big, 0.0, 0.0)) == 0.0


def test_psnr_and_reconstruction_loss():
    a = jnp.zeros((2, 4, 4, 3))
    b = a + 0.1
    np.testing.assert_allclose(float(losses.batch_psnr(b, a)), 10 * np.log10(4 / 0.01), rtol=1e-5)
    np.testing.assert_allclose(float(losses.reconstruction_loss(b, a, "l1")), 0.1, rtol=1e-5)
    np.testing.assert_allclose(float(losses.reconstruction_loss(b, a, "l2")), 0.01, rtol=1e-5)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        losses.reconstruction_loss(a, b, "l3")


def test_perceptual_loss_needs_a_weights_file(tmp_path):
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        losses.load_perceptual_weights("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        losses.load_perceptual_weights(tmp_path / "vgg.npz")
    rng = np.random.default_rng(0)
    arrays, cin = {}, 3
    for idx, width in zip(losses.VGG16_CONVS, losses.VGG16_WIDTHS):
        arrays[f"features.{idx}.weight"] = rng.normal(0, (2 / (9 * cin)) ** 0.5, (width, cin, 3, 3)).astype(np.float32)
        arrays[f"features.{idx}.bias"] = np.zeros(width, np.float32)
        cin = width
    np.savez(tmp_path / "vgg.npz", **arrays)
    w = losses.load_perceptual_weights(tmp_path / "vgg.npz")
    x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1, maxval=1)
    loss = jax.jit(losses.perceptual_loss)
    assert float(loss(w, x, x)) < 1e-10
    near = float(loss(w, x, x + 0.05))
    far = float(loss(w, x, -x))
    assert 0 < near < far
