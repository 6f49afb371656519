"""Memory and FLOPs planner: compile the real training step for a virtual mesh, no hardware needed.

    muse-jax plan --config muse_3b --mesh data=1,fsdp=512,tensor=1 --accelerator tpu_v4

How it works: the process pretends to have N CPU devices (`--xla_force_host_platform_device_count`,
set before JAX starts), builds the mesh and the training state's shardings exactly as `muse-jax
train` does, and lowers and compiles `make_train_step` on abstract inputs (`jax.ShapeDtypeStruct`;
no parameter is allocated). The step is the one `train` runs for the config (`step_source`): for
streamed real data (the paper configs) the batch holds uint8 images at the stage's pixels and
caption ids, and the step runs the frozen VQGAN tokenizer(s) and, with `config.text.trainable=False`,
the frozen T5 encoder (training/online.py `Prepare.abstract`: their parameters abstract too, sharded
by their logical axes); with `config.data.source="tokens"` only the frozen T5 runs in the step; the
shapes token cache feeds tokens and cached T5 embeddings. From the compiled SPMD program of one
device it reads
  - XLA's memory analysis: arguments (state, frozen parameters, batch shard), outputs, aliased (donated) bytes and
    temporaries (activations, gradients, workspace), hence the peak per device;
  - XLA's cost analysis: FLOPs and bytes accessed per device per step;
  - the collectives in the optimised HLO (all-gather, reduce-scatter, all-reduce, ...): bytes each
    device sends per step.
With an accelerator's peak FLOP/s and interconnect bandwidth (`ACCELERATORS`), the step time is
bounded below by max(compute at peak, communication) (perfect overlap); the predicted step time
is compute at EFFICIENCY (50 %) of peak plus communication, not overlapped; MFU = the transformer's
model FLOPs (analytic, no remat; as `train`'s perf/mfu) / (step time x devices x peak): the frozen
encoders' forward passes take step time but are not counted as model FLOPs.
Real steps are slower than the lower bound (no kernel reaches peak); the HBM-traffic time from
XLA:CPU's bytes accessed is shown for reference only (CPU fusion is far coarser).

aMUSEd fine-tuning (`config.family == "amused"`, configs/amused_finetune.py; training/finetune.py) is
planned without a workdir, from the architecture presets `config.model.uvit`, `.clip` and `.vqgan` (the
published amused-256/512, CLIP-L/14's text tower, aMUSEd's f16 VQ-GAN): the step `train` runs on an
imported workdir, with the UVit2D trained whole or, with `config.lora.rank > 0`, only its LoRA adapters
(the base weights a frozen step argument, counted as `base_params`), and the frozen VQGAN encoder and CLIP
text tower in the step. Its analytic counts are `analytic_uvit_train_flops` (with `lora_adapter_flops`),
`analytic_uvit_activation_bytes` and `analytic_clip_text_flops`.

Deep models compile slowly on a CPU (muse_3b: 4-8 minutes per plan on one core). `layers_from=(a, b)`
compiles the same model with a and b blocks and extrapolates every figure linearly to the
configured depth (each block adds the same parameters, FLOPs, collectives and buffers);
tests/test_planning.py checks the extrapolation against a full compile.

Caveats: the program is compiled by XLA:CPU, not by the TPU/GPU compiler: fusion, layouts and
scheduling differ, so temporaries and bytes accessed are estimates. In particular XLA:CPU's
schedule does not realise the memory saving of rematerialisation (its temporaries barely change
with remat, although the recomputation shows in its FLOPs), and it keeps FSDP gradient reductions
as all-reduce where TPU/GPU compilers emit reduce-scatter (half the traffic). So "fits" is decided
on exact state bytes (from the shardings) + one gradient per parameter + the analytic saved
activations (`analytic_activation_bytes`) + the frozen encoders' parameter shards <= 90 % of HBM
(the frozen forward passes save nothing for the backward pass; their transient activations are
not counted); XLA:CPU's peak is shown beside it. The analytic count (`analytic_train_flops`, plus
`analytic_t5_encoder_flops` and `analytic_vqgan_encoder_flops` for the frozen encoders in the
step) cross-checks the FLOPs.

The package:
  __init__.py   `plan` (set-up of the config and mesh, compile, memory figures, FLOPs figures),
                `plan_extrapolated`, `parse_mesh`, `ensure_virtual_devices`; re-exports the rest
  hlo.py        reading compiled HLO: `collective_bytes`, the replica-group parser
  analytic.py   analytic FLOPs (transformer, T5 encoder, VQGAN encoder, frozen encoders in the step; aMUSEd's
                UVit2D, its LoRA adapters and CLIP's text tower) and saved-activation bytes
  estimates.py  `ACCELERATORS`, `accelerator`, `communication_seconds`, `estimate`, `format_plan`
Importing the package does not import JAX (`ensure_virtual_devices` must run before JAX starts).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from muse_jax.planning.analytic import (
    _activations_by_attention,
    _analytic_flops,
    _attention_calls,
    _positions,
    amused_in_step_flops,
    analytic_activation_bytes,
    analytic_clip_text_flops,
    analytic_forward_flops,
    analytic_t5_encoder_flops,
    analytic_train_flops,
    analytic_uvit_activation_bytes,
    analytic_uvit_forward_flops,
    analytic_uvit_train_flops,
    analytic_vqgan_encoder_flops,
    attention_path,
    compute_flops_per_device,
    in_step_flops,
    lora_adapter_flops,
    step_source,
)
from muse_jax.planning.estimates import (
    ACCELERATORS,
    EFFICIENCY,
    Accelerator,
    GiB,
    _gib,
    accelerator,
    communication_seconds,
    estimate,
    format_plan,
)
from muse_jax.planning.hlo import (
    _group_info,
    _group_info_block,
    _group_size,
    _shape_bytes,
    collective_bytes,
    replica_groups,
)

__all__ = [
    # the plan
    "plan", "plan_extrapolated", "parse_mesh", "ensure_virtual_devices", "amused_configs",
    # analytic.py
    "analytic_activation_bytes", "analytic_forward_flops", "analytic_t5_encoder_flops", "analytic_train_flops",
    "analytic_vqgan_encoder_flops", "attention_path", "compute_flops_per_device", "in_step_flops", "step_source",
    "analytic_uvit_forward_flops", "analytic_uvit_train_flops", "analytic_uvit_activation_bytes",
    "analytic_clip_text_flops", "amused_in_step_flops", "lora_adapter_flops",
    "_activations_by_attention", "_analytic_flops", "_attention_calls", "_positions",
    # estimates.py
    "ACCELERATORS", "EFFICIENCY", "GiB", "Accelerator", "accelerator", "communication_seconds", "estimate",
    "format_plan", "_gib",
    # hlo.py
    "collective_bytes", "replica_groups", "_group_info", "_group_info_block", "_group_size", "_shape_bytes",
]


# ----------------------------------------------------------------------------- virtual devices


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes = 1)."""
    if isinstance(spec, Mapping):
        out = {k: int(v) for k, v in spec.items()}
    else:
        out = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"--mesh {spec!r}: expected axis=size pairs like data=2,fsdp=4,tensor=1")
            out[name.strip()] = int(value)
    axes = ("data", "fsdp", "tensor")
    unknown = sorted(set(out) - set(axes))
    if unknown:
        raise ValueError(f"--mesh: unknown axes {unknown}; the mesh axes are {axes}")
    for k, v in out.items():
        if v < 1:
            raise ValueError(f"--mesh: {k}={v}; planning needs explicit positive sizes (no -1)")
    return {a: out.get(a, 1) for a in axes}


