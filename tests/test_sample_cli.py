"""The cascade (Pipeline) and `muse-jax sample|edit`, with a toy tokenizer and stages (no training)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from _multidevice import run_with_devices

from muse_jax import cascade, cli

K = 16  # toy codebook: gray levels


class ToyTokenizer:
    """Each f x f block -> its mean gray level // 16; decode paints the block that gray."""

    codebook_size = K

    def __init__(self, factor=4):
        self.factor = factor

    def encode(self, images):
        x, f = np.asarray(images, np.float32).mean(-1), self.factor
        b, h, w = x.shape
        return (x.reshape(b, h // f, f, w // f, f).mean((2, 4)) // 16).astype(np.int32)

    def decode(self, tokens):
        t = np.asarray(tokens)
        assert t.min() >= 0 and t.max() < K, "decode got a mask token"
        img = np.repeat(np.repeat(t * 16 + 8, self.factor, axis=1), self.factor, axis=2).astype(np.uint8)
        return np.repeat(img[..., None], 3, axis=-1)


def toy_stage(name, grid, lowres_grid=0, seed=0):
    """A stage whose logits depend on position, prompt (character codes), context and low-res tokens."""
    r = np.random.default_rng(seed)
    params = {
        "pos": jnp.asarray(r.normal(size=(grid * grid, K)), jnp.float32),
        "chars": jnp.asarray(r.normal(size=(128, K)) * 3, jnp.float32),
        "tok": jnp.asarray(r.normal(size=(K + 1, K)), jnp.float32),
        "low": jnp.asarray(r.normal(size=(K, K)), jnp.float32),
    }

    def prepare_text(prompts):
        ids = np.zeros((len(prompts), 12), np.int32)
        for i, p in enumerate(prompts):
            codes = [ord(c) % 128 for c in p[:12]]
            ids[i, : len(codes)] = codes
        return {"ids": ids, "mask": ids > 0}

    def embed(params, t):
        return params["chars"][t["ids"]], t["mask"]

    def apply(params, tokens, emb, mask, lowres=None):
        text = (emb * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)
        logits = params["pos"][None] + text[:, None] + params["tok"][tokens].mean(1, keepdims=True)
        if lowres is not None:
            logits = logits + params["low"][lowres].mean(1, keepdims=True)
        return logits

    return cascade.Stage(name, params, grid, K, prepare_text, embed, apply, lowres_grid)


def toy_pipeline(batch_size=4, superres=True, **opts):
    options = cascade.SampleOptions(steps=4, sr_steps=3, batch_size=batch_size, edit_iterations=3, **opts)
    sr = toy_stage("superres", 4, lowres_grid=2, seed=1) if superres else None
    return cascade.Pipeline(ToyTokenizer(), toy_stage("base", 2), sr, options)


def test_generate_cascade_deterministic_and_batched():
    pipe = toy_pipeline()
    assert pipe.image_size == 16 and pipe.base_image_size == 8
    a = pipe.generate(["red", "blue"], num_per_prompt=3, seed=0)
    assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, pipe.generate(["red", "blue"], num_per_prompt=3, seed=0))
    assert (a != pipe.generate(["red", "blue"], num_per_prompt=3, seed=1)).any()
    # 6 images in chunks of 4 (the last padded): one program per stage, each compiled once
    assert len(pipe._programs) == 2
    assert [p._cache_size() for p in pipe._programs.values()] == [1, 1]
    base, sr = pipe.generate_tokens(["red"] * 5, seed=3, guidance=0.0)
    assert base.shape == (5, 4) and sr.shape == (5, 16) and (sr < K).all() and (base < K).all()


def test_a_tokenizer_per_stage_at_the_same_image_size():
    """Base: f8 tokens of the whole 16 px image (2x2); super-res: f4 tokens of it (4x4)."""
    options = cascade.SampleOptions(steps=2, sr_steps=2, batch_size=4)
    toks = {"base": ToyTokenizer(8), "superres": ToyTokenizer(4)}
    pipe = cascade.Pipeline(toks, toy_stage("base", 2), toy_stage("superres", 4, lowres_grid=2, seed=1), options)
    assert pipe.image_size == pipe.base_image_size == 16
    images = toks["superres"].decode(np.random.default_rng(0).integers(0, K, (2, 4, 4)))
    np.testing.assert_array_equal(pipe.encode_images(images, "base"), toks["base"].encode(images).reshape(2, 4))
    np.testing.assert_array_equal(pipe.encode_images(images), toks["superres"].encode(images).reshape(2, 16))
    base = pipe.encode_images(images, "base")
    np.testing.assert_array_equal(pipe.decode_tokens(base, "base"), toks["base"].decode(base.reshape(2, 2, 2)))
    assert pipe.generate(["red"], seed=0).shape == (1, 16, 16, 3)
    mask = np.zeros((2, 16, 16), bool)
    mask[:, :8] = True  # the top half re-drawn; the bottom half's tokens of both stages kept
    out = pipe.inpaint(images, mask, ["red", "blue"], seed=0)
    np.testing.assert_array_equal(out[:, 8:], images[:, 8:])


def test_stage_methods_superres_alone_encode_and_decode():
    pipe = toy_pipeline()
    prompts = ["red", "blue", "green"]
    base, sr = pipe.generate_tokens(prompts, seed=2)
    np.testing.assert_array_equal(pipe.superres_tokens(base, prompts, seed=2), sr)  # the cascade's second half
    other = pipe.superres_tokens((base + 1) % K, prompts, seed=2)
    assert (other != sr).any()  # ... and it reads the base tokens it is given
    blocks = np.random.default_rng(0).integers(0, K, (2, 4, 4))
    images = pipe.tokenizer.decode(blocks)  # [2, 16, 16, 3], one gray per 4x4 block
    np.testing.assert_array_equal(pipe.encode_images(images), blocks.reshape(2, 16))
    np.testing.assert_array_equal(pipe.decode_tokens(blocks.reshape(2, 16)), images)
    assert pipe.encode_images(images, "base").shape == (2, 4)
    with pytest.raises(ValueError, match=r"base tokens are 2x2 per image, got 4x4"):
        pipe.decode_tokens(blocks.reshape(2, 16), "base")
    with pytest.raises(ValueError, match=r"base tokens must be \[3, 4\]"):
        pipe.superres_tokens(base[:, :3], prompts)
    with pytest.raises(ValueError, match="square grid"):
        pipe.decode_tokens(np.zeros((2, 15), np.int32))
    with pytest.raises(ValueError, match="no super-res stage"):
        toy_pipeline(superres=False).superres_tokens(base, prompts)


def test_pipeline_sharded_over_data_axis():
    """8 CPU devices, batch sharded over the mesh's data axis: the same images as on one device."""
    code = """
    import json, sys
    sys.path.insert(0, "tests")
    import jax, ml_collections, numpy as np
    from muse_jax import partitioning
    from test_sample_cli import toy_pipeline
    pipe = toy_pipeline(batch_size=8)
    if len(jax.devices()) > 1:
        pipe.mesh = partitioning.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
        assert pipe._put(np.zeros((8, 3))).sharding.spec[0] == ("data", "fsdp")
    base, sr = pipe.generate_tokens(["red", "blue", "green"] * 4, seed=1)
    print(json.dumps([base.tolist(), sr.tolist()]))
    """
    sharded = json.loads(run_with_devices(code, 8).strip().splitlines()[-1])
    single = json.loads(run_with_devices(code, 1).strip().splitlines()[-1])
    assert sharded == single


def test_base_only_pipeline():
    pipe = toy_pipeline(superres=False)
    assert pipe.generate(["x"], num_per_prompt=2).shape == (2, 8, 8, 3)


def test_inpaint_keeps_pixels_outside_mask():
    pipe = toy_pipeline()
    r = np.random.default_rng(0)
    images = r.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:7, 3:9] = True  # inpaint a box
    masks[1] = True
    masks[1, 4:12, 4:12] = False  # outpaint around a box
    masks[2, 15, 15] = True  # a single pixel
    out = pipe.inpaint(images, masks, ["green"], seed=0)
    np.testing.assert_array_equal(out[~masks], images[~masks])
    # the masked pixels come from the generated tokens (toy decode paints flat blocks)
    assert (out[masks] % 16 == 8).all()
    with pytest.raises(ValueError, match="mask shape"):
        pipe.inpaint(images, masks[:, :8], ["green"])
    with pytest.raises(ValueError, match="images must be"):
        pipe.inpaint(images[:, :8, :8], masks[:, :8, :8], ["green"])


