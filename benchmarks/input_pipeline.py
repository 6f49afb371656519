"""Times the image-text input pipeline per worker: read + decode + resize + crop of JPEGs.

    python benchmarks/input_pipeline.py                        # 64 images of 640x480, 256 and 512 px
    python benchmarks/input_pipeline.py --num 256 --sizes 256,512 --source-size 1024x768 --json

Makes `--num` JPEGs (quality `--quality`, photo-like: smooth shapes plus grain) in a temporary
folder, writes them as one tar shard and one parquet file (Hugging Face image struct, row groups
of 100), then times one process on one core, no threads, taking every record through
`muse_jax.data.preprocess.example` (PIL decode at reduced scale where the size allows, RGB,
antialiased resize of the centre crop) from: bytes already in memory (decode alone), the tar
shard through `muse_jax.data.webdataset.read_shard`, and the parquet file through
`muse_jax.data.files.ParquetSource`. Reported: images/s per worker, counted per CPU second of
this process so that a shared machine still gives one whole core's rate (and per wall second
beside it; the best of `--repeats` passes), and the CPU cores one accelerator needs to feed a
muse_632m base step on an H100 (~330 images/s, `--consumed`) at that rate.
"""
from __future__ import annotations

import argparse
import io
import pathlib
import tarfile
import tempfile
import time

import common
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq

from muse_jax.data import files, preprocess

COLUMNS = [("source", "source", ""), ("size", "px", "d"), ("images", "images", "d"),
           ("images_per_s", "images/s per worker", ".1f"), ("wall_images_per_s", "(wall)", ".1f"),
           ("ms_per_image", "CPU ms/image", ".2f"),
           ("cores_per_accelerator", "cores for {consumed:.0f} img/s", ".1f"), ("note", "note", "")]


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields (an upsampled random 16x12 image) plus fine grain: compresses like a photo."""
    low = PIL.Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    base = np.asarray(low.resize((width, height), PIL.Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0, 12, (height, width, 3))
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def make_jpegs(num: int, width: int, height: int, quality: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(num):
        buf = io.BytesIO()
        PIL.Image.fromarray(photo_like(rng, width, height)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_tar(path: pathlib.Path, jpegs: list[bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(jpegs):
            for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def write_parquet(path: pathlib.Path, jpegs: list[bytes]) -> None:
    images = pa.array([{"bytes": b, "path": f"{i:06d}.jpg"} for i, b in enumerate(jpegs)])
    pq.write_table(pa.table({"image": images, "text": [f"image {i}" for i in range(len(jpegs))]}), path,
                   row_group_size=100)


def best_rates(run, repeats: int) -> tuple[float, float, int]:
    """(images per CPU second, images per wall second, images) of the fastest of `repeats` calls of
    run() -> number of good examples. CPU time is this process's: the rate of one whole core even
    on a shared machine."""
    cpu_best, wall_best, count = 0.0, 0.0, 0
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        count = run()
        cpu_best = max(cpu_best, count / (time.process_time() - c0))
        wall_best = max(wall_best, count / (time.perf_counter() - t0))
    return cpu_best, wall_best, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=64, help="source images")
    ap.add_argument("--sizes", default="256,512", help="output sizes in pixels")
    ap.add_argument("--source-size", default="640x480", help="WIDTHxHEIGHT of the source JPEGs")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--consumed", type=float, default=330.0,
                    help="images/s one accelerator's training step consumes (muse_632m base on an H100)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    width, height = map(int, args.source_size.lower().split("x"))
    jpegs = make_jpegs(args.num, width, height, args.quality)
    try:
        from muse_jax.data import webdataset
    except ImportError:
        webdataset = None

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tar_path, parquet_path = pathlib.Path(tmp, "00000.tar"), pathlib.Path(tmp, "00000.parquet")
        write_tar(tar_path, jpegs)
        write_parquet(parquet_path, jpegs)
        for size in map(int, args.sizes.split(",")):
            opts = preprocess.Options(size=size)

            def good(records):
                return sum(not preprocess.example(r, opts)["skip"] for r in records)

            runs = {
                "memory (decode only)": lambda: good({"key": str(i), "image": b, "caption": "x", "skip": ""}
                                                     for i, b in enumerate(jpegs)),
                "tar (webdataset)": None if webdataset is None else lambda: good(webdataset.read_shard(str(tar_path))),
                # A fresh source each pass, so that its row-group cache starts empty.
                "parquet": lambda: good(_rows(files.ParquetSource([str(parquet_path)], image_key="image",
                                                                  caption_key="text", process_index=0, process_count=1))),
            }
            for name, run in runs.items():
                row = {"bench": "input_pipeline", "source": name, "size": size,
                       "source_size": args.source_size, "quality": args.quality}
                if run is None:
                    rows.append({**row, "note": "skipped: muse_jax/data/webdataset.py is not there"})
                    continue
                rate, wall_rate, count = best_rates(run, args.repeats)
                if count != args.num:
                    raise RuntimeError(f"{name}: {count} of {args.num} images came through")
                rows.append({**row, "images": count, "images_per_s": rate, "wall_images_per_s": wall_rate,
                             "ms_per_image": 1000.0 / rate, "cores_per_accelerator": args.consumed / rate, "note": ""})
    kb = sum(map(len, jpegs)) / len(jpegs) / 1024
    if not args.json:
        print(f"{args.num} JPEGs of {args.source_size} at quality {args.quality} ({kb:.0f} KB each); one process, "
              f"no threads; images/s per worker = per CPU second (wall: per second of this run); "
              f"cores = {args.consumed:.0f} images/s / images/s per worker")
    columns = [(k, h.format(consumed=args.consumed), s) for k, h, s in COLUMNS]
    common.emit(rows, args.json, columns)


def _rows(source):
    return (source[i] for i in range(len(source)))


if __name__ == "__main__":
    main()
