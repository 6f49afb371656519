"""aMUSEd imported into a workdir: sampling, image-to-image and inpainting equal diffusers' pipelines.

A random `AmusedPipeline` (tests/_amused_fixture.py) is saved with `save_pretrained` and imported
with `muse-jax import-amused`. Both sides get the same random draws: diffusers' `torch.multinomial`,
Gumbel noise and re-masking are replaced by the uniform numbers the decode loop draws
(`sampling.amused_draws`, `sampling.amused_remask_draw`). Then the tokens after every step are equal
and the decoded images agree within 1/255.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scheduling_amused = pytest.importorskip("diffusers.schedulers.scheduling_amused")

import _amused_fixture as fixture  # noqa: E402
import PIL.Image  # noqa: E402

from muse_jax import amused, cascade, cli, sampling  # noqa: E402

PROMPTS = ["a red circle", "two green crosses on the left"]
SEED, STEPS, GUIDANCE = 3, 12, 10.0


def _imported(root, downsample):
    ref = fixture.write_pipeline(root / "src", downsample=downsample)
    assert cli.main(["import-amused", "--workdir", str(root / "W"), str(root / "src")]) == 0
    # float32 matmuls: the default rounds multiplies to bfloat16 where the CPU has AMX (muse_jax.precision)
    pipe = cascade.Pipeline.from_workdir(root / "W", batch_size=len(PROMPTS), matmul_precision="highest")
    return root, ref, pipe


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """amused-256's layout: the U-ViT at the token grid's resolution."""
    return _imported(tmp_path_factory.mktemp("amused256"), downsample=False)


@pytest.fixture(scope="module")
def env512(tmp_path_factory):
    """amused-512's layout: stride-2 down and up blocks around the transformer."""
    return _imported(tmp_path_factory.mktemp("amused512"), downsample=True)


def _chunk_key(seed=SEED):
    """The decode loop's key for the first chunk of a call (cascade.Pipeline: stage 0, chunk 0)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), 0)


class _SameDraws:
    """Replaces diffusers' random numbers by ours for the duration of a `with`."""

    def __init__(self, key, steps, shape, first=0):
        self.draws = [tuple(np.array(d) for d in sampling.amused_draws(key, t, shape)) for t in range(steps)]
        self.remask = np.array(sampling.amused_remask_draw(key, steps, shape))
        self.step = {"sample": first, "gumbel": first}

    def multinomial(self, probs, num_samples, generator=None):
        u = torch.from_numpy(self.draws[self.step["sample"]][0].reshape(-1))
        self.step["sample"] += 1
        cdf = torch.cumsum(probs.double(), dim=-1)
        return (cdf <= (u.double() * cdf[:, -1])[:, None]).sum(-1).clamp(max=probs.shape[-1] - 1)[:, None]

    def gumbel(self, t, generator=None):
        u = torch.from_numpy(self.draws[self.step["gumbel"]][1]).to(t.dtype)
        self.step["gumbel"] += 1
        return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))

    def __enter__(self):
        self.saved = torch.multinomial, torch.rand, scheduling_amused.gumbel_noise
        torch.multinomial = self.multinomial
        torch.rand = lambda shape, **kw: torch.from_numpy(self.remask.reshape(shape))
        scheduling_amused.gumbel_noise = self.gumbel
        return self

    def __exit__(self, *exc):
        torch.multinomial, torch.rand, scheduling_amused.gumbel_noise = self.saved


def _run_reference(pipeline_cls, ref, key, grid, first=0, **kw):
    """A diffusers aMUSEd pipeline with our draws: (tokens after each step [S', B, N], images uint8)."""
    # a scheduler of its own: AmusedInpaintPipeline switches the one it is given to the linear schedule
    p = pipeline_cls(**dict(ref.components, scheduler=scheduling_amused.AmusedScheduler.from_config(ref.scheduler.config)))
    steps = []
    with _SameDraws(key, STEPS, (len(PROMPTS), grid * grid), first), torch.no_grad():
        out = p(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                callback=lambda i, t, latents: steps.append(latents.reshape(len(PROMPTS), -1).numpy().copy()),
                callback_steps=1, **kw).images
    return np.stack(steps), np.round(np.asarray(out) * 255)


