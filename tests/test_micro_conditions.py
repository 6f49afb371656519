"""aMUSEd's micro-conditions of each example: original size, crop offset (in the pixels of the image
resized to shorter side S, as diffusers' training script computes it) and aesthetic score, from
preprocessing through every source to `Batches`."""
import io
import json
import math
import tarfile
from fractions import Fraction

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from muse_jax.configs import data as data_configs
from muse_jax.data import image_text, preprocess

S = 256


def _encode(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, fmt, **kw)
    return buf.getvalue()


def _smooth(width: int, height: int) -> np.ndarray:
    """Ramps across and down, and a gentle wave: a crop two pixels off differs by 8 grey levels or more."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    wave = 128 + 40 * np.sin(2 * np.pi * x / 97) * np.cos(2 * np.pi * y / 83)
    a = np.stack([255 * x / (width - 1), 255 * y / (height - 1), wave], -1)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _example(image: bytes, key: str = "k", epoch: int = 0, **options) -> dict:
    record = {"key": key, "image": image, "caption": "a caption", "skip": ""}
    return preprocess.example(record, preprocess.Options(size=options.pop("size", S), **options), epoch)


def _centre(width: int, height: int, size: int) -> tuple[int, int]:
    """(top, left) of the centre crop after resizing the shorter side to `size`, rounded half up."""
    short = min(width, height)
    offset = math.floor(Fraction(max(width, height) - short, 2) * Fraction(size, short) + Fraction(1, 2))
    return (0, offset) if width > height else (offset, 0)


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640)], ids=["landscape", "portrait"])
def test_centre_crop_gives_the_original_size_and_the_offset_in_resized_pixels(width, height):
    ex = _example(_encode(_smooth(width, height)))
    assert ex["original_size"].dtype == np.int32 and ex["crop_top_left"].dtype == np.int32
    assert tuple(ex["original_size"]) == (width, height)
    assert tuple(ex["crop_top_left"]) == ((0, 43) if width > height else (43, 0))  # round(80 * 256 / 480)
    assert ex["aesthetic_score"].dtype == np.float32 and np.isnan(ex["aesthetic_score"])


@pytest.mark.parametrize("width, height", [(640, 480), (480, 640)], ids=["landscape", "portrait"])
def test_random_crops_are_the_crops_of_the_resized_image_at_their_offset(width, height):
    a = _smooth(width, height)
    png = _encode(a)
    long = S * max(width, height) // min(width, height)  # 341: torchvision's resized long side
    resized = PIL.Image.fromarray(a).resize((long, S) if width > height else (S, long), PIL.Image.Resampling.BICUBIC)
    resized = np.asarray(resized, np.int32)
    offsets = set()
    for key, epoch in [(k, e) for k in "abcd" for e in range(3)]:
        ex = _example(png, key, epoch, random_crop=True)
        assert tuple(ex["original_size"]) == (width, height)
        top, left = (int(v) for v in ex["crop_top_left"])
        along, across = (left, top) if width > height else (top, left)
        assert across == 0 and 0 <= along <= long - S
        offsets.add((top, left))
        diff = np.abs(ex["image"].astype(np.int32) - resized[top:top + S, left:left + S])
        assert diff.max() <= 6, (key, epoch, top, left, diff.max())
    assert len(offsets) > 4


def test_random_crop_offsets_stay_within_the_resized_image():
    """202x200 at 256: the resized image is int(258.56) = 258 wide, so no offset exceeds 2 (the last
    original offset, 2 * 256 / 200 = 2.56, would round to 3)."""
    png = _encode(_smooth(202, 200))
    lefts = {int(_example(png, key, random_crop=True)["crop_top_left"][1]) for key in "abcdefghijkl"}
    assert lefts == {0, 1, 2}
    assert tuple(_example(_encode(_smooth(102, 100)), size=50)["crop_top_left"]) == (0, 1)  # 0.5 rounds up


def test_exif_turned_jpeg_gives_its_size_as_shown():
    """Stored 480 wide and 640 high with Orientation 6: shown turned a quarter, 640 wide and 480 high."""
    stored = _smooth(480, 640)
    exif = PIL.Image.Exif()
    exif[preprocess.EXIF_ORIENTATION] = 6
    turned = _example(_encode(stored, "JPEG", quality=90, exif=exif.tobytes()))
    assert tuple(turned["original_size"]) == (640, 480) and tuple(turned["crop_top_left"]) == (0, 43)
    plain = _example(_encode(stored, "JPEG", quality=90))
    assert tuple(plain["original_size"]) == (480, 640) and tuple(plain["crop_top_left"]) == (43, 0)


def test_a_jpeg_decoded_at_reduced_scale_keeps_its_full_size():
    jpeg = _encode(_smooth(2048, 1536), "JPEG", quality=85)
    draft = PIL.Image.open(io.BytesIO(jpeg))
    draft.draft(None, (342, S))
    assert draft.size == (512, 384)  # preprocess decodes this at a quarter of its size
    ex = _example(jpeg)
    assert tuple(ex["original_size"]) == (2048, 1536) and tuple(ex["crop_top_left"]) == (0, 43)
    lefts = {int(_example(jpeg, key, random_crop=True)["crop_top_left"][1]) for key in "abcdef"}
    assert len(lefts) > 1 and max(lefts) <= 341 - S


def test_skipped_placeholders_have_the_same_structure():
    ex = _example(b"not an image")
    assert ex["skip"] == "corrupt_image"
    assert ex["original_size"].dtype == ex["crop_top_left"].dtype == np.int32
    assert ex["original_size"].tolist() == ex["crop_top_left"].tolist() == [0, 0]
    assert ex["aesthetic_score"].dtype == np.float32 and np.isnan(ex["aesthetic_score"])


def test_aesthetic_scores_are_numbers_or_nan():
    record = lambda score: {"key": "k", "image": _encode(_smooth(20, 20)), "caption": "c", "skip": "",  # noqa: E731
                            "aesthetic_score": score}
    score = lambda value: preprocess.example(record(value), preprocess.Options(size=8))["aesthetic_score"]  # noqa: E731
    assert score(5.5) == np.float32(5.5) and score(6) == 6.0 and score(np.float64(4.25)) == 4.25
    assert score("6.5") == 6.5 and score(np.array(3.0, np.float32)) == 3.0
    for value in (None, "high", True, float("nan"), float("inf"), 1e39, [5.0], {"score": 5}):
        assert np.isnan(score(value)), value
    assert score(5.5).dtype == np.float32


# ---------------------------------------------------------------- every source, through Batches

SMALL = 16
SIZES = [(40, 30), (30, 40), (48, 32), (32, 32), (50, 30), (36, 54)]  # (width, height) of image i
SCORES = {0: 5.5, 2: "n/a", 3: 7.25, 4: None}  # image i's aesthetic field; 1 and 5 have none


def _images() -> list[bytes]:
    return [_encode(_smooth(w, h)) for w, h in SIZES]


def _wanted_score(i: int) -> float:
    return float(SCORES[i]) if isinstance(SCORES.get(i), float) else math.nan


def _check(config, *, scores: bool = True) -> None:
    """One pass through Batches: every row's micro-conditions are those of the image of its caption."""
    ds = image_text.make_dataset(config, "eval", process_index=0, process_count=1)
    batches = list(image_text.Batches(ds, 4))
    assert [len(b["caption"]) for b in batches] == [4, 2]
    seen = []
    for b in batches:
        assert b["original_size"].dtype == b["crop_top_left"].dtype == np.int32
        assert b["original_size"].shape == b["crop_top_left"].shape == (len(b["caption"]), 2)
        assert b["aesthetic_score"].dtype == np.float32 and b["aesthetic_score"].shape == (len(b["caption"]),)
        for caption, size, crop, score in zip(b["caption"], b["original_size"], b["crop_top_left"], b["aesthetic_score"]):
            i = int(caption.split()[1])
            seen.append(i)
            assert tuple(size) == SIZES[i] and tuple(crop) == _centre(*SIZES[i], SMALL), i
            np.testing.assert_equal(score, _wanted_score(i) if scores else math.nan, err_msg=str(i))
    assert sorted(seen) == list(range(len(SIZES)))


