"""A gs:// workdir (launch/tpu_pod.sh): training, checkpoints and resume through etils.epath.

No network: a fake `gs` filesystem maps gs://BUCKET/KEY to a local folder for every layer that
touches the bucket: fsspec (what etils.epath uses for gs:// without TensorFlow: configs, JSON,
token cache, grain iterator state, Orbax metadata), TensorStore (Orbax's array data; its native
GCS driver is pointed at the same folder as a `file` kvstore) and tensorboardX (its GCS writer,
which needs google-cloud-storage, is replaced by one writing through epath). Orbax's GCS logic
(commit-file atomicity instead of renames, GCS deletion of old steps) runs as it would on GCS.
"""
import json
import os
import shutil
import tempfile

import fsspec
import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from tensorboardX import record_writer

from muse_jax import checkpoint as ckpt_lib
from muse_jax import config as config_lib
from muse_jax import paths
from muse_jax import workdir as workdir_lib
from muse_jax.cascade import Pipeline
from muse_jax.training import loop, train_tokenizer

WORKDIR = "gs://muse-test-bucket/runs/tiny"

TOKENIZER = [
    "--config.data.source=procedural", "--config.data.num_train=64", "--config.data.num_test=8",
    "--config.vqgan.channels=(8,8,8)", "--config.vqgan.num_res_blocks=0", "--config.vqgan.latent_channels=8",
    "--config.vqgan.code_dim=8", "--config.vqgan.codebook_size=64", "--config.vqgan.norm_groups=4",
    "--config.train_tokenizer.batch_size=4", "--config.train_tokenizer.num_steps=2",
    "--config.train_tokenizer.warmup_steps=1", "--config.train_tokenizer.log_every=1",
    "--config.train_tokenizer.checkpoint_every=1", "--config.train_tokenizer.keep_checkpoints=1",
    "--config.train_tokenizer.eval_batch_size=4", "--config.train_tokenizer.eval_max_batches=1",
]
BASE = [  # 64 px images -> 8x8 tokens at 32 px (the base stage's input)
    "--config.base.codebook_size=64", "--config.base.grid_size=8", "--config.base.num_layers=1",
    "--config.base.width=32", "--config.base.mlp_dim=64", "--config.base.num_heads=4", "--config.base.text_dim=32",
    "--config.text.max_length=8", "--config.text.encoder.vocab_size=64", "--config.text.vocab_size=64",
    "--config.text.encoder.d_model=32", "--config.text.encoder.d_kv=8", "--config.text.encoder.d_ff=32",
    "--config.text.encoder.num_layers=1", "--config.text.encoder.num_heads=4",
    "--config.train.batch_size=8", "--config.train.warmup_steps=1", "--config.train.num_steps=4",
    "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.sample_every=4",
    "--config.train.num_samples=2",
    # A local persistent XLA cache (the one tests/test_train.py uses): the three runs compile once.
    f"--config.train.compilation_cache_dir={tempfile.gettempdir()}/muse_jax_test_xla_cache_{os.getuid()}",
]


class _TBWriter:
    """tensorboardX record writer for gs:// through epath (rewrites the object, like its GCS one)."""

    def __init__(self, path):
        self.path, self.buffer = epath.Path(path), bytearray()

    def write(self, data):
        self.buffer += data

    def flush(self):
        self.path.write_bytes(bytes(self.buffer))

    def close(self):
        self.flush()


class _TBFactory:
    def open(self, path):
        return _TBWriter(path)

    def directory_check(self, path):
        pass


