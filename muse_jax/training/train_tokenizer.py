"""`muse-jax train-tokenizer`: trains the VQGAN image tokenizer, top to bottom.

Workdir layout:
  W/data/                        the dataset (tfds array_record, built once)
  W/tokenizer/config.json        {"vqgan": model config, "train_tokenizer": ..., "image_size": ...}
  W/tokenizer/checkpoints/<step> Orbax checkpoints (train state + data-iterator position)
  W/tokenizer/tb/                TensorBoard events
  W/tokenizer/eval.json          the final evaluation on the test split
W may be a bucket URI (gs://...): the dataset then goes to a local folder (muse_jax.paths.local_dir).

Losses (generator): rec_weight * L1|L2 + codebook + beta * commitment
  [+ perceptual_weight * LPIPS-style VGG distance] [+ adversarial_weight * GAN loss after
  disc_start]. Discriminator: hinge or non-saturating [+ R1 or LeCam].
Codebook safeguards: l2-normalised codes (config.vqgan.l2_normalize) and dead-code restarts
(a code whose usage EMA falls below `dead_code_fraction / K` is reset to a random latent of
the current batch every `restart_every` steps, until `restart_until`).
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from muse_jax import config as config_lib, editing
from muse_jax import paths
from muse_jax.data import pipeline, shapes
from muse_jax.models import discriminator as disc_lib
from muse_jax.models import vqgan
from muse_jax.models import vqgan_losses as losses
from muse_jax.training import checkpoint as ckpt_lib
from muse_jax.training import partitioning
from muse_jax.training import writer as writer_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # VQGAN
    opt_state: Any
    disc_params: Any  # PatchDiscriminator ({} without the adversarial loss)
    disc_opt_state: Any
    code_usage: jax.Array  # [K] EMA of each code's share of the tokens
    lecam_ema: jax.Array  # [2] EMAs of the mean real / fake discriminator logits


def _adversarial(tcfg) -> bool:
    return tcfg.adversarial_weight > 0


def make_optimizer(tcfg, lr: float) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up and cosine decay, global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(1, tcfg.warmup_steps), max(tcfg.num_steps, tcfg.warmup_steps + 1), end_value=lr * tcfg.end_lr_fraction
    )
    return optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adamw(schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay),
    )


def build(vcfg: vqgan.VQGANConfig, tcfg, image_size: int):
    """The model, discriminator, optimizers and `create_state(rng) -> boxed TrainState`."""
    model = vqgan.VQGAN(vcfg)
    disc = disc_lib.PatchDiscriminator(tcfg.disc_channels, tcfg.disc_layers, tcfg.disc_norm_groups)
    tx = make_optimizer(tcfg, tcfg.lr)
    dtx = make_optimizer(tcfg, tcfg.disc_lr)

    def create_state(rng):
        r1, r2 = jax.random.split(rng)
        x = jnp.zeros((1, image_size, image_size, vcfg.in_channels), jnp.float32)
        params = model.init(r1, x)["params"]
        disc_params = disc.init(r2, x)["params"] if _adversarial(tcfg) else {}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(nn.unbox(params)),
            disc_params=disc_params,
            disc_opt_state=dtx.init(nn.unbox(disc_params)),
            code_usage=jnp.full((vcfg.codebook_size,), 1.0 / vcfg.codebook_size, jnp.float32),
            lecam_ema=jnp.zeros((2,), jnp.float32),
        )

    return model, disc, tx, dtx, create_state


def make_train_step(model, disc, tx, dtx, vcfg, tcfg, perceptual_weights=None):
    """(state, images uint8 [B,H,W,3], rng) -> (state, metrics); pure, jit it."""
    adversarial = _adversarial(tcfg)
    K = vcfg.codebook_size

    def generator_loss(params, disc_params, images, step):
        recon, aux = model.apply({"params": params}, images)
        rec = losses.reconstruction_loss(recon, images, tcfg.reconstruction_loss)
        loss = tcfg.rec_weight * rec + aux["quantizer"]
        metrics = {"rec_loss": rec, "codebook_loss": aux["codebook"], "commitment_loss": aux["commitment"]}
        if tcfg.perceptual_weight > 0:
            perc = losses.perceptual_loss(perceptual_weights, recon, images)
            loss = loss + tcfg.perceptual_weight * perc
            metrics["perceptual_loss"] = perc
        if adversarial:
            g_adv = losses.generator_loss(disc.apply({"params": disc_params}, recon), tcfg.adversarial_loss)
            on = (step >= tcfg.disc_start).astype(jnp.float32)
            loss = loss + on * tcfg.adversarial_weight * g_adv
            metrics["g_adv_loss"] = g_adv
        metrics["loss"] = loss
        return loss, (recon, aux, metrics)

    def disc_loss(disc_params, real, fake, lecam_ema):
        d = lambda x: disc.apply({"params": disc_params}, x)  # noqa: E731
        real_logits, fake_logits = d(real), d(fake)
        loss = losses.discriminator_loss(real_logits, fake_logits, tcfg.adversarial_loss)
        metrics = {"d_loss": loss, "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
        if tcfg.r1_weight > 0:
            r1 = losses.r1_penalty(d, real)
            loss = loss + tcfg.r1_weight * 0.5 * r1
            metrics["r1"] = r1
        if tcfg.lecam_weight > 0:
            lecam = losses.lecam_penalty(real_logits, fake_logits, lecam_ema[0], lecam_ema[1])
            loss = loss + tcfg.lecam_weight * lecam
            metrics["lecam"] = lecam
        return loss, metrics

    def restart_dead_codes(params, code_usage, latents, step, rng):
        dead = code_usage < tcfg.dead_code_fraction / K
        active = (step % tcfg.restart_every == 0) & (step <= tcfg.restart_until) & (step > 0)
        dead = dead & active
        flat = latents.reshape(-1, latents.shape[-1])
        pick = jax.random.randint(rng, (K,), 0, flat.shape[0])
        codebook = params["quantizer"]["codebook"]
        new = jnp.where(dead[:, None], flat[pick].astype(codebook.dtype), codebook)
        params = {**params, "quantizer": {**params["quantizer"], "codebook": new}}
        code_usage = jnp.where(dead, 1.0 / K, code_usage)
        return params, code_usage, jnp.sum(dead)

    def train_step(state: TrainState, images, rng):
        images = vqgan.to_float_images(images)
        step = state.step
        grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
        (_, (recon, aux, metrics)), grads = grad_fn(state.params, state.disc_params, images, step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)

        # Codebook usage: per-batch stats and a running EMA of every code's share.
        counts = jnp.bincount(aux["tokens"].reshape(-1), length=K).astype(jnp.float32)
        code_usage = tcfg.usage_decay * state.code_usage + (1 - tcfg.usage_decay) * counts / counts.sum()
        metrics.update(vqgan.codebook_stats(aux["tokens"], K))
        if tcfg.restart_dead_codes:
            params, code_usage, n_restarted = restart_dead_codes(params, code_usage, aux["latents"], step, rng)
            metrics["codes_restarted"] = n_restarted
        metrics["codes_alive"] = jnp.mean(code_usage >= tcfg.dead_code_fraction / K)
        metrics["psnr"] = losses.psnr(recon, images)

        disc_params, disc_opt_state, lecam_ema = state.disc_params, state.disc_opt_state, state.lecam_ema
        if adversarial:
            fake = jax.lax.stop_gradient(recon)
            (_, dm), dgrads = jax.value_and_grad(disc_loss, has_aux=True)(disc_params, images, fake, lecam_ema)
            dupdates, new_dopt = dtx.update(dgrads, disc_opt_state, disc_params)
            on = step >= tcfg.disc_start
            keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(on, a, b), new, old)  # noqa: E731
            disc_params = keep(optax.apply_updates(disc_params, dupdates), disc_params)
            disc_opt_state = keep(new_dopt, disc_opt_state)
            lecam_ema = jnp.where(
                on, tcfg.lecam_decay * lecam_ema + (1 - tcfg.lecam_decay) * jnp.stack([dm["d_real"], dm["d_fake"]]),
                lecam_ema,
            )
            metrics.update(dm)

        state = state.replace(
            step=step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
            disc_opt_state=disc_opt_state, code_usage=code_usage, lecam_ema=lecam_ema,
        )
        return state, metrics

    return train_step


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
        lo = editing.downsample_area(images, 2)
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
# Loading a trained tokenizer (used by vqgan.ImageTokenizer.from_dir)
# ---------------------------------------------------------------------------------------


def _tcfg_from_meta(meta):
    import ml_collections

    return ml_collections.ConfigDict(meta["train_tokenizer"])


def restore_params(directory, vcfg: vqgan.VQGANConfig, meta: dict, step: int | None = None):
    """The VQGAN params of the checkpoint in `directory`/checkpoints (latest or `step`)."""
    directory = paths.as_path(directory)
    try:
        tcfg, image_size = _tcfg_from_meta(meta), int(meta["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer config {directory / vqgan.CONFIG_FILE} is incomplete: {e}") from None
    _, _, _, _, create_state = build(vcfg, tcfg, image_size)
    abstract = nn.unbox(jax.eval_shape(create_state, jax.random.key(0)))
    ckpt = ckpt_lib.Checkpointer(directory / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(abstract, step=step)
    except ckpt_lib.CheckpointError as e:
        raise ValueError(f"cannot load the tokenizer in {directory}: {e}") from None
    finally:
        ckpt.close()
    return state.params


# ---------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------


def _image_batches(loader):
    for batch in loader:
        yield {"image": batch["image"]}


def train(config, workdir, *, num_steps: int | None = None, quiet: bool = False) -> dict[str, float]:
    """Trains (or resumes) the tokenizer in W/tokenizer; returns the final test evaluation."""
    workdir = paths.as_path(workdir)
    tok_dir = workdir / vqgan.TOKENIZER_SUBDIR
    tok_dir.mkdir(parents=True, exist_ok=True)
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
    cfg_path = tok_dir / vqgan.CONFIG_FILE
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
    local_batch = pipeline.per_process_batch_size(tcfg.batch_size)
    train_source = pipeline.make_source(config.data, "train", paths.local_dir(workdir, "data"))
    loader = pipeline.make_loader(train_source, batch_size=local_batch, seed=config.data.shuffle_seed)
    it = iter(loader)

    # State, sharded by the logical-axis rules.
    model, disc, tx, dtx, create_state = build(vcfg, tcfg, image_size)
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

        train_step = make_train_step(model, disc, tx, dtx, vcfg, tcfg, perceptual)
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
        t0, last_log = time.time(), time.time()
        bar = writer_lib.progress(range(start, num_steps), initial=start, total=num_steps, desc="tokenizer", disable=quiet or None)
        with ckpt_lib.PreemptionHandler() as preempt:
            for step in bar:
                images = next(it)["image"]
                if lowres_every and step % lowres_every == lowres_every - 1:
                    # The base stage tokenizes images at half the size (2x2 area means): train on those too.
                    images = editing.downsample_area(images, 2)
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
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(psnr=f"{float(metrics['psnr']):.2f}", usage=f"{float(metrics['usage']):.2f}")
                ckpt.save(done, state, data_iterator=it, force=done == num_steps)
                if preempt.should_stop():
                    ckpt.save(done, state, data_iterator=it, force=True)
                    break
        ckpt.close()
        train_time = time.time() - t0

        # Final evaluation on the test split.
        test_source = pipeline.make_source(config.data, "test", paths.local_dir(workdir, "data"))
        eval_loader = pipeline.make_loader(
            test_source, batch_size=tcfg.eval_batch_size, shuffle=False, num_epochs=1, drop_remainder=False
        )
        tokenizer = vqgan.ImageTokenizer(vcfg, jax.device_get(state.params))
        result, (originals, recons) = evaluate(tokenizer, eval_loader, tcfg.eval_max_batches or None)
        result.update(step=int(state.step), train_seconds=train_time)
        writer.write_scalars(int(state.step), {f"eval/{k}": v for k, v in result.items() if k != "step"})
        writer.write_images(int(state.step), {"eval/originals": originals, "eval/reconstructions": recons})
        writer.close()
    if jax.process_index() == 0:
        (tok_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def reconstruct_folder(workdir, in_dir, out_dir) -> dict[str, float]:
    """Encodes and decodes every PNG in `in_dir` with W's tokenizer; writes same-named PNGs."""
    import PIL.Image

    in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
    files = sorted(in_dir.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no .png files in {in_dir}")
    tok = vqgan.ImageTokenizer.from_workdir(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    psnrs = {}
    for f in files:
        img = np.asarray(PIL.Image.open(f).convert("RGB"))
        rec = np.asarray(tok.reconstruct(img[None]))[0]
        PIL.Image.fromarray(rec).save(out_dir / f.name)
        mse = ((rec.astype(np.float64) - img) ** 2).mean()
        psnrs[f.name] = float(10 * np.log10(255.0**2 / max(mse, 1e-10)))
    return psnrs
