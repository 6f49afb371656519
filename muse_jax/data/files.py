"""Map-style image-text sources over files: a folder with `captions.jsonl`, and parquet files.

Both serve raw records {"key": str, "image": bytes | None, "caption": str | None, "aesthetic_score",
"skip": str} for `preprocess.example`; an image file that cannot be read gives skip
"missing_image_file". "aesthetic_score" is the `aesthetic_key` field of the captions.jsonl line or
the `aesthetic_key` column's value as stored (None without one; preprocess makes NaN of anything
not a number).

    FolderSource(["data/train"])   # DIR/captions.jsonl lines {"file": "000001.png", "caption": "..."}
    ParquetSource(files, image_key="image", caption_key="text", process_index=0, process_count=1)

Parquet images are a binary column or Hugging Face's Image struct {"bytes", "path"}. When bytes
is null (`datasets`' `cast_column("image", Image())` of file paths, then `to_parquet`), the image
is read from the path: relative to the parquet file's folder, or absolute. Empty keys name the
common layout: image column "image", caption column "text" or else "caption".

Parquet is read one row group at a time, so a global shuffle (one row group read per record)
would be slow: `BlockShuffle` orders the records row group by row group instead.
"""
from __future__ import annotations

import bisect
import collections
import json
import os
import threading

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_jax import paths

CAPTIONS_FILE = "captions.jsonl"  # the layout `muse-jax data shapes --out` writes
WINDOW_BLOCKS = 8  # BlockShuffle mixes the rows of this many row groups at a time
MISSING_IMAGE_FILE = "missing_image_file"  # the skip kind of an image file that cannot be read
IMAGE_COLUMN = "image"  # the image column when config.data.image_key is ""
CAPTION_COLUMNS = ("text", "caption")  # the caption column when config.data.caption_key is "": the first present


