"""A programmatic detector for spec-v1 shapes images, built from the spec in `data/shapes.py`.

It shares nothing with the generator, so it can judge generated images. For a 64x64 RGB
uint8 image it finds:
  * the background: the spec background with the most pixels near its colour;
  * objects: 8-connected components of pixels that differ from the background, tiny
    specks (coverage below `min_area` pixels) ignored;
  * each object's colour: the majority nearest-palette colour of the component's core
    pixels (those far from the background), "unknown" when their median is farther than
    `color_tol` from that palette colour;
  * coverage ("alpha") of each pixel: its projection on the segment from the background to
    the component's measured core colour, so antialiased and blurred edges count fractionally;
  * size and centre from the coverage profiles, shape by template matching: the coverage
    of each spec shape, rendered (4x supersampled, like the dataset) at the measured centre
    and size, is compared with the measured coverage (mean absolute difference);
    a component whose box is far from square (aspect > `max_aspect`) or that matches no
    template well (error > `shape_tol`) gets shape "unknown";
  * size class by the measured side, cell by the centre, relations from the centres.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

from muse_jax.data import shapes

PALETTE_NAMES = tuple(shapes.COLORS)
PALETTE = np.asarray([shapes.COLORS[c] for c in PALETTE_NAMES], np.float64)  # [8, 3]
BACKGROUND_NAMES = tuple(shapes.BACKGROUNDS)
BACKGROUND_RGB = np.asarray([shapes.BACKGROUNDS[b] for b in BACKGROUND_NAMES], np.float64)
# The side that separates the two size classes (small s=14, large s=24).
SIZE_THRESHOLD = (shapes.SIZES["small"] + shapes.SIZES["large"]) / 2
# Cell boundaries: midway between neighbouring cell centres.
CELL_BOUNDS = tuple((a + b) / 2 for a, b in zip(shapes.CELL_CENTERS[:-1], shapes.CELL_CENTERS[1:]))


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    color: str  # a palette name or "unknown"
    shape: str  # a spec shape or "unknown"
    size: str  # "small" or "large"
    row: int
    col: int
    cx: float  # centre in pixels (0..64)
    cy: float
    side: float  # measured side of the bounding square, pixels
    area: float  # coverage, pixels
    color_distance: float  # RGB distance of the core colour to the chosen palette colour
    shape_error: float  # mean |coverage - template| of the chosen shape (0 = perfect)

    @property
    def cell(self) -> str:
        return shapes.CELLS[self.row][self.col]

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cell": self.cell}


@dataclasses.dataclass(frozen=True)
class Detection:
    background: str
    objects: tuple[DetectedObject, ...]  # row-major order of their centres

    def as_dict(self) -> dict[str, Any]:
        return {"background": self.background, "objects": [o.as_dict() for o in self.objects]}


def coverage(shape: str, side: float, cx: float, cy: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean coverage of a spec shape of bounding side `side` centred at (cx, cy) at points (x, y)."""
    h = side / 2
    dx, dy = x - cx, y - cy
    in_box = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "square":
        return in_box
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "triangle":  # apex at top centre, base along the box bottom
        return in_box & (np.abs(dx) <= (dy + h) / 2)
    if shape == "cross":  # plus sign, arms one third of the side thick
        arm = side / 6
        return in_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {shape!r}; expected one of {shapes.SHAPES}")


