"""T5 encoder (Raffel et al. 2020) in Flax linen: Muse's text conditioning, plus `load_hf`.

The encoder follows the published T5 architecture:
  token embedding -> dropout -> N x [pre-norm self-attention, pre-norm feed-forward]
  -> final RMS norm -> dropout.
  * RMS layer norm without mean subtraction or bias, variance computed in float32.
  * Self-attention without 1/sqrt(d) scaling (scale=1.0) plus a bucketed, bidirectional
    relative position bias computed once (first layer's table) and shared by all layers.
  * Feed-forward: ReLU (T5 v1.0) or gated-GELU (T5 v1.1, Flan-T5); no biases anywhere.
The output width is `T5Config.d_model` (4096 for T5-XXL, Muse's encoder).

Parameter tree (`model.init(...)["params"]`), with logical axis names:
  token_embedder/embedding   [vocab, d_model]        (vocab, embed)
  relpos_bias/rel_embedding  [buckets, heads]        (None, heads)
  layers_{i}/pre_attention_norm/scale                 (embed,)
  layers_{i}/attention/{query,key,value} [d_model, heads, d_kv]  (embed, heads, kv)
  layers_{i}/attention/out   [heads, d_kv, d_model]  (heads, kv, embed)
  layers_{i}/pre_mlp_norm/scale                       (embed,)
  layers_{i}/mlp/wi | wi_0, wi_1 [d_model, d_ff]       (embed, mlp);  mlp/wo [d_ff, d_model] (mlp, embed)
  encoder_norm/scale                                  (embed,)

`load_hf` converts a Hugging Face `T5EncoderModel` / `T5ForConditionalGeneration` checkpoint
(safetensors file or directory, PyTorch state dict or `.bin`) into that tree.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models.layers import dot_product_attention
from muse_jax.models.layers import dtype as _dtype

# Public sizes (d_model, d_kv, d_ff, num_layers, num_heads, feed_forward_proj) of the released
# checkpoints. T5 v1.1 and Flan-T5 share architectures (gated-GELU, untied embeddings);
# T5 v1.0 uses ReLU. All use a 32128-row embedding (32000 sentencepiece pieces + padding rows).
_SIZES = {
    "t5-small": (512, 64, 2048, 6, 8, "relu"),
    "t5-base": (768, 64, 3072, 12, 12, "relu"),
    "t5-large": (1024, 64, 4096, 24, 16, "relu"),
    "t5-3b": (1024, 128, 16384, 24, 32, "relu"),
    "t5-11b": (1024, 128, 65536, 24, 128, "relu"),
    "t5-v1_1-small": (512, 64, 1024, 8, 6, "gated-gelu"),
    "t5-v1_1-base": (768, 64, 2048, 12, 12, "gated-gelu"),
    "t5-v1_1-large": (1024, 64, 2816, 24, 16, "gated-gelu"),
    "t5-v1_1-xl": (2048, 64, 5120, 24, 32, "gated-gelu"),
    "t5-v1_1-xxl": (4096, 64, 10240, 24, 64, "gated-gelu"),
}
for _s in ("small", "base", "large", "xl", "xxl"):
    _SIZES[f"flan-t5-{_s}"] = _SIZES[f"t5-v1_1-{_s}"]
PRESETS = tuple(_SIZES)

# feed_forward_proj -> (gated, activation), following the Hugging Face T5 convention:
# "gated-gelu" is the tanh-approximated GELU (HF "gelu_new"), plain "gelu" is the exact one.
_ACTIVATIONS = {
    "relu": (False, jax.nn.relu),
    "gelu": (False, lambda x: jax.nn.gelu(x, approximate=False)),
    "gated-gelu": (True, lambda x: jax.nn.gelu(x, approximate=True)),
    "gated-relu": (True, jax.nn.relu),
    "gated-silu": (True, jax.nn.silu),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 encoder; field names follow Hugging Face's `T5Config`."""

    vocab_size: int = 32128
    d_model: int = 512  # the output (text embedding) width
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    dtype: str = "float32"  # computation dtype ("bfloat16" for a frozen encoder on accelerators)
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.feed_forward_proj not in _ACTIVATIONS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}; expected one of {sorted(_ACTIVATIONS)}"
            )
        for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"T5Config.{f} must be positive, got {getattr(self, f)}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError("T5Config.relative_attention_num_buckets must be even and >= 4")

    @property
    def output_dim(self) -> int:
        """Width of the text embeddings (= d_model)."""
        return self.d_model

    @classmethod
    def from_preset(cls, name: str, **overrides) -> T5Config:
        """A released size by name (see `PRESETS`), e.g. "t5-v1_1-xxl" or "flan-t5-xl"."""
        if name not in _SIZES:
            raise ValueError(f"unknown T5 preset {name!r}; known: {', '.join(PRESETS)}")
        d_model, d_kv, d_ff, layers, heads, proj = _SIZES[name]
        fields = dict(d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                      feed_forward_proj=proj)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def coerce(cls, cfg: Any) -> T5Config:
        """T5Config from a T5Config, a preset name, a dict or an ml_collections ConfigDict."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, str):
            return cls.from_preset(cfg)
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        if not isinstance(cfg, Mapping):
            raise TypeError(f"cannot make a T5Config from {type(cfg).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown T5Config fields {unknown}; known: {sorted(names)}")
        return cls(**dict(cfg))

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides) -> T5Config:
        """From a Hugging Face `T5Config` object or its config.json dict."""
        d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("dtype", "param_dtype")]
        fields = {n: d[n] for n in names if n in d}
        fields["dropout_rate"] = 0.0  # inference: dropout off
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_config_dict(self):
        import ml_collections

        return ml_collections.ConfigDict(self.to_dict())


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """T5's bidirectional bucketing of (key - query) offsets -> int32 buckets in [0, num_buckets).

    Half the buckets per direction; within a direction, offsets below num_buckets/4 get their own
    bucket and larger ones share logarithmically wider bins up to max_distance. Computed with
    float32 logarithms like the reference implementations (bucket edges depend on it).
    """
    rel = np.asarray(relative_position, np.int64)
    half = num_buckets // 2
    bucket = np.where(rel > 0, half, 0)
    n = np.abs(rel)
    max_exact = half // 2
    is_small = n < max_exact
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (bucket + np.where(is_small, n, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """T5 layer norm: x / rms(x) * scale, no mean subtraction, no bias. [..., D] -> [..., D]."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for bucketed relative positions: -> [1, heads, lq, lk]."""

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q_len: int, k_len: int):
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "heads")),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
        buckets = relative_position_bucket(rel, self.num_buckets, self.max_distance)  # static
        values = jnp.take(table, jnp.asarray(buckets), axis=0)  # [lq, lk, h]
        return jnp.transpose(values, (2, 0, 1))[None].astype(self.dtype)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention with an additive bias. [B, L, D] -> [B, L, D]."""

    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, deterministic: bool = True):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
        # T5 initialisation (Mesh TensorFlow): q gets the extra 1/sqrt(d_kv) that unscaled attention lacks.
        init = lambda std: nn.initializers.normal(std)  # noqa: E731
        wq = self.param("query", nn.with_logical_partitioning(init((d * k) ** -0.5), ("embed", "heads", "kv")),
                        (d, h, k), pdt)
        wk = self.param("key", nn.with_logical_partitioning(init(d**-0.5), ("embed", "heads", "kv")), (d, h, k), pdt)
        wv = self.param("value", nn.with_logical_partitioning(init(d**-0.5), ("embed", "heads", "kv")), (d, h, k), pdt)
        wo = self.param("out", nn.with_logical_partitioning(init((h * k) ** -0.5), ("heads", "kv", "embed")),
                        (h, k, d), pdt)
        x = x.astype(dt)
        q = jnp.einsum("bld,dhk->bhlk", x, wq.astype(dt))
        key = jnp.einsum("bld,dhk->bhlk", x, wk.astype(dt))
        v = jnp.einsum("bld,dhk->bhlk", x, wv.astype(dt))
        y = dot_product_attention(q, key, v, bias=bias, mask=mask, scale=1.0)  # [b, h, l, k]
        return jnp.einsum("bhlk,hkd->bld", y, wo.astype(dt))


class T5MLP(nn.Module):
    """Feed-forward: wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x). [B, L, D] -> [B, L, D]."""

    config: T5Config

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        gated, act = _ACTIVATIONS[cfg.feed_forward_proj]
        w_in = lambda name: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model**-0.5), ("embed", "mlp")),
            (cfg.d_model, cfg.d_ff), pdt)
        wo = self.param("wo", nn.with_logical_partitioning(nn.initializers.normal(cfg.d_ff**-0.5), ("mlp", "embed")),
                        (cfg.d_ff, cfg.d_model), pdt)
        x = x.astype(dt)
        if gated:
            hdn = act(x @ w_in("wi_0").astype(dt)) * (x @ w_in("wi_1").astype(dt))
        else:
            hdn = act(x @ w_in("wi").astype(dt))
        hdn = nn.Dropout(cfg.dropout_rate)(hdn, deterministic=deterministic)
        return hdn @ wo.astype(dt)


class T5Block(nn.Module):
    """One pre-norm encoder layer: x + attn(norm x), then x + mlp(norm x)."""

    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, deterministic: bool = True):
        cfg = self.config
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
        y = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="pre_attention_norm")(x)
        x = x + drop(T5Attention(cfg, name="attention")(y, bias, mask, deterministic))
        y = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="pre_mlp_norm")(x)
        return x + drop(T5MLP(cfg, name="mlp")(y, deterministic))


class T5Encoder(nn.Module):
    """T5 encoder: ids int [B, L], mask bool [B, L] (True = real token) -> embeddings [B, L, d_model]."""

    config: T5Config

    @classmethod
    def from_config(cls, cfg: Any) -> T5Encoder:
        """From a T5Config, preset name, dict or ConfigDict (see `T5Config.coerce`)."""
        return cls(T5Config.coerce(cfg))

    @nn.compact
    def __call__(self, ids, mask=None, deterministic: bool = True):
        cfg = self.config
        if ids.ndim != 2:
            raise ValueError(f"T5Encoder expects ids of shape [batch, length], got {ids.shape}")
        if mask is None:
            mask = jnp.ones(ids.shape, bool)
        elif mask.shape != ids.shape:
            raise ValueError(f"T5Encoder: mask shape {mask.shape} differs from ids shape {ids.shape}")
        dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            name="token_embedder",
        )
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
        x = drop(embed(ids.astype(jnp.int32)))
        length = ids.shape[1]
        bias = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                    cfg.num_heads, dt, pdt, name="relpos_bias")(length, length)
        attn_mask = jnp.asarray(mask, bool)[:, None, None, :]  # padding keys are never attended
        for i in range(cfg.num_layers):
            x = T5Block(cfg, name=f"layers_{i}")(x, bias, attn_mask, deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="encoder_norm")(x)
        return drop(x)


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints.

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a .safetensors file into numpy arrays (bfloat16 via ml_dtypes); no torch needed."""
    import ml_dtypes

    data = pathlib.Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = info["dtype"]
        dtype = ml_dtypes.bfloat16 if kind == "BF16" else _SAFETENSORS_DTYPES.get(kind)
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {kind}")
        start, end = info["data_offsets"]
        buf = data[8 + n + start: 8 + n + end]
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(info["shape"]).copy()
    return out


