"""The shapes detector and the text-alignment evaluator: validated on real dataset images."""
import numpy as np
import pytest
from scipy import ndimage

from muse_jax.data import shapes
from muse_jax.evaluation import alignment, detector


def test_detector_accuracy_on_real_test_images():
    acc = alignment.detector_accuracy(num=400, seed=0, split="test")
    print(acc)
    for key in ("background", "count", "color", "shape", "size", "cell", "all", "caption_all"):
        assert acc[key] >= 0.99, (key, acc)


def _perturb(image, rng, noise=8.0, blur=0.8, shift=20.0):
    """A stand-in for a generated image: blurred, colour-shifted and noisy."""
    x = ndimage.gaussian_filter(image.astype(float), sigma=(blur, blur, 0))
    x = x + rng.uniform(-shift, shift, size=3) + rng.normal(0.0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_detector_tolerates_blur_noise_and_colour_shifts():
    rng = np.random.default_rng(0)
    correct = 0
    n = 150
    for i in range(n):
        ex = shapes.make_example(1, "test", i)
        correct += alignment.score(_perturb(ex["image"], rng), ex["caption"])["all"]
    assert correct / n >= 0.97, correct / n


def test_specks_are_ignored_and_blobs_are_unknown():
    ex = shapes.make_example(0, "test", 3)
    clean = detector.detect(ex["image"])
    specked = ex["image"].copy()
    specked[0:2, 30:32] = shapes.COLORS["red"]  # a 2x2 speck
    assert detector.detect(specked) == clean
    blob = np.zeros((64, 64, 3), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    blob[((xx - 32) / 14) ** 2 + ((yy - 32) / 5) ** 2 < 1] = shapes.COLORS["red"]  # a flat ellipse
    (obj,) = detector.detect(blob).objects
    assert obj.color == "red" and obj.shape == "unknown"
    odd = np.zeros((64, 64, 3), np.uint8)
    odd[20:40, 20:40] = (60, 60, 140)  # over 80 away from every palette colour
    (obj,) = detector.detect(odd).objects
    assert obj.color == "unknown" and obj.shape == "square"


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        detector.detect(np.zeros((64, 64), np.uint8))


def test_parse_caption_inverts_caption():
    n = 0
    for split in ("train", "test"):
        for i in range(1500):
            scene = shapes.sample_scene(0, split, i)
            for text in (shapes.caption(scene), shapes.caption(scene, np.random.default_rng(i))):
                parsed = alignment.parse_caption(text)
                assert alignment.format_caption(parsed) == text
                assert parsed["kind"] == scene.kind
                assert parsed["relation"] == scene.relation
                assert parsed["background"] in (None, scene.background)
                for want, obj in zip(parsed["objects"], scene.objects, strict=True):
                    assert (want["color"], want["shape"]) == (obj.color, obj.shape)
                    assert want["size"] in (None, obj.size)
                    assert want["cell"] in (None, obj.cell)
                n += 1
    assert n == 6000
    full = alignment.parse_caption("a large orange cross in the top left on a white background")
    assert full["objects"][0] == {"color": "orange", "shape": "cross", "size": "large", "cell": "top left"}
    assert full["background"] == "white"


@pytest.mark.parametrize("text", [
    "", "a red circle on a purple background", "a orange square", "an red square", "a red circles",
    "a red circle to the left of", "a small red circle to the left of a blue square",
    "a red circle on the left and a blue square", "a red circle at the top left",
])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError, match="not a spec-v1"):
        alignment.parse_caption(text)


def test_score_judges_only_what_the_caption_states():
    scene = shapes.Scene("black", (shapes.Obj("red", "circle", "large", 1, 1, 32.0, 32.0),), "one")
    image = shapes.render(scene)
    assert alignment.score(image, "a red circle") == {"count": True, "color": True, "shape": True, "all": True}
    result = alignment.score(image, "a small blue circle in the top left on a white background")
    assert result == {"count": True, "background": False, "color": False, "shape": True, "size": False,
                      "position": False, "all": False}
    assert alignment.score(np.zeros((64, 64, 3), np.uint8), "a red circle") == {
        "count": False, "color": False, "shape": False, "all": False}


def test_score_against_scene_attributes():
    ex = shapes.make_example(0, "test", 7)
    required = alignment.scene_requirements(ex["attributes"])
    assert all(o["size"] and o["cell"] for o in required["objects"])
    assert alignment.score(ex["image"], required)["all"]
    other = shapes.make_example(0, "test", 8)
    assert not alignment.score(other["image"], required)["all"]


def test_score_checks_relations_and_places():
    a = shapes.Obj("red", "circle", "small", 1, 0, 11.0, 32.0)
    b = shapes.Obj("blue", "square", "small", 1, 2, 53.0, 32.0)
    image = shapes.render(shapes.Scene("gray", (a, b), "relation", "to the left of"))
    assert alignment.score(image, "a red circle to the left of a blue square")["all"]
    swapped = alignment.score(image, "a red circle to the right of a blue square")
    assert not swapped["relation"] and swapped["color"] and swapped["shape"] and not swapped["all"]
    assert not alignment.score(image, "a red circle above a blue square")["relation"]
    assert alignment.score(image, "a blue square on the right and a red circle on the left")["all"]
    places = alignment.score(image, "a blue square on the left and a red circle on the right")
    assert places["color"] and places["shape"] and not places["position"]
    one = alignment.score(image, "a red circle")  # a second object the caption did not ask for
    assert one["color"] and one["shape"] and not one["count"] and not one["all"]


def test_alignment_report_on_real_images():
    examples = [shapes.make_example(0, "test", i) for i in range(120)]
    images = [ex["image"] for ex in examples]
    captions = [ex["caption"] for ex in examples]
    report = alignment.alignment_report(images, captions)
    assert report["num"] == 120 and report["all"] == 1.0
    assert set(report["groups"]) <= set(alignment.GROUPS) and {"one_seen", "relation", "places"} <= set(report["groups"])
    assert sum(g["num"] for g in report["groups"].values()) == 120
    assert all(v == 1.0 for v in report["attributes"].values())
    shuffled = alignment.alignment_report(images, captions[1:] + captions[:1])
    assert shuffled["all"] < 0.1 and shuffled["attributes"]["color"] < 0.5
    with pytest.raises(ValueError, match="images but"):
        alignment.alignment_report(images, captions[:3])


def test_eval_prompts_are_stratified_canonical_test_prompts():
    prompts = alignment.eval_prompts(41, seed=0)
    assert prompts == alignment.eval_prompts(41, seed=0)
    groups = [alignment.prompt_group(p) for p in prompts]
    assert [groups.count(g) for g in alignment.GROUPS] == [11, 10, 10, 10]
    for text, group in zip(prompts, groups):
        parsed = alignment.parse_caption(text)
        assert parsed["background"] is not None
        if parsed["kind"] == "one":
            o = parsed["objects"][0]
            assert o["size"] and o["cell"]
            assert ((o["color"], o["shape"]) in shapes.HELDOUT_PAIRS) == (group == "one_heldout")
    bare = alignment.eval_prompts(8, seed=0, background=False)
    assert all(alignment.parse_caption(p)["background"] is None for p in bare)
    # They are the canonical captions of test-split scenes.
    canonical = {shapes.caption(shapes.sample_scene(0, "test", i)) for i in range(2000)}
    assert set(prompts) <= canonical
