"""The quickstart end to end with tiny step counts: every stage runs, the report is written, a rerun resumes."""
import json
import os
import re
import signal

import numpy as np
import PIL.Image

from muse_jax import quickstart
from muse_jax.training import loop

TINY = [
    "--config.data.num_train=96", "--config.data.num_test=32",
    "--config.train_tokenizer.num_steps=6", "--config.train_tokenizer.log_every=3",
    "--config.train_tokenizer.eval_batch_size=32", "--config.train_tokenizer.warmup_steps=2",
    "--config.train.num_steps=3", "--config.train.batch_size=8", "--config.train.warmup_steps=1",
    "--config.train.log_every=1", "--config.train.sample_every=0",
    "--config.train_superres.num_steps=3", "--config.train_superres.batch_size=4",
    "--config.sample.steps=2", "--config.sample.sr_steps=2", "--config.sample.batch_size=8",
    "--config.quickstart.eval_prompts=8", "--config.quickstart.sweep_steps=(1, 2)",
    "--config.quickstart.sweep_guidance=(0.0,)", "--config.quickstart.sweep_prompts=4",
    "--config.quickstart.tokenizer_images=32", "--config.quickstart.detector_images=50",
    "--config.quickstart.stage_images=3",
    # Small models: the test is about the stages and the resume, not quality (compiles dominate).
    "--config.vqgan.channels=(8,8,8)", "--config.vqgan.latent_channels=8", "--config.vqgan.code_dim=8",
    "--config.vqgan.codebook_size=64", "--config.vqgan.norm_groups=4",
    "--config.text.vocab_size=64", "--config.text.encoder.vocab_size=64", "--config.text.encoder.d_model=32",
    "--config.text.encoder.d_kv=8", "--config.text.encoder.d_ff=32", "--config.text.encoder.num_layers=1",
    *[f"--config.{s}.{k}={v}" for s in ("base", "superres") for k, v in (
        ("codebook_size", 64), ("num_layers", 1), ("width", 32), ("mlp_dim", 64), ("text_dim", 32))],
    "--config.superres.num_lowres_layers=1",
]


def _checkpoints(workdir):
    return {d: sorted(p.name for p in (workdir / d / "checkpoints").glob("*") if p.name.isdigit())
            for d in ("tokenizer", "base", "superres")}


def test_quickstart_runs_every_stage_and_resumes(tmp_path, monkeypatch):
    # SIGTERM during the base stage's second step: the base checkpoints and the quickstart stops there
    # (super-res, warm-started from the base, must not start from a partial one).
    real, calls = loop.partitioning.shard_batch, {"n": 0}

    def shard_batch(batch, mesh, rules=None):
        if "image" not in batch:  # a transformer batch, not a tokenizer one
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, mesh, rules)

    monkeypatch.setattr(loop.partitioning, "shard_batch", shard_batch)
    w = tmp_path / "W"
    assert quickstart.run(str(w), "shapes", TINY) is None
    assert _checkpoints(w) == {"tokenizer": ["6"], "base": ["2"], "superres": []}
    monkeypatch.undo()

    report = quickstart.run(str(w), "shapes", TINY)
    assert report == w / "report.md"
    text = report.read_text()
    for section in ("## Samples", "## Text alignment", "## Tokenizer", "## Time", "## Go further"):
        assert section in text
    assert "muse-jax sample --workdir" in text and "muse-jax edit --workdir" in text
    for group in ("one_seen", "one_heldout", "relation", "places"):
        assert re.search(rf"\| {group} \| 2 \| \d+\.\d %", text), group
    assert _checkpoints(w) == {"tokenizer": ["6"], "base": ["2", "3"], "superres": ["3"]}

    grid = np.asarray(PIL.Image.open(w / "samples" / "prompts_grid.png"))
    assert grid.shape[0] > grid.shape[1]  # one row of 4 samples per prompt, 9 prompts
    ev = json.loads((w / "eval" / "eval.json").read_text())
    assert ev["detector_accuracy"]["all"] >= 0.99  # the evaluator is validated before it judges
    assert ev["generation"]["alignment"]["num"] == 8
    assert 0 < ev["tokenizer"]["psnr"] < 100 and 0 < ev["tokenizer"]["psnr_lowres"] < 100
    kept = ev["tokenizer"]["alignment"]
    assert set(kept) == {"full size", "base size"}
    assert sum(r["num"] for r in kept["full size"].values()) == ev["tokenizer"]["num_images"]
    assert "| base size | " in text
    assert [r["steps"] for r in ev["sweeps"]["steps"]["results"]] == [1, 2]
    for kind in ("one object", "two objects"):
        assert ev["stages"][kind]["real images"]["all"] == 1.0 and ev["stages"][kind]["whole cascade"]["num"] == 3
        assert f"3 test captions of {kind}:" in text
    assert "### Stage by stage" in text and text.count("| whole cascade |") == 2
    assert "relation" in ev["stages"]["two objects"]["real images"]["attributes"]
    assert (w / "eval" / "sweep_steps.png").is_file() and (w / "eval" / "sweep_guidance.json").is_file()

    # Same workdir again: every training stage resumes at its last checkpoint instead of training,
    # and the sample grid and the evaluation, made from the same checkpoints, are not redone.
    kept = [*w.glob("*/checkpoints/*"), w / "eval" / "eval.json", w / "samples" / "prompts_grid.png"]
    mtimes = {p: p.stat().st_mtime for p in kept}
    (w / "report.md").unlink()
    quickstart.run(str(w), "shapes", TINY)
    assert _checkpoints(w) == {"tokenizer": ["6"], "base": ["2", "3"], "superres": ["3"]}
    assert {p: p.stat().st_mtime for p in kept} == mtimes
    assert "| one_seen | 2 |" in report.read_text()  # the report again, from the saved evaluation
