"""Losses of VQGAN training: reconstruction, adversarial (+ R1 / LeCam), perceptual.

Pure functions, except `VGGFeatures`, the perceptual loss's feature network, whose
weights come from a file the user supplies (nothing is downloaded). The file is an .npz
with torchvision VGG16 `features.{i}.weight` / `features.{i}.bias` arrays (OIHW) and,
optionally, LPIPS's per-channel weights `lin{k}.model.1.weight` ([1,C,1,1]). Make one with
    sd = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
    np.savez(path, **{f"features.{k}": v.numpy() for k, v in sd.items()})
"""
from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------


def reconstruction_loss(recon: jax.Array, target: jax.Array, kind: str = "l1") -> jax.Array:
    """Mean absolute ("l1") or squared ("l2") error over all pixels."""
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(diff * diff)
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


def batch_psnr(recon: jax.Array, target: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of images in [-1,1] (clipped), mean over the batch: [B,...] -> []."""
    recon = jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)
    mse = jnp.mean((recon - target.astype(jnp.float32)) ** 2, axis=tuple(range(1, recon.ndim)))
    # Peak-to-peak is 2 on [-1, 1].
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


# ---------------------------------------------------------------------------------------
# Adversarial
# ---------------------------------------------------------------------------------------


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """Discriminator loss: "hinge" or "non_saturating" (logistic)."""
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
    raise ValueError(f"adversarial loss must be 'hinge' or 'non_saturating', got {kind!r}")


def generator_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
    """Generator's adversarial loss for the same two kinds."""
    if kind == "hinge":
        return -jnp.mean(fake_logits)
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-fake_logits))
    raise ValueError(f"adversarial loss must be 'hinge' or 'non_saturating', got {kind!r}")


def r1_penalty(d_fn, real_images: jax.Array) -> jax.Array:
    """R1 (Mescheder et al. 2018): E ||grad_x D(x)||^2 on real images; d_fn: images -> logits."""
    grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(real_images.astype(jnp.float32))
    return jnp.mean(jnp.sum(grads**2, axis=tuple(range(1, grads.ndim))))


def lecam_penalty(real_logits, fake_logits, ema_real, ema_fake) -> jax.Array:
    """LeCam regulariser (Tseng et al. 2021) against EMAs of the mean real / fake logits."""
    return jnp.mean(jax.nn.relu(real_logits - ema_fake) ** 2) + jnp.mean(jax.nn.relu(ema_real - fake_logits) ** 2)


# ---------------------------------------------------------------------------------------
# Perceptual (LPIPS-style distance over VGG16 features)
# ---------------------------------------------------------------------------------------

# torchvision VGG16 `features` indices of the conv layers, and the taps after relu1_2 ... relu5_3.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_POOL_AFTER = (2, 7, 14, 21)
VGG16_TAPS = (2, 7, 14, 21, 28)
# LPIPS's input scaling of [-1,1] images.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class VGGFeatures(nn.Module):
    """VGG16 feature maps at the five LPIPS taps: images [B,H,W,3] in [-1,1] -> list of [B,h,w,C]."""

    @nn.compact
    def __call__(self, x):
        x = (x.astype(jnp.float32) - _SHIFT) / _SCALE
        feats = []
        for idx, width in zip(VGG16_CONVS, VGG16_WIDTHS):
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{idx}")(x))
            if idx in VGG16_TAPS:
                feats.append(x)
            if idx in VGG16_POOL_AFTER:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return feats


def load_perceptual_weights(path) -> dict:
    """Reads the .npz described in the module docstring -> {"params": ..., "lin": [C] x 5}."""
    if not path:
        raise ValueError(
            "train_tokenizer.perceptual_weight > 0 needs train_tokenizer.perceptual_weights_path: "
            "an .npz of VGG16 weights (see muse_jax/models/vqgan_losses.py); nothing is downloaded"
        )
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual loss weights file {path} does not exist")
    data = np.load(path)
    params = {}
    for idx, width in zip(VGG16_CONVS, VGG16_WIDTHS):
        wk, bk = f"features.{idx}.weight", f"features.{idx}.bias"
        if wk not in data or bk not in data:
            raise ValueError(f"{path}: missing {wk} / {bk} (expected torchvision VGG16 `features` keys)")
        w = data[wk]
        if w.shape[0] != width or w.shape[2:] != (3, 3):
            raise ValueError(f"{path}: {wk} has shape {w.shape}, expected ({width}, C, 3, 3)")
        params[f"conv_{idx}"] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)), "bias": jnp.asarray(data[bk])}
    lin = []
    for k, tap in enumerate(VGG16_TAPS):
        width = VGG16_WIDTHS[VGG16_CONVS.index(tap)]
        key = f"lin{k}.model.1.weight"
        lin.append(jnp.asarray(data[key].reshape(width)) if key in data else jnp.ones((width,), jnp.float32))
    return {"params": params, "lin": lin}


def perceptual_loss(weights: dict, recon: jax.Array, target: jax.Array) -> jax.Array:
    """LPIPS-style distance: unit-normalised VGG features, weighted squared difference, mean."""
    feats = VGGFeatures().apply({"params": weights["params"]}, jnp.concatenate([recon, target], 0))
    total = 0.0
    for f, w in zip(feats, weights["lin"]):
        f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-10)
        a, b = jnp.split(f, 2, axis=0)
        total = total + jnp.mean(jnp.sum(w * (a - b) ** 2, axis=-1))
    return total
