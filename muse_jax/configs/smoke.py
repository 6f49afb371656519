"""The paper-shaped pipeline at laptop size: check a dataset and a command line before a pod run.

    muse-jax train-tokenizer --config smoke --tokenizer all --workdir W \
        --config.data.train_files='DIR/{00000..00003}.tar'
    muse-jax train --config smoke --workdir W --config.data.train_files='DIR/{00000..00003}.tar'
    muse-jax sample --workdir W --prompt "a photo of a cat" --out cat.png

The same code path as muse_632m / superres_268m: a real-data source (webdataset shards by default;
any of muse_jax/configs/data.py's sources), a tokenizer per stage (f8 at 64 px for the base stage:
8x8 tokens; f8 at 128 px for super-res: 16x16 tokens, W/tokenizer/base and W/tokenizer/superres),
tokens computed inside the sharded train step, Adafactor, each stage trained from scratch. Text: a
small T5 trained jointly (no pretrained T5 can be downloaded here); with a T5 checkpoint, use
`config.text = t5.get_config(...)` and `config.text.checkpoint`. Sizes are for a CPU, not quality.
"""
import ml_collections

from muse_jax.configs import common, shapes


def _tokenizer(image_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "vqgan": {"channels": (16, 32, 32, 32)},  # f8: three downsamplings
        "train_tokenizer": {"image_size": image_size, "lowres_every": 0, "batch_size": 8},
    })


def get_config(arg=None):
    del arg
    config = common.get_config()
    config.name = "smoke"
    config.data.image_size = 128  # the super-res stage's pixels; the base stage area-downsamples to 64
    # data.get_config's skips hold here too: min_size follows image_size (64 px), max_aspect_ratio 3.
    config.data.shuffle_buffer = 64

    # The shapes tokenizer and T5 sizes, an f8 tokenizer per stage.
    config.vqgan = shapes.vqgan_section()
    config.tokenizers = ml_collections.ConfigDict({"base": _tokenizer(64), "superres": _tokenizer(128)})
    t = config.train_tokenizer
    t.update(shapes.TOKENIZER_TRAINING)
    t.num_steps, t.warmup_steps, t.log_every, t.checkpoint_every = 200, 20, 20, 100
    t.eval_batch_size, t.eval_max_batches = 16, 4
    config.text = shapes.text_section()
    config.text.encoder.update(dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4))

    small = dict(shapes.SMALL_STAGE, num_layers=2, width=64, mlp_dim=256, num_heads=2, text_dim=64)
    config.base.update(dict(small, grid_size=8, tokenizer="base"))
    config.superres.update(dict(small, grid_size=16, lowres_grid_size=8, num_lowres_layers=1, tokenizer="superres"))

    t = config.train  # Adafactor, each stage from scratch, as the paper configs
    t.num_steps, t.batch_size, t.lr, t.warmup_steps = 200, 8, 1e-3, 20
    t.log_every, t.checkpoint_every, t.sample_every, t.num_samples = 20, 100, 0, 4

    s = config.sample
    s.steps, s.guidance, s.guidance_schedule = 12, 2.0, "linear"
    s.batch_size = 4
    return config