def ensure_virtual_devices(n: int) -> None:
    """Makes JAX start with `n` CPU devices; must run before JAX initialises its backend."""
    if "jax" in sys.modules:
        import jax

        try:
            from jax._src import xla_bridge

            started = bool(xla_bridge._backends)  # noqa: SLF001 (no public query for this)
        except Exception:  # pragma: no cover
            started = True
        if started:
            have = len(jax.devices())
            if have < n:
                raise RuntimeError(
                    f"planning needs {n} devices but JAX already started with {have}; run in a fresh "
                    f"process (`muse-jax plan` does) or set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
                )
            return
    old = os.environ.get("XLA_FLAGS", "")
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", old)
    n = max(n, int(m[1]) if m else 0)  # never fewer devices than already asked for
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", old)
    # The CPU code is never run: skip LLVM's optimisations (about 2x faster compiles; the HLO,
    # its memory and cost analyses are unchanged).
    for fast in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
        if fast.split("=")[0] not in flags:
            flags += " " + fast
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")



# ----------------------------------------------------------------------------- the plan


def _tree_bytes_per_device(tree, shardings) -> int:
    import jax

    total = 0
    for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(tuple(x.shape))
        total += math.prod(shard) * x.dtype.itemsize
    return total


def _first(cost):
    if isinstance(cost, (list, tuple)):
        return cost[0] if cost else {}
    return cost or {}