def test_mask_free_edit_changes_few_tokens_per_iteration():
    pipe = toy_pipeline(edit_fraction=0.1)
    images = np.asarray(ToyTokenizer().decode(np.full((2, 4, 4), 5)))
    out = pipe.edit(images, ["purple"], seed=0)
    assert out.shape == images.shape
    changed_blocks = (ToyTokenizer().encode(out) != 5).sum(axis=(1, 2))
    assert (changed_blocks <= 3 * 2).all()  # 3 iterations x round(0.1 * 16) tokens at most


def test_transformer_stage_integration():
    """Tiny random MuseBase / MuseSuperRes with a joint T5 behind `Stage.from_model`."""
    from flax import linen as nn

    from muse_jax.models import transformer
    from muse_jax.models.t5 import T5Config

    t5 = T5Config(vocab_size=130, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    tok = toy_stage("x", 2).prepare_text
    text_tokenizer = lambda prompts: (tok(prompts)["ids"], tok(prompts)["mask"])  # noqa: E731
    stages = {}
    for name, grid, low in (("base", 2, 0), ("superres", 4, 2)):
        model = transformer.build(dict(codebook_size=K, grid_size=grid, num_layers=1, width=16, mlp_dim=32,
                                       num_heads=2, text_dim=16, lowres_grid_size=low,
                                       num_lowres_layers=1 if low else 0), t5)
        dummy = transformer.dummy_inputs(model, 1, 12)
        params = nn.unbox(jax.jit(lambda r: transformer.init_params(model, r, dummy))(jax.random.key(0)))
        stages[name] = stage = cascade.Stage.from_model(name, model, params, text_tokenizer)
        # the stage's embed + apply are the model's forward with its joint text encoder
        text = tok(["a red circle", "b"])
        inputs = {"tokens": jnp.full((2, grid * grid), K, jnp.int32).at[:, 0].set(3), "text_ids": text["ids"],
                  "text_mask": text["mask"], "lowres_tokens": jnp.ones((2, 4), jnp.int32)}
        got = jax.jit(lambda p, t, x, low: stage.apply(p, t, *stage.embed(p, x), low))(
            params, inputs["tokens"], text, inputs["lowres_tokens"] if low else None)
        want = jax.jit(lambda p, x: transformer.apply(model, p, x))(params, inputs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert stage.mask_token_id == K and stage.lowres_grid_size == low
    pipe = cascade.Pipeline(ToyTokenizer(), stages["base"], None, cascade.SampleOptions(steps=3, batch_size=2))
    assert pipe.generate(["a red circle"], num_per_prompt=2, seed=0).shape == (2, 8, 8, 3)
    cascade.Pipeline(ToyTokenizer(), stages["base"], stages["superres"])  # grids fit
    with pytest.raises(ValueError, match="low-res tokens"):
        cascade.Pipeline(ToyTokenizer(), stages["superres"], stages["superres"])


_SHARED = {}


@pytest.fixture
def toy_workdir(monkeypatch, tmp_path):
    if "pipe" not in _SHARED:  # one pipeline (and its compiled programs) for the CLI tests
        _SHARED["pipe"] = toy_pipeline()
    monkeypatch.setattr(cascade.Pipeline, "from_workdir", classmethod(lambda cls, w, **kw: _SHARED["pipe"]))
    return tmp_path


def test_cli_sample_grid_and_files(toy_workdir):
    prompts = toy_workdir / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\nthe green star\n")
    out_dir = toy_workdir / "out"
    assert cli.main(["sample", "--workdir", str(toy_workdir), "--prompts-file", str(prompts), "--num", "2",
                     "--out-dir", str(out_dir), "--guidance", "2", "--seed", "4"]) == 0
    names = sorted(p.name for p in out_dir.glob("*.png"))
    assert names == [f"{i:04d}_{j:02d}.png" for i in range(3) for j in range(2)]
    # files in prompt order: the same as generating the prompts directly
    want = _SHARED["pipe"].generate(["a red circle", "a blue square", "the green star"], num_per_prompt=2, seed=4,
                                    guidance=2.0)
    for k, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(out_dir / name)), want[k])
    grid = toy_workdir / "grid.png"
    assert cli.main(["sample", "--workdir", str(toy_workdir), "--prompt", "x", "--num", "3", "--out", str(grid),
                     "--guidance-schedule", "linear", "--negative-prompt", "blurry"]) == 0
    assert PIL.Image.open(grid).size == (3 * 18 + 2, 18 + 2)


