"""`muse-jax train-tokenizer`: trains the VQGAN image tokenizer, top to bottom, then evaluates it.

Reads top to bottom: mesh and data -> sharded state (`tokenizer_step.py`), restored if a checkpoint
exists -> the jitted step in a loop with metrics, checkpoints and SIGTERM handling -> the test
split's reconstruction metrics (`evaluate`) into W/tokenizer/eval.json. Where it writes:
muse_jax/workdir.py (W/tokenizer/).
"""
from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from muse_jax import amused, distributed, image_ops, partitioning
from muse_jax import checkpoint as ckpt_lib
from muse_jax import config as config_lib
from muse_jax import workdir as workdir_lib
from muse_jax import writer as writer_lib
from muse_jax.data import image_text, shapes, sources
from muse_jax.data import loader as loader_lib
from muse_jax.models import vqgan
from muse_jax.models import vqgan_losses as losses
from muse_jax.training import lock as lock_lib
from muse_jax.training import tokenizer_step as tokenizer_lib

# ---------------------------------------------------------------------------------------
# Evaluation: PSNR of uint8 reconstructions, codebook usage, palette fidelity
# ---------------------------------------------------------------------------------------

PALETTE = np.array(list(shapes.BACKGROUNDS.values()) + list(shapes.COLORS.values()), np.int32)


def palette_stats(images: np.ndarray, recon: np.ndarray) -> tuple[int, int, int]:
    """(solid pixels, of which keep their palette colour, images whose solid pixels all >= 99% kept).

    A solid pixel is one whose colour is exactly a palette colour (background or object
    interior); it is kept when the reconstruction's nearest palette colour is the same.
    """
    img, rec = images.astype(np.int32), recon.astype(np.int32)
    d_img = ((img[..., None, :] - PALETTE) ** 2).sum(-1)
    d_rec = ((rec[..., None, :] - PALETTE) ** 2).sum(-1)
    solid = d_img.min(-1) == 0
    kept = (d_img.argmin(-1) == d_rec.argmin(-1)) & solid
    per_image = kept.sum((1, 2)) / np.maximum(solid.sum((1, 2)), 1)
    return int(solid.sum()), int(kept.sum()), int((per_image >= 0.99).sum())


def evaluate(tokenizer: vqgan.ImageTokenizer, loader, max_batches: int | None = None, num_samples: int = 16):
    """Reconstructs the split in `loader` -> (metrics, (originals, reconstructions) of the first images).

    Metrics: psnr (dB, uint8 reconstructions), usage and perplexity of the codes over the
    whole split, palette_acc and palette_images (see `palette_stats`), and psnr_lowres (the
    images area-downsampled by 2, as the base stage tokenizes them).
    """
    K = tokenizer.codebook_size
    psnrs, psnrs_lo, counts = [], [], np.zeros(K, np.int64)
    solid = kept = good = n = 0
    samples = None
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images = np.asarray(batch["image"])
        tokens = tokenizer.encode(images)
        rec, tokens = jax.device_get((tokenizer.decode(tokens), tokens))
        mse = ((rec.astype(np.float64) - images) ** 2).mean((1, 2, 3))
        psnrs.extend(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))
        lo = image_ops.downsample_area(images, 2)
        rec_lo = np.asarray(jax.device_get(tokenizer.decode(tokenizer.encode(lo))))
        mse = ((rec_lo.astype(np.float64) - lo) ** 2).mean((1, 2, 3))
        psnrs_lo.extend(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)))
        counts += np.bincount(tokens.reshape(-1), minlength=K)
        s, k, g = palette_stats(images, rec)
        solid, kept, good, n = solid + s, kept + k, good + g, n + len(images)
        if samples is None:
            samples = (images[:num_samples], rec[:num_samples])
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    metrics = {
        "psnr": float(np.mean(psnrs)),
        "psnr_lowres": float(np.mean(psnrs_lo)),
        "usage": float((counts > 0).mean()),
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
        "palette_acc": kept / max(solid, 1),
        "palette_images": good / max(n, 1),
        "num_images": n,
    }
    return metrics, samples


# ---------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------


def shapes_scale(config, workdir, image_size: int) -> int:
    """How much the shapes images are area-downsampled to `image_size` (1: used as they are)."""
    size = sources.make_source(config.data, "test", workdir_lib.data_dir(workdir))[0]["image"].shape[0]
    if image_size > size or size % image_size:
        raise ValueError(f"config.train_tokenizer.image_size={image_size} must divide the shapes images' "
                         f"{size} px (they are area-downsampled to it)")
    return size // image_size


