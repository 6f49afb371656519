"""The one-call evaluations that `muse-jax eval` builds on."""
import numpy as np
import pytest

from muse_jax import image_ops
from muse_jax.data import shapes
from muse_jax.evaluation import alignment, features, scores
from muse_jax.evaluation import tokenizer as tokenizer_eval


def _render_prompts(prompts, seed=0):
    """A perfect 'generator': the test scene whose canonical caption is the prompt."""
    scenes = {shapes.caption(s): s for s in (shapes.sample_scene(seed, "test", i) for i in range(3000))}
    return np.stack([shapes.render(scenes[p]) for p in prompts])


def test_evaluate_images_perfect_and_wrong_generators(tmp_path):
    prompts = alignment.eval_prompts(24, seed=0)
    calls = []

    def generate(batch):
        calls.append(len(batch))
        return _render_prompts(batch)

    images, sec_per_image = scores.timed_generation(generate, prompts, batch_size=8)
    assert calls == [8, 8, 8] and images.shape == (24, 64, 64, 3) and sec_per_image > 0
    good = scores.evaluate_images(images, prompts, cache_dir=str(tmp_path), num_reference=48)
    assert good["alignment"]["all"] == 1.0
    assert set(good["alignment"]["groups"]) == set(alignment.GROUPS)
    wrong = scores.evaluate_images(images[::-1], prompts, cache_dir=str(tmp_path), num_reference=48)
    assert wrong["alignment"]["all"] < 0.2
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 25, images.shape), 0, 255).astype(np.uint8)
    bad = scores.evaluate_images(noisy, prompts, cache_dir=str(tmp_path), num_reference=48)
    assert bad["fid_shapes"] > good["fid_shapes"]
    path = scores.write_json(bad, str(tmp_path / "out" / "eval.json"))
    assert path.endswith("eval.json")


def test_evaluate_tokenizer_on_perfect_and_noisy_reconstructions():
    originals = features.shapes_images(0, "test", 24)
    tokens = np.arange(24 * 16) % 32
    perfect = tokenizer_eval.scores(originals, originals, tokens, 64)
    assert perfect["psnr"] == 100.0 and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["rfid_shapes"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["codebook"]["num_used"] == 32 and perfect["codebook"]["fraction_used"] == 0.5
    noisy = np.clip(originals + np.random.default_rng(0).normal(0, 10, originals.shape), 0, 255).astype(np.uint8)
    worse = tokenizer_eval.scores(originals, noisy, tokens, 64)
    assert 20 < worse["psnr"] < 40 and worse["ssim"] < 0.9 and worse["rfid_shapes"] > 1.0


def test_scene_alignment_counts_the_scenes_reconstructions_keep():
    examples = [shapes.make_example(0, "test", i) for i in range(40)]
    images, captions = np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]
    kept = tokenizer_eval.scene_alignment(images, captions)
    assert kept["one object"]["num"] + kept["two objects"]["num"] == 40
    assert kept["one object"]["all"] >= 0.95 and kept["two objects"]["all"] >= 0.95
    blurred = image_ops.downsample_area(images, 8)  # 8x8 px, judged pixel-repeated to 64 px
    lost = tokenizer_eval.scene_alignment(blurred, captions)
    assert lost["one object"]["num"] == kept["one object"]["num"]
    assert lost["one object"]["all"] < 0.5 and lost["two objects"]["all"] < 0.2
    swapped = tokenizer_eval.scene_alignment(images[::-1], captions)
    assert swapped["two objects"]["all"] < 0.2


def test_validate_detector_passes_on_real_images_and_fails_loudly():
    assert scores.validate_detector(num=40)["all"] >= 0.99
    with pytest.raises(RuntimeError, match="below"):
        scores.validate_detector(num=5, min_accuracy=1.01)


class _ImagePipeline:
    """A stand-in cascade whose 'tokens' are images: a perfect tokenizer, base stage and (unless
    `broken_superres`) super-res stage for shapes captions; base size is area-downsampled by 2."""

    image_size, base_image_size, superres = 64, 32, True

    def __init__(self, broken_superres=False):
        examples = [shapes.make_example(0, "test", i) for i in range(300)]
        self.by_caption = {e["caption"]: e["image"] for e in examples}
        self.broken = broken_superres

    def encode_images(self, images, stage="superres"):
        return image_ops.downsample_area(images, 2) if stage == "base" else images

    def decode_tokens(self, tokens, stage=None):
        return tokens

    def superres_tokens(self, base, prompts, seed=0, **overrides):
        real = np.stack([self.by_caption[p] for p in prompts])
        return np.zeros_like(real) if self.broken else real

    def generate_tokens(self, prompts, seed=0, **overrides):
        real = np.stack([self.by_caption[p] for p in prompts])
        return self.encode_images(real, "base"), self.superres_tokens(None, prompts)


