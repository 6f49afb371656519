"""Webdataset tar shards as img2dataset writes them: a streaming, resumable reader for each process.

    files = paths.expand("shards/{00000..00099}.tar")
    ds = webdataset.dataset(files, seed=0, shuffle_buffer=1000,
                            process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds.map(decode))     # it.get_state() / it.set_state(state): resume on the exact next record
    record = next(it)             # {"key", "image": bytes | None, "caption": str | None, "aesthetic_score", "skip"}

Layout: a shard holds samples made of consecutive members that share a key. The key is the
member name up to the first dot of its basename, folders included ("d/0001.jpg" -> "d/0001").
A member's kind is the last part of its extension, in any case ("d/0001.x.JPG" is a jpg). A
sample's image is its first jpg/jpeg/png/webp member; its caption is its .txt member, else the
`caption_key` field of its .json member ("" = "caption", img2dataset's), else None. Its
"aesthetic_score" is the `aesthetic_key` field of its .json member as written, else None (also
for an empty aesthetic_key; preprocess makes NaN of anything not a number). Members without a
key, and members that are not regular files, are skipped. Images stay encoded.

Bad data never raises; it gives a record with `skip` set. "bad_member": a sample without an
image, with a caption that cannot be decoded, or with a member given twice. "truncated_tar":
once for a shard that is cut short or corrupt, after the samples read whole before the cut; its
key is the shard's path, and reading goes on with the next shard. I/O errors do raise (a missing
file: FileNotFoundError naming it): losing data must not be silent.

Sharding: with at least as many files as processes, file j belongs to process j % process_count.
With fewer files, every process reads every file and keeps the records r (counted within a file)
with r % process_count == process_index. Either way the processes share one epoch disjointly.
Under `mp_prefetch` with n workers, the workers share their process's records by the same rule.

Order: each epoch reads this process's files in an order shuffled by (seed, epoch). Records then
pass through a shuffle buffer of `shuffle_buffer` records (0 or 1: none). The buffer empties at
the end of each epoch, so every epoch yields each record of this process exactly once.

State (`get_state`): {"num_files", "epoch", "shard" (position in the epoch's file order),
"record" (records read from that file), "taken" (records yielded this epoch), "buffer" (one
[file index, record index] pair per buffered record)}. That is about 12 bytes of JSON per
buffered record: 120 KB for a buffer of 10_000, built anew on each call (mp_prefetch calls it
after every record). `set_state` reads the buffered records again, in one pass over each file
they come from, up to the last record needed. It then reads the current file from its start up
to the saved record, because tar streams cannot seek.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence

import grain.python as grain
import numpy as np

from muse_jax import paths

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "caption"  # the .json field img2dataset writes the caption to
BAD_MEMBER = "bad_member"
TRUNCATED_TAR = "truncated_tar"


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lowercase extension) of a member name, or None without one: "d/0001.JPG" -> ("d/0001", "jpg")."""
    folder, slash, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return None
    return folder + slash + stem, extension.lower()


def _record(key: str, image: bytes | None = None, caption: str | None = None, skip: str = "", aesthetic=None) -> dict:
    return {"key": key, "image": image, "caption": caption, "aesthetic_score": aesthetic, "skip": skip}


def _json_field(data: bytes, key: str):
    """Field `key` of a .json member; None when it is absent or the member is not a JSON object."""
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    return meta.get(key) if isinstance(meta, dict) else None


def _sample(key: str, members: dict[str, bytes], caption_key: str, aesthetic_key: str = "") -> dict:
    """The record of one sample from its members ({extension: data}); a bad sample gets skip "bad_member".

    A member's kind is the last part of its extension, as webdataset's decoders read it ("b.jpg" is a jpg)."""
    by_kind = {}
    for ext, data in members.items():
        by_kind.setdefault(ext.rpartition(".")[2], data)
    image = next((by_kind[kind] for kind in by_kind if kind in IMAGE_EXTENSIONS), None)
    if image is None:
        return _record(key, skip=BAD_MEMBER)
    try:
        if "txt" in by_kind:
            caption = by_kind["txt"].decode("utf-8")
        elif "json" in by_kind:
            meta = json.loads(by_kind["json"])
            caption = meta.get(caption_key) if isinstance(meta, dict) else None
            caption = caption if isinstance(caption, str) else None
        else:
            caption = None
    except ValueError:  # bytes that are not UTF-8 or not JSON
        return _record(key, skip=BAD_MEMBER)
    aesthetic = _json_field(by_kind["json"], aesthetic_key) if aesthetic_key and "json" in by_kind else None
    return _record(key, image, caption, aesthetic=aesthetic)


