"""Tokens (and frozen-T5 embeddings) computed inside the sharded train step, from images and captions.

    prep = online.Prepare.build(config, stage, tokenizers, text_encoder=None, mesh=mesh, rules=rules)
    train_step = step.make_train_step(..., prepare=prep)     # the batch holds "image" uint8 [B, S, S, 3]

The frozen tokenizers' parameters (and a frozen T5's) are arguments of the jitted step, sharded
over the mesh by their logical axes like the transformer's, so nothing is cached and no device
holds more than its share. Per stage (S = config.data.image_size, the largest stage's size):
  base      tokens = base tokenizer(images area-downsampled to the base stage's pixels)
  superres  tokens = super-res tokenizer(images at its pixels), lowres_tokens = base tokenizer(...)
Area downsampling rounds to uint8 as `image_ops.downsample_area` does, so these are the tokens a
cache built with the same tokenizers would hold.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import workdir as workdir_lib
from muse_jax.models import t5, vqgan
from muse_jax.training import partitioning


def downsample_area(images: jax.Array, factor: int) -> jax.Array:
    """uint8 [B, H, W, C] -> uint8 [B, H/f, W/f, C]: the rounded mean of each f x f block."""
    if factor == 1:
        return images
    b, h, w, c = images.shape
    x = images.reshape(b, h // factor, factor, w // factor, factor, c).astype(jnp.float32).mean(axis=(2, 4))
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def place(params, abstract_boxed, mesh, rules):
    """Host parameters -> global arrays sharded by the logical names of `abstract_boxed`."""
    shardings = partitioning.state_shardings(abstract_boxed, mesh, rules)

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, params, shardings), shardings


@dataclasses.dataclass
class Prepare:
    """`fn(frozen, batch) -> batch` for the jitted step, the frozen parameters and their shardings."""

    fn: Callable[[Any, dict], dict]
    frozen: Any
    shardings: Any
    image_size: int  # pixels of the images the batch must hold

    @classmethod
    def build(cls, config, stage: str, tokenizers: dict[str, vqgan.ImageTokenizer], *, mesh, rules,
              text_encoder: tuple[t5.T5Encoder, Any] | None = None) -> Prepare:
        """`tokenizers` maps each stage in use to its ImageTokenizer; `text_encoder` = (module, params)
        of a frozen T5 that turns `text_ids` into `text_emb`."""
        base_tok = tokenizers["base"]
        base_px = workdir_lib.check_stage_tokenizer(config, "base", base_tok)
        frozen, boxed = {"base": base_tok.params}, {"base": _boxed(base_tok, base_px)}
        image_size = base_px
        if stage == "superres":
            sr_tok = tokenizers["superres"]
            image_size = workdir_lib.check_stage_tokenizer(config, "superres", sr_tok)
            if image_size % base_px:
                raise ValueError(f"super-res images of {image_size} px are not a multiple of the base's {base_px} px")
            if int(config.superres.lowres_grid_size) != int(config.base.grid_size):
                raise ValueError(f"config.superres.lowres_grid_size={config.superres.lowres_grid_size} is not "
                                 f"config.base.grid_size={config.base.grid_size}")
            frozen["superres"], boxed["superres"] = sr_tok.params, _boxed(sr_tok, image_size)
        if text_encoder is not None:
            frozen["text"], boxed["text"] = text_encoder[1], _text_boxed(config, text_encoder[0])
        frozen, shardings = place(frozen, boxed, mesh, rules)
        models = {k: vqgan.VQGAN(t.config) for k, t in tokenizers.items()}

        def fn(frozen, batch):
            batch = dict(batch)
            images = batch.pop("image")
            s = images.shape[1]
            if s % image_size or s % base_px:
                raise ValueError(f"batch images of {s} px do not downsample to the stage's {image_size} px")
            encode = lambda name, x: models[name].apply(  # noqa: E731
                {"params": frozen[name]}, x, method=vqgan.VQGAN.encode).reshape(x.shape[0], -1)
            low = encode("base", downsample_area(images, s // base_px))
            if stage == "base":
                batch["tokens"] = low
            else:
                batch["tokens"] = encode("superres", downsample_area(images, s // image_size))
                batch["lowres_tokens"] = low
            if text_encoder is not None:
                _encode_text(text_encoder[0], frozen["text"], batch)
            return batch

        return cls(fn, frozen, shardings, image_size)

    @classmethod
    def text_only(cls, config, text_encoder: tuple[t5.T5Encoder, Any], *, mesh, rules) -> Prepare:
        """The frozen T5 alone (`text_ids` -> `text_emb`), for batches that hold their tokens already
        (`config.data.source="tokens"`); `image_size` is 0."""
        module, params = text_encoder
        frozen, shardings = place({"text": params}, {"text": _text_boxed(config, module)}, mesh, rules)

        def fn(frozen, batch):
            batch = dict(batch)
            _encode_text(module, frozen["text"], batch)
            return batch

        return cls(fn, frozen, shardings, 0)


def _encode_text(module: t5.T5Encoder, params, batch: dict) -> None:
    """Replaces the batch's `text_ids` by the frozen T5's `text_emb`."""
    emb = module.apply({"params": params}, batch.pop("text_ids"), batch["text_mask"])
    batch["text_emb"] = jax.lax.stop_gradient(emb)


def _text_boxed(config, module: t5.T5Encoder):
    ids = jnp.ones((1, int(config.text.max_length)), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids)["params"])


def _boxed(tokenizer: vqgan.ImageTokenizer, image_size: int):
    return jax.eval_shape(lambda: vqgan.init_params(tokenizer.config, jax.random.key(0), image_size))
