"""Muse-632M base transformer: 16 layers, width 1536, MLP 6144, 24 heads (64-wide heads).

256x256 images through an f16 VQGAN (8192 codes) -> 16x16 tokens; frozen T5-XXL text
embeddings (4096 wide, cached). The paper does not list this split; 16 x 1536 keeps the
3B model's block design and head width (64) and gives 6.39e8 parameters (632M + 1.1 %,
tests/test_transformer.py checks it). Mesh as for muse_3b, e.g.
`--config.mesh.data=-1 --config.mesh.fsdp=8` (FSDP) or `--config.mesh.tensor=4`.
"""
import importlib.util
import pathlib


def _paper_base(arg=None):
    spec = importlib.util.spec_from_file_location("_shapes", pathlib.Path(__file__).with_name("shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _t5_xxl():
    spec = importlib.util.spec_from_file_location("_t5", pathlib.Path(__file__).with_name("t5.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("t5-v1_1-xxl")


def get_config(arg=None):
    config = _paper_base(arg)
    b = config.base
    b.codebook_size = 8192
    b.grid_size = 16
    b.num_layers, b.width, b.mlp_dim, b.num_heads = 16, 1536, 6144, 24
    b.text_dim = 4096  # T5-XXL
    b.dropout_rate = 0.1
    b.dtype = "bfloat16"
    b.remat = True
    config.text = _t5_xxl()  # frozen; embeddings come from the cache (data/text_cache.py)
    config.train.batch_size = 512
    config.train.optimizer = "adafactor"
    config.train.num_steps = 1_000_000
    config.train.lr = 1e-4
    config.train.warmup_steps = 5000
    return config