class _EndMarkingTarInfo(tarfile.TarInfo):
    """tarfile stops reading quietly at a header it cannot read. This header class records on the
    archive (`reached_end_marker`) whether that header was the end-of-archive marker, a zero block."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.reached_end_marker = True
            raise


def read_shard(path: str, caption_key: str = "caption", aesthetic_key: str = "") -> Iterator[dict]:
    """Every record of one tar shard in order. A cut or corrupt tar ends with one "truncated_tar" record."""
    with paths.as_path(path).open("rb") as f:
        key, members, duplicate, partial = None, {}, False, False
        try:
            archive = tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndMarkingTarInfo)
            for info in archive:
                archive.members = []  # a stream needs no list of the headers already read
                name = split_name(info.name) if info.isreg() else None
                if name is None:
                    continue
                if name[0] != key:
                    if key is not None:
                        yield (_record(key, skip=BAD_MEMBER) if duplicate
                               else _sample(key, members, caption_key, aesthetic_key))
                    key, members, duplicate = name[0], {}, False
                duplicate |= name[1] in members
                partial = True
                members[name[1]] = archive.extractfile(info).read()
                partial = False
            complete = getattr(archive, "reached_end_marker", False)
        except (tarfile.TarError, EOFError):
            complete = False
        # The last sample counts if its members were read whole; one cut short is lost with the rest.
        if key is not None and not partial:
            yield _record(key, skip=BAD_MEMBER) if duplicate else _sample(key, members, caption_key, aesthetic_key)
        if not complete:
            yield _record(path, skip=TRUNCATED_TAR)


def _draw(seed: int, epoch: int, step: int, n: int) -> int:
    """A uniform index in [0, n) that depends only on (seed, epoch, step)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


class WebDataset(grain.IterDataset):
    """The records of tar shards for one process (see the module docstring); `dataset` builds it."""

    def __init__(self, files: Sequence[str], *, seed: int, shuffle_buffer: int, process_index: int, process_count: int,
                 caption_key: str = "caption", aesthetic_key: str = "", num_epochs: int | None = None):
        super().__init__()
        if not files:
            raise ValueError("webdataset: no shard files given")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        self.files = [str(f) for f in files]
        self.base_seed, self.shuffle_buffer, self.num_epochs = seed, shuffle_buffer, num_epochs
        self.caption_key, self.aesthetic_key = caption_key or CAPTION_KEY, aesthetic_key
        self.shards = list(range(len(self.files)))  # the files this reader reads ...
        self.record_index, self.record_count = 0, 1  # ... keeping their records r with r % count == index
        self.readers = []  # [(index, count)] for the process, then for the mp_prefetch worker if any
        self._narrow(process_index, process_count)

    def _narrow(self, index: int, count: int) -> None:
        """Keeps reader `index` of `count` of this reader's share: its files j % count == index,
        or with fewer files than that, its records r % count == index in every file."""
        self.readers.append((index, count))
        if self.record_count == 1 and len(self.shards) >= count:
            self.shards = self.shards[index::count]
            return
        if self.record_count == 1:
            log.warning("webdataset: fewer shard files (%d) than readers (%d); every reader reads every file "
                        "and keeps one record in %d", len(self.shards), count, count)
        self.record_index, self.record_count = self.record_index + self.record_count * index, self.record_count * count

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Narrows this reader to worker i of n under `mp_prefetch` (sl = slice(i, None, n)), by the
        rule of `_narrow`: the workers share this process's records. `sequential_slice` is ignored."""
        del sequential_slice
        if sl.stop is not None:
            raise ValueError(f"webdataset: cannot take slice {sl} of a stream")
        self._narrow(sl.start or 0, sl.step or 1)

    def shard_order(self, epoch: int) -> list[int]:
        """This reader's file indices in the order epoch `epoch` reads them."""
        return [self.shards[i] for i in np.random.default_rng([self.base_seed, epoch]).permutation(len(self.shards))]

    def __iter__(self) -> WebDatasetIterator:
        return WebDatasetIterator(self)

    def __str__(self) -> str:
        return f"WebDataset({len(self.files)} files, readers {self.readers})"


