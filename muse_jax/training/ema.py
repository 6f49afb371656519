"""Offline EMA over a stage's checkpoints (`muse-jax ema`), as Muse averages its weights.

    muse-jax ema --workdir W --stage base [--decay 0.7] [--every 5000]

The stage's kept checkpoints whose step is a multiple of `every` are read in step order, one
checkpoint's parameters at a time (never the optimizer state), and folded into

    ema = decay * ema + (1 - decay) * params        (ema starts as the first checkpoint's params)

on a mesh of all devices (FSDP, sharded by the training rules). The result is written as
W/<stage>/ema/<last step> (an Orbax checkpoint of one field, `ema_params`), then W/<stage>/ema.json
({"decay", "every", "steps"}). `workdir.load_stage` loads it before anything else, so
sampling, editing, evaluation and warm starts use it; deleting ema.json goes back to the checkpoints.

Training keeps only the newest `config.train.keep_checkpoints`; `config.train.keep_every=5000`
keeps every checkpoint of a multiple of 5000 steps as well.
"""
from __future__ import annotations

import json
from typing import Any

import jax

from muse_jax import checkpoint as ckpt_lib
from muse_jax import partitioning, paths
from muse_jax import workdir as workdir_lib


def ema_steps(workdir, stage: str, every: int) -> list[int]:
    """The kept checkpoint steps of `stage` that are multiples of `every`; errors when fewer than 2."""
    kept = workdir_lib.checkpoint_steps(workdir, stage)
    if not kept:
        raise FileNotFoundError(f"no checkpoints in {workdir_lib.checkpoint_dir(workdir, stage)} "
                                f"(run `muse-jax train --workdir {workdir} --stage {stage}` first)")
    steps = [s for s in kept if s % every == 0]
    if len(steps) < 2:
        raise ValueError(f"{stage}: {len(steps)} kept checkpoint(s) at a multiple of {every} steps (kept: {kept}); "
                         f"an EMA needs 2 or more: pass a smaller --every, or train with "
                         f"--config.train.checkpoint_every=N --config.train.keep_every={every} to keep them")
    return steps


def run(workdir, stage: str, decay: float = 0.7, every: int = 5000) -> tuple[Any, dict]:
    """Writes the offline EMA of `stage`'s checkpoints; returns (the EMA params, ema.json's content)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"--decay {decay}: must be strictly between 0 and 1")
    if every < 1:
        raise ValueError(f"--every {every}: must be >= 1")
    steps = ema_steps(workdir, stage, every)
    config = workdir_lib.load_stage_config(workdir, stage)
    mesh = partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    shardings = workdir_lib.stage_param_shardings(workdir, stage, mesh, partitioning.logical_rules(config))

    def update(ema, params):
        return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)

    update = jax.jit(update, out_shardings=shardings, donate_argnums=0)
    ema = None
    for s in steps:  # one checkpoint's parameters at a time
        _, params, _ = workdir_lib.load_stage(workdir, stage, step=s, use_ema=False, sharding=shardings)
        ema = params if ema is None else update(ema, params)

    # ema.json is written last: it marks a whole EMA (the loader reads nothing without it).
    out, meta_path = workdir_lib.ema_dir(workdir, stage), workdir_lib.stage_dir(workdir, stage) / workdir_lib.EMA_FILE
    if jax.process_index() == 0:
        if meta_path.exists():
            meta_path.unlink()
        if out.exists():
            paths.rmtree(out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("muse_jax_ema_cleared")
    ckpt = ckpt_lib.Checkpointer(out, keep=1, async_save=False)
    ckpt.save(steps[-1], {"ema_params": ema}, force=True)
    ckpt.close()
    meta = {"decay": float(decay), "every": int(every), "steps": steps}
    if jax.process_index() == 0:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return ema, meta