@dataclasses.dataclass
class _Setup:
    """The resolved config with the plan's overrides, the mesh and the per-step sizes."""

    config: Any
    stage: str
    sizes: dict[str, int]
    num_devices: int
    accelerators: list[str]
    batch_size: int
    text_length: int
    mesh: Any  # jax.sharding.Mesh
    rules: Any


@dataclasses.dataclass
class _Compiled:
    """The compiled train step and what it was built from (abstract state, frozen encoders)."""

    model: Any
    state: Any
    shardings: Any
    prepare: Any  # online.Prepare for the frozen encoders in the step, or None
    step_source: str
    compiled: Any
    lower_seconds: float
    compile_seconds: float
    base: Any = None  # LoRA: (abstract frozen UVit2D weights, their shardings), a step argument
    amused: Any = None  # aMUSEd: (UVit2DConfig, CLIPConfig, VQGANConfig) of the presets


def _is_amused(config) -> bool:
    """Whether `config` fine-tunes an imported aMUSEd (training/finetune.py) rather than trains a Muse stage."""
    return config.get("family", "muse") == "amused"


def _setup(config, mesh, accelerators, *, stage, batch_size, remat, text_length) -> _Setup:
    """Checks the mesh and accelerators, starts the virtual devices, applies the overrides, builds the mesh."""
    sizes = parse_mesh(mesh)
    n = math.prod(sizes.values())
    accs = [accelerators] if isinstance(accelerators, str) else list(accelerators)
    for a in accs:
        accelerator(a)
    ensure_virtual_devices(n)

    import jax

    from muse_jax import partitioning

    config = config.copy_and_resolve_references()
    if _is_amused(config) and stage != "base":
        raise ValueError(f"--stage {stage}: an aMUSEd fine-tune has one stage, its UVit2D (--stage base)")
    if not _is_amused(config) and int((config.get("lora") or {}).get("rank", 0) or 0) > 0:
        raise ValueError("config.lora.rank > 0: the planner plans LoRA for aMUSEd fine-tunes only; plan this Muse "
                         "stage's full step with --config.lora.rank=0")
    with config.unlocked():
        if batch_size is not None:
            config.train.batch_size = int(batch_size)
        if remat is not None:
            (config.model if _is_amused(config) else config[stage]).remat = bool(remat)
        if text_length is not None:
            config.text.max_length = int(text_length)
    B = int(config.train.batch_size)
    L = int(config.text.max_length)
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"mesh {sizes} needs {n} devices, JAX has {len(devices)}")
    jmesh = partitioning.make_mesh(sizes, devices[:n])
    rules = partitioning.logical_rules(config)
    partitioning.check_batch_divides(B, jmesh, rules)
    return _Setup(config, stage, sizes, n, accs, B, L, jmesh, rules)


