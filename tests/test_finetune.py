"""Fine-tuning an imported aMUSEd workdir (training/finetune.py) on webdataset shards the test writes.

A random tiny `AmusedPipeline` (tests/_amused_fixture.py: 8x8 tokens, 16 px images) is imported with
`muse-jax import-amused`; the shards hold images of several sizes, so each record's micro-conditions
(original size, crop) are its own. Full fine-tuning: the loss falls, the checkpoint restores
bit-exactly through `amused.load` (what sampling reads), a resumed run equals an uninterrupted one,
the imported checkpoint 0 is kept. LoRA: only adapters are trained and saved, checkpoint 0 is left
byte-identical, sampling puts the adapters on top of it, and `muse-jax lora merge` samples the same.
"""
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import PIL.Image
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
webdataset = pytest.importorskip("webdataset")

import _amused_fixture as fixture  # noqa: E402

from muse_jax import (  # noqa: E402
    amused,
    cascade,
    cli,
    partitioning,  # noqa: E402
)
from muse_jax import config as config_lib  # noqa: E402
from muse_jax.models import uvit  # noqa: E402
from muse_jax.training import finetune, loop  # noqa: E402

CACHE = pathlib.Path(tempfile.gettempdir()) / f"muse_jax_test_xla_cache_{os.getuid()}"
# (width, height) of the written images: landscape, portrait and square, all at least the 16 px images.
SIZES = [(24, 16), (16, 20), (32, 32), (20, 16), (16, 28), (40, 24), (18, 18), (16, 32)]
NUM, PER_SHARD = 16, 8


def _write_shards(root: pathlib.Path) -> str:
    root.mkdir()
    for start in range(0, NUM, PER_SHARD):
        with webdataset.TarWriter(str(root / f"{start // PER_SHARD:05d}.tar")) as sink:
            for i in range(start, start + PER_SHARD):
                w, h = SIZES[i % len(SIZES)]
                img = PIL.Image.fromarray(fixture.image(32, seed=i)).resize((w, h), PIL.Image.Resampling.NEAREST)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                sample = {"__key__": f"{i:06d}", "png": buf.getvalue(), "txt": fixture.CORPUS[i % len(fixture.CORPUS)]}
                if i % 2 == 0:
                    sample["json"] = json.dumps({"aesthetic": 4.0 + i / 4}).encode()
                sink.write(sample)
    return f"{root}/{{00000..{(NUM - 1) // PER_SHARD:05d}}}.tar"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    fixture.write_pipeline(root / "src")
    assert cli.main(["import-amused", "--workdir", str(root / "W0"), str(root / "src")]) == 0
    return root, _write_shards(root / "shards")


def _args(shards, *extra):
    return ["--config.data.image_size=16", "--config.data.min_size=8", f"--config.data.train_files={shards}",
            "--config.data.shuffle_buffer=8", "--config.data.aesthetic_key=aesthetic",
            "--config.train.batch_size=4", "--config.train.log_every=1", "--config.train.checkpoint_every=4",
            "--config.train.lr=3e-3", "--config.train.matmul_precision=highest",
            f"--config.train.compilation_cache_dir={CACHE}", *extra]


def _config(shards, name="amused_256_finetune", *extra):
    return config_lib.load_config(name, _args(shards, *extra))


def _copy(env, name):
    root, shards = env
    shutil.copytree(root / "W0", root / name)
    return root / name, shards


def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_full_finetune_loss_falls_and_sampling_reads_the_checkpoint(env):
    w, shards = _copy(env, "full")
    imported = _digest(w / "base" / "checkpoints" / "0")
    stage_config = (w / "base" / "config.json").read_text()
    r = loop.train_stage(_config(shards, "amused_256_finetune", "--config.train.num_steps=24"), w, "base", quiet=True)
    losses = [r["losses"][s] for s in sorted(r["losses"])]
    assert r["final_step"] == 24 and np.all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.2, losses
    # checkpoint 0 (the imported weights) is kept, untouched; the model's description too
    assert _digest(w / "base" / "checkpoints" / "0") == imported
    assert (w / "base" / "config.json").read_text() == stage_config
    assert json.loads((w / "base" / "finetune.json").read_text())["lora"] is None
    # sampling reads the newest checkpoint: the trained parameters, bit for bit
    got, want = _leaves(amused.load(w).params["uvit"]), _leaves(r["state"].params)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(amused.load(w, step=0).params["uvit"]).values(),
                                                        want.values()))
    prompts = ["a red circle", "the sea at night"]
    images = cascade.Pipeline.from_workdir(w, batch_size=2).generate(prompts, seed=0)
    assert np.asarray(images).shape == (2, 16, 16, 3)


