"""What a stage trains on, built once from the config and the workdir: `build(config, W, stage)`.

    data = inputs.build(config, W, "base", mesh, rules)    # a StageData (muse_jax/data/stage_data.py)

  an imported aMUSEd workdir   images, CLIP ids and micro-conditions streamed; the frozen VQGAN encoder
                               and CLIP run in the step (training/finetune.py)
  shapes                       the train split's tokens, computed once by each stage's tokenizer (the
                               token cache), and the captions' ids (joint T5) or frozen-T5 embeddings
  real data                    images and caption ids streamed from `config.data`; the stages' VQGANs
                               (and a frozen T5) run in the step (training/online.py)
  token shards                 `config.data.source="tokens"`: the tokens `muse-jax data tokenize`
                               computed once, and caption ids
"""
from __future__ import annotations

import jax
import numpy as np

from muse_jax import config as config_lib
from muse_jax import image_ops
from muse_jax import workdir as workdir_lib
from muse_jax import writer as writer_lib
from muse_jax.data import image_text, shapes, sources, stage_data, token_cache, token_shards
from muse_jax.training import finetune, online
from muse_jax.training import tokenize as tokenize_lib


def build(config, workdir, stage: str, mesh=None, rules=None) -> stage_data.StageData:
    """What `stage` trains on from W (the module docstring lists the four kinds), on `mesh` under `rules`
    where tokenizers or a frozen text encoder run in the step."""
    if finetune.is_finetune(workdir):
        return finetune.amused_stage_data(config, workdir, mesh, rules)
    repeats = dict(config.train.get("kind_repeats") or {})
    reweighted = any(r != 1 for r in repeats.values())  # a mix with more (or fewer) scenes of some kinds
    if not sources.is_shapes(config.data):
        if reweighted:
            raise ValueError("config.train.kind_repeats re-weights the shapes scene kinds; it needs config.data.name 'shapes'")
        return _streamed(config, workdir, stage, mesh, rules)
    source = sources.make_source(config.data, "train", workdir_lib.data_dir(workdir))
    cache = shapes_token_cache(config, workdir, source)
    tokenizer = workdir_lib.load_image_tokenizer(workdir, name=workdir_lib.stage_tokenizer(config, stage))
    workdir_lib.check_stage_tokenizer(config, stage, tokenizer)
    captions = cache["captions"]
    spm = workdir_lib.text_tokenizer(workdir, config.text, captions=lambda: captions)
    if reweighted:
        index = shapes.kind_repeat_index(captions, repeats)
        cache = {**{s: cache[s][index] for s in config_lib.STAGES}, "captions": [captions[i] for i in index]}
    if config.text.trainable:
        text = stage_data.sentencepiece_inputs(spm, cache["captions"])
    else:
        text = stage_data.frozen_text_embeddings(config, spm, cache["captions"], workdir_lib.text_cache_dir(workdir))
    return stage_data.from_token_cache(config, stage, cache, text, tokenizer=tokenizer)


def shapes_token_cache(config, workdir, source) -> dict:
    """The train split's tokens for both stages, each by its own tokenizer (`config.<stage>.tokenizer`)
    at its own pixel size (`config.<stage>.grid_size` x the tokenizer's factor), built once."""
    encoders, identity = {}, {}
    for s in config_lib.STAGES:
        name = workdir_lib.stage_tokenizer(config, s)
        tok = workdir_lib.load_image_tokenizer(workdir, name=name)
        encoders[s] = (tok, int(config[s].grid_size) * tok.factor)
        identity[s] = {"name": name, "steps": workdir_lib.tokenizer_identity(workdir, name)}
    stamp = {"data": config.data.to_dict(), "tokenizers": identity}
    return token_cache.build_or_load(workdir_lib.cache_dir(workdir), "train", source, encoders, stamp,
                                     progress=writer_lib.progress)


def first_captions(config, num: int) -> list[str]:
    """The first `num` training captions of this process's stream (trains the sentencepiece model)."""
    batches = image_text.Batches(image_text.make_dataset(config.data, "train", image_size=8), min(num, 256))
    out = []
    while len(out) < num:
        out += [str(c) for c in next(batches)["caption"]]
    return out[:num]


