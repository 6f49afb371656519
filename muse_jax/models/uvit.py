"""aMUSEd's masked-token transformer: a Flax port of diffusers' `UVit2DModel`.

aMUSEd (Patil et al. 2024) predicts VQGAN tokens like Muse, with a U-ViT: a few convolutional
"U" blocks at the token-grid resolution (optionally halved once) around a stack of transformer
layers, all conditioned on CLIP text states (cross-attention) and on a pooled text embedding plus
micro-conditions (adaptive norms). Loading the public weights needs the same arithmetic, so this
module follows diffusers' forward pass operation by operation; `convert_diffusers` /
`load_diffusers_dir` read its state dict.

Data flow (g = tokens per side, C = block_out_channels, H = hidden_size, K = codebook_size):
  tokens [B, g*g] (row-major grid; mask id = vocab_size - 1)
    -> embed: embedding table [vocab, in_channels] -> RMSNorm -> 1x1 conv -> [B, g, g, C]
  encoder_hidden_states [B, L, encoder_hidden_size] -> encoder_proj -> RMSNorm -> text [B, L, H]
  micro_conds [B, m] -> sinusoidal embedding of each value (micro_cond_encode_dim, cos first)
    -> [B, m * micro_cond_encode_dim], concatenated AFTER pooled_text_emb [B, cond_embed_dim]
    -> cond_embed (Linear, SiLU, Linear) -> cond [B, H]
  down_block: [RMSNorm + 2x2 stride-2 conv if downsample] then num_res_blocks x
      ConvNeXt block (depthwise 3x3, RMSNorm, Linear 4C, GELU, GlobalResponseNorm, Linear C,
                      residual, then x * (1 + scale) + shift from cond)
      attention block (two RMSNorm'ed cross-attentions to the text, each residual; the text
                       mapped SiLU -> Linear(H -> C) first when H != C; no self-attention)
  -> [B, n, C] (n = (g or g/2)^2) -> RMSNorm -> Linear(C -> H)
  -> num_hidden_layers x transformer layer, each sub-layer residual with an adaptive norm
     (norm(x) * (1 + scale) + shift, scale/shift = Linear(SiLU(cond))):
       adaptive RMSNorm -> self-attention; adaptive RMSNorm -> cross-attention to the text;
       adaptive LayerNorm -> GEGLU feed-forward (Linear(H -> 2I), h * gelu(gate), Linear(I -> H))
  -> RMSNorm -> Linear(H -> C) -> up_block (as down_block; then RMSNorm + 2x2 stride-2 transposed
     conv if upsample) -> mlm_layer: 1x1 conv (C -> in_channels), RMSNorm, 1x1 conv (-> K)
  -> logits [B, g*g, K] float32, logits[b, i*g + j] == diffusers' output[b, :, i, j].
No position embedding anywhere: positions are only seen by the 3x3 depthwise convolutions.
GELU is exact (erf), norm statistics and the softmax are float32, dropout only with
deterministic=False.

Parameter tree (`nn.unbox(init_params(config, rng))`; names follow diffusers' modules, the
logical axis names of `muse_jax/models/layers.py` in brackets; `bias` leaves exist only with
use_bias=True and norm `scale`s only with ln_elementwise_affine=True, as in diffusers):
  encoder_proj             kernel [encoder_hidden_size, H] (None, embed)
  encoder_proj_layer_norm  scale [H] (embed)
  embed                    embeddings/embedding [vocab, in_channels] (vocab, embed);
                           layer_norm/scale; conv/kernel [in_channels, C] (mlp, embed)
  cond_embed               linear_1/kernel [cond_embed_dim + micro_cond_embed_dim, H] (None, embed);
                           linear_2/kernel [H, H] (mlp, embed)
  down_block, up_block     downsample (down_block only) / upsample (up_block only):
                             norm/scale; conv/kernel [2, 2, C, C] (None, None, mlp, embed)
                           res_blocks_{i}: depthwise/kernel [3, 3, C] (None, None, embed); norm/scale;
                             channelwise_linear_1/kernel [C, 4C] (embed, mlp);
                             channelwise_norm/gamma, beta [4C] (mlp);
                             channelwise_linear_2/kernel [4C, C] (mlp, embed);
                             cond_embeds_mapper/kernel [H, 2, C] (mlp, None, embed)  (scale, shift)
                           attention_blocks_{i}: kv_mapper/kernel [H, C] (mlp, embed) (only if H != C);
                             norm1/scale, norm2/scale; attn1, attn2 (attention, width C, block_num_heads)
  project_to_hidden_norm   scale [C];  project_to_hidden   kernel [C, H] (mlp, embed)
  transformer_layers_{i}   norm1, norm2, norm3: linear/kernel [H, 2, H] (mlp, None, embed) (scale, shift),
                             norm/scale (norm3 also norm/bias: a LayerNorm);
                           attn1 (self), attn2 (cross): attention, width H, num_attention_heads;
                           ff: proj/kernel [H, 2, I] (embed, None, mlp) (value, gate); out/kernel [I, H] (mlp, embed)
  project_from_hidden_norm scale [H];  project_from_hidden kernel [H, C] (mlp, embed)
  mlm_layer                conv1/kernel [C, in_channels] (mlp, embed); layer_norm/scale;
                           conv2/kernel [in_channels, K] (embed, vocab)
  attention                to_q, to_k, to_v/kernel [width, heads, head_dim] (embed, heads, kv), bias (heads, kv);
                           to_out/kernel [heads, head_dim, width] (heads, kv, embed), bias (embed)
Norm scales are (embed), biases follow their kernel's output names. A kernel whose input and output
are both model widths names its input "mlp" (split by the tensor axis, like a row-parallel layer)
and its output "embed" (split by fsdp), so data / FSDP / tensor meshes shard it as they shard the
Muse transformer (`muse_jax/partitioning.py`).

    config, params = load_diffusers_dir("amused-256/transformer")    # nothing is downloaded
    logits = UVit2D(config).apply({"params": params}, tokens, text_states, pooled, micro_conds)
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models.layers import dot_product_attention
from muse_jax.models.layers import dtype as _dtype

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UVit2DConfig:
    """diffusers' `UVit2DModel` arguments (same names and defaults: the aMUSEd-256 sizes) + dtype."""

    hidden_size: int = 1024
    use_bias: bool = False
    hidden_dropout: float = 0.0
    cond_embed_dim: int = 768  # width of the pooled text embedding
    micro_cond_encode_dim: int = 256  # sinusoidal width of each micro-condition value
    micro_cond_embed_dim: int = 1280  # all micro-conditions together: 5 * 256
    encoder_hidden_size: int = 768  # width of the text encoder states
    vocab_size: int = 8256  # codebook + mask token, rounded up; mask id = vocab_size - 1
    codebook_size: int = 8192
    in_channels: int = 768  # token embedding width
    block_out_channels: int = 768  # width of the convolutional U blocks
    num_res_blocks: int = 3
    downsample: bool = False
    upsample: bool = False
    block_num_heads: int = 12
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    attention_dropout: float = 0.0
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 64  # diffusers' nominal token grid side (no parameter depends on it)
    dtype: str = "float32"  # activation / compute dtype; parameters stay float32
    remat: bool = False  # recompute each transformer layer's activations in the backward pass (saves memory)

    def __post_init__(self):
        for f in ("hidden_size", "cond_embed_dim", "micro_cond_encode_dim", "micro_cond_embed_dim",
                  "encoder_hidden_size", "vocab_size", "codebook_size", "in_channels", "block_out_channels",
                  "block_num_heads", "num_attention_heads", "intermediate_size", "sample_size"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"UVit2DConfig.{f} must be positive, got {getattr(self, f)}")
        for f in ("num_res_blocks", "num_hidden_layers"):
            if int(getattr(self, f)) < 0:
                raise ValueError(f"UVit2DConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.hidden_size < self.num_attention_heads:
            raise ValueError(f"UVit2DConfig: hidden_size {self.hidden_size} < num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.block_out_channels < self.block_num_heads:
            raise ValueError(f"UVit2DConfig: block_out_channels {self.block_out_channels} < block_num_heads "
                             f"{self.block_num_heads}")
        if self.micro_cond_embed_dim % self.micro_cond_encode_dim:
            raise ValueError(f"UVit2DConfig: micro_cond_embed_dim {self.micro_cond_embed_dim} is not a multiple of "
                             f"micro_cond_encode_dim {self.micro_cond_encode_dim} (one encoding per micro-condition)")
        _dtype(self.dtype)

    @property
    def mask_token_id(self) -> int:
        """The id of a masked token: the last embedding row (aMUSEd's scheduler: 8255 of 8256)."""
        return self.vocab_size - 1

    @property
    def num_micro_conds(self) -> int:
        """How many micro-condition values the cond MLP expects (aMUSEd: 5)."""
        return self.micro_cond_embed_dim // self.micro_cond_encode_dim

    @classmethod
    def from_diffusers(cls, config_dict: Mapping[str, Any], **overrides) -> UVit2DConfig:
        """From a diffusers `UVit2DModel` config (config.json or `.config`), plus our fields (dtype).

        Keys starting with "_" (_class_name, _diffusers_version, ...) are ignored; a _class_name other
        than UVit2DModel and any other unknown key are a ValueError naming them."""
        d = dict(config_dict)
        class_name = d.get("_class_name")
        if class_name not in (None, "UVit2DModel"):
            raise ValueError(f"diffusers config _class_name={class_name!r}: expected 'UVit2DModel'")
        d = {k: v for k, v in d.items() if not str(k).startswith("_")}
        d.update(overrides)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UVit2DConfig:
        """From a dict (e.g. `to_dict()`); unknown keys are a ValueError."""
        d = dict(d)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown / unsupported UVit2D config keys {unknown}; known: {sorted(fields)}")
        # JSON gives ints for floats (e.g. hidden_dropout: 0); cast each value to its field's type.
        casts = {"int": int, "float": float, "bool": bool, "str": str}
        return cls(**{k: casts.get(str(fields[k].type), lambda v: v)(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Layers (parameters carry logical axis names, see muse_jax/models/layers.py)
# ---------------------------------------------------------------------------------------

_embedding_init = nn.initializers.normal(0.02)


def _fan_in_init(n_in: int, n_out: int):
    """LeCun truncated normal for a kernel whose first n_in axes are its inputs, last n_out its outputs."""
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
    )


# Depthwise: each output channel sees its own 3x3 window only (fan-in 9).
_DEPTHWISE_INIT = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=(), batch_axis=(2,))


def _param(mod: nn.Module, name: str, axes, shape, init):
    return mod.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


class Linear(nn.Module):
    """y = x @ kernel (+ bias), contracting x's last `n_in` axes; kernel [*in_shape, *out_shape].

    `axes` names the kernel's axes (inputs, then outputs); the bias [*out_shape] takes the output names.
    Several output axes keep the pieces of a fused projection apart, e.g. [H, 2, C] for (scale, shift)
    or [E, heads, head_dim], so a split along the last axis never separates what is used together."""

    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool
    dtype: Any = jnp.float32
    n_in: int = 1

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in:]
        lead = x.shape[: x.ndim - self.n_in]
        n_out = len(self.out_shape)
        kernel = _param(self, "kernel", self.axes, (*in_shape, *self.out_shape), _fan_in_init(self.n_in, n_out))
        # x's last n_in axes against the kernel's first n_in, both in their own shapes: [*lead, *out_shape].
        # A plain lax.dot_general on the parameter itself, so a wrapper that intercepts it (qwix's LoRA)
        # recognises the kernel and names its adapters after the kernel's axes.
        contract = (tuple(range(len(lead), x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            y = y + _param(self, "bias", self.axes[self.n_in:], self.out_shape, nn.initializers.zeros).astype(y.dtype)
        return y


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) over the last axis (in float32), times `scale` if affine; x's dtype out."""

    eps: float
    affine: bool = True

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.affine:
            y = y * _param(self, "scale", ("embed",), (x.shape[-1],), nn.initializers.ones)
        return y.astype(x.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm over the last axis in float32 (two-pass variance); optional scale / bias."""

    eps: float
    affine: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + self.eps)
        if self.affine:
            y = y * _param(self, "scale", ("embed",), (x.shape[-1],), nn.initializers.ones)
            if self.use_bias:
                y = y + _param(self, "bias", ("embed",), (x.shape[-1],), nn.initializers.zeros)
        return y.astype(x.dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on x [B, n, D] (n = the grid positions): each channel's L2 norm over the
    grid, divided by its mean over channels (+1e-6), rescales x; gamma * (x * that) + beta + x."""

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        gamma = _param(self, "gamma", ("mlp",), (d,), nn.initializers.zeros)
        beta = _param(self, "beta", ("mlp",), (d,), nn.initializers.zeros)
        x32 = x.astype(jnp.float32)
        gx = jnp.sqrt(jnp.sum(jnp.square(x32), axis=1, keepdims=True))  # [B, 1, D]
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
        return (gamma * (x32 * nx) + beta + x32).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head attention of x [B, Lq, width] to memory [B, Lk, Dm] (memory = x: self-attention).

    heads of size width // heads; scale 1/sqrt(head_dim); no mask; dropout on the output projection."""

    heads: int
    use_bias: bool
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, memory):
        width = x.shape[-1]
        h, d = self.heads, width // self.heads
        proj = lambda name: Linear((h, d), ("embed", "heads", "kv"), self.use_bias, self.dtype, name=name)  # noqa: E731
        # [B, L, heads, head_dim] -> heads-major [B, heads, L, head_dim].
        q = proj("to_q")(x).transpose(0, 2, 1, 3)
        k = proj("to_k")(memory).transpose(0, 2, 1, 3)
        v = proj("to_v")(memory).transpose(0, 2, 1, 3)
        q = nn.with_logical_constraint(q, ("batch", "heads", "length", "kv"))
        k = nn.with_logical_constraint(k, ("batch", "heads", "kv_length", "kv"))
        v = nn.with_logical_constraint(v, ("batch", "heads", "kv_length", "kv"))
        o = dot_product_attention(q, k, v).transpose(0, 2, 1, 3)  # [B, Lq, heads, head_dim]
        out = Linear((width,), ("heads", "kv", "embed"), self.use_bias, self.dtype, n_in=2, name="to_out")(o)
        out = nn.Dropout(self.dropout_rate)(out, deterministic=self.deterministic)
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class _Depthwise(nn.Module):
    """Per-channel 3x3 convolution with zero padding 1 on [B, h, w, C] (torch's Conv2d(groups=C), a
    cross-correlation): kernel [3, 3, C], out[i, j] = sum over di, dj of x[i + di - 1, j + dj - 1] * kernel[di, dj]."""

    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        _, hh, ww, c = x.shape
        kernel = _param(self, "kernel", (None, None, "embed"), (3, 3, c), _DEPTHWISE_INIT).astype(self.dtype)
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = sum(xp[:, di:di + hh, dj:dj + ww, :] * kernel[di, dj] for di in range(3) for dj in range(3))
        if self.use_bias:
            y = y + _param(self, "bias", ("embed",), (c,), nn.initializers.zeros).astype(self.dtype)
        return y


class ConvNextBlock(nn.Module):
    """x [B, h, w, C], cond [B, H] -> [B, h, w, C] (see the module docstring)."""

    cfg: UVit2DConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cond):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        b, hh, ww, c = x.shape
        y = _Depthwise(cfg.use_bias, dt, name="depthwise")(x).reshape(b, hh * ww, c)
        y = RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name="norm")(y)
        y = Linear((4 * c,), ("embed", "mlp"), cfg.use_bias, dt, name="channelwise_linear_1")(y)
        y = nn.with_logical_constraint(jax.nn.gelu(y, approximate=False), ("batch", "length", "mlp"))
        y = GlobalResponseNorm(name="channelwise_norm")(y)
        y = Linear((c,), ("mlp", "embed"), cfg.use_bias, dt, name="channelwise_linear_2")(y)
        y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=self.deterministic)
        x = x.astype(dt) + y.reshape(b, hh, ww, c)
        # FiLM from the conditioning vector: [B, 2, C] = (scale, shift).
        mod = Linear((2, c), ("mlp", None, "embed"), cfg.use_bias, dt, name="cond_embeds_mapper")(nn.silu(cond))
        return x * (1 + mod[:, None, None, 0]) + mod[:, None, None, 1]


class SkipFFTransformerBlock(nn.Module):
    """x [B, n, C] attends twice to the text [B, L, H] (diffusers' SkipFFTransformerBlock: both
    attentions are cross-attentions, no feed-forward); the norms are affine RMSNorms with eps 1e-6."""

    cfg: UVit2DConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, text):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        c = x.shape[-1]
        if text.shape[-1] != c:  # diffusers' kv_mapper exists only when hidden_size != block_out_channels
            text = Linear((c,), ("mlp", "embed"), cfg.use_bias, dt, name="kv_mapper")(nn.silu(text))
            text = nn.with_logical_constraint(text, ("batch", "kv_length", "embed"))
        for i in (1, 2):
            y = RMSNorm(1e-6, True, name=f"norm{i}")(x)
            x = x + Attention(cfg.block_num_heads, cfg.use_bias, cfg.attention_dropout, dt, self.deterministic,
                              name=f"attn{i}")(y, text)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class UVitBlock(nn.Module):
    """[down-sampling], num_res_blocks x (ConvNeXt block, attention block), [up-sampling] on [B, h, w, C]."""

    cfg: UVit2DConfig
    downsample: bool
    upsample: bool
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cond, text):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        c = cfg.block_out_channels
        if self.downsample:
            x = _Downsample(cfg, name="downsample")(x)
        for i in range(cfg.num_res_blocks):
            x = ConvNextBlock(cfg, self.deterministic, name=f"res_blocks_{i}")(x, cond)
            b, hh, ww, _ = x.shape
            seq = nn.with_logical_constraint(x.reshape(b, hh * ww, c), ("batch", "length", "embed"))
            seq = SkipFFTransformerBlock(cfg, self.deterministic, name=f"attention_blocks_{i}")(seq, text)
            x = seq.reshape(b, hh, ww, c)
        if self.upsample:
            x = _Upsample(cfg, name="upsample")(x)
        return x.astype(dt)