def _compile(s: _Setup) -> _Compiled:
    """Lowers and compiles the stage's train step on abstract state and batch (as `train` builds them)."""
    if _is_amused(s.config):
        return _compile_amused(s)
    import time

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from muse_jax import checkpoint as ckpt_lib
    from muse_jax import partitioning
    from muse_jax import workdir as workdir_lib
    from muse_jax.models import transformer as transformer_lib
    from muse_jax.training import online
    from muse_jax.training import state as state_lib
    from muse_jax.training import step as step_lib

    config, stage, B, L, jmesh, rules = s.config, s.stage, s.batch_size, s.text_length, s.mesh, s.rules
    t0 = time.perf_counter()
    model = workdir_lib.build_stage_model(config, stage)
    _, abstract, shardings = state_lib.state_setup(config, model, jmesh, rules)
    state = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)

    inputs = transformer_lib.dummy_inputs(model, B, L)
    empty = {k: jnp.zeros(v.shape[1:], v.dtype) for k, v in inputs.items() if k.startswith("text")}
    source = step_source(config)
    prepare = None
    if source == "images":  # uint8 images at the stage's pixels and caption ids; tokens (and T5) in the step
        prepare = online.Prepare.abstract(config, stage, mesh=jmesh, rules=rules)
        px = prepare.image_size
        inputs = {"image": jax.ShapeDtypeStruct((B, px, px, 3), jnp.uint8),
                  "text_ids": jax.ShapeDtypeStruct((B, L), jnp.int32), "text_mask": inputs["text_mask"]}
    elif source == "tokens" and "text_emb" in inputs:  # the tokens as read; the frozen T5 in the step
        prepare = online.Prepare.abstract_text_only(config, mesh=jmesh, rules=rules)
        inputs["text_ids"] = jax.ShapeDtypeStruct((B, L), jnp.int32)
        del inputs["text_emb"]
    elif "text_emb" in inputs:  # cached frozen embeddings arrive in their cache dtype
        cache_dtype = jnp.dtype(config.text.get("cache_dtype", "float32"))
        inputs["text_emb"] = jax.ShapeDtypeStruct(inputs["text_emb"].shape, cache_dtype)
    batch_keys = {k: len(v.shape) for k, v in inputs.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioning.batch_sharding(jmesh, rules, v.ndim))
             for k, v in inputs.items()}
    train_step = step_lib.make_train_step(config, model, jmesh, shardings, empty_text=empty, rules=rules,
                                          batch_keys=batch_keys, prepare=prepare)
    with partitioning.axis_rules(jmesh, rules):
        lowered = train_step.jitted.lower(state, batch, jax.random.key(0), None if prepare is None else prepare.frozen)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    return _Compiled(model, state, shardings, prepare, source, compiled, t_lower, t_compile)


AMUSED_HIDDEN_LAYER = -2  # aMUSEd cross-attends to CLIP's penultimate hidden states (as `import-amused` records)


def amused_configs(config):
    """(UVit2DConfig, CLIPConfig, VQGANConfig) of an aMUSEd fine-tuning config's presets `config.model.uvit`,
    `.clip` and `.vqgan` (configs/amused_finetune.py), the UVit2D with the run's `config.model` dtype, remat
    and dropout as `finetune.build_model` applies them to a workdir's; checked against each other as
    `import-amused` checks a pipeline, and against `config.data.image_size` and `config.text.max_length`."""
    from muse_jax.models import clip, uvit, vqgan

    m = config.model
    missing = [k for k in ("uvit", "clip", "vqgan") if k not in m]
    if missing:
        raise ValueError(f"config.model.{missing[0]} is missing: planning an aMUSEd fine-tune needs the architecture "
                         "presets of configs/amused_finetune.py (config.model.uvit, .clip, .vqgan)")
    run = {k: m[k] for k in ("dtype", "remat", "hidden_dropout") if k in m}
    ucfg = uvit.UVit2DConfig.from_dict({**m.uvit.to_dict(), **run})
    ccfg = clip.CLIPConfig.from_hf(m.clip.to_dict())
    vcfg = vqgan.VQGANConfig.from_dict(m.vqgan.to_dict())
    px, length = int(config.data.image_size), int(config.text.max_length)
    if px != ucfg.sample_size * vcfg.factor:
        raise ValueError(f"config.data.image_size={px}: the VQGAN (f{vcfg.factor}) makes {px // vcfg.factor}^2 tokens "
                         f"of it, config.model.uvit.sample_size={ucfg.sample_size} says {ucfg.sample_size}^2")
    if vcfg.codebook_size != ucfg.codebook_size:
        raise ValueError(f"config.model.vqgan.codebook_size={vcfg.codebook_size} differs from "
                         f"config.model.uvit.codebook_size={ucfg.codebook_size}")
    if ccfg.text.hidden_size != ucfg.encoder_hidden_size or ccfg.projection_dim != ucfg.cond_embed_dim:
        raise ValueError(f"config.model.clip (hidden_size {ccfg.text.hidden_size}, projection_dim {ccfg.projection_dim}) "
                         f"does not feed config.model.uvit (encoder_hidden_size {ucfg.encoder_hidden_size}, "
                         f"cond_embed_dim {ucfg.cond_embed_dim})")
    if length > ccfg.text.max_position_embeddings:
        raise ValueError(f"config.text.max_length={length}: CLIP has {ccfg.text.max_position_embeddings} positions")
    return ucfg, ccfg, vcfg


