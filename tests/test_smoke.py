"""The paper's code path end to end at laptop size: the `smoke` config on 2 processes x 2 CPU devices.

The test writes what a real run starts from: webdataset shards (JPEG shapes scenes at 128 px, by the
`webdataset` package), a sentencepiece model trained on their captions, and a random Hugging Face
`T5EncoderModel` saved with it (transformers' save_pretrained): the pretrained, frozen T5. The mesh
is data=1, fsdp=4; the transformers and the T5 compute in bfloat16; Adafactor.
  1. `muse-jax train-tokenizer --tokenizer all` (f8 at 64 and at 128 px), one process with 4 devices.
  2. `muse-jax train` as a pod job: 2 processes x 2 CPU devices (launch/local.sh), the FSDP axis spanning
     both (parameters are split across the processes), the base stage's tokens and the T5's embeddings
     computed inside the step. Process 1 dies at step 5, after the step-4 checkpoint; process 0 must
     exit by itself.
  3. The relaunched `muse-jax train` resumes the base at step 5, finishes it, then trains the super-res
     stage. Both stages' losses fall.
  4. One process with 4 devices: `muse-jax sample` and `muse-jax edit --mask` (inpainting) through both
     stages and tokenizers: 128 px images, the pixels outside the mask unchanged.
Every child is killed on timeout.
"""
import io
import json
import os
import pathlib
import re
import sys
import time

import conftest
import numpy as np
import PIL.Image
import pytest
from _multidevice import run_with_devices

webdataset = pytest.importorskip("webdataset")

