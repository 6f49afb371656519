"""CLIP (Radford et al. 2021) in Flax linen: the CLIP score of generated images, and CLIP's text
tower as a conditioning model (aMUSEd's text encoder is CLIP-L/14's `CLIPTextModelWithProjection`).

Both towers follow the published OpenAI architecture, with Hugging Face `CLIPModel` parameter
semantics so that its checkpoints convert one to one:
  vision  pixel values [N, S, S, 3] -> non-overlapping P x P patches (a stride-P convolution
          without bias) -> [class embedding; patches] + learned position embeddings
          -> pre-layernorm -> L x pre-LN blocks (bidirectional attention)
          -> post-layernorm of the class token -> visual projection (no bias) -> [N, projection_dim]
  text    ids int [N, T] (T <= 77), mask bool [N, T] -> token + position embeddings
          -> L x pre-LN blocks (causal attention; padding keys masked) -> final layer norm
          -> the hidden state at the end-of-text token -> text projection (no bias) -> [N, projection_dim]
  A block is x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x)))); act is "quick_gelu"
  (x * sigmoid(1.702 x), the OpenAI models) or exact "gelu".
The end-of-text position follows Hugging Face: with `eos_token_id == 2` (legacy configs, such
as the hub's openai/clip-vit-* files) it is the position of the largest id in the row (the
end-of-text id 49407 is the largest in CLIP's vocabulary), otherwise the first position whose
id equals `eos_token_id`. Each row must contain that token.

Presets (`CLIPConfig.preset`): "vit-b-32" (openai/clip-vit-base-patch32: vision 768 wide, 12
layers, 12 heads, 32 px patches; text 512 wide, 12 layers, 8 heads; projection 512; about 151.3M
parameters) and "vit-l-14" (openai/clip-vit-large-patch14: vision 1024 wide, 24 layers, 16
heads, 14 px patches; text 768 wide, 12 layers, 12 heads; projection 768; about 427.6M). Both
take 224 x 224 images and 77-token contexts over a 49408-token vocabulary. Presets only give
the sizes: weights are never downloaded; convert a local checkpoint with `load_hf`.

Use:
  cfg = CLIPConfig.preset("vit-b-32")               # or CLIPConfig.from_hf(config_json_dict)
  params = load_hf("/path/to/clip-vit-base-patch32")  # config.json + model.safetensors
  img = embed_images(params, uint8_images, config=cfg)  # uint8 [N, H, W, 3] -> [N, 512]
  txt = embed_texts(params, ids, mask, config=cfg)      # ids from CLIP's BPE tokenizer
  cos = pair_cosines(img, txt)                           # [N]; the CLIP score: max(100 mean(cos), 0)
Token ids come from CLIP's byte-level BPE tokenizer, which is not part of this module (models
import no data code): `muse_jax.data.clip_bpe.CLIPTokenizer.from_dir(checkpoint_dir)` reads the
checkpoint's vocab.json / merges.txt.

The text tower alone, as aMUSEd conditions on it (`text_encoder(ids, output_hidden_states=True)`,
no attention mask; the penultimate hidden states for cross-attention, text_embeds pooled):
  cfg, params = load_text_hf("/path/to/amused/text_encoder")  # a CLIPTextModelWithProjection folder
  hidden, pooled = text_hidden_and_embeds(params, ids, config=cfg)  # [N, T, D], [N, projection_dim]

Parameter tree (`CLIP(cfg).init(...)["params"]`), with logical axis names:
  logit_scale                                        []
  visual_projection/kernel  [vision width, projection]  (embed, None)
  text_projection/kernel    [text width, projection]    (embed, None)
  vision_model/patch_embedding/kernel  [P, P, 3, D]  (None, None, None, embed)
  vision_model/class_embedding         [D]           (embed,)
  vision_model/position_embedding      [(S/P)^2 + 1, D]  (None, embed)
  vision_model/{pre_layrnorm,post_layernorm}/{scale,bias}  (embed,)
  text_model/token_embedding/embedding [vocab, D]    (vocab, embed)
  text_model/position_embedding        [T_max, D]    (None, embed)
  text_model/final_layer_norm/{scale,bias}           (embed,)
  {vision,text}_model/layers_{i}/{layer_norm1,layer_norm2}/{scale,bias}  (embed,)
  {vision,text}_model/layers_{i}/attention/{query,key,value}/kernel [D, heads, head_dim]  (embed, heads, kv)
  {vision,text}_model/layers_{i}/attention/{query,key,value}/bias   [heads, head_dim]     (heads, kv)
  {vision,text}_model/layers_{i}/attention/out/kernel [heads, head_dim, D]  (heads, kv, embed); out/bias [D]
  {vision,text}_model/layers_{i}/mlp/fc1/kernel [D, F] (embed, mlp), bias [F]; fc2/kernel [F, D] (mlp, embed), bias [D]
"""
from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models import t5
from muse_jax.models.layers import dot_product_attention
from muse_jax.models.layers import dtype as _dtype

