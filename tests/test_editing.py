"""Editing: pixel -> token masks, inpainting keeps known tokens and pixels, mask-free editing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import MASK, K, N, fake_model, texts

from muse_jax import editing, image_ops, sampling


def test_token_mask_from_pixels_is_any_pooling():
    rng = np.random.default_rng(0)
    pix = rng.random((2, 16, 24)) < 0.02
    tok = image_ops.token_mask_from_pixels(pix, 4)
    assert tok.shape == (2, 4, 6)
    for b in range(2):
        for i in range(4):
            for j in range(6):
                assert tok[b, i, j] == pix[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any()
    one = np.zeros((1, 16, 16), bool)
    one[0, 7, 8] = True  # a single pixel masks exactly the token that holds it
    assert image_ops.token_mask_from_pixels(one, 4).sum() == 1 and image_ops.token_mask_from_pixels(one, 4)[0, 1, 2]
    with pytest.raises(ValueError, match="not divisible"):
        image_ops.token_mask_from_pixels(np.zeros((1, 10, 16)), 4)


def test_downsample_area_and_composite():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    small = image_ops.downsample_area(img, 2)
    assert small.shape == (2, 4, 4, 3) and small.dtype == np.uint8
    assert small[1, 2, 3, 0] == np.round(img[1, 4:6, 6:8, 0].astype(float).mean())
    other = rng.integers(0, 256, img.shape, dtype=np.uint8)
    mask = rng.random((2, 8, 8)) < 0.5
    out = image_ops.composite(img, other, mask)
    np.testing.assert_array_equal(out[~mask], img[~mask])
    np.testing.assert_array_equal(out[mask], other[mask])
    with pytest.raises(ValueError, match="disagree"):
        image_ops.composite(img, other, mask[:, :4])


def test_upsample_nearest_inverts_area_downsampling_of_blocks():
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    big = image_ops.upsample_nearest(small, 4)
    assert big.shape == (2, 16, 16, 3) and big.dtype == np.uint8
    assert (big[1, 8:12, 4:8] == small[1, 2, 1]).all()
    np.testing.assert_array_equal(image_ops.downsample_area(big, 4), small)
    mask = image_ops.upsample_mask(small[..., 0] > 128, 4)
    np.testing.assert_array_equal(mask, big[..., 0] > 128)


def test_inpaint_tokens_keeps_known_tokens():
    apply_fn, text = fake_model(), texts(2)
    r = np.random.default_rng(2)
    tokens = jnp.asarray(r.integers(0, K, (2, N)), jnp.int32)
    token_mask = jnp.asarray(r.random((2, N)) < 0.4)
    out = jax.jit(lambda t, m, rng: editing.inpaint_tokens(lambda x, s: apply_fn(x, text), t, m, rng, mask_token_id=MASK,
                                                           options=sampling.DecodeOptions(num_steps=6)))(
        tokens, token_mask, jax.random.key(0))
    out, tokens, token_mask = np.asarray(out), np.asarray(tokens), np.asarray(token_mask)
    np.testing.assert_array_equal(out[~token_mask], tokens[~token_mask])
    assert ((out >= 0) & (out < K)).all()
    assert (out[token_mask] != tokens[token_mask]).mean() > 0.5  # re-generated, not copied


def test_mask_free_edit_resamples_least_confident_fraction():
    apply_fn, text = fake_model(), texts(2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, K, (2, N)), jnp.int32)
    fn = lambda x, s: apply_fn(x, text)  # noqa: E731
    iters, k = 6, editing.num_resampled(N, 0.08)
    assert k == 5
    out, masks = jax.jit(lambda t, r: editing.mask_free_edit(fn, t, r, mask_token_id=MASK, num_iterations=iters,
                                                              choice_temperature=0.0, return_intermediates=True))(
        tokens, jax.random.key(1))
    masks, out = np.asarray(masks), np.asarray(out)
    assert (masks.sum(-1) == k).all()  # exactly 8 % of the tokens per iteration
    touched = masks.any(0)
    np.testing.assert_array_equal(out[~touched], np.asarray(tokens)[~touched])
    # editing moves the image towards the prompt: its tokens become more likely under it
    prior = np.asarray(sampling.token_log_prob(fn(jnp.full((2, N), MASK), 0), tokens))
    after = np.asarray(sampling.token_log_prob(fn(jnp.full((2, N), MASK), 0), jnp.asarray(out)))
    assert after.mean() > prior.mean() + 0.5
    with pytest.raises(ValueError, match="fraction"):
        editing.num_resampled(N, 0.0)


def test_mask_free_edit_scores_tokens_in_context():
    """A model that predicts the majority visible token: the odd tokens out are re-sampled first."""

    def majority(tokens, step):
        counts = jax.nn.one_hot(tokens, K + 1)[..., :K].sum(1)  # [MASK] counts for nothing
        return jnp.broadcast_to(10.0 * counts[:, None, :] / N, (tokens.shape[0], N, K))

    r = np.random.default_rng(4)
    tokens = np.full((2, N), 3, np.int32)
    odd = np.stack([r.choice(N, 5, replace=False) for _ in range(2)])
    for b in range(2):
        tokens[b, odd[b]] = 7 + b
    out, masks = jax.jit(lambda t, rng: editing.mask_free_edit(
        majority, t, rng, mask_token_id=MASK, num_iterations=2, choice_temperature=0.0, top_k=1,
        return_intermediates=True))(jnp.asarray(tokens), jax.random.key(0))
    for b in range(2):
        np.testing.assert_array_equal(np.nonzero(np.asarray(masks)[0, b])[0], np.sort(odd[b]))
    np.testing.assert_array_equal(np.asarray(out), 3)  # the edit restored the majority everywhere


def test_edit_inputs_are_read_upright(tmp_path):
    """A photo stored on its side with an EXIF orientation is edited as it is shown, and so is its mask."""
    import PIL.Image

    from muse_jax import cascade

    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:, :8] = 255  # the left half white, as stored
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the stored left half is the shown top half
    PIL.Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    PIL.Image.fromarray(stored[..., 0]).save(tmp_path / "mask.png", exif=exif)
    image = cascade.load_image(tmp_path / "photo.png", 16)
    assert (image[:8] == 255).all() and (image[8:] == 0).all()
    mask = cascade.load_mask(tmp_path / "mask.png", tmp_path / "photo.png", 16)
    assert mask[:8].all() and not mask[8:].any()
