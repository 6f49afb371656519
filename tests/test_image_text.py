"""Real image-text data: preprocessing, the folder / parquet / tfds / webdataset sources, Batches."""
import io
import json
import tarfile

import grain
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath

from muse_jax.configs import data as data_configs
from muse_jax.data import image_text, preprocess

S = 16  # output size of every test


def _encode(img: PIL.Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _pixels(n: int, size: int = S, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _record(image, caption="a caption", key="k") -> dict:
    return {"key": key, "image": image, "caption": caption, "skip": ""}


def _config(kind: str, **fields):
    config = data_configs.get_config(kind)
    config.image_size = S
    config.update(fields)
    return config


def _examples(config, split="eval", **kw) -> list[dict]:
    return list(image_text.make_dataset(config, split, **{"process_index": 0, "process_count": 1, **kw}))


def _take(config, n, split="train", **kw) -> list[dict]:
    it = iter(image_text.make_dataset(config, split, **{"process_index": 0, "process_count": 1, **kw}))
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- preprocessing


def test_every_mode_becomes_rgb_with_alpha_on_white():
    opts = preprocess.Options(size=2)
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0]], [[0, 255, 0, 128], [10, 20, 30, 255]]], np.uint8)
    cases = {
        "RGBA": (PIL.Image.fromarray(rgba, "RGBA"), [[[255, 0, 0], [255, 255, 255]], [[127, 255, 127], [10, 20, 30]]]),
        "LA": (PIL.Image.fromarray(np.array([[[50, 255], [50, 0]]] * 2, np.uint8), "LA"), [[[50] * 3, [255] * 3]] * 2),
        "L": (PIL.Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8), "L"),
              [[[0] * 3, [100] * 3], [[200] * 3, [255] * 3]]),
        "CMYK": (PIL.Image.new("RGB", (2, 2), (255, 0, 0)).convert("CMYK"), [[[255, 0, 0]] * 2] * 2),
        "I;16": (PIL.Image.fromarray(np.full((2, 2), 65535, np.uint16)), [[[255] * 3] * 2] * 2),
    }
    palette = PIL.Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    cases["P"] = (palette, [[[0, 200, 0]] * 2] * 2)
    transparent = palette.copy()
    transparent.info["transparency"] = 1
    cases["P+transparency"] = (transparent, [[[255] * 3] * 2] * 2)
    for name, (img, want) in cases.items():
        ex = preprocess.example(_record(_encode(img, "TIFF" if name in ("CMYK", "I;16") else "PNG")), opts)
        assert ex["skip"] == "", name
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (2, 2, 3), name
        np.testing.assert_allclose(ex["image"], want, atol=1, err_msg=name)
    # A decoded array (as tfds gives) is accepted as is.
    arr = _pixels(1)[0]
    np.testing.assert_array_equal(preprocess.example(_record(arr), preprocess.Options(size=S))["image"], arr)


@pytest.mark.parametrize("tall", [False, True])
def test_shorter_side_is_resized_and_the_centre_cropped(tall):
    """200x100: the crop is x in [50, 150) of the original; a red stripe outside it never shows."""
    a = np.full((100, 200, 3), 255, np.uint8)
    a[:, :40] = (255, 0, 0)  # outside the centre crop
    a[40:60, 90:110] = 0  # a black square at the centre
    a[:, 140:150] = (0, 0, 255)  # inside the crop, at its right edge
    if tall:
        a = a.transpose(1, 0, 2).copy()
    out = preprocess.example(_record(_encode(PIL.Image.fromarray(a))), preprocess.Options(size=50))["image"]
    assert out.shape == (50, 50, 3)
    assert out[25, 25].max() < 30 and out[10, 10].min() > 225  # square at the centre, white around
    edge = out[25, 47] if not tall else out[47, 25]
    assert edge[2] > 200 and edge[0] < 60  # the blue band
    red = (out[..., 0] > 150) & (out[..., 1] < 100) & (out[..., 2] < 100)
    assert not red.any()
    # The same as an independent resize of the whole image then a crop (smooth image, bicubic).
    g = np.linspace(0, 255, 200)[None, :, None] * np.ones((100, 1, 3))
    g = np.clip(g + np.linspace(0, 60, 100)[:, None, None], 0, 255).astype(np.uint8)
    got = preprocess.example(_record(_encode(PIL.Image.fromarray(g))), preprocess.Options(size=50))["image"]
    want = np.asarray(PIL.Image.fromarray(g).resize((100, 50), PIL.Image.Resampling.BICUBIC).crop((25, 0, 75, 50)))
    assert np.abs(got.astype(int) - want).max() <= 2


