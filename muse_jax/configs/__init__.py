"""Named configs: `get_config(arg)` modules returning an `ml_collections.ConfigDict`.

  shapes            the embedded default (procedural shapes, CPU); shapes:long, its longer recipe
  smoke             the paper-shaped pipeline (real data, a tokenizer per stage) at laptop size
  paper:VARIANT     the paper's transformers: muse_632m, muse_3b, superres_268m
  vqgan:VARIANT     the paper's tokenizers: f16 (256 px), f8 (512 px)
  amused_finetune:VARIANT   fine-tuning an imported aMUSEd workdir: 256, 512, 256_lora, 512_lora
  t5:PRESET         a frozen pretrained T5 `text` section (not a whole config)
  data:SOURCE       a real image-text `data` section (not a whole config)

common.py is what shapes, smoke, paper and vqgan start from (every section at the paper's settings);
it is not a config of its own.

`NAMES` also lets a variant be named alone (`muse_3b` = `paper:muse_3b`).
"""

MODULES = ("shapes", "smoke", "paper", "vqgan", "amused_finetune", "t5", "data")  # t5 and data give one section, not a whole config
NAMES = {
    "shapes": ("shapes", None),
    "shapes_long": ("shapes", "long"),
    "smoke": ("smoke", None),
    "muse_632m": ("paper", "muse_632m"),
    "muse_3b": ("paper", "muse_3b"),
    "superres_268m": ("paper", "superres_268m"),
    "vqgan_f16_8192": ("vqgan", "f16"),
    "vqgan_f8_8192": ("vqgan", "f8"),
    "amused_256_finetune": ("amused_finetune", "256"),
    "amused_512_finetune": ("amused_finetune", "512"),
    "amused_256_lora": ("amused_finetune", "256_lora"),
    "amused_512_lora": ("amused_finetune", "512_lora"),
}
