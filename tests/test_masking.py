"""Training masks follow the arccos schedule; the loss sees masked positions only."""
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import masking
from muse_jax.training import step as step_lib


def test_mask_rates_follow_truncated_arccos():
    rates = np.asarray(masking.sample_mask_rates(jax.random.key(0), 200_000, "cosine"))
    assert abs(rates.mean() - 2 / np.pi) < 0.02  # E[rate] = 2/pi ~ 0.64
    # CDF of the truncated arccos density: P(rate <= x) = 1 - (2/pi) arccos(x)
    for x in (0.2, 0.5, 0.8, 0.95):
        assert abs((rates <= x).mean() - (1 - 2 / np.pi * np.arccos(x))) < 0.01


def test_mask_tokens_counts_and_at_least_one():
    tokens = jnp.arange(4 * 64, dtype=jnp.int32).reshape(4, 64) % 50
    inputs, mask = jax.jit(lambda r: masking.mask_tokens(r, tokens, 512))(jax.random.key(1))
    inputs, mask = np.asarray(inputs), np.asarray(mask)
    assert (inputs[mask] == 512).all() and (inputs[~mask] == np.asarray(tokens)[~mask]).all()
    rates = np.asarray(masking.sample_mask_rates(jax.random.split(jax.random.key(1))[0], 4))
    np.testing.assert_array_equal(mask.sum(1), np.clip(np.ceil(rates * 64), 1, 64))
    tiny = np.asarray(masking.random_mask(jax.random.key(2), jnp.zeros((8,)), 16))
    assert (tiny.sum(1) == 1).all()  # rate 0 still masks one token


def test_masked_loss_ignores_unmasked_positions():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 5, (2, 6)))
    mask = jnp.asarray([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], bool)
    loss, acc = step_lib.masked_cross_entropy(logits, targets, mask, 0.1)
    changed = logits.at[~mask].set(1e3 * jnp.asarray(rng.normal(size=(7, 5)), jnp.float32))
    loss2, acc2 = step_lib.masked_cross_entropy(changed, jnp.where(mask, targets, 0), mask, 0.1)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    assert acc == acc2
    # and equals the mean smoothed cross entropy over the 5 masked positions
    lp = jax.nn.log_softmax(logits)
    onehot = jax.nn.one_hot(targets, 5) * 0.9 + 0.1 / 5
    manual = -(onehot * lp).sum(-1)[mask].mean()
    np.testing.assert_allclose(loss, manual, rtol=1e-6)
