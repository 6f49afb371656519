"""Zero-shot evaluation (`muse-jax eval --prompts`): caption sources, pytorch-fid statistics files,
resumed and two-process evaluations equal to one uninterrupted run (simulated in this process, and
real: 2 processes x 2 CPU devices through launch/local.sh), sweeps.

The cascade is the toy pipeline of test_sample_cli (its base stage alone: 8 px images, no training); InceptionV3 and a
small CLIP get random weights, written to files as the user's would be."""
import json
import os
import pathlib
import sys
import tempfile

import conftest
import jax
import numpy as np
import PIL.Image
import pytest
import scipy.linalg
from test_sample_cli import toy_pipeline

from muse_jax import cascade, cli
from muse_jax.data import export
from muse_jax.evaluation import caption_sets, fid, inception, scores, zero_shot
from muse_jax.evaluation import run as eval_run

PROMPTS = ["a red circle", "a blue square on the left", "two green crosses"]  # chunks of 2 and 1
CLIP_CONTEXT = 16
XLA_CACHE = pathlib.Path(tempfile.gettempdir()) / f"muse_jax_test_xla_cache_{os.getuid()}"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary without merges: the 256 byte symbols, each also ending a word."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols = printable + [256 + i for i, b in enumerate(b for b in range(256) if b not in printable)]
    chars = [chr(c) for c in symbols]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _write_inception(path) -> None:
    """Random FID InceptionV3 weights under the torch names that `inception.load_inception` reads."""
    rng = np.random.default_rng(0)
    torch_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    arrays = {}
    for keys, shape in jax.tree_util.tree_flatten_with_path(inception._variable_shapes(),
                                                            is_leaf=lambda x: isinstance(x, tuple))[0]:
        collection, *names, leaf = [k.key for k in keys]
        if leaf == "kernel":  # HWIO -> OIHW, He-initialised
            value = rng.standard_normal(shape).astype(np.float32) * np.sqrt(2.0 / np.prod(shape[:3]))
            value = value.transpose(3, 2, 0, 1)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            value = rng.normal(0.0, 0.1, shape).astype(np.float32)
        arrays[".".join(names + [torch_names[leaf]])] = value
    inception.save_npz(arrays, str(path))


def _write_clip(folder) -> None:
    """A small random Hugging Face CLIP checkpoint (config.json, model.safetensors) with a byte-level tokenizer."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    vocab = _byte_vocab()
    eos = vocab["<|endoftext|>"]
    width, mlp, patch, image = 32, 64, 8, 32
    text = dict(vocab_size=len(vocab), max_position_embeddings=CLIP_CONTEXT, hidden_size=width, intermediate_size=mlp,
                num_hidden_layers=1, num_attention_heads=4, eos_token_id=eos)
    vision = dict(image_size=image, patch_size=patch, hidden_size=width, intermediate_size=mlp, num_hidden_layers=1,
                  num_attention_heads=4)
    (folder / "config.json").write_text(json.dumps({"text_config": text, "vision_config": vision, "projection_dim": 16}))
    shapes = {"vision_model.embeddings.patch_embedding.weight": (width, 3, patch, patch),
              "vision_model.embeddings.class_embedding": (width,),
              "vision_model.embeddings.position_embedding.weight": ((image // patch) ** 2 + 1, width),
              "text_model.embeddings.token_embedding.weight": (len(vocab), width),
              "text_model.embeddings.position_embedding.weight": (CLIP_CONTEXT, width),
              "visual_projection.weight": (16, width), "text_projection.weight": (16, width), "logit_scale": ()}
    for norm in ("vision_model.pre_layrnorm", "vision_model.post_layernorm", "text_model.final_layer_norm"):
        shapes |= {f"{norm}.weight": (width,), f"{norm}.bias": (width,)}
    for tower in ("vision_model", "text_model"):  # one layer each, in Hugging Face's names
        layer = f"{tower}.encoder.layers.0"
        for name, shape in (("layer_norm1", (width,)), ("layer_norm2", (width,)), ("mlp.fc2", (width, mlp)),
                            *((f"self_attn.{p}_proj", (width, width)) for p in "qkv"), ("self_attn.out_proj", (width, width))):
            shapes |= {f"{layer}.{name}.weight": shape, f"{layer}.{name}.bias": (width,)}
        shapes |= {f"{layer}.mlp.fc1.weight": (mlp, width), f"{layer}.mlp.fc1.bias": (mlp,)}
    rng = np.random.default_rng(0)
    state = {k: np.asarray(0.3 * rng.standard_normal(v), np.float32) for k, v in shapes.items()}
    safetensors_numpy.save_file(state, str(folder / "model.safetensors"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Weights files, a prompts file and the toy pipeline standing in for a workdir's."""
    root = tmp_path_factory.mktemp("zero_shot")
    _write_inception(root / "inception.npz")
    (root / "clip").mkdir()
    _write_clip(root / "clip")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    pipe = toy_pipeline(batch_size=2, superres=False)  # 8 px images, one stage to compile
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))  # as test_train: reruns skip compilation
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cascade.Pipeline, "from_workdir", classmethod(lambda cls, w, **kw: pipe))
        yield root
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.fixture(scope="module")
def scorer(env):
    """The scorer `muse-jax eval --inception ... --clip ...` loads, loaded once for the module."""
    return zero_shot.load_scorer(str(env / "inception.npz"), "clean", str(env / "clip"))


