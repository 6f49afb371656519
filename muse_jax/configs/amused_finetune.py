"""Fine-tuning the public aMUSEd weights on your own image-text data (an `import-amused` workdir).

    muse-jax import-amused --workdir W /path/to/amused-256        # a diffusers pipeline folder
    muse-jax train --workdir W --config amused_256_finetune --config.data.train_files='shards/{000..099}.tar'
    muse-jax train --workdir W --config amused_256_lora ...       # LoRA: only adapters trained and saved
    muse-jax sample --workdir W --prompt "..." --out out.png

Variants: `256` / `512` (full fine-tuning), `256_lora` / `512_lora`. The recipe follows diffusers'
aMUSEd training example (examples/amused): batch 8, AdamW at a constant 1e-4 (full) or 8e-4 (LoRA
rank 16), 10 % condition dropout to the empty prompt, random crops whose offsets and the images'
original sizes become the micro-conditions. Memory options for one accelerator: `config.model.dtype`
(compute), `config.train.param_dtype` and `config.train.optimizer_state_dtype` ("float32" or
"bfloat16" each), `config.model.remat` (recompute each transformer layer in the backward pass);
across several, `config.mesh.fsdp`. `muse-jax plan` prints the memory each setting needs.

The embedded check (`python benchmarks/finetune_shapes.py`: a random small aMUSEd-shaped workdir with a
shapes VQGAN, fine-tuned with this config at 64 px, `--steps 3000 --lr 2e-3 --warmup 100 --end-lr 0.1
--config.train.ema_decay=0.999`) goes from noise to one object of the caption's colour on a plain
background: colour right on 0.015 -> 0.225 of 200 shapes test captions, every attribute right on
0 -> 0.025, in 3000 steps (14.6 min on a 2-core Intel Xeon with AMX; docs/results.md, 2026-12-06).
"""
import ml_collections

from muse_jax.configs import common, data

VARIANTS = ("256", "512", "256_lora", "512_lora")


def get_config(arg=None):
    arg = arg or "256"
    if arg not in VARIANTS:
        raise ValueError(f"amused_finetune variant {arg!r}: expected one of {VARIANTS}")
    resolution = int(arg.split("_")[0])
    lora = arg.endswith("_lora")
    base = common.get_config()  # for the sections every run shares: mesh, partitioning, distributed
    config = ml_collections.ConfigDict()
    config.name = f"amused_{arg}_finetune" if not lora else f"amused_{arg}"
    config.family = "amused"
    config.seed = 0
    config.mesh = base.mesh
    config.partitioning = base.partitioning
    config.distributed = base.distributed

    config.data = data.get_config("webdataset")
    config.data.image_size = resolution  # the imported model's pixels (checked against the workdir)
    config.data.random_crop = True  # as aMUSEd was trained: the crop offsets are micro-conditions

    config.text = ml_collections.ConfigDict(dict(max_length=77))  # CLIP's context (the workdir's tokenizer)
    # Overrides of the imported UVit2D for this run: compute dtype ("float32" or "bfloat16"), remat of the
    # transformer layers, dropout.
    config.model = ml_collections.ConfigDict(dict(dtype="float32", remat=False, hidden_dropout=0.0))
    # The published architecture at this resolution, read ONLY by `muse-jax plan` (which has no workdir):
    # training builds W's own UVit2D, CLIP and VQGAN from the configs `import-amused` wrote.
    config.model.uvit = _uvit(resolution)
    config.model.clip = _clip()
    config.model.vqgan = _vqgan()

    # common's training fields (the divergence guard, precision, checkpoints, ...) at diffusers' recipe.
    t = config.train = base.train
    t.num_steps = 1000
    t.batch_size = 8  # global; must divide over the mesh's data*fsdp axes
    t.optimizer = "adamw"  # or "adafactor"
    t.lr = 8e-4 if lora else 1e-4
    t.b1, t.b2, t.weight_decay = 0.9, 0.999, 0.01
    t.warmup_steps = 0
    t.end_lr_fraction = 1.0  # constant learning rate
    t.label_smoothing = 0.0
    t.aesthetic_score = 6.0  # the micro-condition of records without one (config.data.aesthetic_key)
    t.param_dtype = "float32"  # "bfloat16": half the parameter memory
    t.optimizer_state_dtype = ""  # "" = the parameters' dtype; "float32" / "bfloat16"
    t.checkpoint_every = 250
    t.keep_checkpoints = 2  # besides checkpoint 0, the imported weights, which is always kept
    t.sample_every = 0
    t.num_samples = 4

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 16 if lora else 0  # 0: full fine-tuning
    config.lora.alpha = 32.0 if lora else 1.0  # adapters scaled by alpha / rank
    # Module paths (a regex) whose projections get adapters: the transformer layers' attention and MLP.
    config.lora.targets = r".*transformer_layers_\d+/(attn1|attn2|ff)/.*"
    config.lora.dropout = 0.0
    return config


def _uvit(resolution: int) -> ml_collections.ConfigDict:
    """aMUSEd-256/512's UVit2D (`models/uvit.py: UVit2DConfig` fields; dtype, remat and dropout are the
    run's `config.model` fields). From diffusers' transformer/config.json of the hub repos amused/amused-256
    and amused/amused-512 (diffusers 0.25): the two differ only in the 2x2 down/up-sampling around the
    transformer and the token grid (diffusers' scripts/convert_amused.py: sample_size 16 or 32, downsample =
    upsample = the 512 research run's force_down_up_sample). 603.5M and 608.3M parameters."""
    return ml_collections.ConfigDict(dict(
        hidden_size=1024, use_bias=False, cond_embed_dim=768, micro_cond_encode_dim=256, micro_cond_embed_dim=1280,
        encoder_hidden_size=768, vocab_size=8256, codebook_size=8192, in_channels=768, block_out_channels=768,
        num_res_blocks=3, downsample=resolution > 256, upsample=resolution > 256, block_num_heads=12,
        num_hidden_layers=22, num_attention_heads=16, attention_dropout=0.0, intermediate_size=2816,
        layer_norm_eps=1e-6, ln_elementwise_affine=True, sample_size=resolution // 16))


def _clip() -> ml_collections.ConfigDict:
    """CLIP-L/14's text tower with its projection (aMUSEd's text_encoder, a CLIPTextModelWithProjection;
    Hugging Face's CLIPTextConfig field names, `models/clip.py: CLIPConfig.from_hf`). 123.7M parameters."""
    return ml_collections.ConfigDict(dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))


def _vqgan() -> ml_collections.ConfigDict:
    """aMUSEd's f16 VQ-GAN as a `models/vqgan.py: VQGANConfig`: what `vqgan_diffusers.config_from_diffusers`
    makes of diffusers' vqvae/config.json of amused/amused-256 and amused-512 (the same VQModel: widths
    128, 256, 256, 512, 768, 2 resnets per level, 64 latent channels, 8192 codes, no mid-block attention;
    also diffusers' scripts/convert_amused.py `make_vqvae`)."""
    return ml_collections.ConfigDict(dict(
        channels=(128, 256, 256, 512, 768), num_res_blocks=2, latent_channels=64, codebook_size=8192, code_dim=64,
        norm_groups=32, in_channels=3, out_channels=3, downsample="conv", mid_attention=False, quant_conv=True,
        l2_normalize=False, pixel_range="0,1"))