# CLIP's image normalisation (OpenAI's released preprocessing).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


# ----------------------------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Text tower sizes; field names follow Hugging Face's `CLIPTextConfig` (defaults: ViT-B/32)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 selects the legacy rule: pool at the largest id of each row


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Vision tower sizes; field names follow Hugging Face's `CLIPVisionConfig` (defaults: ViT-B/32)."""

    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# Public sizes of the OpenAI releases: (vision width, layers, heads, patch), (text width, layers, heads), projection.
_PRESETS = {
    "vit-b-32": ((768, 12, 12, 32), (512, 12, 8), 512),
    "vit-l-14": ((1024, 24, 16, 14), (768, 12, 12), 768),
}
PRESETS = tuple(_PRESETS)


def _check_tower(name: str, c) -> None:
    if c.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"CLIPConfig: {name}.hidden_act={c.hidden_act!r}; expected one of {sorted(_ACTIVATIONS)}")
    if c.hidden_size % c.num_attention_heads:
        raise ValueError(f"CLIPConfig: {name}.hidden_size {c.hidden_size} is not a multiple of "
                         f"num_attention_heads {c.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers, the shared projection width and the computation dtype."""

    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07); the released models store their own
    dtype: str = "float32"  # computation dtype; float32 for evaluation fidelity

    def __post_init__(self):
        _check_tower("text", self.text)
        _check_tower("vision", self.vision)
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"CLIPConfig: image_size {self.vision.image_size} is not a multiple of "
                             f"patch_size {self.vision.patch_size}")

    @classmethod
    def preset(cls, name: str, **overrides) -> CLIPConfig:
        """A released OpenAI size by name: "vit-b-32" or "vit-l-14" (sizes only; no weights)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {', '.join(PRESETS)}")
        (vw, vl, vh, patch), (tw, tl, th), proj = _PRESETS[name]
        vision = CLIPVisionConfig(image_size=224, patch_size=patch, hidden_size=vw, intermediate_size=4 * vw,
                                  num_hidden_layers=vl, num_attention_heads=vh)
        text = CLIPTextConfig(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th)
        return cls(text=text, vision=vision, projection_dim=proj, **overrides)

    @classmethod
    def from_hf(cls, config_dict: Any, **overrides) -> CLIPConfig:
        """From a Hugging Face CLIP config.json dict (or a `transformers.CLIPConfig`).

        Fields missing from the `text_config` / `vision_config` sub-dicts (config.json files
        written with only non-default values) take Hugging Face's defaults, which are the
        ViT-B/32 sizes. A text tower's own config (`CLIPTextConfig`, model_type
        "clip_text_model", as `CLIPTextModelWithProjection` saves it: the text fields and
        projection_dim at the top level) gives that text tower and projection_dim; its vision
        tower is then the default one, which nothing reads.
        """
        d = config_dict if isinstance(config_dict, Mapping) else config_dict.to_dict()
        if "text_config" not in d and "vision_config" not in d:
            if d.get("model_type", "clip_text_model") != "clip_text_model" or "hidden_size" not in d:
                raise ValueError("CLIPConfig.from_hf: expected a CLIPModel config with text_config / vision_config "
                                 "or a CLIPTextConfig (model_type clip_text_model), got keys "
                                 f"{sorted(d)[:12]}")
            d = {"text_config": d, "projection_dim": d.get("projection_dim", 512)}  # HF's default projection_dim

        def sub(klass, sd):
            sd = dict(sd or {})
            fields = {f.name: sd[f.name] for f in dataclasses.fields(klass) if sd.get(f.name) is not None}
            return klass(**fields)

        text_d = dict(d.get("text_config") or {})
        eos = text_d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            if len(eos) != 1:
                raise ValueError(f"CLIPConfig.from_hf: several eos_token_id values {eos} are not supported")
            text_d["eos_token_id"] = int(eos[0])
        fields = dict(text=sub(CLIPTextConfig, text_d), vision=sub(CLIPVisionConfig, d.get("vision_config")))
        for name in ("projection_dim", "logit_scale_init_value"):
            if d.get(name) is not None:
                fields[name] = d[name]
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def coerce(cls, cfg: Any) -> CLIPConfig:
        """CLIPConfig from a CLIPConfig, a preset name or a Hugging Face config (dict or object)."""
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, str):
            return cls.preset(cfg)
        return cls.from_hf(cfg)


# ----------------------------------------------------------------------------------------------
# Modules.

def _init(std: float, names):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class _Linear(nn.Module):
    """x [..., *in_shape] -> [..., *out_shape]: contracts the trailing len(in_shape) axes of x."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple  # logical names of the kernel axes (in_shape + out_shape)
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = math.prod(self.in_shape)
        kernel = self.param("kernel", _init(fan_in**-0.5, self.names), self.in_shape + self.out_shape)
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=len(self.in_shape))
        if self.use_bias:
            bias_names = self.names[len(self.in_shape):]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_names), self.out_shape)
            y = y + bias.astype(self.dtype)
        return y


