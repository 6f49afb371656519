"""Text alignment on shapes: does an image show what its caption says?

`parse_caption` inverts `shapes.caption` exactly (only what a caption states is judged: it may
omit size, position and background); `score` compares a caption with the `detector`'s
reading of an image; `alignment_report` aggregates per attribute and per prompt group:
  one_seen     one object, colour-shape pair seen in training
  one_heldout  one object, colour-shape pair in `shapes.HELDOUT_PAIRS` (test split only)
  relation     two objects, "A <relation> B"
  places       two objects, "A <where> and B <where>"
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from muse_jax.data import shapes
from muse_jax.evaluation import detector as det_lib

GROUPS = ("one_seen", "one_heldout", "relation", "places")
# Attributes `score` may judge, in report order; "all" is every judged attribute at once.
ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation", "background")

_COLOR = "|".join(shapes.COLORS)
_SHAPE = "|".join(shapes.SHAPES)
_SIZE = "|".join(shapes.SIZES)
_WHERE_BY_PHRASE = {phrase: cell for cell, phrase in shapes.WHERE.items()}
_WHERE = "|".join(sorted(map(re.escape, _WHERE_BY_PHRASE), key=len, reverse=True))
_REL = "|".join(shapes.RELATIONS)
_BG = rf"(?: on an? (?P<bg>{'|'.join(shapes.BACKGROUNDS)}) background)?"
_OBJ = lambda i: rf"an? (?P<color{i}>{_COLOR}) (?P<shape{i}>{_SHAPE})"
_PATTERNS = {
    "one": re.compile(
        rf"^an? (?:(?P<size0>{_SIZE}) )?(?P<color0>{_COLOR}) (?P<shape0>{_SHAPE})(?: (?P<where0>{_WHERE}))?{_BG}$"
    ),
    "relation": re.compile(rf"^{_OBJ(0)} (?P<rel>{_REL}) {_OBJ(1)}{_BG}$"),
    "places": re.compile(rf"^{_OBJ(0)} (?P<where0>{_WHERE}) and {_OBJ(1)} (?P<where1>{_WHERE}){_BG}$"),
}


def parse_caption(text: str) -> dict[str, Any]:
    """The attributes a spec-v1 caption states: {kind, background, relation, objects: [{color,
    shape, size, cell}]}, with None for what it leaves unsaid. Raises ValueError otherwise."""
    for kind, pattern in _PATTERNS.items():
        m = pattern.match(text)
        if m is None:
            continue
        g = m.groupdict()
        n = 1 if kind == "one" else 2
        objects = [
            {
                "color": g[f"color{i}"],
                "shape": g[f"shape{i}"],
                "size": g.get(f"size{i}"),
                "cell": _WHERE_BY_PHRASE[g[f"where{i}"]] if g.get(f"where{i}") else None,
            }
            for i in range(n)
        ]
        parsed = {"kind": kind, "background": g["bg"], "relation": g.get("rel"), "objects": objects}
        if format_caption(parsed) != text:  # articles ("a" / "an") must be the grammar's
            break
        return parsed
    raise ValueError(f"not a spec-v1 shapes caption: {text!r}")


def format_caption(parsed: dict[str, Any]) -> str:
    """The caption stating exactly the attributes in `parsed` (the inverse of `parse_caption`)."""
    art = lambda w: "an" if w[0] in "aeiou" else "a"
    np_ = lambda words: " ".join([art(words[0])] + words)
    objs = parsed["objects"]
    if parsed["kind"] == "one":
        o = objs[0]
        text = np_(([o["size"]] if o["size"] else []) + [o["color"], o["shape"]])
        if o["cell"]:
            text += " " + shapes.WHERE[o["cell"]]
    elif parsed["kind"] == "relation":
        text = f"{np_([objs[0]['color'], objs[0]['shape']])} {parsed['relation']} {np_([objs[1]['color'], objs[1]['shape']])}"
    elif parsed["kind"] == "places":
        a, b = (np_([o["color"], o["shape"]]) + " " + shapes.WHERE[o["cell"]] for o in objs)
        text = f"{a} and {b}"
    else:
        raise ValueError(f"unknown caption kind {parsed['kind']!r}")
    if parsed["background"]:
        text += f" on {art(parsed['background'])} {parsed['background']} background"
    return text


def scene_requirements(attributes: dict[str, Any] | str) -> dict[str, Any]:
    """Everything a scene's attributes (an example's "attributes", JSON or dict) say, in the
    form `parse_caption` returns (for `score`): every object's size and cell, the relation."""
    a = json.loads(attributes) if isinstance(attributes, str) else attributes
    return {
        "kind": a["kind"],
        "background": a["background"],
        "relation": a.get("relation"),
        "objects": [{k: o[k] for k in ("color", "shape", "size", "cell")} for o in a["objects"]],
    }


def prompt_group(parsed: dict[str, Any] | str) -> str:
    """The prompt group (one of `GROUPS`) of a caption or its parse."""
    if isinstance(parsed, str):
        parsed = parse_caption(parsed)
    if parsed["kind"] == "one":
        o = parsed["objects"][0]
        return "one_heldout" if (o["color"], o["shape"]) in shapes.HELDOUT_PAIRS else "one_seen"
    return parsed["kind"]


def _scene_group(scene: shapes.Scene) -> str:
    if scene.kind == "one":
        o = scene.objects[0]
        return "one_heldout" if (o.color, o.shape) in shapes.HELDOUT_PAIRS else "one_seen"
    return scene.kind


