"""Training loop of the base and super-resolution transformers (`muse-jax train`).

    muse-jax train --config shapes --workdir W [--stage base|superres|all]

Reads top to bottom: data (training/inputs.py: shapes' token cache, streamed real data, token
shards or an aMUSEd workdir's images) -> mesh and sharded state -> restore if a checkpoint exists,
else a fresh or warm-started state -> the jitted step in a loop with metrics, sample previews,
checkpoints, a NaN guard and SIGTERM handling. Where it writes: muse_jax/workdir.py.
Fine-tuning goes through the same loop (training/finetune.py): an imported aMUSEd workdir starts from
its weights (checkpoint 0), a workdir made by `--init-from W0` from W0's; with `config.lora.rank > 0`
the state holds only LoRA adapters and the frozen weights are a step argument.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import checkpoint as ckpt_lib
from muse_jax import config as config_lib
from muse_jax import distributed, partitioning, precision
from muse_jax import workdir as workdir_lib
from muse_jax import writer as writer_lib
from muse_jax.data import loader as loader_lib
from muse_jax.data import stage_data
from muse_jax.models import lora as lora_lib
from muse_jax.models import transformer as transformer_lib
from muse_jax.training import finetune, inputs, preview, stage_model
from muse_jax.training import lock as lock_lib
from muse_jax.training import state as state_lib
from muse_jax.training import step as step_lib

log = logging.getLogger(__name__)


def stage_config(config, stage: str):
    """The config with `config.train_<stage>` (per-stage overrides of `config.train`) applied."""
    overrides = config.get(f"train_{stage}")
    if not overrides:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for k, v in overrides.items():
            if k not in config.train:
                raise ValueError(f"config.train_{stage}.{k}: no such field in config.train")
            config.train[k] = v
    return config


def train_stage(
    config,
    workdir,
    stage: str,
    *,
    data: stage_data.StageData | None = None,
    stop_at: int | None = None,
    quiet: bool = False,
    devices=None,
) -> dict[str, Any]:
    """Trains (or resumes) `stage` in W/<stage>; returns a summary (losses, timings, final step, records
    skipped by all processes).

    `stop_at` ends this run early at that step (as a preemption would), keeping the schedule
    of `config.train.num_steps`. W/<stage> is locked while it trains (muse_jax/training/lock.py):
    a second run on it is refused before it writes anything, as is a checkpoint folder that
    cannot be written (before compiling).
    """
    workdir = workdir_lib.path(workdir)
    config = stage_config(config, stage)
    check_train_values(config.train)  # before anything is written
    finetune.check_config(config, workdir)
    out_dir = workdir_lib.stage_dir(workdir, stage)
    with lock_lib.hold(out_dir, f"the {stage} stage", timeout_s=lock_lib.timeout_s(config)):
        lock_lib.check_writable(out_dir / "checkpoints")
        return _train_locked_stage(config, workdir, stage, out_dir, data=data, stop_at=stop_at, quiet=quiet,
                                   devices=devices)


def _train_locked_stage(config, workdir, stage: str, out_dir, *, data, stop_at, quiet, devices) -> dict[str, Any]:
    """`train_stage` once W/<stage> is this run's (`config` with the stage's overrides, checked)."""
    t = config.train
    num_steps = int(t.num_steps)
    end = num_steps if stop_at is None else min(int(stop_at), num_steps)

    if t.get("compilation_cache_dir", ""):  # persistent XLA cache: reruns skip compilation
        jax.config.update("jax_compilation_cache_dir", str(t.compilation_cache_dir).replace("{workdir}", str(workdir)))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = partitioning.make_mesh(config.mesh, devices)
    rules = partitioning.logical_rules(config)
    partitioning.check_batch_divides(int(t.batch_size), mesh, rules)
    local_batch = loader_lib.per_process_batch_size(int(t.batch_size))

    # An imported aMUSEd workdir is fine-tuned (training/finetune.py): its weights are checkpoint 0.
    tune = finetune.is_finetune(workdir)
    if data is None:
        data = inputs.build(config, workdir, stage, mesh, rules)
    if data.source is not None:
        it = iter(loader_lib.make_loader(data.source, batch_size=local_batch, seed=int(config.data.shuffle_seed)))
    else:
        it = data.batches(local_batch)

    model = finetune.build_model(config, workdir) if tune else workdir_lib.build_stage_model(config, stage)
    spec = lora_lib.LoraSpec.from_config(config)
    if spec is not None and not tune:
        model = lora_lib.wrap(model, spec)
    create, abstract, shardings = state_lib.state_setup(config, model, mesh, rules,
                                                        select=None if spec is None else lora_lib.adapters_only)
    base = combine = None
    if spec is not None:  # LoRA: the frozen weights beside the trained adapters, read where they are
        base_shardings = partitioning.state_shardings(lora_lib.split(state_lib.abstract_params(model, config))[0],
                                                      mesh, rules)
        frozen = finetune.frozen_weights(workdir, stage, base_shardings, state_lib.param_dtype(config))
        if frozen is None:
            raise ValueError(f"config.lora.rank > 0: the workdir {workdir} was started from has no trained {stage} "
                             "stage to put adapters on")
        base, combine = (frozen, base_shardings), lora_lib.combine
    ckpt = ckpt_lib.Checkpointer(out_dir / "checkpoints", save_every=int(t.checkpoint_every), keep=t.keep_checkpoints,
                                 keep_every=int(t.get("keep_every", 0)),
                                 keep_steps=(finetune.BASE_STEP,) if tune else ())
    rng = jax.random.key(int(config.seed))
    init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
    start = 0
    # Unbox outside axis_rules: inside it flax constrains the abstract leaves and
    # fails ("must be a NamedSharding ... AbstractMesh") when resuming on a multi-device mesh.
    target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)
    fresh = ckpt.latest_step() is None or (tune and ckpt.latest_step() == finetune.BASE_STEP)
    if not fresh:
        with partitioning.axis_rules(mesh, rules):
            state, start = ckpt.restore(target, data_iterator=it)
        log.info("resumed %s from step %d", stage, start)
    else:  # outside the rules: qwix's LoRA init unboxes a kernel's names onto its lower-rank adapters there
        state = jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings)(init_rng)
    if start == 0 and spec is None:  # outside axis_rules, like the restore target above
        # Full fine-tuning starts from the imported weights, or those of `train --init-from W0`; else a super-res
        # stage may start from the trained base (config.train.init_from).
        source = None
        if tune or workdir_lib.read_init(workdir):
            source = finetune.frozen_weights(workdir, stage, shardings.params, state_lib.param_dtype(config))
        if source is not None:
            state = state_lib.replace_params(state, shardings, source)
        elif t.get("init_from", ""):
            state = state_lib.warm_start(state, shardings, workdir, stage, str(t.init_from), mesh, rules, quiet)
    # The config the stage is trained with: written once the checks, the restore and the warm start have
    # passed, so that a refused `train` leaves the config of a working stage as it was.
    if tune:
        finetune.write_run_config(config, workdir)
    elif jax.process_index() == 0:
        config_lib.save_config(config, out_dir / "config.json")

    batch_keys = {k: np.asarray(v).ndim + 1 for k, v in data.first_example().items()}
    empty = {k: jnp.asarray(v) for k, v in data.empty_text.items()}
    train_step = step_lib.make_train_step(config, model, mesh, shardings, empty_text=empty, rules=rules,
                                          batch_keys=batch_keys, prepare=data.prepare, base=base, combine=combine)

    writer = writer_lib.MetricWriter(out_dir / "tb", console=not quiet)
    n_params = transformer_lib.count_params(state.params)
    if start == 0 and not quiet and jax.process_index() == 0:
        from clu import parameter_overview

        # From shapes only: parameters sharded across hosts cannot be gathered onto one.
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
        print(parameter_overview.get_parameter_overview(shapes, include_stats=False))
        writer.write_hparams({"stage": stage, "params": n_params, **config.train.to_dict(),
                              **(config[stage].to_dict() if stage in config else {})})
    tokens_per_step = int(t.batch_size) * stage_model.num_tokens(model)
    abstract_inputs = state_lib.abstract_inputs(model, config, int(t.batch_size))
    flops_per_step = 0.0 if spec is not None else \
        3.0 * step_lib.forward_flops(model, nn.unbox(abstract).params, abstract_inputs)
    peak = step_lib.peak_flops_per_device(t) * jax.device_count()

    losses, step_times = {}, []
    pending = []  # device metrics since the last log
    t_log, steps_since = time.perf_counter(), 0
    bar = writer_lib.progress(total=end, initial=start, desc=stage, disable=quiet or jax.process_index() != 0)
    stopped = "done"
    # Watchdog: a step that never completes (a hung peer) ends the process with a clear message
    # after config.distributed.step_timeout_s (0 = off); see muse_jax/distributed.py.
    dog = distributed.Watchdog(float(config.distributed.step_timeout_s) if "distributed" in config else 0.0)
    with ckpt_lib.PreemptionHandler() as preempt, dog:  # SIGTERM or Ctrl-C: save and stop
        # Divergence guard: NaN/inf, or a loss / parameter norm blown up against this run's own history. Every
        # step is checked before a checkpoint is saved, so no checkpoint of diverged parameters is written;
        # each checkpoint's loss and parameter norm go to W/<stage>/health.json.
        guard = ckpt_lib.DivergenceGuard(loss_factor=float(t.get("divergence_loss_factor", 10.0)),
                                         param_factor=float(t.get("divergence_param_factor", 10.0)),
                                         start_param_norm=ckpt_lib.global_norm(state.params))
        health = out_dir / "health.json"
        try:
            for s in range(start, end):
                batch = partitioning.shard_batch(next(it), mesh, rules)
                state, metrics = train_step(state, batch, step_rng)
                pending.append(metrics)
                steps_since += 1
                done = s + 1
                log_now = done % int(t.log_every) == 0 or done == end
                save_now = ckpt.should_save(done) or done == end
                stop_now = preempt.should_stop()
                if log_now or save_now or stop_now:
                    host = jax.device_get(pending)
                    for i, m in enumerate(host):
                        losses[done - len(host) + i + 1] = float(m["loss"])
                    for i, m in enumerate(host):
                        guard.check(done - len(host) + i + 1, m)
                    pending = []
                    if log_now:
                        dt = time.perf_counter() - t_log
                        sps = steps_since / dt
                        step_times.append(dt / steps_since)
                        avg = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "accuracy", "grad_norm")}
                        scalars = {f"train/{k}": v for k, v in avg.items()}
                        scalars.update({"train/lr": float(host[-1]["lr"]), "train/param_norm": float(host[-1]["param_norm"]),
                                        "perf/steps_per_s": sps,
                                        "perf/tokens_per_s": sps * tokens_per_step})
                        if flops_per_step:
                            scalars["perf/model_tflops_per_s"] = sps * flops_per_step / 1e12
                            if peak:
                                scalars["perf/mfu"] = sps * flops_per_step / peak
                        if hasattr(it, "metrics"):  # real data: records all processes skipped, by kind
                            scalars.update(distributed.sum_counts(it.metrics()))
                        writer.write_scalars(done, scalars)
                        bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['accuracy']:.3f}")
                        t_log, steps_since = time.perf_counter(), 0
                    if (save_now or stop_now) and ckpt.save(done, state, data_iterator=it, force=True):
                        ckpt_lib.record_health(health, done, guard.last)
                    if int(t.sample_every) and done % int(t.sample_every) == 0 and data.preview is not None:
                        shown = state if combine is None else state.replace(  # LoRA: the adapters on the weights
                            params=combine(base[0], state.params),
                            ema_params=None if state.ema_params is None else combine(base[0], state.ema_params))
                        preview.write_preview(model, shown, data, jax.random.fold_in(sample_rng, done), writer,
                                              out_dir, done)
                bar.update(1)
                dog.kick(done)
                if stop_now:
                    stopped = "preempted"
                    log.warning("stopping %s at step %d on %s (checkpoint saved)", stage, done,
                                preempt.signal_name or "a peer's preemption")
                    break
        except ckpt_lib.DivergenceError as e:  # NonFiniteError included
            ckpt.wait()  # the pending saves: all of them passed the guard
            good = ckpt.latest_step()
            ckpt.close()
            bar.close()
            writer.close()
            ckpt_lib.record_health(health, guard.failed_step, guard.last, healthy=False, checkpoint=False)
            raise type(e)(ckpt_lib.diverged_message(
                stage, str(e), good, ckpt_lib.read_health(health), workdir=workdir, checkpoints=ckpt.directory,
                lr=float(t.lr))) from None
    bar.close()
    ckpt.close()
    writer.flush()
    writer.close()
    steady = step_times[1:] or step_times  # the first log interval includes compilation
    sec = float(np.median(steady)) if steady else float("nan")
    return {
        "stage": stage, "final_step": int(jax.device_get(state.step)), "losses": losses, "status": stopped,
        "skipped": skipped_records(it),
        "seconds_per_step": sec, "tokens_per_s": tokens_per_step / sec if step_times else float("nan"),
        "params": n_params, "state": state,
    }


def check_train_values(t) -> None:
    """Refuses `config.train` values no run can use, naming the field."""
    precision.check(t.get("matmul_precision", "default"))
    for name, least in (("batch_size", 1), ("num_steps", 1), ("log_every", 1), ("checkpoint_every", 1),
                        ("sample_every", 0), ("keep_checkpoints", 1)):
        value = t.get(name, least)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise ValueError(f"config.train.{name}={value!r}: must be an integer >= {least}")


def skipped_records(it) -> dict[str, int]:
    """The records the data iterators of all processes skipped so far, summed by kind (`it.skipped`; {} for
    data that skips none). A collective where there are skips to count: every process calls it."""
    if not hasattr(it, "skipped"):  # the same data on every process: all of them return here, or none
        return {}
    return distributed.sum_counts(it.skipped or {})


def train(config, workdir, stages=config_lib.STAGES, quiet: bool = False) -> list[dict]:
    """Trains the given stages in order (each resumes if it has checkpoints); a stage stopped by SIGTERM
    ends the run there (the summaries of the stages run so far are returned)."""
    if finetune.is_finetune(workdir):  # one stage: the UVit2D
        stages = ("base",)
    out = []
    for stage in stages:
        r = train_stage(config, workdir, stage, quiet=quiet)
        r.pop("state")
        out.append(r)
        if jax.process_index() == 0:
            skipped = f", skipped records {r['skipped']}" if r["skipped"] else ""
            print(f"{stage}: {r['final_step']} steps, {r['seconds_per_step']:.3f} s/step, "
                  f"{r['tokens_per_s']:.0f} tokens/s ({r['status']}{skipped})")
        if r["status"] == "preempted":  # later stages may start from this one (init_from): not from a partial one
            break
    return out
