"""The shapes dataset follows spec v1 exactly and is deterministic."""
import json

import numpy as np
import pytest

from muse_jax.data import shapes

N = 300  # examples checked per split


def _examples(split, n=N, seed=0):
    return [shapes.make_example(seed, split, i) for i in range(n)]


def test_same_seed_split_index_gives_identical_bytes():
    for split in ("train", "test"):
        for i in (0, 7, 123):
            a, b = shapes.make_example(3, split, i), shapes.make_example(3, split, i)
            assert a["image"].tobytes() == b["image"].tobytes()
            assert (a["caption"], a["attributes"]) == (b["caption"], b["attributes"])


def test_different_seeds_and_splits_differ():
    a = [shapes.make_example(0, "train", i)["image"] for i in range(20)]
    b = [shapes.make_example(1, "train", i)["image"] for i in range(20)]
    c = [shapes.make_example(0, "test", i)["image"] for i in range(20)]
    assert sum(np.array_equal(x, y) for x, y in zip(a, b)) < 3
    assert sum(np.array_equal(x, y) for x, y in zip(a, c)) < 3


def test_image_format():
    ex = shapes.make_example(0, "train", 0)
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8


@pytest.mark.parametrize("split", ["train", "test"])
def test_palette_exact_in_interiors_and_background(split):
    for ex in _examples(split):
        img = ex["image"]
        attrs = json.loads(ex["attributes"])
        for o in attrs["objects"]:
            # The pixel holding the object's centre lies wholly inside every shape.
            px = img[int(o["cy"]), int(o["cx"])]
            assert tuple(px) == shapes.COLORS[o["color"]], (ex["caption"], o)
        # Pixels far from every object show the exact background colour.
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        far = np.ones((64, 64), bool)
        for o in attrs["objects"]:
            far &= np.maximum(abs(xx - o["cx"]), abs(yy - o["cy"])) > shapes.SIZES[o["size"]] / 2 + 1
        assert (img[far] == shapes.BACKGROUNDS[attrs["background"]]).all()


def test_edges_are_antialiased():
    """Circles and triangles have pixels strictly between object and background colour."""
    for ex in _examples("train", 100):
        attrs = json.loads(ex["attributes"])
        if attrs["kind"] == "one" and attrs["objects"][0]["shape"] in ("circle", "triangle"):
            img = ex["image"].astype(int)
            bg = np.array(shapes.BACKGROUNDS[attrs["background"]])
            fg = np.array(shapes.COLORS[attrs["objects"][0]["color"]])
            is_bg = (img == bg).all(-1)
            is_fg = (img == fg).all(-1)
            assert (~is_bg & ~is_fg).sum() > 0
            return
    pytest.fail("no circle or triangle in the first 100 examples")


