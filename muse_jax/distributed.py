"""Multi-host start-up: `jax.distributed.initialize` from config or environment, and a watchdog.

How to use (first thing in a command, before any JAX computation):
    info = distributed.initialize(config)          # no-op for a single process
    with distributed.Watchdog(config.distributed.step_timeout_s) as dog:
        for step in ...:
            ...; dog.kick(step)                    # no kick for step_timeout_s -> clear exit
    if distributed.is_main_process(): write logs/images

Where the process layout comes from (`config.distributed.cluster`):
  "auto"      explicit values if any (config, then MUSE_COORDINATOR_ADDRESS, MUSE_NUM_PROCESSES,
              MUSE_PROCESS_ID, MUSE_LOCAL_DEVICE_IDS), else a SLURM job step with several
              tasks, else a Cloud TPU pod (TPU_WORKER_HOSTNAMES / MEGASCALE_* set), else one process.
  "explicit"  coordinator address, process count and index must be given (config or MUSE_*).
  "slurm"     SLURM_* variables (jax picks the coordinator: first node of the step).
  "tpu"       plain `jax.distributed.initialize()`: Cloud TPU VMs describe the pod themselves.
  "none"      never initialize (one process).

Failure handling: JAX's coordination service exchanges heartbeats; when a process dies the
others abort within `heartbeat_timeout_s` with "Terminating process because the JAX distributed
service detected fatal errors ... another task died". A process that hangs while alive (its
heartbeat thread still runs) is caught by `Watchdog`, which exits with EXIT_WATCHDOG and a message
naming the step. Restart all processes to resume from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXIT_WATCHDOG = 75  # os.EX_TEMPFAIL: "try again" (restart the job to resume)
CLUSTERS = ("auto", "explicit", "slurm", "tpu", "none")
_ENV = {
    "coordinator_address": "MUSE_COORDINATOR_ADDRESS",
    "num_processes": "MUSE_NUM_PROCESSES",
    "process_id": "MUSE_PROCESS_ID",
    "local_device_ids": "MUSE_LOCAL_DEVICE_IDS",
}
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the job: `method` and the keyword arguments for jax."""

    method: str  # "single", "explicit", "slurm" or "tpu"
    kwargs: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job after `initialize`."""

    method: str
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def _section(config) -> Mapping[str, Any]:
    if config is None:
        return {}
    section = config.get("distributed") if hasattr(config, "get") else getattr(config, "distributed", None)
    if section is None:
        return {}
    return dict(section.items()) if hasattr(section, "items") else dict(vars(section))


def _int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"distributed.{name}={value!r}: expected an integer") from None


def resolve(config=None, environ: Mapping[str, str] | None = None) -> Plan:
    """The start-up plan from `config.distributed` and the environment (pure: starts nothing)."""
    env = os.environ if environ is None else environ
    sec = _section(config)
    cluster = sec.get("cluster", "auto") or "auto"
    if cluster not in CLUSTERS:
        raise ValueError(f"distributed.cluster={cluster!r}: expected one of {CLUSTERS}")
    timeouts = {
        "initialization_timeout": _int("initialization_timeout_s", sec.get("initialization_timeout_s", 300)),
        "heartbeat_timeout_seconds": _int("heartbeat_timeout_s", sec.get("heartbeat_timeout_s", 100)),
        "shutdown_timeout_seconds": _int("shutdown_timeout_s", sec.get("shutdown_timeout_s", 300)),
    }
    if cluster == "none":
        return Plan("single", {})

    explicit = {}
    unset = {"coordinator_address": "", "num_processes": 0, "process_id": -1, "local_device_ids": ""}
    for key, var in _ENV.items():
        value = sec.get(key, unset[key])
        if value is None or value == unset[key]:
            value = env.get(var) or None
        if value is not None:
            explicit[key] = value
    if "num_processes" in explicit:
        explicit["num_processes"] = _int("num_processes", explicit["num_processes"])
    if "process_id" in explicit:
        explicit["process_id"] = _int("process_id", explicit["process_id"])
    if "local_device_ids" in explicit:
        ids = explicit["local_device_ids"]
        explicit["local_device_ids"] = (
            [int(i) for i in str(ids).split(",") if i.strip()] if isinstance(ids, str) else list(ids)
        )

    want = ("coordinator_address", "num_processes", "process_id")
    if cluster == "explicit" or (cluster == "auto" and any(k in explicit for k in want)):
        missing = [f"distributed.{k} (or {_ENV[k]})" for k in want if k not in explicit]
        if missing:
            raise ValueError(f"explicit multi-process start-up needs {', '.join(missing)}; got {explicit}")
        n, i = explicit["num_processes"], explicit["process_id"]
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"distributed: process_id {i} is not in [0, num_processes={n})")
        if n == 1:
            return Plan("single", {})
        return Plan("explicit", {**explicit, **timeouts})

    slurm_tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if cluster == "slurm" or (cluster == "auto" and "SLURM_JOB_ID" in env and slurm_tasks and int(slurm_tasks) > 1):
        needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
        missing = [v for v in needed if v not in env]
        if missing:
            raise ValueError(
                f"distributed.cluster=slurm but {missing} are not set: start the processes with `srun` "
                f"inside the allocation (see launch/gpu_slurm.sbatch)"
            )
        return Plan("slurm", {"cluster_detection_method": "slurm", **explicit, **timeouts})

    if cluster == "tpu" or (cluster == "auto" and any(env.get(v) for v in _TPU_ENV)):
        return Plan("tpu", dict(timeouts))
    return Plan("single", {})


_initialized: ProcessInfo | None = None


def initialize(config=None, environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Joins the multi-process job described by `config.distributed`/environment (idempotent)."""
    global _initialized
    if _initialized is not None:
        return _initialized
    plan = resolve(config, environ)
    import jax

    if plan.method != "single":
        log.info("jax.distributed.initialize(%s) [%s]", dict(plan.kwargs), plan.method)
        try:
            jax.distributed.initialize(**plan.kwargs)
        except RuntimeError as e:
            if "only be called once" not in str(e):
                raise RuntimeError(
                    f"multi-process start-up ({plan.method}, {dict(plan.kwargs)}) failed: {e}. Are all "
                    f"processes started, with the same coordinator address and process count?"
                ) from e
    _initialized = ProcessInfo(
        method=plan.method,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
    )
    if _initialized.process_count > 1:
        _install_fail_fast(_initialized)
        log.info("process %d of %d, %d local / %d global devices",
                 _initialized.process_index, _initialized.process_count,
                 _initialized.local_devices, _initialized.global_devices)
    return _initialized