def _compile_amused(s: _Setup) -> _Compiled:
    """Lowers and compiles the aMUSEd fine-tuning step as `train` builds it on an imported workdir
    (training/loop.py, finetune.py), from the config's presets instead of a workdir: the UVit2D trained
    whole, or (config.lora.rank > 0) its LoRA adapters with the base weights a frozen step argument; the
    frozen VQGAN encoder and CLIP text tower in the step. Everything abstract."""
    import time

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from muse_jax import checkpoint as ckpt_lib
    from muse_jax import partitioning
    from muse_jax.models import clip, uvit
    from muse_jax.models import lora as lora_lib
    from muse_jax.training import finetune
    from muse_jax.training import state as state_lib
    from muse_jax.training import step as step_lib

    config, B, L, jmesh, rules = s.config, s.batch_size, s.text_length, s.mesh, s.rules
    t0 = time.perf_counter()
    ucfg, ccfg, vcfg = amused_configs(config)
    model = uvit.UVit2D(ucfg)
    spec = lora_lib.LoraSpec.from_config(config)
    if spec is not None:
        model = lora_lib.wrap(model, spec)
    _, abstract, shardings = state_lib.state_setup(config, model, jmesh, rules,
                                                   select=None if spec is None else lora_lib.adapters_only)
    state = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)
    base = combine = None
    if spec is not None:  # the frozen weights beside the trained adapters, in the parameters' dtype
        boxed = lora_lib.split(state_lib.abstract_params(model, config))[0]
        base_shardings = partitioning.state_shardings(boxed, jmesh, rules)
        dtype = state_lib.param_dtype(config)
        base = (jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh),
                                       nn.unbox(boxed), base_shardings), base_shardings)
        combine = lora_lib.combine

    ids = jax.ShapeDtypeStruct((1, L), jnp.int32)
    text_model = clip.CLIPTextWithProjection(ccfg)
    clip_boxed = jax.eval_shape(lambda i: text_model.init(jax.random.key(0), i)["params"], ids)
    px = int(config.data.image_size)
    prepare = finetune.prepare_step(config, vcfg, None, ccfg, None, clip_boxed, px, AMUSED_HIDDEN_LAYER,
                                    mesh=jmesh, rules=rules)
    shapes = {"image": ((B, px, px, 3), jnp.uint8), "text_ids": ((B, L), jnp.int32), "text_mask": ((B, L), jnp.bool_),
              "original_size": ((B, 2), jnp.int32), "crop_top_left": ((B, 2), jnp.int32),
              "aesthetic_score": ((B,), jnp.float32)}
    batch_keys = {k: len(shape) for k, (shape, _) in shapes.items()}
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=partitioning.batch_sharding(jmesh, rules, len(shape)))
             for k, (shape, dtype) in shapes.items()}
    # the empty prompt's CLIP states (values do not matter for the plan)
    empty = {"text_states": jnp.zeros((L, ccfg.text.hidden_size), jnp.float32),
             "pooled_text": jnp.zeros((ccfg.projection_dim,), jnp.float32)}
    train_step = step_lib.make_train_step(config, model, jmesh, shardings, empty_text=empty, rules=rules,
                                          batch_keys=batch_keys, prepare=prepare, base=base, combine=combine)
    extra = () if base is None else (base[0],)
    with partitioning.axis_rules(jmesh, rules):
        lowered = train_step.jitted.lower(state, batch, jax.random.key(0), prepare.frozen, *extra)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    return _Compiled(model, state, shardings, prepare, "images", compiled, t_lower, t_compile, base=base,
                     amused=(ucfg, ccfg, vcfg))


