"""Tokens (and frozen-T5 embeddings) computed inside the sharded train step, from images and captions.

    prep = online.Prepare.build(config, stage, tokenizers, text_encoder=None, mesh=mesh, rules=rules)
    train_step = step.make_train_step(..., prepare=prep)     # the batch holds "image" uint8 [B, S, S, 3]
    prep = online.Prepare.abstract(config, stage, mesh=mesh, rules=rules)   # the same step, nothing loaded

The frozen tokenizers' parameters (those `VQGAN.encode` reads: not the decoders') and a frozen
T5's are arguments of the jitted step, sharded over the mesh by their logical axes like the
transformer's, so nothing is cached and no device holds more than its share. Per stage
(S = config.data.image_size, the largest stage's size):
  base      tokens = base tokenizer(images area-downsampled to the base stage's pixels)
  superres  tokens = super-res tokenizer(images at its pixels), lowres_tokens = base tokenizer(...)
Area downsampling rounds to uint8 as `image_ops.downsample_area` does, so these are the tokens a
cache built with the same tokenizers would hold. `Prepare.abstract` builds the same step from the
config alone, its parameters `jax.ShapeDtypeStruct`s with their shardings (the planner compiles it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import config as config_lib
from muse_jax import partitioning
from muse_jax import workdir as workdir_lib
from muse_jax.models import t5, vqgan


def downsample_area_in_step(images: jax.Array, factor: int) -> jax.Array:
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
        x = np.asarray(x)  # on a CPU backend a view of the loaded array: each shard copies its slice, so that
        # neither the loaded array nor a host copy of it outlives the placement
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.array(x[idx]))

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
        # The step keeps the module only: the loaded (unsharded) T5 parameters are placed and let go,
        # so no device holds a whole frozen T5 (T5-XXL's encoder is 17.7 GiB in float32).
        text_module = None if text_encoder is None else text_encoder[0]
        params = {name: encoder_only(tokenizers[name].params) for name in _tokenizer_stages(stage)}
        if text_encoder is not None:
            params["text"] = text_encoder[1]
        vqgans = {name: tokenizers[name].config for name in _tokenizer_stages(stage)}
        return cls._assemble(config, stage, vqgans, text_module, params, mesh=mesh, rules=rules)

    @classmethod
    def abstract(cls, config, stage: str, *, mesh, rules) -> Prepare:
        """The step input `build` makes for `config`, with abstract parameters: `frozen` holds
        `jax.ShapeDtypeStruct`s sharded as the placed parameters would be, nothing is loaded.

        The tokenizers are the ones `config` describes (`config.tokenizers.<name>` applied to
        `config.vqgan`, `name = config.<stage>.tokenizer`: what `muse-jax train-tokenizer` trains);
        a frozen T5 (`config.text.encoder`) runs in the step when `config.text.trainable` is False.
        For planning (muse_jax/planning): `jitted.lower(state, batch, rng, prepare.frozen)`.
        """
        vqgans = {name: stage_vqgan_config(config, name) for name in _tokenizer_stages(stage)}
        return cls._assemble(config, stage, vqgans, _frozen_text_module(config), None, mesh=mesh, rules=rules)

    @classmethod
    def _assemble(cls, config, stage: str, vqgans: dict[str, vqgan.VQGANConfig], text_module: t5.T5Encoder | None,
                  params, *, mesh, rules) -> Prepare:
        """The step of `build` and `abstract`: `vqgans` maps each stage in use to its tokenizer's config;
        `params` holds the loaded parameters ("base"[, "superres"][, "text"]) to place, None for abstract ones."""
        base_px = workdir_lib.check_stage_tokenizer(config, "base", vqgans["base"])
        boxed = {"base": encoder_boxed(vqgans["base"], base_px)}
        image_size = base_px
        if stage == "superres":
            image_size = workdir_lib.check_stage_tokenizer(config, "superres", vqgans["superres"])
            if image_size % base_px:
                raise ValueError(f"super-res images of {image_size} px are not a multiple of the base's {base_px} px")
            if int(config.superres.lowres_grid_size) != int(config.base.grid_size):
                raise ValueError(f"config.superres.lowres_grid_size={config.superres.lowres_grid_size} is not "
                                 f"config.base.grid_size={config.base.grid_size}")
            boxed["superres"] = encoder_boxed(vqgans["superres"], image_size)
        if text_module is not None:
            boxed["text"] = _text_boxed(config, text_module)
        if params is None:
            frozen, shardings = abstract_placement(boxed, mesh, rules)
        else:
            frozen, shardings = place(params, boxed, mesh, rules)
        models = {k: vqgan.VQGAN(c) for k, c in vqgans.items()}

        def fn(frozen, batch):
            batch = dict(batch)
            images = batch.pop("image")
            s = images.shape[1]
            if s % image_size or s % base_px:
                raise ValueError(f"batch images of {s} px do not downsample to the stage's {image_size} px")
            encode = lambda name, x: models[name].apply(  # noqa: E731
                {"params": frozen[name]}, x, method=vqgan.VQGAN.encode).reshape(x.shape[0], -1)
            low = encode("base", downsample_area_in_step(images, s // base_px))
            if stage == "base":
                batch["tokens"] = low
            else:
                batch["tokens"] = encode("superres", downsample_area_in_step(images, s // image_size))
                batch["lowres_tokens"] = low
            if text_module is not None:
                _encode_text(text_module, frozen["text"], batch)
            return batch

        return cls(fn, frozen, shardings, image_size)

    @classmethod
    def text_only(cls, config, text_encoder: tuple[t5.T5Encoder, Any], *, mesh, rules) -> Prepare:
        """The frozen T5 alone (`text_ids` -> `text_emb`), for batches that hold their tokens already
        (`config.data.source="tokens"`); `image_size` is 0."""
        module, params = text_encoder
        return cls._assemble_text(config, module, {"text": params}, mesh=mesh, rules=rules)

    @classmethod
    def abstract_text_only(cls, config, *, mesh, rules) -> Prepare:
        """`text_only` for `config.text.encoder` with abstract parameters (see `abstract`)."""
        return cls._assemble_text(config, _frozen_text_module(config, required=True), None, mesh=mesh, rules=rules)

    @classmethod
    def _assemble_text(cls, config, module: t5.T5Encoder, params, *, mesh, rules) -> Prepare:
        """The step of `text_only` and `abstract_text_only` (`params` None: abstract)."""
        boxed = {"text": _text_boxed(config, module)}
        frozen, shardings = abstract_placement(boxed, mesh, rules) if params is None else place(params, boxed, mesh, rules)

        def fn(frozen, batch):
            batch = dict(batch)
            _encode_text(module, frozen["text"], batch)
            return batch

        return cls(fn, frozen, shardings, 0)


def stage_vqgan_config(config, stage: str) -> vqgan.VQGANConfig:
    """The VQGAN of `stage`'s tokenizer as `config` describes it: `config.vqgan` with the overrides of
    `config.tokenizers.<name>` (`name = config.<stage>.tokenizer`, "" = the shared one as it is)."""
    name = workdir_lib.stage_tokenizer(config, stage)
    return vqgan.VQGANConfig.from_dict(config_lib.tokenizer_config(config, name).vqgan.to_dict())


def _tokenizer_stages(stage: str) -> tuple[str, ...]:
    """The stages whose tokenizers `stage`'s step runs: its own, and the base's for the low-res tokens."""
    return ("base",) if stage == "base" else ("base", "superres")


def _frozen_text_module(config, required: bool = False) -> t5.T5Encoder | None:
    """The frozen T5 of `config.text.encoder`, or None when T5 trains jointly (`config.text.trainable`)."""
    if config.text.trainable:
        if required:
            raise ValueError("config.text.trainable=True: the T5 trains jointly with the stage, none is frozen")
        return None
    return t5.T5Encoder(t5.T5Config.coerce(config.text.encoder))


def abstract_placement(abstract_boxed, mesh, rules):
    """(ShapeDtypeStructs with the shardings that `place` would give, those shardings)."""
    shardings = partitioning.state_shardings(abstract_boxed, mesh, rules)
    frozen = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.unbox(abstract_boxed), shardings)
    return frozen, shardings


def _encode_text(module: t5.T5Encoder, params, batch: dict) -> None:
    """Replaces the batch's `text_ids` by the frozen T5's `text_emb`."""
    emb = module.apply({"params": params}, batch.pop("text_ids"), batch["text_mask"])
    batch["text_emb"] = jax.lax.stop_gradient(emb)


def _text_boxed(config, module: t5.T5Encoder):
    ids = jnp.ones((1, int(config.text.max_length)), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids)["params"])


def encoder_boxed(vqgan_config: vqgan.VQGANConfig, image_size: int):
    """The abstract, boxed (logical axis names) parameters `VQGAN.encode` reads, for `image_size` px images."""
    return encoder_only(jax.eval_shape(lambda: vqgan.init_params(vqgan_config, jax.random.key(0), image_size)))


def encoder_only(vqgan_params):
    """The parameters `VQGAN.encode` reads: the decoder's are not placed on the devices."""
    return {k: v for k, v in vqgan_params.items() if k not in ("decoder", "post_quant_conv")}
