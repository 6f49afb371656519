"""Shared building blocks: the one attention implementation, dtype names and the logical axis names.

Logical axis names used on parameters and activations (mapped to mesh axes by the rules
in the config, see `muse_jax/training/partitioning.py`):
  batch, length, kv_length   activations
  embed                      model width (and text width)
  heads, kv                  attention heads and per-head dimension
  mlp                        feed-forward hidden width
  vocab                      token vocabulary / codebook
  conv_in, conv_out          convolution channels (VQGAN, discriminator)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name):
    """A compute/parameter dtype from its config name ("float32", "bfloat16", "float16"); dtypes pass through."""
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention in heads-major layout.

    q: [b, h, lq, d], k and v: [b, h, lk, d]; bias broadcastable to [b, h, lq, lk]
    (e.g. T5's relative position bias); mask broadcastable to [b, h, lq, lk], True where
    attending is allowed. scale defaults to 1/sqrt(d); T5 uses scale=1.0.
    Logits and softmax are computed in float32 whatever the input dtype.
    Returns [b, h, lq, d] in q's dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)  # [.., lq, d] is no larger than the [.., lq, lk] logits
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    # Softmax with the normalisation applied to the [.., lq, d] output rather than the [.., lq, lk]
    # weights (the same function; one pass less over the weights when lk > d).
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / weights.sum(axis=-1, keepdims=True)).astype(q.dtype)
