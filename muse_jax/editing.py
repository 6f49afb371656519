"""Image editing with the decode loop (Muse 3.3): inpainting, outpainting, mask-free editing.

Mask-based editing is generation with some tokens given: a pixel mask (True = regenerate)
becomes a token mask (`image_ops.token_mask_from_pixels`), the known tokens stay
fixed and the masked ones are decoded with the new prompt; the result is composited so
that pixels outside the mask are exactly the input's.

Mask-free editing (Muse 3.3.2) starts from an image's tokens and a new prompt and, for a
number of iterations, masks the least confident `fraction` of the tokens and re-samples
them with the new prompt (and guidance). A token's confidence is its log-probability under
the new prompt given the other tokens: the input tokens are scored first in
`num_scoring_passes` forward passes, each masking a random 1/P of the positions (masks of
the sizes the model was trained on); a re-sampled token takes the log-probability it was
sampled with. So the tokens that the new prompt and their context find least likely are
re-sampled first, and the input's other tokens stay as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from muse_jax import sampling


def inpaint_tokens(
    logits_fn: sampling.LogitsFn,
    tokens: jax.Array,
    token_mask: jax.Array,
    rng: jax.Array,
    *,
    mask_token_id: int,
    options: sampling.DecodeOptions = sampling.DecodeOptions(),
) -> jax.Array:
    """Decodes the masked tokens (token_mask True) with the others fixed: [B, N] -> [B, N]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    start = jnp.where(jnp.asarray(token_mask, bool), mask_token_id, tokens)
    return sampling.decode(logits_fn, start, rng, mask_token_id=mask_token_id, options=options)


def num_resampled(num_tokens: int, fraction: float) -> int:
    """Tokens re-sampled per mask-free iteration: round(fraction * N), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"mask-free editing fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * num_tokens)))


def mask_free_edit(
    logits_fn: sampling.LogitsFn,
    tokens: jax.Array,
    rng: jax.Array,
    *,
    mask_token_id: int,
    num_iterations: int,
    fraction: float = 0.08,
    choice_temperature: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    num_scoring_passes: int = 4,
    return_intermediates: bool = False,
):
    """Mask-free editing: re-sample the least confident tokens, num_iterations times: [B, N] -> [B, N].

    `logits_fn(tokens, i)` is called with the iteration index i (for a guidance schedule
    built with num_steps=num_iterations), and with step 0 for the initial scoring passes.
    The Gumbel noise on the confidences (choice_temperature) falls linearly to zero. With
    return_intermediates, also returns the masks re-sampled at each iteration: bool [I, B, N].
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    if num_scoring_passes < 1:
        raise ValueError(f"num_scoring_passes must be >= 1, got {num_scoring_passes}")
    batch, length = tokens.shape
    k = num_resampled(length, fraction)
    score_rng, rng = jax.random.split(rng)
    # Position i is scored in pass group[i]: a random balanced split of the positions.
    group = sampling.ranks(jax.random.uniform(score_rng, (batch, length))) % num_scoring_passes

    def score(p, conf):
        masked = group == p
        logits = logits_fn(jnp.where(masked, mask_token_id, tokens), jnp.asarray(0)).astype(jnp.float32)
        return jnp.where(masked, sampling.token_log_prob(logits, tokens), conf)

    confidence = jax.lax.fori_loop(0, num_scoring_passes, score, jnp.zeros((batch, length), jnp.float32))

    def body(i, state):
        cur, conf, history = state
        sample_rng, choice_rng = jax.random.split(jax.random.fold_in(rng, i))
        anneal = choice_temperature * (1.0 - (i + 1.0) / num_iterations)
        noisy = conf + anneal * sampling.gumbel_noise(choice_rng, conf.shape)
        _, idx = jax.lax.top_k(-noisy, k)  # the k least confident
        remask = jnp.zeros((batch, length), bool).at[jnp.arange(batch)[:, None], idx].set(True)
        logits = logits_fn(jnp.where(remask, mask_token_id, cur), i).astype(jnp.float32)
        sampled = sampling.sample_categorical(sample_rng, sampling.process_logits(logits, temperature, top_k))
        cur = jnp.where(remask, sampled, cur)
        conf = jnp.where(remask, sampling.token_log_prob(logits, sampled), conf)
        if return_intermediates:
            history = jax.lax.dynamic_update_slice(history, remask[None], (i, 0, 0))
        return cur, conf, history

    history = jnp.zeros((num_iterations, batch, length) if return_intermediates else (0,), bool)
    out, _, history = jax.lax.fori_loop(0, num_iterations, body, (tokens, confidence, history))
    return (out, history) if return_intermediates else out