class WebDatasetIterator(grain.DatasetIterator):
    """Streams a `WebDataset`; its state is small and JSON (see the module docstring)."""

    def __init__(self, ds: WebDataset):
        super().__init__()
        self._ds = ds
        self._reader = None  # the records of file order[shard], from record `record` on
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch, self._order = epoch, self._ds.shard_order(epoch)
        self._shard, self._record, self._taken = 0, 0, 0
        self._buffer: list[dict] = []
        self._origins: list[tuple[int, int]] = []  # (file index, record index) of each buffered record

    def _read(self) -> tuple[tuple[int, int], dict] | None:
        """(origin, record) of this reader's next record in the epoch's files, or None once they are read."""
        ds = self._ds
        while self._shard < len(self._order):
            file = self._order[self._shard]
            if self._reader is None:
                self._reader = read_shard(ds.files[file], ds.caption_key, ds.aesthetic_key)
                for _ in range(self._record):  # resuming mid-file: streams cannot seek
                    if next(self._reader, None) is None:
                        raise ValueError(f"{ds.files[file]} has fewer than {self._record} records; it changed "
                                         "since the state was saved")
            record = next(self._reader, None)
            if record is None:
                self._close_reader()
                self._shard, self._record = self._shard + 1, 0
                continue
            origin = (file, self._record)
            self._record += 1
            if origin[1] % ds.record_count == ds.record_index:
                return origin, record
        return None

    def _take(self, i: int, replacement: tuple[tuple[int, int], dict] | None) -> dict:
        """Takes buffered record i out, putting `replacement` in its place (or shrinking the buffer)."""
        out = self._buffer[i]
        if replacement is not None:
            self._origins[i], self._buffer[i] = replacement
        else:
            self._origins[i], self._buffer[i] = self._origins[-1], self._buffer[-1]
            self._origins.pop()
            self._buffer.pop()
        self._taken += 1
        return out

    def __next__(self) -> dict:
        self._assert_not_closed()
        ds = self._ds
        while ds.num_epochs is None or self._epoch < ds.num_epochs:
            item = self._read()
            if item is None:  # the epoch's files are read: empty the buffer, then start the next epoch
                if self._buffer:
                    return self._take(_draw(ds.base_seed, self._epoch, self._taken, len(self._buffer)), None)
                if self._taken == 0 and ds.num_epochs is None:
                    raise ValueError(f"webdataset: readers {ds.readers} get no record from {ds.files}")
                self._start_epoch(self._epoch + 1)
            elif ds.shuffle_buffer <= 1:
                self._taken += 1
                return item[1]
            elif len(self._buffer) < ds.shuffle_buffer:
                self._origins.append(item[0])
                self._buffer.append(item[1])
            else:
                return self._take(_draw(ds.base_seed, self._epoch, self._taken, ds.shuffle_buffer), item)
        raise StopIteration

    def get_state(self) -> dict:
        return {"num_files": len(self._ds.files), "epoch": self._epoch, "shard": self._shard, "record": self._record,
                "taken": self._taken, "buffer": [list(o) for o in self._origins]}

    def set_state(self, state: dict) -> None:
        ds = self._ds
        if state["num_files"] != len(ds.files):
            raise ValueError(f"webdataset: state saved for {state['num_files']} files, reading {len(ds.files)}")
        self._close_reader()
        self._start_epoch(state["epoch"])
        self._shard, self._record, self._taken = state["shard"], state["record"], state["taken"]
        self._origins = [(int(f), int(r)) for f, r in state["buffer"]]
        self._buffer = self._read_again(self._origins)

    def _read_again(self, origins: list[tuple[int, int]]) -> list[dict]:
        """The records at `origins`, read again from their files (each file once, up to the last one needed)."""
        ds = self._ds
        wanted: dict[int, set[int]] = {}
        for file, r in origins:
            wanted.setdefault(file, set()).add(r)
        found = {}
        for file in sorted(wanted):
            with contextlib.closing(read_shard(ds.files[file], ds.caption_key, ds.aesthetic_key)) as records:
                for r, record in zip(range(max(wanted[file]) + 1), records):
                    if r in wanted[file]:
                        found[file, r] = record
        missing = [o for o in origins if o not in found]
        if missing:
            raise ValueError(f"webdataset: records {missing[:5]} of the saved shuffle buffer are gone; the files "
                             "changed since the state was saved")
        return [found[o] for o in origins]

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self._close_reader()
        super().close()

    def __str__(self) -> str:
        return f"WebDatasetIterator({self._ds})"


def dataset(files: list[str], *, seed: int, shuffle_buffer: int, process_index: int, process_count: int,
            caption_key: str = "caption", aesthetic_key: str = "", num_epochs: int | None = None) -> grain.IterDataset:
    """This process's raw records of the tar shards `files` (see the module docstring for order and state)."""
    return WebDataset(files, seed=seed, shuffle_buffer=shuffle_buffer, process_index=process_index,
                      process_count=process_count, caption_key=caption_key, aesthetic_key=aesthetic_key,
                      num_epochs=num_epochs)
