"""Scores of generated images for `muse-jax eval`: text alignment (after validating the shapes
detector) and FID, the generation of a batch, timed generation, and JSON output."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from muse_jax.evaluation import alignment, features, fid

DETECTOR_MIN_ACCURACY = 0.99


def validate_detector(num: int = 1000, seed: int = 0, split: str = "test",
                      min_accuracy: float = DETECTOR_MIN_ACCURACY) -> dict[str, Any]:
    """The detector's accuracy on real images (`alignment.detector_accuracy`); raises if any
    attribute is below `min_accuracy`, so it never judges generated images unvalidated."""
    acc = alignment.detector_accuracy(num=num, seed=seed, split=split)
    low = {k: v for k, v in acc.items() if isinstance(v, float) and v < min_accuracy}
    if low:
        raise RuntimeError(f"the shapes detector is below {min_accuracy:.0%} on real {split} images: {low}")
    return acc


def _inception_fid(images, reference_images, inception_variables, cache_dir, dataset_id):
    from muse_jax.evaluation import inception

    fn = inception.make_feature_fn(inception_variables)
    extract = lambda ims: inception.inception_features(ims, inception_variables, feature_fn=fn)
    extractor_id = f"inception-v3-fid-pool3-{inception.fingerprint(inception_variables)}"
    ref = fid.cached_statistics(cache_dir, extractor_id, dataset_id, lambda: extract(reference_images()))
    return fid.fid_from_statistics(extract(images), ref)


def evaluate_images(
    images: np.ndarray,
    captions: Sequence[str],
    *,
    cache_dir: str,
    seed: int = 0,
    num_reference: int = 1000,
    inception_variables: Mapping[str, Any] | None = None,
    return_details: bool = False,
) -> dict[str, Any]:
    """Text alignment (per attribute and prompt group) and FID of generated [N, 64, 64, 3] uint8
    images against the first `num_reference` test images (statistics cached in `cache_dir`):
    the in-domain shapes FID always, the InceptionV3 FID when `inception_variables` are given."""
    images = np.asarray(images)
    report: dict[str, Any] = {"num_images": int(len(images))}
    report["alignment"] = alignment.alignment_report(images, captions, return_details=return_details)
    ref_stats = features.shapes_reference_statistics(cache_dir, seed=seed, split="test", num=num_reference)
    report["fid_shapes"] = fid.fid_from_statistics(features.shapes_features(images), ref_stats)
    report["fid_shapes_features"] = features.SHAPES_FEATURES_ID
    if inception_variables is not None:
        report["fid_inception"] = _inception_fid(
            images, lambda: features.shapes_images(seed, "test", num_reference), inception_variables, cache_dir,
            features.shapes_dataset_id(seed, "test", num_reference))
    return report


def generate_batch(pipe, prompts: Sequence[str], *, seed: int, overrides: Mapping[str, Any] | None = None) -> np.ndarray:
    """At most `pipe.options.batch_size` prompts -> uint8 images [n, S, S, 3], as every evaluation
    generates: one padded program call per stage (sharded over the pipeline's mesh, if any), with
    the batch's own `seed`, so an image depends only on its batch, its row and that seed."""
    if len(prompts) > pipe.options.batch_size:
        raise ValueError(f"{len(prompts)} prompts in one batch of at most {pipe.options.batch_size}")
    return np.asarray(pipe.generate(list(prompts), seed=seed, **(overrides or {})))


def timed_generation(generate: Callable[[Sequence[str]], np.ndarray], prompts: Sequence[str],
                     batch_size: int) -> tuple[np.ndarray, float]:
    """Runs `generate(batch_of_prompts) -> [B, H, W, 3] uint8` over `prompts`; returns (images,
    seconds per image), timing every batch after the first (which includes compilation)."""
    if not prompts:
        raise ValueError("timed_generation needs at least one prompt")
    out, seconds, counted = [], 0.0, 0
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = list(prompts[start:start + batch_size])
        t0 = time.perf_counter()
        images = np.asarray(generate(batch))
        dt = time.perf_counter() - t0
        if i > 0 or len(prompts) <= batch_size:  # a single batch: its time is all we have
            seconds, counted = seconds + dt, counted + len(batch)
        out.append(images)
    return np.concatenate(out), seconds / max(counted, 1)


def write_json(report: Mapping[str, Any], path: str) -> str:
    """Writes a report as indented JSON (creating the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=float)
    return path