def test_resume_equals_uninterrupted(env):
    wa, shards = _copy(env, "uninterrupted")
    wb, _ = _copy(env, "resumed")
    config = _config(shards, "amused_256_finetune", "--config.train.num_steps=8")
    a = loop.train_stage(config, wa, "base", quiet=True)
    first = loop.train_stage(config, wb, "base", stop_at=4, quiet=True)
    assert first["final_step"] == 4
    b = loop.train_stage(config, wb, "base", quiet=True)
    assert b["final_step"] == 8
    assert [b["losses"][s] for s in range(5, 9)] == [a["losses"][s] for s in range(5, 9)]
    for k, v in _leaves(a["state"]).items():
        np.testing.assert_array_equal(_leaves(b["state"])[k], v, err_msg=k)


def test_micro_conditions_reaching_the_model_are_the_records(env):
    w, shards = env[0] / "W0", env[1]
    config = _config(shards, "amused_256_finetune", "--config.data.random_crop=False")
    mesh = partitioning.make_mesh(config.mesh)
    data = finetune.amused_stage_data(config, w, mesh, partitioning.logical_rules(config))
    batch = next(data.batches(NUM))
    inputs = jax.jit(data.prepare.fn)(data.prepare.frozen, batch)
    micro = np.asarray(inputs["micro_conds"])
    assert micro.shape == (NUM, 5) and np.asarray(inputs["tokens"]).shape == (NUM, 64)
    # every written (size, score) appears once per record: match rows by the record's caption order
    expected = []
    for i in range(NUM):
        wd, ht = SIZES[i % len(SIZES)]
        short = min(wd, ht)
        offset = round((max(wd, ht) - short) / 2 * 16 / short)
        top, left = (offset, 0) if ht > wd else (0, offset)
        expected.append((wd, ht, top, left, 4.0 + i / 4 if i % 2 == 0 else 6.0))
    assert sorted(map(tuple, micro.tolist())) == sorted(expected)


