"""Muse super-resolution transformer (section 2.4): 16 low-res encoder layers + 32 high-res
layers at width 1024, MLP 4096, 16 heads; 16x16 low-res tokens -> 64x64 high-res tokens
(256 -> 512 px through f8 VQGANs, 8192 codes); frozen T5-XXL embeddings (4096 wide).

Parameter count: with self-attention, cross-attention and MLP in each high-res block and
self-attention and MLP in each encoder block, this layer/width table gives 7.74e8 parameters,
not the 268M of the config's name (a 1024/4096 block alone has 12.6M-16.8M parameters, so
48 of them cannot total 268M). tests/test_transformer.py checks the count of this architecture
exactly and records the gap; see the issue-5 report.
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
    s = config.superres
    s.codebook_size = 8192
    s.grid_size, s.lowres_grid_size = 64, 16
    s.num_lowres_layers, s.num_layers = 16, 32
    s.width, s.mlp_dim, s.num_heads = 1024, 4096, 16
    s.text_dim = 4096  # T5-XXL
    s.dropout_rate = 0.1
    s.dtype = "bfloat16"
    s.remat = True
    config.text = _t5_xxl()  # frozen; embeddings come from the cache (data/text_cache.py)
    config.train.batch_size = 512
    config.train.optimizer = "adafactor"
    config.train.num_steps = 1_000_000
    config.train.lr = 1e-4
    config.train.warmup_steps = 5000
    return config