class FolderSource:
    """Images named by `captions.jsonl` in one or more folders (local or remote), in file order.

    `folders`: directories holding captions.jsonl, or the jsonl files themselves; `aesthetic_key`:
    the lines' field of the aesthetic score ("" = none).
    """

    def __init__(self, folders: list[str], aesthetic_key: str = ""):
        self.entries: list[tuple[str, str, str | None, object]] = []  # (folder, file, caption, aesthetic score)
        for folder in folders:
            index = paths.as_path(folder)
            if not str(index).endswith(".jsonl"):
                index = index / CAPTIONS_FILE
            if not index.is_file():
                raise FileNotFoundError(f"no {CAPTIONS_FILE} in {folder}")
            root = str(index.parent)
            for n, line in enumerate(index.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    name = entry["file"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{index}:{n}: expected a JSON object with a 'file' field, got {line[:200]!r}") from None
                score = entry.get(aesthetic_key) if aesthetic_key else None
                self.entries.append((root, name, entry.get("caption"), score))
        self._folders = tuple(folders)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        root, name, caption, aesthetic = self.entries[i]
        try:
            image, skip = (paths.as_path(root) / name).read_bytes(), ""
        except OSError:
            image, skip = None, MISSING_IMAGE_FILE
        return {"key": f"{root}/{name}", "image": image, "caption": caption, "aesthetic_score": aesthetic, "skip": skip}

    def __repr__(self) -> str:
        return f"FolderSource({list(self._folders)}, {len(self)} records)"


def _image_column(schema: pa.Schema, key: str, path: str) -> str:
    """How the image column is stored: "binary" or "struct" (Hugging Face's {"bytes", "path"})."""
    if key not in schema.names:
        raise ValueError(f"config.data.image_key: no column {key!r} in {path}; its columns: {', '.join(schema.names)}")
    t = schema.field(key).type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "struct"
    raise ValueError(f"config.data.image_key: column {key!r} of {path} is {t}; expected binary image bytes "
                     "or a struct with a 'bytes' field (Hugging Face Image)")


def _check_caption_column(schema: pa.Schema, key: str, path: str) -> None:
    if key not in schema.names:
        raise ValueError(f"config.data.caption_key: no column {key!r} in {path}; its columns: {', '.join(schema.names)}")
    t = schema.field(key).type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type  # several captions per image: one is drawn per epoch
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise ValueError(f"config.data.caption_key: column {key!r} of {path} is {schema.field(key).type}; "
                         "expected text (or a list of texts)")


def _caption_column(schema: pa.Schema, path: str) -> str:
    """The caption column of the common layouts (CAPTION_COLUMNS), for an empty config.data.caption_key."""
    for name in CAPTION_COLUMNS:
        if name in schema.names:
            return name
    raise ValueError(f"config.data.caption_key: none of the columns {', '.join(CAPTION_COLUMNS)} in {path}; "
                     f"name the caption column (its columns: {', '.join(schema.names)})")


def _check_aesthetic_column(schema: pa.Schema, key: str, path: str) -> None:
    if key not in schema.names:
        raise ValueError(f"config.data.aesthetic_key: no column {key!r} in {path}; "
                         f"its columns: {', '.join(schema.names)}")


def _parquet_file(path: str) -> pq.ParquetFile:
    return pq.ParquetFile(paths.as_path(path).open("rb") if paths.is_remote(path) else path)


class ParquetSource:
    """Rows of parquet files: this process's share is every process_count-th row group.

    Record i is row i of this process's row groups, concatenated in file order.
    `block_sizes` (rows per row group) lets `BlockShuffle` read them a few at a time; `field`
    names the config field of `files` in errors. Empty image / caption keys: the common layout
    (module docstring), looked up in the first file; an empty `aesthetic_key`: no score column.
    """

    def __init__(self, files: list[str], *, image_key: str, caption_key: str, process_index: int, process_count: int,
                 field: str = "config.data.train_files", aesthetic_key: str = ""):
        self.files = list(files)
        if not caption_key and self.files:
            caption_key = _caption_column(_parquet_file(self.files[0]).schema_arrow, self.files[0])
        self.image_key, self.caption_key, self.aesthetic_key = image_key or IMAGE_COLUMN, caption_key, aesthetic_key
        groups = []  # (file index, row group, first row in the file, rows)
        self._image_kind = None
        for f, path in enumerate(self.files):
            meta = _parquet_file(path).metadata
            schema = meta.schema.to_arrow_schema()
            kind = _image_column(schema, self.image_key, path)
            if self._image_kind not in (None, kind):
                raise ValueError(f"config.data.image_key: column {self.image_key!r} is {kind} in {path} but "
                                 f"{self._image_kind} in {self.files[0]}")
            self._image_kind = kind
            _check_caption_column(schema, self.caption_key, path)
            if self.aesthetic_key:
                _check_aesthetic_column(schema, self.aesthetic_key, path)
            first = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                groups.append((f, g, first, rows))
                first += rows
        if len(groups) < process_count:
            raise ValueError(f"{field}: {len(groups)} parquet row groups in {len(self.files)} files "
                             f"cannot be shared by {process_count} processes; write the files with smaller "
                             "row groups (pyarrow.parquet.write_table(..., row_group_size=N))")
        self._groups = groups[process_index::process_count]
        self.block_sizes = [rows for *_, rows in self._groups]
        self._starts = np.cumsum([0] + self.block_sizes[:-1]).tolist()
        self._len = int(sum(self.block_sizes))
        self._process = (process_index, process_count)
        self._init_cache()

    def _init_cache(self):
        self._lock = threading.Lock()  # grain reads records from several threads
        self._cache: collections.OrderedDict[int, tuple[list, list, list]] = collections.OrderedDict()
        self._open: dict[int, pq.ParquetFile] = {}

    def __getstate__(self):  # open files and locks stay behind; each worker process opens its own
        state = dict(self.__dict__)
        for k in ("_lock", "_cache", "_open"):
            del state[k]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return self._len

    def _rows(self, g: int) -> tuple[list, list, list]:
        """(images, captions, aesthetic scores) of this process's row group g, as Python lists (a few kept
        in memory); the scores are None without an aesthetic_key."""
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
            f, group, *_ = self._groups[g]
            if f not in self._open:
                self._open[f] = _parquet_file(self.files[f])
            columns = list(dict.fromkeys(k for k in (self.image_key, self.caption_key, self.aesthetic_key) if k))
            table = self._open[f].read_row_group(group, columns=columns)
            images = table.column(self.image_key).to_pylist()
            if self._image_kind == "struct":  # bytes, else the path of the file (None: neither)
                images = [None if v is None else v.get("bytes") or v.get("path") or None for v in images]
            scores = table.column(self.aesthetic_key).to_pylist() if self.aesthetic_key else [None] * table.num_rows
            rows = (images, table.column(self.caption_key).to_pylist(), scores)
            self._cache[g] = rows
            while len(self._cache) > 2 * WINDOW_BLOCKS:
                self._cache.popitem(last=False)
            return rows

    def __getitem__(self, i: int) -> dict:
        g = bisect.bisect_right(self._starts, i) - 1
        row = i - self._starts[g]
        images, captions, scores = self._rows(g)
        f, _, first, _ = self._groups[g]
        image, skip = images[row], ""
        if self._image_kind == "struct" and not isinstance(image, bytes):
            image, skip = self._read_image_file(f, image)
        return {"key": f"{os.path.basename(self.files[f])}:{first + row}", "image": image,
                "caption": captions[row], "aesthetic_score": scores[row], "skip": skip}

    def _read_image_file(self, f: int, path: str | None) -> tuple[bytes | None, str]:
        """(bytes, "") of the image file a struct names (relative to file f's folder, or absolute),
        or (None, MISSING_IMAGE_FILE) without a path or a readable file."""
        if not path:
            return None, MISSING_IMAGE_FILE
        try:
            return (paths.as_path(self.files[f]).parent / path).read_bytes(), ""
        except OSError:
            return None, MISSING_IMAGE_FILE

    def __repr__(self) -> str:
        return (f"ParquetSource({len(self.files)} files, {self.image_key!r}, {self.caption_key!r}, "
                f"process {self._process[0]} of {self._process[1]}, {len(self)} rows)")


class BlockShuffle(grain.MapDataset):
    """`parent`'s records in an order that changes every epoch, reading few blocks at a time.

    Each epoch the blocks (row groups) are put in a random order; then the rows of each
    WINDOW_BLOCKS consecutive blocks of that order are shuffled together. Record index
    `epoch * len + i` is the i-th record of that epoch (as grain's own `shuffle`).
    """

    def __init__(self, parent: grain.MapDataset, block_sizes: list[int], seed: int):
        super().__init__(parent)
        self._sizes = np.asarray(block_sizes, np.int64)
        self._starts = np.cumsum(self._sizes) - self._sizes
        self._len = int(self._sizes.sum())
        self._seed = int(seed)
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"BlockShuffle(blocks={len(self._sizes)}, seed={self._seed})"

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The blocks in this epoch's order, and the cumulative row count after each."""
        got = self._orders.get(epoch)
        if got is None:  # computed once per epoch (twice at worst, by two threads at once)
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._sizes))
            got = (order, np.cumsum(self._sizes[order]))
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = got
        return got

    def _window(self, epoch: int, w: int) -> np.ndarray:
        """Parent record indices of window w of this epoch, shuffled."""
        got = self._windows.get((epoch, w))
        if got is None:
            order, _ = self._order(epoch)
            blocks = order[w * WINDOW_BLOCKS:(w + 1) * WINDOW_BLOCKS]
            rows = np.concatenate([np.arange(self._starts[b], self._starts[b] + self._sizes[b]) for b in blocks])
            got = np.random.default_rng([self._seed, epoch, w + 1]).permutation(rows)
            if len(self._windows) > 4:
                self._windows.clear()
            self._windows[(epoch, w)] = got
        return got

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(index, self._len)
        order, ends = self._order(epoch)
        w = int(np.searchsorted(ends, pos, side="right")) // WINDOW_BLOCKS
        window_start = int(ends[w * WINDOW_BLOCKS - 1]) if w else 0
        return self._parent[epoch * self._len + int(self._window(epoch, w)[pos - window_start])]
