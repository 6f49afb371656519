"""Times the zero-shot evaluation per image: generation, then InceptionV3 and CLIP features.

    python benchmarks/zero_shot_eval.py [--config shapes|smoke] [--workdir W] [--num 48] [--batch 16]
        [--clip-model vit-b-32] [--resize clean,legacy]
    # quick check: --num 4 --batch 2 --clip-model none --resize legacy

Loads the cascade of workdir W (`--workdir`) as `muse-jax eval` does, or, without one, writes a
workdir of `--config` at random initialisation into a temporary folder (each tokenizer and stage
saved at step 0, a sentencepiece vocabulary of shapes captions) and loads that: the compute of a
trained workdir of that config, not its images. Then the FID InceptionV3 (pool3, 299 px input) and
a CLIP preset with random weights (a stand-in tokenizer: one id per character), and runs
`muse_jax.evaluation.zero_shot.evaluate` on `--num` prompts in chunks of `--batch` into a temporary
folder, chunk files included, once per resize protocol. Seconds per image exclude the first chunk
of each run (compilation). Prints one row per run: generation, features and overall images/s.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from muse_jax import cascade
from muse_jax import checkpoint as ckpt_lib
from muse_jax import config as config_lib
from muse_jax import workdir as workdir_lib
from muse_jax.data import text as text_lib
from muse_jax.evaluation import alignment, inception, zero_shot
from muse_jax.models import clip, transformer, vqgan
from muse_jax.training import loop

COLUMNS = [
    ("config", "config", ""), ("image_px", "px", "d"), ("batch", "batch", "d"), ("images", "images", "d"),
    ("resize", "FID resize", ""), ("clip", "CLIP", ""), ("ms_generation", "gen ms/img", ".1f"),
    ("ms_features", "features ms/img", ".1f"), ("generation_img_s", "gen img/s", ".2f"),
    ("features_img_s", "features img/s", ".2f"), ("overall_img_s", "overall img/s", ".2f"),
]


def _save_params(directory, params) -> None:
    ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
    ckpt.save(0, {"params": params}, force=True)
    ckpt.close()


def random_workdir(config, workdir) -> pathlib.Path:
    """A workdir of `config` at random initialisation, laid out as training leaves one: config.json,
    each tokenizer and stage with its config and a checkpoint at step 0, W/text/spm.model."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, workdir / workdir_lib.CONFIG_FILE)
    for name in sorted(config.get("tokenizers", {}) or {}) or [""]:
        tcfg = config_lib.tokenizer_config(config, name)
        vcfg = vqgan.VQGANConfig.from_dict(tcfg.vqgan)
        size = int(tcfg.train_tokenizer.image_size)
        meta = {"vqgan": vcfg.to_dict(), "train_tokenizer": tcfg.train_tokenizer.to_dict(), "image_size": size}
        workdir_lib.tokenizer_dir(workdir, name).mkdir(parents=True, exist_ok=True)
        (workdir_lib.tokenizer_dir(workdir, name) / workdir_lib.CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        stage = f"{workdir_lib.TOKENIZER}/{name}" if name else workdir_lib.TOKENIZER
        _save_params(workdir_lib.checkpoint_dir(workdir, stage),
                     nn.unbox(vqgan.init_params(vcfg, jax.random.key(0), size)))
    text_lib.train_sentencepiece(alignment.eval_prompts(400), workdir_lib.spm_path(workdir, config.text),
                                 config.text.vocab_size)
    for stage in config_lib.STAGES:
        stage_config = loop.stage_config(config, stage)
        workdir_lib.stage_dir(workdir, stage).mkdir(parents=True, exist_ok=True)
        config_lib.save_config(stage_config, workdir_lib.stage_dir(workdir, stage) / workdir_lib.CONFIG_FILE)
        model = workdir_lib.build_stage_model(stage_config, stage)
        dummy = transformer.dummy_inputs(model, 1, int(stage_config.text.max_length))
        params = nn.unbox(jax.jit(lambda r: transformer.init_params(model, r, dummy))(jax.random.key(0)))
        _save_params(workdir_lib.checkpoint_dir(workdir, stage), params)
    return workdir


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
    ap.add_argument("--config", default="shapes", help="the config of the random workdir (without --workdir)")
    ap.add_argument("--workdir", help="a trained workdir (default: a random one of --config)")
    ap.add_argument("--num", type=int, default=48, help="prompts (images) per run")
    ap.add_argument("--batch", type=int, default=16, help="the pipeline's batch size = the chunk size")
    ap.add_argument("--clip-model", default="vit-b-32", help="a CLIP preset, or none")
    ap.add_argument("--resize", default="clean,legacy", help="comma-separated FID resize protocols, one run each")
    ap.add_argument("--json", action="store_true")
    args, overrides = ap.parse_known_args()
    if args.workdir and overrides:
        ap.error(f"--config.* overrides are for the random workdir, not --workdir: {overrides}")
    variables = random_inception()
    clip_params = clip_config = None
    if args.clip_model != "none":
        clip_config = clip.CLIPConfig.preset(args.clip_model)
        clip_params = clip.init(clip_config)
    prompts = [f"a {c} circle in the top left, number {i}" for i, c in
               zip(range(args.num), ["red", "blue", "green", "yellow"] * args.num)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or random_workdir(config_lib.load_config(args.config, overrides), f"{tmp}/workdir")
        pipe = cascade.Pipeline.from_workdir(workdir, batch_size=args.batch)
        name = workdir_lib.load_run_config(workdir).get("name", "")
        for resize in args.resize.split(","):
            scorer = zero_shot.Scorer(variables, resize, clip_params, clip_config, char_tokenizer(), args.clip_model)
            out = f"{tmp}/eval_{resize}"
            r = zero_shot.evaluate(pipe, prompts, out, base_stamp={"benchmark": True, "features": scorer.identity()},
                                   scorer=scorer, reference=None, seed=0, overrides={}, process_index=0,
                                   process_count=1, say=lambda *a: None)
            gen, feat = r["sec_per_image"], r["feature_sec_per_image"]
            rows.append({"bench": "zero_shot_eval", "config": name, "image_px": pipe.image_size,
                         "batch": args.batch, "images": args.num, "resize": resize, "clip": args.clip_model,
                         "device": jax.devices()[0].device_kind, "generation_img_s": round(1 / gen, 2),
                         "features_img_s": round(1 / feat, 2), "overall_img_s": round(1 / (gen + feat), 2),
                         "ms_generation": round(1000 * gen, 1), "ms_features": round(1000 * feat, 1)})
    common.emit(rows, args.json, COLUMNS)


if __name__ == "__main__":
    main()