def _cell_of(x, y):
    return shapes.CELLS[min(int(y // (64 / 3)), 2)][min(int(x // (64 / 3)), 2)]


@pytest.mark.parametrize("split", ["train", "test"])
def test_measured_centroid_lies_in_named_cell(split):
    for ex in _examples(split):
        attrs = json.loads(ex["attributes"])
        img = ex["image"].astype(float)
        bg = np.array(shapes.BACKGROUNDS[attrs["background"]], float)
        for o in attrs["objects"]:
            # Coverage from the colour mix: 1 inside, fractional on antialiased edges.
            fg = np.array(shapes.COLORS[o["color"]], float)
            axis = np.argmax(abs(fg - bg))
            cover = np.clip((img[..., axis] - bg[axis]) / (fg[axis] - bg[axis]), 0, 1)
            # Restrict to this object's box (two objects never share a box).
            yy, xx = np.mgrid[0:64, 0:64] + 0.5
            box = np.maximum(abs(xx - o["cx"]), abs(yy - o["cy"])) <= shapes.SIZES[o["size"]] / 2 + 1
            w = cover * box
            cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
            assert _cell_of(cx, cy) == o["cell"], (ex["caption"], o, cx, cy)


def test_sizes_and_two_object_scenes():
    for ex in _examples("train"):
        attrs = json.loads(ex["attributes"])
        objs = attrs["objects"]
        if attrs["kind"] == "one":
            assert len(objs) == 1
        else:
            assert len(objs) == 2 and all(o["size"] == "small" for o in objs)
            assert objs[0]["cell"] != objs[1]["cell"]
        for o in objs:
            h = shapes.SIZES[o["size"]] / 2
            assert h <= o["cx"] <= 64 - h and h <= o["cy"] <= 64 - h
            assert abs(o["cx"] - shapes.CELL_CENTERS[o["col"]]) <= shapes.JITTER + 1e-9 or o["cx"] in (h, 64 - h)


def test_relations_hold_geometrically():
    seen = set()
    for ex in _examples("train", 600):
        attrs = json.loads(ex["attributes"])
        if attrs["kind"] != "relation":
            continue
        a, b, rel = *attrs["objects"], attrs["relation"]
        seen.add(rel)
        if rel in ("to the left of", "to the right of"):
            assert a["row"] == b["row"]
            assert (a["col"] < b["col"]) == (rel == "to the left of")
        else:
            assert a["col"] == b["col"]
            assert (a["row"] < b["row"]) == (rel == "above")
    assert seen == set(shapes.RELATIONS)


def test_heldout_pairs_absent_from_train_present_in_test():
    def pairs(split, n):
        found = set()
        for ex in _examples(split, n):
            for o in json.loads(ex["attributes"])["objects"]:
                found.add((o["color"], o["shape"]))
            for color, shape in shapes.HELDOUT_PAIRS:  # nor in captions
                if split == "train":
                    assert f"{color} {shape}" not in ex["caption"]
        return found

    assert not pairs("train", 2000) & shapes.HELDOUT_PAIRS
    assert shapes.HELDOUT_PAIRS <= pairs("test", 2000)
    assert not shapes.pair_allowed("purple", "triangle", "train")
    assert shapes.pair_allowed("purple", "triangle", "test")


def test_captions_follow_grammar():
    kinds = {"one": 0, "relation": 0, "places": 0}
    for ex in _examples("train", 1000):
        attrs = json.loads(ex["attributes"])
        kinds[attrs["kind"]] += 1
        cap = ex["caption"]
        for o in attrs["objects"]:
            assert f"{o['color']} {o['shape']}" in cap
        if attrs["kind"] == "relation":
            assert attrs["relation"] in cap
        if attrs["kind"] == "places":
            assert " and " in cap
        assert " a orange" not in cap and not cap.startswith("a orange")
        assert "an small" not in cap and " a a" not in cap
        if "background" in cap:
            assert cap.endswith(f"on a {attrs['background']} background") or cap.endswith(
                f"on an {attrs['background']} background"
            )
    assert all(v > 100 for v in kinds.values()), kinds


def test_canonical_caption_names_every_attribute():
    scene = shapes.sample_scene(0, "test", 4)
    cap = shapes.caption(scene)
    o = scene.objects[0]
    assert cap.endswith(f"on a {scene.background} background")
    if scene.kind == "one":
        assert cap.startswith(f"a {o.size} {o.color} {o.shape} {shapes.WHERE[o.cell]}")


def test_optional_caption_parts_vary():
    caps = [ex["caption"] for ex in _examples("train", 500)]
    with_bg = sum("background" in c for c in caps)
    assert 150 < with_bg < 350
    one = [c for c in caps if " and " not in c and not any(r in c for r in shapes.RELATIONS)]
    assert any(not (c.startswith("a small") or c.startswith("a large")) for c in one)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown split"):
        shapes.make_example(0, "valid", 0)
    with pytest.raises(ValueError, match="positive"):
        shapes.ShapesSource("train", 0)
    with pytest.raises(IndexError):
        shapes.ShapesSource("train", 5)[5]


def test_caption_kind_and_kind_repeats():
    examples = _examples("train")
    kinds = [json.loads(ex["attributes"])["kind"] for ex in examples]
    captions = [ex["caption"] for ex in examples]  # optional parts dropped at random
    assert [shapes.caption_kind(c) for c in captions] == kinds
    index = shapes.kind_repeat_index(captions, {"one": 0, "relation": 3})
    assert np.all(np.diff(index) >= 0)
    picked = [kinds[i] for i in index]
    assert picked.count("one") == 0
    assert picked.count("relation") == 3 * kinds.count("relation")
    assert picked.count("places") == kinds.count("places")  # not named: once
    assert len(set(index.tolist())) == kinds.count("relation") + kinds.count("places")
    np.testing.assert_array_equal(shapes.kind_repeat_index(captions, {}), np.arange(len(captions)))
    for bad, match in (({"two": 2}, "unknown scene kinds"), ({"one": -1}, "non-negative integers"),
                       ({"one": 1.5}, "non-negative integers"),
                       ({"one": 0, "relation": 0, "places": 0}, "leave no training example")):
        with pytest.raises(ValueError, match=match):
            shapes.kind_repeat_index(captions, bad)