LOCAL_SH = pathlib.Path(__file__).resolve().parent.parent / "launch" / "local.sh"
T5 = dict(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")

TINY = [
    "--config.mesh.data=1", "--config.mesh.fsdp=4",
    # a dead peer is declared after 20 s; shorter timeouts declare live peers dead on a loaded machine
    "--config.distributed.heartbeat_timeout_s=20", "--config.distributed.initialization_timeout_s=60",
    "--config.vqgan.channels=(8,8,8,8)", "--config.vqgan.latent_channels=8", "--config.vqgan.code_dim=8",
    "--config.vqgan.codebook_size=64", "--config.vqgan.norm_groups=4",
    "--config.tokenizers.base.vqgan.channels=(8,8,8,8)", "--config.tokenizers.superres.vqgan.channels=(8,8,8,8)",
    "--config.train_tokenizer.num_steps=2", "--config.train_tokenizer.log_every=1",
    # the frozen T5 (its checkpoint and sentencepiece model are added by the test)
    "--config.text.trainable=False", "--config.text.max_length=24", "--config.text.encoder.dtype=bfloat16",
    *[f"--config.text.encoder.{k}={v}" for k, v in T5.items()],
    *[f"--config.{s}.{k}={v}" for s in ("base", "superres") for k, v in (
        ("codebook_size", 64), ("num_layers", 1), ("width", 32), ("mlp_dim", 64), ("text_dim", T5["d_model"]),
        ("dtype", "bfloat16"))],
    "--config.train.num_steps=8", "--config.train.log_every=1", "--config.train.lr=0.01",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=4",
    "--config.sample.steps=2", "--config.sample.sr_steps=2", "--config.sample.batch_size=4",
]

WORKER = r'''
import json, os, pathlib, sys, time
from muse_jax import cli, config as config_lib, distributed
overrides = json.loads(os.environ["OVERRIDES"])
info = distributed.initialize(config_lib.load_config("smoke", overrides))  # MUSE_* variables from local.sh
import jax
from muse_jax.training import loop

workdir, crash_step = pathlib.Path(sys.argv[1]), int(sys.argv[2])
real_make = loop.step_lib.make_train_step

def make_train_step(*args, **kwargs):  # checks the sharding, prints the losses, kills process 1 at crash_step
    run = real_make(*args, **kwargs)
    def wrapped(state, batch, rng):
        assert {"image", "text_ids"} <= set(batch)  # image tokens and T5 embeddings are computed in the step
        held = lambda x: sum({str(s.index): s.data.size for s in x.addressable_shards}.values())
        assert any(not x.is_fully_addressable and held(x) < x.size for x in jax.tree_util.tree_leaves(state.params))
        step = int(jax.device_get(state.step)) + 1
        stage = "superres" if args[1].config.lowres_grid_size else "base"  # args: (config, model, ...)
        if step == crash_step and stage == "base" and info.process_index == 1:
            ckpt = workdir / "base" / "checkpoints" / str(step - 1)
            t0 = time.time()
            while not ckpt.is_dir() and time.time() - t0 < 30:  # the previous checkpoint is final
                time.sleep(0.1)
            raise RuntimeError(f"injected failure of process 1 at step {step}")
        state, metrics = run(state, batch, rng)
        if info.process_index == 0:
            print(f"LOSS {stage} {step} {float(jax.device_get(metrics['loss']))!r}", flush=True)
        return state, metrics
    wrapped.__dict__.update(run.__dict__)  # .jitted, .mesh, .rules
    return wrapped

loop.step_lib.make_train_step = make_train_step
assert cli.main(["train", "--config", "smoke", "--workdir", str(workdir), *overrides]) == 0
'''


def _write_shards(root, num=48, per_shard=12):
    """Webdataset shards of 128 px JPEG scenes and their captions; returns (pattern, captions)."""
    from muse_jax.data import shapes

    source = shapes.ShapesSource("train", num, seed=0)
    (root / "shards").mkdir()
    captions = []
    for start in range(0, num, per_shard):
        with webdataset.TarWriter(str(root / "shards" / f"{start // per_shard:05d}.tar")) as sink:
            for i in range(start, start + per_shard):
                ex = source[i]
                image = PIL.Image.fromarray(ex["image"]).resize((128, 128), PIL.Image.NEAREST)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": ex["caption"]})
                captions.append(ex["caption"])
    return f"{root}/shards/{{00000..{(num - 1) // per_shard:05d}}}.tar", captions


def _write_t5(directory, captions):
    """A random T5 v1.1-style encoder as a Hugging Face checkpoint, with a sentencepiece model of the captions."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from muse_jax.data import text as text_lib

    spm = text_lib.train_sentencepiece(captions, directory / "spiece.model", T5["vocab_size"], "bpe")
    assert text_lib.TextTokenizer(spm, 24).vocab_size <= T5["vocab_size"]
    torch.manual_seed(0)
    hf = transformers.T5Config(**T5, tie_word_embeddings=False)  # v1.1; pad 0 and EOS 1, as the sentencepiece model
    transformers.T5EncoderModel(hf).save_pretrained(directory)
    return spm


def _launch(tmp_path, name, args, overrides, env, timeout, wait_all=False):
    """Runs the worker on 2 processes x 2 CPU devices with launch/local.sh; kills everything on timeout."""
    worker, logs = tmp_path / "worker.py", tmp_path / f"logs_{name}"
    worker.write_text(WORKER)
    cmd = ["bash", str(LOCAL_SH), "-n", "2", "-d", "2", "-t", str(timeout - 10), "-l", str(logs),
           *(["-w"] if wait_all else []), "--", sys.executable, str(worker), *args]
    env = dict(os.environ, **env, OVERRIDES=json.dumps(overrides), PYTHON=sys.executable,
               XLA_FLAGS=conftest.TEST_XLA_FLAGS)  # local.sh adds the device count
    t0 = time.monotonic()
    returncode, output = conftest.run_process_group(cmd, env=env, timeout=timeout, name=name, cwd=tmp_path)
    p0 = (logs / "process_0.log").read_text() if (logs / "process_0.log").exists() else ""
    p1 = (logs / "process_1.log").read_text() if (logs / "process_1.log").exists() else ""
    return returncode, output, p0, p1, time.monotonic() - t0


def _losses(log, stage):
    """{step: loss} of `stage` from process 0's LOSS lines (progress bars may precede them on a line)."""
    return {int(s): float(v) for s, v in re.findall(rf"LOSS {stage} (\d+) (\S+)", log)}


def test_paper_path_two_processes_frozen_t5_crash_resume_then_sample_and_inpaint(tmp_path):
    files, captions = _write_shards(tmp_path)
    (tmp_path / "t5").mkdir()
    spm = _write_t5(tmp_path / "t5", captions)
    w = tmp_path / "W"
    overrides = [*TINY, f"--config.data.train_files={files}", f"--config.text.checkpoint={tmp_path / 't5'}",
                 f"--config.text.spm_model={spm}"]  # no eval files: no tokenizer evaluation
    # the launches compile the same programs: one persistent compilation cache (training's, W/cache/jax)
    env = dict(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(w / "cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    # 1) both tokenizers, in one process with 4 devices (on 2 processes, each would compile every program)
    run_with_devices(f"""
        from muse_jax import cli
        assert cli.main(["train-tokenizer", "--config", "smoke", "--tokenizer", "all", "--workdir", {str(w)!r},
                         *{overrides!r}]) == 0
    """, n=4, timeout=300, env=env)
    for name in ("base", "superres"):
        assert (w / "tokenizer" / name / "checkpoints").is_dir(), name
        meta = json.loads((w / "tokenizer" / name / "config.json").read_text())
        assert meta["image_size"] == {"base": 64, "superres": 128}[name]

    # 2) the base stage on 2 processes until process 1 dies at step 5; process 0 exits by itself
    #    (-w: local.sh does not stop it)
    rc, output, p0, p1, seconds = _launch(tmp_path, "crash", [str(w), "5"], overrides, env, timeout=360, wait_all=True)
    assert rc != 0, output[-4000:]
    assert "injected failure of process 1 at step 5" in p1, p1[-4000:]
    assert any(msg in p0 for msg in ("another task died", "other processes stop too", "watchdog")), p0[-3000:]
    assert seconds < 350 - 5  # it exited by itself, not at local.sh's timeout
    first = _losses(p0, "base")
    assert sorted(first) == [1, 2, 3, 4], first
    assert (w / "base" / "checkpoints" / "4").is_dir()
    cfg = json.loads((w / "base" / "config.json").read_text())
    assert cfg["base"]["dtype"] == cfg["text"]["encoder"]["dtype"] == "bfloat16"
    assert cfg["train"]["optimizer"] == "adafactor" and not cfg["text"]["trainable"]

    # 3) relaunch: the base resumes at step 5 and finishes, then the super-res stage trains
    rc, output, p0, p1, _ = _launch(tmp_path, "resume", [str(w), "0"], overrides, env, timeout=420)
    assert rc == 0, output[-4000:] + p1[-4000:]
    rest, sr = _losses(p0, "base"), _losses(p0, "superres")
    assert sorted(rest) == [5, 6, 7, 8], "did not resume from the step-4 checkpoint"
    assert sorted(sr) == list(range(1, 9))
    for name, losses in (("base", {**first, **rest}), ("superres", sr)):
        losses = [losses[s] for s in range(1, 9)]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, (name, losses)

    # 4) sampling and inpainting in one process (4 devices, the training mesh): a test scene with its
    #    left half regenerated
    from muse_jax.data import shapes

    image = np.asarray(PIL.Image.fromarray(shapes.ShapesSource("test", 1, seed=0)[0]["image"]).resize((128, 128)))
    PIL.Image.fromarray(image).save(tmp_path / "image.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[:, :64] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    run_with_devices(f"""
        from muse_jax import cli
        assert cli.main(["sample", "--workdir", {str(w)!r}, "--prompt", "a red circle", "--num", "2",
                         "--out-dir", {str(tmp_path / "samples")!r}]) == 0
        assert cli.main(["edit", "--workdir", {str(w)!r}, "--image", {str(tmp_path / "image.png")!r},
                         "--mask", {str(tmp_path / "mask.png")!r}, "--prompt", "a blue square on the left",
                         "--out", {str(tmp_path / "inpainted.png")!r}]) == 0
    """, n=4, timeout=300, env=env)
    for j in range(2):
        sample = np.asarray(PIL.Image.open(tmp_path / "samples" / f"0000_{j:02d}.png"))
        assert sample.shape == (128, 128, 3) and sample.std() > 0
    out = np.asarray(PIL.Image.open(tmp_path / "inpainted.png"))
    assert out.shape == (128, 128, 3)
    np.testing.assert_array_equal(out[:, 64:], image[:, 64:])  # outside the mask: the input's pixels
    assert not np.array_equal(out[:, :64], image[:, :64])
