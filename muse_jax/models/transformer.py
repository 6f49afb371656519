"""Muse's masked transformers: the base model (section 2.3) and the super-resolution model (2.4).

Base: image tokens [B, h*w] (codebook ids, or `mask_token_id` = codebook_size where masked)
  -> token embedding + learned 2-D position embedding
  -> N x [self-attention, cross-attention to the projected text embeddings, MLP] (pre-LayerNorm)
  -> final LayerNorm -> MLP head -> logits [B, h*w, codebook_size] (float32).
Super-resolution: the low-resolution tokens pass through their own stack of self-attention
layers; those outputs, concatenated with the projected text embeddings, are the cross-attention
memory of a high-resolution stack that predicts the masked high-resolution tokens.

For samplers:
    model, params = workdir.load_stage(W, "base")       # muse_jax.workdir
    emb, mask = ..., ...                                     # text embeddings [B, L, D], bool [B, L]
    if model.text_encoder_config is not None:                # a T5 trained jointly with the stage
        emb = model.apply({"params": params}, ids, mask, method=model.encode_text)
    logits = model.apply({"params": params}, tokens, emb, mask)                  # base
    logits = model.apply({"params": params}, tokens, emb, mask, lowres_tokens)   # super-res
    model.mask_token_id == model.codebook_size

All attention goes through `muse_jax.models.layers.dot_product_attention` in heads-major
[b, h, l, d] layout (queries, keys and values are projected by 2-D matmuls and transposed into
it), computed as `config.attention` says ("xla"; "blockwise" for long sequences). Parameters
carry logical axis names (`nn.with_logical_partitioning`) and key activations logical constraints;
`muse_jax/partitioning.py` maps them to a mesh.
`dtype="bfloat16"` computes in bf16 with float32 parameters; `remat=True` rematerialises each
block in the backward pass.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.layers import ATTENTION_IMPLEMENTATIONS, dot_product_attention
from muse_jax.models.layers import dtype as _dtype


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a base (lowres_grid_size=0) or super-resolution masked transformer."""

    codebook_size: int = 512
    grid_size: int = 8  # tokens per side of the predicted image (h = w)
    num_layers: int = 4
    width: int = 128
    mlp_dim: int = 512
    num_heads: int = 4
    text_dim: int = 64  # width of the incoming text embeddings (T5 d_model)
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # compute dtype; parameters are float32
    remat: bool = False
    lowres_grid_size: int = 0  # super-res: tokens per side of the conditioning low-res image
    num_lowres_layers: int = 0  # super-res: depth of the low-res token encoder
    # Super-res: also add the encoded low-res tokens, nearest-upsampled to the high-res grid, to the
    # token embeddings. Muse conditions through cross-attention only (False, the paper configs); the
    # aligned shortcut lets a small model learn the local upsampling in hundreds of steps, not thousands.
    lowres_add: bool = False
    # How every attention of the stage is computed (`layers.dot_product_attention`'s implementation:
    # "xla", "blockwise", "fused" or "auto") and the blockwise path's block length. The same function
    # each way; blockwise keeps O(block^2) logits per head instead of [lq, lk] (4096^2 at 64x64 tokens).
    attention: str = "xla"
    attention_block_size: int = 512
    # Tokens per side of one position of the predicting stack: with patch_size=p each p x p square of
    # embedded tokens is concatenated and projected to one position, and the stack's outputs are
    # projected back to one vector per token before the logits head. The stack then runs on
    # (grid_size/p)^2 positions, ~p^2 fewer FLOPs, while every token keeps its own input embedding
    # (masked or not) and its own logits, so masking, the loss and decoding are unchanged. 1 = Muse.
    patch_size: int = 1

    def __post_init__(self):
        for f in ("codebook_size", "grid_size", "num_layers", "width", "mlp_dim", "num_heads", "text_dim"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"TransformerConfig.{f} must be positive, got {getattr(self, f)}")
        if self.width % self.num_heads:
            raise ValueError(f"TransformerConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if (self.lowres_grid_size > 0) != (self.num_lowres_layers > 0):
            raise ValueError("TransformerConfig: a super-res model needs both lowres_grid_size and num_lowres_layers")
        if self.lowres_add and (not self.lowres_grid_size or self.grid_size % self.lowres_grid_size):
            raise ValueError(
                f"TransformerConfig: lowres_add needs grid_size ({self.grid_size}) to be a multiple of "
                f"lowres_grid_size ({self.lowres_grid_size})"
            )
        _dtype(self.dtype)
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"TransformerConfig.attention {self.attention!r}: expected one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if int(self.attention_block_size) <= 0:
            raise ValueError(f"TransformerConfig.attention_block_size must be positive, got {self.attention_block_size}")
        if int(self.patch_size) <= 0 or self.grid_size % self.patch_size:
            raise ValueError(
                f"TransformerConfig.patch_size {self.patch_size} must be positive and divide grid_size {self.grid_size}"
            )

    @property
    def is_superres(self) -> bool:
        return self.lowres_grid_size > 0

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def num_positions(self) -> int:
        """Sequence length of the predicting stack: one position per patch_size^2 tokens."""
        return (self.grid_size // self.patch_size) ** 2

    @classmethod
    def coerce(cls, cfg: Any) -> TransformerConfig:
        """From a TransformerConfig, dict or ConfigDict (unknown keys are an error; a stage section's
        `tokenizer`, the name of the tokenizer it reads, is not the model's and is ignored)."""
        if isinstance(cfg, cls):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        cfg = {k: v for k, v in cfg.items() if k != "tokenizer"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown transformer config fields {unknown}; known: {sorted(names)}")
        return cls(**dict(cfg))


_init = nn.initializers.truncated_normal(0.02)  # embeddings


def _fan_in_init(in_axis, out_axis):
    """Truncated normal with variance 1/fan_in (LeCun) for kernels: a fixed 0.02 is ~4x too small at
    width 128, which leaves attention near uniform for hundreds of steps on small models."""
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _param(mod, name, axes, shape, init=_init):
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _layer_norm(cfg: TransformerConfig, name: str):
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon, dtype=_dtype(cfg.dtype), param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name=name,
    )


def _dense(features: int, axes, cfg: TransformerConfig, name: str):
    return nn.Dense(
        features, dtype=_dtype(cfg.dtype), param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(_fan_in_init(-2, -1), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), name=name,
    )


class Attention(nn.Module):
    """Multi-head attention: x [B, Lq, E] attends to memory [B, Lk, E]; mask [B, 1|h, 1|Lq, Lk]."""

    cfg: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, memory, mask=None):
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        h, d, e = cfg.num_heads, cfg.width // cfg.num_heads, cfg.width
        x, memory = x.astype(dt), memory.astype(dt)

        def project(name, inp, length_axis, bias=True):
            # [b, l, e] x [e, h, d] -> [b, l, h, d], then an explicit transpose to [b, h, l, d] (faster on CPU than
            # the einsum "ble,ehd->bhld", benchmarks/RESULTS.md). The kernel goes to lax.dot_general in its own
            # shape so that qwix's LoRA (models/lora.py) finds it and names the adapters after its axes.
            w = _param(self, f"{name}_kernel", ("embed", "heads", "kv"), (e, h, d), _fan_in_init(0, (1, 2)))
            y = jax.lax.dot_general(inp, w.astype(dt), (((2,), (0,)), ((), ())))
            if bias:
                y = y + _param(self, f"{name}_bias", ("heads", "kv"), (h, d), nn.initializers.zeros).astype(dt)
            y = y.transpose(0, 2, 1, 3)
            return nn.with_logical_constraint(y, ("batch", "heads", length_axis, "kv"))

        q = project("query", x, "length")
        # No key bias: softmax is invariant to it (its gradient is only rounding noise, which
        # Adam would amplify into parameter drift).
        k = project("key", memory, "kv_length", bias=False)
        v = project("value", memory, "kv_length")
        o = dot_product_attention(
            q, k, v, mask=mask, implementation=cfg.attention, block_size=cfg.attention_block_size
        )  # [b, h, lq, d]
        if cfg.attention_dropout_rate > 0:
            o = nn.Dropout(cfg.attention_dropout_rate)(o, deterministic=self.deterministic)
        w_o = _param(self, "out_kernel", ("heads", "kv", "embed"), (h, d, e), _fan_in_init((0, 1), 2)).astype(dt)
        b_o = _param(self, "out_bias", ("embed",), (e,), nn.initializers.zeros).astype(dt)
        # [b, l, h, d] x [h, d, e] -> [b, l, e].
        out = jax.lax.dot_general(o.transpose(0, 2, 1, 3), w_o, (((2, 3), (0, 1)), ((), ()))) + b_o
        return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class MLP(nn.Module):
    """Position-wise feed-forward: Dense(mlp_dim) -> GELU -> Dense(width)."""

    cfg: TransformerConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        y = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, "wi")(x)
        y = nn.with_logical_constraint(jax.nn.gelu(y), ("batch", "length", "mlp"))
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
        return _dense(cfg.width, ("mlp", "embed"), cfg, "wo")(y)


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, [cross-attention to memory], MLP."""

    cfg: TransformerConfig
    cross_attention: bool = True
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, memory=None, memory_mask=None):
        cfg = self.cfg
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)  # noqa: E731
        y = _layer_norm(cfg, "pre_self_attention_norm")(x)
        x = x + drop(Attention(cfg, self.deterministic, name="self_attention")(y, y))
        if self.cross_attention:
            y = _layer_norm(cfg, "pre_cross_attention_norm")(x)
            x = x + drop(Attention(cfg, self.deterministic, name="cross_attention")(y, memory, memory_mask))
        y = _layer_norm(cfg, "pre_mlp_norm")(x)
        x = x + drop(MLP(cfg, self.deterministic, name="mlp")(y))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class TokenEmbedding(nn.Module):
    """Token ids [B, g*g] -> token + learned 2-D position embeddings [B, g*g, width]."""

    cfg: TransformerConfig
    vocab_size: int
    grid_size: int

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        g = self.grid_size
        if tokens.ndim != 2 or tokens.shape[1] != g * g:
            raise ValueError(f"expected tokens [batch, {g * g}] ({g}x{g} grid), got shape {tokens.shape}")
        table = _param(self, "embedding", ("vocab", "embed"), (self.vocab_size, cfg.width))
        pos = _param(self, "position_embedding", (None, None, "embed"), (g, g, cfg.width))
        x = jnp.take(table, tokens.astype(jnp.int32), axis=0) + pos.reshape(g * g, cfg.width)[None]
        x = _layer_norm(cfg, "embedding_norm")(x)
        return nn.with_logical_constraint(x.astype(_dtype(cfg.dtype)), ("batch", "length", "embed"))


class Stack(nn.Module):
    """N blocks (optionally rematerialised) and a final LayerNorm."""

    cfg: TransformerConfig
    num_layers: int
    cross_attention: bool = True
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, memory=None, memory_mask=None):
        block_cls = nn.remat(Block) if self.cfg.remat else Block
        for i in range(self.num_layers):
            x = block_cls(self.cfg, self.cross_attention, self.deterministic, name=f"block_{i}")(
                x, memory, memory_mask
            )
        return _layer_norm(self.cfg, "final_norm")(x)


class LogitsHead(nn.Module):
    """MLP head: Dense(width) -> GELU -> LayerNorm -> Dense(codebook_size); float32 logits."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = jax.nn.gelu(_dense(cfg.width, ("embed", "mlp"), cfg, "dense")(x))
        x = _layer_norm(cfg, "norm")(x)
        logits = _dense(cfg.codebook_size, ("embed", "vocab"), cfg, "logits")(x).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def _predict(cfg: TransformerConfig, deterministic: bool, x, memory, memory_mask):
    """The predicting stack ("decoder") on token embeddings [B, g*g, E] -> [B, g*g, E].

    With patch_size p > 1: [B, g, g, E] -> [B, (g/p)^2, p*p*E] -> Dense(E) ("patch_in") -> the stack ->
    Dense(p*p*E) ("patch_out") -> one E-vector per token again, in the tokens' row-major order. Called
    from a stage's compact `__call__`, whose submodules these become."""
    p, g, e = cfg.patch_size, cfg.grid_size, cfg.width
    stack = Stack(cfg, cfg.num_layers, True, deterministic, name="decoder")
    if p == 1:
        return stack(x, memory, memory_mask)
    b, n = x.shape[0], g // p
    patches = x.reshape(b, n, p, n, p, e).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, p * p * e)
    y = _dense(e, ("mlp", "embed"), cfg, "patch_in")(patches)
    y = stack(nn.with_logical_constraint(y, ("batch", "length", "embed")), memory, memory_mask)
    y = _dense(p * p * e, ("embed", "mlp"), cfg, "patch_out")(y)
    y = y.reshape(b, n, n, p, p, e).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, e)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class _MuseStage(nn.Module):
    """Shared parts of both stages: the optional jointly-trained text encoder, text projection."""

    config: TransformerConfig
    text_encoder_config: Any = None  # a hashable T5Config when T5 trains jointly with this stage

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def mask_token_id(self) -> int:
        return self.config.codebook_size

    def setup(self):
        if self.text_encoder_config is not None:
            from muse_jax.models.t5 import T5Encoder

            self.text_encoder = T5Encoder(self.text_encoder_config)

    def encode_text(self, ids, mask, deterministic: bool = True):
        """ids int [B, L], mask bool [B, L] -> embeddings [B, L, text_dim] (jointly trained T5)."""
        if self.text_encoder_config is None:
            raise ValueError("this stage has no text encoder of its own: pass precomputed text embeddings")
        return self.text_encoder(ids, mask, deterministic=deterministic)

    def _text_memory(self, text_emb, text_mask):
        cfg = self.config
        if text_emb.ndim != 3 or text_emb.shape[-1] != cfg.text_dim:
            raise ValueError(f"expected text embeddings [batch, length, {cfg.text_dim}], got {text_emb.shape}")
        if text_mask.shape != text_emb.shape[:2]:
            raise ValueError(f"text mask shape {text_mask.shape} != text embedding shape {text_emb.shape[:2]}")
        memory = _dense(cfg.width, (None, "embed"), cfg, "text_projection")(text_emb.astype(_dtype(cfg.dtype)))
        memory = nn.with_logical_constraint(memory, ("batch", "kv_length", "embed"))
        return memory, jnp.asarray(text_mask, bool)


