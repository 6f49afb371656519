"""What the processes of one job must agree on: the sentencepiece vocabulary, skip totals, and hparams.

Two local processes (launch/local.sh: jax.distributed on 127.0.0.1, one CPU device each) with
different captions and different skipped records call the code the training loop calls on one fresh
workdir: both must tokenize a prompt to the same ids from the one file process 0 wrote, and both must
report the skip counts summed over the processes. One process: the hyper-parameters must reach the
writer's own event file, which must read to its end.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import time

import conftest
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "launch" / "local.sh"
PROMPT = "a cat looking to the side"

WORKER = r'''
import json, pathlib, sys
from muse_jax import distributed
info = distributed.initialize({"distributed": {"initialization_timeout_s": 60, "heartbeat_timeout_s": 20}})
from muse_jax import config as config_lib, workdir as workdir_lib
from muse_jax.data import text as text_lib
from muse_jax.training import loop

workdir, out, prompt = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
trained = []
train = text_lib.train_sentencepiece
def counting_train(*args, **kwargs):
    trained.append(1)
    return train(*args, **kwargs)
text_lib.train_sentencepiece = counting_train

# each process sees its own share of captions: with a vocabulary each, the prompt's ids differ
if info.process_index == 0:
    words = ["cat", "dog", "looking", "side", "sitting", "left", "right", "small", "furry"]
else:
    words = ["red", "square", "blue", "circle", "green", "triangle", "top", "bottom", "large"]
captions = [f"a {a} {b} to the {c}" for a in words for b in words for c in words]
cfg = config_lib.load_config("shapes").text
tok = workdir_lib.text_tokenizer(workdir, cfg, captions=lambda: captions)
again = workdir_lib.text_tokenizer(workdir, cfg, captions=lambda: captions)  # W has one now: loaded
ids, mask = tok([prompt])
(out / f"text_{info.process_index}.json").write_text(json.dumps({
    "ids": ids[0][mask[0]].tolist(), "trained": len(trained), "same_again": again.model_proto == tok.model_proto,
    "proto_is_file": tok.model_proto == (workdir / "text" / "spm.model").read_bytes()}))

class Skipping:  # a data iterator that skipped records (as image_text.Batches counts them)
    skipped = {"truncated_tar": 1} if info.process_index == 0 else {"corrupt_image": 14, "truncated_tar": 2}
    def metrics(self):
        return {f"data/skipped/{k}": v for k, v in self.skipped.items()}

(out / f"skipped_{info.process_index}.json").write_text(json.dumps({
    "skipped": loop.skipped_records(Skipping()), "metrics": distributed.sum_counts(Skipping().metrics())}))

# The stage lock belongs to the job: a held one refuses both processes with process 0's message; a free
# one is taken once (by process 0, naming the job) and released when the block ends.
from muse_jax.training import lock as lock_lib
try:
    with lock_lib.hold(workdir / "held", "the base stage"):
        refused = ""
except ValueError as e:
    refused = str(e)
with lock_lib.hold(workdir / "free", "the base stage"):
    holder = json.loads((workdir / "free" / "LOCK").read_text())
    distributed.sync("lock read")
distributed.sync("lock released")  # process 0 released it when its block ended
released = not (workdir / "free" / "LOCK").exists()
(out / f"lock_{info.process_index}.json").write_text(json.dumps({
    "refused": refused, "job": holder["job"], "pid": holder["pid"], "released": released}))
'''


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """WORKER run by 2 processes on one fresh workdir -> (workdir, results(name) -> both processes' JSON)."""
    tmp = tmp_path_factory.mktemp("multihost_text")
    (tmp / "worker.py").write_text(WORKER)
    workdir, out, logs = tmp / "wd", tmp / "out", tmp / "logs"
    out.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS=conftest.TEST_XLA_FLAGS)
    holder = subprocess.Popen(["sleep", "170"])  # a live run on this host holds W/held
    (workdir / "held").mkdir(parents=True)
    (workdir / "held" / "LOCK").write_text(json.dumps({
        "host": socket.gethostname(), "pid": holder.pid, "job": "a single process",
        "started": "2026-12-06 07:10:00 UTC", "heartbeat": time.time(), "token": "another run"}))
    cmd = ["bash", str(LOCAL_SH), "-n", "2", "-d", "1", "-t", "170", "-l", str(logs), "--",
           sys.executable, str(tmp / "worker.py"), str(workdir), str(out), PROMPT]
    try:
        rc, output = conftest.run_process_group(cmd, env=env, timeout=180, name="multihost_text", cwd=tmp)
    finally:
        holder.kill()
        holder.wait()

    def results(name: str) -> list[dict]:
        files = [out / f"{name}_{i}.json" for i in range(2)]
        if not all(f.is_file() for f in files):
            pytest.fail(f"exit code {rc}:\n{output[-3000:]}" + "".join(p.read_text()[-3000:] for p in logs.glob("*.log")))
        return [json.loads(f.read_text()) for f in files]

    return workdir, results


