"""Mask schedules (MaskGIT/Muse) and the training masks drawn from them.

A schedule maps progress r in [0, 1] to the fraction of tokens still masked:
gamma(0) = 1 (all masked) and gamma(1) = 0. Muse trains with mask rates drawn from the
cosine schedule at uniform r, i.e. the truncated arccos density
p(rate) = 2 / (pi * sqrt(1 - rate^2)) on [0, 1], whose mean is 2/pi ~ 0.64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEDULES = ("cosine", "linear", "square", "cubic", "sqrt")


def schedule(name: str, r: jax.Array) -> jax.Array:
    """Fraction of tokens masked at progress r (0 -> 1, 1 -> 0)."""
    r = jnp.asarray(r, jnp.float32)
    if name == "cosine":
        return jnp.cos(jnp.pi / 2 * r)
    if name == "linear":
        return 1.0 - r
    if name == "square":
        return 1.0 - r**2
    if name == "cubic":
        return 1.0 - r**3
    if name == "sqrt":
        return 1.0 - jnp.sqrt(r)
    raise ValueError(f"unknown mask schedule {name!r}; expected one of {SCHEDULES}")


def sample_mask_rates(rng: jax.Array, batch: int, schedule_name: str = "cosine") -> jax.Array:
    """Per-example mask rates gamma(r), r ~ U[0, 1): [batch] float32."""
    return schedule(schedule_name, jax.random.uniform(rng, (batch,)))


def random_mask(rng: jax.Array, rates: jax.Array, num_tokens: int) -> jax.Array:
    """[batch, num_tokens] bool, True = masked; exactly max(1, ceil(rate*n)) per row.

    The masked positions are a uniformly random subset of that size.
    """
    num_masked = jnp.clip(jnp.ceil(rates * num_tokens), 1, num_tokens).astype(jnp.int32)
    scores = jax.random.uniform(rng, (rates.shape[0], num_tokens))
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return ranks < num_masked[:, None]


def mask_tokens(
    rng: jax.Array, tokens: jax.Array, mask_token_id: int, schedule_name: str = "cosine"
) -> tuple[jax.Array, jax.Array]:
    """Muse training corruption: tokens [B, N] -> (inputs with [MASK] ids, mask bool [B, N]).

    Per example a rate gamma(r), r ~ U[0, 1) (cosine: truncated arccos), at least one token masked.
    """
    rate_rng, pos_rng = jax.random.split(rng)
    rates = sample_mask_rates(rate_rng, tokens.shape[0], schedule_name)
    mask = random_mask(pos_rng, rates, tokens.shape[1])
    return jnp.where(mask, jnp.asarray(mask_token_id, tokens.dtype), tokens), mask
