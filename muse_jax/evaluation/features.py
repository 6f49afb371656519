"""An in-domain feature extractor for shapes FID that works offline (no learned weights).

`shapes_features(images)` -> [N, 243] float64, blocks scaled to comparable spread:
  * layout    (192): the image area-downsampled to 8x8 RGB, in [0, 1];
  * palette    (12): fraction of pixels within 40 (RGB distance) of each spec colour
                     (3 backgrounds + 8 object colours) and of pixels near none, x4;
  * semantics  (28): the detector's reading: object count (1), counts per colour (8),
                     shape (4 + unknown), size (2) and cell (9), background one-hot (3);
  * fidelity    (6): histogram of each pixel's distance to the nearest spec colour
                     (bins at 4, 8, 16, 32, 64), x4: noise and off-palette colours;
  * sharpness   (4): histogram of grey gradient magnitudes (bins at 2, 8, 32, 96), x4: blur;
  * laplacian   (1): mean |Laplacian| of the grey image / 32.
Identity for caching: `SHAPES_FEATURES_ID` (bump the version when the features change).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from muse_jax.data import shapes
from muse_jax.evaluation import detector as det_lib

SHAPES_FEATURES_ID = "shapes-features-v1"
_SPEC_RGB = np.concatenate([det_lib.BACKGROUND_RGB, det_lib.PALETTE])  # [11, 3]
_SHAPES = shapes.SHAPES + ("unknown",)
_CELLS = [c for row in shapes.CELLS for c in row]
_DIST_BINS = np.array([4.0, 8.0, 16.0, 32.0, 64.0])  # distance to the nearest spec colour
_GRAD_BINS = np.array([2.0, 8.0, 32.0, 96.0])  # grey gradient magnitude


def _semantic(detection: det_lib.Detection) -> np.ndarray:
    colors = np.zeros(len(det_lib.PALETTE_NAMES))
    kinds = np.zeros(len(_SHAPES))
    sizes = np.zeros(len(shapes.SIZES))
    cells = np.zeros(len(_CELLS))
    for o in detection.objects:
        if o.color in det_lib.PALETTE_NAMES:
            colors[det_lib.PALETTE_NAMES.index(o.color)] += 1
        kinds[_SHAPES.index(o.shape)] += 1
        sizes[list(shapes.SIZES).index(o.size)] += 1
        cells[_CELLS.index(o.cell)] += 1
    bg = np.eye(len(det_lib.BACKGROUND_NAMES))[det_lib.BACKGROUND_NAMES.index(detection.background)]
    return np.concatenate([[len(detection.objects)], colors, kinds, sizes, cells, bg])


def shapes_features(images: np.ndarray) -> np.ndarray:
    """[N, D] in-domain features of [N, 64, 64, 3] uint8 shapes images (see the module doc)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected [N, 64, 64, 3] uint8 images, got {images.shape} {images.dtype}")
    x = images.astype(np.float64)
    n = x.shape[0]
    layout = x.reshape(n, 8, 8, 8, 8, 3).mean((2, 4)).reshape(n, -1) / 255.0
    sq = (x * x).sum(-1, keepdims=True) - 2.0 * x @ _SPEC_RGB.T + (_SPEC_RGB**2).sum(-1)
    dist = np.sqrt(np.maximum(sq, 0.0))  # [N, 64, 64, 11] distance to each spec colour
    near = dist.min(-1) < 40.0
    nearest = np.where(near, dist.argmin(-1), len(_SPEC_RGB))
    palette = np.stack([(nearest == k).mean((1, 2)) for k in range(len(_SPEC_RGB) + 1)], -1) * 4.0
    fidelity = np.stack([(np.digitize(dist.min(-1), _DIST_BINS) == k).mean((1, 2)) for k in range(len(_DIST_BINS) + 1)], -1)
    grey = x.mean(-1)
    grad = np.hypot(np.diff(grey, axis=1)[:, :, :-1], np.diff(grey, axis=2)[:, :-1, :])
    sharp = np.stack([(np.digitize(grad, _GRAD_BINS) == k).mean((1, 2)) for k in range(1, len(_GRAD_BINS) + 1)], -1)
    lap = np.stack([np.abs(ndimage.laplace(g)).mean() for g in grey])[:, None] / 32.0
    semantic = np.stack([_semantic(det_lib.detect(im)) for im in images])
    return np.concatenate([layout, palette, semantic, 4.0 * fidelity, 4.0 * sharp, lap], axis=1)


def shapes_dataset_id(seed: int, split: str, num: int) -> str:
    """Identity of the first `num` examples of a shapes split (for caching statistics)."""
    return f"shapes-spec{shapes.SPEC_VERSION}-seed{seed}-{split}-n{num}"


def shapes_images(seed: int, split: str, num: int) -> np.ndarray:
    """[num, 64, 64, 3] uint8: the first `num` images of a shapes split."""
    return np.stack([shapes.make_example(seed, split, i)["image"] for i in range(num)])


def shapes_reference_statistics(cache_dir: str, *, seed: int = 0, split: str = "test", num: int = 1000,
                                extract=shapes_features, extractor_id: str = SHAPES_FEATURES_ID):
    """(mu, sigma) of `extract` features of the first `num` images of a split, cached under
    `cache_dir` by (extractor_id, dataset id)."""
    from muse_jax.evaluation import fid

    return fid.cached_statistics(cache_dir, extractor_id, shapes_dataset_id(seed, split, num),
                                 lambda: extract(shapes_images(seed, split, num)))