def _run(env, out, **kw):
    return zero_shot.run(env, str(env / "prompts.txt"), out, **dict(dict(num=len(PROMPTS), seed=3, quiet=True), **kw))


def _features(result):
    with np.load(result["chunks"] + "/chunk_00000.npz") as a, np.load(result["chunks"] + "/chunk_00001.npz") as b:
        return {k: np.concatenate([a[k], b[k]]) for k in ("indices", "inception", "clip_image", "clip_text")}


# ----------------------------------------------------------------------------------------------


def _pytorch_fid_distance(mu1, sigma1, mu2, sigma2):
    """pytorch_fid.fid_score.calculate_frechet_distance's formula (that module needs torchvision)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_statistics_files_are_pytorch_fids_and_self_fid_is_zero(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 8)), rng.standard_normal((200, 8)) + 0.3
    mu, sigma = fid.feature_statistics(a)
    fid.save_statistics(str(tmp_path / "ours.npz"), mu, sigma)
    with np.load(tmp_path / "ours.npz") as f:  # what pytorch_fid.fid_score reads from a .npz
        np.testing.assert_array_equal(f["mu"], mu)
        np.testing.assert_array_equal(f["sigma"], sigma)
    np.savez(tmp_path / "theirs.npz", mu=mu, sigma=sigma)  # what pytorch_fid.fid_score saves
    for name in ("ours.npz", "theirs.npz"):
        got = fid.fid_from_statistics(b, fid.load_statistics(str(tmp_path / name)))
        assert got == pytest.approx(_pytorch_fid_distance(*fid.feature_statistics(b), mu, sigma), rel=1e-6)
    for features in (a, a[:5]):  # N > D, and the singular covariance of N < D
        scale = np.trace(np.cov(features, rowvar=False))
        assert fid.fid_from_statistics(features, fid.feature_statistics(features)) < 1e-6 * scale
    # N <= D: the low-rank trace term agrees with the full one
    for n in (3, 8):
        want = fid.frechet_distance(*fid.feature_statistics(b[:n]), mu, sigma)
        assert fid.fid_from_statistics(b[:n], (mu, sigma)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="lacks mu and sigma"):
        np.savez(tmp_path / "bad.npz", mean=mu)
        fid.load_statistics(str(tmp_path / "bad.npz"))


def test_clean_resize():
    const = np.full((1, 16, 24, 3), 77, np.uint8)
    out = inception.clean_resize(const)
    assert out.shape == (1, 299, 299, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 77.0, atol=1e-3)
    x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = inception.clean_resize(x)
    assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, np.round(out))  # not quantised
    # each channel alone, through PIL's float image
    want = np.asarray(PIL.Image.fromarray(x[1, ..., 2].astype(np.float32)).resize((299, 299), PIL.Image.BICUBIC))
    np.testing.assert_array_equal(out[1, ..., 2], np.clip(want, 0, 255))


class TinyCaptions:
    """A tfds builder shaped like coco_captions: images with a sequence of captions each, in two
    splits (val: images 0..11, restval: images 12..16)."""

    @staticmethod
    def build(data_dir):
        import tensorflow_datasets as tfds

        class TinyCocoCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

            def _split_generators(self, dl_manager):
                return {"val": self._generate_examples(0, 12), "restval": self._generate_examples(12, 17)}

            def _generate_examples(self, start, stop):
                rng = np.random.default_rng(start)
                for i in range(start, stop):
                    image = rng.integers(0, 255, (20, 24 + i, 3), dtype=np.uint8)
                    yield i, {"image": PIL.Image.fromarray(image),
                              "captions": {"text": [f"image {i} caption {j}" for j in range(1 + i % 3)]}}

        TinyCocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """The folder of the prepared TinyCaptions (built once: a builder class registers its name once)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyCaptions.build(data_dir)
    return str(data_dir)


