"""Sampling with parameters sharded over the mesh (FSDP): restored into their shards, parameters only.

A tiny workdir (a random VQGAN; base and super-res checkpoints as training writes them, EMA kept)
has the optimizer state in its checkpoints corrupted; `Pipeline.from_workdir` must still load it,
on one device and with the parameters split over an fsdp=8 mesh of CPU devices, and both must
sample the same images and inpaintings.
"""
import concurrent.futures
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorstore as ts
from _multidevice import run_with_devices

from muse_jax import cascade, partitioning
from muse_jax import checkpoint as ckpt_lib
from muse_jax import config as config_lib
from muse_jax import workdir as workdir_lib
from muse_jax.data import text
from muse_jax.data.shapes import make_example
from muse_jax.models import vqgan
from muse_jax.training import loop
from muse_jax.training import state as state_lib

OVERRIDES = [
    "--config.base.num_layers=1", "--config.base.width=32", "--config.base.mlp_dim=64", "--config.base.num_heads=2",
    "--config.base.codebook_size=32", "--config.base.text_dim=16", "--config.base.grid_size=4",
    "--config.superres.num_layers=1", "--config.superres.width=32", "--config.superres.mlp_dim=64",
    "--config.superres.num_heads=2", "--config.superres.codebook_size=32", "--config.superres.text_dim=16",
    "--config.superres.grid_size=8", "--config.superres.lowres_grid_size=4", "--config.superres.num_lowres_layers=1",
    "--config.text.vocab_size=64", "--config.text.max_length=16", "--config.text.encoder.vocab_size=64",
    "--config.text.encoder.d_model=16", "--config.text.encoder.d_kv=8", "--config.text.encoder.d_ff=32",
    "--config.text.encoder.num_layers=1", "--config.text.encoder.num_heads=2",
    "--config.train.ema_decay=0.5",
    "--config.mesh.data=1", "--config.mesh.fsdp=-1",
    "--config.sample.batch_size=8", "--config.sample.steps=4", "--config.sample.sr_steps=3",
]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow cross"]

SAMPLE = """
import sys
sys.path.insert(0, "tests")
import numpy as np
from test_sharded_sampling import sample
np.savez({out!r}, **sample({w!r}, sharded=True))
"""


def _random(abstract, seed):
    """Random values of the shapes of `abstract` (numpy: nothing to compile); integer leaves 0."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.normal(0, 0.2, s.shape) if s.dtype.kind == "f" else np.zeros(s.shape))
                        .astype(s.dtype), abstract)


def _tiny_workdir(w):
    """W with a sentencepiece model, a VQGAN, and base and super-res checkpoints as training writes
    them (TrainState: step, params, optimizer state, EMA params), all of random values.
    Returns each stage's abstract TrainState."""
    config = config_lib.load_config("shapes", OVERRIDES)
    captions = [make_example(0, "train", i)["caption"] for i in range(40)]
    text.train_sentencepiece(captions, w / workdir_lib.SPM_MODEL, 64)
    vq = vqgan.VQGANConfig(channels=(8, 8), num_res_blocks=1, latent_channels=8, code_dim=8, codebook_size=32,
                           norm="layer", l2_normalize=True)
    workdir_lib.tokenizer_dir(w).mkdir(parents=True)
    (workdir_lib.tokenizer_dir(w) / "config.json").write_text(
        json.dumps({"vqgan": vq.to_dict(), "train_tokenizer": {}, "image_size": 16}))
    params = _random(jax.eval_shape(lambda: nn.unbox(vqgan.init_params(vq, jax.random.key(0), 16))), 0)
    ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(w, "tokenizer"), async_save=False)
    ckpt.save(0, {"params": params}, force=True)
    ckpt.close()
    mesh, states = partitioning.make_mesh(config.mesh), {}
    for seed, stage in enumerate(("base", "superres"), 1):
        cfg = loop.stage_config(config, stage)
        workdir_lib.stage_dir(w, stage).mkdir()
        config_lib.save_config(cfg, workdir_lib.stage_dir(w, stage) / "config.json")
        _, abstract, _ = state_lib.state_setup(cfg, workdir_lib.build_stage_model(cfg, stage), mesh, None)
        states[stage] = nn.unbox(abstract)
        ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(w, stage), async_save=False)
        ckpt.save(2, _random(states[stage], seed), force=True)
        ckpt.close()
    return states


def _corrupt_optimizer_state(w, stage, abstract):
    """Overwrites the data of every `opt_state` array in the stage's checkpoints with garbage (the
    chunks in Orbax's OCDBT key-value store; each array's metadata is left readable)."""
    ckpt = workdir_lib.checkpoint_dir(w, stage)
    for step in workdir_lib.checkpoint_steps(w, stage):
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{ckpt / str(step) / 'state'}/"}).result()
        keys = [k.decode() for k in kv.list().result()]
        assert any(k.startswith("ema_params.") for k in keys)
        chunks = [k for k in keys if k.startswith("opt_state.") and not k.endswith("/.zarray")]
        assert chunks
        for k in chunks:
            kv.write(k, b"not an array chunk").result()
    with pytest.raises(ckpt_lib.CheckpointError):  # it bites: the optimizer state cannot be read any more
        ckpt_lib.restore_subtree(ckpt, {"opt_state": abstract.opt_state})


