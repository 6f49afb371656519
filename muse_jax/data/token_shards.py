"""Stage tokens computed once, in ArrayRecord shards: what `muse-jax data tokenize` writes and
`config.data.source = "tokens"` trains on.

    D/p00000-c00000.array_record   process 0's first chunk of records
    D/p00000-c00000.json           that chunk's sidecar: records, skips, the reader's position after it
    D/p00000.json                  process 0 is done: its chunks, records and skip totals
    D/meta.json                    the whole split is done: every process's chunks, totals, the stamp

A record is the bytes of an uncompressed `np.savez` of {"caption": str, "key": str,
"tokens_base": int16 [g_b * g_b], "tokens_superres": int16 [g_s * g_s] (when written)}; the
super-res stage's low-res tokens are "tokens_base". A chunk's array_record appears (renamed from a
temporary name) only after its sidecar, so a chunk is complete exactly when its array_record
exists, and a killed run resumes after its last complete chunk. Training reads the chunks that
meta.json lists, in that order: record i belongs to process i % process_count, whose share is
shuffled anew every epoch and repeated.
"""
from __future__ import annotations

import io
import json
import os
import re

import grain
import numpy as np

META = "meta.json"
STAGE_KEYS = {"base": {"tokens": "tokens_base"},
              "superres": {"tokens": "tokens_superres", "lowres_tokens": "tokens_base"}}
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


def encode_record(caption: str, key: str, tokens: dict[str, np.ndarray]) -> bytes:
    """One record's bytes; `tokens` maps "tokens_base" (and "tokens_superres") to flat token ids."""
    buf = io.BytesIO()
    np.savez(buf, caption=np.str_(caption), key=np.str_(key),
             **{name: np.asarray(t).reshape(-1).astype(np.int16) for name, t in tokens.items()})
    return buf.getvalue()


def decode_record(data: bytes) -> dict:
    """{"caption": str, "key": str, "tokens_base": int16 [n], ...} of a record's bytes."""
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: (str(f[k]) if k in ("caption", "key") else f[k]) for k in f.files}


def chunk_name(process: int, chunk: int) -> str:
    return f"p{process:05d}-c{chunk:05d}"


def write_json(path, value) -> None:
    """Writes JSON to a temporary name, then renames it: readers never see half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def write_chunk(directory, process: int, chunk: int, records: list[bytes], sidecar: dict) -> str:
    """Writes one chunk (the sidecar first, the array_record last, each under a temporary name
    until complete); returns its name."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = chunk_name(process, chunk)
    path = os.path.join(directory, name + ".array_record")
    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per group: random access
    for r in records:
        writer.write(r)
    writer.close()
    write_json(os.path.join(directory, name + ".json"), {**sidecar, "records": len(records)})
    os.replace(tmp, path)
    return name


def complete_chunks(directory, process: int) -> list[str]:
    """Names of the complete chunks of `process`, in order (0, 1, ...)."""
    pattern = re.compile(rf"p{process:05d}-c(\d{{5}})\.array_record")
    found = sorted(int(m.group(1)) for f in os.listdir(directory) if (m := pattern.fullmatch(f)))
    if found != list(range(len(found))):
        raise ValueError(f"{directory}: process {process}'s chunks {found} have a gap; remove the folder and "
                         "tokenize again")
    return [chunk_name(process, c) for c in found]


def read_meta(directory) -> dict:
    """meta.json of a complete tokens folder; FileNotFoundError naming the command otherwise."""
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no complete tokens in {directory} ({META} is missing): run `muse-jax data tokenize` "
                                "with the same config and workdir first")
    return read_json(path)


def write_meta(directory, meta: dict) -> None:
    write_json(os.path.join(directory, META), meta)


def _source(directory, meta: dict) -> grain.sources.ArrayRecordDataSource:
    return grain.sources.ArrayRecordDataSource([os.path.join(directory, f + ".array_record") for f in meta["files"]])


def records(directory, meta: dict, num: int | None = None) -> list[dict]:
    """The first `num` records (all: None) in the order of meta.json's files, decoded."""
    source = _source(directory, meta)
    return [decode_record(source[i]) for i in range(len(source) if num is None else min(num, len(source)))]


def stage_arrays(record: dict, stage: str) -> dict[str, np.ndarray]:
    """A record's token arrays under the names `stage` trains on, as int32."""
    missing = [v for v in STAGE_KEYS[stage].values() if v not in record]
    if missing:
        raise ValueError(f"the tokens hold no {missing} for the {stage} stage: tokenize with its tokenizer in the workdir")
    return {k: record[v].astype(np.int32) for k, v in STAGE_KEYS[stage].items()}


def stage_batches(directory, meta: dict, stage: str, batch_size: int, *, spm, seed: int, process_index: int,
                  process_count: int) -> grain.IterDataset:
    """This process's batches of `stage` forever: {"tokens" int32 [B, n], ("lowres_tokens" [B, m]),
    "text_ids" int32 [B, L], "text_mask" bool [B, L]}; its records shuffled anew every epoch.
    `spm` turns captions into ids (data/text.py's TextTokenizer)."""
    records = grain.MapDataset.source(_source(directory, meta))[process_index::process_count]
    if len(records) < batch_size:
        raise ValueError(f"{directory}: process {process_index} of {process_count} has {len(records)} records, "
                         f"fewer than its batch of {batch_size}")

    def batch(examples: list[dict]) -> dict[str, np.ndarray]:
        arrays = [stage_arrays(e, stage) for e in examples]
        ids, mask = spm([e["caption"] for e in examples])
        return {**{k: np.stack([a[k] for a in arrays]) for k in arrays[0]},
                "text_ids": ids.astype(np.int32), "text_mask": mask}

    ds = records.shuffle(seed=seed % 2**32).repeat().map(decode_record)
    return ds.batch(batch_size, drop_remainder=True, batch_fn=batch).to_iter_dataset(READ_OPTIONS)