def test_prompt_sources(tmp_path, tiny_tfds):
    (tmp_path / "p.txt").write_text("first\n\n  second \nthird\n")
    assert caption_sets.read_prompts(str(tmp_path / "p.txt"), 2) == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"caption": "one"}\n\n{"caption": "two", "file": "x.png"}\n')
    assert caption_sets.read_prompts(str(tmp_path / "p.jsonl")) == ["one", "two"]
    export.export_shapes(tmp_path / "folder", 3, "test")
    records = [json.loads(line) for line in (tmp_path / "folder" / "captions.jsonl").read_text().splitlines()]
    assert caption_sets.read_prompts(str(tmp_path / "folder"), 3) == [r["caption"] for r in records]
    with pytest.raises(ValueError, match="fewer than"):
        caption_sets.read_prompts(str(tmp_path / "folder"), 4)
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no \"caption\""):
        caption_sets.read_prompts(str(tmp_path / "bad.jsonl"))

    read = lambda num, seed, src="tfds:tiny_coco_captions": caption_sets.read_prompts(  # noqa: E731
        src, num, seed, tiny_tfds)
    draw = read(8, 0)
    assert len(draw) == 8 and read(8, 0) == draw and read(8, 0, "tfds:tiny_coco_captions:val") == draw
    assert read(5, 0) == draw[:5]  # the first N of the same seeded draw
    assert read(8, 1) != draw
    images = {p.split(" caption")[0] for p in draw}
    assert len(images) == 8  # one caption per image
    assert all(int(p.split()[3]) < 1 + int(p.split()[1]) % 3 for p in draw)  # among that image's captions
    with pytest.raises(ValueError, match="no split 'train'"):
        read(2, 0, "tfds:tiny_coco_captions:train")
    count, batches = caption_sets.reference_images("tfds:tiny_coco_captions", 16, 5, tiny_tfds)
    shapes = [b.shape for b in batches]
    assert count == 12 and shapes == [(5, 16, 16, 3), (5, 16, 16, 3), (2, 16, 16, 3)]


def test_tfds_split_unions(tiny_tfds):
    """tfds:NAME:A+B: the examples of A then those of B, drawn from with the seed; as a reference,
    every image of both."""
    import tensorflow_datasets as tfds

    data_dir = tiny_tfds
    read = lambda src, num, seed=0: caption_sets.read_prompts(src, num, seed, data_dir)  # noqa: E731
    union = "tfds:tiny_coco_captions:val+restval"

    def stored(split):  # the image numbers of a split, in the order tfds stored its examples
        examples = tfds.data_source("tiny_coco_captions", split=split, data_dir=data_dir)
        return [int(caption_sets._example_captions(x, split)[0].split()[1]) for x in examples]

    draw = read(union, 17)
    images = [int(p.split()[1]) for p in draw]
    assert sorted(images) == list(range(17))  # one caption of every image of both splits
    # the seeded order is a permutation of val's examples followed by restval's, in the order written
    swapped = read("tfds:tiny_coco_captions:restval+val", 17)
    for prompts, examples in ((draw, stored("val") + stored("restval")), (swapped, stored("restval") + stored("val"))):
        assert [int(p.split()[1]) for p in prompts] == [examples[i] for i in np.random.default_rng(0).permutation(17)]
    assert read(union, 17) == draw and read(union, 9) == draw[:9] and read(union, 17, 1) != draw
    assert {int(p.split()[1]) for p in read("tfds:tiny_coco_captions:restval", 5)} == set(range(12, 17))
    with pytest.raises(ValueError, match="fewer than the 18"):
        read(union, 18)
    with pytest.raises(ValueError, match="no split 'train'"):
        read("tfds:tiny_coco_captions:val+train", 2)
    for bad in ("val+val", "val+", "+restval"):
        with pytest.raises(ValueError, match="named once each"):
            read(f"tfds:tiny_coco_captions:{bad}", 2)

    reference = lambda src: caption_sets.reference_images(src, 16, 5, data_dir)  # noqa: E731
    count, batches = reference(union)
    assert count == 17
    want = np.concatenate([np.concatenate(list(reference(f"tfds:tiny_coco_captions:{s}")[1])) for s in ("val", "restval")])
    np.testing.assert_array_equal(np.concatenate(list(batches)), want)


