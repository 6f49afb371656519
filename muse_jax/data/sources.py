"""Random-access data sources (grain's `RandomAccessDataSource` protocol: `len`, `[i]`, a stable repr).

Every example leaving `make_source` is canonical:
  index int64, image uint8 [64, 64, 3], caption str, attributes str (JSON).
`ArraySource` serves equally long numpy arrays (token caches, synthetic data).
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from muse_jax.data import shapes


def canonical_example(ex: dict[str, Any]) -> dict[str, Any]:
    """bytes -> str for text fields; numpy types for the rest."""
    out = dict(ex)
    for key in ("caption", "attributes"):
        if isinstance(out.get(key), bytes):
            out[key] = out[key].decode("utf-8")
    out["index"] = np.int64(out["index"])
    out["image"] = np.asarray(out["image"], np.uint8)
    return out


class CanonicalSource:
    """`source` with every example passed through `canonical_example`."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i) -> dict[str, Any]:
        return canonical_example(self.source[i])

    def __repr__(self) -> str:
        return f"CanonicalSource({self.source!r})"


class ArraySource:
    """Random-access source over equally long numpy arrays: record i = {k: a[i]}."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays of different lengths: {lengths}")
        self.arrays = arrays
        self._len = next(iter(lengths.values()))

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}

    def __repr__(self):
        # grain compares repr(source) when restoring an iterator: the default repr holds the
        # object's address, so a restarted process could never resume. Keys and shapes only.
        fields = ", ".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in sorted(self.arrays.items()))
        return f"ArraySource({fields})"


SHAPES_BUILT = ("array_record", "tfds")  # the shapes dataset built once; "tfds": its earlier name


def is_shapes(data_config) -> bool:
    """The embedded shapes dataset (`config.data.name == "shapes"`, read by `make_source`), else real
    image-text data (muse_jax/configs/data.py, read by muse_jax/data/image_text.py)."""
    return data_config.get("name") == "shapes"


def make_source(data_config, split: str, data_dir: str | pathlib.Path | None = None):
    """The random-access source of `split` described by `config.data` (canonical examples).

    `source="array_record"` builds the dataset (tfds's builder, array_record files) under `data_dir`
    once and reads it; `source="procedural"` renders examples on the fly. Both give identical examples.
    "tfds", the older name of "array_record" (in older workdirs' configs), reads the same.
    """
    if not is_shapes(data_config):
        raise ValueError(f"unknown dataset {data_config.name!r}; this build knows 'shapes'")
    num = {"train": data_config.num_train, "test": data_config.num_test}.get(split)
    if num is None:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if data_config.source == "procedural":
        return CanonicalSource(shapes.ShapesSource(split, num, data_config.seed))
    if data_config.source in SHAPES_BUILT:
        if data_dir is None:
            raise ValueError(f"source={data_config.source!r} needs a data_dir to build the dataset in")
        from muse_jax.data import tfds_shapes  # tfds import is slow; only when used

        b = tfds_shapes.prepare(data_dir, data_config.num_train, data_config.num_test, data_config.seed)
        return CanonicalSource(b.as_data_source(split=split))
    raise ValueError(f"unknown shapes source {data_config.source!r}; expected 'array_record' or 'procedural'")
