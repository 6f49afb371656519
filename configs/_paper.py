"""Shared by the paper-size configs (muse_632m, muse_3b, superres_268m): not a config by itself.

`paper_config(stage, arg, **sizes)`: the shapes config's sections, then one stage (`base` or
`superres`) sized by `sizes` with the paper's common settings (8192 codes from an f16 VQGAN,
frozen T5-XXL text embeddings 4096 wide from the cache, dropout 0.1, bf16 compute with remat),
and the paper's training (batch 512, Adafactor, 1M steps, lr 1e-4, 5000 warm-up steps).
"""
import importlib.util
import pathlib

import ml_collections


def _load(name):
    path = pathlib.Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_muse_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def paper_config(stage, arg=None, **sizes):
    config = _load("shapes").get_config(arg)
    s = config[stage]
    s.codebook_size = 8192
    s.text_dim = 4096  # T5-XXL
    s.dropout_rate = 0.1
    s.dtype = "bfloat16"
    s.remat = True
    for name, value in sizes.items():
        s[name] = value
    config.text = _load("t5").get_config("t5-v1_1-xxl")  # frozen; embeddings from data/text_cache.py
    config.train.batch_size = 512
    config.train.optimizer = "adafactor"
    config.train.num_steps = 1_000_000
    config.train.lr = 1e-4
    config.train.warmup_steps = 5000
    # The shapes default's per-stage overrides (small super-res batches, a super-res stage started
    # from the trained base) do not apply: the paper trains each stage from scratch at these settings.
    config.train_base = ml_collections.ConfigDict()
    config.train_superres = ml_collections.ConfigDict()
    return config
