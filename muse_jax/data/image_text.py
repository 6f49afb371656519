"""Real image-text data for training: the sources of `config.data`, and full batches with counted skips.

    ds = image_text.make_dataset(config.data, "train", image_size=256, seed=0)    # grain.IterDataset
    batches = image_text.Batches(ds, batch_size=per_process_batch)
    batch = next(batches)     # {"image": uint8 [B, 256, 256, 3], "caption": object array [B] of str,
                              #  "original_size", "crop_top_left": int32 [B, 2], "aesthetic_score": float32 [B]}
    batches.metrics()         # {"data/skipped/corrupt_image": 3, ...}: for logs and TensorBoard
    state = batches.get_state()   # bytes; also saved by grain's orbax handler (CheckpointSave(batches))

`config.data.source` (sections made by muse_jax/configs/data.py):
  "folder"      train_files / eval_files: folders with captions.jsonl ({"file", "caption"} lines),
                as `muse-jax data shapes --out` writes them
  "parquet"     train_files / eval_files: parquet files (patterns: paths.expand); columns image_key
                (binary, or Hugging Face's {"bytes", "path"} struct) and caption_key
                ("": "image", and "text" or else "caption")
  "tfds"        tfds_name prepared (array_record) under tfds_data_dir; splits tfds_train_split /
                tfds_eval_split; image_key / caption_key may be nested ("": "image", "captions/text")
  "webdataset"  train_files / eval_files: tar shards, read by muse_jax.data.webdataset
                (caption_key: the field of a sample's .json without a .txt; "": "caption")
An empty image_key / caption_key means the common layout of the source, so that overriding
`config.data.source` alone on the command line works. `aesthetic_key` names the aesthetic score
of each record in any source: a parquet column, a field of webdataset's .json or of captions.jsonl
lines, a tfds feature ("" = none: every score is NaN, as is a missing or non-numeric one).
The shapes dataset (`config.data.name == "shapes"`) is read by `sources.make_source` instead, and
refused here.

Map-style sources (folder, parquet, tfds): each process reads its own disjoint share (record i of
the folder or tfds split when i % process_count == process_index; parquet: every process_count-th
row group), in an order shuffled anew each epoch, forever for "train" and one pass in file order
for the eval split (or for any split with `ordered=True`). Decoding runs in `config.data.workers`
grain worker processes (0: in this process's reading threads). A bad record reaches `Batches` as
a placeholder with its skip kind, where it is dropped and counted, so that every batch is full
and the position exact.
"""
from __future__ import annotations

import functools
import json
import logging
from typing import Any

import grain
import numpy as np

from muse_jax import paths
from muse_jax.configs import data as data_config
from muse_jax.data import files as files_lib
from muse_jax.data import preprocess, sources

log = logging.getLogger(__name__)

SOURCES = data_config.SOURCES  # the real-data sources, as muse_jax/configs/data.py names them
# Fields each source needs (besides the split's files or tfds split); "" = not given.
REQUIRED = {
    "folder": (),
    "parquet": (),
    "tfds": ("tfds_name",),
    "webdataset": (),
}
# Threads reading and decoding ahead, in this process or in each worker process.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


def _field(data_config, name: str, source: str):
    if name not in data_config:
        raise ValueError(f"config.data.{name}: missing (start from muse_jax/configs/data.py, "
                         f"get_config({source!r}))")
    return data_config[name]


def _required(data_config, name: str, source: str):
    value = _field(data_config, name, source)
    if value in ("", None, ()) or value == []:
        raise ValueError(f"config.data.{name} must be given for source={source!r} "
                         f"(--config.data.{name}=...)")
    return value


def _split_kind(split: str) -> str:
    if split == "train":
        return "train"
    if split in ("eval", "test"):
        return "eval"
    raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval' ('test' = 'eval')")


def _files(data_config, kind: str, source: str) -> tuple[list[str], str]:
    """The files (or folders) of the split, and the config field that names them."""
    name = f"{kind}_files"
    patterns = _required(data_config, name, source)
    try:
        return paths.expand(patterns), f"config.data.{name}"
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.data.{name}: {e}") from None


