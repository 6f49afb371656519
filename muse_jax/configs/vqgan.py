"""Paper-size VQGAN tokenizers (Muse: f16 at 256 px, f8 at 512 px; 8192 codes).

`--config vqgan:f16` (also named `vqgan_f16_8192`) or `--config vqgan:f8`: muse_jax/configs/common.py,
whose tokenizer is the f16 one (the aMUSEd / open-muse VQGAN layout: diffusers VQModel widths
128-256-256-512-768, 2 blocks per resolution, 64-d codes, quant_conv, no attention, so
`vqgan.load_diffusers_dir` weights fit); f8 drops one downsampling and trains at 512 px. Real data:
`--config.data.train_files=...` (webdataset shards; any source of muse_jax/configs/data.py).
"""
import ml_collections

from muse_jax.configs import common


def tokenizer_section(variant: str) -> ml_collections.ConfigDict:
    """{"vqgan": ..., "train_tokenizer": ...} of a variant: a `config.tokenizers.<name>` entry."""
    config = get_config(variant)
    return ml_collections.ConfigDict({"vqgan": config.vqgan.to_dict(), "train_tokenizer": config.train_tokenizer.to_dict()})


def get_config(arg=None):
    variant = arg or "f16"
    if variant not in ("f16", "f8"):
        raise ValueError(f"unknown variant {variant!r}: expected 'f16' or 'f8'")
    config = common.get_config()  # its vqgan and train_tokenizer sections: f16 at 256 px
    config.name = f"vqgan_{variant}_8192"
    if variant == "f8":
        config.vqgan.channels = (128, 256, 512, 768)
        config.train_tokenizer.image_size = config.data.image_size = 512
    return config
