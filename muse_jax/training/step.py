"""The masked-token training step (Muse 2.6): state, loss, and `make_train_step`.

    tx = optimizer.make_optimizer(config.train)
    state = create_state(...)                       # see state.py (sharded init via partitioning)
    train_step = make_train_step(config, model, mesh, shardings, empty_text=...)
    state, metrics = train_step(state, batch, rng)  # jitted, named shardings, donated state

Per example: a mask rate from the schedule (cosine -> truncated arccos), at least one token
masked; the masked positions get [MASK]; the loss is cross entropy (optionally label smoothed)
on the masked tokens only. With probability `text_drop_rate` an example's caption is replaced
by the empty prompt, so the model also learns the unconditional distribution (guidance).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muse_jax import masking, partitioning, precision
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import stage_model


class TrainState(flax.struct.PyTreeNode):
    """step, params, optimizer state, and EMA params (None when EMA is off)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def create_state(model, tx, rng, inputs, ema: bool = False, param_dtype: str = "float32", select=None) -> TrainState:
    """A fresh TrainState with boxed params of `param_dtype` (use under jax.eval_shape / jit + nn.unbox);
    `select(params)` picks the trained ones (LoRA: the adapters)."""
    boxed = stage_model.init_params(model, rng, inputs)
    boxed = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), boxed if select is None else select(boxed))
    params = nn.unbox(boxed)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=boxed,
        opt_state=tx.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, boxed) if ema else None,
    )


