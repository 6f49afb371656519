"""Real image-text data as users bring it: Hugging Face parquet with image paths, phone photos (EXIF
orientation), the default skips of tiny and elongated images, and the README's source overrides."""
import io
import itertools

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse_jax import config as config_lib
from muse_jax.configs import data as data_configs
from muse_jax.data import image_text, preprocess


def _encode(img: PIL.Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _examples(config) -> list[dict]:
    """One pass over the train split in file order."""
    return list(image_text.make_dataset(config, "train", process_index=0, process_count=1, ordered=True))


def _hf_path_parquet(path, image_paths, captions):
    """The layout of `datasets`' cast_column("image", Image()) + to_parquet: {bytes: null, path}."""
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array([{"bytes": None, "path": p} for p in image_paths], struct)
    pq.write_table(pa.table({"image": column, "text": captions}), path)
    return str(path)


def test_parquet_image_structs_without_bytes_read_the_file_at_their_path(tmp_path):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
    (tmp_path / "images").mkdir()
    for i, a in enumerate(pixels):
        PIL.Image.fromarray(a).save(tmp_path / "images" / f"{i}.png")
    relative_and_absolute = ["images/0.png", str(tmp_path / "images" / "1.png")]
    config = data_configs.get_config("parquet")
    config.image_size, config.train_files = 16, _hf_path_parquet(tmp_path / "a.parquet", relative_and_absolute, ["a", "b"])
    got = _examples(config)
    assert [ex["skip"] for ex in got] == ["", ""] and [ex["caption"] for ex in got] == ["a", "b"]
    for ex, a in zip(got, pixels):
        np.testing.assert_array_equal(ex["image"], a)

    # A path that does not exist (or no path at all): skipped as missing_image_file, and a run of
    # nothing else stops with the counts by kind.
    config.train_files = _hf_path_parquet(tmp_path / "b.parquet", ["images/gone.png", None], ["a", "b"])
    assert [ex["skip"] for ex in _examples(config)] == ["missing_image_file"] * 2
    batches = image_text.Batches(image_text.make_dataset(config, "train", process_index=0, process_count=1), 2,
                                 max_consecutive_skips=6)
    with pytest.raises(RuntimeError, match=r"the last 6 examples were all skipped .*missing_image_file: 6"):
        next(batches)


def test_exif_orientation_is_applied_on_decode(tmp_path):
    """A 32x16 JPEG stored on its side (Orientation 6: shown turned 90 degrees clockwise) is 16x32 upright."""
    stored = np.zeros((16, 32, 3), np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        stored[:, 8 * i:8 * (i + 1)] = colour  # four vertical bands, left to right
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation
    jpeg = _encode(PIL.Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    shown = np.rot90(stored, k=-1)  # [32, 16]: the bands now run top to bottom
    # Through a source: the centre square of the upright image (rows 8..24: green above blue).
    (tmp_path / "captions.jsonl").write_text('{"file": "phone.jpg", "caption": "a phone photo"}\n')
    (tmp_path / "phone.jpg").write_bytes(jpeg)
    config = data_configs.get_config("folder")
    config.image_size, config.train_files = 16, str(tmp_path)
    (ex,) = _examples(config)
    assert ex["skip"] == "" and np.abs(ex["image"].astype(int) - shown[8:24]).mean() < 4
    upright, turned = preprocess.upright(PIL.Image.open(io.BytesIO(jpeg)))
    assert turned and np.asarray(upright).shape == (32, 16, 3)
    assert np.abs(np.asarray(upright, int) - shown).mean() < 4

def test_default_config_skips_tiny_and_elongated_images(tmp_path):
    config = config_lib.load_config("smoke", ["--config.data.source=folder", f"--config.data.train_files={tmp_path}"])
    assert (config.data.min_size, config.data.max_aspect_ratio) == (64, 3.0)  # image_size 128
    paper = data_configs.get_config("parquet")
    assert (paper.image_size, paper.min_size, paper.max_aspect_ratio) == (256, 128, 3.0)
    sizes = {"tiny.png": (8, 8), "panorama.png": (384, 64), "photo.png": (128, 96)}
    lines = []
    for name, size in sizes.items():
        PIL.Image.new("RGB", size, (90, 120, 200)).save(tmp_path / name)
        lines.append(f'{{"file": "{name}", "caption": "{name}"}}')
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    batches = image_text.Batches(image_text.make_dataset(config.data, "train", process_index=0, process_count=1, ordered=True), 8)
    assert list(next(batches)["caption"]) == ["photo.png"]
    assert batches.skipped == {"small_image": 1, "aspect_ratio": 1}


def test_readme_parquet_override_of_the_smoke_config_reads_the_files(tmp_path):
    """`--config smoke --config.data.source=parquet --config.data.train_files='DIR/*.parquet'`: the
    keys come from the files' layout (image, and text or else caption)."""
    images = [_encode(PIL.Image.new("RGB", (64, 64), (i, 0, 0))) for i in range(3)]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": ["a", "b", "c"]}),
                   tmp_path / "00000.parquet")
    config = config_lib.load_config("smoke", ["--config.data.source=parquet",
                                              f"--config.data.train_files={tmp_path}/*.parquet"])
    got = list(itertools.islice(image_text.make_dataset(config.data, "train", process_index=0, process_count=1), 3))
    assert sorted(ex["caption"] for ex in got) == ["a", "b", "c"] and all(ex["skip"] == "" for ex in got)
    assert got[0]["image"].shape == (128, 128, 3)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "alt": ["a", "b", "c"]}), tmp_path / "00000.parquet")
    with pytest.raises(ValueError, match=r"config.data.caption_key: none of the columns text, caption .*image, alt"):
        image_text.make_dataset(config.data, "train", process_index=0, process_count=1)