# The training loop turns on JAX's persistent compilation cache (config.train.compilation_cache_dir).
pytestmark = pytest.mark.usefixtures("restore_jax_cache_config")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local folder that stands for gs://; gs://B/K is bucket / B / K."""
    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")
        cachable = False

        def __init__(self, *args, **kwargs):  # epath passes finalize_on_close=True (a gcsfs option)
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))  # GCS: no folders needed

    saved = {k: fsspec.registry.get(k) for k in ("gs", "gcs")}
    for k in saved:
        fsspec.register_implementation(k, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # epath: fsspec, not tf.io.gfile

    def kvstore(path):  # TensorStore: gs://B/K -> file kvstore at root/B/K
        bucket_name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(root / bucket_name / key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _TBFactory())
    monkeypatch.setenv(paths.LOCAL_DIR_ENV, str(tmp_path / "local"))
    monkeypatch.chdir(tmp_path)  # a pathlib slip would create ./gs:/... here
    yield root
    from fsspec.registry import _registry

    for k, v in saved.items():
        if v is None:
            _registry.pop(k, None)
        else:
            _registry[k] = v
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert not (tmp_path / "gs:").exists()


def test_paths_local_unchanged_and_remote_through_epath(bucket, tmp_path):
    assert paths.as_path(tmp_path) == tmp_path and type(paths.as_path(str(tmp_path))) is type(tmp_path)
    assert paths.as_path(f"file://{tmp_path}") == tmp_path
    remote = paths.as_path(WORKDIR) / "x" / "config.json"
    assert isinstance(remote, epath.Path) and str(remote) == WORKDIR + "/x/config.json"
    remote.parent.mkdir(parents=True, exist_ok=True)
    remote.write_text('{"a": 1}')
    assert json.loads((bucket / "muse-test-bucket/runs/tiny/x/config.json").read_text()) == {"a": 1}
    assert paths.local_dir(WORKDIR, "data") == tmp_path / "local" / "gs" / "muse-test-bucket" / "runs" / "tiny" / "data"
    assert paths.local_dir(tmp_path, "data") == tmp_path / "data"


def test_checkpointer_on_gs_keeps_restores_and_falls_back(bucket):
    ck = ckpt_lib.Checkpointer(f"{WORKDIR}/ck", save_every=1, keep=2, async_save=False)
    assert isinstance(ck.directory, epath.Path)
    states = {s: {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * s, "step": np.int32(s)} for s in (1, 2, 3)}
    for s, st in states.items():
        assert ck.save(s, st)
    ck.wait()
    assert ck.all_steps() == [2, 3]  # step 1 deleted through Orbax's GCS path
    on_disk = bucket / "muse-test-bucket/runs/tiny/ck"
    assert sorted(p.name for p in on_disk.iterdir() if p.name.isdigit()) == ["2", "3"]
    restored, step = ck.restore(jax.tree.map(np.zeros_like, states[3]))
    assert step == 3
    np.testing.assert_array_equal(restored["w"], states[3]["w"])
    for f in (on_disk / "3" / "state").rglob("*"):  # corrupt the newest: falls back to 2
        if f.is_file():
            f.write_bytes(b"\0garbage")
    restored, step = ck.restore(jax.tree.map(np.zeros_like, states[3]))
    assert step == 2 and (on_disk / "3.corrupt").is_dir()
    np.testing.assert_array_equal(restored["w"], states[2]["w"])
    ck.close()


def test_tokenizer_then_base_stage_train_and_resume_in_a_bucket(bucket):
    cfg = config_lib.load_config("shapes", TOKENIZER + BASE)
    result = train_tokenizer.train(cfg, WORKDIR, quiet=True)
    run = bucket / "muse-test-bucket" / "runs" / "tiny"
    assert result["step"] == 2 and json.loads((run / "tokenizer" / "eval.json").read_text())["step"] == 2
    assert [p.name for p in (run / "tokenizer" / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]

    # Base stage on the tokenizer's token cache: stop at 2 (as a preemption would), resume to 4.
    first = loop.train_stage(cfg, WORKDIR, "base", stop_at=2, quiet=True)
    assert first["final_step"] == 2
    resumed = loop.train_stage(cfg, WORKDIR, "base", quiet=True)
    assert resumed["final_step"] == 4 and sorted(resumed["losses"]) == [3, 4]
    for name in ("cache/tokens_train.npz", "cache/captions_train.json", "text/spm.model", "base/config.json",
                 "base/checkpoints/2", "base/checkpoints/4", "base/samples/step_4.png"):
        assert (run / name).exists(), name
    assert any((run / "base" / "tb").rglob("events.out.tfevents.*"))

    # The same run in one go on a local workdir (same tokenizer and captions) gives the same steps 3, 4.
    local = bucket.parent / "localrun"
    for name in ("tokenizer", "cache", "text"):
        shutil.copytree(run / name, local / name)
    full = loop.train_stage(cfg, local, "base", quiet=True)
    for s in (3, 4):
        assert resumed["losses"][s] == full["losses"][s]
    for a, b in zip(jax.tree.leaves(jax.device_get(full["state"].params)),
                    jax.tree.leaves(jax.device_get(resumed["state"].params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Loading the trained stage back from the bucket (what samplers do).
    model, params, config = workdir_lib.load_stage(WORKDIR, "base")
    assert config.base.grid_size == 8 and model.mask_token_id == 64
    with pytest.warns(UserWarning, match="no trained superres stage"):
        pipe = Pipeline.from_workdir(WORKDIR)
    assert pipe.base is not None and pipe.superres is None and pipe.tokenizer.codebook_size == 64


def test_train_tokenizer_cli_joins_the_multihost_job_first(monkeypatch, tmp_path):
    from muse_jax import cli, distributed

    calls = []
    monkeypatch.setattr(distributed, "initialize", lambda cfg: calls.append(("initialize", cfg.distributed.cluster)))

    def train(cfg, workdir, name=""):
        calls.append(("train", str(workdir)))
        raise ValueError("stop here")  # the CLI reports it and returns 2

    monkeypatch.setattr(train_tokenizer, "train", train)
    monkeypatch.setattr(distributed, "exit_now", lambda code, reason="": None)
    assert cli.main(["train-tokenizer", "--workdir", WORKDIR, "--config.distributed.cluster=none"]) == 2
    assert calls == [("initialize", "none"), ("train", WORKDIR)]
