"""aMUSEd fine-tuning on 2 processes x 2 CPU devices (launch/local.sh, gloo) equals 1 process x 4 devices.

Both jobs fine-tune copies of one random tiny imported aMUSEd workdir on an fsdp=4 mesh: the 2-process
job's FSDP axis spans both processes, so no process holds all of any sharded parameter, and the frozen
CLIP and VQGAN encoder run sharded inside the step on both. Each process feeds its half of the same
global batches (images, CLIP ids, micro-conditions) that the single process feeds whole; the losses and
final parameters must agree (float32 multiplies; sums across processes only reorder rounding).
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import pathlib
import shutil
import sys

import conftest
import numpy as np
import PIL.Image
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
webdataset = pytest.importorskip("webdataset")

import _amused_fixture as fixture  # noqa: E402

from muse_jax import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OVERRIDES = [
    "--config.data.image_size=16", "--config.data.min_size=8", "--config.data.aesthetic_key=aesthetic",
    "--config.train.batch_size=8", "--config.train.num_steps=3", "--config.train.log_every=1",
    "--config.train.checkpoint_every=3", "--config.train.lr=3e-3", "--config.train.matmul_precision=highest",
    "--config.train.compilation_cache_dir=", "--config.mesh.data=1", "--config.mesh.fsdp=4",
    "--config.distributed.heartbeat_timeout_s=20", "--config.distributed.initialization_timeout_s=60",
]

WORKER = r'''
import json, os, pathlib, sys
from muse_jax import config as config_lib, distributed
config = config_lib.load_config(os.environ["CONFIG"], json.loads(os.environ["OVERRIDES"]))
info = distributed.initialize(config)    # MUSE_* variables from launch/local.sh (none: 1 process)
import jax, numpy as np
from jax.experimental import multihost_utils
from muse_jax import amused
from muse_jax.data import clip_bpe, image_text, stage_data
from muse_jax import partitioning
from muse_jax.training import finetune, loop

workdir, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
mesh, rules = partitioning.make_mesh(config.mesh), partitioning.logical_rules(config)
data = finetune.amused_stage_data(config, workdir, mesh, rules)
# The global batches: every record in one fixed order, read whole by every process.
ordered = image_text.make_dataset(config.data, "train", image_size=16, process_index=0, process_count=1, ordered=True)
tokenizer = clip_bpe.CLIPTokenizer.from_dir(workdir / amused.CLIP_DIR / "tokenizer", max_length=77)
batches = list(stage_data.TextBatches(image_text.Batches(ordered, int(config.train.batch_size)), tokenizer,
                                      keep=("image", *finetune.MICRO_KEYS)))

class Rows:  # this process's rows of each global batch, in turn; checkpointable
    def __init__(self, lo, hi):
        self.lo, self.hi, self.i = lo, hi, 0
    def __iter__(self):
        return self
    def __next__(self):
        b = batches[self.i % len(batches)]
        self.i += 1
        return {k: v[self.lo:self.hi] for k, v in b.items()}
    def get_state(self):
        return json.dumps(self.i).encode()
    def set_state(self, state):
        self.i = json.loads(state)

data.batches = lambda local: Rows(info.process_index * local, (info.process_index + 1) * local)
summary = loop.train_stage(config, workdir, "base", data=data, quiet=True)
state = summary["state"]
if info.process_count > 1:  # FSDP across processes: no process holds every element of some parameter
    held = lambda x: sum({str(s.index): s.data.size for s in x.addressable_shards}.values())
    assert any(held(x) < x.size for x in jax.tree_util.tree_leaves(state.params))
params = multihost_utils.process_allgather(state.params, tiled=True)
flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
if info.process_index == 0:
    np.savez(out / "params.npz", **flat)
    (out / "result.json").write_text(json.dumps({"losses": summary["losses"], "devices": jax.device_count()}))
'''


def _write_shards(root: pathlib.Path) -> str:
    root.mkdir()
    with webdataset.TarWriter(str(root / "00000.tar")) as sink:
        for i in range(16):
            w, h = (16 + 2 * (i % 5), 16 + 3 * (i % 3))
            img = PIL.Image.fromarray(fixture.image(32, seed=i)).resize((w, h), PIL.Image.Resampling.NEAREST)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sample = {"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": fixture.CORPUS[i % len(fixture.CORPUS)]}
            if i % 3 == 0:
                sample["json"] = json.dumps({"aesthetic": 5.0 + i / 8}).encode()
            sink.write(sample)
    return str(root / "00000.tar")


def _launch(tmp_path, name, workdir, out, config, overrides, processes):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OVERRIDES=json.dumps(overrides), CONFIG=config, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = conftest.TEST_XLA_FLAGS  # local.sh adds the device count
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    if processes == 1:
        env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
        cmd = [sys.executable, str(worker), str(workdir), str(out)]
    else:
        cmd = ["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "2", "-t", "280", "-l",
               str(tmp_path / f"logs_{name}"), "--", sys.executable, str(worker), str(workdir), str(out)]
    return conftest.run_process_group(cmd, env=env, timeout=300, name=name, cwd=tmp_path)


def test_two_processes_fsdp_equal_one_process(tmp_path, config="amused_256_finetune"):
    fixture.write_pipeline(tmp_path / "src")
    assert cli.main(["import-amused", "--workdir", str(tmp_path / "W0"), str(tmp_path / "src")]) == 0
    overrides = [*OVERRIDES, f"--config.data.train_files={_write_shards(tmp_path / 'shards')}"]
    runs = {}
    for name in ("one", "two"):
        shutil.copytree(tmp_path / "W0", tmp_path / name)
        (tmp_path / f"out_{name}").mkdir()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(_launch, tmp_path, name, tmp_path / name, tmp_path / f"out_{name}", config, overrides,
                                  1 if name == "one" else 2) for name in ("one", "two")}
        for name, job in jobs.items():
            rc, output = job.result()
            assert rc == 0, output[-4000:]
            r = json.loads((tmp_path / f"out_{name}" / "result.json").read_text())
            with np.load(tmp_path / f"out_{name}" / "params.npz") as z:
                r["params"] = {k: z[k] for k in z.files}
            runs[name] = r
    one, two = runs["one"], runs["two"]
    assert one["devices"] == two["devices"] == 4
    assert sorted(one["losses"]) == sorted(two["losses"]) == ["1", "2", "3"]
    for s in one["losses"]:
        np.testing.assert_allclose(two["losses"][s], one["losses"][s], rtol=1e-5)
    assert one["params"].keys() == two["params"].keys()
    for k, want in one["params"].items():
        diff = float(np.abs(two["params"][k] - want).max())
        assert diff <= 1e-4 * float(np.abs(want).max()) + 1e-9, (k, diff)