class _Downsample(nn.Module):
    """RMSNorm, zero-pad one row / column at the bottom / right, 2x2 convolution with stride 2."""

    cfg: UVit2DConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        c = x.shape[-1]
        x = RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name="norm")(x).astype(dt)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        b, hp, wp, _ = x.shape
        ho, wo = (hp - 2) // 2 + 1, (wp - 2) // 2 + 1
        # Each output pixel sees the 2x2 patch at (2i, 2j): [B, ho, 2, wo, 2, C] x kernel [2, 2, C, C].
        patches = x[:, : 2 * ho, : 2 * wo].reshape(b, ho, 2, wo, 2, c)
        conv = _Conv2x2(cfg, name="conv")
        return conv(patches, "bpxqyc,xyco->bpqo")


class _Upsample(nn.Module):
    """RMSNorm, then a 2x2 transposed convolution with stride 2: each pixel becomes a 2x2 patch."""

    cfg: UVit2DConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        b, hh, ww, c = x.shape
        x = RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name="norm")(x).astype(dt)
        # out[2i + x, 2j + y] = in[i, j] @ kernel[x, y]: [B, h, 2, w, 2, C] -> [B, 2h, 2w, C].
        y = _Conv2x2(cfg, name="conv")(x, "bhwc,xyco->bhxwyo")
        return y.reshape(b, 2 * hh, 2 * ww, c)


