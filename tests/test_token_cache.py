"""The shapes token cache: each stage's tokens by its own tokenizer at its own size, rebuilt when one changes."""
import numpy as np
import pytest
from test_sample_cli import ToyTokenizer

from muse_jax import config as config_lib
from muse_jax import image_ops
from muse_jax import workdir as workdir_lib
from muse_jax.data import shapes, sources, stage_data, token_cache
from muse_jax.training import inputs


def _config(**stages):
    config = config_lib.load_config("shapes", ["--config.data.source=procedural", "--config.data.num_train=24"])
    for stage, fields in stages.items():
        for k, v in fields.items():
            config[stage][k] = v
    return config


def test_each_stage_encoded_by_its_tokenizer_and_rebuilt_when_one_changes(tmp_path, monkeypatch):
    # Base: an f8 tokenizer on the whole 64 px image (8x8 tokens); super-res: f4 (16x16).
    config = _config(base={"tokenizer": "coarse", "codebook_size": 16},
                     superres={"tokenizer": "fine", "codebook_size": 16})
    toks, steps = {"coarse": ToyTokenizer(8), "fine": ToyTokenizer(4)}, {"coarse": ["5"], "fine": ["7"]}
    monkeypatch.setattr(workdir_lib, "load_image_tokenizer", lambda w, name="", mesh=None: toks[name])
    monkeypatch.setattr(workdir_lib, "tokenizer_identity", lambda w, name="": steps[name])
    source = sources.make_source(config.data, "train", tmp_path / "data")
    images = np.stack([source[i]["image"] for i in range(len(source))])

    cache = inputs.shapes_token_cache(config, tmp_path, source)
    np.testing.assert_array_equal(cache["base"], toks["coarse"].encode(images))
    np.testing.assert_array_equal(cache["superres"], toks["fine"].encode(images))
    assert cache["captions"] == [source[i]["caption"] for i in range(len(source))]
    data = stage_data.from_token_cache(config, "superres", cache,
                                     stage_data.sentencepiece_inputs(_spm, cache["captions"]))
    np.testing.assert_array_equal(data.source[3]["lowres_tokens"], cache["base"][3].reshape(-1))

    # Read back from disk while nothing changed; rebuilt when one tokenizer trained further.
    path = workdir_lib.cache_dir(tmp_path) / "tokens_train.npz"
    made = path.stat().st_mtime_ns
    np.testing.assert_array_equal(inputs.shapes_token_cache(config, tmp_path, source)["base"], cache["base"])
    assert path.stat().st_mtime_ns == made
    steps["coarse"], toks["coarse"] = ["9"], ToyTokenizer(8)
    toks["coarse"].encode = lambda x: ToyTokenizer(8).encode(255 - np.asarray(x))
    np.testing.assert_array_equal(inputs.shapes_token_cache(config, tmp_path, source)["base"],
                                  ToyTokenizer(8).encode(255 - images))
    assert path.stat().st_mtime_ns != made


def test_one_shared_tokenizer_and_the_refusals(tmp_path, monkeypatch):
    # The shapes default: one f4 tokenizer; the base stage's 8x8 tokens are of the 32 px image.
    config = _config(base={"codebook_size": 16}, superres={"codebook_size": 16})
    monkeypatch.setattr(workdir_lib, "load_image_tokenizer", lambda w, name="", mesh=None: ToyTokenizer(4))
    monkeypatch.setattr(workdir_lib, "tokenizer_identity", lambda w, name="": ["1"])
    source = sources.make_source(config.data, "train", tmp_path / "data")
    images = np.stack([source[i]["image"] for i in range(len(source))])
    cache = inputs.shapes_token_cache(config, tmp_path, source)
    np.testing.assert_array_equal(cache["base"], ToyTokenizer(4).encode(image_ops.downsample_area(images, 2)))
    assert cache["superres"].shape == (len(source), 16, 16)
    config.base.codebook_size = 512
    monkeypatch.setattr(workdir_lib, "text_tokenizer", lambda *a, **k: pytest.fail("checked after the text"))
    with pytest.raises(ValueError, match="16 codes; config.base.codebook_size is 512"):
        inputs.build(config, tmp_path, "base")
    with pytest.raises(ValueError, match="do not divide the 64 px images"):
        token_cache.build_or_load(tmp_path / "c2", "train", source, {"base": (ToyTokenizer(4), 48)}, {})


def test_kind_repeats_reweight_what_both_stages_train_on(tmp_path, monkeypatch):
    config = _config(base={"codebook_size": 16}, superres={"codebook_size": 16})
    config.train.kind_repeats.update(dict(one=0, relation=3))
    monkeypatch.setattr(workdir_lib, "load_image_tokenizer", lambda w, name="", mesh=None: ToyTokenizer(4))
    monkeypatch.setattr(workdir_lib, "tokenizer_identity", lambda w, name="": ["1"])
    monkeypatch.setattr(workdir_lib, "text_tokenizer", lambda *a, **k: _spm)
    source = sources.make_source(config.data, "train", tmp_path / "data")
    captions = [source[i]["caption"] for i in range(len(source))]
    cache = inputs.shapes_token_cache(config, tmp_path, source)
    index = shapes.kind_repeat_index(captions, {"one": 0, "relation": 3})
    kinds = [shapes.caption_kind(c) for c in captions]
    assert len(index) == 3 * kinds.count("relation") + kinds.count("places") > 0
    data = inputs.build(config, tmp_path, "superres")
    assert len(data.source) == len(index)
    for j, i in enumerate(index):  # each record is example i's tokens, low-res tokens and caption
        rec = data.source[j]
        np.testing.assert_array_equal(rec["tokens"], cache["superres"][i].reshape(-1))
        np.testing.assert_array_equal(rec["lowres_tokens"], cache["base"][i].reshape(-1))
        assert rec["text_ids"][0] == len(captions[i]) + 1
    config.data.name = "webdataset"
    with pytest.raises(ValueError, match="kind_repeats re-weights the shapes scene kinds"):
        inputs.build(config, tmp_path, "base")


def _spm(captions, max_length=4):
    """Caption -> its length as the only id (enough for the arrays' shapes)."""
    ids = np.zeros((len(captions), max_length), np.int32)
    ids[:, 0] = [len(c) + 1 for c in captions]
    return ids, ids > 0