def masked_cross_entropy(logits, targets, mask, label_smoothing: float = 0.0):
    """(loss, accuracy) over masked positions only. logits [B,N,K] f32, targets/mask [B,N].

    Cross entropy against labels smoothed as (1 - s) * one_hot + s / K, computed from the integer
    targets without building the [B, N, K] one-hot labels:
    logsumexp(z) - (1 - s) * z[target] - s * mean(z).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = jax.nn.logsumexp(logits, axis=-1) - (1.0 - label_smoothing) * picked
    if label_smoothing > 0:
        ce = ce - label_smoothing * logits.mean(axis=-1)
    w = mask.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0)
    loss = (ce * w).sum() / denom
    acc = ((jnp.argmax(logits, -1) == targets).astype(jnp.float32) * w).sum() / denom
    return loss, acc


def make_loss_fn(config, model, empty_text: dict[str, jax.Array] | None = None, combine=None) -> Callable:
    """loss_fn(params, batch, rng, base=None) -> (loss, aux); batch as produced by the data pipeline.

    batch: tokens [B, N] int32 and the model's other inputs (`stage_model`): for Muse text_ids [B, L]
    (joint T5) or text_emb [B, L, D], text_mask [B, L] and for super-res lowres_tokens [B, n]; for
    aMUSEd text_states, pooled_text and micro_conds. `empty_text` holds the empty prompt's text
    inputs (each [L, ...] or [P]), which replace a dropped caption's, key by key. With `combine`
    (LoRA), the model is applied to `combine(base, params)`: `params` are the trained adapters and
    `base` the frozen weights.
    """
    t = config.train
    mask_id = model.mask_token_id

    def loss_fn(params, batch, rng, base=None):
        mask_rng, drop_rng, dropout_rng = jax.random.split(rng, 3)
        tokens = batch["tokens"].astype(jnp.int32)
        inputs, mask = masking.mask_tokens(mask_rng, tokens, mask_id, t.mask_schedule)
        model_inputs = {**batch, "tokens": inputs}
        if t.text_drop_rate > 0:
            if not empty_text:
                raise ValueError("text_drop_rate > 0 needs the empty prompt (empty_text)")
            drop = jax.random.bernoulli(drop_rng, t.text_drop_rate, (tokens.shape[0],))
            for key, e in empty_text.items():
                x = batch[key]
                model_inputs[key] = jnp.where(drop.reshape((-1,) + (1,) * (x.ndim - 1)), e.astype(x.dtype)[None], x)
        if "lowres_tokens" in batch:
            model_inputs["lowres_tokens"] = batch["lowres_tokens"].astype(jnp.int32)
        full = params if combine is None else combine(base, params)
        logits = stage_model.apply(model, full, model_inputs, deterministic=False, rngs={"dropout": dropout_rng})
        loss, acc = masked_cross_entropy(logits, tokens, mask, t.label_smoothing)
        return loss, {"accuracy": acc, "mask_rate": mask.astype(jnp.float32).mean()}

    return loss_fn


def make_train_step(config, model, mesh, state_shardings, *, empty_text=None, rules=None, batch_keys=None,
                    prepare=None, base=None, combine=None):
    """A jitted `(state, batch, rng) -> (state, metrics)` with named shardings, donated state.

    `state_shardings` is the TrainState of NamedShardings (partitioning.state_shardings);
    the batch is sharded along the rules' batch axes, metrics are replicated. `prepare` (an
    `online.Prepare`) turns the batch's images (and text ids) into tokens (and embeddings) inside
    the step with its frozen parameters. `base` = (parameters, shardings) of frozen model weights
    that `combine(base, state.params)` completes (LoRA: the state holds only the adapters). The
    returned callable enters the mesh and the logical-axis rules around the call (for activation
    constraints); `.jitted` is the bare jitted function, `(state, batch, rng, frozen)`, and
    `(state, batch, rng, frozen, base)` with `base`.
    """
    rules = partitioning.logical_rules(config) if rules is None else rules
    t = config.train
    loss_fn = make_loss_fn(config, model, empty_text, combine)
    schedule = optimizer_lib.learning_rate_schedule(t)
    tx = optimizer_lib.make_optimizer(t)

    def step(state: TrainState, batch, rng, frozen, base_params=None):
        if prepare is not None:
            batch = prepare.fn(frozen, batch)
        rng = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, base_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            d = float(t.ema_decay)
            ema = jax.tree_util.tree_map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)
        metrics = {
            "loss": loss,
            "accuracy": aux["accuracy"],
            "mask_rate": aux["mask_rate"],
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),  # after the update: the divergence guard's blow-up check
            "lr": schedule(state.step),
        }
        return TrainState(state.step + 1, params, opt_state, ema), metrics

    batch_sh = None
    if batch_keys is not None:
        batch_sh = {k: partitioning.batch_sharding(mesh, rules, nd) for k, nd in batch_keys.items()}
    replicated = NamedSharding(mesh, P())
    in_shardings = (state_shardings, batch_sh, replicated, None if prepare is None else prepare.shardings)
    if base is not None:
        in_shardings += (base[1],)
    jitted = precision.jit(
        step if base is not None else (lambda state, batch, rng, frozen: step(state, batch, rng, frozen)),
        t.get("matmul_precision", "default"),
        in_shardings=in_shardings,
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    frozen = None if prepare is None else prepare.frozen
    extra = () if base is None else (base[0],)

    def run(state, batch, rng):
        with partitioning.axis_rules(mesh, rules):
            return jitted(state, batch, rng, frozen, *extra)

    run.jitted = jitted
    run.mesh = mesh
    run.rules = rules
    return run


def forward_flops(model, params_abstract, inputs_abstract) -> float:
    """Model FLOPs of one forward pass (XLA cost analysis; no rematerialisation counted)."""

    def fwd(params, inputs):
        return stage_model.apply(model, params, inputs, deterministic=True)

    try:
        cost = jax.jit(fwd).lower(params_abstract, inputs_abstract).cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0))
    except Exception:  # cost analysis is best effort
        return 0.0


PEAK_FLOPS = {  # dense bf16 peak per device, for MFU
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops_per_device(train_config) -> float:
    """`peak_flops_per_device` from config, else a table by device kind; 0 when unknown (CPU)."""
    if train_config.get("peak_flops_per_device", 0):
        return float(train_config.peak_flops_per_device)
    kind = jax.devices()[0].device_kind
    for k, v in PEAK_FLOPS.items():
        if kind.startswith(k):
            return v
    return 0.0
