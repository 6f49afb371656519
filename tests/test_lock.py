"""One writer per stage: W/<stage>/LOCK refuses a second run, stale locks are taken over, unwritable
checkpoint folders are refused before anything compiles."""
import json
import logging
import os
import socket
import subprocess
import time
import uuid

import pytest
from test_train import _data, tiny_config

from muse_jax.config import load_config
from muse_jax.training import lock as lock_lib
from muse_jax.training import loop, train_tokenizer


def _write_lock(folder, *, pid, host=None, heartbeat_age=0.0):
    """A lock file as another run would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": host or socket.gethostname(), "pid": pid, "job": "a single process",
              "started": "2026-12-06 07:10:00 UTC", "heartbeat": time.time() - heartbeat_age,
              "token": uuid.uuid4().hex}
    (folder / lock_lib.LOCK_FILE).write_text(json.dumps(record))
    return record


def _holder(path):
    return json.loads(path.read_text())


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid():
    proc = subprocess.Popen(["sleep", "60"])
    proc.kill()
    proc.wait()  # reaped: the pid is gone
    return proc.pid


def test_a_live_holder_refuses_a_second_run(tmp_path, live_pid):
    _write_lock(tmp_path / "base", pid=live_pid)
    with pytest.raises(ValueError) as e:
        with lock_lib.hold(tmp_path / "base", "the base stage"):
            pytest.fail("acquired a held lock")
    msg = str(e.value)
    assert f"pid {live_pid} on host {socket.gethostname()}" in msg and "since 2026-12-06 07:10" in msg
    assert f"delete {tmp_path / 'base' / 'LOCK'}" in msg and "\n" not in msg
    assert _holder(tmp_path / "base" / "LOCK")["pid"] == live_pid  # left as it was


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    _write_lock(tmp_path / "base", pid=_dead_pid())
    with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
        with lock_lib.hold(tmp_path / "base", "the base stage") as held:
            assert _holder(held.path)["pid"] == os.getpid()
    assert "no longer running on this host" in caplog.text
    assert not (tmp_path / "base" / "LOCK").exists()


def test_another_hosts_lock_goes_by_its_heartbeat(tmp_path, caplog):
    folder = tmp_path / "superres"
    _write_lock(folder, pid=1, host="elsewhere", heartbeat_age=60)
    with pytest.raises(ValueError, match="pid 1 on host elsewhere"):
        lock_lib.Lock.acquire(folder, "the superres stage", timeout=600)
    _write_lock(folder, pid=1, host="elsewhere", heartbeat_age=3600)
    with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
        held = lock_lib.Lock.acquire(folder, "the superres stage", timeout=600)
    assert "heartbeat is 3600s old" in caplog.text and _holder(held.path)["host"] == socket.gethostname()
    held.release()
    assert not held.path.exists()


def test_the_holder_renews_its_heartbeat_and_refuses_a_second_lock_in_this_process(tmp_path):
    held = lock_lib.Lock.acquire(tmp_path, "the base stage", timeout=0.5)  # a heartbeat every 0.1 s
    try:
        first = _holder(held.path)["heartbeat"]
        deadline = time.time() + 5  # a few beats; a busy machine may delay the thread
        while _holder(held.path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.1)
        assert _holder(held.path)["heartbeat"] > first
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):  # the same pid, but held: not stale
            lock_lib.Lock.acquire(tmp_path, "the base stage", timeout=600)
    finally:
        held.release()
    assert not held.path.exists()
    # A lock naming this pid that this process does not hold was left by an earlier run: taken over.
    _write_lock(tmp_path, pid=os.getpid())
    lock_lib.Lock.acquire(tmp_path, "the base stage").release()


def test_bucket_style_create_without_hard_links(tmp_path, monkeypatch, live_pid):
    monkeypatch.setattr(lock_lib.paths, "is_remote", lambda path: True)  # the gs:// branch, on a local folder
    held = lock_lib.Lock.acquire(tmp_path / "a", "the base stage")
    assert _holder(held.path)["token"] == held.record["token"]
    held.release()
    _write_lock(tmp_path / "b", pid=live_pid)
    with pytest.raises(ValueError, match=f"pid {live_pid}"):
        lock_lib.Lock.acquire(tmp_path / "b", "the base stage")


def _no_compile(monkeypatch):
    """Fails the test if train_stage gets as far as building the mesh (and compiling)."""
    def refuse(*args, **kwargs):
        raise AssertionError("train_stage went on past its checks")
    monkeypatch.setattr(loop.partitioning, "make_mesh", refuse)


def test_an_unwritable_stage_or_checkpoint_folder_is_refused_before_compiling(tmp_path, monkeypatch):
    _no_compile(monkeypatch)
    cfg = tiny_config("--config.train.num_steps=2")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "base").write_text("not a folder")
    with pytest.raises(ValueError, match=r"cannot write the lock .*a/base/LOCK: File exists") as e:
        loop.train_stage(cfg, tmp_path / "a", "base", data=_data(cfg), quiet=True)
    assert "\n" not in str(e.value)

    checkpoints = tmp_path / "b" / "base" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.chmod(checkpoints, 0o500)
    if os.access(checkpoints, os.W_OK):  # root: chmod does not stop it, so make the folder a file instead
        os.chmod(checkpoints, 0o700)
        checkpoints.rmdir()
        checkpoints.write_text("not a folder")
    try:
        with pytest.raises(ValueError, match=f"cannot write checkpoints into {checkpoints}: ") as e:
            loop.train_stage(cfg, tmp_path / "b", "base", data=_data(cfg), quiet=True)
    finally:
        if checkpoints.is_dir():
            os.chmod(checkpoints, 0o700)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "b" / "base" / "LOCK").exists()  # released on the refusal


def test_a_tokenizer_being_trained_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tokenizer.partitioning, "make_mesh", lambda *a, **k: pytest.fail("went on"))
    cfg = load_config("shapes")
    with lock_lib.hold(tmp_path / "tokenizer", "the shared tokenizer"):
        with pytest.raises(ValueError, match="the shared tokenizer in .* is being trained by pid"):
            train_tokenizer.train(cfg, tmp_path, quiet=True)
    assert os.listdir(tmp_path / "tokenizer") == []


@pytest.mark.usefixtures("restore_jax_cache_config")
def test_a_second_train_stage_is_refused_and_writes_nothing(tmp_path):
    cfg = tiny_config("--config.train.num_steps=2", "--config.train.checkpoint_every=2")
    with lock_lib.hold(tmp_path / "base", "the base stage"):
        with pytest.raises(ValueError, match=f"the base stage in {tmp_path / 'base'} is being trained by pid"):
            loop.train_stage(cfg, tmp_path, "base", data=_data(cfg), quiet=True)
        assert os.listdir(tmp_path / "base") == ["LOCK"]
    assert os.listdir(tmp_path / "base") == []
    r = loop.train_stage(cfg, tmp_path, "base", data=_data(cfg), quiet=True)
    assert r["final_step"] == 2 and r["status"] == "done"
    assert (tmp_path / "base" / "checkpoints" / "2").is_dir() and not (tmp_path / "base" / "LOCK").exists()
