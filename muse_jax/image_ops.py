"""Image operations shared by training, editing and evaluation (numpy, uint8 NHWC).

  downsample_area(images, f)       the mean of each f x f block (the base stage's view of an image)
  regenerate_mask(mask)            the one mask rule: True, >= 128 (uint8 / a mask image), >= 0.5 (floats)
  token_mask_from_pixels(mask, f)  a pixel mask -> the tokens it touches
  upsample_nearest(x, f)           each pixel repeated f x f times ([B, h, w, ...] -> [B, h*f, w*f, ...])
  upsample_mask(mask, f)           a token mask -> pixels (nearest)
  composite(original, generated, mask)   generated pixels inside the mask, the original outside
  image_grid(images, cols)         a batch tiled into one image
"""
from __future__ import annotations

import numpy as np


def downsample_area(images, factor: int) -> np.ndarray:
    """uint8 [B, H, W, C] -> uint8 [B, H/f, W/f, C], the mean of each f x f block, rounded."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape {x.shape}")
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by {factor}")
    mean = x.reshape(b, h // factor, factor, w // factor, factor, c).astype(np.float32).mean(axis=(2, 4))
    return np.clip(np.round(mean), 0, 255).astype(np.uint8)


def regenerate_mask(mask) -> np.ndarray:
    """Which pixels a mask regenerates, bool: white ones. True in a bool mask; >= 128 in an integer mask
    (a mask image: anti-aliased grey edges under 128 are kept); >= 0.5 in a float mask."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask >= 128
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= 0.5
    raise ValueError(f"a mask must be bool, integer (white >= 128) or float (>= 0.5), got dtype {mask.dtype}")


def token_mask_from_pixels(pixel_mask, factor: int) -> np.ndarray:
    """[B, H, W] (nonzero = edit) -> bool [B, H/f, W/f]: a token is masked if any pixel is."""
    m = np.asarray(pixel_mask) != 0
    if m.ndim != 3:
        raise ValueError(f"pixel mask must be [batch, height, width], got shape {m.shape}")
    b, h, w = m.shape
    if h % factor or w % factor:
        raise ValueError(f"mask size {h}x{w} is not divisible by the token factor {factor}")
    return m.reshape(b, h // factor, factor, w // factor, factor).any(axis=(2, 4))


def upsample_nearest(x, factor: int) -> np.ndarray:
    """[B, h, w, ...] -> [B, h*f, w*f, ...], each pixel repeated f x f times (same dtype)."""
    return np.asarray(x).repeat(factor, axis=1).repeat(factor, axis=2)


def upsample_mask(mask, factor: int) -> np.ndarray:
    """bool [B, h, w] -> bool [B, h*f, w*f] (nearest)."""
    return upsample_nearest(np.asarray(mask, bool), factor)


def composite(original, generated, pixel_mask) -> np.ndarray:
    """Pixels inside the mask from `generated`, outside it exactly `original`: uint8 [B, H, W, C]."""
    original, generated = np.asarray(original), np.asarray(generated)
    m = np.asarray(pixel_mask) != 0
    if original.shape != generated.shape or m.shape != original.shape[:3]:
        raise ValueError(
            f"composite: original {original.shape}, generated {generated.shape} and mask {m.shape} disagree"
        )
    return np.where(m[..., None], generated, original)


def image_grid(images, cols: int = 8, pad: int = 2, scale: int = 1) -> np.ndarray:
    """[n, h, w, c] uint8 -> one [rows*(h+pad)+pad, cols*(w+pad)+pad, c] image on white, `scale`x enlarged."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects [n, h, w, c] images, got shape {images.shape}")
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, images.dtype)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid
