"""The embedded default dataset: procedurally rendered, captioned shapes (spec v1).

Every example is a pure function of (seed, split, index): `make_example(seed, split, index)`
draws a scene (`sample_scene`), renders it (`render`) and captions it (`caption`).

Spec v1, in brief (the full text is in the README):
  * 64x64 RGB uint8, drawn at 4x and area-downsampled, so edges are antialiased while a
    solid interior keeps the exact palette colour.
  * One background (black, white, gray); one object (small s=14 or large s=24) or two
    small objects in different cells of a 3x3 grid; shapes circle, square, triangle, cross.
  * Compositional hold-out: `HELDOUT_PAIRS` never appear in the train split.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

SPEC_VERSION = 1
IMAGE_SIZE = 64
SUPERSAMPLE = 4

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS = {
    "red": (230, 25, 25),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "orange": (245, 130, 20),
    "purple": (140, 50, 200),
    "cyan": (30, 200, 220),
    "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 14, "large": 24}
CELL_CENTERS = (11, 32, 53)
JITTER = 2.0
# Cell names, row-major: CELLS[row][col].
CELLS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
WHERE = {  # cell name -> the phrase used in captions
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELDOUT_PAIRS = frozenset(
    {("purple", "triangle"), ("yellow", "cross"), ("cyan", "circle"), ("orange", "square")}
)
SPLITS = {"train": 0, "test": 1}

# Scene-kind probabilities and how often optional caption parts appear.
P_KIND = {"one": 0.5, "relation": 0.25, "places": 0.25}
P_DROP_SIZE = 0.15  # one-object captions that omit the size
P_DROP_WHERE = 0.1  # one-object captions that omit the position
P_BACKGROUND = 0.5  # captions that name the background


def pair_allowed(color: str, shape: str, split: str) -> bool:
    """The hold-out rule: the pairs in `HELDOUT_PAIRS` occur in the test split only."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return split != "train" or (color, shape) not in HELDOUT_PAIRS


@dataclasses.dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    size: str
    row: int
    col: int
    cx: float  # centre in pixels (continuous, 0..64)
    cy: float

    @property
    def cell(self) -> str:
        return CELLS[self.row][self.col]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    kind: str  # "one", "relation" or "places"
    relation: str | None = None  # for kind == "relation": objects[0] REL objects[1]

    def attributes(self) -> dict[str, Any]:
        """A JSON-able description of the scene (travels with every example)."""
        return {
            "spec": SPEC_VERSION,
            "background": self.background,
            "kind": self.kind,
            "relation": self.relation,
            "objects": [
                {**dataclasses.asdict(o), "cell": o.cell} for o in self.objects
            ],
        }


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    pair_allowed("red", "circle", split)  # validates the split name
    return np.random.default_rng([int(seed), SPLITS[split], int(index), SPEC_VERSION])


def _color_shape(rng: np.random.Generator, split: str) -> tuple[str, str]:
    while True:
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        if pair_allowed(color, shape, split):
            return color, shape


def _place(rng: np.random.Generator, row: int, col: int, size: str) -> tuple[float, float]:
    """Cell centre plus uniform jitter on a 1/4-pixel grid, clipped inside the image."""
    half = SIZES[size] / 2
    cx, cy = (
        CELL_CENTERS[c] + rng.integers(-4 * JITTER, 4 * JITTER + 1) / 4 for c in (col, row)
    )
    clip = lambda v: float(min(max(v, half), IMAGE_SIZE - half))
    return clip(cx), clip(cy)