def test_evaluation_reference_npz_and_folder_agree_and_self_fid_is_zero(env, scorer, tmp_path):
    out = tmp_path / "a"
    # the command line, without --reference: no FID (and the JSON says so)
    assert cli.main(["eval", "--workdir", str(env), "--prompts", str(env / "prompts.txt"), "--num", "3",
                     "--out", str(out), "--inception", str(env / "inception.npz"), "--clip", str(env / "clip"),
                     "--seed", "3", "--save-images"]) == 0
    report = json.loads((out / "zero_shot.json").read_text())
    assert report["num"] == 3 and report["fid"] is None and "--reference" in report["fid_note"]
    assert report["fid_resize"] == "clean" and report["clip_model"] == "clip"
    assert 0 <= report["clip_score"] <= 100 and report["sec_per_image"] > 0
    assert report["prompts_source"] == str(env / "prompts.txt") and report["settings"]["guidance"] == 3.0
    saved = sorted((out / "images").glob("*/*.png"))
    assert [p.name for p in saved] == [f"{i:06d}.png" for i in range(3)]

    # the generated images as reference: FID ~0; the statistics file it writes gives the same number
    by_folder = _run(env, out, reference=str(saved[0].parent), scorer=scorer)
    stats = sorted((out / "reference").glob("fid_stats--*.npz"))
    assert len(stats) == 1 and by_folder["reference_statistics"] == str(stats[0])
    mu, sigma = fid.load_statistics(str(stats[0]))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.trace(sigma) > 0
    assert by_folder["fid"] < 1e-6 * np.trace(sigma)
    by_npz = _run(env, out, reference=str(stats[0]), scorer=scorer)
    assert by_npz["fid"] == by_folder["fid"] and by_npz["clip_score"] == report["clip_score"]
    assert _features(by_npz)["indices"].tolist() == [0, 1, 2]

    with pytest.raises(ValueError, match="fresh --out"):  # another seed into the same folder
        _run(env, out, seed=4, scorer=scorer)


def test_the_shapes_evaluation_generates_as_the_zero_shot_one(env, tmp_path):
    """Both generate through scores.generate_batch in batches of the pipeline's batch size: the shapes
    evaluation (the quickstart's) with the run's seed for every batch, as it always has; the zero-shot
    one with a seed per chunk, so chunk k is the shapes evaluation of its prompts with that seed."""
    pipe = cascade.Pipeline.from_workdir(env)  # the toy pipeline, batch size 2
    images, _ = eval_run.generate_images(pipe, PROMPTS, 3, {"steps": None})
    np.testing.assert_array_equal(images, np.concatenate([pipe.generate(PROMPTS[:2], seed=3),
                                                          pipe.generate(PROMPTS[2:], seed=3)]))
    result = _run(env, tmp_path / "z", scorer=zero_shot.Scorer(), save_images=True)
    saved = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(pathlib.Path(result["images"]).glob("*.png"))])
    for k, chunk in enumerate((PROMPTS[:2], PROMPTS[2:])):
        want, _ = eval_run.generate_images(pipe, chunk, zero_shot.chunk_seed(3, k), {})
        np.testing.assert_array_equal(saved[2 * k:2 * k + len(chunk)], want)
    with pytest.raises(ValueError, match="3 prompts in one batch of at most 2"):
        scores.generate_batch(pipe, PROMPTS, seed=0)


