"""The paper-shaped path end to end at laptop size: the `smoke` config on webdataset shards.

Shards written with the `webdataset` package (JPEG shapes scenes at 128 px); on 8 CPU devices
with FSDP (data=2, fsdp=4): a tokenizer per stage (f8 at 64 and at 128 px), the base and the
super-res stage trained with tokens computed inside the step (their losses fall), a resume that
continues the data stream, then `muse-jax sample` draws a 128 px image through both tokenizers.
"""
import json

import numpy as np
import PIL.Image
import pytest
from _multidevice import run_with_devices

webdataset = pytest.importorskip("webdataset")

TINY = [
    "--config.mesh.data=2", "--config.mesh.fsdp=4",
    "--config.vqgan.channels=(8,8,8,8)", "--config.vqgan.latent_channels=8", "--config.vqgan.code_dim=8",
    "--config.vqgan.codebook_size=64", "--config.vqgan.norm_groups=4",
    "--config.tokenizers.base.vqgan.channels=(8,8,8,8)", "--config.tokenizers.superres.vqgan.channels=(8,8,8,8)",
    "--config.train_tokenizer.num_steps=2", "--config.train_tokenizer.log_every=1",
    "--config.text.vocab_size=64", "--config.text.encoder.vocab_size=64",
    *[f"--config.{s}.{k}={v}" for s in ("base", "superres") for k, v in (
        ("codebook_size", 64), ("num_layers", 1), ("width", 32), ("mlp_dim", 64), ("text_dim", 64))],
    "--config.train.num_steps=12", "--config.train.log_every=1", "--config.train.lr=0.01",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=6", "--config.train.matmul_precision=highest",
    "--config.sample.steps=2", "--config.sample.sr_steps=2", "--config.sample.batch_size=8",
]


def _write_shards(root, num=48, per_shard=16):
    from muse_jax.data import shapes

    source = shapes.ShapesSource("train", num, seed=0)
    (root / "shards").mkdir()
    for start in range(0, num, per_shard):
        with webdataset.TarWriter(str(root / "shards" / f"{start // per_shard:05d}.tar")) as sink:
            for i in range(start, start + per_shard):
                ex = source[i]
                image = PIL.Image.fromarray(ex["image"]).resize((128, 128), PIL.Image.NEAREST)
                import io

                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": ex["caption"]})
    return f"{root}/shards/{{00000..{(num - 1) // per_shard:05d}}}.tar"


def test_smoke_config_trains_both_tokenizers_and_stages_on_shards_then_samples(tmp_path):
    files = _write_shards(tmp_path)
    w = tmp_path / "W"
    overrides = [*TINY, f"--config.data.train_files={files}"]  # no eval files: no tokenizer evaluation
    out = run_with_devices(f"""
        import json
        from muse_jax import cli, config as config_lib
        from muse_jax.training import loop, train_tokenizer
        overrides = {overrides!r}
        cfg = config_lib.load_config("smoke", overrides)
        assert cli.main(["train-tokenizer", "--config", "smoke", "--tokenizer", "all", "--workdir", {str(w)!r},
                         *overrides]) == 0
        first = loop.train_stage(cfg, {str(w)!r}, "base", stop_at=6, quiet=True)   # a preemption at step 6
        rest = loop.train_stage(cfg, {str(w)!r}, "base", quiet=True)               # resumes there
        sr = loop.train_stage(cfg, {str(w)!r}, "superres", quiet=True)
        print("RESULT", json.dumps({{"base": {{**first["losses"], **rest["losses"]}}, "resumed": sorted(rest["losses"]),
                                    "superres": sr["losses"]}}))
        assert cli.main(["sample", "--workdir", {str(w)!r}, "--prompt", "a red circle", "--num", "2",
                         "--out", {str(tmp_path / "sample.png")!r}]) == 0
    """, timeout=600)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    for name in ("base", "superres"):
        assert (w / "tokenizer" / name / "checkpoints").is_dir(), name
        meta = json.loads((w / "tokenizer" / name / "config.json").read_text())
        assert meta["image_size"] == {"base": 64, "superres": 128}[name]
    assert result["resumed"] == list(range(7, 13))  # the second run started at step 7
    for name in ("base", "superres"):
        losses = [result[name][str(s)] for s in range(1, 13)]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, (name, losses)
    grid = np.asarray(PIL.Image.open(tmp_path / "sample.png"))
    assert grid.shape[0] >= 128 and grid.shape[1] >= 2 * 128 and grid.std() > 0