def _relation_cells(rng: np.random.Generator, relation: str) -> tuple[tuple[int, int], ...]:
    """Two cells satisfying `first RELATION second` (same row or same column)."""
    a, b = sorted(int(v) for v in rng.choice(3, size=2, replace=False))  # a < b
    line = int(rng.integers(3))
    if relation == "to the left of":
        return (line, a), (line, b)
    if relation == "to the right of":
        return (line, b), (line, a)
    if relation == "above":
        return (a, line), (b, line)
    return (b, line), (a, line)  # below


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """Draws the scene of example `index` of `split`; deterministic in its arguments."""
    rng = _rng(seed, split, index)
    background = str(rng.choice(list(BACKGROUNDS)))
    kind = str(rng.choice(list(P_KIND), p=list(P_KIND.values())))
    if kind == "one":
        size = str(rng.choice(list(SIZES)))
        color, shape = _color_shape(rng, split)
        row, col = (int(v) for v in rng.integers(3, size=2))
        cx, cy = _place(rng, row, col, size)
        return Scene(background, (Obj(color, shape, size, row, col, cx, cy),), kind)
    relation = None
    if kind == "relation":
        relation = str(rng.choice(RELATIONS))
        cells = _relation_cells(rng, relation)
    else:
        flat = rng.choice(9, size=2, replace=False)
        cells = tuple((int(c) // 3, int(c) % 3) for c in flat)
    objects = []
    for row, col in cells:
        color, shape = _color_shape(rng, split)
        objects.append(Obj(color, shape, "small", row, col, *_place(rng, row, col, "small")))
    return Scene(background, tuple(objects), kind, relation)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(words: list[str]) -> str:
    return " ".join([_article(words[0])] + words)


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The scene's caption; with `rng`, optional parts are dropped or added at random,
    without it the full canonical caption (size, position and background) is returned."""
    draw = (lambda p: rng.random() < p) if rng is not None else None
    if scene.kind == "one":
        o = scene.objects[0]
        words = [o.color, o.shape] if draw and draw(P_DROP_SIZE) else [o.size, o.color, o.shape]
        text = _noun_phrase(words)
        if not (draw and draw(P_DROP_WHERE)):
            text += " " + WHERE[o.cell]
    else:
        a, b = (_noun_phrase([o.color, o.shape]) for o in scene.objects)
        if scene.kind == "relation":
            text = f"{a} {scene.relation} {b}"
        else:
            text = f"{a} {WHERE[scene.objects[0].cell]} and {b} {WHERE[scene.objects[1].cell]}"
    if draw is None or draw(P_BACKGROUND):
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def caption_kind(text: str) -> str:
    """The scene kind ("one", "relation" or "places") a spec-v1 caption describes."""
    if any(f" {r} " in text for r in RELATIONS):
        return "relation"
    return "places" if " and " in text else "one"


def kind_repeat_index(captions, repeats: dict[str, int]) -> np.ndarray:
    """Indices into `captions`, each caption's index `repeats[its kind]` times (kinds not named: once).

    Re-weights the scene kinds a training epoch holds without changing the examples themselves."""
    unknown = set(repeats) - set(P_KIND)
    if unknown:
        raise ValueError(f"unknown scene kinds {sorted(unknown)} in kind repeats; expected {sorted(P_KIND)}")
    if any(int(r) != r or r < 0 for r in repeats.values()):
        raise ValueError(f"kind repeats must be non-negative integers, got {dict(repeats)}")
    counts = np.asarray([int(repeats.get(caption_kind(c), 1)) for c in captions], np.int64)
    if counts.sum() == 0:
        raise ValueError(f"kind repeats {dict(repeats)} leave no training example")
    return np.repeat(np.arange(len(captions)), counts)


def _shape_mask(obj: Obj, coords: np.ndarray) -> np.ndarray:
    """Boolean coverage of `obj` at supersampled pixel centres `coords` (in image pixels)."""
    x, y = coords
    s = SIZES[obj.size]
    h = s / 2
    dx, dy = x - obj.cx, y - obj.cy
    in_box = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "square":
        return in_box
    if obj.shape == "circle":
        return dx**2 + dy**2 <= h**2
    if obj.shape == "triangle":  # apex at top centre, base along the box bottom
        return in_box & (np.abs(dx) <= (dy + h) / 2)
    if obj.shape == "cross":  # plus sign, arms one third of s thick
        arm = s / 6
        return in_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Renders a scene to a [64, 64, 3] uint8 image (4x supersampled, area-downsampled)."""
    n, k = IMAGE_SIZE * SUPERSAMPLE, SUPERSAMPLE
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        # Only the subpixels of the object's bounding box can be covered.
        h = SIZES[obj.size] / 2
        x0, x1 = (int(np.clip(np.floor(v * k), 0, n)) for v in (obj.cx - h, obj.cx + h + 1))
        y0, y1 = (int(np.clip(np.floor(v * k), 0, n)) for v in (obj.cy - h, obj.cy + h + 1))
        xs, ys = (np.arange(x0, x1) + 0.5) / k, (np.arange(y0, y1) + 0.5) / k
        coords = np.stack(np.meshgrid(xs, ys, indexing="xy"))
        canvas[y0:y1, x0:x1][_shape_mask(obj, coords)] = COLORS[obj.color]
    small = canvas.reshape(IMAGE_SIZE, k, IMAGE_SIZE, k, 3).mean((1, 3))
    return np.round(small).astype(np.uint8)


def make_example(seed: int, split: str, index: int) -> dict[str, Any]:
    """Example `index` of `split`: image, caption and the scene's attributes (JSON)."""
    scene = sample_scene(seed, split, index)
    caption_rng = np.random.default_rng([int(seed), SPLITS[split], int(index), SPEC_VERSION, 1])
    return {
        "index": int(index),
        "image": render(scene),
        "caption": caption(scene, caption_rng),
        "attributes": json.dumps(scene.attributes()),
    }


class ShapesSource:
    """On-the-fly random-access source (grain's `RandomAccessDataSource` protocol).

    Yields the same examples, for the same indices, as the tfds `shapes` builder.
    """

    def __init__(self, split: str, num_examples: int, seed: int = 0):
        pair_allowed("red", "circle", split)  # validates the split name
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.split, self.num_examples, self.seed = split, int(num_examples), int(seed)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        return make_example(self.seed, self.split, index)

    def __repr__(self) -> str:
        return f"ShapesSource(split={self.split!r}, num_examples={self.num_examples}, seed={self.seed})"
