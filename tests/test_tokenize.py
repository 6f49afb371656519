"""`muse-jax data tokenize`: resumable per-process token shards, equal to the tokens the train step
computes from the same images; a stage trains (and resumes) on them with `config.data.source=tokens`."""
import io
import json
import os
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from muse_jax import checkpoint as ckpt_lib
from muse_jax import cli, partitioning
from muse_jax import config as config_lib
from muse_jax import workdir as workdir_lib
from muse_jax.data import image_text, token_shards
from muse_jax.models import t5, vqgan
from muse_jax.training import inputs, loop, online, tokenize

webdataset = pytest.importorskip("webdataset")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*prompts truncated"),  # 8 text tokens: a faster T5
    pytest.mark.usefixtures("restore_jax_cache_config"),  # the runs below turn on JAX's persistent cache
]

TINY = [
    "--config.mesh.data=1",
    "--config.vqgan.latent_channels=8", "--config.vqgan.code_dim=8", "--config.vqgan.codebook_size=64",
    "--config.vqgan.norm_groups=4",
    "--config.tokenizers.base.vqgan.channels=(8,8,8,8)", "--config.tokenizers.superres.vqgan.channels=(8,8,8,8)",
    "--config.tokenizers.base.train_tokenizer.image_size=32",
    "--config.tokenizers.superres.train_tokenizer.image_size=64",
    "--config.base.grid_size=4", "--config.superres.grid_size=8", "--config.superres.lowres_grid_size=4",
    "--config.text.vocab_size=48", "--config.text.encoder.vocab_size=48",
    *[f"--config.{s}.{k}={v}" for s in ("base", "superres") for k, v in (
        ("codebook_size", 64), ("num_layers", 1), ("width", 32), ("mlp_dim", 64), ("text_dim", 64))],
    "--config.text.max_length=8", "--config.train.optimizer=adamw",  # compiles faster than adafactor
    "--config.train.num_steps=2", "--config.train.batch_size=4", "--config.train.log_every=1",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=1",
]
NUM, PER_SHARD = 21, 7  # 20 good records and one bad image
# One persistent XLA cache across runs of these tests (compiling the tiny stage takes most of their time).
CACHE = pathlib.Path(tempfile.gettempdir()) / f"muse_jax_test_xla_cache_{os.getuid()}"
TOKENS = [*TINY, "--config.data.source=tokens", f"--config.train.compilation_cache_dir={CACHE}"]




def _write_shards(root) -> str:
    from muse_jax.data import shapes

    source = shapes.ShapesSource("train", NUM, seed=0)
    root.mkdir()
    for start in range(0, NUM, PER_SHARD):
        with webdataset.TarWriter(str(root / f"{start // PER_SHARD:05d}.tar")) as sink:
            for i in range(start, start + PER_SHARD):
                ex = source[i]
                buf = io.BytesIO()
                PIL.Image.fromarray(ex["image"]).resize((64, 64)).save(buf, format="PNG")
                image = b"not an image" if i == 9 else buf.getvalue()
                sink.write({"__key__": f"{i:06d}", "png": image, "txt": ex["caption"]})
    return f"{root}/{{00000..{(NUM - 1) // PER_SHARD:05d}}}.tar"