def options_from_config(data_config, *, image_size: int | None = None, seed: int | None = None) -> preprocess.Options:
    """`preprocess.Options` from config.data (image_size and seed given here win)."""
    try:
        return preprocess.Options(
            size=int(_field(data_config, "image_size", data_config.source) if image_size is None else image_size),
            min_size=int(data_config.get("min_size", 0)),
            max_aspect_ratio=float(data_config.get("max_aspect_ratio", 0.0)),
            random_crop=bool(data_config.get("random_crop", False)),
            seed=int(_field(data_config, "shuffle_seed", data_config.source) if seed is None else seed),
        )
    except ValueError as e:
        raise ValueError(f"config.data: {e}") from None


def make_dataset(data_config, split: str, *, image_size: int | None = None, seed: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 ordered: bool = False) -> grain.IterDataset:
    """This process's preprocessed examples of `split` ("train": forever; "eval"/"test": one pass).

    Examples: {"image": uint8 [S, S, 3], "caption": str, "key": str, "skip": "" | kind, and the
    micro-conditions "original_size", "crop_top_left": int32 [2], "aesthetic_score": float32
    (preprocess's module docstring)}; bad records keep their place with `skip` set (`Batches`
    drops and counts them). `image_size` defaults to config.data.image_size, `seed` to
    config.data.shuffle_seed, the process to JAX's. `ordered`: one pass in a fixed order whatever
    the split (the eval split's order; webdataset: no shuffle buffer), for jobs that read a split
    once, such as `muse-jax data tokenize`.
    """
    if sources.is_shapes(data_config):
        raise ValueError("config.data.name='shapes' is read by muse_jax.data.sources.make_source, not image_text")
    if "source" not in data_config:
        raise ValueError("config.data.source: missing (start from muse_jax/configs/data.py)")
    source = data_config.source
    if source not in SOURCES:
        raise ValueError(f"config.data.source: unknown source {source!r}; expected one of {SOURCES}")
    for name in REQUIRED[source]:
        _required(data_config, name, source)
    kind = _split_kind(split)
    one_pass = ordered or kind != "train"
    options = options_from_config(data_config, image_size=image_size, seed=seed)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    workers = int(_field(data_config, "workers", source))
    aesthetic_key = data_config.get("aesthetic_key", "")

    if source == "webdataset":
        from muse_jax.data import webdataset

        files, _ = _files(data_config, kind, source)
        shuffle_buffer = 0 if ordered else int(_field(data_config, "shuffle_buffer", source))
        ds = webdataset.dataset(files, seed=options.seed, shuffle_buffer=shuffle_buffer,
                                process_index=process_index, process_count=process_count,
                                caption_key=data_config.caption_key, aesthetic_key=aesthetic_key,
                                num_epochs=1 if one_pass else None)
        ds = ds.map(functools.partial(preprocess.example, options=options))
    else:
        records, block_sizes = _map_source(data_config, source, kind, process_index, process_count, aesthetic_key)
        if len(records) == 0:
            raise ValueError(f"config.data: process {process_index} of {process_count} has no {split} records "
                             f"(source={source!r})")
        ds = _ordered(records, block_sizes, "eval" if one_pass else kind, options.seed)
        ds = ds.map_with_index(functools.partial(_prepare, options=options, epoch_length=len(records)))
        ds = ds.to_iter_dataset(READ_OPTIONS)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # mp_prefetch reads grain's absl flags; argparse CLIs never parse them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


def _map_source(data_config, source: str, kind: str, process_index: int, process_count: int,
                aesthetic_key: str) -> tuple[grain.MapDataset, list[int] | None]:
    """This process's share of the split's raw records (folder, parquet or tfds), and for parquet
    the rows of each of its row groups (None: records may be read in any order)."""
    if source == "tfds":
        from muse_jax.data import tfds_captions  # tfds import is slow; only when used

        split_field = f"tfds_{kind}_split"
        records = tfds_captions.TfdsSource(
            data_config.tfds_name, split=_required(data_config, split_field, source),
            data_dir=_field(data_config, "tfds_data_dir", source), image_key=data_config.image_key,
            caption_key=data_config.caption_key, split_field=f"config.data.{split_field}", aesthetic_key=aesthetic_key)
        return grain.MapDataset.source(records)[process_index::process_count], None
    files, field = _files(data_config, kind, source)
    if source == "folder":
        try:
            records = files_lib.FolderSource(files, aesthetic_key)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{field}: {e}") from None
        return grain.MapDataset.source(records)[process_index::process_count], None
    records = files_lib.ParquetSource(files, image_key=data_config.image_key, caption_key=data_config.caption_key,
                                      process_index=process_index, process_count=process_count, field=field,
                                      aesthetic_key=aesthetic_key)
    return grain.MapDataset.source(records), records.block_sizes