def _our_steps(pipe, start, key, first=0, schedule="cosine"):
    """Our decode loop on the imported stage, with every step's tokens (the program `generate` runs)."""
    stage = pipe.base
    text = stage.prepare_text(PROMPTS)
    empty = stage.prepare_text([""] * len(PROMPTS))
    micro = np.tile(np.float32(stage.micro_conditioning), (len(PROMPTS), 1))
    cond, _ = stage.embed(stage.params, dict(text, micro=micro))
    uncond, _ = stage.embed(stage.params, dict(empty, micro=micro))
    fn = sampling.guided_logits_fn(lambda t, x: stage.apply(stage.params, t, *x), (cond, None, None),
                                   (uncond, None, None), guidance_scale=GUIDANCE - 1, num_steps=STEPS)
    options = sampling.DecodeOptions(num_steps=STEPS, scheduler="amused", choice_temperature=2.0, first_step=first,
                                     mask_schedule=schedule)
    _, history = sampling.decode(fn, jnp.asarray(start), key, mask_token_id=stage.mask_token_id, options=options,
                                 return_intermediates=True)
    return np.asarray(history)[first:]


def test_import_writes_an_amused_workdir(env):
    root, ref, pipe = env
    w = root / "W"
    assert amused.is_amused(w)
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["sample"]["scheduler"] == "amused" and cfg["sample"]["guidance"] == GUIDANCE - 1
    assert pipe.image_size == 16 and pipe.superres is None and pipe.base.grid_size == 8
    assert pipe.base.mask_token_id == ref.scheduler.config.mask_token_id
    assert pipe.base.micro_conditioning == (16.0, 16.0, 0.0, 0.0, 6.0)


@pytest.mark.parametrize("layout", ["256", "512"])
def test_generation_equals_amused_pipeline_at_every_step(layout, request):
    root, ref, pipe = request.getfixturevalue("env" if layout == "256" else "env512")
    grid = pipe.base.grid_size
    key = _chunk_key()
    expected, images = _run_reference(diffusers.AmusedPipeline, ref, key, grid)
    start = np.full((len(PROMPTS), grid * grid), pipe.base.mask_token_id, np.int32)
    got = _our_steps(pipe, start, key)
    assert (expected[0] == pipe.base.mask_token_id).any() and not (expected[-1] == pipe.base.mask_token_id).any()
    for t in range(STEPS):
        np.testing.assert_array_equal(got[t], expected[t], err_msg=f"step {t}")
    base, _ = pipe.generate_tokens(PROMPTS, seed=SEED)  # the jitted program of `sample`
    np.testing.assert_array_equal(base, expected[-1])
    ours = pipe.generate(PROMPTS, seed=SEED)
    assert np.abs(ours.astype(np.int32) - images).max() <= 1
    assert ours.std() > 10  # an image, not a constant


def test_image_to_image_equals_amused_img2img(env):
    root, ref, pipe = env
    grid = pipe.base.grid_size
    src = np.stack([fixture.image(pipe.image_size, s) for s in range(len(PROMPTS))])
    first = STEPS - int(STEPS * 0.5)
    expected, images = _run_reference(diffusers.AmusedImg2ImgPipeline, ref, _chunk_key(), grid, first=first,
                                      image=[PIL.Image.fromarray(x) for x in src], strength=0.5)
    ours = pipe.edit(src, PROMPTS, seed=SEED)  # strength 0.5: the workdir's default
    tokens = pipe.encode_images(ours)
    assert (pipe.encode_images(src) != expected[-1]).any()  # something was regenerated
    np.testing.assert_array_equal(_our_steps(pipe, pipe.encode_images(src), _chunk_key(), first), expected)
    assert np.abs(ours.astype(np.int32) - images).max() <= 1
    assert tokens.shape == expected[-1].shape


