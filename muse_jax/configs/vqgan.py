"""Paper-size VQGAN tokenizers (Muse: f16 at 256 px, f8 at 512 px; 8192 codes).

`--config vqgan:f16` (also named `vqgan_f16_8192`) or `--config vqgan:f8`. Everything but the
`vqgan` and `train_tokenizer` sections comes from the shapes config. The f16 variant has the
aMUSEd / open-muse VQGAN layout (diffusers VQModel: widths 128-256-256-512-768, 2 blocks per
resolution, 64-d codes, quant_conv, no attention), so `vqgan.load_diffusers_dir` weights fit.
"""
import ml_collections

from muse_jax.configs import shapes


def tokenizer_section(variant: str) -> ml_collections.ConfigDict:
    """{"vqgan": ..., "train_tokenizer": ...} of a variant: a `config.tokenizers.<name>` entry."""
    config = get_config(variant)
    return ml_collections.ConfigDict({"vqgan": config.vqgan.to_dict(), "train_tokenizer": config.train_tokenizer.to_dict()})


def get_config(arg=None):
    variant = arg or "f16"
    if variant not in ("f16", "f8"):
        raise ValueError(f"unknown variant {variant!r}: expected 'f16' or 'f8'")
    config = shapes.get_config()
    config.name = f"vqgan_{variant}_8192"
    v = config.vqgan
    v.channels = (128, 256, 256, 512, 768) if variant == "f16" else (128, 256, 512, 768)
    v.num_res_blocks = 2
    v.latent_channels = 64
    v.code_dim = 64
    v.codebook_size = 8192
    v.norm_groups = 32
    v.l2_normalize = False
    v.quant_conv = True
    v.mid_attention = False
    v.dtype = "bfloat16"
    t = config.train_tokenizer
    t.image_size = 256 if variant == "f16" else 512
    t.lowres_every = 0  # one resolution per tokenizer
    t.num_steps = 1_000_000
    t.batch_size = 256
    t.lr = 1e-4
    t.disc_lr = 1e-4
    t.warmup_steps = 10_000
    t.b1, t.b2 = 0.0, 0.99
    t.reconstruction_loss = "l1"
    t.restart_until = 100_000
    t.restart_every = 1000
    t.adversarial_weight = 0.1
    t.adversarial_loss = "non_saturating"
    t.disc_start = 20_000
    t.disc_channels, t.disc_layers, t.disc_norm_groups = 64, 3, 32
    t.lecam_weight = 0.001
    t.perceptual_weight = 0.1  # needs t.perceptual_weights_path (a VGG16 .npz, see vqgan_losses.py)
    t.log_every = 100
    t.checkpoint_every = 5000
    return config