def _batch_shards(s: _Setup) -> int:
    """Devices the batch is split over (the product of the rules' batch axes)."""
    from muse_jax import partitioning

    axes = partitioning._batch_axes(s.rules)  # noqa: SLF001 (the rules' batch axes)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(s.mesh.shape[a] for a in axes)


def _memory_figures(s: _Setup, c: _Compiled, batch_per_device: int) -> dict[str, Any]:
    """Bytes per device: the state and frozen parameters exactly from their shardings, XLA's memory
    analysis, and the analytic saved activations."""
    state, shardings, prepare = c.state, c.shardings, c.prepare
    mem = c.compiled.memory_analysis()
    params_b = _tree_bytes_per_device(state.params, shardings.params)
    opt_b = _tree_bytes_per_device(state.opt_state, shardings.opt_state)
    ema_b = _tree_bytes_per_device(state.ema_params, shardings.ema_params) if state.ema_params is not None else 0
    frozen_b = _tree_bytes_per_device(prepare.frozen, prepare.shardings) if prepare is not None else 0
    arg_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias_b, temp_b = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    mcfg, L = c.model.config, s.text_length
    if c.amused is not None:
        return _amused_memory_figures(s, c, batch_per_device, params_b, opt_b, ema_b, frozen_b,
                                      (arg_b, out_b, alias_b, temp_b))
    activations = analytic_activation_bytes(mcfg, batch_per_device, L)
    return {
        "params": params_b, "optimizer_state": opt_b, "ema_params": ema_b, "frozen_params": frozen_b,
        "arguments": arg_b, "outputs": out_b, "aliased": alias_b, "temporaries": temp_b,
        "peak": arg_b + out_b - alias_b + temp_b,
        "activations_analytic": activations,
        "activations_analytic_by_attention": _activations_by_attention(mcfg, batch_per_device, L),
        # what must fit at least: the state, one gradient per parameter, the saved activations and
        # the frozen encoders' parameters that the step runs
        "state_grads_activations": params_b + opt_b + ema_b + params_b + activations + frozen_b,
    }


def _amused_grid(c: _Compiled) -> int:
    """Tokens per side of the UVit2D's grid: the images' pixels over the VQGAN's factor."""
    return c.prepare.image_size // c.amused[2].factor


def _lora_adapters(c: _Compiled, text_length: int) -> tuple[float, str] | None:
    """`lora_adapter_flops` of a LoRA plan's trained adapters; None for full fine-tuning."""
    if c.base is None:
        return None
    return lora_adapter_flops(c.state.params, c.amused[0], text_length, _amused_grid(c))


def _amused_memory_figures(s: _Setup, c: _Compiled, batch_per_device: int, params_b: int, opt_b: int, ema_b: int,
                           frozen_b: int, xla: tuple[int, int, int, int]) -> dict[str, Any]:
    """`_memory_figures` of an aMUSEd fine-tune: besides the trained state and the frozen encoders, LoRA's
    frozen UVit2D weights (`base_params`); the UVit2D's analytic saved activations."""
    arg_b, out_b, alias_b, temp_b = xla
    base_b = _tree_bytes_per_device(*c.base) if c.base is not None else 0
    lora = _lora_adapters(c, s.text_length)
    first = "text" if lora is None else lora[1]
    activations = analytic_uvit_activation_bytes(c.amused[0], batch_per_device, s.text_length, _amused_grid(c),
                                                 first_trained=first)
    return {
        "params": params_b, "optimizer_state": opt_b, "ema_params": ema_b, "base_params": base_b,
        "frozen_params": frozen_b, "arguments": arg_b, "outputs": out_b, "aliased": alias_b, "temporaries": temp_b,
        "peak": arg_b + out_b - alias_b + temp_b,
        "activations_analytic": activations,
        # the trained state, one gradient per trained parameter, the frozen weights (LoRA's base, the
        # encoders') and the saved activations
        "state_grads_activations": params_b + opt_b + ema_b + params_b + base_b + frozen_b + activations,
    }