def train_batches(config, workdir, image_size: int, batch_size: int):
    """This process's training batches (a checkpointable iterator); shapes images come at their own size
    (the loop downsamples them, `shapes_scale`), real images at `image_size`."""
    if sources.is_shapes(config.data):
        source = sources.make_source(config.data, "train", workdir_lib.data_dir(workdir))
        return iter(loader_lib.make_loader(source, batch_size=batch_size, seed=config.data.shuffle_seed))
    return image_text.Batches(image_text.make_dataset(config.data, "train", image_size=image_size), batch_size)


def eval_batches(config, workdir, image_size: int, batch_size: int):
    """The test split in batches for the final evaluation; None for real data without eval files."""
    if sources.is_shapes(config.data):
        source = sources.make_source(config.data, "test", workdir_lib.data_dir(workdir))
        loader = loader_lib.make_loader(source, batch_size=batch_size, shuffle=False, num_epochs=1, drop_remainder=False)
        scale = shapes_scale(config, workdir, image_size)
        return ({"image": image_ops.downsample_area(b["image"], scale)} for b in loader) if scale > 1 else loader
    if config.data.source != "tfds" and not config.data.get("eval_files", ""):
        return None
    return image_text.Batches(image_text.make_dataset(config.data, "eval", image_size=image_size), batch_size)


def train(config, workdir, *, name: str = "", num_steps: int | None = None, quiet: bool = False) -> dict[str, float]:
    """Trains (or resumes) the tokenizer in W/tokenizer (or W/tokenizer/<name>, with the sections of
    `config.tokenizers.<name>`); returns the final test evaluation. The folder is locked while it trains
    (muse_jax/training/lock.py): a second run on it is refused before it writes anything, as is a
    checkpoint folder that cannot be written (before compiling)."""
    workdir = workdir_lib.path(workdir)
    amused.refuse_tokenizer_training(workdir)
    config = config_lib.tokenizer_config(config, name)
    tok_dir = workdir_lib.tokenizer_dir(workdir, name)
    what = f"the tokenizer {name!r}" if name else "the shared tokenizer"
    with lock_lib.hold(tok_dir, what, timeout_s=lock_lib.timeout_s(config)):
        lock_lib.check_writable(tok_dir / "checkpoints")
        return _train_locked(config, workdir, tok_dir, name=name, num_steps=num_steps, quiet=quiet)


