"""The grain loader: per-process sharding, shuffling, batching, a checkpointable position.

    loader = make_loader(source, batch_size=per_process_batch_size(global_batch), seed=0)
    it = iter(loader)                  # it.get_state() / it.set_state(): saved in every checkpoint
    batch = next(it)                   # dict of numpy arrays [batch_size, ...]

Each process reads only its own shard of the records (`process_shard`).
"""
from __future__ import annotations

from collections.abc import Sequence

import grain.python as grain
import jax


def process_shard() -> grain.ShardOptions:
    """This process's shard of every split (each process reads only its own)."""
    return grain.ShardOptions(shard_index=jax.process_index(), shard_count=jax.process_count(), drop_remainder=True)


def per_process_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """The global batch divided over processes; refuses sizes that do not divide."""
    n = jax.process_count() if process_count is None else process_count
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} does not divide over {n} processes")
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
    """A grain loader over `source`: `operations`, then batches of `batch_size` (this process's).

    `num_epochs=None` repeats forever; `shard_options` defaults to this process's shard.
    """
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard_options or process_shard(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    ops = [*operations, grain.Batch(batch_size, drop_remainder=drop_remainder)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=worker_count)
