"""One writer per training folder: a LOCK file in W/<stage> (W/tokenizer[/<name>]) names the run training it.

How to use (before anything is written into the folder; every process of the job calls both):
    with lock.hold(out_dir, "the base stage", timeout_s=lock.timeout_s(config)):
        lock.check_writable(out_dir / "checkpoints")      # before compiling: one line if it cannot be written
        ... train, write checkpoints ...                  # the lock is released however this ends

The lock file (JSON) names its holder: host, pid, start time (UTC), the job (a SLURM job, or how many
processes) and a heartbeat (Unix time) that a daemon thread rewrites every `timeout_s / 10` seconds.
With several processes the lock belongs to the job: process 0 takes it, the others learn the outcome,
so that a refusal stops every process with the same one-line ValueError.

A lock is stale, and taken over with a warning, when its holder runs on this host and its pid is
gone (or is this very process, left over from an earlier run with the same pid), or when its
heartbeat is older than `timeout_s` (the only check for a holder on another host).
Folders may be local or bucket URIs (gs://, muse_jax/paths.py): a local lock is created atomically
(a hard link of a complete file); on a bucket it is written when absent and read back after a
moment, which leaves a small window in which two runs started together may both go on.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import numpy as np

from muse_jax import distributed, paths

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
DEFAULT_TIMEOUT_S = 600.0  # a holder whose heartbeat is this old is taken to be dead
_HELD: set[str] = set()  # tokens of the locks this process holds now


def timeout_s(config) -> float:
    """`config.distributed.lock_timeout_s` if the config has it, else DEFAULT_TIMEOUT_S."""
    section = config.get("distributed") if config is not None and hasattr(config, "get") else None
    value = section.get("lock_timeout_s", DEFAULT_TIMEOUT_S) if section is not None else DEFAULT_TIMEOUT_S
    return float(value)


def _process_count() -> int:
    import jax

    return jax.process_count()


def _job() -> str:
    """What the lock belongs to: a SLURM job, or this process (with how many processes the job has)."""
    n = _process_count()
    if os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {os.environ['SLURM_JOB_ID']}, {n} process{'es' if n > 1 else ''}"
    return f"a job of {n} processes" if n > 1 else "a single process"


def _os_error(e: Exception) -> str:
    """An OSError as "Permission denied (PATH)"; another error (e.g. from a bucket's client) as "Type: message"."""
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror} ({e.filename})"
    return str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"


def _pid_alive(pid: int) -> bool:
    """True if `pid` runs on this host (a zombie, which holds no files, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read(path) -> dict | None:
    """The lock's record; None if there is no lock; {} if it cannot be parsed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) and "token" in record else {}