def test_stage_breakdown_scores_each_stage_from_its_own_images():
    from muse_jax.evaluation import run

    good = run.stage_breakdown(_ImagePipeline(), 12)
    assert list(good) == ["real images", "tokenizer, full size", "tokenizer, base size",
                          "super-res from the real base tokens", "base stage samples", "whole cascade"]
    assert all(r["num"] == 12 for r in good.values())
    for name in ("real images", "tokenizer, full size", "super-res from the real base tokens", "whole cascade"):
        assert good[name]["all"] == 1.0, name
    # 32 px images, pixel-repeated to 64 px: colour, size and position survive.
    for name in ("tokenizer, base size", "base stage samples"):
        assert good[name]["attributes"]["position"] == 1.0 and good[name]["attributes"]["size"] == 1.0
    broken = run.stage_breakdown(_ImagePipeline(broken_superres=True), 12)
    assert broken["super-res from the real base tokens"]["all"] == 0.0 and broken["whole cascade"]["all"] == 0.0
    assert broken["tokenizer, base size"] == good["tokenizer, base size"]
    with pytest.raises(ValueError, match="at least one image"):
        run.stage_breakdown(_ImagePipeline(), 0)

    two = run.stage_breakdown(_ImagePipeline(broken_superres=True), 12, objects=2)
    assert all(r["num"] == 12 for r in two.values())
    assert two["real images"]["all"] == 1.0 and two["whole cascade"]["all"] == 0.0
    assert two["real images"]["attributes"]["count"] == 1.0 and "relation" in two["real images"]["attributes"]
    assert "relation" not in good["real images"]["attributes"]  # one-object captions state no relation
    with pytest.raises(ValueError, match="1 or 2 objects"):
        run.stage_breakdown(_ImagePipeline(), 12, objects=3)


def _kept_checkpoints(workdir, stage, num_steps, steps):
    import json

    (workdir / stage / "checkpoints").mkdir(parents=True)
    (workdir / stage / "config.json").write_text(json.dumps({"train": {"num_steps": num_steps}}))
    for s in steps:
        (workdir / stage / "checkpoints" / str(s)).mkdir()


def test_training_curve_scores_evenly_spaced_checkpoints(tmp_path, monkeypatch):
    import json

    import PIL.Image

    from muse_jax import cascade
    from muse_jax.evaluation import report, run

    _kept_checkpoints(tmp_path, "base", 300, (100, 200, 300))
    _kept_checkpoints(tmp_path, "superres", 90, (30, 60, 90))
    assert run.curve_steps(tmp_path, 3) == [{"base": 100, "superres": 30}, {"base": 200, "superres": 60},
                                            {"base": 300, "superres": 90}]
    assert run.curve_steps(tmp_path, 1) == [{"base": 300, "superres": 90}]
    with pytest.raises(FileNotFoundError, match="keep_every"):
        run.curve_steps(tmp_path, 2)  # step 150 was not kept
    with pytest.raises(ValueError, match="at least one point"):
        run.curve_steps(tmp_path, 0)

    class Pipe:  # more of the prompts drawn right the longer the base stage trained
        options = cascade.SampleOptions(batch_size=8)

        def __init__(self, steps):
            self.right = steps["base"] / 300

        def generate(self, prompts, seed=0, **overrides):
            good = _render_prompts(prompts)
            wrong = np.full_like(good, 128)
            return np.stack([g if i < self.right * len(prompts) else w for i, (g, w) in enumerate(zip(good, wrong))])

    loaded = []
    monkeypatch.setattr(cascade.Pipeline, "from_workdir", classmethod(
        lambda cls, workdir, steps=None, **kw: loaded.append(steps) or Pipe(steps)))
    curve = run.training_curve(tmp_path, tmp_path, 3, num_prompts=24, say=lambda *a: None)
    assert loaded == run.curve_steps(tmp_path, 3)
    alls = [r["all"] for r in curve["results"]]
    assert alls[0] < alls[1] < alls[2] == 1.0
    assert json.loads((tmp_path / "curve.json").read_text())["results"][2]["steps"] == {"base": 300, "superres": 90}
    assert PIL.Image.open(curve["png"]).size[0] > 300
    lines = report._curve_lines(curve)
    assert "![training curve](eval/curve.png)" in lines
    assert any(line.startswith("| base 300, superres 90 | 100.0 % |") for line in lines)
    # The two-object groups' colour / count / shape at each point: a blank image has none of them right,
    # a rendered one all, so each equals its group's fully-correct rate.
    for r in curve["results"]:
        for g in ("relation", "places"):
            assert [r["attributes"][g][a] for a in ("color", "count", "shape")] == [r["groups"][g]] * 3
    assert curve["results"][0]["groups"]["places"] < 1
    assert "| base 300, superres 90 | 100.0 % / 100.0 % / 100.0 % | 100.0 % / 100.0 % / 100.0 % |" in lines
