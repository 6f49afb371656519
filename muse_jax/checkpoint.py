"""Checkpoints: one Orbax CheckpointManager with the data-iterator state, fallback, preemption.

How to use (a training loop):
    ckpt = Checkpointer(workdir / "checkpoints" / "base", save_every=500, keep=3)   # keep_every=5000: and those
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract_state, shardings)           # target shapes + shardings
    start = 0
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(abstract, data_iterator=it)   # falls back past corrupt steps
    guard = DivergenceGuard(loss_factor=10, param_factor=10, start_param_norm=global_norm(state.params))
    with PreemptionHandler() as preempt:                          # SIGTERM or Ctrl-C -> flag
        for step in range(start, num_steps):
            state, metrics = train_step(state, batch, rng)
            if step_is_log_or_save(step + 1):
                guard.check(step + 1, metrics)                    # NaN/inf, blow-up -> DivergenceError
            if ckpt.save(step + 1, state, data_iterator=it):      # every `save_every`, async
                record_health(health_path, step + 1, guard.last)  # W/<stage>/health.json
            if preempt.requested:
                ckpt.save(step + 1, state, data_iterator=it, force=True); break
    ckpt.close()                                                  # waits for async saves

The step number saved is the number of completed steps; resuming from step s restores the
state after s steps and the iterator positioned at the (s+1)-th batch. Restore places arrays
onto whatever shardings the target carries, so a checkpoint written on one mesh restores onto
another. `restore` raises `CheckpointError` with the directory, the steps tried and why.

Checkpoints are saved only after every step before them passed the guard, so once a run diverges
no checkpoint of the diverged parameters is written: the newest checkpoint is the last healthy
one, and a plain resume (with a lower learning rate) starts from it.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import pathlib
import signal
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import grain.python as grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from muse_jax import paths

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read."""


class DivergenceError(FloatingPointError):
    """A run whose loss or parameters blew up (`DivergenceGuard`); the run stops, earlier checkpoints are kept."""


class NonFiniteError(DivergenceError):
    """A NaN or inf training metric; the run stops, earlier checkpoints are kept."""