def _to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    if type(t).__module__.startswith("torch"):
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def read_checkpoint(src) -> tuple[dict[str, np.ndarray], dict | None]:
    """State dict (numpy) and the HF config.json (if found) from a path or a mapping (any HF model)."""
    if isinstance(src, Mapping):
        return {k: _to_numpy(v) for k, v in src.items()}, None
    path = pathlib.Path(src)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint {path}")
    hf_config = None
    if path.is_dir():
        if (path / "config.json").is_file():
            hf_config = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {path}")
    else:
        files = [path]
    state = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(read_safetensors(f))
        else:
            import torch

            sd = torch.load(f, map_location="cpu", weights_only=True)
            state.update({k: _to_numpy(v) for k, v in sd.items()})
    return state, hf_config


def load_hf(path_or_state_dict, cfg: Any = None, dtype: Any = None) -> dict:
    """Converts a Hugging Face T5 encoder checkpoint into `T5Encoder` params (the "params" tree).

    path_or_state_dict: a `.safetensors` file, a `.bin`/`.pt` state dict, a directory holding
    them (sharded files are merged; its config.json supplies `cfg` when none is given), or a
    mapping name -> torch tensor / numpy array. Decoder and LM-head weights are ignored.
    dtype: parameter dtype (default `cfg.param_dtype`). Use as
    `T5Encoder(cfg).apply({"params": params}, ids, mask)`.
    """
    state, hf_config = read_checkpoint(path_or_state_dict)
    if cfg is None:
        if hf_config is None:
            raise ValueError("load_hf: pass cfg (T5Config, preset or dict); no config.json found to infer it")
        cfg = T5Config.from_hf(hf_config)
    cfg = T5Config.coerce(cfg)
    dtype = jnp.dtype(dtype or cfg.param_dtype)

    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    if not enc and any(k.startswith("block.") for k in state):  # a bare T5Stack state dict
        enc = dict(state)
    if "embed_tokens.weight" not in enc:  # tied embeddings are often stored once, as shared.weight
        if "shared.weight" not in state:
            raise ValueError("load_hf: checkpoint has neither encoder.embed_tokens.weight nor shared.weight")
        enc["embed_tokens.weight"] = state["shared.weight"]
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in enc:
            raise ValueError(f"load_hf: checkpoint lacks encoder.{name} (is cfg {cfg} right?)")
        used.add(name)
        return np.asarray(enc[name], np.float32)

    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    gated, _ = _ACTIVATIONS[cfg.feed_forward_proj]
    params: dict[str, Any] = {
        "token_embedder": {"embedding": take("embed_tokens.weight")},
        "relpos_bias": {"rel_embedding": take("block.0.layer.0.SelfAttention.relative_attention_bias.weight")},
        "encoder_norm": {"scale": take("final_layer_norm.weight")},
    }
    for i in range(cfg.num_layers):
        p = f"block.{i}.layer."
        attn = {n: take(f"{p}0.SelfAttention.{n[0]}.weight").T.reshape(d, h, k) for n in ("query", "key", "value")}
        attn["out"] = take(f"{p}0.SelfAttention.o.weight").T.reshape(h, k, d)
        ff = f"{p}1.DenseReluDense."
        names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
        params[f"layers_{i}"] = {
            "pre_attention_norm": {"scale": take(f"{p}0.layer_norm.weight")},
            "attention": attn,
            "pre_mlp_norm": {"scale": take(f"{p}1.layer_norm.weight")},
            "mlp": {n: take(ff + n + ".weight").T for n in names},
        }
    unused = sorted(set(enc) - used)
    if unused:
        raise ValueError(f"load_hf: unexpected encoder weights {unused[:5]}... (does cfg match the checkpoint?)")

    # Check every shape against the module's own parameter shapes.
    model = T5Encoder(cfg)
    expected = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))))
    exp_flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(expected["params"])}
    got_flat = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(params)}
    if set(exp_flat) != set(got_flat):
        raise ValueError(f"load_hf: parameter names differ: {sorted(set(exp_flat) ^ set(got_flat))}")
    for name, s in exp_flat.items():
        if tuple(got_flat[name].shape) != tuple(s.shape):
            raise ValueError(f"load_hf: {name} has shape {got_flat[name].shape} in the checkpoint, "
                             f"{s.shape} for cfg {cfg}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def from_text_config(text_config) -> tuple[T5Encoder, dict | None]:
    """The encoder of a `config.text` section and, if `text_config.checkpoint` is set, its
    converted parameters (else None: initialise with `model.init`, e.g. under jit with shardings)."""
    model = T5Encoder.from_config(text_config.encoder)
    checkpoint = text_config.get("checkpoint", "") if hasattr(text_config, "get") else ""
    return model, (load_hf(checkpoint, model.config) if checkpoint else None)
