"""The `config.data` section for real image-text data: `get_config(source)`.

    config.data = data.get_config("parquet")     # or "folder", "tfds", "webdataset"
    muse-jax train ... --config.data.train_files='/data/laion/{00000..00099}.parquet'

Read by muse_jax/data/image_text.py (`make_dataset`, `Batches`). Fields the user must give
default to "" and are refused by make_dataset with a message naming them; empty image_key /
caption_key mean the common layout of the source read. File fields take a
pattern, a list of them, or several separated by whitespace or "::": brace ranges
(`{00000..00099}`), globs, local paths or gs:// URIs (muse_jax.paths.expand).
"""
import ml_collections

SOURCES = ("folder", "parquet", "tfds", "webdataset")


def get_config(source="parquet"):
    source = source or "parquet"
    if source not in SOURCES:
        raise ValueError(f"data source {source!r}: expected one of {SOURCES}")
    d = ml_collections.ConfigDict()
    d.name = "image_text"  # anything but "shapes" (which muse_jax/configs/shapes.py's data section reads)
    # "folder": folders of images + captions.jsonl lines {"file", "caption"} (`muse-jax data shapes --out`);
    # "parquet": image bytes + caption columns (Hugging Face datasets' parquet files);
    # "tfds": a tfds dataset prepared in array_record format (e.g. coco_captions), read without TF;
    # "webdataset": tar shards of {key}.jpg + {key}.txt members.
    d.source = source
    d.train_files = ""  # folder / parquet / webdataset: what to read (required)
    d.eval_files = ""  # the same for the eval split (required only when an eval split is read)
    # Parquet columns / tfds features. Parquet images: binary or Hugging Face's {"bytes", "path"} struct.
    # tfds keys may be nested: "captions/text" is the text of each entry of the captions sequence.
    # "" = the common layout of whichever source is read (so `--config.data.source=...` alone works):
    # parquet and tfds: "image".
    d.image_key = ""
    # The caption column / feature; webdataset: a sample's .txt member, else this field of its .json.
    # When it holds several captions (COCO: 5 per image), one is drawn per example and epoch.
    # "" = parquet: "text", else "caption"; tfds: "captions/text" (coco_captions); webdataset: "caption".
    d.caption_key = ""
    # The aesthetic score of each image (LAION's "aesthetic" or "AESTHETIC_SCORE"), a micro-condition
    # of aMUSEd: a parquet column, a field of webdataset's .json or of captions.jsonl lines, a tfds
    # feature. Batches carry it as "aesthetic_score"; NaN where a record has no number there (the
    # record is kept). "" = none: every score is NaN.
    d.aesthetic_key = ""
    d.tfds_name = "coco_captions" if source == "tfds" else ""  # tfds: "name", "name/config" or "name:version"
    d.tfds_data_dir = ""  # tfds: where it is prepared ("" = tfds's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
    d.tfds_train_split = "train"  # tfds split names; slices such as "train[:90%]" work
    d.tfds_eval_split = "val"  # coco_captions has train, val, test and restval

    # Pixels: the shorter side is resized to image_size (antialiased) and a square cropped from it.
    # image_size is the largest stage's pixel size; smaller stages area-downsample these images.
    d.image_size = 256
    # Skip images whose shorter side is below min_size (0 = keep all). Default: half of image_size
    # (follows it when image_size is set later): an image upscaled more than 2x trains the model on blur.
    d.min_size = d.get_ref("image_size") // 2
    # Skip images with long / short side above this (0 = keep all). Default 3: the centre square of a
    # 3:1 image still holds a third of it; from wider panoramas it rarely shows what the caption says.
    d.max_aspect_ratio = 3.0
    d.random_crop = False  # a random square along the long side (seeded per image and epoch), not the centre

    # Order: each process reads its own share, shuffled anew every epoch (train repeats forever).
    d.shuffle_seed = 0  # also seeds random crops and the caption drawn from several
    d.shuffle_buffer = 1000  # webdataset: examples held for shuffling after reading shards in random order
    # Decoding processes per host (grain mp_prefetch); 0: decode in the training process's threads.
    # benchmarks/input_pipeline.py measures images/s per worker: a muse_632m step on an H100 uses ~330 images/s.
    d.workers = 0
    d.batch_size = 32  # as in the shapes section (the training batch itself is config.train.batch_size)
    # `muse-jax data tokenize` computes each stage's tokens of this data once (muse_jax/training/tokenize.py);
    # then `--config.data.source=tokens` trains on them, read from tokens_dir ("" = W/tokens/train).
    d.tokens_dir = ""
    return d
