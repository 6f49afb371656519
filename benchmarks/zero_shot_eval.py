"""Times the zero-shot evaluation per image: generation, then InceptionV3 and CLIP features.

    python benchmarks/zero_shot_eval.py [--config shapes] [--num 48] [--batch 16] [--clip-model vit-b-32]
    # smoke: --num 4 --batch 2 --clip-model none --resize legacy

Builds the config's cascade at random initialisation (VQGAN, base and super-res transformers
with their joint T5: the compute of a trained workdir of that config, not its images), the FID
InceptionV3 (pool3, 299 px input) and a CLIP preset with random weights (a stand-in tokenizer:
one id per character), and runs `muse_jax.evaluation.zero_shot.evaluate` on `--num` prompts in
chunks of `--batch` into a temporary folder, chunk files included, once per resize protocol.
Seconds per image exclude the first chunk of each run (compilation). Prints one row per run:
generation, features and overall images/s.
"""
from __future__ import annotations

import argparse
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from sample_decode import random_stage

from muse_jax import cascade
from muse_jax import config as config_lib
from muse_jax.evaluation import clip, inception, zero_shot
from muse_jax.models import vqgan

COLUMNS = [
    ("config", "config", ""), ("image_px", "px", "d"), ("batch", "batch", "d"), ("images", "images", "d"),
    ("resize", "FID resize", ""), ("clip", "CLIP", ""), ("ms_generation", "gen ms/img", ".1f"),
    ("ms_features", "features ms/img", ".1f"), ("generation_img_s", "gen img/s", ".2f"),
    ("features_img_s", "features img/s", ".2f"), ("overall_img_s", "overall img/s", ".2f"),
]


def random_pipeline(config, batch: int) -> cascade.Pipeline:
    vcfg = vqgan.VQGANConfig.from_dict(config.vqgan)
    params = nn.unbox(vqgan.init_params(vcfg, jax.random.key(0), int(config.train_tokenizer.image_size)))
    text_length = int(config.text.max_length)
    stages = [random_stage(config, name, text_length) for name in config_lib.STAGES]
    options = cascade.SampleOptions.from_config(config.sample, batch_size=batch)
    return cascade.Pipeline(vqgan.ImageTokenizer(vcfg, params), *stages, options)


def random_inception():
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        name = path[-1].key
        if name == "kernel":  # He initialisation keeps the activations in range
            return jnp.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:3])), jnp.float32)
        return jnp.ones(shape) if name in ("scale", "var") else jnp.zeros(shape)

    return jax.tree_util.tree_map_with_path(leaf, inception._variable_shapes(), is_leaf=lambda x: isinstance(x, tuple))


def char_tokenizer(length: int = 77):
    """CLIP-shaped ids without CLIP's BPE: start token, one id per character, end-of-text token."""

    def tokenize(texts):
        ids = np.zeros((len(texts), length), np.int32)
        for i, t in enumerate(texts):
            row = [49406] + [256 + ord(c) % 40000 for c in t[: length - 2]] + [49407]
            ids[i, : len(row)] = row
        return ids, ids > 0

    return tokenize


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--num", type=int, default=48, help="prompts (images) per run")
    ap.add_argument("--batch", type=int, default=16, help="the pipeline's batch size = the chunk size")
    ap.add_argument("--clip-model", default="vit-b-32", help="a CLIP preset, or none")
    ap.add_argument("--resize", default="clean,legacy", help="comma-separated FID resize protocols, one run each")
    ap.add_argument("--json", action="store_true")
    args, overrides = ap.parse_known_args()
    config = config_lib.load_config(args.config, overrides)
    pipe = random_pipeline(config, args.batch)
    variables = random_inception()
    clip_params = clip_config = None
    if args.clip_model != "none":
        clip_config = clip.CLIPConfig.preset(args.clip_model)
        clip_params = clip.init(clip_config)
    prompts = [f"a {c} circle in the top left, number {i}" for i, c in
               zip(range(args.num), ["red", "blue", "green", "yellow"] * args.num)]
    rows = []
    for resize in args.resize.split(","):
        scorer = zero_shot.Scorer(variables, resize, clip_params, clip_config, char_tokenizer(), args.clip_model)
        with tempfile.TemporaryDirectory() as out:
            r = zero_shot.evaluate(pipe, prompts, out, base_stamp={"benchmark": True, "features": scorer.identity()},
                                   scorer=scorer, reference=None, seed=0, overrides={}, process_index=0,
                                   process_count=1, say=lambda *a: None)
        gen, feat = r["sec_per_image"], r["feature_sec_per_image"]
        rows.append({"bench": "zero_shot_eval", "config": args.config, "image_px": pipe.image_size,
                     "batch": args.batch, "images": args.num, "resize": resize, "clip": args.clip_model,
                     "device": jax.devices()[0].device_kind, "generation_img_s": round(1 / gen, 2),
                     "features_img_s": round(1 / feat, 2), "overall_img_s": round(1 / (gen + feat), 2),
                     "ms_generation": round(1000 * gen, 1), "ms_features": round(1000 * feat, 1)})
    common.emit(rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
