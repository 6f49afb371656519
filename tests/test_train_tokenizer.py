"""`muse-jax train-tokenizer` with a tiny model: the loss falls, checkpoints resume exactly."""
import json
import os
import shutil
import signal

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import pytest
from _multidevice import run_with_devices

from muse_jax import cli, workdir
from muse_jax import config as config_lib
from muse_jax.data import shapes
from muse_jax.models import vqgan
from muse_jax.training import tokenizer_step as tokenizer_lib
from muse_jax.training import train_tokenizer

TINY = [
    "--config.data.source=procedural",
    "--config.data.num_train=64",
    "--config.data.num_test=8",
    "--config.vqgan.channels=(8,8,8)",
    "--config.vqgan.num_res_blocks=0",
    "--config.vqgan.latent_channels=8",
    "--config.vqgan.code_dim=8",
    "--config.vqgan.codebook_size=64",
    "--config.vqgan.norm_groups=4",
    "--config.train_tokenizer.batch_size=4",
    "--config.train_tokenizer.num_steps=4",
    "--config.train_tokenizer.warmup_steps=1",
    "--config.train_tokenizer.log_every=2",
    "--config.train_tokenizer.checkpoint_every=2",
    "--config.train_tokenizer.restart_every=2",
    "--config.train_tokenizer.eval_batch_size=4",
    "--config.train_tokenizer.eval_max_batches=1",
]


def _images(n, split="train"):
    return np.stack([shapes.make_example(0, split, i)["image"] for i in range(n)])


def test_adversarial_step_runs_and_updates_the_discriminator():
    cfg = config_lib.load_config("shapes", TINY + [
        "--config.train_tokenizer.adversarial_weight=0.1",
        "--config.train_tokenizer.disc_start=1",
        "--config.train_tokenizer.disc_channels=8",
        "--config.train_tokenizer.disc_layers=2",
        "--config.train_tokenizer.disc_norm_groups=4",
        "--config.train_tokenizer.lecam_weight=0.01",
        "--config.train_tokenizer.r1_weight=0.1",
    ])
    vcfg = vqgan.VQGANConfig.from_dict(cfg.vqgan)
    tcfg = cfg.train_tokenizer
    model, disc, tx, dtx, create_state = tokenizer_lib.build(vcfg, tcfg, 64)
    state0 = nn.unbox(create_state(jax.random.key(0)))
    step = jax.jit(tokenizer_lib.make_train_step(model, disc, tx, dtx, vcfg, tcfg))
    state1, m1 = step(state0, _images(4), jax.random.key(0))  # step 0 < disc_start: D frozen
    state2, m2 = step(state1, _images(4), jax.random.key(1))  # D's first step: warm-up lr 0
    state2, m2 = step(state2, _images(4), jax.random.key(2))
    same = jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), state0.disc_params, state1.disc_params)
    assert all(jax.tree_util.tree_leaves(same))
    changed = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()), state1.disc_params, state2.disc_params)
    assert any(jax.tree_util.tree_leaves(changed))
    for k in ("d_loss", "g_adv_loss", "r1", "lecam"):
        assert np.isfinite(float(m2[k])), k