def eval_prompts(num: int, seed: int = 0, *, background: bool = True) -> list[str]:
    """`num` canonical test-split captions (size, colour, shape, position; background optional),
    stratified over `GROUPS` (equal shares, the remainder to the first groups), in scan order."""
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    quota = {g: num // len(GROUPS) + (i < num % len(GROUPS)) for i, g in enumerate(GROUPS)}
    picked: dict[str, list[str]] = {g: [] for g in GROUPS}
    for index in itertools.count():
        if all(len(picked[g]) == quota[g] for g in GROUPS):
            break
        scene = shapes.sample_scene(seed, "test", index)
        group = _scene_group(scene)
        if len(picked[group]) < quota[group]:
            text = shapes.caption(scene)
            if not background:
                parsed = parse_caption(text)
                text = format_caption({**parsed, "background": None})
            picked[group].append(text)
    return [t for g in GROUPS for t in picked[g]]


def _object_matches(want: dict[str, Any], got: det_lib.DetectedObject | None) -> dict[str, bool]:
    """Which stated attributes of caption object `want` the detected object `got` has."""
    if got is None:  # the image lacks this object: every stated attribute is wrong
        return {k: False for k in ("color", "shape")} | {
            name: False for name, key in (("size", "size"), ("position", "cell")) if want.get(key)
        }
    out = {"color": got.color == want["color"], "shape": got.shape == want["shape"]}
    if want.get("size"):
        out["size"] = got.size == want["size"]
    if want.get("cell"):
        out["position"] = got.cell == want["cell"]
    return out


def score(image_or_detection: np.ndarray | det_lib.Detection, caption: str | dict[str, Any],
          max_objects: int = 6) -> dict[str, bool]:
    """Per-attribute correctness of an image against what its caption states, plus "all".

    `caption`: a caption, or a dict from `parse_caption` or `scene_requirements`.
    Caption objects are matched to detected objects by the assignment that gets the most
    colours and shapes right (then the most other attributes); an object the image lacks gets
    every attribute wrong. "count" checks the number of objects; "relation" uses the centres.
    """
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    detection = (
        image_or_detection if isinstance(image_or_detection, det_lib.Detection) else det_lib.detect(image_or_detection)
    )
    wanted = parsed["objects"]
    found = sorted(detection.objects, key=lambda o: -o.area)[:max_objects]
    result: dict[str, bool] = {"count": len(detection.objects) == len(wanted)}
    if parsed["background"]:
        result["background"] = detection.background == parsed["background"]
    best = None
    slots = list(range(len(found))) + [None] * len(wanted)  # None: no object for it
    for assign in set(itertools.permutations(slots, len(wanted))):
        if any(a is not None and assign.count(a) > 1 for a in assign):
            continue
        per_obj = [_object_matches(want, None if a is None else found[a]) for want, a in zip(wanted, assign)]
        attrs = {k: all(m[k] for m in per_obj) for k in per_obj[0]}
        if parsed["kind"] == "relation":
            a, b = assign
            attrs["relation"] = a is not None and b is not None and det_lib.relation_holds(found[a], found[b], parsed["relation"])
        key = (sum(m["color"] + m["shape"] for m in per_obj), sum(sum(m.values()) for m in per_obj) + attrs.get("relation", 0))
        if best is None or key > best[0]:
            best = (key, attrs)
    result.update(best[1])
    result["all"] = all(result.values())
    return result


def alignment_report(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str],
                     return_details: bool = False) -> dict[str, Any]:
    """Accuracy per attribute and per prompt group (with fully-correct rates) of images vs captions."""
    if len(images) != len(captions):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("alignment_report needs at least one image")
    rows = []
    for image, text in zip(images, captions):
        parsed = parse_caption(text)
        rows.append({"caption": text, "group": prompt_group(parsed), **score(image, parsed)})
    report = {"num": len(rows), **_aggregate(rows), "groups": {}}
    for g in GROUPS:
        sub = [r for r in rows if r["group"] == g]
        if sub:
            report["groups"][g] = {"num": len(sub), **_aggregate(sub)}
    if return_details:
        report["details"] = rows
    return report


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    attrs = {}
    for k in ATTRIBUTES:
        judged = [r[k] for r in rows if k in r]
        if judged:
            attrs[k] = float(np.mean(judged))
    return {"all": float(np.mean([r["all"] for r in rows])), "attributes": attrs}


def detector_accuracy(num: int = 1000, seed: int = 0, split: str = "test") -> dict[str, Any]:
    """The detector's accuracy on real dataset images against the scenes' ground truth.

    Per attribute (background, count, and colour/shape/size/cell of every object), "all" (the
    whole scene right), and "caption_all" (`score` against each example's own caption).
    """
    totals: dict[str, float] = {}
    for index in range(num):
        ex = shapes.make_example(seed, split, index)
        truth = json.loads(ex["attributes"])
        detection = det_lib.detect(ex["image"])
        gt = sorted(truth["objects"], key=lambda o: (o["row"], o["col"]))
        ok = {"background": detection.background == truth["background"], "count": len(detection.objects) == len(gt)}
        for k in ("color", "shape", "size", "cell"):
            ok[k] = ok["count"] and all(getattr(d, k) == o[k] for d, o in zip(detection.objects, gt))
        ok["all"] = all(ok.values())
        ok["caption_all"] = score(detection, ex["caption"])["all"]
        for k, v in ok.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {"num": num, "split": split, "seed": seed, **{k: v / num for k, v in totals.items()}}