def _config(source: str, files: str, **fields):
    config = data_configs.get_config(source)
    config.update(image_size=SMALL, min_size=0, train_files=files, eval_files=files, aesthetic_key="aesthetic", **fields)
    return config


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_json_scores(tmp_path):
    images = _images()
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 3, shard * 3 + 3):
                key = f"{i:04d}"
                _add(tar, f"{key}.png", images[i])
                _add(tar, f"{key}.txt", f"caption {i}".encode())
                if i in SCORES:
                    _add(tar, f"{key}.json", json.dumps({"url": "x", "aesthetic": SCORES[i]}).encode())
                elif i == 5:
                    _add(tar, f"{key}.json", b"[not, json")  # the score is NaN; the sample is kept
    config = _config("webdataset", str(tmp_path / "*.tar"), shuffle_buffer=0)
    _check(config)
    config.aesthetic_key = ""
    _check(config, scores=False)


def test_parquet_column_scores(tmp_path):
    scores = [SCORES.get(i) if isinstance(SCORES.get(i), float) else None for i in range(len(SIZES))]
    table = pa.table({"image": pa.array(_images(), pa.binary()), "text": [f"caption {i}" for i in range(len(SIZES))],
                      "aesthetic": pa.array(scores, pa.float64())})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    config = _config("parquet", str(tmp_path / "a.parquet"))
    _check(config)
    config.aesthetic_key = "AESTHETIC_SCORE"
    with pytest.raises(ValueError, match=r"config.data.aesthetic_key: no column 'AESTHETIC_SCORE' in .*image, text, aesthetic"):
        image_text.make_dataset(config, "eval", process_index=0, process_count=1)


def test_folder_captions_jsonl_scores(tmp_path):
    lines = []
    for i, image in enumerate(_images()):
        (tmp_path / f"{i}.png").write_bytes(image)
        entry = {"file": f"{i}.png", "caption": f"caption {i}"}
        if i in SCORES:
            entry["aesthetic"] = SCORES[i]
        lines.append(json.dumps(entry))
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    _check(_config("folder", str(tmp_path)))
