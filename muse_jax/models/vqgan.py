"""The VQGAN image tokenizer of Muse / MaskGIT: images <-> grids of codebook indices.

A fully convolutional encoder and decoder of residual blocks (GroupNorm, swish) with one
channel width per resolution, and a vector quantizer between them (Esser et al. 2021;
Chang et al. 2022, 2023). The downsampling factor is `2 ** (len(channels) - 1)`:
3 widths give f4, 4 give f8, 5 give f16.

Images are NHWC, float in [-1, 1] or uint8 in [0, 255] (uint8 is rescaled on entry).
Tokens are int32 [B, H/f, W/f].

Options that exist to load public weights (the diffusers `VQModel` layout used by
aMUSEd / open-muse, see `vqgan_diffusers.py`): a single-head self-attention layer in the
middle blocks (`mid_attention`, off in the Muse default), 1x1 `quant_conv` /
`post_quant_conv` around the quantizer, and strided-conv downsampling with diffusers'
asymmetric padding.

Use `ImageTokenizer` for inference (jitted uint8 in / uint8 out; `muse_jax.workdir` loads trained ones).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models import layers

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


PIXEL_RANGES = ("-1,1", "0,1")


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """The architecture of a VQGAN; `factor = 2 ** (len(channels) - 1)`."""

    channels: tuple[int, ...] = (128, 128, 256, 256, 512)  # width per resolution, input first
    num_res_blocks: int = 2  # residual blocks per resolution (decoder: one more)
    latent_channels: int = 256  # encoder output channels
    codebook_size: int = 8192
    code_dim: int = 256  # codebook vector size (== latent_channels unless quant_conv)
    norm_groups: int = 32
    # "group": GroupNorm (the VQGAN papers'); "layer": per-position LayerNorm over channels, so a
    # token depends only on its receptive field, not on statistics of the whole image.
    norm: str = "group"
    in_channels: int = 3
    out_channels: int = 3
    beta: float = 0.25  # commitment loss weight
    l2_normalize: bool = False  # compare l2-normalised latents and codes (cosine distance)
    downsample: str = "conv"  # "conv": 3x3 stride-2 conv (pad right/bottom); "avgpool"
    mid_attention: bool = False  # self-attention in the middle blocks (diffusers option)
    quant_conv: bool = False  # 1x1 convs latent_channels <-> code_dim around the quantizer
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # The pixel values the network takes and gives: "-1,1" (this project's VQGANs), or "0,1" (aMUSEd's
    # and open-muse's, which their pipelines feed un-normalised images).
    pixel_range: str = "-1,1"

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def groups(self) -> int:
        """`norm_groups` for GroupNorm; 0 selects the per-position LayerNorm (see `_norm`)."""
        return self.norm_groups if self.norm == "group" else 0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) < 1:
            raise ValueError("VQGANConfig.channels needs at least one width")
        if self.pixel_range not in PIXEL_RANGES:
            raise ValueError(f"pixel_range must be one of {PIXEL_RANGES}, got {self.pixel_range!r}")
        if self.norm not in ("group", "layer"):
            raise ValueError(f"norm must be 'group' or 'layer', got {self.norm!r}")
        for c in (*self.channels, self.latent_channels):
            if self.norm == "group" and c % self.norm_groups:
                raise ValueError(f"channel width {c} is not divisible by norm_groups={self.norm_groups}")
        if not self.quant_conv and self.code_dim != self.latent_channels:
            raise ValueError(
                f"code_dim={self.code_dim} differs from latent_channels={self.latent_channels}: "
                "set quant_conv=True to project between them"
            )
        if self.downsample not in ("conv", "avgpool"):
            raise ValueError(f"downsample must be 'conv' or 'avgpool', got {self.downsample!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VQGANConfig:
        """From a dict or ConfigDict (e.g. `config.vqgan`); unknown keys are an error."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown VQGAN config fields {unknown}; known: {sorted(fields)}")
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d


