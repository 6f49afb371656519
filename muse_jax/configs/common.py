"""What the Muse configs share: every section, at the paper's settings where the paper gives them.

Not a config to train with by itself (its data section names no files): shapes, smoke, paper and
vqgan each start from `get_config()` and set what is theirs, and amused_finetune takes its mesh,
partitioning and multi-process sections.

  mesh, partitioning, distributed   the device mesh, logical-axis rules and multi-process start-up
  data        real image-text data (muse_jax/configs/data.py; webdataset shards at 256 px)
  vqgan, train_tokenizer   the paper's f16 tokenizer at 256 px, 8192 codes (vqgan:f8 for 512 px)
  text        a frozen T5-XXL (muse_jax/configs/t5.py; needs config.text.checkpoint)
  base, superres   the Muse-632M base stage and the super-resolution stage (16x16 -> 64x64 tokens)
  train       the paper's training: batch 512, Adafactor, lr 1e-4, 5000 warm-up steps, 1M steps
  lora, sample   no adapters; 24 base / 8 super-res decoding steps, guidance ramped up linearly
"""
import ml_collections

from muse_jax.configs import data, t5


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.name = "common"
    config.seed = 0
    config.data = data.get_config("webdataset")
    config.mesh = mesh()
    config.partitioning = ml_collections.ConfigDict()
    # Logical-axis rules: None = muse_jax/partitioning.py's DEFAULT_RULES; or a tuple of
    # (logical name, mesh axis | tuple of axes | None). DP/FSDP/TP are changes of config.mesh only.
    config.partitioning.rules = None
    config.distributed = distributed()

    # The image tokenizer (muse_jax/models/vqgan.py): f16 at 256 px, the aMUSEd / open-muse VQGAN layout
    # (diffusers VQModel: widths 128-256-256-512-768, 2 blocks per resolution, 64-d codes, quant_conv,
    # no attention), so `vqgan.load_diffusers_dir` weights fit.
    config.vqgan = ml_collections.ConfigDict(dict(
        channels=(128, 256, 256, 512, 768), num_res_blocks=2, latent_channels=64, code_dim=64, codebook_size=8192,
        norm_groups=32, norm="layer", beta=0.25, l2_normalize=False, downsample="conv", mid_attention=False,
        quant_conv=True, dtype="bfloat16"))

    # Tokenizer training (muse_jax/training/train_tokenizer.py, tokenizer_step.py).
    t = config.train_tokenizer = ml_collections.ConfigDict()
    t.num_steps = 1_000_000
    t.batch_size = 256
    t.image_size = 256
    # Every lowres_every-th batch is area-downsampled to half size (one tokenizer for two stages); 0 = off.
    t.lowres_every = 0
    t.lr = 1e-4
    t.disc_lr = 1e-4
    t.warmup_steps = 10_000
    t.end_lr_fraction = 0.05
    t.b1, t.b2, t.weight_decay, t.grad_clip = 0.0, 0.99, 0.0, 1.0
    t.reconstruction_loss = "l1"  # "l1" or "l2"
    t.rec_weight = 1.0
    # Codebook safeguards: dead-code restarts (plus config.vqgan.l2_normalize).
    t.restart_dead_codes = True
    t.usage_decay = 0.99
    t.dead_code_fraction = 0.03  # dead: usage EMA < fraction / codebook_size
    t.restart_every = 1000
    t.restart_until = 100_000
    # Adversarial loss (off when adversarial_weight == 0): patch discriminator.
    t.adversarial_weight = 0.1
    t.adversarial_loss = "non_saturating"  # or "hinge"
    t.disc_start = 20_000
    t.disc_channels, t.disc_layers, t.disc_norm_groups = 64, 3, 32
    t.r1_weight = 0.0
    t.lecam_weight = 0.001
    t.lecam_decay = 0.99
    # Perceptual loss (off when 0): VGG16 weights from a user-supplied .npz (vqgan_losses.py), never downloaded.
    t.perceptual_weight = 0.1
    t.perceptual_weights_path = ""
    t.log_every = 100
    t.checkpoint_every = 5000
    t.keep_checkpoints = 2
    t.eval_batch_size = 100
    t.eval_max_batches = 0  # 0: the whole eval split

    config.text = t5.get_config("t5-v1_1-xxl")  # frozen; needs config.text.checkpoint (and spm_model)

    # Masked transformers (muse_jax/models/transformer.py; fields of TransformerConfig).
    # tokenizer: "" = the shared W/tokenizer; a name of config.tokenizers = W/tokenizer/<name>.
    # attention: "xla" (the [lq, lk] logits at once), "blockwise" (memory O(block^2)), "fused"
    # (jax.nn.dot_product_attention: cuDNN on GPU) or "auto" (muse_jax/models/layers.py).
    # patch_size: tokens per side of one position of the predicting stack (1: one token per position).
    # lowres_add (super-res): the encoded low-res tokens are also added under the high-res tokens each
    # covers (Muse: cross-attention only).
    config.base = ml_collections.ConfigDict(dict(
        codebook_size=8192, grid_size=16, num_layers=16, width=1536, mlp_dim=6144, num_heads=24,
        text_dim=4096, dropout_rate=0.1, attention_dropout_rate=0.0, layer_norm_epsilon=1e-6,
        dtype="bfloat16", remat=True, lowres_grid_size=0, num_lowres_layers=0, tokenizer="",
        attention="xla", attention_block_size=512, patch_size=1))
    # 4096 tokens: the full attention matrix would be ~1 GiB per example and layer, hence blockwise.
    config.superres = ml_collections.ConfigDict(dict(
        codebook_size=8192, grid_size=64, num_layers=32, width=1024, mlp_dim=4096, num_heads=16,
        text_dim=4096, dropout_rate=0.1, attention_dropout_rate=0.0, layer_norm_epsilon=1e-6,
        dtype="bfloat16", remat=True, lowres_grid_size=16, num_lowres_layers=16, lowres_add=True, tokenizer="",
        attention="blockwise", attention_block_size=512, patch_size=1))

    # Transformer training (muse_jax/training/{optimizer,step,loop}.py), shared by both stages.
    t = config.train = ml_collections.ConfigDict()
    t.num_steps = 1_000_000
    t.batch_size = 512  # global; must divide over the mesh's data*fsdp axes
    t.optimizer = "adafactor"  # or "adamw"
    t.lr = 1e-4
    t.b1, t.b2, t.weight_decay = 0.9, 0.96, 0.045  # the paper's AdamW
    t.warmup_steps = 5000
    t.end_lr_fraction = 0.1  # cosine decay to lr * this at num_steps
    t.grad_clip = 1.0
    t.label_smoothing = 0.1
    t.mask_schedule = "cosine"  # training mask rates ~ truncated arccos
    t.text_drop_rate = 0.1  # captions replaced by the empty prompt (classifier-free guidance)
    t.init_from = ""  # "" = random init; "base": start from the trained base stage's weights (super-res)
    t.ema_decay = 0.0  # > 0 keeps EMA weights (used for sampling)
    t.log_every = 50
    t.checkpoint_every = 500
    t.keep_checkpoints = 2
    t.keep_every = 0  # > 0: also keep every checkpoint whose step is a multiple (for `muse-jax ema`)
    # Divergence guard (muse_jax/checkpoint.py, DivergenceGuard): besides a NaN/inf loss, the run
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
    # Per-stage overrides of config.train (e.g. a smaller super-res batch).
    config.train_base = ml_collections.ConfigDict()
    config.train_superres = ml_collections.ConfigDict()

    # LoRA fine-tuning (muse_jax/models/lora.py) of a workdir started from another (`train --init-from W0`):
    # rank > 0 trains only low-rank adapters on the blocks' attention and MLP kernels; the weights stay W0's.
    config.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=1.0, targets=r".*block_\d+/(self_attention|cross_attention|mlp/wi|mlp/wo)", dropout=0.0))

    # Sampling and editing (muse_jax/sampling.py, editing.py, cascade.py; `muse-jax sample|edit`).
    s = config.sample = ml_collections.ConfigDict()
    s.steps = 24  # base decoding steps (Muse 2.8: 24 for 256 tokens)
    s.sr_steps = 8  # super-resolution decoding steps (8 for 4096 tokens)
    s.guidance = 1.0  # classifier-free guidance g: logits = (1 + g) cond - g uncond
    s.guidance_schedule = "linear"  # g ramps up from 0 over the steps (Muse 2.7), or "constant"
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
    return config


def mesh() -> ml_collections.ConfigDict:
    """Device mesh: axis sizes; -1 takes the devices left over (at most one axis)."""
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def distributed() -> ml_collections.ConfigDict:
    """Multi-process start-up (muse_jax/distributed.py; launch/*)."""
    # cluster: "auto" (explicit values or MUSE_* env, else SLURM with >1 task, else a Cloud TPU pod, else
    # one process), "explicit", "slurm", "tpu" or "none". Unset: coordinator_address "", num_processes 0,
    # process_id -1.
    d = ml_collections.ConfigDict()
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
    return d