def _who(info: ProcessInfo | None = None) -> str:
    info = info or _initialized
    return "this process" if info is None else f"process {info.process_index} of {info.process_count}"


def exit_now(code: int, reason: str = "") -> None:
    """Exits at once with `code` in a multi-process job (no-op with one process or code 0).

    A normal interpreter exit waits (up to shutdown_timeout_s) for every other process to shut
    down too, while they wait in a collective for this one: a failing process must leave at
    once so the coordination service tells the others.
    """
    if code == 0 or _initialized is None or _initialized.process_count == 1:
        return
    sys.stderr.write(
        f"muse-jax: {_who()} failed{': ' + reason if reason else ''}; exiting now (code {code}) so the other "
        f"processes stop too. Restart all processes to resume from the last checkpoint.\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def _install_fail_fast(info: ProcessInfo) -> None:
    """An uncaught exception in a multi-process job: print it, then `exit_now(1)`."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        exit_now(1, f"uncaught {kind.__name__}")

    sys.excepthook = hook


def is_main_process() -> bool:
    """True on process 0 (the one that logs, writes images and prints)."""
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_process_flag(flag: bool) -> bool:
    """Process 0's `flag` on every process (a collective: every process calls it; no-op with one)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def sum_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """`counts` summed over processes, key by key (a collective: every process calls it; no-op with one).

    Processes may hold different keys: each one's counts travel as JSON (padded to the longest),
    so the result has the union of the keys on every process: process 0's in its order, then new ones.
    """
    import jax

    if jax.process_count() == 1:
        return {k: int(v) for k, v in counts.items()}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps({k: int(v) for k, v in counts.items()}).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
    padded = np.zeros(longest, np.uint8)
    padded[:raw.size] = raw
    total: dict[str, int] = {}
    for row in np.asarray(multihost_utils.process_allgather(padded)):
        for k, v in json.loads(row.tobytes().rstrip(b"\0")).items():
            total[k] = total.get(k, 0) + v
    return total


class Watchdog:
    """Exits the process with a clear message when `kick` is not called for `timeout_s` seconds.

    Guards against a peer that hangs (or a collective that never completes): without it the
    other processes would wait in the collective forever. `timeout_s <= 0` disables it. The
    first interval may be longer (`first_timeout_s`, default 3x) to allow for compilation.
    """

    def __init__(self, timeout_s: float, *, first_timeout_s: float | None = None, what: str = "training step",
                 exit_code: int = EXIT_WATCHDOG):
        self.timeout_s = float(timeout_s or 0)
        self.first_timeout_s = float(first_timeout_s if first_timeout_s is not None else 3 * self.timeout_s)
        self.what = what
        self.exit_code = exit_code
        self._step = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None

    def kick(self, step: int | None = None) -> None:
        """Records progress (call after each completed step)."""
        self._step = step
        self._last = time.monotonic()

    def _limit(self) -> float:
        return self.first_timeout_s if self._step is None else self.timeout_s

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, max(0.05, self.timeout_s / 10))):
            idle = time.monotonic() - self._last
            if idle > self._limit():
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        who = _who()
        after = "the first step" if self._step is None else f"step {self._step}"
        sys.stderr.write(
            f"\nmuse-jax watchdog: {who}: no {self.what} completed for {idle:.0f}s after {after} "
            f"(limit {self._limit():.0f}s). Another process probably died or hung, so collectives "
            f"cannot complete. Exiting with code {self.exit_code}; restart all processes to resume "
            f"from the last checkpoint.\n"
        )
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(self.exit_code)

    def __enter__(self) -> Watchdog:
        if self.timeout_s > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="muse-jax-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
