"""The paper's transformers (Muse sections 2.3, 2.4, 4): `get_config("muse_632m" | "muse_3b" | "superres_268m")`.

Each is muse_jax/configs/common.py's sections with one stage (`base` or `superres`) sized as below
and the paper's common settings: 8192 codes from an f16 VQGAN (base) and an f8 VQGAN (super-res),
frozen T5-XXL text embeddings 4096 wide, dropout 0.1, bf16 compute with remat, and the paper's
training (batch 512, Adafactor, 1M steps, lr 1e-4, 5000 warm-up steps). Nothing is cached: the
batches hold streamed images and caption ids, and the frozen VQGAN(s) and the frozen T5-XXL
encoder run inside the sharded train step (muse_jax/training/online.py), their parameters sharded
like the transformer's. That work is part of every step: for muse_632m at batch 512 the T5-XXL
encoder (6.1e14 FLOPs) and the VQGAN (1.1e14) exceed the transformer's 6.3e14 (with remat), and
`muse-jax plan` compiles and counts them. Train on a pod with e.g.
`--config.mesh.data=-1 --config.mesh.fsdp=8` (FSDP) or `--config.mesh.tensor=4`.

muse_3b: 48 layers, width 2048, MLP 8192, 32 heads; 256x256 images -> 16x16 tokens. This
  architecture (self-attention, cross-attention and MLP in every block, plus embeddings and head)
  has 3.27e9 parameters, the paper's "3B" rounded (tests/test_transformer.py checks it).
muse_632m: 16 layers, width 1536, MLP 6144, 24 heads (64-wide heads). The paper does not list this
  split; it keeps the 3B model's block design and head width and gives 6.39e8 parameters (632M + 1.1 %).
superres_268m: 16 low-res encoder layers + 32 high-res layers at width 1024, MLP 4096, 16 heads;
  16x16 low-res tokens -> 64x64 high-res tokens (256 -> 512 px through f8 VQGANs, 8192 codes). With
  self-attention, cross-attention and MLP in each high-res block and self-attention and MLP in each
  encoder block, this layer/width table gives 7.74e8 parameters, not the 268M of the name (a 1024/4096
  block alone has 12.6M-16.8M parameters, so 48 of them cannot total 268M); the test records the gap.
"""
import ml_collections

from muse_jax.configs import common, vqgan

SIZES = {
    "muse_632m": ("base", dict(grid_size=16, num_layers=16, width=1536, mlp_dim=6144, num_heads=24)),
    "muse_3b": ("base", dict(grid_size=16, num_layers=48, width=2048, mlp_dim=8192, num_heads=32)),
    "superres_268m": ("superres", dict(grid_size=64, lowres_grid_size=16, num_lowres_layers=16, num_layers=32,
                                       width=1024, mlp_dim=4096, num_heads=16)),
}


def get_config(arg=None):
    if arg not in SIZES:
        raise ValueError(f"paper config variant {arg!r}: expected one of {sorted(SIZES)}")
    stage, sizes = SIZES[arg]
    config = common.get_config()
    config.name = arg
    config[stage].update(sizes)
    # Real image-text data (webdataset shards by default; config.data.train_files must be given) and a
    # tokenizer per stage: f16 at 256 px for the base (16x16 tokens), f8 at 512 px for super-res
    # (64x64 tokens), each trained by `muse-jax train-tokenizer --tokenizer base|superres` (or
    # converted from diffusers weights) into W/tokenizer/<name>; tokens are computed in the train step.
    config.data.image_size = 512 if stage == "superres" else 256
    config.tokenizers = ml_collections.ConfigDict({"base": vqgan.tokenizer_section("f16"),
                                                   "superres": vqgan.tokenizer_section("f8")})
    config.base.tokenizer = "base"
    config.superres.tokenizer = "superres"
    return config