def test_inpainting_equals_amused_inpaint_in_the_mask(env):
    root, ref, pipe = env
    grid, f = pipe.base.grid_size, pipe.image_size // pipe.base.grid_size
    src = np.stack([fixture.image(pipe.image_size, s) for s in range(len(PROMPTS))])
    mask = np.zeros((pipe.image_size, pipe.image_size), np.uint8)
    mask[2 * f: 6 * f, 1 * f: 5 * f] = 255  # whole tokens, so both sides mask the same ones
    masks = np.stack([mask] * len(PROMPTS))
    expected, images = _run_reference(diffusers.AmusedInpaintPipeline, ref, _chunk_key(), grid,
                                      image=[PIL.Image.fromarray(x) for x in src],
                                      mask_image=[PIL.Image.fromarray(m) for m in masks])
    ours = pipe.inpaint(src, masks, PROMPTS, seed=SEED)
    token_mask = mask[::f, ::f].reshape(-1) > 0
    start = np.where(token_mask[None], pipe.base.mask_token_id, pipe.encode_images(src))
    np.testing.assert_array_equal(_our_steps(pipe, start, _chunk_key(), schedule="linear"), expected)
    inside = masks > 0
    assert np.abs(ours.astype(np.int32) - images)[inside].max() <= 1
    np.testing.assert_array_equal(ours[~inside], src[~inside])  # pixels outside the mask are kept


def test_an_over_long_prompt_is_cut_with_a_warning(env):
    _, _, pipe = env
    long = " ".join(["red circle"] * 60)
    with pytest.warns(UserWarning, match="1 of 2 distinct prompts are longer than 77 CLIP tokens"):
        text = pipe.base.prepare_text([long, "a cat", long])
    assert text["ids"].shape == (3, 77)


def test_sample_edit_and_eval_commands_run_on_the_workdir(env, tmp_path, capsys):
    root, _, pipe = env
    w = str(root / "W")
    assert cli.main(["sample", "--workdir", w, "--prompt", "a red circle", "--num", "2", "--out",
                     str(tmp_path / "grid.png"), "--micro-conditioning", "16,16,0,0,5"]) == 0
    width, height = PIL.Image.open(tmp_path / "grid.png").size  # one row of 2 images, with borders
    assert width >= 2 * pipe.image_size and pipe.image_size <= height < 2 * pipe.image_size
    PIL.Image.fromarray(fixture.image(pipe.image_size)).save(tmp_path / "in.png")
    mask = np.zeros((pipe.image_size,) * 2, np.uint8)
    mask[:8] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    for extra in ([], ["--mask", str(tmp_path / "mask.png")], ["--strength", "0.25"]):
        assert cli.main(["edit", "--workdir", w, "--image", str(tmp_path / "in.png"), "--prompt", "a blue square",
                         "--out", str(tmp_path / "out.png"), *extra]) == 0
        assert np.asarray(PIL.Image.open(tmp_path / "out.png")).shape == (pipe.image_size, pipe.image_size, 3)
    from test_zero_shot import _write_clip, _write_inception

    (tmp_path / "clip").mkdir()
    _write_clip(tmp_path / "clip")
    _write_inception(tmp_path / "inception.npz")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
    (tmp_path / "ref").mkdir()
    for i in range(4):
        PIL.Image.fromarray(fixture.image(pipe.image_size, 10 + i)).save(tmp_path / "ref" / f"{i}.png")
    assert cli.main(["eval", "--workdir", w, "--out", str(tmp_path / "eval"), "--prompts", str(tmp_path / "prompts.txt"),
                     "--num", "4", "--clip", str(tmp_path / "clip"), "--inception", str(tmp_path / "inception.npz"),
                     "--reference", str(tmp_path / "ref")]) == 0
    result = json.loads((tmp_path / "eval" / "zero_shot.json").read_text())
    assert result["num"] == 4 and np.isfinite(result["fid"]) and np.isfinite(result["clip_score"])


