"""Multi-host training with local processes: 2 processes x 2 CPU devices (gloo) vs 1 process x 4.

The 2-process job trains a tiny base model on a data=1, fsdp=2, tensor=2 mesh: devices are ordered
process by process, so the FSDP axis spans the two processes (parameters are split across them, as
with `--config.mesh.fsdp=-1` on a pod) and the tensor axis each one's two devices; process 1 dies at
step 3 (after the step-2 checkpoint); process 0 must then exit by itself (no hang). A relaunch
resumes from step 2 and finishes; its losses and final parameters must match an uninterrupted
single-process run on 4 devices fed the same global batches. Then the super-res stage of each run
starts from its base (config.train.init_from) and trains 2 steps, logging to the console: 2
processes must match 1 again. A sample preview (base, step 4) runs on the sharded parameters.
Every child is killed on timeout.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

import conftest
import numpy as np
import pytest
from PIL import Image

from muse_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOCAL_SH = ROOT / "launch" / "local.sh"

OVERRIDES = [
    "--config.base.num_layers=2", "--config.base.width=32", "--config.base.mlp_dim=64",
    "--config.base.num_heads=2", "--config.base.codebook_size=64", "--config.base.text_dim=16",
    "--config.text.trainable=False", "--config.text.max_length=8",
    "--config.train.batch_size=8", "--config.train.num_steps=4", "--config.train.log_every=1",
    "--config.train.checkpoint_every=2", "--config.train.sample_every=4", "--config.train.warmup_steps=1",
    "--config.train.lr=0.01", "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
    # the super-res stage (warm-started from the base: config.train_superres.init_from = "base")
    "--config.superres.num_layers=2", "--config.superres.width=32", "--config.superres.mlp_dim=64",
    "--config.superres.num_heads=2", "--config.superres.codebook_size=64", "--config.superres.text_dim=16",
    "--config.superres.num_lowres_layers=1", "--config.train_superres.num_steps=2",
    # float32 matmuls: the runs are compared to 1e-5 (bfloat16 multiplies round per shard shape)
    "--config.train.matmul_precision=highest",
    # a dead peer is declared after 20 s (default 100 s); then JAX aborts the others. Shorter
    # timeouts declare live peers dead when the test runs beside others on a loaded 2-core machine.
    "--config.distributed.heartbeat_timeout_s=20", "--config.distributed.initialization_timeout_s=60",
]

WORKER = r'''
import json, os, pathlib, sys, time
from muse_jax import config as config_lib, distributed
config = config_lib.load_config("shapes", json.loads(os.environ["OVERRIDES"]))
info = distributed.initialize(config)    # MUSE_* variables from launch/local.sh (none: 1 process)
import jax, numpy as np
from jax.experimental import multihost_utils
from muse_jax.data import loader, sources, stage_data
from muse_jax.training import loop

mode, workdir, out = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
crash_step = int(sys.argv[4]) if len(sys.argv) > 4 else 0
stages = os.environ["STAGES"].split(",")
seed = int(config.data.shuffle_seed)

# each process reads only its own shard of the records
shard = loader.process_shard()
assert (shard.shard_index, shard.shard_count) == (info.process_index, info.process_count), shard

perm = None
if mode == "reference":
    # Feed the single process the global batches the 2-process job assembles: read the record
    # order of each process's shard and of the 1-process loader, and permute the source so the
    # 1-process loader yields shard0-batch + shard1-batch at every step.
    import grain.python as grain
    ident = sources.ArraySource({"rec": np.arange(64)})
    def order(index, count, local):
        saved = loader.process_shard
        loader.process_shard = lambda: grain.ShardOptions(index, count, drop_remainder=True)
        try:
            it = iter(loader.make_loader(ident, batch_size=local, seed=seed))
            return [next(it)["rec"] for _ in range(64 // (local * count))]
        finally:
            loader.process_shard = saved
    two = [order(i, 2, 4) for i in range(2)]
    global_seq = np.concatenate([np.concatenate([two[0][k], two[1][k]]) for k in range(len(two[0]))])
    one = np.concatenate(order(0, 1, 8))
    assert sorted(global_seq) == sorted(one) == list(range(64))
    perm = np.empty(64, int); perm[one] = global_seq

class Codes:  # decodes previews without a VQGAN: token ids as gray levels
    def decode(self, tokens):
        return np.repeat(np.asarray(tokens, np.uint8)[..., None] * 4, 3, axis=-1)

losses = {}
real_make = loop.step_lib.make_train_step
def make_train_step(*args, **kwargs):
    run = real_make(*args, **kwargs)
    def wrapped(state, batch, rng):
        step = int(jax.device_get(state.step)) + 1
        if step == crash_step and info.process_index == 1:
            ckpt = workdir / "base" / "checkpoints" / str(step - 1)
            t0 = time.time()
            while not ckpt.is_dir() and time.time() - t0 < 30:   # the previous checkpoint is final
                time.sleep(0.1)
            raise RuntimeError(f"injected failure of process 1 at step {step}")
        state, metrics = run(state, batch, rng)
        losses[step] = float(jax.device_get(metrics["loss"]))
        if info.process_index == 0:
            print(f"LOSS {step} {losses[step]!r}", flush=True)
        return state, metrics
    wrapped.jitted = run.jitted
    return wrapped
loop.step_lib.make_train_step = make_train_step

for stage in stages:  # the super-res stage starts from the base trained just before (init_from)
    data = stage_data.synthetic(config, stage, num=64)
    data.preview, data.tokenizer = {k: v[:4] for k, v in data.source.arrays.items()}, Codes()
    if perm is not None:
        data.source = sources.ArraySource({k: v[perm] for k, v in data.source.arrays.items()})
    losses.clear()
    summary = loop.train_stage(config, workdir, stage, data=data, quiet=stage == "base")
    state = summary["state"]
    if mode == "multihost":  # FSDP across processes: no process holds every element of some parameter
        held = lambda x: sum({str(s.index): s.data.size for s in x.addressable_shards}.values())
        assert any(held(x) < x.size for x in jax.tree_util.tree_leaves(state.params))
        assert state.step.is_fully_replicated
    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if info.process_index == 0:
        np.savez(out / f"params_{stage}.npz", **flat)
        (out / f"result_{stage}.json").write_text(json.dumps({"losses": losses, "final_step": summary["final_step"],
                                                              "devices": jax.device_count()}))
'''


def _launch(args, tmp_path, name, *, processes=2, timeout=300, wait_all=False, stages="base,superres"):
    """Runs the worker with launch/local.sh (or directly for 1 process); kills everything on timeout."""
    worker = tmp_path / "worker.py"
    if not worker.exists():
        worker.write_text(WORKER)
    logs = tmp_path / f"logs_{name}"
    env = dict(os.environ, OVERRIDES=json.dumps(OVERRIDES), PYTHON=sys.executable, JAX_PLATFORMS="cpu", STAGES=stages)
    env["XLA_FLAGS"] = conftest.TEST_XLA_FLAGS  # local.sh adds the device count
    # the crash and resume launches compile the same programs: share a compilation cache
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if processes == 1:
        env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
        cmd = [sys.executable, str(worker), *args]
    else:
        cmd = ["bash", str(LOCAL_SH), "-n", str(processes), "-d", "2", "-t", str(timeout - 10), "-l", str(logs),
               *(["-w"] if wait_all else []), "--", sys.executable, str(worker), *args]
    t0 = time.monotonic()
    returncode, output = conftest.run_process_group(cmd, env=env, timeout=timeout, name=name, cwd=tmp_path)
    logs_text = {p.name: p.read_text() for p in sorted(logs.glob("*.log"))} if logs.exists() else {}
    return returncode, output, logs_text, time.monotonic() - t0


def _result(out, stage="base"):
    r = json.loads((out / f"result_{stage}.json").read_text())
    r["losses"] = {int(k): v for k, v in r["losses"].items()}
    with np.load(out / f"params_{stage}.npz") as z:
        r["params"] = {k: z[k] for k in z.files}
    return r


def _assert_params_match(got, want):
    """Per leaf, max |difference| <= 1e-4 * max |value|.

    The 2-process job sums gradients across processes (gloo) in another order than 4 devices of
    one process do, so float32 sums differ by rounding (~1e-7 relative). Adam divides by the
    gradients' root mean square: for a near-zero gradient element (a rarely used embedding row)
    that rounding moves the update by up to a fraction of lr, so after a few steps single elements
    differ by ~1e-6 (seen: 1.7e-6 on an AMD EPYC with AVX2 kernels, 1.7e-4 of that element) while
    each leaf's scale is ~1e-2 or more. A sharding or resume bug moves whole updates (~lr = 1e-2).
    """
    assert got.keys() == want.keys()
    for k in want:
        diff = float(np.abs(got[k] - want[k]).max())
        assert diff <= 1e-4 * float(np.abs(want[k]).max()) + 1e-9, (k, diff, float(np.abs(want[k]).max()))


def test_two_processes_crash_resume_match_single_process(tmp_path):
    ref_out, mh_out = tmp_path / "ref_out", tmp_path / "mh_out"
    ref_out.mkdir(), mh_out.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)

    # 1) reference: one process, 4 devices, 4 uninterrupted base steps then 2 super-res steps from that
    #    base (runs while 2) waits for the heartbeat)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reference = pool.submit(_launch, ["reference", str(tmp_path / "ref_wd"), str(ref_out)], tmp_path, "ref",
                                processes=1)

        # 2) two processes; process 1 dies at step 3, after the step-2 checkpoint. Process 0 must exit
        #    by itself (launch with -w: local.sh does not stop it) with a clear message, not hang.
        wd = tmp_path / "mh_wd"
        rc, output, logs, seconds = _launch(["multihost", str(wd), str(mh_out), "3"], tmp_path, "crash",
                                            wait_all=True, timeout=300, stages="base")
        ref_rc, ref_output, _, _ = reference.result()
    assert ref_rc == 0, ref_output[-4000:]
    ref = _result(ref_out)
    assert ref["devices"] == 4 and ref["final_step"] == 4 and sorted(ref["losses"]) == [1, 2, 3, 4]

    assert rc != 0, output[-4000:]
    assert "injected failure of process 1 at step 3" in logs["process_1.log"]
    p0 = logs["process_0.log"]
    assert any(msg in p0 for msg in ("another task died", "other processes stop too", "watchdog")), p0[-3000:]
    assert seconds < 290 - 5  # it exited by itself, not at local.sh's timeout (-t 290)
    first = {int(s): float(v) for s, v in (line.split()[1:] for line in p0.splitlines() if line.startswith("LOSS "))}
    assert sorted(first)[:2] == [1, 2]
    for s in (1, 2):  # the same global batches and SPMD program as the reference
        np.testing.assert_allclose(first[s], ref["losses"][s], rtol=1e-5)
    assert (wd / "base" / "checkpoints" / "2").is_dir()

    # 3) restart both processes: resume the base from step 2, finish, match the reference; then
    rc, output, logs, _ = _launch(["multihost", str(wd), str(mh_out)], tmp_path, "resume")
    assert rc == 0, output[-4000:] + "\n".join(logs.values())[-4000:]
    mh = _result(mh_out)
    assert mh["devices"] == 4 and mh["final_step"] == 4
    assert sorted(mh["losses"]) == [3, 4], "did not resume from the step-2 checkpoint"
    for s in (3, 4):
        np.testing.assert_allclose(mh["losses"][s], ref["losses"][s], rtol=1e-5)
    _assert_params_match(mh["params"], ref["params"])
    assert not any(np.array_equal(ref["params"][k], np.zeros_like(ref["params"][k])) for k in ref["params"]
                   if "kernel" in k)

    # 4) ... the super-res stage, warm-started from the base just trained (read and copied sharded over
    #    the mesh), logging to the console: 2 processes vs 1 process on 4 devices
    assert "parameter arrays start from the trained base stage" in logs["process_0.log"]
    assert "step 2 | train/loss=" in logs["process_0.log"]
    ref_sr, mh_sr = _result(ref_out, "superres"), _result(mh_out, "superres")
    assert sorted(mh_sr["losses"]) == sorted(ref_sr["losses"]) == [1, 2]
    for s in (1, 2):
        np.testing.assert_allclose(mh_sr["losses"][s], ref_sr["losses"][s], rtol=1e-5)
    _assert_params_match(mh_sr["params"], ref_sr["params"])
    # warm-started: the low-res encoder's block started from the base's block 0 (a different path,
    # hence a different random init) and moved only 2 steps (lr 0.01) away from it
    k = "['decoder']['block_0']['mlp']['wi']['kernel']"
    lowres = mh_sr["params"][k.replace("decoder", "lowres_encoder")]
    assert np.abs(lowres - ref["params"][k]).max() < 0.05 < np.abs(ref["params"][k]).max()

    # 5) the base's preview, sampled on the sharded parameters and written by process 0, is the reference's
    got, want = (np.asarray(Image.open(w / "base" / "samples" / "step_4.png")) for w in (wd, tmp_path / "ref_wd"))
    assert got.shape == want.shape and np.mean(got == want) > 0.9


def test_resolve_sources():
    """Start-up plans from config, MUSE_* variables, SLURM and TPU environments."""
    assert distributed.resolve(None, {}).method == "single"
    p = distributed.resolve(None, {"MUSE_COORDINATOR_ADDRESS": "h:1234", "MUSE_NUM_PROCESSES": "4",
                                   "MUSE_PROCESS_ID": "3", "MUSE_LOCAL_DEVICE_IDS": "0,1"})
    assert p.method == "explicit"
    assert (p.kwargs["coordinator_address"], p.kwargs["num_processes"], p.kwargs["process_id"]) == ("h:1234", 4, 3)
    assert p.kwargs["local_device_ids"] == [0, 1] and p.kwargs["heartbeat_timeout_seconds"] == 100
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "5"}
    assert distributed.resolve(None, slurm).method == "slurm"
    assert distributed.resolve(None, dict(slurm, SLURM_NTASKS="1")).method == "single"
    assert distributed.resolve(None, {"TPU_WORKER_HOSTNAMES": "a,b"}).method == "tpu"

    import ml_collections

    cfg = ml_collections.ConfigDict({"distributed": {
        "cluster": "explicit", "coordinator_address": "", "num_processes": 2, "process_id": 0,
        "local_device_ids": "", "initialization_timeout_s": 30, "heartbeat_timeout_s": 5, "shutdown_timeout_s": 5,
        "step_timeout_s": 0}})
    with pytest.raises(ValueError, match="coordinator_address"):
        distributed.resolve(cfg, {})
    p = distributed.resolve(cfg, {"MUSE_COORDINATOR_ADDRESS": "h:1"})
    assert p.kwargs["process_id"] == 0 and p.kwargs["heartbeat_timeout_seconds"] == 5
    cfg.distributed.process_id = 2
    with pytest.raises(ValueError, match="not in"):
        distributed.resolve(cfg, {"MUSE_COORDINATOR_ADDRESS": "h:1"})
    cfg.distributed.cluster = "slurm"
    with pytest.raises(ValueError, match="srun"):
        distributed.resolve(cfg, {})
    cfg.distributed.cluster = "nope"
    with pytest.raises(ValueError, match="cluster"):
        distributed.resolve(cfg, {})


def test_watchdog_exits_with_clear_message(tmp_path):
    code = (
        "import time\nfrom muse_jax import distributed\n"
        "with distributed.Watchdog(0.5, first_timeout_s=0.5) as dog:\n"
        "    dog.kick(1); time.sleep(0.2); dog.kick(2); time.sleep(30)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == distributed.EXIT_WATCHDOG
    assert "no training step completed" in proc.stderr and "after step 2" in proc.stderr
    assert time.monotonic() - t0 < 20