# ---------------------------------------------------------------------------------------
# Layers (parameters carry logical axis names, see muse_jax/models/layers.py)
# ---------------------------------------------------------------------------------------

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding="SAME", dtype=jnp.float32):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def _norm(groups: int, name: str):
    """GroupNorm in float32 (eps 1e-6, exact two-pass variance); groups=0: per-position LayerNorm."""
    if groups == 0:
        return nn.LayerNorm(
            epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            name=name,
        )
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=1e-6,
        dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


class ResBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice plus a (1x1-projected) skip: [B,H,W,Cin] -> [B,H,W,C]."""

    features: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.swish(_norm(self.groups, "norm1")(x)).astype(self.dtype)
        h = _conv(self.features, 3, "conv1", dtype=self.dtype)(h)
        h = nn.swish(_norm(self.groups, "norm2")(h)).astype(self.dtype)
        h = _conv(self.features, 3, "conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, "conv_shortcut", dtype=self.dtype)(x)
        return x + h


class Attention(nn.Module):
    """Single-head spatial self-attention with a residual (diffusers' mid-block option)."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _norm(self.groups, "group_norm")(x).astype(self.dtype).reshape(b, 1, hh * ww, c)

        def dense(name):
            return nn.Dense(
                c,
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_in", "conv_out")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                name=name,
            )

        q, k, v = dense("to_q")(h), dense("to_k")(h), dense("to_v")(h)
        out = layers.dot_product_attention(q, k, v)
        return x + dense("to_out")(out).reshape(b, hh, ww, c)


class MidBlock(nn.Module):
    """ResBlock, optional attention, ResBlock at the lowest resolution."""

    features: int
    groups: int
    attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResBlock(self.features, self.groups, self.dtype, name="res_0")(x)
        if self.attention:
            x = Attention(self.groups, self.dtype, name="attn")(x)
        return ResBlock(self.features, self.groups, self.dtype, name="res_1")(x)


class Encoder(nn.Module):
    """Images [B,H,W,3] in [-1,1] -> latents [B,H/f,W/f,latent_channels]."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        x = _conv(cfg.channels[0], 3, "conv_in", dtype=dtype)(x.astype(dtype))
        for i, ch in enumerate(cfg.channels):
            for j in range(cfg.num_res_blocks):
                x = ResBlock(ch, cfg.groups, dtype, name=f"down_{i}_res_{j}")(x)
            if i < len(cfg.channels) - 1:
                if cfg.downsample == "conv":
                    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
                    x = _conv(ch, 3, f"down_{i}_downsample", stride=2, padding="VALID", dtype=dtype)(x)
                else:
                    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = MidBlock(cfg.channels[-1], cfg.groups, cfg.mid_attention, dtype, name="mid")(x)
        x = nn.swish(_norm(cfg.groups, "norm_out")(x)).astype(dtype)
        return _conv(cfg.latent_channels, 3, "conv_out", dtype=dtype)(x)


class Decoder(nn.Module):
    """Latents [B,h,w,latent_channels] -> images [B,h*f,w*f,3] (unbounded, ~[-1,1])."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        x = _conv(cfg.channels[-1], 3, "conv_in", dtype=dtype)(x.astype(dtype))
        x = MidBlock(cfg.channels[-1], cfg.groups, cfg.mid_attention, dtype, name="mid")(x)
        for i, ch in enumerate(reversed(cfg.channels)):
            for j in range(cfg.num_res_blocks + 1):
                x = ResBlock(ch, cfg.groups, dtype, name=f"up_{i}_res_{j}")(x)
            if i < len(cfg.channels) - 1:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
                x = _conv(ch, 3, f"up_{i}_upsample", dtype=dtype)(x)
        x = nn.swish(_norm(cfg.groups, "norm_out")(x)).astype(dtype)
        return _conv(cfg.out_channels, 3, "conv_out", dtype=dtype)(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Vector quantizer
# ---------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| along `axis`."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (Euclidean): z [..., D], codebook [K, D] -> int32 [...]."""
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code.
    scores = jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(codebook * codebook, axis=-1) - 2.0 * scores
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def codebook_stats(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Usage (fraction of codes used) and perplexity of the code histogram of `indices`."""
    counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with straight-through gradients (van den Oord et al. 2017).

    With `l2_normalize`, latents and codes are compared and returned on the unit sphere
    (Yu et al. 2022, ViT-VQGAN), which keeps many codes in use.
    """

    codebook_size: int
    code_dim: int
    beta: float = 0.25
    l2_normalize: bool = False

    def setup(self):
        self.codebook = self.param(
            "codebook",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (self.codebook_size, self.code_dim),
            jnp.float32,
        )

    def codes(self) -> jax.Array:
        """The codebook as used for lookup: [K, D]."""
        return l2_normalize(self.codebook) if self.l2_normalize else self.codebook

    def lookup(self, indices: jax.Array) -> jax.Array:
        """int [...] -> code vectors [..., D]."""
        return jnp.take(self.codes(), indices, axis=0)

    def quantize(self, z: jax.Array) -> jax.Array:
        """Latents [..., D] -> indices int32 [...]."""
        z = z.astype(jnp.float32)
        if self.l2_normalize:
            z = l2_normalize(z)
        return nearest_code(z, self.codes())

    def __call__(self, z: jax.Array):
        """z [..., D] -> (straight-through z_q [..., D], indices [...], losses dict)."""
        z = z.astype(jnp.float32)
        if self.l2_normalize:
            z = l2_normalize(z)
        codes = self.codes()
        indices = nearest_code(z, codes)
        z_q = jnp.take(codes, indices, axis=0)
        sg = jax.lax.stop_gradient
        codebook_loss = jnp.mean((sg(z) - z_q) ** 2)
        commitment_loss = jnp.mean((z - sg(z_q)) ** 2)
        z_st = z + sg(z_q - z)
        losses = {
            "codebook": codebook_loss,
            "commitment": commitment_loss,
            "quantizer": codebook_loss + self.beta * commitment_loss,
        }
        return z_st, indices, losses


# ---------------------------------------------------------------------------------------
# The VQGAN
# ---------------------------------------------------------------------------------------


def to_float_images(images: jax.Array, pixel_range: str = "-1,1") -> jax.Array:
    """uint8 [0,255] -> float32 in `pixel_range` ("-1,1" or "0,1"); float input is passed through as float32."""
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32)
        return x / 255.0 if pixel_range == "0,1" else x / 127.5 - 1.0
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be uint8 or float in [{pixel_range}], got dtype {images.dtype}")
    return images.astype(jnp.float32)


def to_uint8_images(images: jax.Array, pixel_range: str = "-1,1") -> jax.Array:
    """float in `pixel_range` -> uint8 [0,255] (clipped, rounded)."""
    scaled = images * 255.0 if pixel_range == "0,1" else (images + 1.0) * 127.5
    return jnp.round(jnp.clip(scaled, 0.0, 255.0)).astype(jnp.uint8)


class VQGAN(nn.Module):
    """Encoder -> vector quantizer -> decoder. See the module docstring for shapes."""

    config: VQGANConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.l2_normalize)
        if cfg.quant_conv:
            self.quant_conv = _conv(cfg.code_dim, 1, "quant_conv")
            self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv")

    def check_images(self, images: jax.Array) -> jax.Array:
        """Validates [B,H,W,C] images (C = in_channels, H and W divisible by f) -> float32."""
        cfg = self.config
        if images.ndim != 4:
            raise ValueError(f"images must be [batch, height, width, channels], got shape {images.shape}")
        _, h, w, c = images.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"images have {c} channels, the tokenizer expects {cfg.in_channels} (shape {images.shape})"
            )
        if h % cfg.factor or w % cfg.factor:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the downsampling factor {cfg.factor}"
            )
        return to_float_images(images, cfg.pixel_range)

    def encode_latents(self, images: jax.Array) -> jax.Array:
        """Images -> pre-quantisation latents [B,h,w,code_dim] (float32)."""
        z = self.encoder(self.check_images(images))
        if self.config.quant_conv:
            z = self.quant_conv(z)
        return z.astype(jnp.float32)

    def decode_latents(self, z_q: jax.Array) -> jax.Array:
        """Quantised latents [B,h,w,code_dim] -> float images [B,H,W,3]."""
        if self.config.quant_conv:
            z_q = self.post_quant_conv(z_q)
        return self.decoder(z_q)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images [B,H,W,3] (float [-1,1] or uint8) -> tokens int32 [B,H/f,W/f]."""
        return self.quantizer.quantize(self.encode_latents(images))

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Tokens int [B,h,w] -> float images [B,h*f,w*f,3], roughly in [-1,1] (not clipped)."""
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [batch, height, width], got shape {tokens.shape}")
        return self.decode_latents(self.quantizer.lookup(tokens))

    def lookup(self, tokens: jax.Array) -> jax.Array:
        """Tokens int [...] -> code vectors [..., code_dim]."""
        return self.quantizer.lookup(tokens)

    def quantize(self, z: jax.Array) -> jax.Array:
        """Latents [..., code_dim] -> tokens int32 [...]."""
        return self.quantizer.quantize(z)

    def __call__(self, images: jax.Array):
        """Training pass: images -> (reconstruction float [B,H,W,3], aux dict).

        aux: tokens, latents (pre-quantisation), and the quantizer losses
        (codebook, commitment, quantizer = codebook + beta * commitment).
        """
        z = self.encode_latents(images)
        z_q, tokens, losses = self.quantizer(z)
        recon = self.decode_latents(z_q)
        return recon, {"tokens": tokens, "latents": z, **losses}