def test_train_resume_and_load(tmp_path, capsys):
    cfg = config_lib.load_config("shapes", TINY)
    a, b = tmp_path / "a", tmp_path / "b"
    result = train_tokenizer.train(cfg, a, quiet=True)  # checkpoints at steps 2 and 4
    assert result["step"] == 4 and 0 < result["psnr"] < 60 and 0 < result["usage"] <= 1
    assert json.loads((a / "tokenizer" / "eval.json").read_text())["step"] == 4
    # Resuming from step 2 (model, optimizer and data position) reproduces step 4 exactly.
    shutil.copytree(a, b)
    shutil.rmtree(b / "tokenizer" / "checkpoints" / "4")
    assert train_tokenizer.train(cfg, b, quiet=True)["step"] == 4

    images = _images(2, "test")
    tok_a, tok_b = workdir.load_image_tokenizer(a), workdir.load_image_tokenizer(b)
    assert tok_a.factor == 4 and tok_a.codebook_size == 64
    tokens = tok_a.encode(images)
    assert tokens.shape == (2, 16, 16) and tokens.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(tok_b.encode(images)))
    rec = tok_a.decode(tokens)
    assert rec.shape == (2, 64, 64, 3) and rec.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(rec), np.asarray(tok_b.decode(tokens)))
    # An earlier step is a different tokenizer.
    tok_2 = workdir.load_image_tokenizer(a, step=2)
    assert not np.array_equal(np.asarray(tok_2.decode(tokens)), np.asarray(rec))

    # `muse-jax reconstruct` writes same-named PNGs and prints PSNR.
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, img in enumerate(images):
        PIL.Image.fromarray(img).save(src / f"img{i}.png")
    assert cli.main(["reconstruct", "--workdir", str(a), "--in", str(src), "--out", str(out)]) == 0
    assert "mean psnr over 2 images" in capsys.readouterr().out
    for i in range(2):  # the CLI reconstructs one image at a time
        got = np.asarray(PIL.Image.open(out / f"img{i}.png"))
        np.testing.assert_array_equal(got, np.asarray(tok_a.reconstruct(images[i : i + 1]))[0])


