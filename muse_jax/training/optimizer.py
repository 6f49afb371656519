"""The transformers' optimizer: learning-rate schedule, gradient clipping, AdamW or Adafactor.

Reads `train_config` (`config.train`): `optimizer` ("adamw" or "adafactor"), `lr`, `warmup_steps`,
`num_steps`, `end_lr_fraction` (the schedule), `b1`, `b2`, `weight_decay`, `grad_clip`.

The paper (Muse) trains with Adafactor at lr 1e-4 (5k warm-up steps, cosine decay), b1 0.9,
b2 0.96 and weight decay 0.045. Here those numbers mean what they mean for AdamW. The Adafactor
(`scale_by_adafactor`) keeps exponential moving averages with decays `b1` (momentum) and `b2`
(second moment), both bias-corrected; the second moment of a >= 2-D parameter is factored into
row and column means over its last two axes (Shazeer & Stern 2018, epsilon1 1e-30); each
parameter's normalized update is clipped to RMS 1 before the momentum. The step is `lr * update`
(no scaling by the parameter's RMS), and weight decay is decoupled and scaled by the learning rate:

    p <- p - lr_t * (update + weight_decay * p)        (decay on >= 2-D leaves only)

The momentum mirrors the parameters (and is sharded like them); the factored statistics are small
and replicated.
Both optimizers clip the gradients' global norm to `grad_clip` first (when > 0).
`optimizer_state_dtype` ("" = the parameters' dtype) keeps the optimizer's arithmetic and state in
another dtype (float32 moments for bfloat16 parameters, or bfloat16 moments to save memory).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warmup to `lr`, cosine decay to `lr * end_lr_fraction` at `num_steps`."""
    t = train_config
    warmup = max(0, min(int(t.warmup_steps), int(t.num_steps) - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(t.lr), warmup_steps=warmup,
        decay_steps=max(int(t.num_steps), warmup + 1), end_value=float(t.lr) * float(t.end_lr_fraction),
    )


def _decay_mask(params):
    """Weight decay on matrices only (not biases, norms' scales)."""
    return jax.tree_util.tree_map(lambda x: getattr(x, "ndim", 0) >= 2, params)


class AdafactorState(NamedTuple):
    """`count`: steps taken (int32 scalar). `mu`: momentum, shaped like the params.
    `nu`: per parameter, the full second moment (ndim < 2) or a (row, col) pair of EMAs of
    g^2 averaged over the last and the second-to-last axis (ndim >= 2)."""
    count: jax.Array
    mu: Any
    nu: Any


def _factored(x) -> bool:
    return x.ndim >= 2


def scale_by_adafactor(b1: float = 0.9, b2: float = 0.96, eps: float = 1e-30, clip_threshold: float = 1.0
                       ) -> optax.GradientTransformation:
    """Adafactor's factored second moment with Adam's EMAs and bias corrections.

    At step t = 1, 2, ... for each parameter's gradient g (arithmetic in float32):

      ndim >= 2, factored over the last two axes (leading axes kept):
        r <- b2 r + (1 - b2) mean_{-1}(g^2 + eps)        [..., rows]
        c <- b2 c + (1 - b2) mean_{-2}(g^2 + eps)        [..., cols]
        v_hat = r[..., :, None] c[..., None, :] / mean_{-1}(r)[..., None, None] / (1 - b2^t)
      ndim < 2:
        v <- b2 v + (1 - b2) (g^2 + eps);  v_hat = v / (1 - b2^t)
      u = g / sqrt(v_hat);  u <- u / max(1, rms(u) / clip_threshold)     (per parameter)
      m <- b1 m + (1 - b1) u;  update = m / (1 - b1^t)

    The momentum is taken on the normalized, clipped update (as in Adafactor with b1 > 0).
    """

    def init(params):
        def nu(p):
            if _factored(p):
                return (jnp.zeros(p.shape[:-1], p.dtype), jnp.zeros(p.shape[:-2] + p.shape[-1:], p.dtype))
            return jnp.zeros_like(p)

        return AdafactorState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.zeros_like, params),
                              jax.tree_util.tree_map(nu, params))

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t

        def one(g, m, nu):
            dtype, m_dtype = g.dtype, m.dtype
            g = g.astype(jnp.float32)
            g2 = jnp.square(g) + eps
            if _factored(g):
                r = b2 * nu[0].astype(jnp.float32) + (1.0 - b2) * g2.mean(-1)
                c = b2 * nu[1].astype(jnp.float32) + (1.0 - b2) * g2.mean(-2)
                # g / sqrt(v_hat), as two factors: r * c would underflow float32 for g = 0.
                u = g * jax.lax.rsqrt(r / r.mean(-1, keepdims=True))[..., :, None] * jax.lax.rsqrt(c / c2)[..., None, :]
                new_nu = (r.astype(nu[0].dtype), c.astype(nu[1].dtype))
            else:
                v = b2 * nu.astype(jnp.float32) + (1.0 - b2) * g2
                u = g * jax.lax.rsqrt(v / c2)
                new_nu = v.astype(nu.dtype)
            u = u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(jnp.square(u))) / clip_threshold)
            m = b1 * m.astype(jnp.float32) + (1.0 - b1) * u
            return (m / c1).astype(dtype), m.astype(m_dtype), new_nu

        flat, treedef = jax.tree_util.tree_flatten(grads)
        out = [one(*x) for x in zip(flat, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu))]
        updates, mu, nu = (jax.tree_util.tree_unflatten(treedef, [o[i] for o in out]) for i in range(3))
        return updates, AdafactorState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Gradient clipping + AdamW or Adafactor (see the module docstring), both with the config's
    b1, b2 and weight decay (the paper's 0.9, 0.96, 0.045) and the learning-rate schedule."""
    t = train_config
    schedule = learning_rate_schedule(t)
    if t.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=_decay_mask)
    elif t.optimizer == "adafactor":
        opt = optax.chain(
            scale_by_adafactor(b1=float(t.b1), b2=float(t.b2)),
            optax.add_decayed_weights(float(t.weight_decay), mask=_decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    else:
        raise ValueError(f"unknown optimizer {t.optimizer!r}; expected 'adamw' or 'adafactor'")
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip and t.grad_clip > 0 else []
    tx = optax.chain(*chain, opt)
    state_dtype = t.get("optimizer_state_dtype", "")
    return with_state_dtype(tx, state_dtype) if state_dtype else tx


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` computing in and keeping its state (moments) in `dtype` ("float32", "bfloat16"), whatever the
    parameters' dtype: bfloat16 parameters with float32 moments, or float32 parameters with bfloat16 ones.
    The updates come back in each gradient's dtype."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"config.train.optimizer_state_dtype={str(dtype)!r}: expected a float dtype")

    def cast(tree):
        return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return inner.init(cast(params))

    def update(grads, state, params=None):
        updates, state = inner.update(cast(grads), state, None if params is None else cast(params))
        return jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), updates, grads), state

    return optax.GradientTransformation(init, update)