def _write_tokenizer(cfg, w, name: str, seed: int) -> None:
    """A tokenizer in W's layout (train_tokenizer.train's) with random parameters: no training."""
    c = config_lib.tokenizer_config(cfg, name)
    vcfg = vqgan.VQGANConfig.from_dict(c.vqgan)
    size = int(c.train_tokenizer.image_size)
    abstract = jax.eval_shape(lambda: nn.unbox(vqgan.init_params(vcfg, jax.random.key(0), size)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), abstract)
    d = workdir_lib.tokenizer_dir(w, name)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"vqgan": vcfg.to_dict(), "train_tokenizer": c.train_tokenizer.to_dict(),
                                               "image_size": size}))
    ckpt = ckpt_lib.Checkpointer(d / "checkpoints", async_save=False)
    ckpt.save(1, {"params": params}, force=True)
    ckpt.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, W with both tokenizers, the train split tokenized into W/tokens/train in one run)."""
    root = tmp_path_factory.mktemp("tokenize")
    cfg = config_lib.load_config("smoke", [*TINY, f"--config.data.train_files={_write_shards(root / 'shards')}"])
    w = root / "W"
    for seed, name in enumerate(("base", "superres")):
        _write_tokenizer(cfg, w, name, seed)
    assert cli.main(["data", "tokenize", "--config", "smoke", "--workdir", str(w), "--chunk-size", "6",
                     "--batch-size", "4", *TINY, f"--config.data.train_files={cfg.data.train_files}"]) == 0
    return cfg, w


def _records(directory) -> list[dict]:
    return token_shards.records(directory, token_shards.read_meta(directory))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_tokens_equal_the_in_step_tokens_of_the_same_images(setup, capsys):
    cfg, w = setup
    directory = str(w / "tokens" / "train")
    meta = token_shards.read_meta(directory)
    assert meta["records"] == NUM - 1 and meta["skipped"] == {"corrupt_image": 1}
    assert meta["files"] == [f"p00000-c{c:05d}" for c in range(4)]  # 6 + 6 + 6 + 2 records
    got = _records(directory)
    assert got[0]["tokens_base"].dtype == np.int16 and got[0]["tokens_superres"].shape == (64,)

    ds = image_text.make_dataset(cfg.data, "train", image_size=64, process_index=0, process_count=1, ordered=True)
    examples = [ex for ex in ds if not ex["skip"]]
    assert [r["key"] for r in got] == [ex["key"] for ex in examples]
    assert [r["caption"] for r in got] == [ex["caption"] for ex in examples]
    tokenizers = {s: workdir_lib.load_image_tokenizer(w, name=s) for s in ("base", "superres")}
    mesh = partitioning.make_mesh(cfg.mesh, jax.devices()[:1])
    prep = online.Prepare.build(cfg, "superres", tokenizers, mesh=mesh, rules=partitioning.logical_rules(cfg))
    out = jax.jit(prep.fn)(prep.frozen, {"image": np.stack([ex["image"] for ex in examples])})
    np.testing.assert_array_equal(np.stack([r["tokens_superres"] for r in got]), out["tokens"])
    np.testing.assert_array_equal(np.stack([r["tokens_base"] for r in got]), out["lowres_tokens"])
    assert len(np.unique(out["tokens"])) > 4  # tokens that differ, so the comparison means something

    capsys.readouterr()
    tokenize.run(cfg, w, chunk_size=6, batch_size=4)  # complete: a no-op
    assert "complete already" in capsys.readouterr().out
    other = config_lib.load_config("smoke", [*TINY, f"--config.data.train_files={cfg.data.train_files}",
                                             "--config.data.shuffle_seed=1"])
    with pytest.raises(ValueError, match=r"other settings \(data, data.shuffle_seed differ\)"):
        tokenize.run(other, w)


def test_a_killed_run_resumes_to_the_records_of_one_uninterrupted_run(setup, tmp_path, monkeypatch):
    cfg, w = setup
    write, written = token_shards.write_chunk, []

    def killed_after_two_chunks(directory, process, chunk, records, sidecar):
        if len(written) == 2:  # killed while writing the third chunk
            with open(os.path.join(directory, token_shards.chunk_name(process, chunk) + ".array_record.tmp"), "wb") as f:
                f.write(b"half")
            raise RuntimeError("killed")
        written.append(chunk)
        return write(directory, process, chunk, records, sidecar)

    monkeypatch.setattr(token_shards, "write_chunk", killed_after_two_chunks)
    with pytest.raises(RuntimeError, match="killed"):
        tokenize.run(cfg, w, out=str(tmp_path / "out"), chunk_size=6, batch_size=4)
    assert not (tmp_path / "out" / "meta.json").exists()
    monkeypatch.setattr(token_shards, "write_chunk", write)
    with pytest.raises(ValueError, match="tokens of other settings"):  # a partial run of other data is refused too
        tokenize.run(config_lib.load_config("smoke", [*TINY, f"--config.data.train_files={cfg.data.train_files}",
                                                      "--config.data.random_crop=True"]), w, out=str(tmp_path / "out"))
    meta = tokenize.run(cfg, w, out=str(tmp_path / "out"), chunk_size=6, batch_size=4)
    assert _same(_records(str(tmp_path / "out")), _records(str(w / "tokens" / "train")))
    assert meta["skipped"] == {"corrupt_image": 1} and meta["processes"][0]["records"] == NUM - 1
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["meta.json", "p00000.json"] + [f"p00000-c{c:05d}.{e}" for c in range(4) for e in ("array_record", "json")])


def test_two_processes_write_disjoint_shares_that_cover_the_split(setup, tmp_path):
    cfg, w = setup
    out = str(tmp_path / "two")
    first = tokenize.tokenize_process(cfg, w, out=out, chunk_size=4, batch_size=4, process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError, match="process 1 of 2 has not finished"):
        tokenize.finalize(out, 2)
    second = tokenize.tokenize_process(cfg, w, out=out, chunk_size=4, batch_size=4, process_index=1, process_count=2)
    meta = tokenize.finalize(out, 2)
    keys = [[r["key"] for r in token_shards.records(out, {"files": p["chunks"]})] for p in meta["processes"]]
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(r["key"] for r in _records(str(w / "tokens" / "train")))
    assert first["records"] + second["records"] == meta["records"] == NUM - 1
    assert meta["skipped"] == {"corrupt_image": 1}


def test_a_stage_trains_and_resumes_on_the_tokens(setup):
    cfg, w = setup
    cfg = config_lib.load_config("smoke", TOKENS)
    data = inputs.build(cfg, w, "superres")  # the super-res stage's batches: tokens and low-res tokens
    assert data.prepare is None and data.preview["lowres_tokens"].shape == (4, 16)
    batch = next(data.batches(4))
    assert {k: v.shape for k, v in batch.items()} == {"tokens": (4, 64), "lowres_tokens": (4, 16), "text_ids": (4, 8),
                                                      "text_mask": (4, 8)}
    assert batch["tokens"].dtype == batch["text_ids"].dtype == np.int32

    first = loop.train_stage(cfg, w, "base", stop_at=1, quiet=True)
    rest = loop.train_stage(cfg, w, "base", quiet=True)  # resumes the model and the token stream
    assert sorted(first["losses"]) == [1] and sorted(rest["losses"]) == [2]
    assert all(np.isfinite(v) for v in [*first["losses"].values(), *rest["losses"].values()])
    it = inputs.build(cfg, w, "base").batches(8)
    next(it)
    state = it.get_state()
    again = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["tokens"], again["tokens"])  # the position is exact


def test_a_frozen_t5_runs_in_the_step_on_token_batches():
    cfg = config_lib.load_config("smoke", TINY)
    module = t5.T5Encoder(t5.T5Config.coerce(cfg.text.encoder))
    abstract = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]))
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    mesh = partitioning.make_mesh(cfg.mesh, jax.devices()[:1])
    prep = online.Prepare.text_only(cfg, (module, params), mesh=mesh, rules=partitioning.logical_rules(cfg))
    batch = {"tokens": np.zeros((2, 16), np.int32), "text_ids": np.ones((2, 8), np.int32),
             "text_mask": np.ones((2, 8), bool)}
    out = jax.eval_shape(prep.fn, prep.frozen, batch)  # shapes only: no compilation
    assert sorted(out) == ["text_emb", "text_mask", "tokens"]
    assert out["text_emb"].shape == (2, 8, cfg.text.encoder.d_model)