def render_coverage(shape: str, side, cx, cy, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """[..., h, w] fractional coverage of a shape over pixels [y0:y0+h, x0:x0+w], 4x supersampled
    (side, cx, cy: scalars or broadcastable arrays of candidates)."""
    ss = shapes.SUPERSAMPLE
    side, cx, cy = (np.asarray(v, np.float64)[..., None, None] for v in (side, cx, cy))
    x = (x0 + (np.arange(w * ss) + 0.5) / ss)[None, :]
    y = (y0 + (np.arange(h * ss) + 0.5) / ss)[:, None]
    cov = coverage(shape, side, cx, cy, x, y).astype(np.float64)
    return cov.reshape(cov.shape[:-2] + (h, ss, w, ss)).mean((-3, -1))


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image in [0, 255], got dtype {image.dtype}")
    return image.astype(np.float64)


def detect_background(image: np.ndarray, tol: float = 80.0) -> tuple[str, np.ndarray]:
    """(name, measured RGB) of the background: the spec background with the most pixels within
    `tol` of its colour; the measured colour is the median of those pixels."""
    img = _check_image(image)
    dist = np.linalg.norm(img[:, :, None, :] - BACKGROUND_RGB, axis=-1)  # [H, W, 3]
    near = dist < tol
    counts = near.sum((0, 1))
    if counts.max() == 0:  # nothing close: the background nearest to the median colour
        median = np.median(img, (0, 1))
        return BACKGROUND_NAMES[int(np.argmin(np.linalg.norm(median - BACKGROUND_RGB, axis=-1)))], median
    k = int(np.argmax(counts))
    return BACKGROUND_NAMES[k], np.median(img[near[..., k]], axis=0)


def _profile_extent(profile: np.ndarray) -> tuple[float, float]:
    """(side, centre) of a 1-D coverage profile (max coverage per row or column), in pixels."""
    idx = np.arange(profile.size) + 0.5
    mass = profile.sum()
    return float(mass), float((profile * idx).sum() / max(mass, 1e-9))


def detect(
    image: np.ndarray,
    *,
    fg_threshold: float = 40.0,
    core_fraction: float = 0.6,
    color_tol: float = 80.0,
    min_area: float = 20.0,
    shape_tol: float = 0.6,
    max_aspect: float = 1.4,
    refine: bool = True,
) -> Detection:
    """Detects the background and the objects of a [64, 64, 3] uint8 shapes image."""
    img = _check_image(image)
    background, bg = detect_background(image)
    diff = img - bg
    dist = np.linalg.norm(diff, axis=-1)
    labels, num = ndimage.label(dist > fg_threshold, structure=np.ones((3, 3), bool))
    objects = []
    height, width = dist.shape
    for k, slc in enumerate(ndimage.find_objects(labels), start=1):
        if slc is None:
            continue
        # Work in the component's bounding box, grown by 2 px to catch soft edges.
        ys, xs = slc
        y0, y1 = max(ys.start - 2, 0), min(ys.stop + 2, height)
        x0, x1 = max(xs.start - 2, 0), min(xs.stop + 2, width)
        comp = labels[y0:y1, x0:x1] == k
        d = dist[y0:y1, x0:x1]
        core = comp & (d >= core_fraction * d[comp].max())
        pix = img[y0:y1, x0:x1][core]
        nearest = np.argmin(np.linalg.norm(pix[:, None, :] - PALETTE, axis=-1), axis=-1)
        ci = int(np.bincount(nearest, minlength=len(PALETTE)).argmax())
        color_distance = float(np.linalg.norm(np.median(pix[nearest == ci], axis=0) - PALETTE[ci]))
        color = PALETTE_NAMES[ci] if color_distance <= color_tol else "unknown"
        # Coverage: projection on the background -> measured core colour segment.
        c = np.median(pix, axis=0) - bg
        if np.linalg.norm(c) < fg_threshold:  # a faint component: fall back to its palette colour
            c = PALETTE[ci] - bg
        alpha = np.clip(diff[y0:y1, x0:x1] @ c / (c @ c), 0.0, 1.0)
        grown = ndimage.binary_dilation(comp, structure=np.ones((3, 3), bool))
        # Exclude pixels of other components that fall in this window.
        other = (labels[y0:y1, x0:x1] != k) & (labels[y0:y1, x0:x1] != 0)
        alpha = np.where(grown & ~other, alpha, 0.0)
        area = float(alpha.sum())
        if area < min_area:
            continue
        side_x, cx = _profile_extent(alpha.max(0))
        side_y, cy = _profile_extent(alpha.max(1))
        cx, cy = cx + x0, cy + y0
        side = max(side_x, side_y)
        shape, err, side, cx, cy = _match_shape(alpha, x0, y0, side, cx, cy, refine)
        # Spec shapes fill a square box and match a template closely; anything else is unknown.
        if err > shape_tol or side / max(min(side_x, side_y), 1e-9) > max_aspect:
            shape = "unknown"
        row = int(np.searchsorted(CELL_BOUNDS, cy))
        col = int(np.searchsorted(CELL_BOUNDS, cx))
        size = "small" if side < SIZE_THRESHOLD else "large"
        objects.append(DetectedObject(color, shape, size, row, col, cx, cy, side, area, color_distance, err))
    objects.sort(key=lambda o: (o.row, o.col, o.cy, o.cx))
    return Detection(background, tuple(objects))


def _match_shape(alpha, x0, y0, side, cx, cy, refine):
    """Best spec shape for coverage `alpha` (window at x0, y0): (shape, error, side, cx, cy)."""
    h, w = alpha.shape
    sides, dys = np.array([side]), np.array([0.0])
    if refine:  # a small search around the measured side and centre
        sides, dys = np.meshgrid(side + np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), np.array([-0.5, 0.0, 0.5]))
        sides, dys = sides.ravel(), dys.ravel()
    mass = max(alpha.sum(), 1e-9)
    best = None
    for shape in shapes.SHAPES:
        errs = np.abs(alpha - render_coverage(shape, sides, cx, cy + dys, x0, y0, w, h)).sum((-2, -1)) / mass
        k = int(np.argmin(errs))
        if best is None or errs[k] < best[1]:
            best = (shape, float(errs[k]), float(sides[k]), cx, float(cy + dys[k]))
    return best


def detect_batch(images: np.ndarray, **kwargs) -> list[Detection]:
    """`detect` over a [N, 64, 64, 3] uint8 batch."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a [N, H, W, 3] batch, got shape {images.shape}")
    return [detect(im, **kwargs) for im in images]


def relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """Whether `a RELATION b` holds: the displacement's dominant axis and sign match."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b (y grows downwards)
    if relation == "to the left of":
        return dx > abs(dy)
    if relation == "to the right of":
        return -dx > abs(dy)
    if relation == "above":
        return dy > abs(dx)
    if relation == "below":
        return -dy > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; expected one of {shapes.RELATIONS}")