def _ordered(records: grain.MapDataset, block_sizes: list[int] | None, kind: str, seed: int) -> grain.MapDataset:
    """Train: shuffled anew every epoch (row group by row group for parquet), repeated forever;
    eval: one pass in order."""
    if kind != "train":
        return records
    if block_sizes is not None:
        shuffled = files_lib.BlockShuffle(records, block_sizes, seed)
    else:
        shuffled = records.shuffle(seed=seed % 2**32)
    return shuffled.repeat()


def _prepare(index: int, record: dict, *, options: preprocess.Options, epoch_length: int) -> dict:
    """preprocess.example with the epoch of this position (varies random crops and drawn captions)."""
    return preprocess.example(record, options, epoch=index // epoch_length)


class Batches:
    """Full batches of good examples from an image-text dataset; bad ones dropped and counted.

    A batch: {"image": uint8 [B, S, S, 3], "caption": object [B] of str, "original_size": int32 [B, 2]
    (width, height), "crop_top_left": int32 [B, 2] (top, left), "aesthetic_score": float32 [B] (NaN:
    none)}; the micro-conditions as preprocess's module docstring defines them.

    Examples are pulled one at a time and batched here, so that `get_state` is exact at every
    batch boundary: a restored `Batches` continues with exactly the next example, skip totals kept.
    It follows grain's orbax handler protocol for non-DatasetIterator items (get_state -> bytes,
    set_state(bytes), start_prefetch), so `grain.checkpoint.CheckpointSave(batches)` saves it.
    When the dataset ends (eval), the last partial batch is returned, then StopIteration.
    `max_consecutive_skips` bad examples in a row (a wrong image_key, say) raise RuntimeError
    instead of looping forever.
    """

    def __init__(self, dataset: grain.IterDataset, batch_size: int, *, max_consecutive_skips: int = 10_000):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.max_consecutive_skips = max_consecutive_skips
        self._consecutive = 0
        self._it = iter(dataset)
        self.skipped: dict[str, int] = {}
        self._done = False

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        images, captions, sizes, crops, scores = [], [], [], [], []
        while len(images) < self.batch_size and not self._done:
            try:
                ex = next(self._it)
            except StopIteration:
                self._done = True
                break
            if ex["skip"]:
                self._count(ex["skip"], ex.get("key", ""))
                continue
            self._consecutive = 0
            images.append(ex["image"])
            captions.append(ex["caption"])
            sizes.append(ex["original_size"])
            crops.append(ex["crop_top_left"])
            scores.append(ex["aesthetic_score"])
        if not images:
            raise StopIteration
        caption_array = np.empty(len(captions), object)
        caption_array[:] = captions
        return {"image": np.stack(images), "caption": caption_array,
                "original_size": np.stack(sizes).astype(np.int32), "crop_top_left": np.stack(crops).astype(np.int32),
                "aesthetic_score": np.asarray(scores, np.float32)}

    def _count(self, kind: str, key: str) -> None:
        if kind not in self.skipped:
            log.warning("skipping example %s: %s (the first one; totals are logged as data/skipped/%s)",
                        key, kind, kind)
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive_skips:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            raise RuntimeError(f"the last {self._consecutive} examples were all skipped (skipped so far by kind: "
                               f"{kinds}; see preprocess.SKIP_KINDS); check config.data.image_key / caption_key, "
                               "min_size / max_aspect_ratio and the files")

    def metrics(self) -> dict[str, int]:
        """Skip totals so far, every kind: {"data/skipped/<kind>": count}."""
        kinds = list(preprocess.SKIP_KINDS) + sorted(set(self.skipped) - set(preprocess.SKIP_KINDS))
        return {f"data/skipped/{k}": self.skipped.get(k, 0) for k in kinds}

    def get_state(self) -> bytes:
        state: dict[str, Any] = {"examples": self._it.get_state(), "skipped": self.skipped, "done": self._done}
        return json.dumps(state).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        state = json.loads(state)
        self._it.set_state(state["examples"])
        self.skipped = {k: int(v) for k, v in state["skipped"].items()}
        self._done = bool(state.get("done", False))

    def start_prefetch(self) -> None:
        self._it.start_prefetch()

    def close(self) -> None:
        self._it.close()