def _flops_figures(config, stage: str, mcfg, batch_size: int, text_length: int, xla_per_device: float,
                   num_devices: int) -> dict[str, float]:
    """XLA's FLOPs per device and in total, the analytic counts, and the FLOPs the compute time uses."""
    analytic = analytic_train_flops(mcfg, batch_size, text_length)
    in_step = in_step_flops(config, stage, batch_size, text_length)
    f = {"xla_per_device": xla_per_device, **_analytic_flops(analytic, in_step)}
    f["xla_total"] = f["xla_per_device"] * num_devices
    f["compute_per_device"] = compute_flops_per_device(mcfg, text_length, f["xla_per_device"], f["analytic_step"],
                                                       num_devices)
    return f


def _amused_flops_figures(s: _Setup, c: _Compiled, xla_per_device: float) -> dict[str, float]:
    """`_flops_figures` of an aMUSEd fine-tune: the UVit2D's analytic count (full or LoRA) and the frozen CLIP
    text tower's and VQGAN encoder's; the UVit2D's attention has no loops, so XLA's count is the compute."""
    ucfg, ccfg, vcfg = c.amused
    B, L = s.batch_size, s.text_length
    uvit_flops = analytic_uvit_train_flops(ucfg, B, L, _amused_grid(c), lora=_lora_adapters(c, L))
    in_step = amused_in_step_flops(ccfg, vcfg, B, L, c.prepare.image_size)
    f = {"xla_per_device": xla_per_device, "analytic_model": uvit_flops["model"],
         "analytic_executed": uvit_flops["executed"], "analytic_forward": uvit_flops["forward"],
         "analytic_t5_encoder": 0.0, "analytic_clip_encoder": in_step["clip_encoder"],
         "analytic_vqgan_encoder": in_step["vqgan_encoder"],
         "analytic_step": uvit_flops["executed"] + in_step["clip_encoder"] + in_step["vqgan_encoder"]}
    f["xla_total"] = xla_per_device * s.num_devices
    f["compute_per_device"] = xla_per_device
    return f


def _plan_config(s: _Setup, c: _Compiled, batch_per_device: int) -> dict[str, Any]:
    """The plan's "config" entry: what was compiled (for aMUSEd also the trained and frozen parameter counts)."""
    from muse_jax.models import transformer as transformer_lib

    config, prepare, mcfg = s.config, c.prepare, c.model.config
    out = {"stage": s.stage, "batch_size": s.batch_size, "batch_per_device": batch_per_device,
           "text_length": s.text_length, "remat": bool(mcfg.remat), "dtype": mcfg.dtype,
           "attention": getattr(mcfg, "attention", "xla"), "optimizer": config.train.optimizer,
           "params": transformer_lib.count_params(c.state.params), "step_source": c.step_source,
           "image_size": prepare.image_size if prepare is not None else 0,
           "frozen_params": transformer_lib.count_params(prepare.frozen) if prepare is not None else 0}
    if c.amused is not None:
        from muse_jax.training import state as state_lib

        rank = int(config.lora.rank or 0) if c.base is not None else 0
        out.update(family="amused", model="UVit2D", lora_rank=rank,
                   base_params=transformer_lib.count_params(c.base[0]) if c.base is not None else 0,
                   param_dtype=state_lib.param_dtype(config),
                   optimizer_state_dtype=str(config.train.get("optimizer_state_dtype", "")) or
                   state_lib.param_dtype(config))
    return out