def test_cli_edit_and_errors(toy_workdir, capsys):
    d = toy_workdir
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    PIL.Image.fromarray(img).save(d / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 4:10] = 255
    PIL.Image.fromarray(mask).save(d / "mask.png")
    assert cli.main(["edit", "--workdir", str(d), "--image", str(d / "in.png"), "--mask", str(d / "mask.png"),
                     "--prompt", "a blue square", "--out", str(d / "out.png")]) == 0
    out = np.asarray(PIL.Image.open(d / "out.png"))
    np.testing.assert_array_equal(out[mask == 0], img[mask == 0])
    assert cli.main(["edit", "--workdir", str(d), "--image", str(d / "in.png"), "--prompt", "a star",
                     "--out", str(d / "free.png")]) == 0
    assert np.asarray(PIL.Image.open(d / "free.png")).shape == (16, 16, 3)
    # a mask of another size than the image
    PIL.Image.fromarray(mask[:8]).save(d / "bad_mask.png")
    assert cli.main(["edit", "--workdir", str(d), "--image", str(d / "in.png"), "--mask", str(d / "bad_mask.png"),
                     "--prompt", "x", "--out", str(d / "o.png")]) == 2
    assert "must be the same size" in capsys.readouterr().err
    # a non-square image is refused; a square one of another size is resized with a warning
    PIL.Image.fromarray(img[:, :12]).save(d / "rect.png")
    assert cli.main(["edit", "--workdir", str(d), "--image", str(d / "rect.png"), "--prompt", "x",
                     "--out", str(d / "o.png")]) == 2
    assert "square" in capsys.readouterr().err
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "big.png")
    with pytest.warns(UserWarning, match="resized to 16x16"):
        assert cli.main(["edit", "--workdir", str(d), "--image", str(d / "big.png"), "--prompt", "x",
                         "--out", str(d / "o.png")]) == 0
    assert cli.main(["sample", "--workdir", str(d), "--prompt", "x"]) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_workdir_without_trained_stages(tmp_path, capsys):
    assert cli.main(["sample", "--workdir", str(tmp_path / "missing"), "--prompt", "x", "--out",
                     str(tmp_path / "g.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["sample", "--workdir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "g.png")]) == 2
    assert "no trained tokenizer" in capsys.readouterr().err


def test_config_sample_section_matches_options():
    import dataclasses

    from muse_jax import config as config_lib

    cfg = config_lib.load_config("shapes", ["--config.sample.steps=5", "--config.sample.guidance_schedule=linear"])
    assert set(cfg.sample.keys()) == {f.name for f in dataclasses.fields(cascade.SampleOptions)}
    opts = cascade.SampleOptions.from_config(cfg.sample, guidance=1.5, sr_steps=None)
    assert (opts.steps, opts.guidance_schedule, opts.guidance, opts.sr_steps) == (5, "linear", 1.5, cfg.sample.sr_steps)
    with pytest.raises(ValueError, match="guidance schedule"):
        cascade.SampleOptions(guidance_schedule="cosine")
