"""A prepared tfds dataset (array_record) as a map-style image-text source, without TensorFlow.

    src = tfds_captions.TfdsSource("coco_captions", split="train", data_dir="/data/tfds",
                                   image_key="image", caption_key="captions/text")
    src[0] == {"key": "coco_captions/train/0", "image": b"\\xff\\xd8...", "caption": [b"A man ...", ...],
               "aesthetic_score": None, "skip": ""}

The dataset must already be prepared in array_record format under `data_dir` (nothing is
downloaded); it is opened from its files (`dataset_info.json`), so no builder code is imported.
Keys may be nested with "/" (`captions/text` = the `text` of the `captions` sequence) and may
contain "/" themselves (`image/filename`); empty keys name the common layout: image "image",
caption the first of CAPTION_KEYS the dataset has (coco_captions: "captions/text"). Image
features come back as their encoded bytes, so that a corrupt image is skipped by
`preprocess.example` instead of failing here; a caption sequence comes back whole (preprocess
draws one per example and epoch). With an `aesthetic_key`, that feature's value comes back as
"aesthetic_score" (preprocess makes NaN of anything not a number); without one, None.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

IMAGE_KEY = "image"  # the image feature when config.data.image_key is ""
CAPTION_KEYS = ("captions/text", "caption", "text")  # for an empty caption_key: the first the dataset has


def _children(feature):
    """The sub-features of a FeaturesDict, or of a Sequence of one; None for a leaf."""
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return feature if isinstance(feature, tfds.features.FeaturesDict) else None


def _resolve(features, key: str) -> tuple[str, ...] | None:
    """The path of dict keys naming `key` ("a/b/c"), preferring the longest existing name at each level."""
    parts = key.split("/")
    for i in range(len(parts), 0, -1):
        head, rest = "/".join(parts[:i]), "/".join(parts[i:])
        if head not in features.keys():
            continue
        if not rest:
            return (head,)
        sub = _children(features[head])
        found = _resolve(sub, rest) if sub is not None else None
        if found:
            return (head, *found)
    return None


def _names(features, prefix: str = "") -> list[str]:
    """Every leaf feature's full key, for error messages."""
    out = []
    for k in features.keys():
        sub = _children(features[k])
        out += _names(sub, f"{prefix}{k}/") if sub is not None else [prefix + k]
    return out


def _feature(features, path: tuple[str, ...]):
    """The feature at a path `_resolve` found."""
    for k in path:
        features = _children(features)[k]
    return features


def _get(example, path: tuple[str, ...]):
    for k in path:
        example = example[k]
    return example


class TfdsSource:
    """Split `split` of the prepared tfds dataset `name` as raw records (key, image, caption, aesthetic_score, skip)."""

    def __init__(self, name: str, *, split: str, data_dir: str, image_key: str, caption_key: str,
                 split_field: str = "config.data.tfds_train_split", aesthetic_key: str = ""):
        try:
            builder = read_only_builder.builder_from_files(name, data_dir=data_dir or None)
        except Exception as e:  # noqa: BLE001  (tfds raises several kinds for "not there")
            where = data_dir or "tfds's default data dir"
            raise FileNotFoundError(f"config.data.tfds_name: no prepared dataset {name!r} in {where} "
                                    f"(config.data.tfds_data_dir); prepare it first with tfds in array_record "
                                    f"format ({type(e).__name__}: {e})") from None
        features = builder.info.features
        image_key = image_key or IMAGE_KEY
        if not caption_key:
            caption_key = next((k for k in CAPTION_KEYS if _resolve(features, k)), CAPTION_KEYS[0])
        self.image_path = _resolve(features, image_key)
        self.caption_path = _resolve(features, caption_key)
        self.aesthetic_path = _resolve(features, aesthetic_key) if aesthetic_key else ()
        for field, key, path in (("image_key", image_key, self.image_path), ("caption_key", caption_key, self.caption_path),
                                 ("aesthetic_key", aesthetic_key, self.aesthetic_path)):
            if path is None:
                raise ValueError(f"config.data.{field}: no feature {key!r} in {name}; its features: "
                                 f"{', '.join(_names(features))}")
        caption_feature = _feature(features, self.caption_path)
        if isinstance(caption_feature, tfds.features.Sequence):
            caption_feature = caption_feature.feature
        if not isinstance(caption_feature, tfds.features.Text):
            raise ValueError(f"config.data.caption_key: feature {caption_key!r} of {name} is "
                             f"{type(caption_feature).__name__}, not Text (or a sequence of Text)")
        image_feature = _feature(features, self.image_path)
        pixels = (isinstance(image_feature, tfds.features.Tensor) and len(image_feature.shape) in (2, 3)
                  and image_feature.np_dtype == np.uint8)  # a decoded uint8 image [H, W(, C)]
        if not (isinstance(image_feature, tfds.features.Image) or pixels):
            raise ValueError(f"config.data.image_key: feature {image_key!r} of {name} is "
                             f"{type(image_feature).__name__}, not an Image")
        splits = list(builder.info.splits.keys())
        if split.split("[")[0] not in splits:
            raise ValueError(f"{split_field}: no split {split!r} in {name}; its splits: {', '.join(splits)}")
        decoders = None
        if isinstance(image_feature, tfds.features.Image):
            decoders = {}
            d = decoders
            for k in self.image_path[:-1]:
                d = d.setdefault(k, {})
            d[self.image_path[-1]] = tfds.decode.SkipDecoding()  # encoded bytes: decoded by preprocess
        try:
            self._data = builder.as_data_source(split=split, decoders=decoders)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"config.data.tfds_name: cannot read {name!r} split {split!r} as array_record "
                             f"(prepare it with file_format='array_record'): {type(e).__name__}: {e}") from None
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, i: int) -> dict:
        ex = self._data[i]
        return {"key": f"{self.name}/{self.split}/{i}", "image": _get(ex, self.image_path),
                "caption": _get(ex, self.caption_path),
                "aesthetic_score": _get(ex, self.aesthetic_path) if self.aesthetic_path else None, "skip": ""}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, image={self.image_path}, caption={self.caption_path})"
