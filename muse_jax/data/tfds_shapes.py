"""The shapes dataset as a tfds builder, written to array_record (no TensorFlow needed).

Records keep generation order (`disable_shuffling`), so record `i` of a split is example
`i` of `shapes.make_example`: the tfds data and the on-the-fly `ShapesSource` agree.
"""
from __future__ import annotations

import pathlib

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from muse_jax.data import shapes


class ShapesConfig(tfds.core.BuilderConfig):
    """Split sizes and seed; they name the config, so changing them never reuses data."""

    def __init__(self, *, num_train: int, num_test: int, seed: int):
        super().__init__(
            name=f"spec{shapes.SPEC_VERSION}_seed{seed}_train{num_train}_test{num_test}",
            description=f"procedural captioned shapes, spec v{shapes.SPEC_VERSION}",
        )
        self.num_train, self.num_test, self.seed = num_train, num_test, seed


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Captioned shapes scenes: image [64,64,3] uint8, caption, attributes (JSON), index."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []  # configs are made on demand by `builder(...)`

    def _info(self) -> tfds.core.DatasetInfo:
        size = shapes.IMAGE_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(np.int64),
                "image": tfds.features.Image(shape=(size, size, 3)),
                "caption": tfds.features.Text(),
                "attributes": tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num: int):
        seed = self.builder_config.seed
        for index in range(num):
            ex = shapes.make_example(seed, split, index)
            # tfds encodes numpy images with TensorFlow; PIL images it encodes itself.
            ex["image"] = PIL.Image.fromarray(ex["image"])
            yield index, ex


def builder(data_dir: str | pathlib.Path, num_train: int, num_test: int, seed: int = 0) -> Shapes:
    """The builder for these sizes and seed under `data_dir` (not yet prepared)."""
    config = ShapesConfig(num_train=num_train, num_test=num_test, seed=seed)
    return Shapes(data_dir=str(data_dir), config=config, file_format="array_record")


def prepare(data_dir, num_train: int, num_test: int, seed: int = 0) -> Shapes:
    """Builds the dataset once (a no-op when it is already there) and returns the builder."""
    b = builder(data_dir, num_train, num_test, seed)
    b.download_and_prepare()
    return b