def _streamed(config, workdir, stage: str, mesh, rules) -> stage_data.StageData:
    """Images and caption ids streamed from `config.data`, tokenized inside the step (training/online.py)
    by each stage's tokenizer (`config.<stage>.tokenizer`: W/tokenizer/<name>); a frozen T5
    (`config.text.trainable=False`, weights from `config.text.checkpoint`) runs there too. With
    `config.data.source="tokens"`: the tokens `muse-jax data tokenize` computed once (`_token_shards`)."""
    if config.data.source == "tokens":
        return _token_shards(config, workdir, stage, mesh, rules)
    needed = ("base",) if stage == "base" else ("base", "superres")
    tokenizers = {s: workdir_lib.load_image_tokenizer(workdir, name=workdir_lib.stage_tokenizer(config, s))
                  for s in needed}
    spm = workdir_lib.text_tokenizer(workdir, config.text, captions=lambda: first_captions(config, 2000))
    text_encoder, encode_text = _frozen_text_encoder(config, spm)
    prepare = online.Prepare.build(config, stage, tokenizers, mesh=mesh, rules=rules, text_encoder=text_encoder)
    size = prepare.image_size

    def batches(local_batch: int):
        inner = image_text.Batches(image_text.make_dataset(config.data, "train", image_size=size), local_batch)
        return stage_data.TextBatches(inner, spm)

    length = int(config.text.max_length)
    example = {"image": np.zeros((size, size, 3), np.uint8), "text_ids": np.zeros((length,), np.int32),
               "text_mask": np.zeros((length,), bool)}
    empty_ids, empty_mask = spm([""])
    empty = {"text_ids": empty_ids[0].astype(np.int32), "text_mask": empty_mask[0]}
    if encode_text is not None:
        emb, _ = encode_text([""])
        empty = {"text_emb": np.asarray(emb)[0], "text_mask": empty_mask[0]}

    # Preview examples: the first training batch, tokenized on the host.
    k = int(config.train.num_samples)
    first = next(image_text.Batches(image_text.make_dataset(config.data, "train", image_size=size), k))
    images, prompts = first["image"], [str(c) for c in first["caption"]]
    base_px = int(config.base.grid_size) * tokenizers["base"].factor
    low = np.asarray(tokenizers["base"].encode(image_ops.downsample_area(images, size // base_px))).reshape(k, -1)
    ids, mask = spm(prompts)
    preview = {"text_ids": ids.astype(np.int32), "text_mask": mask}
    if encode_text is not None:
        preview = {"text_emb": np.asarray(encode_text(prompts)[0]), "text_mask": mask}
    if stage == "base":
        preview["tokens"] = low
    else:
        preview["tokens"] = np.asarray(tokenizers["superres"].encode(images)).reshape(k, -1)
        preview["lowres_tokens"] = low
    return stage_data.StageData(None, empty, preview, tokenizer=tokenizers[stage], prompts=prompts,
                                batches=batches, example=example, prepare=prepare)


def _frozen_text_encoder(config, spm):
    """(T5 module, params) and a host encode function of a frozen T5; (None, None) for a joint one."""
    if config.text.trainable:
        return None, None
    from muse_jax.data import text as text_lib
    from muse_jax.models import t5

    if not config.text.get("checkpoint", ""):
        raise ValueError("config.text.trainable=False needs config.text.checkpoint (a Hugging Face T5 "
                         "checkpoint directory): a frozen, randomly initialised T5 cannot condition anything")
    tcfg = t5.T5Config.coerce(config.text.encoder)
    text_encoder = (t5.T5Encoder(tcfg), t5.load_hf(config.text.checkpoint, tcfg))
    return text_encoder, text_lib.make_encode_fn(spm, text_encoder[0], text_encoder[1])


def _token_shards(config, workdir, stage: str, mesh, rules) -> stage_data.StageData:
    """The tokens `muse-jax data tokenize` computed once (config.data.tokens_dir, "" = W/tokens/train) and
    the captions' sentencepiece ids: no image tokenizer runs in the step (a frozen T5 still does)."""
    directory = tokenize_lib.tokens_dir(config, workdir)
    meta = token_shards.read_meta(directory)
    if not meta["records"]:
        raise ValueError(f"{directory} holds no records (skipped: {meta['skipped']})")
    made = meta["stamp"]["tokenizers"]
    for s in ("base",) if stage == "base" else ("base", "superres"):
        name = workdir_lib.stage_tokenizer(config, s)
        now = {"name": name, "identity": workdir_lib.tokenizer_identity(workdir, name),
               "grid_size": int(config[s].grid_size)}
        if s not in made:
            raise ValueError(f"{directory} holds no {s} tokens: W had no tokenizer {name or '(shared)'!r} when they "
                             "were made; run `muse-jax data tokenize` again (into a fresh folder)")
        if made[s] != now:
            raise ValueError(f"{directory}: the {s} tokens were made with {made[s]}, the {stage} stage needs "
                             f"{now}: run `muse-jax data tokenize` again (into a fresh folder)")
    if stage == "superres" and int(config.superres.lowres_grid_size) != int(config.base.grid_size):
        raise ValueError(f"config.superres.lowres_grid_size={config.superres.lowres_grid_size} is not "
                         f"config.base.grid_size={config.base.grid_size}")
    tokenizer = workdir_lib.load_image_tokenizer(workdir, name=workdir_lib.stage_tokenizer(config, stage))
    spm = workdir_lib.text_tokenizer(
        workdir, config.text, captions=lambda: [r["caption"] for r in token_shards.records(directory, meta, 2000)])
    text_encoder, encode_text = _frozen_text_encoder(config, spm)
    prepare = None if text_encoder is None else online.Prepare.text_only(config, text_encoder, mesh=mesh, rules=rules)

    def batches(local_batch: int):
        return iter(token_shards.stage_batches(directory, meta, stage, local_batch, spm=spm,
                                               seed=int(config.data.shuffle_seed), process_index=jax.process_index(),
                                               process_count=jax.process_count()))

    # Preview examples: the first records.
    first = token_shards.records(directory, meta, max(1, int(config.train.num_samples)))
    prompts = [r["caption"] for r in first]
    arrays = [token_shards.stage_arrays(r, stage) for r in first]
    ids, mask = spm(prompts)
    empty_ids, empty_mask = spm([""])
    text = {"text_ids": ids.astype(np.int32), "text_mask": mask}
    empty = {"text_ids": empty_ids[0].astype(np.int32), "text_mask": empty_mask[0]}
    if encode_text is not None:
        text = {"text_emb": np.asarray(encode_text(prompts)[0]), "text_mask": mask}
        empty = {"text_emb": np.asarray(encode_text([""])[0])[0], "text_mask": empty_mask[0]}
    preview = {**{k: np.stack([a[k] for a in arrays]) for k in arrays[0]}, **text}
    example = {**{k: np.zeros_like(v) for k, v in arrays[0].items()},
               "text_ids": np.zeros_like(ids[0], np.int32), "text_mask": np.zeros_like(mask[0])}
    return stage_data.StageData(None, empty, preview, tokenizer=tokenizer, prompts=prompts, batches=batches,
                                example=example, prepare=prepare)
