"""`muse-jax data tokenize`: each stage's tokens of a split, computed once into ArrayRecord shards.

    muse-jax data tokenize --config smoke --workdir W [--split train|eval] [--chunk-size 4096]
    muse-jax train --config smoke --workdir W --config.data.source=tokens

Reads config.data's split once, in a fixed order, this process's share (image_text.make_dataset
with `ordered=True`), and encodes it with the stages' tokenizers from W (`config.<stage>.tokenizer`)
as the train step does (training/online.py):
  tokens_base      base tokenizer(images area-downsampled to the base stage's pixels)
  tokens_superres  super-res tokenizer(images at its pixels), when W holds that tokenizer
The images are read at the largest of these stages' pixels. Captions and keys go with the tokens
into W/tokens/<split> (config.data.tokens_dir for the train split when set; a local folder for a
remote W), in the format of muse_jax/data/token_shards.py. Every process writes its own chunks;
a killed run resumes after each process's last complete chunk; process 0 writes meta.json once
all processes are done, so several processes need one shared folder. A rerun of a complete split
is a no-op; tokens of other tokenizers or other data in the folder are refused. Skipped records
(bad images, ...) are counted per kind, as in training.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from muse_jax import distributed, image_ops, paths
from muse_jax import workdir as workdir_lib
from muse_jax import writer as writer_lib
from muse_jax.data import image_text, token_shards

log = logging.getLogger(__name__)

# config.data fields that do not change the tokens (the order of one ordered pass, the workers).
IGNORED_DATA_FIELDS = ("batch_size", "workers", "shuffle_buffer", "tokens_dir", "image_size", "aesthetic_key")


def tokens_dir(config, workdir, split: str = "train") -> str:
    """Where the tokens of `split` live: config.data.tokens_dir (train split) when set, else W/tokens/<split>."""
    if split == "train" and config.data.get("tokens_dir", ""):
        return os.fspath(config.data.tokens_dir)
    return os.fspath(paths.local_dir(workdir, "tokens", split))


def stage_tokenizer_names(config, workdir) -> dict[str, str]:
    """{stage: tokenizer name} of the stages whose tokenizer W holds (the base stage's is required)."""
    names = {"base": workdir_lib.stage_tokenizer(config, "base")}
    workdir_lib.tokenizer_meta(workdir, names["base"])  # FileNotFoundError naming the command
    sr = workdir_lib.stage_tokenizer(config, "superres")
    try:
        workdir_lib.tokenizer_meta(workdir, sr)
        names["superres"] = sr
    except FileNotFoundError:
        log.warning("no super-res tokenizer %r in %s: writing the base stage's tokens only", sr or "(shared)", workdir)
    return names


def stamp(config, workdir, split: str, names: dict[str, str]) -> dict:
    """What the tokens depend on: the split, config.data, each stage's tokenizer (name and identity) and
    token grid (with the tokenizer's factor, the stage's pixels)."""
    data = {k: v for k, v in config.data.to_dict().items() if k not in IGNORED_DATA_FIELDS}
    tokenizers = {s: {"name": n, "identity": workdir_lib.tokenizer_identity(workdir, n),
                      "grid_size": int(config[s].grid_size)} for s, n in names.items()}
    return json.loads(json.dumps({"split": split, "data": data, "tokenizers": tokenizers}))  # tuples as lists


def check_stamp(directory, found: dict, expected: dict, what: str) -> None:
    """Refuses tokens of other tokenizers or other data, naming what differs."""
    if found == expected:
        return
    differ = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if "data" in differ:
        data_f, data_e = found.get("data", {}), expected.get("data", {})
        differ += [f"data.{k}" for k in sorted(set(data_f) | set(data_e)) if data_f.get(k) != data_e.get(k)]
    raise ValueError(f"{directory} holds {what} of other settings ({', '.join(differ)} differ): remove the folder "
                     "to tokenize anew, or use another one (--out / config.data.tokens_dir)")


def _process_count_check(directory, found: int, expected: int) -> None:
    if found != expected:
        raise ValueError(f"{directory} was tokenized by {found} processes, this run has {expected}: run with "
                         f"{found} or remove the folder")


def _encoders(config, workdir, names):
    """{stage: ImageTokenizer} on this process's devices, and {stage: pixels}."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    tokenizers = {s: workdir_lib.load_image_tokenizer(workdir, name=n, mesh=mesh) for s, n in names.items()}
    pixels = {s: workdir_lib.check_stage_tokenizer(config, s, t) for s, t in tokenizers.items()}
    if "superres" in pixels and pixels["superres"] % pixels["base"]:
        raise ValueError(f"super-res images of {pixels['superres']} px are not a multiple of the base's "
                         f"{pixels['base']} px")
    if max(t.codebook_size for t in tokenizers.values()) > 2**15:
        raise ValueError("token shards hold int16 ids: codebooks of at most 32768 codes")
    return tokenizers, pixels


def _encode(tokenizers, pixels, images: list[np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """{"tokens_<stage>": int16 [n, g*g]} of the images, in batches padded to `batch_size` (one compilation)."""
    n = len(images)
    x = np.stack(images + [images[-1]] * (batch_size - n))
    out = {}
    for s, tok in tokenizers.items():
        x_s = image_ops.downsample_area(x, x.shape[1] // pixels[s])
        out[f"tokens_{s}"] = np.asarray(tok.encode(x_s)).reshape(batch_size, -1)[:n].astype(np.int16)
    return out


def tokenize_process(config, workdir, split: str = "train", *, out: str | None = None, chunk_size: int = 4096,
                     batch_size: int = 64, process_index: int | None = None, process_count: int | None = None) -> dict:
    """Writes this process's chunks of `split` (after its last complete one) and its done file.

    Returns {"directory", "complete": True} when meta.json already marks the split done, else this
    process's totals {"directory", "chunks", "records", "skipped", "stamp", "process_count"}.
    """
    if config.data.get("source") == "tokens":
        raise ValueError("config.data.source='tokens' trains on tokens; tokenize reads the images: give their "
                         f"source ({', '.join(image_text.SOURCES)})")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk size {chunk_size} and batch size {batch_size} must be positive")
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    directory = out or tokens_dir(config, workdir, split)
    os.makedirs(directory, exist_ok=True)
    names = stage_tokenizer_names(config, workdir)
    expected = stamp(config, workdir, split, names)
    if os.path.isfile(os.path.join(directory, token_shards.META)):
        check_stamp(directory, token_shards.read_meta(directory)["stamp"], expected, "tokens")
        return {"directory": directory, "complete": True}
    done_path = os.path.join(directory, f"p{process_index:05d}.json")
    if os.path.isfile(done_path):
        done = token_shards.read_json(done_path)
        check_stamp(directory, done["stamp"], expected, "tokens")
        _process_count_check(directory, done["process_count"], process_count)
        return {"directory": directory, **done}

    chunks = token_shards.complete_chunks(directory, process_index)
    sidecars = [token_shards.read_json(os.path.join(directory, c + ".json")) for c in chunks]
    for s in sidecars:
        check_stamp(directory, s["stamp"], expected, "tokens")
        _process_count_check(directory, s["process_count"], process_count)
    skipped: dict[str, int] = {}
    for s in sidecars:
        _add(skipped, s["skipped"])
    records = sum(s["records"] for s in sidecars)

    tokenizers, pixels = _encoders(config, workdir, names)
    batch_size = -(-batch_size // jax.local_device_count()) * jax.local_device_count()  # divides over devices
    ds = image_text.make_dataset(config.data, split, image_size=max(pixels.values()), process_index=process_index,
                                 process_count=process_count, ordered=True)
    it = iter(ds)
    if sidecars:
        it.set_state(sidecars[-1]["position"])
        log.info("tokenize: process %d resumes after %d chunks (%d records)", process_index, len(chunks), records)
    bar = writer_lib.progress(desc=f"tokenize {split}", unit="img", initial=records, disable=process_index != 0)
    ended = False
    while not ended:
        chunk, chunk_skipped = [], {}
        while len(chunk) < chunk_size and not ended:
            images, captions, keys = [], [], []
            while len(images) < min(batch_size, chunk_size - len(chunk)):
                try:
                    ex = next(it)
                except StopIteration:
                    ended = True
                    break
                if ex["skip"]:
                    if ex["skip"] not in skipped and ex["skip"] not in chunk_skipped:
                        log.warning("skipping example %s: %s (the first one; totals are in meta.json)",
                                    ex.get("key", ""), ex["skip"])
                    _add(chunk_skipped, {ex["skip"]: 1})
                    continue
                images.append(ex["image"])
                captions.append(ex["caption"])
                keys.append(ex["key"])
            if images:
                tokens = _encode(tokenizers, pixels, images, batch_size)
                chunk += [token_shards.encode_record(c, k, {name: t[i] for name, t in tokens.items()})
                          for i, (c, k) in enumerate(zip(captions, keys))]
                bar.update(len(images))
        _add(skipped, chunk_skipped)
        if chunk:  # trailing skipped records after the last chunk count in the totals only
            sidecar = {"skipped": chunk_skipped, "position": it.get_state(), "stamp": expected,
                       "process_count": process_count}
            chunks.append(token_shards.write_chunk(directory, process_index, len(chunks), chunk, sidecar))
            records += len(chunk)
    bar.close()
    if hasattr(it, "close"):
        it.close()
    done = {"chunks": chunks, "records": records, "skipped": skipped, "stamp": expected, "process_count": process_count}
    token_shards.write_json(done_path, done)
    return {"directory": directory, **done}


def _add(totals: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        totals[k] = totals.get(k, 0) + int(v)


def finalize(directory: str, process_count: int) -> dict:
    """meta.json from every process's done file: the chunks in order (process by process), the totals."""
    done = []
    for p in range(process_count):
        path = os.path.join(directory, f"p{p:05d}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: process {p} of {process_count} has not finished tokenizing "
                                    "(several processes need one shared folder)")
        done.append(token_shards.read_json(path))
        check_stamp(directory, done[-1]["stamp"], done[0]["stamp"], f"process {p}'s tokens")
        _process_count_check(directory, done[-1]["process_count"], process_count)
    skipped: dict[str, int] = {}
    for d in done:
        _add(skipped, d["skipped"])
    meta = {
        "stamp": done[0]["stamp"], "process_count": process_count,
        "processes": [{"process": p, "chunks": d["chunks"], "records": d["records"], "skipped": d["skipped"]}
                      for p, d in enumerate(done)],
        "files": [c for d in done for c in d["chunks"]],
        "records": sum(d["records"] for d in done), "skipped": skipped,
    }
    token_shards.write_meta(directory, meta)
    return meta


def run(config, workdir, split: str = "train", *, out: str | None = None, chunk_size: int = 4096,
        batch_size: int = 64) -> dict:
    """`muse-jax data tokenize`: every process writes its share, then process 0 writes meta.json; returns it."""
    result = tokenize_process(config, workdir, split, out=out, chunk_size=chunk_size, batch_size=batch_size)
    directory = result["directory"]
    if result.get("complete"):
        if distributed.is_main_process():
            print(f"{directory}: the {split} tokens are complete already (nothing to do)")
        return token_shards.read_meta(directory)
    distributed.sync("tokenize: every process wrote its chunks")
    if distributed.is_main_process():
        meta = finalize(directory, jax.process_count())
        skipped = f", skipped {meta['skipped']}" if meta["skipped"] else ""
        print(f"wrote {meta['records']} {split} records in {len(meta['files'])} chunks to {directory}{skipped}")
    distributed.sync("tokenize: meta.json written")
    return token_shards.read_meta(directory)
