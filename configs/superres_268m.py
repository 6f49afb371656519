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


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("_muse_configs__paper", pathlib.Path(__file__).with_name("_paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    return paper.paper_config("superres", arg, grid_size=64, lowres_grid_size=16, num_lowres_layers=16, num_layers=32,
                               width=1024, mlp_dim=4096, num_heads=16)