class _Conv2x2(nn.Module):
    """The 2x2 kernel [2, 2, C_in, C_out] (+ bias) of the down / up-sampling convolutions, applied by einsum."""

    cfg: UVit2DConfig

    @nn.compact
    def __call__(self, x, equation: str):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        c = cfg.block_out_channels
        kernel = _param(self, "kernel", (None, None, "mlp", "embed"), (2, 2, c, c), _fan_in_init(3, 1))
        y = jnp.einsum(equation, x.astype(dt), kernel.astype(dt))
        if cfg.use_bias:
            y = y + _param(self, "bias", ("embed",), (c,), nn.initializers.zeros).astype(dt)
        return y


class AdaNorm(nn.Module):
    """diffusers' AdaLayerNormContinuous: norm(x) * (1 + scale) + shift, (scale, shift) = Linear(SiLU(cond))."""

    cfg: UVit2DConfig
    kind: str  # "rms_norm" | "layer_norm"

    @nn.compact
    def __call__(self, x, cond):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        mod = Linear((2, x.shape[-1]), ("mlp", None, "embed"), cfg.use_bias, dt, name="linear")(nn.silu(cond))
        if self.kind == "rms_norm":
            y = RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name="norm")(x)
        else:
            y = LayerNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, cfg.use_bias, name="norm")(x)
        return y.astype(dt) * (1 + mod[:, None, 0]) + mod[:, None, 1]