def _train_locked(config, workdir, tok_dir, *, name: str, num_steps: int | None, quiet: bool) -> dict[str, float]:
    """`train` once `tok_dir` is this run's (`config` with the sections of `config.tokenizers.<name>`)."""
    tcfg = config.train_tokenizer
    vcfg = vqgan.VQGANConfig.from_dict(config.vqgan)
    num_steps = tcfg.num_steps if num_steps is None else num_steps
    image_size = int(tcfg.image_size)
    lowres_every = int(tcfg.get("lowres_every", 0))
    if lowres_every and (image_size // 2) % vcfg.factor:
        raise ValueError(f"train_tokenizer.lowres_every needs image_size / 2 = {image_size // 2} divisible by "
                         f"the factor {vcfg.factor}")
    if image_size % vcfg.factor:
        raise ValueError(f"train_tokenizer.image_size={image_size} is not divisible by the factor {vcfg.factor}")
    meta = {"vqgan": vcfg.to_dict(), "train_tokenizer": tcfg.to_dict(), "image_size": image_size}
    cfg_path = tok_dir / workdir_lib.CONFIG_FILE
    if cfg_path.is_file() and json.loads(cfg_path.read_text()).get("vqgan") != meta["vqgan"]:
        raise ValueError(f"{cfg_path} holds a different VQGAN config; use a fresh workdir to change the model")
    cfg_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    config_lib.save_config(config, tok_dir / "full_config.json")

    perceptual = None
    if tcfg.perceptual_weight > 0:
        perceptual = losses.load_perceptual_weights(tcfg.perceptual_weights_path)

    # Mesh, data.
    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.logical_rules(config)
    partitioning.check_batch_divides(tcfg.batch_size, mesh, rules)
    local_batch = loader_lib.per_process_batch_size(tcfg.batch_size)
    it = train_batches(config, workdir, image_size, local_batch)
    scale = shapes_scale(config, workdir, image_size) if sources.is_shapes(config.data) else 1

    # State, sharded by the logical-axis rules.
    model, disc, tx, dtx, create_state = tokenizer_lib.build(vcfg, tcfg, image_size)
    rng = jax.random.key(config.seed)
    init_rng, rng = jax.random.split(rng)
    abstract = jax.eval_shape(create_state, init_rng)
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    restore_target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)  # outside the mesh context
    ckpt = ckpt_lib.Checkpointer(tok_dir / "checkpoints", save_every=tcfg.checkpoint_every, keep=tcfg.keep_checkpoints)
    start = 0
    with partitioning.axis_rules(mesh, rules):
        if ckpt.latest_step() is not None:
            state, start = ckpt.restore(restore_target, data_iterator=it)
        else:
            state = jax.jit(lambda r: nn.unbox(create_state(r)), out_shardings=shardings)(init_rng)

        train_step = tokenizer_lib.make_train_step(model, disc, tx, dtx, vcfg, tcfg, perceptual)
        image_sharding = partitioning.batch_sharding(mesh, rules, 4)
        p_step = jax.jit(
            train_step,
            in_shardings=(shardings, image_sharding, None),
            out_shardings=(shardings, None),
            donate_argnums=(0,),
        )

        writer = writer_lib.MetricWriter(tok_dir / "tb", console=not quiet)
        if start == 0:
            writer.write_hparams(meta)
        t0, last_log, status = time.time(), time.time(), "done"
        bar = writer_lib.progress(range(start, num_steps), initial=start, total=num_steps, desc="tokenizer", disable=quiet or None)
        with ckpt_lib.PreemptionHandler() as preempt:
            for step in bar:
                images = next(it)["image"]
                if scale > 1:
                    images = image_ops.downsample_area(images, scale)
                if lowres_every and step % lowres_every == lowres_every - 1:
                    # The base stage tokenizes images at half the size (2x2 area means): train on those too.
                    images = image_ops.downsample_area(images, 2)
                batch = partitioning.shard_batch({"image": images}, mesh, rules)
                state, metrics = p_step(state, batch["image"], jax.random.fold_in(rng, step))
                done = step + 1
                if done % tcfg.log_every == 0 or done == num_steps:
                    metrics = jax.device_get(metrics)
                    ckpt_lib.check_finite(metrics, done)
                    now = time.time()
                    metrics["steps_per_s"] = tcfg.log_every / max(now - last_log, 1e-9)
                    last_log = now
                    writer.write_scalars(done, {f"train/{k}": v for k, v in metrics.items()})
                    if hasattr(it, "metrics"):  # real data: records all processes skipped, by kind
                        writer.write_scalars(done, distributed.sum_counts(it.metrics()))
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(psnr=f"{float(metrics['psnr']):.2f}", usage=f"{float(metrics['usage']):.2f}")
                ckpt.save(done, state, data_iterator=it, force=done == num_steps)
                if preempt.should_stop():
                    ckpt.save(done, state, data_iterator=it, force=True)
                    status = "preempted"
                    break
        ckpt.close()
        train_time = time.time() - t0

        # Final evaluation on the test split (not when preempted: the run resumes later).
        result = {"step": int(state.step), "train_seconds": train_time, "status": status}
        eval_loader = None if status == "preempted" else eval_batches(config, workdir, image_size, tcfg.eval_batch_size)
        if status == "preempted":
            print(f"tokenizer {name or '(shared)'}: stopped at step {result['step']} on SIGTERM or Ctrl-C (checkpoint saved)")
        elif eval_loader is None:
            print("tokenizer: no config.data.eval_files, so no final evaluation")
        else:
            # Each process evaluates its share of the test split with a whole copy of the (small) VQGAN,
            # gathered from the mesh however its shards are spread over processes.
            tokenizer = vqgan.ImageTokenizer(vcfg, multihost_utils.process_allgather(state.params, tiled=True))
            metrics, (originals, recons) = evaluate(tokenizer, eval_loader, tcfg.eval_max_batches or None)
            result.update(metrics)
            writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in result.items() if k not in ("step", "status")})
            writer.write_images(int(state.step), {"eval/originals": originals, "eval/reconstructions": recons})
        writer.close()
    skipped = distributed.sum_counts(it.skipped or {}) if hasattr(it, "skipped") else {}  # every process calls it
    if skipped:
        result["skipped"] = skipped
        if jax.process_index() == 0:
            print(f"tokenizer: skipped records {skipped} (all processes)")
    if jax.process_index() == 0 and status == "done":
        (tok_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