def _layer_norm(eps: float, dt, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dt, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


class _Attention(nn.Module):
    width: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        d, h = self.width, self.heads
        k = d // h
        proj = lambda name: _Linear((d,), (h, k), ("embed", "heads", "kv"), dtype=self.dtype, name=name)  # noqa: E731
        # [b, l, h, k] -> [b, h, l, k]
        q, key, v = (proj(n)(x).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
        out = dot_product_attention(q, key, v, mask=mask)  # scale 1/sqrt(head_dim), as CLIP
        return _Linear((h, k), (d,), ("heads", "kv", "embed"), dtype=self.dtype, name="out")(out.transpose(0, 2, 1, 3))


class _MLP(nn.Module):
    width: int
    hidden: int
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = _Linear((self.width,), (self.hidden,), ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        y = _ACTIVATIONS[self.act](y)
        return _Linear((self.hidden,), (self.width,), ("mlp", "embed"), dtype=self.dtype, name="fc2")(y)


class _Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    tower: Any  # CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        c, dt = self.tower, self.dtype
        x = x + _Attention(c.hidden_size, c.num_attention_heads, dt, name="attention")(
            _layer_norm(c.layer_norm_eps, dt, "layer_norm1")(x), mask)
        return x + _MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dt, name="mlp")(
            _layer_norm(c.layer_norm_eps, dt, "layer_norm2")(x))


class CLIPVisionTower(nn.Module):
    """Pixel values float [N, S, S, C] (normalised) -> pooled class-token features [N, D] (before projection)."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c, dt = self.config, self.dtype
        n, hgt, wid, ch = pixel_values.shape
        s, p, d = c.image_size, c.patch_size, c.hidden_size
        if (hgt, wid, ch) != (s, s, c.num_channels):
            raise ValueError(f"CLIP vision tower expects pixel values [N, {s}, {s}, {c.num_channels}], "
                             f"got {pixel_values.shape}")
        kernel = self.param("patch_embedding", _init((p * p * ch) ** -0.5, (None, None, None, "embed")), (p, p, ch, d))
        g = s // p
        patches = pixel_values.astype(dt).reshape(n, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)  # [n, gy, gx, p, p, c]
        x = jnp.einsum("nyxijc,ijcd->nyxd", patches, kernel.astype(dt)).reshape(n, g * g, d)  # row-major patch order
        cls = self.param("class_embedding", _init(d**-0.5, ("embed",)), (d,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (n, 1, d)), x], axis=1)
        pos = self.param("position_embedding", _init(0.02, (None, "embed")), (g * g + 1, d))
        x = x + pos.astype(dt)[None]
        x = _layer_norm(c.layer_norm_eps, dt, "pre_layrnorm")(x)
        for i in range(c.num_hidden_layers):
            x = _Block(c, dt, name=f"layers_{i}")(x)
        return _layer_norm(c.layer_norm_eps, dt, "post_layernorm")(x[:, 0])


def eos_positions(ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled (end-of-text) token of each row of ids [N, T], Hugging Face's rule."""
    if eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == eos_token_id, axis=-1)  # the first occurrence


def _hidden_index(hidden_layer: int, num_layers: int) -> int:
    """Hugging Face's `hidden_states[hidden_layer]` (0: the embeddings, i: layer i's output) as 0..num_layers."""
    if not -(num_layers + 1) <= hidden_layer <= num_layers:
        raise ValueError(f"CLIP text tower: hidden_layer {hidden_layer} is outside the {num_layers + 1} hidden "
                         f"states (embeddings and {num_layers} layers; -{num_layers + 1}..{num_layers})")
    return hidden_layer % (num_layers + 1)


class CLIPTextTower(nn.Module):
    """Ids int [N, T], mask bool [N, T] (True = real token) -> end-of-text features [N, D] (before projection).

    With `hidden_layer` (an index into Hugging Face's `hidden_states`: 0 the embeddings, i the
    output of layer i, -1 the last layer's, before the final layer norm) it returns
    (those hidden states [N, T, D], the end-of-text features [N, D]).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, mask=None, hidden_layer: int | None = None):
        c, dt = self.config, self.dtype
        if ids.ndim != 2:
            raise ValueError(f"CLIP text tower expects ids of shape [batch, length], got {ids.shape}")
        n, t = ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"CLIP text tower: length {t} exceeds max_position_embeddings {c.max_position_embeddings}")
        ids = ids.astype(jnp.int32)
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, name="token_embedding",
                       embedding_init=_init(0.02, ("vocab", "embed")))
        pos = self.param("position_embedding", _init(0.01, (None, "embed")), (c.max_position_embeddings, c.hidden_size))
        x = tok(ids) + pos[:t].astype(dt)[None]
        attn_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, q, k]: causal
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"CLIP text tower: mask shape {mask.shape} differs from ids shape {ids.shape}")
            attn_mask = attn_mask & jnp.asarray(mask, bool)[:, None, None, :]  # padding keys are never attended
        keep = None if hidden_layer is None else _hidden_index(hidden_layer, c.num_hidden_layers)
        hidden = x
        for i in range(c.num_hidden_layers):
            x = _Block(c, dt, name=f"layers_{i}")(x, attn_mask)
            if keep == i + 1:
                hidden = x
        x = _layer_norm(c.layer_norm_eps, dt, "final_layer_norm")(x)
        pooled = x[jnp.arange(n), eos_positions(ids, c.eos_token_id)]
        return pooled if keep is None else (hidden, pooled)


class CLIP(nn.Module):
    """Both towers and their projections. `__call__` (used by init) returns (image_emb, text_emb)."""

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        dt = _dtype(cfg.dtype)
        self.vision_model = CLIPVisionTower(cfg.vision, dt)
        self.text_model = CLIPTextTower(cfg.text, dt)
        self.visual_projection = _Linear((cfg.vision.hidden_size,), (cfg.projection_dim,), ("embed", None),
                                         use_bias=False, dtype=dt)
        self.text_projection = _Linear((cfg.text.hidden_size,), (cfg.projection_dim,), ("embed", None),
                                       use_bias=False, dtype=dt)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), ())

    def encode_image(self, pixel_values):
        """Normalised pixel values [N, S, S, 3] -> projected image embeddings float32 [N, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values)).astype(jnp.float32)

    def encode_text(self, ids, mask=None):
        """Ids [N, T] and mask [N, T] -> projected text embeddings float32 [N, projection_dim]."""
        return self.text_projection(self.text_model(ids, mask)).astype(jnp.float32)

    def __call__(self, pixel_values, ids, mask=None):
        return self.encode_image(pixel_values), self.encode_text(ids, mask)


