"""A stage's train state on the mesh: the sharded initial state, and the warm start from another stage.

    create, abstract, shardings = state_setup(config, model, mesh, rules)
    state = jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings)(rng)
    state = warm_start(state, shardings, workdir, "superres", "base", mesh, rules)   # config.train.init_from
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from muse_jax import config as config_lib
from muse_jax import partitioning
from muse_jax import workdir as workdir_lib
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import stage_model
from muse_jax.training import step as step_lib


def abstract_inputs(model, config, batch: int = 1):
    """Abstract model inputs of `batch` examples (text of `config.text.max_length` tokens)."""
    return stage_model.dummy_inputs(model, batch, int(config.text.max_length))


def param_dtype(config) -> str:
    """config.train.param_dtype: the dtype parameters are kept (and trained) in, "float32" or "bfloat16"."""
    name = str(config.train.get("param_dtype", "float32"))
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"config.train.param_dtype={name!r}: expected 'float32' or 'bfloat16'")
    return name


def abstract_params(model, config):
    """The model's boxed parameters (logical axis names) as ShapeDtypeStructs."""
    inputs = abstract_inputs(model, config)
    return jax.eval_shape(lambda: stage_model.init_params(model, jax.random.key(0), inputs))


def state_setup(config, model, mesh, rules, select=None):
    """(create_fn(rng) -> boxed TrainState, abstract boxed state, state shardings). `select(params)`: the
    part of the model's parameters that is trained (LoRA: the adapters); default all of them."""
    tx = optimizer_lib.make_optimizer(config.train)
    inputs = abstract_inputs(model, config)
    ema = float(config.train.ema_decay) > 0

    def create(rng):
        return step_lib.create_state(model, tx, rng, inputs, ema=ema, param_dtype=param_dtype(config), select=select)

    abstract = jax.eval_shape(create, jax.random.key(0))
    return create, abstract, partitioning.state_shardings(abstract, mesh, rules)


def warm_start_params(params, source) -> tuple[Any, list[str]]:
    """`params` with the leaves of `source` (another stage's trained params) copied in.

    A leaf is copied where `source` has the same path and shape. A super-res model also takes the
    base's position embeddings repeated over the high-res positions each covers; and for its low-res
    token encoder, which reads base-resolution tokens of the same codebook, the base's token and
    position embeddings and its blocks (`decoder/block_i`, whose cross-attention it lacks).
    The leaves may be numpy or (sharded) jax arrays. Returns the new params and the copied paths."""
    src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    alias = {"['lowres_tokens']['embedding']": "['tokens']['embedding']",
             "['lowres_tokens']['embedding_norm']['bias']": "['tokens']['embedding_norm']['bias']",
             "['lowres_tokens']['embedding_norm']['scale']": "['tokens']['embedding_norm']['scale']",
             "['lowres_tokens']['position_embedding']": "['tokens']['position_embedding']"}
    copied = []

    def source_name(name: str) -> str:
        if name.startswith("['lowres_encoder']"):  # the base's blocks already process base-size tokens
            return name.replace("['lowres_encoder']", "['decoder']", 1)
        return alias.get(name, "")

    def take(path, leaf):
        name = jax.tree_util.keystr(path)
        v = src.get(name, src.get(source_name(name), None))
        if v is None:
            return leaf
        if name == "['lowres_tokens']['embedding']":
            v = v[: leaf.shape[0]]  # the base's mask-token row is not a low-res code
        if name.endswith("['position_embedding']") and v.ndim == 3 and leaf.shape[0] % v.shape[0] == 0 \
                and leaf.shape[0] // v.shape[0] == leaf.shape[1] // v.shape[1]:
            r = leaf.shape[0] // v.shape[0]
            v = v.repeat(r, 0).repeat(r, 1)
        if v.shape != leaf.shape:
            return leaf
        copied.append(name)
        return v.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, params), copied


def replace_params(state, shardings, params):
    """`state` starting from `params` (fresh optimizer state; the EMA, where kept, starts from them too), each
    a buffer of its own on `shardings` (the step donates params and EMA params)."""
    place = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=shardings.params)
    ema = None if state.ema_params is None else place(params)
    return state.replace(params=place(params), ema_params=ema)


def warm_start(state, shardings, workdir, stage: str, source_stage: str, mesh, rules, quiet: bool = False):
    """config.train.init_from: start `stage` from `source_stage`'s trained weights (fresh optimizer).

    The source's parameters are read sharded over `mesh` as its own model's rules say, copied on the
    mesh and placed on `shardings`: no process holds either stage's parameters whole."""
    if source_stage == stage or source_stage not in config_lib.STAGES:
        raise ValueError(f"config.train.init_from={source_stage!r}: expected another stage, one of "
                         f"{[s for s in config_lib.STAGES if s != stage]} (or '' for a random init)")
    _, source, _ = workdir_lib.load_stage(workdir, source_stage, mesh=mesh, rules=rules)
    params, copied = warm_start_params(state.params, source)
    if not copied:
        raise ValueError(f"config.train.init_from={source_stage!r}: no parameter of {stage} matches {source_stage}'s")
    if not quiet:
        n = len(jax.tree_util.tree_leaves(params))
        print(f"{stage}: {len(copied)} of {n} parameter arrays start from the trained {source_stage} stage")
    return replace_params(state, shardings, params)
