"""Raw image-text records -> training examples: decode, upright (EXIF), RGB, resize + crop, one caption.

    options = preprocess.Options(size=256, min_size=128, max_aspect_ratio=2.0)
    ex = preprocess.example({"key": "a.jpg", "image": jpeg_bytes, "caption": b" a cat ", "skip": ""}, options)
    # a 640 x 480 image:
    ex == {"image": uint8 [256, 256, 3], "caption": "a cat", "key": "a.jpg", "skip": "",
           "original_size": int32 [640, 480], "crop_top_left": int32 [0, 43], "aesthetic_score": float32 nan}

A raw record's image is encoded bytes (JPEG, PNG, WebP, ...) or an already decoded uint8 array
(as tfds gives); its caption is str, utf-8 bytes, a sequence of them (one is drawn per example
and epoch) or None; its optional "aesthetic_score" is whatever the reader found (a number, or
anything else for none). A bad record never raises: it comes back as a zero image with `skip` set
to one of SKIP_KINDS, so that grain worker processes pass it on and `image_text.Batches` drops and
counts it in the main process. Only programming and configuration errors raise.

Each example also carries aMUSEd's (and SDXL's) micro-conditions, as diffusers' aMUSEd training
script computes them (it resizes the shorter side to S, then crops an S x S square):
  original_size    int32 [2]: (width, height) of the image as shown (EXIF orientation applied),
                   before any resize; the full size even when a JPEG is decoded at a reduced scale.
  crop_top_left    int32 [2]: (top, left) of the crop in the pixels of the image resized so that its
                   shorter side is S: the crop's offset in the original times S / shorter side,
                   rounded half up, at most floor(S * long / short) - S (torchvision's resized size).
  aesthetic_score  float32 []: the record's score, NaN when it has none or it is not a finite number.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import numbers
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageOps

SKIP_KINDS = (
    "corrupt_image",  # no image, or bytes PIL cannot decode (truncated files included)
    "missing_image_file",  # reported by the reader: the image file a record names cannot be read
    "small_image",  # shorter side below Options.min_size
    "aspect_ratio",  # long side / short side above Options.max_aspect_ratio
    "missing_caption",  # no caption at all (None, or an empty list of captions)
    "empty_caption",  # only whitespace
    "bad_member",  # reported by the tar reader: a shard member it could not read
    "truncated_tar",  # reported by the tar reader: a shard that ends mid-member
)

EXIF_ORIENTATION = 0x0112  # the EXIF tag; PIL.ImageOps.exif_transpose applies it on decode
TURNED = (5, 6, 7, 8)  # orientations that turn the image a quarter: the shown width is the stored height


@dataclasses.dataclass(frozen=True)
class Options:
    """How raw records become examples.

    size: output side in pixels (shorter side resized to it, then a square crop).
    min_size: skip images whose shorter side is below it (0 = keep all).
    max_aspect_ratio: skip images with long / short above it (0 = keep all).
    random_crop: a random square along the long side (seeded per record and epoch) instead of
        the centre one.
    seed: seeds random crops and the choice among several captions.
    """

    size: int
    min_size: int = 0
    max_aspect_ratio: float = 0.0
    random_crop: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0 (0 = off), got {self.min_size}")
        if self.max_aspect_ratio != 0 and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be 0 (off) or >= 1, got {self.max_aspect_ratio}")


def example(record: dict[str, Any], options: Options, epoch: int = 0) -> dict[str, Any]:
    """One raw record {"key", "image", "caption", "skip"(, "aesthetic_score")} -> {"image": uint8 [S, S, 3],
    "caption", "key", "skip", "original_size", "crop_top_left", "aesthetic_score"} (module docstring).

    `skip` is "" for a good example; otherwise one of SKIP_KINDS (or the reader's own kind), the
    image and micro-conditions are zeros and the score NaN. `epoch` varies the random crop and the
    caption drawn from a sequence.
    """
    if PIL.ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would "
                           "be decoded half grey instead of skipped; leave it False")
    key = str(record.get("key", ""))
    if record.get("skip"):
        return _skipped(key, str(record["skip"]), options.size)
    rng = _rng(options.seed, key, epoch)
    caption, kind = _caption(record.get("caption"), rng)
    if kind:
        return _skipped(key, kind, options.size)
    try:
        img = _open(record.get("image"))
        width, height = img.size  # as stored (the size checks below hold whatever the EXIF orientation)
    except Exception:  # noqa: BLE001  (whatever the bytes are, the record is skipped)
        return _skipped(key, "corrupt_image", options.size)
    short, long = min(width, height), max(width, height)
    if short < max(options.min_size, 1):
        return _skipped(key, "small_image", options.size)
    if options.max_aspect_ratio and long / short > options.max_aspect_ratio:
        return _skipped(key, "aspect_ratio", options.size)
    try:
        # JPEG: decode at the smallest 1/2^k scale still at least `size` on the short side.
        scale = options.size / short
        img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()  # decodes everything now: a truncated file raises here
        img, turned = upright(img)
        img = to_rgb(img)
    except Exception:  # noqa: BLE001
        return _skipped(key, "corrupt_image", options.size)
    if turned:
        width, height = height, width
    box = _crop_box(width, height, options, rng)
    crop_top_left = _resized_offset(box, width, height, options.size)
    sx, sy = img.width / width, img.height / height  # < 1 when draft decoded at a reduced scale
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    # One antialiased resize of the crop box (reducing_gap: a box reduction first, then bicubic).
    out = img.resize((options.size, options.size), PIL.Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return {"image": np.asarray(out, np.uint8), "caption": caption, "key": key, "skip": "",
            "original_size": np.array([width, height], np.int32), "crop_top_left": crop_top_left,
            "aesthetic_score": aesthetic_score(record.get("aesthetic_score"))}


def aesthetic_score(value) -> np.float32:
    """A record's aesthetic score as float32: a real number or numeric text; NaN for anything else
    (None, booleans, other text, NaN, or beyond float32's range)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, str, bytes)):
        return np.float32(np.nan)
    try:
        score = float(value)
    except (ValueError, OverflowError):
        return np.float32(np.nan)
    return np.float32(score) if abs(score) <= float(np.finfo(np.float32).max) else np.float32(np.nan)


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB: alpha (and palette transparency) composited on white, 16-bit scaled to 8."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith(("I", "F")):  # 16/32-bit integer or float grey
        a = np.asarray(img, np.float64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        return PIL.Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def upright(img: PIL.Image.Image) -> tuple[PIL.Image.Image, bool]:
    """`img` as it is meant to be shown, its EXIF orientation applied (phone photos are often stored
    on their side), and whether that turned it a quarter (its width is the stored height)."""
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in range(2, 9):  # 1: as stored (exif_transpose would only copy it)
        return img, False
    return PIL.ImageOps.exif_transpose(img), orientation in TURNED


def _open(image) -> PIL.Image.Image:
    """Encoded bytes or a uint8 array [H, W], [H, W, 1|3|4] -> a PIL image (not yet decoded)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"image array {image.dtype}{list(image.shape)}: expected uint8 [H, W(, 1|3|4)]")
        return PIL.Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise ValueError(f"no image bytes ({type(image).__name__})")
    return PIL.Image.open(io.BytesIO(image))


def _crop_box(width: int, height: int, options: Options, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """The square (left, top, right, bottom) of side min(width, height): centred, or random along the long side."""
    short = min(width, height)
    spare = max(width, height) - short
    offset = int(rng.integers(spare + 1)) if options.random_crop else spare / 2
    left, top = (offset, 0) if width > height else (0, offset)
    return left, top, left + short, top + short


def _resized_offset(box: tuple[float, float, float, float], width: int, height: int, size: int) -> np.ndarray:
    """int32 [2] (top, left) of `box` (original pixels) in the image resized to shorter side `size`."""
    short, long = min(width, height), max(width, height)
    largest = size * long // short - size  # torchvision's resized long side is int(size * long / short)
    # An offset is a whole or half pixel: 2 * offset is exact; floor(offset * size / short + 1/2) in integers.
    return np.array([min((int(2 * o) * size + short) // (2 * short), largest) for o in (box[1], box[0])], np.int32)


def _caption(value, rng: np.random.Generator) -> tuple[str, str]:
    """(caption, "") or ("", skip kind); from a sequence one non-empty caption is drawn with `rng`."""
    if value is None:
        return "", "missing_caption"
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            return "", "missing_caption"
        texts = [t for t in (_text(v) for v in value) if t]
        if not texts:
            return "", "empty_caption"
        return texts[int(rng.integers(len(texts)))], ""
    text = _text(value)
    return (text, "") if text else ("", "empty_caption")


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace").strip()
    if isinstance(value, str):
        return value.strip()
    raise TypeError(f"caption of type {type(value).__name__}: expected str, bytes or a sequence of them "
                    "(does config.data.caption_key name a text field?)")


def _rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """A generator that depends only on (seed, record key, epoch): not on order, process or worker."""
    digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed) % 2**63, int(epoch), digest])


def _skipped(key: str, kind: str, size: int) -> dict[str, Any]:
    """A placeholder of the same structure as a good example, with `skip` set."""
    return {"image": np.zeros((size, size, 3), np.uint8), "caption": "", "key": key, "skip": kind,
            "original_size": np.zeros(2, np.int32), "crop_top_left": np.zeros(2, np.int32),
            "aesthetic_score": np.float32(np.nan)}