def test_a_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode():
    g = (np.linspace(0, 255, 128)[None, :, None] * np.ones((64, 1, 3))).astype(np.uint8)
    jpeg = _encode(PIL.Image.fromarray(g), "JPEG", quality=95)
    got = preprocess.example(_record(jpeg), preprocess.Options(size=S))["image"]
    full = PIL.Image.open(io.BytesIO(jpeg)).convert("RGB").resize((2 * S, S), PIL.Image.Resampling.BICUBIC)
    want = np.asarray(full.crop((S // 2, 0, S // 2 + S, S)))
    assert np.abs(got.astype(int) - want).max() <= 6


def test_random_crops_depend_on_seed_key_and_epoch_only():
    a = np.tile(np.arange(160, dtype=np.uint8)[None, :, None], (16, 1, 3))  # column index as the pixel
    jpeg = _encode(PIL.Image.fromarray(a))
    opts = preprocess.Options(size=16, random_crop=True, seed=3)
    left = lambda key, epoch: int(preprocess.example(_record(jpeg, key=key), opts, epoch)["image"][0, 0, 0])  # noqa: E731
    assert left("a", 0) == left("a", 0)
    assert len({left("a", e) for e in range(6)}) > 1 and len({left(k, 0) for k in "abcdef"}) > 1
    assert all(0 <= left("a", e) <= 144 for e in range(6))
    centre = preprocess.example(_record(jpeg), preprocess.Options(size=16))["image"]
    assert centre[0, 0, 0] == 72


def test_captions_text_bytes_and_sequences():
    opts = preprocess.Options(size=S, seed=1)
    img = _encode(PIL.Image.fromarray(_pixels(1)[0]))
    cap = lambda c, key="k", epoch=0: preprocess.example(_record(img, c, key), opts, epoch)  # noqa: E731
    assert cap("  a cat \n")["caption"] == "a cat"
    assert cap("un café".encode())["caption"] == "un café"
    several = [b"first", b"  ", "second", b"third"]
    drawn = {cap(several, key, e)["caption"] for key in "abcd" for e in range(4)}
    assert drawn == {"first", "second", "third"}  # never the blank one
    assert cap(several, "a", 2)["caption"] == cap(several, "a", 2)["caption"]
    assert cap(None)["skip"] == "missing_caption" and cap([])["skip"] == "missing_caption"
    assert cap(" ")["skip"] == "empty_caption" and cap([b"", " "])["skip"] == "empty_caption"


def test_every_bad_record_is_a_placeholder_with_its_kind():
    opts = preprocess.Options(size=S, min_size=8, max_aspect_ratio=3.0)
    jpeg = _encode(PIL.Image.fromarray(_pixels(1, 32)[0]), "JPEG")
    bad = {
        "corrupt_image": [_record(b"not an image"), _record(None), _record(jpeg[: len(jpeg) // 2]),
                          _record(np.zeros((4, 4), np.float32))],
        "small_image": [_record(_encode(PIL.Image.new("RGB", (7, 20))))],
        "aspect_ratio": [_record(_encode(PIL.Image.new("RGB", (100, 25))))],
        "missing_caption": [_record(jpeg, None)],
        "empty_caption": [_record(jpeg, "   ")],
        "bad_member": [{"key": "k", "image": None, "caption": None, "skip": "bad_member"}],
    }
    for kind, records in bad.items():
        for r in records:
            ex = preprocess.example(r, opts)
            assert ex["skip"] == kind and ex["caption"] == "" and ex["key"] == "k"
            np.testing.assert_array_equal(ex["image"], np.zeros((S, S, 3), np.uint8))
    assert preprocess.example(_record(jpeg), opts)["skip"] == ""


# ---------------------------------------------------------------- sources


def _write_folder(root, images, captions):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i, (img, cap) in enumerate(zip(images, captions)):
            name = f"{i:04d}.png"
            (root / name).write_bytes(img if isinstance(img, bytes) else _encode(PIL.Image.fromarray(img)))
            f.write(json.dumps({"file": name, "caption": cap}) + "\n")
    return root


def _write_parquet(path, images, captions, *, struct: bool, row_group_size: int = 3):
    encoded = [img if isinstance(img, bytes) else _encode(PIL.Image.fromarray(img)) for img in images]
    column = (pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(encoded)]) if struct
              else pa.array(encoded, pa.binary()))
    pq.write_table(pa.table({"image": column, "text": captions, "other": list(range(len(images)))}), path,
                   row_group_size=row_group_size)
    return path


def _folder_config(tmp_path, n=12, **fields):
    images, captions = _pixels(n), [f"caption {i}" for i in range(n)]
    root = _write_folder(tmp_path / "folder", images, captions)
    return _config("folder", train_files=str(root), eval_files=str(root), **fields), images, captions


def _parquet_config(tmp_path, n=12, struct=True, **fields):
    tmp_path.mkdir(parents=True, exist_ok=True)
    images, captions = _pixels(n), [f"caption {i}" for i in range(n)]
    half = n // 2
    _write_parquet(tmp_path / "a.parquet", images[:half], captions[:half], struct=struct)
    _write_parquet(tmp_path / "b.parquet", images[half:], captions[half:], struct=struct)
    pattern = str(tmp_path / "{a,b}.parquet")
    return _config("parquet", train_files=pattern, eval_files=pattern, **fields), images, captions


def test_folder_source_returns_what_was_written(tmp_path):
    config, images, captions = _folder_config(tmp_path)
    got = _examples(config)
    assert [ex["caption"] for ex in got] == captions
    for ex, img in zip(got, images):
        np.testing.assert_array_equal(ex["image"], img)


@pytest.mark.parametrize("struct", [True, False], ids=["hf_struct", "binary"])
def test_parquet_source_returns_what_was_written(tmp_path, struct):
    config, images, captions = _parquet_config(tmp_path, struct=struct)
    got = _examples(config)
    assert [ex["caption"] for ex in got] == captions
    assert got[0]["key"] == "a.parquet:0" and got[-1]["key"] == "b.parquet:5"
    for ex, img in zip(got, images):
        np.testing.assert_array_equal(ex["image"], img)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny array_record tfds dataset: image i is filled with i; captions is a sequence of {text, id};
    its aesthetic score is i / 2."""
    import tensorflow_datasets as tfds

    class TinyImageCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": tfds.features.Scalar(np.int64),
                "aesthetic": tfds.features.Scalar(np.float32),
                "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int64)}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 8), "val": self._generate_examples(8, 12)}

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                image = _encode(PIL.Image.new("RGB", (S, S), (i, 2 * i, 3 * i)))
                yield i, {"image": image, "image/id": i, "aesthetic": i / 2,
                          "captions": {"text": [f"image {i} one", f"image {i} two", f"image {i} three"], "id": [1, 2, 3]}}

    d = tmp_path_factory.mktemp("tfds")
    TinyImageCaptions(data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


def test_tfds_source_draws_one_caption_of_the_sequence(tfds_dir):
    config = _config("tfds", tfds_name="tiny_image_captions", tfds_data_dir=tfds_dir)
    got = _examples(config)
    assert len(got) == 4
    for ex in got:
        i = int(ex["caption"].split()[1])
        assert 8 <= i < 12 and ex["caption"] in {f"image {i} one", f"image {i} two", f"image {i} three"}
        np.testing.assert_array_equal(ex["image"], np.full((S, S, 3), (i, 2 * i, 3 * i), np.uint8))
    assert sorted(int(ex["caption"].split()[1]) for ex in got) == [8, 9, 10, 11]
    train = [ex["caption"] for ex in _take(config, 8 * 6)]  # six epochs of 8
    assert len(set(train)) > 8  # different captions of an image in different epochs
    assert {int(c.split()[1]) for c in train[:8]} == set(range(8))
    with pytest.raises(ValueError, match=r"config.data.caption_key: no feature 'captions/txt'.*captions/text"):
        _examples(_config("tfds", tfds_name="tiny_image_captions", tfds_data_dir=tfds_dir, caption_key="captions/txt"))
    with pytest.raises(ValueError, match=r"config.data.tfds_eval_split: no split 'validation'.*splits: .*val"):
        _examples(_config("tfds", tfds_name="tiny_image_captions", tfds_data_dir=tfds_dir, tfds_eval_split="validation"))
    with pytest.raises(ValueError, match=r"config.data.image_key: feature 'image/id' .* is Scalar, not an Image"):
        _examples(_config("tfds", tfds_name="tiny_image_captions", tfds_data_dir=tfds_dir, image_key="image/id"))
    with pytest.raises(FileNotFoundError, match="config.data.tfds_name: no prepared dataset 'nothing_here'"):
        _examples(_config("tfds", tfds_name="nothing_here", tfds_data_dir=tfds_dir))


def test_tfds_feature_named_by_aesthetic_key_is_the_aesthetic_score(tfds_dir):
    config = _config("tfds", tfds_name="tiny_image_captions", tfds_data_dir=tfds_dir, aesthetic_key="aesthetic")
    batch = next(image_text.Batches(image_text.make_dataset(config, "eval", process_index=0, process_count=1), 4))
    ids = [int(c.split()[1]) for c in batch["caption"]]
    assert batch["aesthetic_score"].dtype == np.float32
    np.testing.assert_array_equal(batch["aesthetic_score"], np.asarray(ids, np.float32) / 2)
    assert batch["original_size"].tolist() == [[S, S]] * 4 and batch["crop_top_left"].tolist() == [[0, 0]] * 4
    config.aesthetic_key = ""
    assert np.isnan(_examples(config)[0]["aesthetic_score"])
    config.aesthetic_key = "aesthetics"
    with pytest.raises(ValueError, match=r"config.data.aesthetic_key: no feature 'aesthetics'.*aesthetic"):
        _examples(config)


def test_readme_tfds_override_of_the_smoke_config_finds_the_coco_layout(tfds_dir):
    """`--config smoke --config.data.source=tfds --config.data.tfds_name=... --config.data.tfds_data_dir=DIR`:
    image_key / caption_key default to coco_captions' "image" and "captions/text"."""
    from muse_jax import config as config_lib

    config = config_lib.load_config("smoke", ["--config.data.source=tfds", "--config.data.tfds_name=tiny_image_captions",
                                              f"--config.data.tfds_data_dir={tfds_dir}", f"--config.data.image_size={S}"])
    got = _examples(config.data)
    assert len(got) == 4 and all(ex["skip"] == "" and ex["caption"].startswith("image ") for ex in got)


def test_webdataset_source_preprocesses_the_tar_records(tmp_path):
    pytest.importorskip("muse_jax.data.webdataset", reason="muse_jax/data/webdataset.py is not written yet")
    images = _pixels(4)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, img in enumerate(images):
            for name, data in ((f"{i:04d}.png", _encode(PIL.Image.fromarray(img))), (f"{i:04d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    config = _config("webdataset", train_files=str(tmp_path / "*.tar"), eval_files=str(tmp_path / "*.tar"),
                     shuffle_buffer=0)
    got = sorted(_examples(config), key=lambda ex: ex["caption"])
    assert [ex["caption"] for ex in got] == [f"caption {i}" for i in range(4)]
    for ex, img in zip(got, images):
        np.testing.assert_array_equal(ex["image"], img)


@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_two_processes_read_disjoint_shares_that_cover_the_split(tmp_path, source):
    config, _, captions = (_folder_config if source == "folder" else _parquet_config)(tmp_path, n=12)
    shares = [[ex["caption"] for ex in _examples(config, process_index=p, process_count=2)] for p in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(captions)
    # Training: each epoch is a new permutation of the process's share.
    n = len(shares[0])
    train = [ex["caption"] for ex in _take(config, 3 * n, process_index=0, process_count=2)]
    epochs = [train[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(e) == sorted(shares[0]) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3


# ---------------------------------------------------------------- Batches


def _with_bad_records(tmp_path, source):
    """12 records of which 3 are bad (corrupt, truncated jpeg, empty caption)."""
    images, captions = _pixels(12), [f"caption {i}" for i in range(12)]
    jpeg = _encode(PIL.Image.fromarray(images[4]), "JPEG")
    images[1], images[4], captions[7] = b"\x89PNG broken", jpeg[:len(jpeg) // 2], " "
    if source == "folder":
        root = _write_folder(tmp_path / "folder", images, captions)
        return _config("folder", train_files=str(root), eval_files=str(root))
    _write_parquet(tmp_path / "a.parquet", images, captions, struct=True, row_group_size=2)
    return _config("parquet", train_files=str(tmp_path / "a.parquet"), eval_files=str(tmp_path / "a.parquet"))


@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_resume_continues_with_the_same_batches_and_skip_counts(tmp_path, source):
    config = _with_bad_records(tmp_path, source)
    make = lambda: image_text.Batches(image_text.make_dataset(config, "train", process_index=0, process_count=1), 4)  # noqa: E731
    batches = make()
    for _ in range(5):  # 20 good examples: mid-epoch of the second pass over 9 good records
        assert next(batches)["image"].shape == (4, S, S, 3)
    state = batches.get_state()
    skipped = dict(batches.skipped)
    assert sum(skipped.values()) >= 3 and set(skipped) <= {"corrupt_image", "empty_caption"}
    expected = [next(batches) for _ in range(4)]
    # Through grain's orbax handler (process_0-of-1.json) and through the state bytes directly.
    handler = grain.checkpoint.CheckpointHandler()
    ckpt = epath.Path(tmp_path / "ckpt")
    ckpt.mkdir()
    again = make()
    for _ in range(2):
        next(again)
    restored = make()
    restored.set_state(state)
    handler.save(ckpt, args=grain.checkpoint.CheckpointSave(restored))
    handler.restore(ckpt, args=grain.checkpoint.CheckpointRestore(again))
    for resumed in (restored, again):
        assert resumed.skipped == skipped
        for want in expected:
            got = next(resumed)
            assert got.keys() == want.keys() == {"image", "caption", "original_size", "crop_top_left", "aesthetic_score"}
            for k in ("image", "original_size", "crop_top_left", "aesthetic_score"):
                np.testing.assert_array_equal(got[k], want[k])
            assert list(got["caption"]) == list(want["caption"])
        assert resumed.skipped == batches.skipped
    assert batches.metrics()["data/skipped/corrupt_image"] == batches.skipped["corrupt_image"]
    assert set(batches.metrics()) == {f"data/skipped/{k}" for k in preprocess.SKIP_KINDS}


def test_batches_are_full_and_the_eval_split_ends_with_a_partial_batch(tmp_path, caplog):
    config = _with_bad_records(tmp_path, "folder")
    with caplog.at_level("WARNING"):
        got = list(image_text.Batches(image_text.make_dataset(config, "eval", process_index=0, process_count=1), 4))
    assert [len(b["caption"]) for b in got] == [4, 4, 1]  # 9 good records
    assert got[0]["caption"].dtype == object and isinstance(got[0]["caption"][0], str)
    assert sum(len(b["caption"]) for b in got) == 9
    assert sum("skipping example" in r.message and "corrupt_image" in r.message for r in caplog.records) == 1
    train = image_text.Batches(image_text.make_dataset(config, "train", process_index=0, process_count=1), 4)
    assert all(len(next(train)["caption"]) == 4 for _ in range(6))
    assert 6 <= sum(train.skipped.values()) <= 9  # 24 good of 9 per epoch: into the third epoch


def test_a_split_of_only_bad_records_raises_instead_of_looping(tmp_path):
    root = _write_folder(tmp_path / "bad", [b"junk"] * 3, ["a", "b", "c"])
    ds = image_text.make_dataset(_config("folder", train_files=str(root)), "train", process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="the last 30 examples were all skipped"):
        next(image_text.Batches(ds, 2, max_consecutive_skips=30))


def test_a_worker_process_gives_the_same_examples(tmp_path):
    """One spawned worker (each imports grain and JAX: seconds): the sources and transforms pickle."""
    config, _, _ = _folder_config(tmp_path, n=8)
    inline = [ex["caption"] for ex in _take(config, 10)]
    config.workers = 1
    ds = image_text.make_dataset(config, "train", process_index=0, process_count=1)
    batches = image_text.Batches(ds, 5)
    try:
        got = [c for _ in range(2) for c in next(batches)["caption"]]
    finally:
        batches.close()
    assert got == inline


# ---------------------------------------------------------------- config errors


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.data.train_files: no file matches '.*nothing-\*.parquet'"):
        image_text.make_dataset(_config("parquet", train_files=str(tmp_path / "nothing-*.parquet")), "train",
                                process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"config.data.train_files must be given"):
        image_text.make_dataset(_config("folder"), "train", process_index=0, process_count=1)
    config, _, _ = _parquet_config(tmp_path, caption_key="caption")
    with pytest.raises(ValueError, match=r"config.data.caption_key: no column 'caption' in .*columns: image, text, other"):
        image_text.make_dataset(config, "train", process_index=0, process_count=1)
    config.caption_key = "other"
    with pytest.raises(ValueError, match=r"config.data.caption_key: column 'other' .* is int64"):
        image_text.make_dataset(config, "train", process_index=0, process_count=1)
    config.caption_key, config.image_key = "text", "text"
    with pytest.raises(ValueError, match=r"config.data.image_key: column 'text' .* is string"):
        image_text.make_dataset(config, "train", process_index=0, process_count=1)
    config.image_key, config.caption_key = "", ""  # the common layout: columns image and text
    assert len(_examples(config)) == 12
    with pytest.raises(ValueError, match=r"config.data.source: unknown source 'csv'"):
        image_text.make_dataset(_config("folder", source="csv"), "train", process_index=0, process_count=1)
    with pytest.raises(ValueError, match="sources.make_source"):
        image_text.make_dataset(_config("folder", name="shapes"), "train", process_index=0, process_count=1)
    incomplete = _config("folder", train_files=str(tmp_path))
    del incomplete["workers"]
    with pytest.raises(ValueError, match=r"config.data.workers: missing"):
        image_text.make_dataset(incomplete, "train", process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match=r"config.data.train_files: no captions.jsonl in"):
        image_text.make_dataset(_config("folder", train_files=str(tmp_path)), "train", process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"config.data.*max_aspect_ratio"):
        image_text.make_dataset(_config("folder", train_files=str(tmp_path), max_aspect_ratio=0.5), "train",
                                process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"config.data.train_files: 4 parquet row groups .* by 5 processes"):
        image_text.make_dataset(_parquet_config(tmp_path / "p")[0], "train", process_index=0, process_count=5)
