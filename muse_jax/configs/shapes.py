"""The embedded default: the whole Muse pipeline on the procedural shapes dataset (CPU).

Usage: `muse-jax <command> --config shapes --config.data.batch_size=64`.
Each stage of the pipeline has its own section.

  shapes        the quickstart: sized for ~20 minutes on a 2-core CPU without AVX-512/AMX
  shapes:long   a tokenizer per stage and a 16x16-token base stage, trained longer, with text
                alignment measured at four checkpoints of training (about an hour on that CPU)

`muse-jax quickstart --workdir W` (shapes) reaches 17.0 % of 200 test prompts fully right (one
object with a seen colour-shape pair 48 %) and a 28.7 dB tokenizer in 16.9 min on a 2-core AMD EPYC;
`--config shapes:long`: 43.5 % (seen pairs 90 %, held-out pairs 76 %) in 68.0 min there
(docs/results.md, 2026-12-02 and 2026-12-03).

Every section not set here is muse_jax/configs/common.py's.
"""
import ml_collections

from muse_jax.configs import common

# Tokenizer training on shapes (over common's): 64 px images, and every third batch at 32 px, the base
# stage's resolution, so one tokenizer serves both stages (the paper trains one per resolution); no
# adversarial or perceptual loss.
TOKENIZER_TRAINING = dict(
    num_steps=1200, batch_size=8, image_size=64, lowres_every=3, lr=2e-3, disc_lr=2e-4, warmup_steps=100, b1=0.9,
    reconstruction_loss="l2", restart_every=50, restart_until=900, adversarial_weight=0.0, adversarial_loss="hinge",
    disc_start=1000, lecam_weight=0.0, perceptual_weight=0.0, log_every=50, checkpoint_every=500)
# The transformers' size on shapes (over common's); each stage sets its token grids.
SMALL_STAGE = dict(codebook_size=512, num_layers=4, width=128, mlp_dim=512, num_heads=4, text_dim=128,
                   dropout_rate=0.0, dtype="float32", remat=False, attention="xla")


def get_config(arg=None):
    if arg not in (None, "", "long"):
        raise ValueError(f"config shapes:{arg}: unknown variant (expected shapes or shapes:long)")
    config = common.get_config()
    config.name = "shapes"

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"
    config.data.seed = 0  # dataset seed: examples are a function of (seed, split, index)
    config.data.num_train = 10_000
    config.data.num_test = 1_000
    # "array_record": built once (tfds's builder, array_record files) and read with grain;
    # "procedural": render on the fly (same examples for the same indices).
    config.data.source = "array_record"
    config.data.batch_size = 32
    config.data.shuffle_seed = 0

    config.vqgan = vqgan_section()
    config.train_tokenizer.update(TOKENIZER_TRAINING)
    config.text = text_section()

    # Masked transformers. Text: each stage trains its own copy of the small T5 above jointly
    # (config.text.trainable), so the two stages are independent; with trainable=False both read cached
    # frozen embeddings. Base: 32x32 px (the 64x64 image area-downsampled by 2) -> 8x8 tokens.
    config.base.update(dict(SMALL_STAGE, grid_size=8))
    # Super-res: 8x8 base tokens -> 16x16 tokens of the 64x64 image, the base tokens also added under the
    # 2x2 high-res tokens each covers (lowres_add).
    config.superres.update(dict(SMALL_STAGE, grid_size=16, lowres_grid_size=8, num_lowres_layers=2))

    t = config.train
    t.num_steps = 1700
    t.batch_size = 16
    t.optimizer = "adamw"
    t.lr = 2e-3  # the paper's 1e-4 is for its 632M/3B models; tiny models take a larger step
    t.warmup_steps = 100
    # Times each train example of a scene kind appears per epoch (1, 1, 1: the dataset's own mix,
    # half one-object scenes; muse_jax/data/shapes.py's P_KIND).
    t.kind_repeats = ml_collections.ConfigDict(dict(one=1, relation=1, places=1))
    # Super-res steps see 256 tokens per image, 4x the base's. The super-res stage starts from the
    # trained base's weights (init_from; a departure from Muse, which trains each stage from scratch).
    config.train_superres = ml_collections.ConfigDict(dict(batch_size=8, num_steps=650, init_from="base"))

    # Muse uses 24 base / 8 super-res steps for 256 / 4096 tokens; 8x8 base tokens need fewer.
    config.sample.steps = 12
    config.sample.guidance_schedule = "constant"

    # The quickstart's evaluation (muse_jax/quickstart.py -> `muse-jax eval`).
    q = config.quickstart = ml_collections.ConfigDict()
    q.eval_prompts = 200  # test-split prompts, equally over the four groups
    # Decoding sweeps, off in the quickstart (`muse-jax eval --sweep-steps 4,8,12,24 --sweep-guidance 0,1,3,5`):
    # base decoding steps and guidance scales, with the time per image beside each.
    q.sweep_steps = ()
    q.sweep_guidance = ()
    q.sweep_prompts = 32  # a multiple of config.sample.batch_size: no padded images in the timings
    q.tokenizer_images = 300  # test images for PSNR/SSIM/rFID
    q.detector_images = 500  # real test images the detector must judge >= 99 % right first
    q.stage_images = 32  # test images of one and of two objects (each) scored stage by stage (0: skip)
    q.curve_points = 0  # > 0: text alignment at this many evenly spaced checkpoints (kept: train.keep_every)
    if arg == "long":
        _long(config)
    return config


