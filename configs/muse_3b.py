"""Muse-3B base transformer (Muse section 2.3 / 4): 48 layers, width 2048, MLP 8192, 32 heads.

256x256 images through an f16 VQGAN (8192 codes) -> 16x16 tokens; frozen T5-XXL text
embeddings (4096 wide, cached). Parameter count of this architecture (self-attention,
cross-attention and MLP in every block, plus embeddings and head): 3.27e9, i.e. the paper's
"3B" rounded (tests/test_transformer.py checks it). Train on a pod with e.g.
`--config.mesh.data=-1 --config.mesh.fsdp=8` (FSDP) or `--config.mesh.tensor=4`.
"""
import importlib.util
import pathlib


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("_muse_configs__paper", pathlib.Path(__file__).with_name("_paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    return paper.paper_config("base", arg, grid_size=16, num_layers=48, width=2048, mlp_dim=8192, num_heads=32)
