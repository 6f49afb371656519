"""What the trainer needs of a stage's model, for both families: Muse's transformers and aMUSEd's UVit2D.

    inputs = dummy_inputs(model, batch=8, text_length=77)     # abstract model inputs (a dict)
    boxed = init_params(model, rng, inputs)                   # parameters with logical axis names
    logits = apply(model, params, {**batch, "tokens": masked}, deterministic=False, rngs=...)

Muse stages (`models/transformer.py`) read tokens, text_ids (joint T5) or text_emb, text_mask and,
for super-resolution, lowres_tokens. aMUSEd's UVit2D (`models/uvit.py`, also when wrapped with LoRA
adapters) reads tokens, text_states (CLIP's penultimate hidden states), pooled_text (CLIP's
projected embedding) and micro_conds (width, height, crop top, crop left, aesthetic score).
Other keys of the inputs are ignored, so a batch can be passed as it is.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from muse_jax.models import transformer as transformer_lib
from muse_jax.models import uvit

UVIT_KEYS = ("tokens", "text_states", "pooled_text", "micro_conds")


def is_uvit(model) -> bool:
    return isinstance(model, uvit.UVit2D)


def dummy_inputs(model, batch: int = 1, text_length: int = 8) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs of `batch` examples with text of `text_length` tokens."""
    if not is_uvit(model):
        return transformer_lib.dummy_inputs(model, batch, text_length)
    cfg = model.config
    return {"tokens": jax.ShapeDtypeStruct((batch, cfg.sample_size**2), jnp.int32),
            "text_states": jax.ShapeDtypeStruct((batch, text_length, cfg.encoder_hidden_size), jnp.float32),
            "pooled_text": jax.ShapeDtypeStruct((batch, cfg.cond_embed_dim), jnp.float32),
            "micro_conds": jax.ShapeDtypeStruct((batch, cfg.num_micro_conds), jnp.float32)}


def init_params(model, rng, inputs: Mapping[str, Any]):
    """Boxed parameters (logical axis names) from example inputs (see `dummy_inputs`)."""
    if not is_uvit(model):
        return transformer_lib.init_params(model, rng, inputs)
    zeros = [jnp.zeros(inputs[k].shape, inputs[k].dtype) for k in UVIT_KEYS]
    return model.init(rng, *zeros)["params"]


def apply(model, params, inputs: Mapping[str, Any], *, deterministic: bool = True, rngs=None):
    """float32 logits [B, N, codebook_size]."""
    if not is_uvit(model):
        return transformer_lib.apply(model, params, inputs, deterministic=deterministic, rngs=rngs)
    return model.apply({"params": params}, *(inputs[k] for k in UVIT_KEYS), deterministic=deterministic, rngs=rngs)


def num_tokens(model) -> int:
    """Image tokens the model predicts per example."""
    return model.config.sample_size**2 if is_uvit(model) else model.config.num_tokens
