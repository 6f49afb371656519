"""Shared building blocks: the one attention function, dtype names and the logical axis names.

Logical axis names used on parameters and activations (mapped to mesh axes by the rules
in the config, see `muse_jax/partitioning.py`):
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


ATTENTION_IMPLEMENTATIONS = ("xla", "blockwise", "fused", "auto")
# "auto" switches to the blockwise path from this many logits per head (e.g. 1024 x 1024 tokens).
AUTO_BLOCKWISE_MIN_LOGITS = 1024 * 1024


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "xla",
    block_size: int = 512,
) -> jax.Array:
    """Softmax attention in heads-major layout.

    q: [b, h, lq, d], k and v: [b, h, lk, d]; bias broadcastable to [b, h, lq, lk]
    (e.g. T5's relative position bias); mask broadcastable to [b, h, lq, lk], True where
    attending is allowed (a row with no allowed key averages all values, as a softmax of
    equal logits). scale defaults to 1/sqrt(d); T5 uses scale=1.0.
    Logits and softmax are computed in float32 whatever the input dtype.
    Returns [b, h, lq, d] in q's dtype.

    implementation (the same function, computed differently):
      "xla"        the [b, h, lq, lk] logits at once (fastest for short sequences);
      "blockwise"  queries and keys in blocks of `block_size` with a running softmax (Rabe &
                   Staats 2021; FlashAttention's algorithm): O(block_size^2) logits per head live
                   in the forward and the (rematerialised) backward pass;
      "fused"      `jax.nn.dot_product_attention`: cuDNN's flash-attention kernel on GPU (bf16 or
                   fp16 inputs, head dim a multiple of 8), XLA's reference elsewhere;
      "auto"       fused on GPU where cuDNN takes the shapes, otherwise blockwise when
                   lq * lk >= AUTO_BLOCKWISE_MIN_LOGITS, else xla.
    (On TPU a Pallas splash-attention kernel would be the fused choice; not written yet.)
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation in ("fused", "auto") and jax.default_backend() == "gpu":
        try:
            return _fused_attention(q, k, v, bias, mask, scale, "cudnn")
        except (NotImplementedError, ValueError):  # cuDNN does not take these dtypes or shapes
            if implementation == "fused":
                raise
    elif implementation == "fused":
        return _fused_attention(q, k, v, bias, mask, scale, None)
    if implementation == "auto":
        big = q.shape[2] * k.shape[2] >= AUTO_BLOCKWISE_MIN_LOGITS
        implementation = "blockwise" if big else "xla"
    if scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)  # [.., lq, d] is no larger than the [.., lq, lk] logits
    if implementation == "blockwise":
        return _blockwise_attention(q, k, v, bias, mask, block_size)
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


def _fused_attention(q, k, v, bias, mask, scale, implementation):
    """`jax.nn.dot_product_attention` (layout [b, l, h, d]) from and to heads-major [b, h, l, d]."""
    lq, lk = q.shape[2], k.shape[2]
    if implementation == "cudnn":  # cuDNN wants bias and mask over the full [lq, lk]
        bias = None if bias is None else jnp.broadcast_to(bias, _as_4d(bias).shape[:2] + (lq, lk))
        mask = None if mask is None else jnp.broadcast_to(mask, _as_4d(mask).shape[:2] + (lq, lk))
    out = jax.nn.dot_product_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2),
        bias=None if bias is None else _as_4d(bias).astype(jnp.float32 if implementation is None else q.dtype),
        mask=None if mask is None else _as_4d(mask).astype(bool), scale=scale, implementation=implementation,
    )
    return out.swapaxes(1, 2)


def _as_4d(x):
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _num_blocks(length: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block length) covering `length` with blocks of at most `block_size`, padding < n."""
    n = -(-length // max(1, block_size))
    return n, -(-length // n)


def _blocks(x, axis: int, n: int, size: int):
    """x's `axis` cut into n blocks of `size` (zero-padded at the end), the block index moved first.

    None where x is None or broadcasts along `axis` (length 1, the blocks longer): every block uses all of x.
    """
    if x is None or x.shape[axis] == 1 < n * size:
        return None
    pad = n * size - x.shape[axis]
    if pad:
        x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
    return jnp.moveaxis(x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1 :]), axis, 0)


def _blockwise_attention(q, k, v, bias, mask, block_size):
    """The xla path's function (q already scaled), a [block, block] tile of logits at a time.

    An outer scan over query blocks, an inner scan over key blocks carrying the running row
    maximum m, sum of exponentials l and unnormalised output acc; a new block rescales them by
    exp(m_old - m_new). The key-block body is rematerialised: the backward pass recomputes each
    tile of logits and keeps only m per row and key block (acc and l enter linearly, with the
    rescaling held constant, so they need not be kept). Keys added by padding get weight exactly 0;
    a masked key gets the xla path's float32 minimum (so a fully masked row is a plain mean).
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    nq, bq = _num_blocks(lq, block_size)
    nk, bk = _num_blocks(lk, block_size)
    bias = None if bias is None else _as_4d(bias)
    mask = None if mask is None else _as_4d(mask)
    neg = jnp.finfo(jnp.float32).min
    valid = (jnp.arange(nk * bk) < lk).reshape(nk, bk) if nk * bk != lk else None  # real (not padded) keys

    def key_block(carry, xs, q_blk, bias_row, mask_row):
        acc, m, l = carry
        k_blk, v_blk, bias_blk, mask_blk, valid_blk = xs
        s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32)
        bias_blk = bias_row if bias_blk is None else bias_blk
        if bias_blk is not None:
            s = s + bias_blk.astype(jnp.float32)
        mask_blk = mask_row if mask_blk is None else mask_blk
        if mask_blk is not None:
            s = jnp.where(mask_blk, s, neg)
        if valid_blk is not None:
            s = jnp.where(valid_blk, s, neg)
        # The result does not depend on the shift m (numerator and denominator share it), so no
        # gradient flows through it, as in the xla path.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
        p = jnp.exp(s - m_new[..., None])
        if valid_blk is not None:
            p = jnp.where(valid_blk, p, 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        return (acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(axis=-1)), None

    ks, vs = _blocks(k, 2, nk, bk), _blocks(v, 2, nk, bk)

    def query_block(_, xs):
        q_blk, bias_row, mask_row = xs
        bias_row = bias if bias_row is None else bias_row  # [.., bq | 1, lk | 1]
        mask_row = mask if mask_row is None else mask_row
        body = jax.checkpoint(lambda c, x: key_block(c, x, q_blk, bias_row, mask_row), prevent_cse=False)
        init = (jnp.zeros((b, h, bq, d), jnp.float32), jnp.full((b, h, bq), neg), jnp.zeros((b, h, bq), jnp.float32))
        xs_k = (ks, vs, _blocks(bias_row, 3, nk, bk), _blocks(mask_row, 3, nk, bk), valid)
        (acc, _, l), _ = jax.lax.scan(body, init, xs_k)
        return None, (acc / l[..., None]).astype(q.dtype)

    xs_q = (_blocks(q, 2, nq, bq), _blocks(bias, 2, nq, bq), _blocks(mask, 2, nq, bq))
    _, out = jax.lax.scan(query_block, None, xs_q)  # [nq, b, h, bq, d]
    return jnp.moveaxis(out, 0, 2).reshape(b, h, nq * bq, d)[:, :, :lq]