class MuseBase(_MuseStage):
    """Base masked transformer: tokens [B, g*g], text [B, L, D] (+mask) -> logits [B, g*g, K]."""

    @nn.compact
    def __call__(self, tokens, text_emb, text_mask, *, deterministic: bool = True):
        cfg = self.config
        memory, mem_mask = self._text_memory(text_emb, text_mask)
        x = TokenEmbedding(cfg, cfg.codebook_size + 1, cfg.grid_size, name="tokens")(tokens)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _predict(cfg, deterministic, x, memory, mem_mask[:, None, None, :])
        return LogitsHead(cfg, name="head")(x)

    def forward(self, tokens, text_ids, text_mask, *, deterministic: bool = True):
        """Jointly-trained text encoder + `__call__` (training and `init`)."""
        emb = self.encode_text(text_ids, text_mask, deterministic)
        return self(tokens, emb, text_mask, deterministic=deterministic)


class MuseSuperRes(_MuseStage):
    """Super-res transformer: high-res tokens [B, G*G] given low-res tokens [B, g*g] and text."""

    @nn.compact
    def __call__(self, tokens, text_emb, text_mask, lowres_tokens, *, deterministic: bool = True):
        cfg = self.config
        if not cfg.is_superres:
            raise ValueError("MuseSuperRes needs config.lowres_grid_size and num_lowres_layers > 0")
        memory, mem_mask = self._text_memory(text_emb, text_mask)
        low = TokenEmbedding(cfg, cfg.codebook_size, cfg.lowres_grid_size, name="lowres_tokens")(lowres_tokens)
        low = Stack(cfg, cfg.num_lowres_layers, False, deterministic, name="lowres_encoder")(low)
        memory = jnp.concatenate([memory, low.astype(memory.dtype)], axis=1)
        mem_mask = jnp.concatenate([mem_mask, jnp.ones(lowres_tokens.shape, bool)], axis=1)
        memory = nn.with_logical_constraint(memory, ("batch", "kv_length", "embed"))
        x = TokenEmbedding(cfg, cfg.codebook_size + 1, cfg.grid_size, name="tokens")(tokens)
        if cfg.lowres_add:  # [B, g*g, E] -> [B, G*G, E]: each low-res token under the high-res ones it covers
            r, g = cfg.grid_size // cfg.lowres_grid_size, cfg.lowres_grid_size
            up = low.reshape(low.shape[0], g, 1, g, 1, -1)
            up = jnp.broadcast_to(up, (low.shape[0], g, r, g, r, low.shape[-1])).reshape(x.shape)
            x = x + _dense(cfg.width, (None, "embed"), cfg, "lowres_add")(up).astype(x.dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _predict(cfg, deterministic, x, memory, mem_mask[:, None, None, :])
        return LogitsHead(cfg, name="head")(x)

    def forward(self, tokens, text_ids, text_mask, lowres_tokens, *, deterministic: bool = True):
        """Jointly-trained text encoder + `__call__` (training and `init`)."""
        emb = self.encode_text(text_ids, text_mask, deterministic)
        return self(tokens, emb, text_mask, lowres_tokens, deterministic=deterministic)


def build(cfg: Any, text_encoder_config: Any = None) -> _MuseStage:
    """MuseBase or MuseSuperRes from a config (super-res when lowres_grid_size > 0)."""
    cfg = TransformerConfig.coerce(cfg)
    if text_encoder_config is not None:
        from muse_jax.models.t5 import T5Config

        text_encoder_config = T5Config.coerce(text_encoder_config)
        if text_encoder_config.d_model != cfg.text_dim:
            raise ValueError(
                f"text encoder d_model {text_encoder_config.d_model} != transformer text_dim {cfg.text_dim}"
            )
    cls = MuseSuperRes if cfg.is_superres else MuseBase
    return cls(cfg, text_encoder_config)


def dummy_inputs(model: _MuseStage, batch: int = 1, text_length: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs for `init`/`eval_shape`: tokens, text (ids or embeddings), mask[, lowres]."""
    cfg = model.config
    out = {"tokens": jax.ShapeDtypeStruct((batch, cfg.num_tokens), jnp.int32)}
    if model.text_encoder_config is not None:
        out["text_ids"] = jax.ShapeDtypeStruct((batch, text_length), jnp.int32)
    else:
        out["text_emb"] = jax.ShapeDtypeStruct((batch, text_length, cfg.text_dim), jnp.float32)
    out["text_mask"] = jax.ShapeDtypeStruct((batch, text_length), jnp.bool_)
    if cfg.is_superres:
        out["lowres_tokens"] = jax.ShapeDtypeStruct((batch, cfg.lowres_grid_size**2), jnp.int32)
    return out


def init_params(model: _MuseStage, rng, inputs: Mapping[str, Any]):
    """Boxed parameters (`nn.Partitioned` leaves) from example `inputs` (see `dummy_inputs`)."""
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in inputs.items()}
    if "text_mask" in zeros:
        zeros["text_mask"] = jnp.ones(zeros["text_mask"].shape, bool)
    return model.init(rng, **_call_args(model, zeros), deterministic=True, method=_method(model))["params"]


def apply(model: _MuseStage, params, inputs: Mapping[str, Any], *, deterministic=True, rngs=None):
    """Logits from a dict with tokens, text_ids|text_emb, text_mask[, lowres_tokens]."""
    return model.apply(
        {"params": params}, **_call_args(model, inputs), deterministic=deterministic, rngs=rngs,
        method=_method(model),
    )


def _method(model):
    return model.forward if model.text_encoder_config is not None else model.__call__


def _call_args(model, inputs):
    args = {"tokens": inputs["tokens"], "text_mask": inputs["text_mask"]}
    if model.text_encoder_config is not None:
        args["text_ids"] = inputs["text_ids"]
    else:
        args["text_emb"] = inputs["text_emb"]
    if model.config.is_superres:
        args["lowres_tokens"] = inputs["lowres_tokens"]
    return args


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(params))))
