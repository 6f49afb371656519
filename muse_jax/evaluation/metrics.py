"""Reconstruction metrics for the tokenizer: PSNR, SSIM and codebook usage (numpy)."""
from __future__ import annotations

import numpy as np


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (3, 4) or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected [H, W, C] or [N, H, W, C] images with C in (1, 3), got {a.shape}")
    return (a[None], b[None]) if a.ndim == 3 else (a, b)


def psnr(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> np.ndarray:
    """PSNR in dB per image of [N, H, W, C] (or one [H, W, C]) images; inf where identical."""
    squeeze = np.ndim(a) == 3
    a, b = _pair(a, b)
    mse = ((a - b) ** 2).mean((1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(max_value**2 / mse)
    return out[0] if squeeze else out


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """[size] normalised 1-D Gaussian (the separable SSIM window)."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [N, H, W, C] over H and W with 1-D window w."""
    k = w.size
    x = np.lib.stride_tricks.sliding_window_view(x, k, axis=1) @ w  # [N, H-k+1, W, C]
    return np.lib.stride_tricks.sliding_window_view(x, k, axis=2) @ w


def ssim(a: np.ndarray, b: np.ndarray, max_value: float = 255.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """SSIM per image (Wang et al. 2004): Gaussian 11x11 window, sigma 1.5, 'valid' region,
    per channel, averaged over positions and channels; [N] (or a scalar for one image)."""
    squeeze = np.ndim(a) == 3
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < window:
        raise ValueError(f"images of {a.shape[1:3]} are smaller than the {window}x{window} SSIM window")
    w = gaussian_window(window, sigma)
    c1, c2 = (k1 * max_value) ** 2, (k2 * max_value) ** 2
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a**2
    var_b = _filter_valid(b * b, w) - mu_b**2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    out = s.mean((1, 2, 3))
    return out[0] if squeeze else out


def codebook_usage(tokens: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Codebook usage of token ids (any shape): fraction and number of codes used, and the
    perplexity of the code histogram (codebook_size when all codes are equally used)."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise ValueError("codebook_usage needs at least one token")
    if tokens.min() < 0 or tokens.max() >= codebook_size:
        raise ValueError(f"token ids must lie in [0, {codebook_size}), got [{tokens.min()}, {tokens.max()}]")
    counts = np.bincount(tokens.astype(np.int64), minlength=codebook_size)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "num_used": int((counts > 0).sum()),
        "fraction_used": float((counts > 0).mean()),
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
    }
