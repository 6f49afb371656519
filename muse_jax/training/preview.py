"""Sample previews while a stage trains: the preview prompts decoded, above their tokenized references.

The sampler runs on the parameters where they are (sharded over the mesh, across processes on a
pod): every process runs it, each gets the sampled tokens whole, and only process 0 writes images.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from muse_jax import cascade, image_ops, sampling

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("model", "num_steps"))
def sample_tokens(model, params, preview, rng, num_steps: int = 12) -> jax.Array:
    """The preview prompts decoded with the sampler (no guidance): int32 tokens [B, N]."""
    b = preview["tokens"].shape[0]
    text = {"ids": preview["text_ids"]} if model.text_encoder_config is not None else {"emb": preview["text_emb"]}
    emb, mask = cascade.muse_text_embed(model, params, dict(text, mask=preview["text_mask"]))
    lowres = preview["lowres_tokens"] if model.config.is_superres else None

    def logits_fn(tokens, step):
        del step
        return cascade.muse_logits(model, params, tokens, emb, mask, lowres)

    start = jnp.full((b, model.config.num_tokens), model.mask_token_id, jnp.int32)
    return sampling.decode(logits_fn, start, rng, mask_token_id=model.mask_token_id,
                           options=sampling.DecodeOptions(num_steps=num_steps))


def preview_samples(model, params, data, rng, num_steps: int = 12) -> np.ndarray | None:
    """Decodes the preview prompts (12 steps, no guidance): uint8 images, samples above references."""
    if data.preview is None or data.tokenizer is None:
        return None
    # Every process samples process 0's examples (a streamed preview is each process's first batch).
    p = multihost_utils.broadcast_one_to_all(data.preview)
    tokens = sample_tokens(model, params, p, rng, num_steps=num_steps)
    tokens = multihost_utils.process_allgather(tokens, tiled=True)  # whole on every process, however sharded
    b, g = len(tokens), model.config.grid_size
    images = np.asarray(data.tokenizer.decode(tokens.reshape(b, g, g)))
    real = np.asarray(data.tokenizer.decode(np.asarray(p["tokens"]).reshape(b, g, g)))
    return np.concatenate([images, real], axis=0)  # top rows: samples; bottom: tokenized references


def write_preview(model, state, data, rng, writer, out_dir, step) -> None:
    """Preview samples to TensorBoard and `out_dir/samples/step_N.png`; never stops training."""
    params = state.ema_params if state.ema_params is not None else state.params
    try:
        images = preview_samples(model, params, data, rng)
    except Exception as e:  # a preview must never stop training
        log.warning("sample preview failed at step %d: %s", step, e)
        return
    if images is None:
        return
    grid = image_ops.image_grid(images, cols=len(images) // 2)
    writer.write_images(step, {"samples": grid})
    if jax.process_index() == 0:
        from PIL import Image

        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        with (out_dir / "samples" / f"step_{step}.png").open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
