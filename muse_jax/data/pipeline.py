"""Grain input pipelines: sources, per-process sharding, shuffling, batching.

Every example leaving a source is made canonical by `Canonicalize`:
  index int64, image uint8 [64, 64, 3], caption str, attributes str (JSON).
Loaders return grain `DataLoader`s whose iterators have `get_state()`/`set_state()`,
so the data position is saved in checkpoints with the model.
"""
from __future__ import annotations

import pathlib
from typing import Any, Sequence

import grain.python as grain
import jax
import numpy as np

from muse_jax.data import shapes


class Canonicalize(grain.MapTransform):
    """bytes -> str for text fields; numpy types for the rest."""

    def map(self, ex: dict[str, Any]) -> dict[str, Any]:
        out = dict(ex)
        for key in ("caption", "attributes"):
            if isinstance(out.get(key), bytes):
                out[key] = out[key].decode("utf-8")
        out["index"] = np.int64(out["index"])
        out["image"] = np.asarray(out["image"], np.uint8)
        return out


def make_source(data_config, split: str, data_dir: str | pathlib.Path | None = None):
    """The random-access source of `split` described by `config.data`.

    `source="tfds"` builds the array_record dataset under `data_dir` once and reads it;
    `source="procedural"` renders examples on the fly. Both give identical examples.
    """
    if data_config.name != "shapes":
        raise ValueError(f"unknown dataset {data_config.name!r}; this build knows 'shapes'")
    num = {"train": data_config.num_train, "test": data_config.num_test}.get(split)
    if num is None:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    if data_config.source == "procedural":
        return shapes.ShapesSource(split, num, data_config.seed)
    if data_config.source == "tfds":
        if data_dir is None:
            raise ValueError("source='tfds' needs a data_dir to build the dataset in")
        from muse_jax.data import tfds_shapes  # tfds import is slow; only when used

        b = tfds_shapes.prepare(data_dir, data_config.num_train, data_config.num_test, data_config.seed)
        return b.as_data_source(split=split)
    raise ValueError(f"unknown data source {data_config.source!r}; expected 'tfds' or 'procedural'")


def process_shard() -> grain.ShardOptions:
    """This process's shard of every split (each process reads only its own)."""
    return grain.ShardOptions(
        shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True
    )


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """The global batch divided over processes; refuses sizes that do not divide."""
    n = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(
            f"global batch size {global_batch_size} does not divide over {n} processes"
        )
    return global_batch_size // n


def make_loader(
    source,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_options: grain.ShardOptions | None = None,
    operations: Sequence[grain.Transformation] = (),
    drop_remainder: bool = True,
    worker_count: int = 0,
) -> grain.DataLoader:
    """A grain loader over `source`: canonical examples, `operations`, then batches.

    `batch_size` is this process's batch; `num_epochs=None` repeats forever.
    `shard_options` defaults to this process's shard (`process_shard()`).
    """
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard_options or process_shard(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    ops = [Canonicalize(), *operations, grain.Batch(batch_size, drop_remainder=drop_remainder)]
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=ops, worker_count=worker_count
    )
