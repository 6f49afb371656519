"""Muse-632M base transformer: 16 layers, width 1536, MLP 6144, 24 heads (64-wide heads).

256x256 images through an f16 VQGAN (8192 codes) -> 16x16 tokens; frozen T5-XXL text
embeddings (4096 wide, cached). The paper does not list this split; 16 x 1536 keeps the
3B model's block design and head width (64) and gives 6.39e8 parameters (632M + 1.1 %,
tests/test_transformer.py checks it). Mesh as for muse_3b, e.g.
`--config.mesh.data=-1 --config.mesh.fsdp=8` (FSDP) or `--config.mesh.tensor=4`.
"""
import importlib.util
import pathlib


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("_muse_configs__paper", pathlib.Path(__file__).with_name("_paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    return paper.paper_config("base", arg, grid_size=16, num_layers=16, width=1536, mlp_dim=6144, num_heads=24)