def vqgan_section() -> ml_collections.ConfigDict:
    """The shapes VQGAN (muse_jax/models/vqgan.py): 64x64 -> 16x16 tokens (f4 = 3 widths), 512 codes."""
    # Per-position norms: with GroupNorm a background patch's code depends on the rest of the image
    # (20-64 codes for one plain corner), which the transformer then cannot predict.
    return ml_collections.ConfigDict(dict(
        channels=(16, 32, 32), num_res_blocks=1, latent_channels=16, code_dim=16, codebook_size=512, norm_groups=4,
        norm="layer", beta=0.25, l2_normalize=True, downsample="conv", mid_attention=False, quant_conv=False,
        dtype="float32"))


def text_section() -> ml_collections.ConfigDict:
    """Text conditioning (muse_jax/data/text.py, muse_jax/models/t5.py): no pretrained T5 can be
    downloaded here, so a small T5 v1.1-style encoder is trained from scratch with a sentencepiece
    vocabulary trained on the captions (stored as W/text/spm.model). For a pretrained frozen T5, use
    muse_jax/configs/t5.py's section instead."""
    text = ml_collections.ConfigDict()
    text.vocab_size = 256  # sentencepiece (soft limit; 256 pieces on shapes captions)
    text.spm_model_type = "bpe"  # unigram keeps ~62 pieces here and splits words into letters
    text.spm_model = ""  # "" = train on the captions into W/text/spm.model
    # Longest caption measured on 5000 train captions: 19 pieces + EOS = 20 tokens.
    text.max_length = 32
    text.checkpoint = ""  # "" = random init; or a Hugging Face T5 checkpoint (load_hf)
    text.trainable = True  # trained with the transformer; False: frozen + embedding cache
    text.cache_dtype = "float32"  # cached embeddings when frozen (data/text_cache.py)
    text.encoder = ml_collections.ConfigDict(dict(  # muse_jax.models.t5.T5Config fields
        vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        dtype="float32", param_dtype="float32"))
    return text


def _long(config):
    """shapes:long: the paper's layout on shapes. A tokenizer per stage: the base stage sees the whole
    scene at 32 px through an f2 VQGAN (16x16 tokens, a small object ~3.5 tokens wide; the default's
    8x8 tokens of f4 at 32 px lose the shapes of small objects), and super-res maps those to 16x16 f4
    tokens of the 64 px image. The base tokenizer is twice the default's width and trains 2000 steps: at
    half of either, a fifth of the small objects in two-object scenes lose their outline (read as circles).
    The super-res tokenizer trains twice the default's steps (1200 keep 72 % of two-object scenes, 2400 91 %).
    Each transformer trains longer; kept checkpoints give the training curve."""
    config.name = "shapes_long"
    config.train_tokenizer.update(dict(num_steps=2400, lowres_every=0, restart_until=1800))
    config.tokenizers = ml_collections.ConfigDict({
        "base": {"vqgan": {"channels": (32, 64), "latent_channels": 32, "code_dim": 32},
                 "train_tokenizer": {"image_size": 32, "batch_size": 16, "num_steps": 2000, "restart_until": 1500}},
        "superres": {"vqgan": {}},
    })
    config.base.update(dict(grid_size=16, tokenizer="base"))
    config.superres.update(dict(lowres_grid_size=16, tokenizer="superres"))
    t = config.train
    t.num_steps, t.checkpoint_every, t.keep_every, t.sample_every = 3000, 750, 750, 0
    config.train_superres.update(dict(num_steps=1200, checkpoint_every=300, keep_every=300))
    config.quickstart.curve_points = 4