def _create(path, text: str) -> bool:
    """Writes `text` to `path` unless it exists; True if this call created it."""
    token = json.loads(text)["token"]
    if not paths.is_remote(path):
        tmp = path.with_name(f".{path.name}.{token}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, path)  # atomic, and fails if the lock exists: readers never see half a file
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links (e.g. gcsfuse): as for a bucket below
            pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.exists():
        return False
    path.write_text(text)
    time.sleep(0.5)  # a run started at the same moment may have written it too: the last write wins
    return (_read(path) or {}).get("token") == token


def _replace(path, text: str) -> None:
    """Overwrites `path` with `text` at once (temp + rename locally; a bucket object is written whole)."""
    if paths.is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _when(record: dict) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')} since {record.get('started')} ({record.get('job')})"


def _stale(record: dict, timeout: float) -> str:
    """Why the holder in `record` is dead ("" if it may be alive)."""
    if record["token"] in _HELD:
        return ""
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid == os.getpid():
            return f"pid {pid} is this process, which does not hold it (left over from an earlier run)"
        if not _pid_alive(pid):
            return f"pid {pid} is no longer running on this host"
    age = time.time() - float(record.get("heartbeat", 0))
    if age > timeout:
        return f"its heartbeat is {age:.0f}s old (timeout {timeout:.0f}s)"
    return ""


class Lock:
    """A lock this process holds on `folder` (W/<stage>), with its heartbeat thread; `release` ends it."""

    def __init__(self, folder, what: str, timeout: float):
        self.folder = paths.as_path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.timeout = float(timeout)
        self.record = {
            "host": socket.gethostname(), "pid": os.getpid(), "job": _job(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "heartbeat": time.time(), "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def acquire(cls, folder, what: str, timeout: float = DEFAULT_TIMEOUT_S) -> Lock:
        """Takes the lock on `folder` (created if needed), taking over a stale one; a ValueError (one line)
        names the live holder, or the OS error if the folder cannot be written."""
        lock = cls(folder, what, timeout)
        try:
            lock.folder.mkdir(parents=True, exist_ok=True)
            for _ in range(3):  # a stale lock removed, or a lock released meanwhile: try again
                if _create(lock.path, json.dumps(lock.record)):
                    lock._start_heartbeat()
                    return lock
                record = _read(lock.path)
                if record is None:
                    continue
                if not record:
                    raise ValueError(f"{what} in {lock.folder} is locked by {lock.path}, which cannot be read; "
                                     f"if no run is training it, delete {lock.path}")
                why = _stale(record, lock.timeout)
                if not why:
                    raise ValueError(
                        f"{what} in {lock.folder} is being trained by {_when(record)}; wait for that run to end or "
                        f"stop it. If it is dead, delete {lock.path} (a lock is taken over once its pid is gone "
                        f"from this host or its heartbeat is {lock.timeout:.0f}s old)")
                log.warning("taking over the lock %s of %s: %s", lock.path, _when(record), why)
                if (_read(lock.path) or {}).get("token") == record["token"]:
                    lock.path.unlink(missing_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write the lock {lock.path}: {_os_error(e)}") from None
        raise ValueError(f"{what} in {lock.folder}: could not take {lock.path} (other runs keep taking it)")

    def _start_heartbeat(self) -> None:
        _HELD.add(self.record["token"])
        self._thread = threading.Thread(target=self._beat, name="muse-jax-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Rewrites the heartbeat every timeout/10 seconds while the lock is this run's."""
        while not self._stop.wait(max(0.1, self.timeout / 10)):
            try:
                record = _read(self.path)
                if (record or {}).get("token") != self.record["token"]:
                    log.error("%s: the lock %s was taken over (%s); this run should stop", self.what, self.path,
                              _when(record) if record else "deleted")
                    return
                self.record["heartbeat"] = time.time()
                _replace(self.path, json.dumps(self.record))
            except OSError as e:  # e.g. a bucket briefly unreachable: try again at the next beat
                log.warning("could not renew the lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _HELD.discard(self.record["token"])
        try:
            record = _read(self.path)
            if record and record.get("token") == self.record["token"]:
                self.path.unlink(missing_ok=True)
            else:
                log.warning("%s: the lock %s is no longer this run's; left as it is", self.what, self.path)
        except OSError as e:
            log.warning("could not delete the lock %s: %s", self.path, e)


def _broadcast_text(text: str) -> str:
    """Process 0's `text` on every process (a collective: every process calls it; no-op with one)."""
    if _process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    raw = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(raw.size)))
    padded = np.zeros(size, np.uint8)
    padded[:min(size, raw.size)] = raw[:size]
    return np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode()


@contextlib.contextmanager
def hold(folder, what: str, *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Holds the lock on `folder` for the job while the block runs (process 0 takes it; every process calls
    this); a held lock refuses with the same one-line ValueError on every process."""
    lock, error = None, ""
    if distributed.is_main_process():
        try:
            lock = Lock.acquire(folder, what, timeout_s)
        except ValueError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001  (e.g. a bucket's client: every process must learn it)
            error = f"cannot take the lock in {folder}: {_os_error(e)}"
    if distributed.main_process_flag(bool(error)):
        raise ValueError(_broadcast_text(error))
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def check_writable(folder) -> None:
    """Creates `folder` and a probe file in it, then deletes the probe; a ValueError (one line) names the folder
    and the OS error. Every process checks (each writes its checkpoint shards); all refuse if one cannot."""
    folder = paths.as_path(folder)
    error = ""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001  (an OSError, or a bucket client's error)
        error = f"cannot write checkpoints into {folder}: {_os_error(e)}"
    if _process_count() > 1:
        failing = distributed.sum_counts({"failing": int(bool(error))})["failing"]
        first = _broadcast_text(error)
        if failing and not error:
            error = first or f"cannot write checkpoints into {folder} from {failing} of the processes (see their logs)"
    if error:
        raise ValueError(error)