def test_lora_trains_adapters_only_and_merge_samples_the_same(env, capsys):
    w, shards = _copy(env, "lora")
    imported = _digest(w / "base" / "checkpoints" / "0")
    config = _config(shards, "amused_256_lora", "--config.train.num_steps=6", "--config.lora.rank=4",
                     "--config.train.lr=1e-2")
    r = loop.train_stage(config, w, "base", quiet=True)
    assert r["final_step"] == 6 and all(np.isfinite(v) for v in r["losses"].values())
    trained = _leaves(r["state"].params)
    assert trained and all(k.endswith(("_lora_a']", "_lora_b']")) for k in trained), list(trained)[:4]
    assert _digest(w / "base" / "checkpoints" / "0") == imported  # the frozen weights: read, never rewritten
    assert json.loads((w / "base" / "finetune.json").read_text())["lora"]["rank"] == 4

    on_top = amused.load(w)
    assert _leaves(on_top.params["uvit"]).keys() >= trained.keys()
    assert cli.main(["lora", "merge", "--workdir", str(w), "--out", str(w.parent / "merged")]) == 0
    assert "merged" in capsys.readouterr().out
    merged = amused.load(w.parent / "merged")
    assert not any(k.endswith(("_lora_a']", "_lora_b']")) for k in _leaves(merged.params["uvit"]))

    prompts = ["a red circle", "two green crosses"]
    a = cascade.Pipeline.from_workdir(w, batch_size=2, matmul_precision="highest").generate(prompts, seed=1)
    b = cascade.Pipeline.from_workdir(w.parent / "merged", batch_size=2, matmul_precision="highest").generate(
        prompts, seed=1)
    base = cascade.Pipeline.from_workdir(env[0] / "W0", batch_size=2, matmul_precision="highest").generate(
        prompts, seed=1)
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 1
    assert np.abs(np.asarray(a, float) - np.asarray(base, float)).max() > 1  # the adapters changed something

    # a second merge into a non-empty folder and a merge of a workdir without adapters are refused
    assert cli.main(["lora", "merge", "--workdir", str(w), "--out", str(w.parent / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["lora", "merge", "--workdir", str(env[0] / "W0"), "--out", str(w.parent / "m2")]) == 2
    assert "no LoRA" in capsys.readouterr().err and not (w.parent / "m2").exists()


def test_wrong_family_config_refused_before_writing(env, capsys):
    w, shards = _copy(env, "refused")
    before = _digest(w)
    assert cli.main(["train", "--workdir", str(w), "--config", "shapes"]) == 2
    assert "aMUSEd" in capsys.readouterr().err and _digest(w) == before
    assert cli.main(["train", "--workdir", str(w), *_args(shards, "--config.data.image_size=32")]) == 2
    assert "16 px" in capsys.readouterr().err and _digest(w) == before


def test_init_from_copies_the_newest_weights_into_a_new_workdir(env, capsys):
    root, shards = env
    w0 = root / "W0"
    before = _digest(w0)
    w = root / "from_w0"
    args = ["train", "--workdir", str(w), "--init-from", str(w0), *_args(shards, "--config.train.num_steps=2",
                                                                                   "--config.train.checkpoint_every=2")]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert _digest(w0) == before  # W0 is read, never written
    assert json.loads((w / "init_from.json").read_text())["family"] == "amused"
    copied = _leaves(amused.load(w, step=0).params["uvit"])
    for k, v in _leaves(amused.load(w0).params["uvit"]).items():
        np.testing.assert_array_equal(copied[k], v, err_msg=k)
    assert (w / "base" / "checkpoints" / "2").is_dir()
    assert finetune.init_workdir(w, w0)["workdir"] == str(w0.resolve())  # again on W: a resume, nothing copied
    other = root / "occupied"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["train", "--workdir", str(other), "--init-from", str(w0), *_args(shards)]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in other.iterdir()] == ["notes.txt"]


def test_memory_options_train(env):
    """bfloat16 parameters with float32 optimizer state, bfloat16 compute and remat train (finite losses, the
    dtypes asked for); remat alone changes nothing but memory (the same loss and gradients)."""
    root, shards = env
    w, _ = _copy(env, "memory")
    r = loop.train_stage(_config(shards, "amused_256_finetune", "--config.train.num_steps=2",
                                 "--config.train.param_dtype=bfloat16", "--config.train.optimizer_state_dtype=float32",
                                 "--config.model.dtype=bfloat16", "--config.model.remat=True"), w, "base", quiet=True)
    assert all(np.isfinite(v) for v in r["losses"].values())
    assert {x.dtype for x in jax.tree_util.tree_leaves(r["state"].params)} == {np.dtype("bfloat16")}
    moments = [x for x in jax.tree_util.tree_leaves(r["state"].opt_state) if np.ndim(x) >= 2]
    assert moments and {x.dtype for x in moments} == {np.dtype("float32")}

    loaded = amused.load(root / "W0")
    rng = np.random.default_rng(0)
    cfg = loaded.uvit.config
    inputs = (rng.integers(0, cfg.vocab_size, (2, 64)), rng.normal(size=(2, 5, cfg.encoder_hidden_size)),
              rng.normal(size=(2, cfg.cond_embed_dim)), np.tile([[16.0, 16, 0, 0, 6]], (2, 1)))
    out = {}
    for remat in (False, True):
        model = uvit.UVit2D(dataclasses.replace(cfg, remat=remat))
        loss = lambda p: (model.apply({"params": p}, *inputs) ** 2).mean()  # noqa: E731,B023
        with jax.default_matmul_precision("highest"):
            out[remat] = jax.jit(jax.value_and_grad(loss))(loaded.params["uvit"])
    assert float(out[True][0]) == float(out[False][0])
    for a, b in zip(jax.tree_util.tree_leaves(out[True][1]), jax.tree_util.tree_leaves(out[False][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_switching_between_full_and_lora_on_one_workdir_is_refused(env, capsys):
    w, shards = _copy(env, "switch")
    assert cli.main(["train", "--workdir", str(w), *_args(shards, "--config.train.num_steps=1")]) == 0
    before = _digest(w)
    assert cli.main(["train", "--workdir", str(w), "--config", "amused_256_lora",
                     *_args(shards, "--config.train.num_steps=2")]) == 2
    err = capsys.readouterr().err
    assert "full fine-tuning" in err and "--init-from" in err and _digest(w) == before