class TransformerLayer(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type="ada_norm_continuous" and a GEGLU feed-forward."""

    cfg: UVit2DConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, cond, text):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        attn = lambda name: Attention(cfg.num_attention_heads, cfg.use_bias, cfg.hidden_dropout, dt,  # noqa: E731
                                      self.deterministic, name=name)
        y = AdaNorm(cfg, "rms_norm", name="norm1")(x, cond)
        x = x + attn("attn1")(y, y)
        y = AdaNorm(cfg, "rms_norm", name="norm2")(x, cond)
        x = x + attn("attn2")(y, text)
        y = AdaNorm(cfg, "layer_norm", name="norm3")(x, cond)
        x = x + GEGLUFeedForward(cfg, self.deterministic, name="ff")(y)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class GEGLUFeedForward(nn.Module):
    """Linear(H -> [2, I]) = (value, gate) -> value * gelu(gate) (exact) -> dropout -> Linear(I -> H)."""

    cfg: UVit2DConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        vg = Linear((2, cfg.intermediate_size), ("embed", None, "mlp"), cfg.use_bias, dt, name="proj")(x)
        y = vg[..., 0, :] * jax.nn.gelu(vg[..., 1, :], approximate=False)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        y = nn.Dropout(cfg.hidden_dropout)(y, deterministic=self.deterministic)
        return Linear((x.shape[-1],), ("mlp", "embed"), cfg.use_bias, dt, name="out")(y)


def micro_cond_embedding(micro_conds, dim: int):
    """diffusers' get_timestep_embedding(micro_conds.flatten(), dim, flip_sin_to_cos=True,
    downscale_freq_shift=0), reshaped to [B, m * dim]: per value t, [cos(t * f_k), sin(t * f_k)] with
    f_k = exp(-ln(10000) * k / (dim // 2)), k < dim // 2; an odd dim ends with a zero. float32."""
    b, m = micro_conds.shape
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = micro_conds.reshape(b * m, 1).astype(jnp.float32) * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb.reshape(b, m * dim)


class UVit2D(nn.Module):
    """The aMUSEd transformer: tokens [B, g*g] + text conditioning -> float32 logits [B, g*g, codebook_size]."""

    config: UVit2DConfig

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @nn.compact
    def __call__(self, tokens, encoder_hidden_states, pooled_text_emb, micro_conds, deterministic: bool = True):
        """tokens int [B, g*g] (row-major grid; [B, g, g] is accepted too), encoder_hidden_states
        [B, L, encoder_hidden_size], pooled_text_emb [B, cond_embed_dim], micro_conds [B, m] with
        m * micro_cond_encode_dim == micro_cond_embed_dim (aMUSEd: width, height, crop top, crop left,
        aesthetic score). With downsample but not upsample the logits are at half resolution."""
        cfg, dt = self.config, _dtype(self.config.dtype)
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 3 and tokens.shape[1] == tokens.shape[2]:
            tokens = tokens.reshape(tokens.shape[0], -1)
        g = math.isqrt(tokens.shape[-1]) if tokens.ndim == 2 else 0
        if tokens.ndim != 2 or g * g != tokens.shape[1] or g == 0:
            raise ValueError(f"expected tokens [batch, g*g] (a square grid), got shape {tokens.shape}")
        b = tokens.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.encoder_hidden_size:
            raise ValueError(f"expected encoder_hidden_states [batch, length, {cfg.encoder_hidden_size}], "
                             f"got {encoder_hidden_states.shape}")
        if pooled_text_emb.shape != (b, cfg.cond_embed_dim):
            raise ValueError(f"expected pooled_text_emb [{b}, {cfg.cond_embed_dim}], got {pooled_text_emb.shape}")
        if micro_conds.ndim != 2 or micro_conds.shape[0] != b or (
                micro_conds.shape[1] * cfg.micro_cond_encode_dim != cfg.micro_cond_embed_dim):
            raise ValueError(f"expected micro_conds [{b}, {cfg.num_micro_conds}] (micro_cond_embed_dim "
                             f"{cfg.micro_cond_embed_dim} / micro_cond_encode_dim {cfg.micro_cond_encode_dim}), "
                             f"got {micro_conds.shape}")
        h, c = cfg.hidden_size, cfg.block_out_channels
        lin = lambda feats, axes, name: Linear((feats,), axes, cfg.use_bias, dt, name=name)  # noqa: E731
        rms = lambda name: RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name=name)  # noqa: E731

        # Text states: project to the transformer width and RMS-normalise.
        text = rms("encoder_proj_layer_norm")(lin(h, (None, "embed"), "encoder_proj")(encoder_hidden_states))
        text = nn.with_logical_constraint(text, ("batch", "kv_length", "embed"))

        # Conditioning vector: [pooled text, sinusoidal micro-conditions] -> Linear, SiLU, Linear.
        cond_in = jnp.concatenate([pooled_text_emb.astype(jnp.float32),
                                   micro_cond_embedding(micro_conds, cfg.micro_cond_encode_dim)], axis=1)
        cond = _CondEmbed(cfg, name="cond_embed")(cond_in)

        # Token grid -> embeddings -> U block at the grid resolution (optionally halved).
        x = _TokenEmbed(cfg, name="embed")(tokens).reshape(b, g, g, c)
        x = UVitBlock(cfg, cfg.downsample, False, deterministic, name="down_block")(x, cond, text)
        _, hh, ww, _ = x.shape
        x = nn.with_logical_constraint(x.reshape(b, hh * ww, c), ("batch", "length", "embed"))

        # Transformer stack at width H.
        x = lin(h, ("mlp", "embed"), "project_to_hidden")(rms("project_to_hidden_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        layer = nn.remat(TransformerLayer) if cfg.remat else TransformerLayer
        for i in range(cfg.num_hidden_layers):
            x = layer(cfg, deterministic, name=f"transformer_layers_{i}")(x, cond, text)
        x = lin(c, ("mlp", "embed"), "project_from_hidden")(rms("project_from_hidden_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        x = UVitBlock(cfg, False, cfg.upsample, deterministic, name="up_block")(x.reshape(b, hh, ww, c), cond, text)
        _, hh, ww, _ = x.shape
        x = nn.with_logical_constraint(x.reshape(b, hh * ww, c), ("batch", "length", "embed"))
        return _MlmLayer(cfg, name="mlm_layer")(x)


class _TokenEmbed(nn.Module):
    """Token ids [B, n] -> embedding table [vocab, in_channels] -> RMSNorm -> 1x1 conv -> [B, n, C]."""

    cfg: UVit2DConfig

    @nn.compact
    def __call__(self, tokens):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        table = _Embedding(cfg.vocab_size, cfg.in_channels, name="embeddings")()
        x = jnp.take(table, tokens.astype(jnp.int32), axis=0).astype(dt)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name="layer_norm")(x)
        x = Linear((cfg.block_out_channels,), ("mlp", "embed"), cfg.use_bias, dt, name="conv")(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _Embedding(nn.Module):
    num: int
    features: int

    @nn.compact
    def __call__(self):
        return _param(self, "embedding", ("vocab", "embed"), (self.num, self.features), _embedding_init)


class _CondEmbed(nn.Module):
    """diffusers' TimestepEmbedding: Linear -> SiLU -> Linear, [B, cond + micro] -> [B, H]."""

    cfg: UVit2DConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        x = Linear((cfg.hidden_size,), (None, "embed"), cfg.use_bias, dt, name="linear_1")(x)
        return Linear((cfg.hidden_size,), ("mlp", "embed"), cfg.use_bias, dt, name="linear_2")(nn.silu(x))


class _MlmLayer(nn.Module):
    """1x1 conv C -> in_channels, RMSNorm, 1x1 conv -> codebook_size: float32 logits [B, n, K]."""

    cfg: UVit2DConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        x = Linear((cfg.in_channels,), ("mlp", "embed"), cfg.use_bias, dt, name="conv1")(x)
        x = RMSNorm(cfg.layer_norm_eps, cfg.ln_elementwise_affine, name="layer_norm")(x)
        logits = Linear((cfg.codebook_size,), ("embed", "vocab"), cfg.use_bias, dt, name="conv2")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


def dummy_inputs(config: UVit2DConfig, batch: int = 1, text_len: int = 77, grid: int | None = None):
    """Zero inputs of the right shapes: (tokens, encoder_hidden_states, pooled_text_emb, micro_conds)."""
    grid = 4 if grid is None else int(grid)  # no parameter depends on the grid; 4 is small and even
    return (
        jnp.zeros((batch, grid * grid), jnp.int32),
        jnp.zeros((batch, text_len, config.encoder_hidden_size), jnp.float32),
        jnp.zeros((batch, config.cond_embed_dim), jnp.float32),
        jnp.zeros((batch, config.num_micro_conds), jnp.float32),
    )


def init_params(config: UVit2DConfig, rng, batch: int = 1, text_len: int = 77, grid: int | None = None):
    """Boxed parameters (`nn.Partitioned` leaves with logical axis names) of a fresh UVit2D."""
    return UVit2D(config).init(rng, *dummy_inputs(config, batch, text_len, grid))["params"]


def abstract_params(config: UVit2DConfig):
    """The unboxed parameter tree as ShapeDtypeStructs (nothing computed)."""
    return jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0), text_len=1)))


def num_params(config: UVit2DConfig) -> int:
    """Number of parameters (aMUSEd-256's defaults: about 603M)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(abstract_params(config))))


# ---------------------------------------------------------------------------------------
# diffusers weights
# ---------------------------------------------------------------------------------------

# A flax module name "res_blocks_3" is diffusers' ModuleList entry "res_blocks.3".
_LIST_NAME = re.compile(r"^(res_blocks|attention_blocks|transformer_layers)_(\d+)$")
_TORCH_MODULE_NAMES = {"to_out": "to_out.0", "proj": "net.0.proj", "out": "net.2"}  # attention, GEGLU ff


def _torch_key(path: tuple[str, ...]) -> str:
    """diffusers' state-dict key of the parameter at flax `path`."""
    parts = []
    for i, p in enumerate(path[:-1]):
        m = _LIST_NAME.match(p)
        if m:
            p = f"{m.group(1)}.{m.group(2)}"
        elif p in _TORCH_MODULE_NAMES and (p == "to_out" or path[i - 1] == "ff"):
            p = _TORCH_MODULE_NAMES[p]
        parts.append(p)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def _kind(path: tuple[str, ...]) -> str:
    """How a diffusers tensor is laid out relative to our parameter at `path`."""
    leaf, module = path[-1], "/".join(path[:-1])
    if leaf == "kernel":
        if module.endswith("depthwise"):
            return "depthwise"  # [C, 1, 3, 3] -> [3, 3, C]
        if module.endswith("downsample/conv"):
            return "conv"  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
        if module.endswith("upsample/conv"):
            return "conv_transpose"  # ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out]
        if module in ("embed/conv", "mlm_layer/conv1", "mlm_layer/conv2"):
            return "conv1x1"  # [out, in, 1, 1] -> [in, out]
        return "linear_out2" if path[-2] == "to_out" else "linear"  # [out, in] -> [in, out] (reshaped)
    if leaf in ("gamma", "beta"):
        return "grn"  # [1, 1, 1, D] -> [D]
    if leaf == "embedding":
        return "embedding"  # [vocab, in_channels], as is
    return "vector"  # norm weights and biases (reshaped to split fused pieces: [2C] -> [2, C])


def _torch_shape(kind: str, s: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers tensor shape that fills a parameter of flax shape `s`."""
    if kind == "depthwise":
        return (s[2], 1, s[0], s[1])
    if kind == "conv":
        return (s[3], s[2], s[0], s[1])
    if kind == "conv_transpose":
        return (s[2], s[3], s[0], s[1])
    if kind == "conv1x1":
        return (s[1], s[0], 1, 1)
    if kind == "linear":
        return (math.prod(s[1:]), s[0])
    if kind == "linear_out2":
        return (s[2], s[0] * s[1])
    if kind == "grn":
        return (1, 1, 1, s[0])
    if kind == "embedding":
        return s
    return (math.prod(s),)


def _to_flax(kind: str, arr: np.ndarray, s: tuple[int, ...]) -> np.ndarray:
    if kind == "depthwise":
        arr = arr[:, 0].transpose(1, 2, 0)
    elif kind in ("conv", "conv_transpose"):
        arr = arr.transpose((2, 3, 1, 0) if kind == "conv" else (2, 3, 0, 1))
    elif kind == "conv1x1":
        arr = arr[:, :, 0, 0].T
    elif kind in ("linear", "linear_out2"):
        arr = arr.T
    return np.ascontiguousarray(arr.reshape(s), dtype=np.float32)


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (any float dtype, bfloat16 included)
        return value.detach().cpu().float().numpy()
    return np.asarray(value).astype(np.float32)


def convert_diffusers(state_dict: Mapping[str, Any], config: UVit2DConfig) -> dict:
    """diffusers `UVit2DModel` state dict (torch tensors or numpy arrays) -> our params: a plain nested
    dict of float32 numpy arrays with the tree of `nn.unbox(init_params(config, ...))`.

    Linear weights are transposed ([out, in] -> [in, out]) and fused outputs split ([2C, H] -> [H, 2, C]),
    conv weights go OIHW -> HWIO, RMSNorm / LayerNorm weights become `scale`. Every parameter must be
    present with its shape and nothing may be left over, else one ValueError names the missing,
    unexpected and mis-shaped keys."""
    expected = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    wanted = {}
    for key_path, leaf in expected:
        path = tuple(k.key for k in key_path)
        wanted[_torch_key(path)] = (path, _kind(path), tuple(leaf.shape))
    out, misshaped = {}, []
    for key, (path, kind, shape) in wanted.items():
        if key not in state_dict:
            continue
        arr = _as_numpy(state_dict[key])
        want = _torch_shape(kind, shape)
        if arr.shape != want:
            misshaped.append(f"{key}: shape {tuple(arr.shape)}, expected {want}")
            continue
        out[path] = _to_flax(kind, arr, shape)
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if misshaped:
            problems.append(f"mis-shaped keys {misshaped}")
        raise ValueError("diffusers UVit2DModel weights do not fit the config: " + "; ".join(problems))
    from flax import traverse_util

    return traverse_util.unflatten_dict(out)


_WEIGHT_NAME = "diffusion_pytorch_model"


def _weight_files(path: pathlib.Path, variant: str | None) -> list[str]:
    stem = _WEIGHT_NAME if variant is None else f"{_WEIGHT_NAME}.{variant}"
    return [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin", f"{stem}.bin.index.json"]


def _load_state_dict(path: pathlib.Path, variant: str | None = None) -> dict[str, Any]:
    """The state dict of a diffusers model folder: single or sharded safetensors, else torch .bin."""
    single, st_index, single_bin, bin_index = (path / n for n in _weight_files(path, variant))
    if single.is_file():
        return _load_safetensors(single)
    if st_index.is_file():
        files = sorted(set(json.loads(st_index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(_load_safetensors(path / f))
        return state
    if single_bin.is_file() or bin_index.is_file():
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path} holds only PyTorch .bin weights: reading them needs torch "
                              "(pip install torch), or convert them to safetensors") from e
        files = [single_bin] if single_bin.is_file() else [
            path / f for f in sorted(set(json.loads(bin_index.read_text())["weight_map"].values()))]
        state = {}
        for f in files:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no diffusers weights in {path}: looked for {', '.join(_weight_files(path, variant))}")


def _load_safetensors(file: pathlib.Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (TypeError, ValueError):  # e.g. bfloat16, which numpy lacks: read through JAX
        from safetensors.flax import load_file as load_jax

        return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_jax(str(file)).items()}


def load_diffusers_dir(path, variant: str | None = None, **overrides) -> tuple[UVit2DConfig, dict]:
    """(config, params) from a saved diffusers `UVit2DModel` folder (e.g. aMUSEd's `transformer/`):
    config.json plus diffusion_pytorch_model[.variant].safetensors (or a sharded index, or .bin with
    torch). `overrides` set config fields (e.g. dtype="bfloat16"). Nothing is downloaded."""
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers UVit2DModel folder: no config.json "
                                f"(expected config.json and one of {', '.join(_weight_files(path, variant))})")
    config = UVit2DConfig.from_diffusers(json.loads(cfg_file.read_text()), **overrides)
    return config, convert_diffusers(_load_state_dict(path, variant), config)