class CLIPTextWithProjection(nn.Module):
    """The text tower and its projection alone (Hugging Face's `CLIPTextModelWithProjection`), with
    the same parameter names as in `CLIP` ("text_model", "text_projection"): so either a `CLIP`
    params tree or a text-only one applies. Ids [N, T], mask [N, T] or None ->
    (hidden_states[hidden_layer] float32 [N, T, D], text_embeds float32 [N, projection_dim])."""

    config: CLIPConfig
    hidden_layer: int = -2

    def setup(self):
        cfg = self.config
        dt = _dtype(cfg.dtype)
        self.text_model = CLIPTextTower(cfg.text, dt)
        self.text_projection = _Linear((cfg.text.hidden_size,), (cfg.projection_dim,), ("embed", None),
                                       use_bias=False, dtype=dt)

    def __call__(self, ids, mask=None):
        hidden, pooled = self.text_model(ids, mask, self.hidden_layer)
        return hidden.astype(jnp.float32), self.text_projection(pooled).astype(jnp.float32)


def init(config: Any, rng: jax.Array | None = None) -> dict:
    """Randomly initialised params (the unboxed "params" tree) for a config or preset name."""
    cfg = CLIPConfig.coerce(config)
    s = cfg.vision.image_size
    rng = jax.random.PRNGKey(0) if rng is None else rng
    variables = CLIP(cfg).init(rng, jnp.zeros((1, s, s, cfg.vision.num_channels)), jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(variables)["params"]


def param_shapes(config: Any) -> dict:
    """The params tree as jax.ShapeDtypeStruct leaves, without allocating (jax.eval_shape of init)."""
    return jax.eval_shape(lambda: init(config))


def _text_param_shapes(cfg: CLIPConfig) -> dict:
    """The text-only params tree ("text_model", "text_projection") as jax.ShapeDtypeStruct leaves."""
    return {k: v for k, v in param_shapes(cfg).items() if k in _TEXT_PARTS}


def num_params(config: Any) -> int:
    """Parameter count of a config or preset (both towers, projections and logit_scale)."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(param_shapes(config)))


# ----------------------------------------------------------------------------------------------
# Embedding and scoring.

@functools.lru_cache(maxsize=8)
def _jitted(cfg: CLIPConfig, method: str):
    model = CLIP(cfg)
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=getattr(CLIP, method)))


def _params(params) -> dict:
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def embed_images(params, images, *, config: Any) -> jax.Array:
    """Projected (not normalised) image embeddings float32 [N, projection_dim].

    images: uint8 [N, H, W, 3] (or a sequence of uint8 [H, W, 3] arrays of any sizes), which are
    preprocessed on the host with `preprocess_images`; or float pixel values [N, S, S, 3] that are
    already preprocessed (resized, cropped and normalised, i.e. Hugging Face's `pixel_values`
    in NHWC layout).
    """
    cfg = CLIPConfig.coerce(config)
    is_uint8 = (not hasattr(images, "dtype") and isinstance(images, Sequence)) or images.dtype == np.uint8
    pixels = preprocess_images(images, cfg.vision.image_size) if is_uint8 else images
    return _jitted(cfg, "encode_image")(_params(params), jnp.asarray(pixels, jnp.float32))


def embed_texts(params, ids, mask=None, *, config: Any) -> jax.Array:
    """Projected (not normalised) text embeddings float32 [N, projection_dim].

    ids: int [N, T] from CLIP's BPE tokenizer (start token, text, end-of-text token, padding;
    T <= max_position_embeddings); mask: bool/int [N, T], True/1 for real tokens (None: all real).
    """
    cfg = CLIPConfig.coerce(config)
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    return _jitted(cfg, "encode_text")(_params(params), ids, mask)


@functools.lru_cache(maxsize=8)
def _jitted_text(cfg: CLIPConfig, hidden_layer: int):
    model = CLIPTextWithProjection(cfg, hidden_layer)
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


def text_hidden_and_embeds(params, ids, mask=None, *, config: Any,
                           hidden_layer: int = -2) -> tuple[jax.Array, jax.Array]:
    """Hugging Face `CLIPTextModelWithProjection(ids, attention_mask=mask, output_hidden_states=True)`'s
    (hidden_states[hidden_layer], text_embeds), both float32.

    params: a `CLIP` params tree or a text-only one (`load_text_hf`: "text_model",
    "text_projection"). ids: int [N, T] (T <= max_position_embeddings); mask: bool/int [N, T]
    (True = real token) or None for causal attention alone, as aMUSEd calls its text encoder (ids
    padded to the full length, no mask). hidden_layer indexes the hidden states as Hugging Face's
    `output_hidden_states` does: 0 is the embeddings, i the output of layer i, -1 the last layer's
    (before the final layer norm) and -2, the default, the penultimate (aMUSEd's cross-attention
    states). Returns ([N, T, D], text_embeds [N, projection_dim]: the projection of the final
    layer-normed state at the end-of-text token). Traceable: may be called inside a jitted
    function (config and hidden_layer are static).
    """
    cfg = CLIPConfig.coerce(config)
    _hidden_index(hidden_layer, cfg.text.num_hidden_layers)  # a clear error before tracing
    params = _params(params)
    if not all(k in params for k in _TEXT_PARTS):
        raise ValueError(f"text_hidden_and_embeds: params need {list(_TEXT_PARTS)} (a CLIP or load_text_hf tree), "
                         f"got {sorted(params)}")
    text_params = {k: params[k] for k in _TEXT_PARTS}
    ids = jnp.asarray(ids, jnp.int32)
    mask = None if mask is None else jnp.asarray(mask).astype(bool)
    return _jitted_text(cfg, int(hidden_layer))(text_params, ids, mask)


def pair_cosines(image_emb, text_emb) -> jax.Array:
    """cos(image_emb[i], text_emb[i]) of each pair: float32 [N]. The CLIP score of a set of pairs is
    torchmetrics' max(100 * mean(cos), 0) (`muse_jax.evaluation.zero_shot.clip_score`)."""
    a = jnp.asarray(image_emb, jnp.float32)
    b = jnp.asarray(text_emb, jnp.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair_cosines: expected two [N, D] arrays of the same shape, got {a.shape} and {b.shape}")
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return jnp.sum(a * b, axis=-1)


# ----------------------------------------------------------------------------------------------
# Image preprocessing (host side).

def preprocess_image(image: np.ndarray, image_size: int = 224) -> np.ndarray:
    """One uint8 image [H, W, 3] -> normalised float32 [image_size, image_size, 3], as OpenAI CLIP.

    Resizes so that the shorter side is image_size (longer side int(image_size * long / short)) with
    PIL's bicubic filter (antialiased when shrinking: the filter OpenAI's torchvision pipeline
    uses on PIL images), center-crops image_size x image_size (offset round((size - crop) / 2),
    torchvision's), scales to [0, 1] and normalises with `IMAGE_MEAN` / `IMAGE_STD`.
    """
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"preprocess_image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    h, w = image.shape[:2]
    if h <= w:
        new_h, new_w = image_size, int(image_size * w / h)
    else:
        new_h, new_w = int(image_size * h / w), image_size
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    image = image[top:top + image_size, left:left + image_size]
    x = image.astype(np.float32) / 255.0
    return (x - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)


def preprocess_images(images, image_size: int = 224) -> np.ndarray:
    """uint8 [N, H, W, 3] (or a sequence of uint8 [H, W, 3]) -> float32 [N, image_size, image_size, 3]."""
    return np.stack([preprocess_image(im, image_size) for im in images]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints.

# Buffers some checkpoints carry (older transformers saved them); not parameters, and skipped.
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# The top-level parameters of the text tower with its projection (`CLIPTextModelWithProjection`).
_TEXT_PARTS = ("text_model", "text_projection")
# What a full `CLIPModel` checkpoint holds besides them: ignored when only the text side is loaded.
_NOT_TEXT_PREFIXES = ("vision_model.", "visual_projection.", "logit_scale")


def _mapping(cfg: CLIPConfig) -> list[tuple[tuple[str, ...], str, Any]]:
    """Every (Flax path, Hugging Face name, transform) of a CLIPModel checkpoint.

    Torch Linear weights are [out, in]: kernels are their transposes, reshaped to
    [D, heads, head_dim] for q/k/v and [heads, head_dim, D] for the attention output.
    The patch convolution [D, C, P, P] becomes [P, P, C, D]. LayerNorm weight -> scale.
    """
    m: list[tuple[tuple[str, ...], str, Any]] = []
    same = lambda a: a  # noqa: E731
    transpose = lambda a: a.T  # noqa: E731

    def norm(flax_prefix, hf_prefix):
        m.append((flax_prefix + ("scale",), hf_prefix + ".weight", same))
        m.append((flax_prefix + ("bias",), hf_prefix + ".bias", same))

    def tower(tname, c):
        d, h = c.hidden_size, c.num_attention_heads
        k = d // h
        for i in range(c.num_hidden_layers):
            fp, hp = (tname, f"layers_{i}"), f"{tname}.encoder.layers.{i}"
            norm(fp + ("layer_norm1",), hp + ".layer_norm1")
            norm(fp + ("layer_norm2",), hp + ".layer_norm2")
            for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                m.append((fp + ("attention", ours, "kernel"), f"{hp}.self_attn.{theirs}.weight",
                          lambda a, d=d, h=h, k=k: a.T.reshape(d, h, k)))
                m.append((fp + ("attention", ours, "bias"), f"{hp}.self_attn.{theirs}.bias",
                          lambda a, h=h, k=k: a.reshape(h, k)))
            m.append((fp + ("attention", "out", "kernel"), f"{hp}.self_attn.out_proj.weight",
                      lambda a, d=d, h=h, k=k: a.T.reshape(h, k, d)))
            m.append((fp + ("attention", "out", "bias"), f"{hp}.self_attn.out_proj.bias", same))
            for fc in ("fc1", "fc2"):
                m.append((fp + ("mlp", fc, "kernel"), f"{hp}.mlp.{fc}.weight", transpose))
                m.append((fp + ("mlp", fc, "bias"), f"{hp}.mlp.{fc}.bias", same))

    v = "vision_model"
    m.append(((v, "patch_embedding"), f"{v}.embeddings.patch_embedding.weight", lambda a: a.transpose(2, 3, 1, 0)))
    m.append(((v, "class_embedding"), f"{v}.embeddings.class_embedding", same))
    m.append(((v, "position_embedding"), f"{v}.embeddings.position_embedding.weight", same))
    norm((v, "pre_layrnorm"), f"{v}.pre_layrnorm")
    tower(v, cfg.vision)
    norm((v, "post_layernorm"), f"{v}.post_layernorm")
    t = "text_model"
    m.append(((t, "token_embedding", "embedding"), f"{t}.embeddings.token_embedding.weight", same))
    m.append(((t, "position_embedding"), f"{t}.embeddings.position_embedding.weight", same))
    tower(t, cfg.text)
    norm((t, "final_layer_norm"), f"{t}.final_layer_norm")
    m.append((("visual_projection", "kernel"), "visual_projection.weight", transpose))
    m.append((("text_projection", "kernel"), "text_projection.weight", transpose))
    m.append((("logit_scale",), "logit_scale", lambda a: a.reshape(())))
    return m


def _convert(state: Mapping[str, Any], mapping, expected: dict, dtype: Any, who: str,
             ignored_prefixes: tuple[str, ...] = ()) -> dict:
    """Params tree from a state dict through `mapping` (entries of `_mapping`); ValueError listing
    every missing, unexpected (other than `_BUFFERS` and `ignored_prefixes`) or misshapen weight."""
    assert {fp for fp, _, _ in mapping} == set(expected), "mapping and module disagree"
    names = {hf for _, hf, _ in mapping}
    missing = sorted(names - set(state))
    unexpected = sorted(k for k in set(state) - names - set(_BUFFERS) if not k.startswith(ignored_prefixes))
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    params: dict[str, Any] = {}
    for fp, hf, fn in mapping:
        if hf not in state:
            continue
        raw = np.asarray(state[hf], np.float32)
        try:
            a = fn(raw)
        except ValueError:  # a reshape of the wrong number of elements
            a = None
        if a is None or tuple(a.shape) != tuple(expected[fp]):
            problems.append(f"{hf}: shape {tuple(raw.shape)} does not convert to {tuple(expected[fp])}")
            continue
        node = params
        for key in fp[:-1]:
            node = node.setdefault(key, {})
        node[fp[-1]] = jnp.asarray(a, dtype)
    if problems:
        raise ValueError(f"{who}: checkpoint does not match the config: " + "; ".join(problems))
    return params


def _leaf_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(getattr(k, "key", k) for k in path): s.shape for path, s in jax.tree_util.tree_leaves_with_path(tree)}


def load_hf(path_or_state_dict, config: Any = None, dtype: Any = jnp.float32) -> dict:
    """Converts a Hugging Face `CLIPModel` checkpoint into `CLIP` params (the "params" tree).

    path_or_state_dict: a directory with config.json and model.safetensors (or sharded
    *.safetensors, or pytorch_model*.bin), a single such file, or a mapping name -> torch
    tensor / numpy array (then `config` is required). config: a `CLIPConfig`, preset name or
    HF config dict; by default the directory's config.json. Every expected weight must be present
    with the expected shape and no other weight may remain (the position_ids buffers excepted),
    else ValueError listing the differences. See `_mapping` for the name correspondence.
    """
    state, hf_config = t5.read_checkpoint(path_or_state_dict)
    if config is None:
        if hf_config is None:
            raise ValueError("clip.load_hf: pass config (CLIPConfig, preset or HF config dict); no config.json found")
        config = hf_config
    cfg = CLIPConfig.coerce(config)
    return _convert(state, _mapping(cfg), _leaf_shapes(param_shapes(cfg)), dtype, "clip.load_hf")


def load_text_hf(path_or_state_dict, config: Any = None, dtype: Any = jnp.float32) -> tuple[CLIPConfig, dict]:
    """A Hugging Face `CLIPTextModelWithProjection` checkpoint -> (config, text-only params).

    path_or_state_dict: a folder with config.json (a `CLIPTextConfig`: the text fields and
    projection_dim at the top level) and model.safetensors (weights text_model.* and
    text_projection.weight), such as aMUSEd's text_encoder/ folder; a single weights file or a
    mapping name -> tensor / array (then `config` is required). A full `CLIPModel` checkpoint also
    loads: its vision weights are skipped. The config is a `CLIPConfig` (`CLIPConfig.from_hf`)
    whose text tower and projection_dim are the checkpoint's (its vision tower is unused); the
    params hold "text_model" and "text_projection" only, for `text_hidden_and_embeds` (or
    `embed_texts`). FileNotFoundError names a missing folder or file; ValueError lists missing,
    unexpected or misshapen weights.
    """
    who = "clip.load_text_hf"
    if not isinstance(path_or_state_dict, Mapping):
        path = pathlib.Path(path_or_state_dict)
        if not path.exists():
            raise FileNotFoundError(f"{who}: no such CLIP text encoder checkpoint {path}")
        if path.is_dir() and config is None and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{who}: {path} has no config.json (a CLIPTextModelWithProjection folder "
                                    "holds config.json and model.safetensors)")
    try:
        state, hf_config = t5.read_checkpoint(path_or_state_dict)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{who}: {e} (a CLIPTextModelWithProjection folder holds config.json and "
                                "model.safetensors)") from None
    if config is None:
        if hf_config is None:
            raise ValueError(f"{who}: pass config (CLIPConfig or HF config dict); no config.json found")
        config = hf_config
    cfg = CLIPConfig.coerce(config)
    mapping = [m for m in _mapping(cfg) if m[0][0] in _TEXT_PARTS]
    where = "" if isinstance(path_or_state_dict, Mapping) else f" ({path_or_state_dict})"
    params = _convert(state, mapping, _leaf_shapes(_text_param_shapes(cfg)), dtype, who + where,
                      ignored_prefixes=_NOT_TEXT_PREFIXES)
    return cfg, params
