"""Muse-3B base transformer (Muse section 2.3 / 4): 48 layers, width 2048, MLP 8192, 32 heads.

256x256 images through an f16 VQGAN (8192 codes) -> 16x16 tokens; frozen T5-XXL text
embeddings (4096 wide, cached). Parameter count of this architecture (self-attention,
cross-attention and MLP in every block, plus embeddings and head): 3.27e9, i.e. the paper's
"3B" rounded (tests/test_transformer.py checks it). Train on a pod with e.g.
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
    b.num_layers, b.width, b.mlp_dim, b.num_heads = 48, 2048, 8192, 32
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