def test_killed_and_two_process_evaluations_equal_one_run(env, scorer, tmp_path):
    stats = str(tmp_path / "ref.npz")
    fid.save_statistics(stats, *fid.feature_statistics(np.random.default_rng(0).standard_normal((8, 2048))))
    run = lambda out, **kw: _run(env, tmp_path / out, reference=stats, scorer=scorer, **kw)  # noqa: E731
    whole = run("whole")

    class Killed(Exception):
        pass

    def kill(k):
        raise Killed(k)

    with pytest.raises(Killed):
        run("killed", on_chunk=kill)
    assert len(list((tmp_path / "killed" / "chunks").glob("*/chunk_*.npz"))) == 1
    resumed = run("killed")
    run("grown", num=1)  # a shorter evaluation first: its last chunk (1 of 2 prompts) is made again in full
    grown = run("grown")

    with pytest.raises(ValueError, match="1 of 2 chunks are missing"):  # process 1 has not run yet
        run("two", process_index=0, process_count=2)
    assert run("two", process_index=1, process_count=2) is None
    combined = run("two", process_index=0, process_count=2)

    want = _features(whole)
    assert whole["fid"] > 0
    for result in (resumed, combined, grown):
        got = _features(result)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert result["clip_score"] == whole["clip_score"] and result["fid"] == whole["fid"]


# One process of `muse-jax eval --prompts` launched by launch/local.sh: the module's toy pipeline
# (on the mesh the evaluation asks for) stands in for the workdir's; it records what it generated,
# on which devices, and which reports it wrote, into LOG_DIR/process_<i>.json.
WORKER = r"""
import json, os, pathlib, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
from muse_jax import cascade, cli
from muse_jax.evaluation import zero_shot
from test_sample_cli import toy_pipeline

log = {"generated": [], "put_devices": [], "written": []}

def from_workdir(cls, workdir, mesh=None, **kw):
    pipe = toy_pipeline(batch_size=2, superres=False)
    pipe.mesh = mesh
    put, generate = pipe._put, pipe.generate
    def _put(x):
        y = put(x)
        log["put_devices"].append(sorted(d.id for d in y.sharding.device_set))
        return y
    def _generate(prompts, **kw):
        log["generated"].append(list(prompts))
        return generate(prompts, **kw)
    pipe._put, pipe.generate = _put, _generate
    return pipe

def recorded(fn):
    def wrapped(*args, **kw):
        log["written"].append(fn.__name__)
        return fn(*args, **kw)
    return wrapped

cascade.Pipeline.from_workdir = classmethod(from_workdir)
zero_shot.scores.write_json = recorded(zero_shot.scores.write_json)
zero_shot.sweep.write_front = recorded(zero_shot.sweep.write_front)
code = cli.main(sys.argv[1:])
import jax
log.update(code=code, process_index=jax.process_index(), process_count=jax.process_count(),
           devices=jax.device_count(), local_devices=sorted(d.id for d in jax.local_devices()))
(pathlib.Path(os.environ["LOG_DIR"]) / f"process_{jax.process_index()}.json").write_text(json.dumps(log))
sys.exit(code)
"""