def test_sigterm_checkpoints_skips_the_evaluation_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = config_lib.load_config("shapes", TINY + ["--config.train_tokenizer.checkpoint_every=100"])
    whole = train_tokenizer.train(cfg, tmp_path / "whole", quiet=True)
    real, calls = train_tokenizer.partitioning.shard_batch, {"n": 0}

    def shard_batch(batch, mesh, rules=None):  # SIGTERM while the third batch is prepared
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, mesh, rules)

    monkeypatch.setattr(train_tokenizer.partitioning, "shard_batch", shard_batch)
    w = tmp_path / "stopped"
    stopped = train_tokenizer.train(cfg, w, quiet=True)
    assert stopped["status"] == "preempted" and stopped["step"] == 3 and "psnr" not in stopped
    assert not (w / "tokenizer" / "eval.json").exists()
    assert sorted(p.name for p in (w / "tokenizer" / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    monkeypatch.undo()
    resumed = train_tokenizer.train(cfg, w, quiet=True)
    assert resumed["status"] == "done" and resumed["step"] == 4 and resumed["psnr"] == whole["psnr"]
    a, b = (jax.tree_util.tree_leaves(workdir.load_image_tokenizer(d).params) for d in (tmp_path / "whole", w))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tokenizer_at_the_base_stage_size_trains_on_downsampled_images(tmp_path):
    """shapes:long's base tokenizer: f2 at 32 px, the 64 px images area-downsampled by 2."""
    from muse_jax import image_ops

    cfg = config_lib.load_config("shapes:long", TINY)
    with cfg.unlocked():
        cfg.tokenizers.base.train_tokenizer.update(dict(batch_size=4, num_steps=4))
    result = train_tokenizer.train(cfg, tmp_path, name="base", quiet=True)
    tok = workdir.load_image_tokenizer(tmp_path, name="base")
    assert tok.factor == 2 and result["step"] == 4
    # The final evaluation reconstructed the first 4 test images at 32 px.
    small = image_ops.downsample_area(_images(4, "test"), 2)
    rec = np.asarray(tok.decode(tok.encode(small)))
    assert rec.shape == (4, 32, 32, 3)
    mse = ((rec.astype(np.float64) - small) ** 2).mean((1, 2, 3))
    np.testing.assert_allclose(result["psnr"], np.mean(10 * np.log10(255.0**2 / mse)), rtol=1e-6)

    with cfg.unlocked():
        cfg.tokenizers.base.train_tokenizer.image_size = 48
    with pytest.raises(ValueError, match="must divide the shapes images' 64 px"):
        train_tokenizer.train(cfg, tmp_path / "other", name="base", quiet=True)


def test_missing_or_corrupt_tokenizer_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no trained tokenizer"):
        workdir.load_image_tokenizer(tmp_path)
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        workdir.load_image_tokenizer(tmp_path)
    cfg = config_lib.load_config("shapes", TINY)
    meta = {"vqgan": vqgan.VQGANConfig.from_dict(cfg.vqgan).to_dict(),
            "train_tokenizer": cfg.train_tokenizer.to_dict(), "image_size": 64}
    (tok / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        workdir.load_image_tokenizer(tmp_path)
    (tmp_path / "pngs").mkdir()
    PIL.Image.fromarray(_images(1)[0]).save(tmp_path / "pngs" / "x.png")
    assert cli.main(["reconstruct", "--workdir", str(tmp_path), "--in", str(tmp_path / "pngs"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot load the tokenizer" in capsys.readouterr().err


def test_perceptual_loss_without_weights_is_a_clear_error(tmp_path):
    cfg = config_lib.load_config("shapes", TINY + ["--config.train_tokenizer.perceptual_weight=0.1"])
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        train_tokenizer.train(cfg, tmp_path, quiet=True)


def test_loss_falls_and_sharded_step_matches_one_device():
    """The loss falls on shapes; on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices the
    step gives the same losses, and the sharded tokenizer the same tokens, as one device."""
    out = run_with_devices(
        f"""
        import json, jax, numpy as np, flax.linen as nn
        from muse_jax import config as config_lib
        from muse_jax.data import shapes
        from muse_jax.models import vqgan
        from muse_jax import partitioning
        from muse_jax.training import tokenizer_step as tokenizer_lib
        cfg = config_lib.load_config("shapes", {TINY!r} + ["--config.train_tokenizer.batch_size=8",
                                                       "--config.train_tokenizer.lr=3e-3"])
        vcfg, tcfg = vqgan.VQGANConfig.from_dict(cfg.vqgan), cfg.train_tokenizer
        model, disc, tx, dtx, create_state = tokenizer_lib.build(vcfg, tcfg, 64)
        step_fn = tokenizer_lib.make_train_step(model, disc, tx, dtx, vcfg, tcfg)
        images = np.stack([shapes.make_example(0, "train", i)["image"] for i in range(8)])
        rng = jax.random.key(0)

        def run(state, step):
            losses = []
            for i in range(6):
                state, m = step(state, images, jax.random.fold_in(rng, i))
                losses.append(float(m["loss"]))
            return state, losses

        state1, ref = run(nn.unbox(create_state(rng)), jax.jit(step_fn))
        mesh = partitioning.make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
        rules = partitioning.DEFAULT_RULES
        abstract = jax.eval_shape(create_state, rng)
        sh = partitioning.state_shardings(abstract, mesh, rules)
        with partitioning.axis_rules(mesh, rules):
            state = jax.jit(lambda r: nn.unbox(create_state(r)), out_shardings=sh)(rng)
            step = jax.jit(step_fn, in_shardings=(sh, partitioning.batch_sharding(mesh, rules, 4), None),
                           out_shardings=(sh, None))
            state8, got = run(state, step)
        cb = state8.params["quantizer"]["codebook"]
        tok1 = vqgan.ImageTokenizer(vcfg, state1.params)
        tok8 = vqgan.ImageTokenizer(vcfg, state8.params, mesh=mesh)
        t8 = tok8.encode(images)
        print(json.dumps(dict(ref=ref, got=got, cb_shards=len(cb.sharding.device_set),
                              t_sharded=len(t8.sharding.device_set),
                              same_tokens=bool((np.asarray(tok1.encode(images)) == np.asarray(t8)).mean() > 0.99),
                              rec_diff=int(np.abs(np.asarray(tok1.decode(t8), np.int32)
                                                  - np.asarray(tok8.decode(t8), np.int32)).max()))))
        """
    )
    r = json.loads(out.strip().splitlines()[-1])
    assert r["ref"][-1] < 0.7 * r["ref"][0], r["ref"]
    np.testing.assert_allclose(r["got"], r["ref"], rtol=2e-4)
    assert r["cb_shards"] == 8 and r["t_sharded"] == 8
    assert r["same_tokens"] and r["rec_diff"] <= 1
