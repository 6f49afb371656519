"""The embedded default: the whole Muse pipeline on the procedural shapes dataset (CPU).

Usage: `muse-jax <command> --config configs/shapes.py --config.data.batch_size=64`.
Each stage of the pipeline has its own section; later stages add theirs.
"""
import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"
    config.data.seed = 0  # dataset seed: examples are a function of (seed, split, index)
    config.data.num_train = 50_000
    config.data.num_test = 1_000
    # "tfds": build once with tfds (array_record) and read with grain;
    # "procedural": render on the fly (same examples for the same indices).
    config.data.source = "tfds"
    config.data.batch_size = 32
    config.data.shuffle_seed = 0

    # Device mesh: axis sizes; -1 takes the devices left over (at most one axis).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    return config
