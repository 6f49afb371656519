"""The webdataset reader: records, process sharding, order, exact resume, bad data, grain pipelines.

Good shards are written with the webdataset package's ShardWriter, a writer other than the reader
under test. Corrupt shards are written with tarfile directly.
"""
import io
import json
import logging
import operator
import tarfile

import grain.python as grain
import pytest
import webdataset as wds
from absl import flags
from PIL import Image

from muse_jax.data import webdataset

SHARDS, PER_SHARD = 3, 5


def encoded(i: int, fmt: str) -> bytes:
    """A distinct small image (8x8) as JPEG or PNG bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 7 % 256, i * 13 % 256, 90)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(files, {key: (image bytes, caption)}): 3 shards of 5 samples in img2dataset's layout; sample i's
    .json has "aesthetic": i / 4."""
    folder = tmp_path_factory.mktemp("shards")
    expected = {}
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(SHARDS * PER_SHARD):
            key = f"{i // PER_SHARD:05d}{i % PER_SHARD:04d}"
            meta = {"url": f"http://x/{i}", "caption": f"json caption {i}", "aesthetic": i / 4}
            if i % 3 == 0:  # the caption only in the json, a PNG image
                sample = {"__key__": key, "png": encoded(i, "PNG"), "json": json.dumps(meta).encode()}
                expected[key] = (sample["png"], meta["caption"])
            else:  # the caption in .txt (wins over the json's), a JPEG image
                sample = {"__key__": key, "jpg": encoded(i, "JPEG"), "txt": f"a caption {i}", "json": json.dumps(meta).encode()}
                expected[key] = (sample["jpg"], f"a caption {i}")
            sink.write(sample)
    files = sorted(str(p) for p in folder.glob("*.tar"))
    assert len(files) == SHARDS
    return files, expected


def make(files, **kw):
    kw = {"seed": 0, "shuffle_buffer": 0, "process_index": 0, "process_count": 1, "num_epochs": 1, **kw}
    return webdataset.dataset(files, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_every_record_comes_back_once_per_epoch(shards):
    files, expected = shards
    records = list(make(files, shuffle_buffer=4, num_epochs=2))
    n = len(expected)
    assert len(records) == 2 * n
    for epoch in (records[:n], records[n:]):
        assert sorted(r["key"] for r in epoch) == sorted(expected)
    for r in records:
        assert r["skip"] == "" and (r["image"], r["caption"]) == expected[r["key"]]
        assert r["aesthetic_score"] is None  # no aesthetic_key
    scored = {r["key"]: r["aesthetic_score"] for r in make(files, aesthetic_key="aesthetic")}
    assert scored == {key: (int(key[:5]) * PER_SHARD + int(key[5:])) / 4 for key in expected}
    assert [r["key"] for r in records[:n]] != [r["key"] for r in records[n:]]  # each epoch has its own order


def test_processes_read_disjoint_shares(shards, caplog):
    files, expected = shards
    for share_files in (files, files[:1]):  # by file; and by record when there are fewer files than processes
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="muse_jax.data.webdataset"):
            keys = [[r["key"] for r in make(share_files, process_index=p, process_count=2, shuffle_buffer=3)] for p in (0, 1)]
        assert set(keys[0]).isdisjoint(keys[1]) and keys[0] and keys[1]
        assert sorted(keys[0] + keys[1]) == sorted(k for k in expected if any(f"/{k[:5]}.tar" in f for f in share_files))
        assert ("fewer shard files (1) than readers (2)" in caplog.text) == (len(share_files) < 2)


def test_mp_prefetch_workers_split_a_process_share(shards):
    """mp_prefetch's workers share their process's records: by file, or by record when it has too few files."""
    files, _ = shards
    for process_count, workers in ((1, 3), (2, 2), (1, 2)):
        share = sorted(r["key"] for r in make(files, process_count=process_count))
        keys = []
        for i in range(workers):
            ds = make(files, process_count=process_count)
            ds.set_slice(slice(i, None, workers))  # what mp_prefetch does to a copy in each worker process
            keys += [r["key"] for r in ds]
        assert sorted(keys) == share