def sample(w, sharded: bool) -> dict:
    """Loads W (on one device, or sharded over an fsdp mesh of all devices): generations and inpaintings."""
    mesh = partitioning.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}) if sharded else None
    # float32 multiplies: on CPUs where the default rounds them to bfloat16 (AMX, muse_jax.precision), sums
    # over other shardings differ by far more than float32 rounding
    pipe = cascade.Pipeline.from_workdir(w, mesh=mesh, matmul_precision="highest")
    prompts = [p for p in PROMPTS for _ in range(2)]
    base, sr = pipe.generate_tokens(prompts, seed=3)
    out = {"base": base, "sr": sr, "images": pipe.decode_tokens(sr)}
    images, masks = inpaint_inputs()
    out["inpainted"] = pipe.inpaint(images, masks, prompts, seed=5)
    for name, stage in (("base", pipe.base), ("sr", pipe.superres)):
        leaves = jax.tree_util.tree_leaves_with_path(stage.params)
        path, big = max(leaves, key=lambda kv: kv[1].size)
        out[f"{name}_largest"] = np.array([big.size, big.addressable_shards[0].data.size, len(big.sharding.device_set)])
        out[f"{name}_largest_path"] = np.array(jax.tree_util.keystr(path))
        # the share of all parameters device 0 holds
        out[f"{name}_share"] = np.array(sum(x.addressable_shards[0].data.size for _, x in leaves)
                                        / sum(x.size for _, x in leaves))
    return out


def inpaint_inputs():
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
    masks = np.zeros((8, 16, 16), bool)
    masks[:, 4:12, 2:10] = True
    return images, masks


def test_fsdp_sharded_pipeline_matches_one_device(tmp_path):
    w = tmp_path / "w"
    for stage, abstract in _tiny_workdir(w).items():
        _corrupt_optimizer_state(w, stage, abstract)
    code = SAMPLE.format(w=str(w), out=str(tmp_path / "sharded.npz"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # 8 devices in a subprocess, 1 device here
        sharded = pool.submit(run_with_devices, code, 8, 240)
        one = sample(w, sharded=False)
        sharded.result()
    with np.load(tmp_path / "sharded.npz") as z:
        fsdp = {k: z[k] for k in z.files}

    for name in ("base", "sr"):
        size, shard, devices = fsdp[f"{name}_largest"]
        assert (shard, devices) == (size // 8, 8), (str(fsdp[f"{name}_largest_path"]), fsdp[f"{name}_largest"])
        assert tuple(one[f"{name}_largest"]) == (size, size, 1) and one[f"{name}_share"] == 1
        assert fsdp[f"{name}_share"] < 0.2  # 1/8, but for the few parameters fsdp=8 does not divide
    # Both meshes draw the same random numbers. Float32 sums over other shardings and local batch
    # sizes may round differently (~1e-7); that changes a token only when a draw falls that close to
    # a boundary, and then the rest of its sample (seen: none): one sample of 8 may differ.
    same = (one["base"] == fsdp["base"]).all(1) & (one["sr"] == fsdp["sr"]).all(1)
    assert same.sum() >= 7, same
    assert np.abs(one["images"][same].astype(int) - fsdp["images"][same]).max() <= 1
    images, masks = inpaint_inputs()
    np.testing.assert_array_equal(fsdp["inpainted"][~masks], images[~masks])
    close = np.abs(one["inpainted"].astype(int) - fsdp["inpainted"]).reshape(8, -1).max(1) <= 1
    assert close.sum() >= 7 and (fsdp["inpainted"][masks] != images[masks]).mean() > 0.5


def test_pipeline_loads_the_checkpoints_it_is_asked_for(tmp_path):
    w = tmp_path / "w"
    states = _tiny_workdir(w)  # base and super-res checkpoints of step 2
    ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(w, "base"), async_save=False)
    ckpt.save(4, _random(states["base"], 7), force=True)
    ckpt.close()
    leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    step = {s: leaves(workdir_lib.load_stage(w, "base", step=s)[1]) for s in (2, 4)}
    assert any((a != b).any() for a, b in zip(step[2], step[4]))
    newest, older = cascade.Pipeline.from_workdir(w), cascade.Pipeline.from_workdir(w, steps={"base": 2})
    for got, want in ((newest.base.params, step[4]), (older.base.params, step[2]),
                      (older.superres.params, leaves(newest.superres.params))):
        for a, b in zip(leaves(got), want, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="cannot load the base stage"):
        cascade.Pipeline.from_workdir(w, steps={"base": 3})


def test_sampling_reads_a_newest_checkpoint_without_metadata_and_falls_back_from_a_truncated_one(tmp_path):
    """A newest step without its metadata file still loads (no TypeError); one whose data files are cut
    short loads the previous step, with a warning naming both, instead of silently."""
    w = tmp_path / "w"
    states = _tiny_workdir(w)  # step 2
    ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(w, "base"), async_save=False)
    ckpt.save(4, _random(states["base"], 7), force=True)
    ckpt.close()
    leaves = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    want = {s: leaves(workdir_lib.load_stage(w, "base", step=s)[1]) for s in (2, 4)}
    state4 = workdir_lib.checkpoint_dir(w, "base") / "4" / "state"
    (state4 / "_METADATA").unlink()
    for a, b in zip(leaves(cascade.Pipeline.from_workdir(w).base.params), want[4], strict=True):
        np.testing.assert_array_equal(a, b)
    for f in (state4 / "d").iterdir():  # the arrays' data, cut short
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match="loaded step 2, not the newer step 4"):
        pipe = cascade.Pipeline.from_workdir(w)
    for a, b in zip(leaves(pipe.base.params), want[2], strict=True):
        np.testing.assert_array_equal(a, b)