def test_one_vocabulary_per_job(two_processes):
    workdir, results = two_processes
    p0, p1 = results("text")
    assert p0["ids"] == p1["ids"]
    assert (p0["trained"], p1["trained"]) == (1, 0)  # trained and written by process 0 alone
    assert sorted(p.name for p in (workdir / "text").iterdir()) == ["spm.model"]  # no temporary file left
    assert all(p["proto_is_file"] and p["same_again"] for p in (p0, p1))


def test_skip_counts_summed_over_processes(two_processes):
    for r in two_processes[1]("skipped"):  # process 0 reports them; every process holds the same totals
        assert r["skipped"] == {"truncated_tar": 3, "corrupt_image": 14}
        assert r["metrics"] == {"data/skipped/truncated_tar": 3, "data/skipped/corrupt_image": 14}


def _records(path: pathlib.Path) -> list[bytes]:
    """The records of a TFRecord (event) file, each checked against its CRCs; fails on a corrupt tail."""
    from tensorboardX.record_writer import masked_crc32c

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        assert pos + 12 <= len(data), f"{path}: truncated header at byte {pos} of {len(data)}"
        header = data[pos:pos + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
        assert header_crc == masked_crc32c(header), f"{path}: corrupt record header at byte {pos}"
        body = data[pos + 12:pos + 12 + length]
        assert len(body) == length and pos + 16 + length <= len(data), f"{path}: truncated record at byte {pos}"
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert body_crc == masked_crc32c(body), f"{path}: corrupt record at byte {pos}"
        out.append(body)
        pos += 16 + length
    return out


def test_hparams_in_the_writers_event_file(tmp_path):
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    from muse_jax import writer as writer_lib

    logdir = tmp_path / "tb"
    with writer_lib.MetricWriter(logdir, console=False) as writer:
        writer.write_hparams({"stage": "base", "params": 1234, "train": {"lr": 1e-4, "ema": True, "betas": (0.9, 0.99)}})
        writer.write_scalars(1, {"train/loss": 2.5})
    files = [p for p in logdir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents."), files
    events = [event_pb2.Event.FromString(r) for r in _records(files[0])]
    values = {v.tag: v for e in events for v in e.summary.value}
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info",
            "train/loss"} <= set(values)
    start = HParamsPluginData.FromString(values["_hparams_/session_start_info"].metadata.plugin_data.content)
    hp = start.session_start_info.hparams
    assert hp["stage"].string_value == "base" and hp["params"].number_value == 1234
    assert hp["train.lr"].number_value == pytest.approx(1e-4) and hp["train.ema"].bool_value
    assert hp["train.betas"].string_value == "(0.9, 0.99)"


def test_the_stage_lock_belongs_to_the_job(two_processes):
    _, results = two_processes
    lock = results("lock")
    assert lock[0]["refused"] and lock[0]["refused"] == lock[1]["refused"]  # both stop, with process 0's line
    assert "is being trained by pid" in lock[0]["refused"] and "\n" not in lock[0]["refused"]
    assert lock[0]["job"] == lock[1]["job"] and "2 processes" in lock[0]["job"]  # one holder: the job
    assert lock[0]["pid"] == lock[1]["pid"] and all(r["released"] for r in lock)