def init_params(config: VQGANConfig, rng: jax.Array, image_size: int = 64):
    """Boxed (logically partitioned) parameters of a VQGAN for `image_size` images."""
    x = jnp.zeros((1, image_size, image_size, config.in_channels), jnp.float32)
    return VQGAN(config).init(rng, x)["params"]


# ---------------------------------------------------------------------------------------
# Inference wrapper used by the other stages
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _jitted_codec(config: VQGANConfig, mesh, batch_axes):
    """Jitted (encode, decode) of `config`, shared by every ImageTokenizer with that config and mesh."""
    model = VQGAN(config)
    shard = lambda x: x  # noqa: E731
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        axes = tuple(a for a in batch_axes if a in mesh.axis_names)

        def shard(x):
            spec = P(axes, *([None] * (x.ndim - 1)))
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def encode(params, images):
        return shard(model.apply({"params": params}, shard(images), method=VQGAN.encode))

    def decode(params, tokens):
        images = model.apply({"params": params}, shard(tokens), method=VQGAN.decode)
        return shard(to_uint8_images(images, config.pixel_range))

    return jax.jit(encode), jax.jit(decode)


class ImageTokenizer:
    """A trained VQGAN for inference: jitted uint8 images <-> int32 tokens.

    `encode(images uint8 [B,H,W,3] or float [-1,1]) -> int32 [B,H/f,W/f]`,
    `decode(tokens [B,h,w]) -> uint8 [B,h*f,w*f,3]`, `codebook_size`, `factor`.
    With a `mesh`, the batch is sharded over its data axes.
    """

    def __init__(self, config: VQGANConfig, params, mesh=None, batch_axes=("data", "fsdp")):
        self.config = config
        self.model = VQGAN(config)
        self.params = nn.unbox(params)
        self.codebook_size = config.codebook_size
        self.factor = config.factor
        self._encode, self._decode = _jitted_codec(config, mesh, tuple(batch_axes))

    def encode(self, images) -> jax.Array:
        """uint8 [B,H,W,3] (or float in [-1,1]) -> int32 tokens [B,H/f,W/f]."""
        return self._encode(self.params, jnp.asarray(images))

    def decode(self, tokens) -> jax.Array:
        """int tokens [B,h,w] -> uint8 images [B,h*f,w*f,3]."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 3:
            raise ValueError(f"tokens must be [batch, height, width], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        return self._decode(self.params, tokens.astype(jnp.int32))

    def reconstruct(self, images) -> jax.Array:
        """uint8 images -> uint8 reconstructions (encode then decode)."""
        return self.decode(self.encode(images))
