"""The embedded default: the whole Muse pipeline on the procedural shapes dataset (CPU).

Usage: `muse-jax <command> --config shapes --config.data.batch_size=64`.
Each stage of the pipeline has its own section.

  shapes        the quickstart: sized for ~20 minutes on a 2-core CPU without AVX-512/AMX
  shapes:long   a tokenizer per stage and a 16x16-token base stage, trained longer, with text
                alignment measured at four checkpoints of training (about an hour on that CPU)
"""
import ml_collections


def get_config(arg=None):
    if arg not in (None, "", "long"):
        raise ValueError(f"config shapes:{arg}: unknown variant (expected shapes or shapes:long)")
    config = ml_collections.ConfigDict()
    config.name = "shapes"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"
    config.data.seed = 0  # dataset seed: examples are a function of (seed, split, index)
    config.data.num_train = 10_000
    config.data.num_test = 1_000
    # "tfds": build once with tfds (array_record) and read with grain;
    # "procedural": render on the fly (same examples for the same indices).
    config.data.source = "tfds"
    config.data.batch_size = 32
    config.data.shuffle_seed = 0

    # Device mesh: axis sizes; -1 takes the devices left over (at most one axis).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    # Logical-axis rules: None = muse_jax/training/partitioning.py's DEFAULT_RULES; or a tuple of
    # (logical name, mesh axis | tuple of axes | None). DP/FSDP/TP are changes of config.mesh only.
    config.partitioning = ml_collections.ConfigDict()
    config.partitioning.rules = None

    # Multi-process start-up (muse_jax/distributed.py; launch/*). cluster: "auto" (explicit values
    # or MUSE_* env, else SLURM with >1 task, else a Cloud TPU pod, else one process), "explicit",
    # "slurm", "tpu" or "none". Unset: coordinator_address "", num_processes 0, process_id -1.
    d = config.distributed = ml_collections.ConfigDict()
    d.cluster = "auto"
    d.coordinator_address = ""  # "host:port" of process 0
    d.num_processes = 0
    d.process_id = -1
    d.local_device_ids = ""  # e.g. "0,1"; "" = all local devices (one per process under SLURM GPU)
    d.initialization_timeout_s = 300  # wait this long for all processes to join
    d.heartbeat_timeout_s = 100  # a silent peer is declared dead (all others abort) after this
    d.shutdown_timeout_s = 300
    d.step_timeout_s = 0  # watchdog: exit if no train step completes for this long (0 = off)
    # A stage's or tokenizer's LOCK (one run writes it at a time) is taken over once its holder's pid is
    # gone from this host, or its heartbeat is this old (the holder renews it every tenth of this).
    d.lock_timeout_s = 600

    # VQGAN tokenizer (muse_jax/models/vqgan.py): 64x64 -> 16x16 tokens (f4 = 3 widths).
    config.vqgan = ml_collections.ConfigDict()
    config.vqgan.channels = (16, 32, 32)
    config.vqgan.num_res_blocks = 1
    config.vqgan.latent_channels = 16
    config.vqgan.code_dim = 16
    config.vqgan.codebook_size = 512
    config.vqgan.norm_groups = 4
    # Per-position norms: with GroupNorm a background patch's code depends on the rest of the image
    # (20-64 codes for one plain corner), which the transformer then cannot predict.
    config.vqgan.norm = "layer"
    config.vqgan.beta = 0.25
    config.vqgan.l2_normalize = True
    config.vqgan.downsample = "conv"
    config.vqgan.mid_attention = False
    config.vqgan.quant_conv = False
    config.vqgan.dtype = "float32"

    # Tokenizer training (muse_jax/training/train_tokenizer.py, tokenizer_step.py).
    t = config.train_tokenizer = ml_collections.ConfigDict()
    t.num_steps = 1200
    t.batch_size = 8
    t.image_size = 64  # below the shapes images' 64 px: they are area-downsampled to it
    # Every lowres_every-th batch is area-downsampled to 32 px, the base stage's resolution: one
    # tokenizer serves both stages (the paper trains one per resolution). 0 = 64 px only.
    t.lowres_every = 3
    t.lr = 2e-3
    t.disc_lr = 2e-4
    t.warmup_steps = 100
    t.end_lr_fraction = 0.05
    t.b1, t.b2, t.weight_decay, t.grad_clip = 0.9, 0.99, 0.0, 1.0
    t.reconstruction_loss = "l2"  # "l1" or "l2"
    t.rec_weight = 1.0
    # Codebook safeguards: dead-code restarts (plus config.vqgan.l2_normalize).
    t.restart_dead_codes = True
    t.usage_decay = 0.99
    t.dead_code_fraction = 0.03  # dead: usage EMA < fraction / codebook_size
    t.restart_every = 50
    t.restart_until = 900
    # Adversarial loss (off when adversarial_weight == 0): patch discriminator.
    t.adversarial_weight = 0.0
    t.adversarial_loss = "hinge"  # or "non_saturating"
    t.disc_start = 1000
    t.disc_channels, t.disc_layers, t.disc_norm_groups = 64, 3, 32
    t.r1_weight = 0.0
    t.lecam_weight = 0.0
    t.lecam_decay = 0.99
    # Perceptual loss (off when 0): VGG16 weights from a user-supplied .npz, never downloaded.
    t.perceptual_weight = 0.0
    t.perceptual_weights_path = ""
    t.log_every = 50
    t.checkpoint_every = 500
    t.keep_checkpoints = 2
    t.eval_batch_size = 100
    t.eval_max_batches = 0  # 0: the whole test split

    # Text conditioning (muse_jax/data/text.py, muse_jax/models/t5.py): no pretrained T5 can be
    # downloaded here, so a small T5 v1.1-style encoder is trained from scratch with a
    # sentencepiece vocabulary trained on the captions (stored as W/text/spm.model).
    # For a pretrained frozen T5, use muse_jax/configs/t5.py's section instead.
    config.text = ml_collections.ConfigDict()
    config.text.vocab_size = 256  # sentencepiece (soft limit; 256 pieces on shapes captions)
    config.text.spm_model_type = "bpe"  # unigram keeps ~62 pieces here and splits words into letters
    config.text.spm_model = ""  # "" = train on the captions into W/text/spm.model
    # Longest caption measured on 5000 train captions: 19 pieces + EOS = 20 tokens.
    config.text.max_length = 32
    config.text.checkpoint = ""  # "" = random init; or a Hugging Face T5 checkpoint (load_hf)
    config.text.trainable = True  # trained with the transformer; False: frozen + embedding cache
    config.text.cache_dtype = "float32"  # cached embeddings when frozen (data/text_cache.py)
    config.text.encoder = ml_collections.ConfigDict(dict(  # muse_jax.models.t5.T5Config fields
        vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        dtype="float32", param_dtype="float32"))

    # Masked transformers (muse_jax/models/transformer.py; fields of TransformerConfig).
    # Text: each stage trains its own copy of the small T5 above jointly (config.text.trainable),
    # so the two stages are independent; with trainable=False both read cached frozen embeddings.
    # Base: 32x32 px (the 64x64 image area-downsampled by 2) -> 8x8 tokens.
    config.base = ml_collections.ConfigDict(dict(
        codebook_size=512, grid_size=8, num_layers=4, width=128, mlp_dim=512, num_heads=4,
        text_dim=128, dropout_rate=0.0, attention_dropout_rate=0.0, layer_norm_epsilon=1e-6,
        dtype="float32", remat=False, lowres_grid_size=0, num_lowres_layers=0, tokenizer="",
        attention="xla", attention_block_size=512, patch_size=1))
    # tokenizer: "" = the shared W/tokenizer; a name of config.tokenizers = W/tokenizer/<name>.
    # attention: "xla" (the [lq, lk] logits at once), "blockwise" (memory O(block^2)), "fused"
    # (jax.nn.dot_product_attention: cuDNN on GPU) or "auto" (muse_jax/models/layers.py).
    # patch_size: tokens per side of one position of the predicting stack (1: one token per position).
    # Super-res: 8x8 base tokens -> 16x16 tokens of the 64x64 image. lowres_add: the encoded base
    # tokens are also added under the 2x2 high-res tokens each covers (Muse: cross-attention only).
    config.superres = ml_collections.ConfigDict(dict(
        codebook_size=512, grid_size=16, num_layers=4, width=128, mlp_dim=512, num_heads=4,
        text_dim=128, dropout_rate=0.0, attention_dropout_rate=0.0, layer_norm_epsilon=1e-6,
        dtype="float32", remat=False, lowres_grid_size=8, num_lowres_layers=2, lowres_add=True, tokenizer="",
        attention="xla", attention_block_size=512, patch_size=1))

    # Transformer training (muse_jax/training/{optimizer,step,loop}.py), shared by both stages.
    t = config.train = ml_collections.ConfigDict()
    t.num_steps = 1700
    t.batch_size = 16  # global; must divide over the mesh's data*fsdp axes
    t.optimizer = "adamw"  # or "adafactor"
    t.lr = 2e-3  # the paper's 1e-4 is for its 632M/3B models; tiny models take a larger step
    t.b1, t.b2, t.weight_decay = 0.9, 0.96, 0.045  # the paper's AdamW
    t.warmup_steps = 100
    t.end_lr_fraction = 0.1  # cosine decay to lr * this at num_steps
    t.grad_clip = 1.0
    t.label_smoothing = 0.1
    t.mask_schedule = "cosine"  # training mask rates ~ truncated arccos
    # Times each train example of a scene kind appears per epoch (1, 1, 1: the dataset's own mix,
    # half one-object scenes; muse_jax/data/shapes.py's P_KIND).
    t.kind_repeats = ml_collections.ConfigDict(dict(one=1, relation=1, places=1))
    t.text_drop_rate = 0.1  # captions replaced by the empty prompt (classifier-free guidance)
    t.init_from = ""  # "" = random init; "base": start from the trained base stage's weights (super-res)
    t.ema_decay = 0.0  # > 0 keeps EMA weights (used for sampling)
    t.log_every = 50
    t.checkpoint_every = 500
    t.keep_checkpoints = 2
    t.keep_every = 0  # > 0: also keep every checkpoint whose step is a multiple (for `muse-jax ema`)
    # Divergence guard (muse_jax/training/checkpoint.py, DivergenceGuard): besides a NaN/inf loss, the run
    # stops when a step's loss is over this factor x the median loss of the previous 100 steps, or when the
    # parameters' global norm is over this factor x their norm at the start of the run; 0 = that check off.
    # No checkpoint is saved after a blow-up, so the newest checkpoint is the last healthy one (health.json).
    t.divergence_loss_factor = 10.0
    t.divergence_param_factor = 10.0
    t.sample_every = 1000
    t.num_samples = 8
    # "default": the backend's fast matmul, float32 accumulation (TPU: bfloat16 multiplies; an AMX CPU:
    # oneDNN bfloat16 multiplies); "highest": float32 multiplies (muse_jax/precision.py).
    t.matmul_precision = "default"
    t.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind (none for CPU)
    t.compilation_cache_dir = "{workdir}/cache/jax"  # persistent XLA cache ("" = off)
    # Per-stage overrides of config.train (super-res steps see 256 tokens per image, 4x the base's).
    config.train_base = ml_collections.ConfigDict()
    # The super-res stage starts from the trained base's weights (init_from; a departure from Muse,
    # which trains each stage from scratch).
    config.train_superres = ml_collections.ConfigDict(dict(batch_size=8, num_steps=650, init_from="base"))

    # Sampling and editing (muse_jax/sampling.py, editing.py, cascade.py; `muse-jax sample|edit`).
    # Muse uses 24 base / 8 super-res steps for 256 / 4096 tokens; 8x8 base tokens need fewer.
    # LoRA fine-tuning (muse_jax/models/lora.py) of a workdir started from another (`train --init-from W0`):
    # rank > 0 trains only low-rank adapters on the blocks' attention and MLP kernels; the weights stay W0's.
    config.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=1.0, targets=r".*block_\d+/(self_attention|cross_attention|mlp/wi|mlp/wo)", dropout=0.0))

    s = config.sample = ml_collections.ConfigDict()
    s.steps = 12  # base decoding steps
    s.sr_steps = 8  # super-resolution decoding steps
    s.guidance = 1.0  # classifier-free guidance g: logits = (1 + g) cond - g uncond
    s.guidance_schedule = "constant"  # or "linear": g ramps up from 0 over the steps (Muse 2.7)
    s.choice_temperature = 4.5  # Gumbel noise on confidences, annealed to 0 (MaskGIT)
    s.temperature = 0.5  # sampling temperature on the logits
    s.top_k = 0  # 0: sample from the whole codebook
    s.schedule = "cosine"  # mask schedule (muse_jax.masking.SCHEDULES)
    s.negative_prompt = ""  # the unconditional branch's prompt
    s.batch_size = 16  # images per compiled program (padded; sharded over data*fsdp)
    s.edit_iterations = 12  # mask-free editing: re-sampling iterations per scale
    s.edit_fraction = 0.08  # mask-free editing: least confident share re-sampled per iteration
    s.edit_choice_temperature = 1.0  # mask-free editing: Gumbel noise on confidences, annealed
    s.matmul_precision = "default"  # as config.train.matmul_precision, for the sampling programs
    s.scheduler = "muse"  # the decode loop's scheduler (sampling.SCHEDULERS; "amused": aMUSEd's)
    s.strength = 0.0  # > 0: `edit` without a mask is image-to-image at this strength (scheduler "amused")
    s.inpaint_schedule = ""  # the mask schedule of inpainting ("": `schedule`)
    s.micro_conditioning = ()  # aMUSEd's micro-conditions (width, height, crop top, crop left, aesthetic)

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
