"""The VQGAN tokenizer's train state and step: losses, optimizers, codebook safeguards.

    model, disc, tx, dtx, create_state = build(vqgan_config, config.train_tokenizer, image_size)
    train_step = make_train_step(model, disc, tx, dtx, vqgan_config, config.train_tokenizer)
    state, metrics = jax.jit(train_step)(state, images_uint8, rng)

Losses (generator): rec_weight * L1|L2 + codebook + beta * commitment
  [+ perceptual_weight * LPIPS-style VGG distance] [+ adversarial_weight * GAN loss after
  disc_start]. Discriminator: hinge or non-saturating [+ R1 or LeCam].
Codebook safeguards: l2-normalised codes (config.vqgan.l2_normalize) and dead-code restarts
(a code whose usage EMA falls below `dead_code_fraction / K` is reset to a random latent of
the current batch every `restart_every` steps, until `restart_until`).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from muse_jax.models import discriminator as disc_lib
from muse_jax.models import vqgan
from muse_jax.models import vqgan_losses as losses


@flax.struct.dataclass
class TokenizerState:
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
        return TokenizerState(
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

    def train_step(state: TokenizerState, images, rng):
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
        metrics["psnr"] = losses.batch_psnr(recon, images)

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