def test_order_is_seeded_and_the_buffer_mixes_shards(shards):
    files, _ = shards
    keys = lambda **kw: [r["key"] for r in make(files, num_epochs=2, **kw)]
    assert keys(seed=1, shuffle_buffer=8) == keys(seed=1, shuffle_buffer=8)
    assert keys(seed=1, shuffle_buffer=8) != keys(seed=2, shuffle_buffer=8)
    n = SHARDS * PER_SHARD
    plain = keys(seed=1, shuffle_buffer=0)
    assert plain[:n] != plain[n:]  # the shard order changes with the epoch
    changes = lambda ks: sum(a[:5] != b[:5] for a, b in zip(ks, ks[1:]))  # the key's first 5 digits name its shard
    assert changes(plain[:n]) == SHARDS - 1  # without a buffer, shard after shard
    assert changes(keys(seed=1, shuffle_buffer=8)[:n]) > SHARDS + 2  # with one, shards interleave


@pytest.mark.parametrize("n_files, shuffle_buffer, process", [(SHARDS, 0, 0), (SHARDS, 4, 0), (1, 2, 1)])
def test_resume_yields_exactly_the_next_records(shards, n_files, shuffle_buffer, process):
    """Every position of three epochs: mid-shard, at shard and epoch boundaries, with a full or draining
    buffer; the last case splits one file's records over 2 processes. Records read again keep their score."""
    files, _ = shards
    ds = make(files[:n_files], shuffle_buffer=shuffle_buffer, num_epochs=None, seed=3, process_index=process,
              process_count=1 + process, aesthetic_key="aesthetic")
    epoch = n_files * PER_SHARD // (1 + process)
    reference = take(iter(ds), 3 * epoch + 8)
    assert all(isinstance(r["aesthetic_score"], float) for r in reference)
    it = iter(ds)
    for k in range(3 * epoch):
        state = json.loads(json.dumps(it.get_state()))
        resumed = iter(ds)
        resumed.set_state(state)
        assert take(resumed, 8) == reference[k:k + 8], k
        assert next(it) == reference[k]
    assert len(json.dumps(state)) < 200


def test_the_raw_state_of_the_reader(shards):
    files, _ = shards
    it = webdataset.WebDatasetIterator(make(files, shuffle_buffer=4))
    take(it, 2)
    state = it.get_state()
    assert state["num_files"] == SHARDS and state["epoch"] == 0 and state["taken"] == 2
    assert len(state["buffer"]) == 4 and (state["shard"], state["record"]) == (1, 1)  # 6 read: 2 taken, 4 held