def plan(
    config,
    mesh: str | Mapping[str, int],
    accelerators: str | tuple[str, ...] = ("tpu_v4",),
    *,
    stage: str = "base",
    batch_size: int | None = None,
    remat: bool | None = None,
    text_length: int | None = None,
    keep_hlo: bool = False,
) -> dict[str, Any]:
    """Compiles `stage`'s training step for `mesh` on virtual devices; returns the plan (a dict).

    One compilation serves every accelerator in `accelerators` (names of `ACCELERATORS`).
    """
    s = _setup(config, mesh, accelerators, stage=stage, batch_size=batch_size, remat=remat, text_length=text_length)
    c = _compile(s)
    config, B, L, n = s.config, s.batch_size, s.text_length, s.num_devices
    cost = _first(c.compiled.cost_analysis())
    hlo = c.compiled.as_text()
    mcfg = c.model.config
    batch_per_device = B // _batch_shards(s)
    xla_flops = float(cost.get("flops", 0.0))
    p = {
        "config": _plan_config(s, c, batch_per_device),
        "mesh": s.sizes,
        "num_devices": n,
        "memory_per_device": _memory_figures(s, c, batch_per_device),
        "flops": _amused_flops_figures(s, c, xla_flops) if c.amused is not None else
        _flops_figures(config, stage, mcfg, B, L, xla_flops, n),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "collective_bytes_per_device": collective_bytes(hlo, n),
        "collective_bytes_by_group": collective_bytes(hlo, n, by_group=True),
        "compile_seconds": {"lower": c.lower_seconds, "compile": c.compile_seconds},
        **({"hlo": hlo} if keep_hlo else {}),
    }
    p["estimates"] = {a: estimate(p, a) for a in s.accelerators}
    return p


def _lerp(a, b, t):
    if isinstance(a, Mapping):
        return {k: _lerp(a.get(k, 0.0), b.get(k, 0.0), t) for k in set(a) | set(b)}
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return b
    return a + (b - a) * t


def plan_extrapolated(config, mesh, accelerators=("tpu_v4",), *, layers_from=(2, 4), stage: str = "base",
                      **kwargs) -> dict[str, Any]:
    """`plan` at depths `layers_from` = (a, b), extrapolated linearly to `config[stage].num_layers`."""
    if _is_amused(config):
        raise ValueError("--layers-from extrapolates a Muse stage's depth; plan an aMUSEd fine-tune whole (its 22 "
                         "layers compile in minutes on a CPU)")
    a, b = (int(x) for x in layers_from)
    if not 0 < a < b:
        raise ValueError(f"layers_from={layers_from}: need two depths 0 < a < b")
    depth = int(config[stage].num_layers)
    accs = [accelerators] if isinstance(accelerators, str) else list(accelerators)
    small = []
    for d in (a, b):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c[stage].num_layers = d
        small.append(plan(c, mesh, accs, stage=stage, **kwargs))
    t = (depth - a) / (b - a)
    p = dict(small[1])
    for key in ("memory_per_device", "collective_bytes_per_device", "collective_bytes_by_group", "compile_seconds"):
        p[key] = _lerp(small[0][key], small[1][key], t)
    p["collective_bytes_per_device"] = {k: v for k, v in p["collective_bytes_per_device"].items() if v > 0}
    p["bytes_accessed_per_device"] = _lerp(small[0]["bytes_accessed_per_device"], small[1]["bytes_accessed_per_device"], t)
    p["config"] = dict(small[1]["config"], params=round(_lerp(small[0]["config"]["params"], small[1]["config"]["params"], t)))
    full = config.copy_and_resolve_references()
    with full.unlocked():
        for k, v in kwargs.items():
            if k == "batch_size" and v is not None:
                full.train.batch_size = int(v)
            if k == "remat" and v is not None:
                full[stage].remat = bool(v)
            if k == "text_length" and v is not None:
                full.text.max_length = int(v)
    from muse_jax.models import transformer as transformer_lib

    mcfg = transformer_lib.TransformerConfig.coerce(full[stage])
    B, L = int(full.train.batch_size), int(full.text.max_length)
    xla_per_device = _lerp(small[0]["flops"]["xla_per_device"], small[1]["flops"]["xla_per_device"], t)
    p["flops"] = _flops_figures(full, stage, mcfg, B, L, xla_per_device, p["num_devices"])
    m = p["memory_per_device"]
    m["activations_analytic"] = analytic_activation_bytes(mcfg, p["config"]["batch_per_device"], L)
    m["activations_analytic_by_attention"] = _activations_by_attention(mcfg, p["config"]["batch_per_device"], L)
    m["state_grads_activations"] = (m["params"] * 2 + m["optimizer_state"] + m["ema_params"] + m["activations_analytic"]
                                    + m.get("frozen_params", 0))
    p["extrapolated_from_layers"] = [a, b]
    p["estimates"] = {name: estimate(p, name) for name in accs}
    return p