def test_refused_imports_name_the_cause_and_write_nothing(env, tmp_path, capsys):
    root, _, _ = env
    src = tmp_path / "src"
    shutil.copytree(root / "src", src)
    shutil.rmtree(src / "scheduler")
    assert cli.main(["import-amused", "--workdir", str(tmp_path / "W1"), str(src)]) == 2
    assert "no scheduler/" in capsys.readouterr().err and not (tmp_path / "W1").exists()

    shutil.copytree(root / "src" / "scheduler", src / "scheduler")
    cfg = json.loads((src / "vqvae" / "config.json").read_text())
    (src / "vqvae" / "config.json").write_text(json.dumps(dict(cfg, num_vq_embeddings=64)))
    assert cli.main(["import-amused", "--workdir", str(tmp_path / "W2"), str(src)]) == 2
    assert "64" in capsys.readouterr().err and not (tmp_path / "W2").exists()

    before = sorted(p.name for p in (root / "W").rglob("*"))
    assert cli.main(["import-amused", "--workdir", str(root / "W"), str(root / "src")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "W").rglob("*")) == before

    for command in (["train", "--config", "shapes", "--stage", "base"], ["train-tokenizer", "--config", "shapes"],
                    ["eval", "--out", str(tmp_path / "eval")]):  # refused before anything is written
        assert cli.main([command[0], "--workdir", str(root / "W"), *command[1:]]) == 2
        assert "aMUSEd" in capsys.readouterr().err
        assert sorted(p.name for p in (root / "W").rglob("*")) == before

    assert cli.main(["import-amused", "--workdir", str(tmp_path / "W3"), "amused/not-here"]) == 2
    err = capsys.readouterr().err
    assert "amused/not-here" in err and "--local-dir" in err and not (tmp_path / "W3").exists()


SHARDED = """
import sys
sys.path.insert(0, "tests")
import numpy as np
from muse_jax import cascade
from muse_jax import partitioning
out = {{}}
for name, axes in (("fsdp", dict(data=1, fsdp=8, tensor=1)), ("tp", dict(data=4, fsdp=1, tensor=2))):
    pipe = cascade.Pipeline.from_workdir({w!r}, mesh=partitioning.make_mesh(axes), batch_size=8,
                                         matmul_precision="highest")
    leaves = [x for tree in pipe.base.params.values() for x in __import__("jax").tree_util.tree_leaves(tree)]
    out[name + "_split"] = sum(not x.sharding.is_fully_replicated for x in leaves)
    out[name] = pipe.generate_tokens({prompts!r}, seed=5)[0]
    out[name + "_inpaint"] = pipe.encode_images(pipe.inpaint(np.load({images!r}), np.load({masks!r}), {prompts!r}))
np.savez({out!r}, **out)
"""


def test_sharded_sampling_equals_one_device(env, tmp_path):
    """Parameters split over 8 CPU devices (FSDP, and data x tensor parallel) sample as one device does."""
    from _multidevice import run_with_devices

    root, _, _ = env
    pipe = cascade.Pipeline.from_workdir(root / "W", batch_size=8, matmul_precision="highest")
    prompts = PROMPTS * 4
    images = np.stack([fixture.image(pipe.image_size, s) for s in range(len(prompts))])
    masks = np.zeros(images.shape[:3], np.uint8)
    masks[:, :8] = 255
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "masks.npy", masks)
    run_with_devices(SHARDED.format(w=str(root / "W"), prompts=prompts, images=str(tmp_path / "images.npy"),
                                    masks=str(tmp_path / "masks.npy"), out=str(tmp_path / "out.npz")))
    got = np.load(tmp_path / "out.npz")
    one = pipe.generate_tokens(prompts, seed=5)[0]
    one_inpaint = pipe.encode_images(pipe.inpaint(images, masks, prompts))
    for name in ("fsdp", "tp"):
        assert got[name + "_split"] > 10  # the parameters are split over the devices, not replicated
        np.testing.assert_array_equal(got[name], one, err_msg=name)
        np.testing.assert_array_equal(got[name + "_inpaint"], one_inpaint, err_msg=name)
