"""Sources and the loader: shapes and dtypes, per-process shards, resumable iterators, tfds == procedural."""
import grain.python as grain
import ml_collections
import numpy as np
import pytest

from muse_jax.data import loader, shapes, sources


def _data_config(source, num_train=96, num_test=16):
    return ml_collections.ConfigDict(dict(
        name="shapes", seed=0, num_train=num_train, num_test=num_test, source=source,
        batch_size=8, shuffle_seed=0))


@pytest.fixture(scope="module")
def tfds_train(tmp_path_factory):
    return sources.make_source(_data_config("array_record"), "train", tmp_path_factory.mktemp("data"))


def test_tfds_and_procedural_sources_give_the_same_examples(tfds_train, tmp_path):
    proc = sources.make_source(_data_config("procedural"), "train")
    assert len(tfds_train) == len(proc) == 96
    # "tfds", the built dataset's earlier name (in older workdirs' configs), reads the same dataset
    old = sources.make_source(_data_config("tfds"), "train", tmp_path)
    assert len(old) == 96 and old[17]["caption"] == proc[17]["caption"]
    for i in (0, 1, 17, 95):
        a, b = tfds_train[i], proc[i]
        assert isinstance(a["caption"], str) and a["image"].dtype == np.uint8  # canonical examples
        assert a["index"] == b["index"] == i
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"] and a["attributes"] == b["attributes"]


def test_batches_have_the_right_shapes_and_dtypes(tfds_train):
    batch = next(iter(loader.make_loader(tfds_train, batch_size=8, seed=0)))
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["index"].shape == (8,) and batch["index"].dtype == np.int64
    assert batch["caption"].shape == (8,) and isinstance(batch["caption"][0], str)
    for i, cap in zip(batch["index"], batch["caption"]):
        assert cap == shapes.make_example(0, "train", int(i))["caption"]


def test_shuffling_is_seeded():
    src = shapes.ShapesSource("train", 64)
    first = lambda seed: next(iter(loader.make_loader(src, batch_size=16, seed=seed)))["index"]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))
    ordered = next(iter(loader.make_loader(src, batch_size=16, shuffle=False)))["index"]
    np.testing.assert_array_equal(ordered, np.arange(16))


@pytest.mark.parametrize("num", [96, 97])
def test_process_shards_are_disjoint_and_cover_the_split(num):
    """Shards are equal-sized (processes step in lockstep): a remainder < count is dropped."""
    src = shapes.ShapesSource("test", num)
    seen = []
    for pid in range(2):
        opts = grain.ShardOptions(shard_index=pid, shard_count=2, drop_remainder=True)
        shard = loader.make_loader(src, batch_size=1, shuffle=True, num_epochs=1,
                                      shard_options=opts, drop_remainder=False)
        seen.append([int(b["index"][0]) for b in shard])
    assert len(seen[0]) == len(seen[1]) == num // 2
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == num - num % 2


def test_resuming_from_saved_state_yields_the_same_next_batch():
    src = shapes.ShapesSource("train", 64)
    batches = loader.make_loader(src, batch_size=8, seed=3)
    it = iter(batches)
    for _ in range(5):  # crosses the epoch boundary (64 / 8 = 8 batches per epoch) later
        next(it)
    state = it.get_state()
    expected = [next(it)["index"] for _ in range(6)]
    resumed = iter(loader.make_loader(src, batch_size=8, seed=3))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["index"], want)


def test_batch_sizes_must_divide_over_processes():
    assert loader.per_process_batch_size(32, 4) == 8
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        loader.per_process_batch_size(32, 3)


def test_bad_data_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown shapes source 'parquet'; expected 'array_record' or 'procedural'"):
        sources.make_source(_data_config("parquet"), "train", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        sources.make_source(_data_config("procedural"), "validation")


def test_expand_brace_patterns_and_globs(tmp_path):
    from muse_jax import paths

    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.parquet").write_text("")
    assert paths.expand(f"{tmp_path}/{{00000..00001}}.tar") == [f"{tmp_path}/00000.tar", f"{tmp_path}/00001.tar"]
    assert paths.expand(f"{tmp_path}/*.tar :: {tmp_path}/s*/*.parquet") == [
        *[f"{tmp_path}/{i:05d}.tar" for i in range(3)], f"{tmp_path}/sub/a.parquet"]
    assert paths._braces("{x,y{1..2}}z") == ["xz", "y1z", "y2z"]
    with pytest.raises(FileNotFoundError, match="00003.tar does not exist"):
        paths.expand(f"{tmp_path}/{{00000..00004}}.tar")  # a shard missing from a range is not skipped
    with pytest.raises(FileNotFoundError, match="no file matches"):
        paths.expand(f"{tmp_path}/*.jpg")
    with pytest.raises(ValueError, match="unbalanced"):
        paths.expand(f"{tmp_path}/{{0..1.tar")
