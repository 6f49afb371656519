"""Frechet distance between feature distributions (FID, Heusel et al. 2017), with cached
reference statistics.

Statistics files are pytorch-fid's: an .npz with `mu` and `sigma` (`save_statistics`,
`load_statistics`).

FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the matrix square
root is computed as sum(sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))), a symmetric PSD problem solved
with `eigh` in float64: stable for the singular covariances of small sample sets, and never
complex (unlike a general `sqrtm` of the non-symmetric product).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of [N, D] features, in float64 (N >= 2)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected [N, D] features with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Frechet distance between the Gaussians N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(
            f"statistics disagree in shape: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs {sigma_b.shape}"
        )
    root_a = _psd_sqrt(sigma_a)
    cross = root_a @ sigma_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two [N, D] feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fid_from_statistics(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """FID between [N, D] features and reference statistics (mu, sigma).

    With N <= D the features' covariance is S_a = X^T X / (N - 1) (X: the centred features), of
    rank < N, and the nonzero eigenvalues of S_a S_b are those of the N x N matrix
    X S_b X^T / (N - 1): the trace term costs O(N D^2) instead of the O(D^3) of `frechet_distance`.
    """
    mu, sigma = feature_statistics(features)
    n, d = np.shape(features)
    if n > d:
        return frechet_distance(mu, sigma, *reference)
    mu_b, sigma_b = np.asarray(reference[0], np.float64), np.asarray(reference[1], np.float64)
    if mu_b.shape != mu.shape or sigma_b.shape != sigma.shape:
        raise ValueError(f"statistics disagree in shape: mu {mu.shape} vs {mu_b.shape}, sigma {sigma.shape} vs "
                         f"{sigma_b.shape}")
    x = np.asarray(features, np.float64) - mu
    small = x @ sigma_b @ x.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum()
    diff = mu - mu_b
    value = diff @ diff + (x * x).sum() / (n - 1) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, **extra) -> str:
    """Writes (mu, sigma) as pytorch-fid's statistics file (an .npz with keys `mu` and `sigma`,
    which `pytorch_fid.fid_score` reads), plus any `extra` arrays; atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    os.replace(tmp, path)
    return path


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from a pytorch-fid statistics .npz (keys `mu`, `sigma`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file {path} does not exist")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} is not a pytorch-fid statistics file: it lacks mu and sigma (has {list(f)})")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma


def statistics_path(cache_dir: str, extractor_id: str, dataset_id: str) -> str:
    """Where the statistics of (feature extractor, dataset) are cached."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:60]
    digest = hashlib.sha256(json.dumps([extractor_id, dataset_id]).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"fid_stats--{clean(extractor_id)}--{clean(dataset_id)}--{digest}.npz")


def cached_statistics(
    cache_dir: str, extractor_id: str, dataset_id: str, compute_features: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics for (extractor_id, dataset_id): loaded from `cache_dir` if there,
    else computed from `compute_features()` ([N, D]) and saved (atomically)."""
    path = statistics_path(cache_dir, extractor_id, dataset_id)
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["extractor_id"]) == extractor_id and str(f["dataset_id"]) == dataset_id:
                return f["mu"], f["sigma"]
    features = np.asarray(compute_features())
    mu, sigma = feature_statistics(features)
    save_statistics(path, mu, sigma, num=features.shape[0], extractor_id=extractor_id, dataset_id=dataset_id)
    return mu, sigma