def test_evaluation_on_two_real_processes_equals_one_process(env, scorer, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed, gloo): each process generates only its chunks,
    sharded over its devices; process 0 alone writes the reports; the numbers are one process's."""
    prompts = tmp_path / "prompts.txt"  # 3 chunks of 2: process 0 makes chunks 0 and 2, process 1 chunk 1
    prompts.write_text("\n".join(PROMPTS + ["a small yellow triangle", "a purple cross", "a big orange square"]))
    stats = str(tmp_path / "ref.npz")
    fid.save_statistics(stats, *fid.feature_statistics(np.random.default_rng(0).standard_normal((8, 2048))))
    common = ["--prompts", str(prompts), "--num", "6", "--reference", stats, "--inception", str(env / "inception.npz"),
              "--clip", str(env / "clip"), "--seed", "3", "--sweep-guidance", "3"]
    one = zero_shot.run(env, str(prompts), tmp_path / "one", num=6, reference=stats, scorer=scorer, seed=3, quiet=True)

    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    environ = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS=conftest.TEST_XLA_FLAGS,
                   TESTS_DIR=str(ROOT / "tests"), LOG_DIR=str(logs), JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    cmd = ["bash", str(ROOT / "launch" / "local.sh"), "-n", "2", "-d", "2", "-t", "140", "-l", str(logs), "--",
           sys.executable, str(tmp_path / "worker.py"), "eval", "--workdir", str(env), "--out", str(tmp_path / "two"),
           *common]
    returncode, output = conftest.run_process_group(cmd, env=environ, timeout=150)
    assert returncode == 0, output[-4000:] + "".join(p.read_text()[-2000:] for p in logs.glob("*.log"))

    p0, p1 = (json.loads((logs / f"process_{i}.json").read_text()) for i in range(2))
    lines = prompts.read_text().splitlines()
    chunks = [lines[k * 2:k * 2 + 2] for k in range(3)]
    assert p0["generated"] == [chunks[0], chunks[2]] and p1["generated"] == [chunks[1]]
    for p in (p0, p1):
        assert (p["code"], p["process_count"], p["devices"], len(p["local_devices"])) == (0, 2, 4, 2)
        assert p["put_devices"] and all(d == p["local_devices"] for d in p["put_devices"])  # the batch on both
    assert not set(p0["local_devices"]) & set(p1["local_devices"])
    assert p0["written"] == ["write_front", "write_json"] and p1["written"] == []

    two = json.loads((tmp_path / "two" / "zero_shot.json").read_text())
    assert two["fid"] == one["fid"] > 0 and two["clip_score"] == one["clip_score"] and two["num"] == 6
    assert two["sweeps"]["guidance"]["results"][0]["fid"] == one["fid"]
    for k in range(3):
        with np.load(f"{one['chunks']}/chunk_{k:05d}.npz") as a, np.load(f"{two['chunks']}/chunk_{k:05d}.npz") as b:
            for key in ("indices", "inception", "clip_image", "clip_text"):
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"chunk {k} {key}")


def test_guidance_sweep_writes_the_front(env, scorer, tmp_path):
    stats = str(tmp_path / "ref.npz")
    fid.save_statistics(stats, *fid.feature_statistics(np.random.default_rng(0).standard_normal((8, 2048))))
    out = tmp_path / "sweep"
    result = _run(env, out, num=2, reference=stats, scorer=scorer, sweep_guidance=[2.0, 3.0])
    rows = json.loads((out / "sweep_guidance.json").read_text())["results"]
    assert [r["guidance"] for r in rows] == [2.0, 3.0]
    assert all(r["fid"] > 0 and r["clip_score"] >= 0 and r["sec_per_image"] > 0 for r in rows)
    assert rows[1]["fid"] == result["fid"]  # guidance 3 is the main point: the same chunks
    assert len(list((out / "chunks").iterdir())) == 2
    assert PIL.Image.open(out / "sweep_guidance.png").size[0] > 100
    assert result["sweeps"]["guidance"]["png"] == str(out / "sweep_guidance.png")


def test_without_weights_no_scores_are_reported(env, tmp_path):
    result = _run(env, tmp_path / "bare", num=2, scorer=zero_shot.Scorer())
    assert result["fid"] is None and "--inception" in result["fid_note"]
    assert result["clip_score"] is None and "--clip" in result["clip_note"] and result["clip_model"] is None


def test_a_retrained_workdir_is_refused(env, tmp_path):
    workdir = tmp_path / "w"
    for folder in ("base/checkpoints/10", "tokenizer/f16/checkpoints/5", "tokenizer/f16/checkpoints/tmp"):
        (workdir / folder).mkdir(parents=True)
    assert zero_shot.trained_checkpoints(workdir) == {"base": [10], "tokenizer/f16": [5]}
    run = lambda: zero_shot.run(workdir, str(env / "prompts.txt"), tmp_path / "out", num=2,  # noqa: E731
                                scorer=zero_shot.Scorer(), process_index=0, process_count=1, quiet=True)
    run()
    (workdir / "base/checkpoints/20").mkdir()
    with pytest.raises(ValueError, match="differs in: checkpoints.*fresh --out"):
        run()
    # `muse-jax ema` since: sampling now loads the EMA, so the features are not the same either
    (workdir / "base/ema.json").write_text(json.dumps({"decay": 0.7, "every": 10, "steps": [10, 20]}))
    assert zero_shot.trained_checkpoints(workdir)["base/ema"]["steps"] == [10, 20]