class Checkpointer:
    """CheckpointManager with items `state` (any pytree of arrays) and `data` (grain iterator)."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        save_every: int = 1000,
        keep: int | None = 3,
        keep_every: int = 0,
        keep_steps: tuple[int, ...] = (),
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"save_every={save_every}: must be >= 1")
        if keep_every < 0:
            raise ValueError(f"keep_every={keep_every}: must be >= 0 (0: keep only the newest `keep`)")
        self.directory = paths.as_path(directory)  # a local path or a URI (gs://...), see muse_jax.paths
        if not paths.is_remote(self.directory):
            self.directory = self.directory.absolute()
        self.save_every = int(save_every)
        policy = None
        # The newest `keep` checkpoints, every one whose step is a multiple of keep_every, and those of keep_steps.
        extra = ([checkpoint_managers.EveryNSteps(int(keep_every))] if keep_every else []) + (
            [checkpoint_managers.CustomSteps([int(s) for s in keep_steps])] if keep_steps else [])
        if extra:
            policy = checkpoint_managers.AnyPreservationPolicy([checkpoint_managers.LatestN(keep), *extra])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if policy else keep,  # a policy replaces max_to_keep
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # half-written saves of a killed run (*.orbax-checkpoint-tmp*)
            preservation_policy=policy,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.PyGrainCheckpointHandler(),
            },
        )

    # ---- queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---- save
    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state: Any, *, data_iterator=None, force: bool = False) -> bool:
        """Saves (asynchronously) when `step` is a multiple of `save_every` or `force`."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        return bool(saved)

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # ---- restore
    def restore(self, target: Any, *, data_iterator=None, step: int | None = None) -> tuple[Any, int]:
        """Restores onto `target` (ShapeDtypeStructs with shardings, or arrays) -> (state, step).

        Without `step`, tries the newest step and falls back to older ones if it is unreadable
        (the unreadable step directory is moved aside to `<dir>/<step>.corrupt`). The grain
        `data_iterator`, if given, is positioned where it was at that step.
        """
        if not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory {self.directory}")
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
            return self._restore_step(step, target, data_iterator), step
        errors, failed = [], []
        for s in reversed(steps):
            try:
                restored = self._restore_step(s, target, data_iterator)
            except Exception as e:  # unreadable: try the previous one
                errors.append(f"step {s}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                failed.append(s)
                log.warning("checkpoint step %d in %s is unreadable (%s); trying an older one", s, self.directory, e)
                continue
            if failed:  # only when an older step reads do we call the newer ones corrupt
                log.warning("restored step %d after skipping unreadable steps: %s", s, "; ".join(errors))
                for f in failed:
                    self._move_aside(f)
            return restored, s
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} for this target (a different model "
            f"config?); tried: " + "; ".join(errors)
        )

    def _restore_step(self, step: int, target: Any, data_iterator) -> Any:
        target = jax.tree_util.tree_map(_as_abstract, target)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            if not (self.directory / str(step) / "data").exists():
                raise CheckpointError(f"checkpoint step {step} has no data-iterator state")
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        _refuse_placeholders(state, step)
        bad = [
            jax.tree_util.keystr(path)
            for (path, x), t in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree_util.tree_leaves(target))
            if tuple(x.shape) != tuple(t.shape)
        ]
        if bad:
            raise CheckpointError(f"step {step}: shapes differ from the target at {bad[:5]}")
        return state

    def _move_aside(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        if src.exists():
            dst = self.directory / f"{step}.corrupt"
            if dst.exists():
                paths.rmtree(dst)
            src.rename(dst)
        self._manager.reload()


def _refuse_placeholders(tree, step: int) -> None:
    """A partial restore hands back the target's ShapeDtypeStructs where the checkpoint has no array: refuse
    that, so that no caller ever gets placeholders for parameters."""
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        raise CheckpointError(f"step {step} holds no {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                              f"({len(missing)} arrays): a checkpoint of another model config?")


def _absolute(directory):
    """Orbax reads local checkpoints by absolute path only (a relative one finds no metadata)."""
    directory = paths.as_path(directory)
    return directory if paths.is_remote(directory) else directory.absolute()


def restore_subtree(directory, target: Mapping[str, Any], step: int | None = None) -> tuple[Any, int]:
    """Only the named top-level fields of a saved `state` item, e.g. `{"params": abstract_params}`.

    Reads nothing else (no optimizer state): for samplers and warm starts. `target` holds
    ShapeDtypeStructs (with the shardings to place the arrays on). Without `step`, the newest
    readable step. Returns (subtree, step); raises `CheckpointError` naming what was tried.
    """
    directory = _absolute(directory)
    steps = sorted(int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        raise CheckpointError(f"no checkpoints in {directory}")
    if step is not None and step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory} (have {steps})")
    target = jax.tree_util.tree_map(_as_abstract, dict(target))
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    errors = []
    for s in ([step] if step is not None else reversed(steps)):
        try:
            with ocp.PyTreeCheckpointer() as reader:
                out = reader.restore(directory / str(s) / "state", args=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # unreadable: try the previous one
            errors.append(f"step {s}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            continue
        try:
            _refuse_placeholders(out, s)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        bad = [jax.tree_util.keystr(p) for (p, x), t in zip(jax.tree_util.tree_leaves_with_path(out),
                                                          jax.tree_util.tree_leaves(target))
               if tuple(x.shape) != tuple(t.shape)]
        if bad:
            errors.append(f"step {s}: shapes differ from the target at {bad[:5]}")
            continue
        if errors:  # an older step than the newest: say which one, and why
            warnings.warn(f"{directory}: loaded step {s}, not the newer {'; '.join(errors)}", UserWarning, stacklevel=2)
        return out, s
    raise CheckpointError(f"no readable checkpoint in {directory} for this target; tried: " + "; ".join(errors))


def saved_fields(directory, step: int) -> dict[str, int]:
    """Top-level fields of the `state` saved at `step` -> their number of arrays (0: None or empty).
    Raises `CheckpointError` when the step's metadata cannot be read (a checkpoint cut short)."""
    try:
        with ocp.PyTreeCheckpointer() as reader:
            meta = reader.metadata(_absolute(directory) / str(step) / "state")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        return {k: len(jax.tree_util.tree_leaves(v)) for k, v in dict(tree).items()}
    except Exception as e:  # noqa: BLE001  (missing or truncated metadata, whatever the reader raises)
        raise CheckpointError(f"step {step}: unreadable metadata ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


def newest_saved_fields(directory, steps) -> dict[str, int]:
    """`saved_fields` of the newest of `steps` whose metadata reads ({} if none does)."""
    for step in sorted(steps, reverse=True):
        try:
            return saved_fields(directory, step)
        except CheckpointError:
            continue
    return {}


def _as_abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore target for another (or this) mesh."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings
    )


def check_finite(metrics: Mapping[str, Any], step: int, keys=("loss", "grad_norm")) -> None:
    """Raises NonFiniteError naming the step and value when a metric is NaN or inf."""
    for k in keys:
        if k in metrics:
            v = float(np.asarray(jax.device_get(metrics[k])))
            if not math.isfinite(v):
                raise NonFiniteError(
                    f"{k} is {v} at step {step}; stopping. The last good checkpoint is kept "
                    f"(lower the learning rate or check the data, then resume)"
                )


class PreemptionHandler:
    """Context manager: SIGTERM (a preemption, `kill`) and SIGINT (Ctrl-C) set `.requested` instead of
    killing, so that the loop saves a checkpoint and stops. A second Ctrl-C raises KeyboardInterrupt at
    once (no checkpoint)."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name = ""  # the first signal received, e.g. "SIGINT"
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): stopping at once")
        self.signal_name = self.signal_name or signal.Signals(signum).name
        log.warning("received %s: will checkpoint and stop (Ctrl-C again stops at once, without a checkpoint)",
                    signal.Signals(signum).name)
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def should_stop(self) -> bool:
        """The flag, agreed across processes (any process preempted -> all stop)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
        return bool(np.asarray(flags).any())


def global_norm(tree) -> float:
    """The global L2 norm of a pytree of (sharded) arrays, as a host float (every process calls it)."""
    return float(jax.device_get(jax.jit(optax.tree.norm)(tree)))


class DivergenceGuard:
    """Tells, step by step, whether a run diverged, against the run's own history.

    A step diverges when its loss, grad_norm or param_norm is NaN or inf (`NonFiniteError`), or
    (`DivergenceError`) when
      - its loss is above `loss_factor` x the median loss of the previous `window` steps of this run
        (once `min_history` steps are known; the median is taken as at least `loss_floor`, since a
        loss that small rising tenfold is no blow-up), or
      - the global norm of the parameters after it (`param_norm`) is above `param_factor` x
        `start_param_norm`, their norm at the start of this run (a resume: of the restored ones).
    A factor of 0 turns its check off. `check` takes the steps in order; `last` holds the newest
    step's loss and param_norm (what `record_health` writes for a checkpoint of that step).
    """

    def __init__(self, *, loss_factor: float, param_factor: float, start_param_norm: float,
                 window: int = 100, min_history: int = 10, loss_floor: float = 1.0):
        self.loss_factor, self.param_factor = float(loss_factor), float(param_factor)
        self.start_param_norm = float(start_param_norm)
        self.min_history, self.loss_floor = int(min_history), float(loss_floor)
        self.history = collections.deque(maxlen=int(window))
        self.last: dict[str, float] = {}
        self.failed_step: int | None = None  # the step that diverged

    def check(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Raises NonFiniteError / DivergenceError naming the step, the value and the threshold."""
        values = {k: float(np.asarray(jax.device_get(metrics[k])))
                  for k in ("loss", "grad_norm", "param_norm") if k in metrics}
        self.last = {k: values[k] for k in ("loss", "param_norm") if k in values}
        self.failed_step = step  # until the checks below pass
        for k, v in values.items():
            if not math.isfinite(v):
                raise NonFiniteError(f"{k} is {v} at step {step}")
        loss = values["loss"]
        if self.loss_factor and len(self.history) >= self.min_history:
            median = max(float(np.median(self.history)), self.loss_floor)
            if loss > self.loss_factor * median:
                raise DivergenceError(
                    f"loss {loss:.4g} at step {step} is over {self.loss_factor:g} x {median:.4g}, the median loss "
                    f"of the {len(self.history)} steps before (config.train.divergence_loss_factor)")
        norm = values.get("param_norm")
        if self.param_factor and norm is not None and norm > self.param_factor * self.start_param_norm:
            raise DivergenceError(
                f"param_norm {norm:.4g} at step {step} is over {self.param_factor:g} x {self.start_param_norm:.4g}, "
                f"the parameters' norm at the start of this run (config.train.divergence_param_factor)")
        self.history.append(loss)
        self.failed_step = None


def read_health(path) -> dict[int, dict]:
    """The health record beside a stage's checkpoints (W/<stage>/health.json): step -> {loss, param_norm,
    healthy, checkpoint}; {} when there is none."""
    path = paths.as_path(path)
    if not path.exists():
        return {}
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def record_health(path, step: int, values: Mapping[str, float], *, healthy: bool = True,
                  checkpoint: bool = True) -> None:
    """Adds `step` to the health record: its loss and param_norm (`DivergenceGuard.last`), whether it
    passed the guard, and whether a checkpoint of it was saved. Process 0 writes; the others return."""
    if jax.process_index() != 0:
        return
    path = paths.as_path(path)
    record = read_health(path)
    record[int(step)] = {**{k: float(v) for k, v in values.items()}, "healthy": bool(healthy),
                         "checkpoint": bool(checkpoint)}
    text = json.dumps({str(k): record[k] for k in sorted(record)}, indent=1) + "\n"
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # never a half-written record (replace: overwrites on buckets too)


def diverged_message(stage: str, cause: str, good_step: int | None, record: Mapping[int, dict], *,
                     workdir, checkpoints, lr: float) -> str:
    """One line for a run stopped by the guard: the cause, the last good checkpoint (or that there is
    none) and the command that resumes from it at a lower learning rate."""
    command = (f"muse-jax train --workdir {workdir} --stage {stage} --config <the same config and overrides> "
               f"--config.train.lr=<below the {lr:g} it diverged with>")
    if good_step is None:
        return (f"{stage} diverged: {cause}; no checkpoint was saved before it, so there is no last good "
                f"checkpoint. Retrain from scratch with a lower learning rate (the same command starts over "
                f"from step 0): {command}")
    r = record.get(good_step, {})
    health = ""
    if "loss" in r:
        health = f", loss {r['loss']:.4g}" + (f", param_norm {r['param_norm']:.4g}" if "param_norm" in r else "")
    return (f"{stage} diverged: {cause}; stopped, and no checkpoint after step {good_step} was saved. "
            f"The last good checkpoint: step {good_step} ({checkpoints}/{good_step}{health}). Resume from it "
            f"with a lower learning rate: {command}")