def write_tar(path, members):
    """A tar of (name, bytes) regular files, or tarfile.TarInfo entries as they are."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return str(path)


def cut_at(path, size):
    """Keeps the first `size` bytes of the file."""
    with open(path, "r+b") as f:
        f.truncate(size)


def test_bad_data_gives_skip_records_and_never_raises(tmp_path):
    img = encoded(1, "JPEG")
    good = [("a.jpg", img), ("a.txt", b"cap a"), ("b.PNG", img), ("b.json", b'{"caption": "cap b"}')]
    offsets = {i.name: (i.offset, i.offset_data) for i in tarfile.open(write_tar(tmp_path / "complete.tar", good))}
    cut = write_tar(tmp_path / "cut.tar", good)  # cut in b.PNG's header
    cut_at(cut, offsets["b.PNG"][0] + 200)
    mid_data = write_tar(tmp_path / "mid_data.tar", good)  # cut inside a.jpg's bytes
    cut_at(mid_data, offsets["a.jpg"][1] + 100)
    mid_caption = write_tar(tmp_path / "mid_caption.tar", good)  # cut inside a.txt's bytes: sample a is lost
    cut_at(mid_caption, offsets["a.txt"][1] + 2)
    at_header = write_tar(tmp_path / "at_header.tar", good)  # cut where b.PNG's header starts: no end marker
    cut_at(at_header, offsets["b.PNG"][0])
    folder, link = tarfile.TarInfo("d"), tarfile.TarInfo("c.txt")
    folder.type, link.type, link.linkname = tarfile.DIRTYPE, tarfile.SYMTYPE, "a.txt"
    odd = write_tar(tmp_path / "odd.tar", [
        ("README", b"no key"), ("x/.hidden", b"no key"), folder,  # skipped: no key, a folder
        ("a.jpg", img), link, ("a.txt", b"cap a"),  # a symlink inside a sample is skipped
        ("b.txt", b"caption, no image"),
        ("c.jpg", img), ("c.txt", b"\xff\xfe not utf-8"),
        ("d.jpg", img), ("d.jpg", img),  # a member given twice
        ("e.jpg", img),  # no caption: a good record whose caption is None
        ("sub.dir/f.g.jpeg", img), ("sub.dir/f.g.txt", b"key with folders")])
    garbage, empty = tmp_path / "garbage.tar", tmp_path / "empty.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    empty.write_bytes(b"")

    view = lambda path: [(r["key"], r["skip"], r["caption"], r["image"] is not None) for r in webdataset.read_shard(path)]
    assert view(cut) == [("a", "", "cap a", True), (cut, "truncated_tar", None, False)]
    assert view(mid_data) == [(mid_data, "truncated_tar", None, False)]
    assert view(mid_caption) == [(mid_caption, "truncated_tar", None, False)]
    assert view(at_header) == [("a", "", "cap a", True), (at_header, "truncated_tar", None, False)]
    assert view(odd) == [("a", "", "cap a", True), ("b", "bad_member", None, False), ("c", "bad_member", None, False),
                         ("d", "bad_member", None, False), ("e", "", None, True), ("sub.dir/f", "", "key with folders", True)]
    assert view(str(garbage)) == [(str(garbage), "truncated_tar", None, False)]
    assert view(str(empty)) == [(str(empty), "truncated_tar", None, False)]
    assert view(str(tmp_path / "complete.tar")) == [("a", "", "cap a", True), ("b", "", "cap b", True)]
    # A .json that is not JSON only loses the score; the score is passed on as written.
    scored = write_tar(tmp_path / "scored.tar", [("a.jpg", img), ("a.txt", b"cap a"), ("a.json", b"{broken"),
                                                 ("b.jpg", img), ("b.txt", b"cap b"), ("b.json", b'{"aesthetic": "6.1"}')])
    scores = [(r["key"], r["skip"], r["aesthetic_score"]) for r in webdataset.read_shard(scored, aesthetic_key="aesthetic")]
    assert scores == [("a", "", None), ("b", "", "6.1")]

    everything = [cut, mid_data, mid_caption, at_header, odd, str(garbage), str(empty)]
    records = list(make(everything, shuffle_buffer=3, num_epochs=2))
    assert len(records) == 2 * (2 + 1 + 1 + 2 + 6 + 1 + 1)
    assert sum(r["skip"] == "truncated_tar" for r in records) == 2 * 6


def test_missing_files_and_no_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no shard files"):
        make([])
    one = write_tar(tmp_path / "one.tar", [("a.jpg", b"x"), ("a.txt", b"only one record")])
    with pytest.raises(ValueError, match=r"readers \[\(1, 2\)\] get no record"):
        next(iter(make([one], process_index=1, process_count=2, num_epochs=None)))  # instead of looping forever
    gone = str(tmp_path / "gone.tar")
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        list(make([gone]))


def test_through_grain_map_with_resume(shards):
    files, expected = shards
    ds = make(files, shuffle_buffer=4, num_epochs=None).map(lambda r: {"key": r["key"], "size": len(r["image"])})
    it = iter(ds)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    after = take(it, 6)
    resumed = iter(ds)
    resumed.set_state(state)
    assert take(resumed, 6) == after
    assert all(r["size"] == len(expected[r["key"]][0]) for r in after)


def test_through_mp_prefetch_with_resume(shards):
    """A worker process reads the shards and sends its state with every record; set_state goes back to it.

    One worker and one iterator: each worker process is a fresh Python that imports grain (seconds)."""
    unparsed = not flags.FLAGS.is_parsed()
    if unparsed:  # mp_prefetch reads grain's absl flags, which only a parsed command line has
        flags.FLAGS.mark_as_parsed()
    files, _ = shards
    ds = make(files, shuffle_buffer=4, num_epochs=None).map(operator.itemgetter("key"))  # picklable by reference
    reference = take(iter(ds), 12)
    it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1)))
    try:
        assert take(it, 5) == reference[:5]
        state = json.loads(json.dumps(it.get_state()))
        assert take(it, 7) == reference[5:12]
        it.set_state(state)
        assert take(it, 7) == reference[5:12]
    finally:
        it.close()
        if unparsed:
            flags.FLAGS.unparse_flags()
