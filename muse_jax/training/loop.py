"""Training loop of the base and super-resolution transformers (`muse-jax train`).

    muse-jax train --config shapes --workdir W [--stage base|superres|all]

Reads top to bottom: data (a token cache built once with the trained tokenizer; captions as
sentencepiece ids for a T5 trained jointly with the stage (config.text.trainable, the shapes
default), or embeddings of a frozen T5 cached once in W/cache/text) -> mesh and sharded state -> restore if a checkpoint exists -> the jitted
step in a loop with metrics, sample previews, checkpoints, a NaN guard and SIGTERM handling.

Workdir layout written here:
  W/cache/tokens_train.npz       tokens of every train image at 64 px (16x16) and 32 px (8x8)
  W/cache/captions_train.json    the captions, in index order
  W/<stage>/config.json          the full config the stage was trained with
  W/<stage>/checkpoints/<step>/  Orbax: TrainState + grain iterator state
  W/<stage>/tb/                  TensorBoard events
  W/<stage>/samples/step_N.png   sample previews
W may be a bucket URI (gs://...; see muse_jax.paths): everything above is written there, while
the tfds dataset and the frozen-T5 text cache (local files by nature) go to paths.local_dir(W).
`load_stage(W, stage)` returns (model, params, config) for samplers.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import config as config_lib
from muse_jax import editing
from muse_jax import paths
from muse_jax import precision
from muse_jax.data import pipeline
from muse_jax.models import transformer as transformer_lib
from muse_jax.training import checkpoint as ckpt_lib
from muse_jax.training import partitioning, step as step_lib, writer as writer_lib

log = logging.getLogger(__name__)
STAGES = ("base", "superres")


# ----------------------------------------------------------------------------- data


class ArraySource:
    """Random-access grain source over equally long numpy arrays: record i = {k: a[i]}."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays of different lengths: {lengths}")
        self.arrays = arrays
        self._len = next(iter(lengths.values()))

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}

    def __repr__(self):
        # (scale-out helper) grain checks repr(source) when restoring an iterator: the default repr
        # holds the object's address, so a restarted process could never resume. Keys/shapes only.
        fields = ", ".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in sorted(self.arrays.items()))
        return f"ArraySource({fields})"


def make_loader(source, batch_size: int, seed: int) -> grain.DataLoader:
    """Shuffled, repeating, per-process batches of `source` (iterator state is checkpointable)."""
    sampler = grain.IndexSampler(
        num_records=len(source), shard_options=pipeline.process_shard(), shuffle=True, num_epochs=None, seed=seed
    )
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=[grain.Batch(batch_size, drop_remainder=True)],
        worker_count=0,
    )


def build_token_cache(config, workdir: pathlib.Path, split: str = "train", batch_size: int = 250) -> dict:
    """Tokens of every `split` image (64 px -> hi, 32 px -> lo) and captions, computed once."""
    from muse_jax.models import vqgan

    workdir = paths.as_path(workdir)
    cache = workdir / "cache"
    path, cap_path = cache / f"tokens_{split}.npz", cache / f"captions_{split}.json"
    tok_dir = workdir / vqgan.TOKENIZER_SUBDIR
    source = pipeline.make_source(config.data, split, paths.local_dir(workdir, "data"))
    stamp = {"num": len(source), "data": config.data.to_dict(),
             "tokenizer": sorted(p.name for p in (tok_dir / "checkpoints").glob("[0-9]*"))}
    if path.is_file() and cap_path.is_file():
        with path.open("rb") as f, np.load(f) as z:
            if json.loads(str(z["stamp"])) == stamp:
                return {"hi": z["hi"], "lo": z["lo"], "captions": json.loads(cap_path.read_text())}
    tokenizer = vqgan.ImageTokenizer.from_workdir(workdir)
    loader = pipeline.make_loader(source, batch_size=batch_size, shuffle=False, num_epochs=1,
                                  shard_options=grain.NoSharding(), drop_remainder=False)
    n = len(source)
    hi, lo, captions = [], [], [None] * n
    t0 = time.time()
    for batch in writer_lib.progress(loader, total=-(-n // batch_size), desc=f"tokenizing {split}"):
        images = batch["image"]
        hi.append(np.asarray(tokenizer.encode(images)).astype(np.int16))
        lo.append(np.asarray(tokenizer.encode(editing.downsample_area(images, 2))).astype(np.int16))
        for i, c in zip(batch["index"], batch["caption"]):
            captions[int(i)] = str(c)
    hi, lo = np.concatenate(hi), np.concatenate(lo)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tokens_{split}.tmp-{jax.process_index()}.npz"  # processes may share a bucket
    with tmp.open("wb") as f:
        np.savez(f, hi=hi, lo=lo, stamp=json.dumps(stamp))
    tmp.replace(path)
    cap_path.write_text(json.dumps(captions))
    log.info("token cache %s: %d images in %.1fs", path, n, time.time() - t0)
    return {"hi": hi, "lo": lo, "captions": captions}


class StageData:
    """What a stage trains on: a random-access source, the empty prompt, a few preview examples."""

    def __init__(self, source, empty_text: dict[str, np.ndarray], preview: dict[str, np.ndarray] | None = None,
                 tokenizer=None, prompts: list[str] | None = None):
        self.source = source
        self.empty_text = empty_text
        self.preview = preview
        self.tokenizer = tokenizer
        self.prompts = prompts


def workdir_stage_data(config, workdir: pathlib.Path, stage: str) -> StageData:
    """Token cache + sentencepiece ids of the captions for `stage` (jointly trained T5)."""
    from muse_jax import text as text_lib

    data = build_token_cache(config, workdir, "train")
    captions = data["captions"]
    spm = text_lib.workdir_tokenizer(workdir, config.text, captions=lambda: captions)
    if config.text.trainable:
        ids, mask = spm(captions)
        empty_ids, empty_mask = spm([""])
        arrays = {"text_ids": ids.astype(np.int32), "text_mask": mask}
        empty = {"text_ids": empty_ids[0], "text_mask": empty_mask[0]}
    else:  # frozen T5: embeddings computed once into W/cache/text (muse_jax/data/text_cache.py)
        cache, empty_emb, empty_mask = frozen_text_embeddings(config, workdir, spm, captions)
        arrays = {"text_emb": cache.embeddings, "text_mask": cache.mask}
        empty = {"text_emb": empty_emb[0], "text_mask": empty_mask[0]}
    g = config[stage].grid_size
    n = len(captions)
    if stage == "base":
        arrays["tokens"] = data["lo"].reshape(n, -1).astype(np.int32)
    else:
        arrays["tokens"] = data["hi"].reshape(n, -1).astype(np.int32)
        arrays["lowres_tokens"] = data["lo"].reshape(n, -1).astype(np.int32)
    if arrays["tokens"].shape[1] != g * g:
        raise ValueError(f"cached tokens have {arrays['tokens'].shape[1]} per image; config.{stage} expects {g}x{g}")
    k = int(config.train.num_samples)
    preview = {key: v[:k] for key, v in arrays.items()}
    from muse_jax.models import vqgan

    tok = vqgan.ImageTokenizer.from_workdir(workdir)
    return StageData(ArraySource(arrays), empty, preview, tokenizer=tok, prompts=captions[:k])


def frozen_text_embeddings(config, workdir: pathlib.Path, spm, captions):
    """(cache of the captions' embeddings, empty-prompt embedding [1,L,D], mask [1,L]) of a frozen T5.

    Parameters from `config.text.checkpoint` (Hugging Face T5, converted by `t5.load_hf`); without
    one, a random T5 with seed `config.seed` (only useful for tests and benchmarks).
    """
    from muse_jax import text as text_lib
    from muse_jax.data import text_cache
    from muse_jax.models import t5

    tcfg = t5.T5Config.coerce(config.text.encoder)
    encoder = t5.T5Encoder(tcfg)
    if config.text.get("checkpoint", ""):
        params = t5.load_hf(config.text.checkpoint, tcfg)
    else:
        log.warning("config.text.checkpoint is empty: caching embeddings of a randomly initialised T5")
        ids = jnp.ones((1, int(config.text.max_length)), jnp.int32)
        params = nn.unbox(jax.jit(encoder.init)(jax.random.key(int(config.seed)), ids)["params"])
    encode = text_lib.make_encode_fn(spm, encoder, params, batch_size=64)
    identity = text_cache.encoder_identity(tcfg.to_dict(), params, spm, int(config.text.max_length))
    cache = text_cache.build_or_load(paths.local_dir(workdir, "cache", "text"), captions, encode, identity,
                                     dtype=config.text.get("cache_dtype", "float32"))
    empty_emb, empty_mask = encode([""])
    return cache, np.asarray(empty_emb, cache.embeddings.dtype), empty_mask


def synthetic_stage_data(config, stage: str, num: int = 512, text_length: int = 8, seed: int = 0) -> StageData:
    """Learnable synthetic data (tests, benchmarks): tokens are a function of a caption id.

    Example i has class c = i % 16; its caption ids are [c+3, EOS(1), pad...]; its tokens are a
    fixed random pattern of class c (codebook ids) with 10 % of positions resampled.
    """
    cfg = config[stage]
    rng = np.random.default_rng(seed)
    n_tok, k = cfg.grid_size**2, cfg.codebook_size
    patterns = rng.integers(0, k, (16, n_tok))
    cls = np.arange(num) % 16
    tokens = patterns[cls]
    noise = rng.random(tokens.shape) < 0.1
    tokens = np.where(noise, rng.integers(0, k, tokens.shape), tokens).astype(np.int32)
    ids = np.zeros((num, text_length), np.int32)
    ids[:, 0], ids[:, 1] = cls + 3, 1
    mask = ids > 0
    arrays = {"tokens": tokens, "text_ids": ids, "text_mask": mask}
    if cfg.lowres_grid_size:
        n_lo = cfg.lowres_grid_size**2
        arrays["lowres_tokens"] = (tokens[:, :: max(1, n_tok // n_lo)][:, :n_lo] % k).astype(np.int32)
    empty_ids = np.zeros((text_length,), np.int32)
    empty_ids[0] = 1
    if not config.text.trainable:  # a stub embedding: one-hot of the ids
        d = cfg.text_dim
        arrays["text_emb"] = np.eye(d, dtype=np.float32)[ids % d] * mask[..., None]
        del arrays["text_ids"]
        empty = {"text_emb": np.eye(d, dtype=np.float32)[empty_ids % d] * (empty_ids > 0)[:, None],
                 "text_mask": empty_ids > 0}
    else:
        empty = {"text_ids": empty_ids, "text_mask": empty_ids > 0}
    return StageData(ArraySource(arrays), empty, None)


# ----------------------------------------------------------------------------- model & state


def build_model(config, stage: str):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    text_cfg = config.text.encoder if config.text.trainable else None
    return transformer_lib.build(config[stage], text_cfg)


def _abstract_inputs(model, config, batch: int = 1):
    return transformer_lib.dummy_inputs(model, batch, int(config.text.max_length))


def state_setup(config, model, mesh, rules):
    """(create_fn(rng) -> boxed TrainState, abstract boxed state, state shardings)."""
    tx = step_lib.make_optimizer(config.train)
    inputs = _abstract_inputs(model, config)
    ema = float(config.train.ema_decay) > 0

    def create(rng):
        return step_lib.create_state(model, tx, rng, inputs, ema=ema)

    abstract = jax.eval_shape(create, jax.random.key(0))
    return create, abstract, partitioning.state_shardings(abstract, mesh, rules)


def warm_start_params(params, source) -> tuple[Any, list[str]]:
    """`params` with the leaves of `source` (another stage's trained params) copied in.

    A leaf is copied where `source` has the same path and shape. A super-res model also takes the
    base's position embeddings repeated over the high-res positions each covers; and for its low-res
    token encoder, which reads base-resolution tokens of the same codebook, the base's token and
    position embeddings and its blocks (`decoder/block_i`, whose cross-attention it lacks).
    Returns the new params and the copied paths."""
    src = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
    alias = {"['lowres_tokens']['embedding']": "['tokens']['embedding']",
             "['lowres_tokens']['embedding_norm']['bias']": "['tokens']['embedding_norm']['bias']",
             "['lowres_tokens']['embedding_norm']['scale']": "['tokens']['embedding_norm']['scale']",
             "['lowres_tokens']['position_embedding']": "['tokens']['position_embedding']"}
    copied = []

    def source_name(name: str) -> str:
        if name.startswith("['lowres_encoder']"):  # the base's blocks already process base-size tokens
            return name.replace("['lowres_encoder']", "['decoder']", 1)
        return alias.get(name, "")

    def take(path, leaf):
        name = jax.tree_util.keystr(path)
        v = src.get(name, src.get(source_name(name), None))
        if v is None:
            return leaf
        if name == "['lowres_tokens']['embedding']":
            v = v[: leaf.shape[0]]  # the base's mask-token row is not a low-res code
        if name.endswith("['position_embedding']") and v.ndim == 3 and leaf.shape[0] % v.shape[0] == 0 \
                and leaf.shape[0] // v.shape[0] == leaf.shape[1] // v.shape[1]:
            r = leaf.shape[0] // v.shape[0]
            v = v.repeat(r, 0).repeat(r, 1)
        if v.shape != leaf.shape:
            return leaf
        copied.append(name)
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(take, params), copied


def _warm_start(state, shardings, workdir, stage: str, source_stage: str, quiet: bool):
    """config.train.init_from: start `stage` from `source_stage`'s trained weights (fresh optimizer).

    Every process reads the source stage whole (`load_stage`) and places its copy on the mesh."""
    if source_stage == stage or source_stage not in STAGES:
        raise ValueError(f"config.train.init_from={source_stage!r}: expected another stage, one of "
                         f"{[s for s in STAGES if s != stage]} (or '' for a random init)")
    _, source, _ = load_stage(workdir, source_stage)
    params, copied = warm_start_params(jax.device_get(state.params), jax.device_get(source))
    if not copied:
        raise ValueError(f"config.train.init_from={source_stage!r}: no parameter of {stage} matches {source_stage}'s")
    if not quiet:
        n = len(jax.tree_util.tree_leaves(params))
        print(f"{stage}: {len(copied)} of {n} parameter arrays start from the trained {source_stage} stage")
    # Host copies of their own: on CPU, device_put may alias a numpy buffer, and the train step
    # donates params and EMA params (the EMA starts from the same weights).
    own = lambda tree, sh: jax.device_put(jax.tree.map(lambda x: np.array(x, copy=True), tree), sh)  # noqa: E731
    ema = None if state.ema_params is None else own(params, shardings.ema_params)
    return state.replace(params=own(params, shardings.params), ema_params=ema)


def stage_dir(workdir, stage) -> pathlib.Path:
    return paths.as_path(workdir) / stage


def load_stage(workdir, stage: str, *, step: int | None = None, use_ema: bool = True):
    """(model, params, config) of a trained stage from W/<stage> (latest checkpoint)."""
    d = stage_dir(workdir, stage)
    cfg_path = d / "config.json"
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if not cfg_path.is_file() or not (d / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"no trained {stage} stage in {workdir}: {cfg_path} or {d / 'checkpoints'} is missing "
            f"(run `muse-jax train --workdir {workdir} --stage {stage}` first)"
        )
    import ml_collections

    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    model = build_model(config, stage)
    mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    rules = partitioning.logical_rules(config)
    _, abstract, shardings = state_setup(config, model, mesh, rules)
    target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)
    ckpt = ckpt_lib.Checkpointer(d / "checkpoints")
    try:
        state, _ = ckpt.restore(target, step=step)
    except ckpt_lib.CheckpointError as e:
        raise FileNotFoundError(f"cannot load the {stage} stage from {workdir}: {e}") from None
    finally:
        ckpt.close()
    params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    return model, params, config


# ----------------------------------------------------------------------------- previews


def preview_samples(model, params, data: StageData, rng, num_steps: int = 12) -> np.ndarray | None:
    """Decodes the preview prompts with the sampler (12 steps, no guidance): uint8 images."""
    if data.preview is None or data.tokenizer is None:
        return None
    from muse_jax import sampling

    p = {k: jnp.asarray(v) for k, v in data.preview.items()}
    b = p["tokens"].shape[0]
    text_key = "text_ids" if model.text_encoder_config is not None else "text_emb"
    emb = p[text_key]
    if model.text_encoder_config is not None:
        emb = model.apply({"params": params}, p["text_ids"], p["text_mask"], method=model.encode_text)
    extra = (p["lowres_tokens"],) if model.config.is_superres else ()

    def logits_fn(tokens, step):
        del step
        return model.apply({"params": params}, tokens, emb, p["text_mask"], *extra)

    start = jnp.full((b, model.config.num_tokens), model.mask_token_id, jnp.int32)
    out = sampling.decode(logits_fn, start, rng, mask_token_id=model.mask_token_id,
                          options=sampling.DecodeOptions(num_steps=num_steps))
    g = model.config.grid_size
    images = np.asarray(data.tokenizer.decode(np.asarray(out).reshape(b, g, g)))
    real = np.asarray(data.tokenizer.decode(np.asarray(p["tokens"]).reshape(b, g, g)))
    return np.concatenate([images, real], axis=0)  # top rows: samples; bottom: tokenized references


# ----------------------------------------------------------------------------- the loop


def stage_config(config, stage: str):
    """The config with `config.train_<stage>` (per-stage overrides of `config.train`) applied."""
    overrides = config.get(f"train_{stage}")
    if not overrides:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for k, v in overrides.items():
            if k not in config.train:
                raise ValueError(f"config.train_{stage}.{k}: no such field in config.train")
            config.train[k] = v
    return config


def train_stage(
    config,
    workdir,
    stage: str,
    *,
    data: StageData | None = None,
    stop_at: int | None = None,
    quiet: bool = False,
    devices=None,
) -> dict[str, Any]:
    """Trains (or resumes) `stage` in W/<stage>; returns a summary (losses, timings, final step).

    `stop_at` ends this run early at that step (as a preemption would), keeping the schedule
    of `config.train.num_steps`.
    """
    workdir = paths.as_path(workdir)
    config = stage_config(config, stage)
    t = config.train
    precision.check(t.get("matmul_precision", "default"))  # before anything is written
    out_dir = stage_dir(workdir, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, out_dir / "config.json")
    num_steps = int(t.num_steps)
    end = num_steps if stop_at is None else min(int(stop_at), num_steps)

    if t.get("compilation_cache_dir", ""):  # persistent XLA cache: reruns skip compilation
        jax.config.update("jax_compilation_cache_dir", str(t.compilation_cache_dir).replace("{workdir}", str(workdir)))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = partitioning.make_mesh(config.mesh, devices)
    rules = partitioning.logical_rules(config)
    partitioning.check_batch_divides(int(t.batch_size), mesh, rules)
    local_batch = pipeline.per_process_batch_size(int(t.batch_size))

    if data is None:
        data = workdir_stage_data(config, workdir, stage)
    it = iter(make_loader(data.source, local_batch, int(config.data.shuffle_seed)))

    model = build_model(config, stage)
    create, abstract, shardings = state_setup(config, model, mesh, rules)
    ckpt = ckpt_lib.Checkpointer(out_dir / "checkpoints", save_every=int(t.checkpoint_every), keep=t.keep_checkpoints)
    rng = jax.random.key(int(config.seed))
    init_rng, step_rng, sample_rng = jax.random.split(rng, 3)
    start = 0
    # (scale-out helper) unbox outside axis_rules: inside it flax constrains the abstract leaves and
    # fails ("must be a NamedSharding ... AbstractMesh") when resuming on a multi-device mesh.
    target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)
    with partitioning.axis_rules(mesh, rules):
        if ckpt.latest_step() is not None:
            state, start = ckpt.restore(target, data_iterator=it)
            log.info("resumed %s from step %d", stage, start)
        else:
            state = jax.jit(lambda r: nn.unbox(create(r)), out_shardings=shardings)(init_rng)
    if start == 0 and t.get("init_from", ""):  # (outside axis_rules: load_stage makes its own mesh)
        state = _warm_start(state, shardings, workdir, stage, str(t.init_from), quiet)

    sample = data.source[0]
    batch_keys = {k: np.asarray(v).ndim + 1 for k, v in sample.items()}
    empty = {k: jnp.asarray(v) for k, v in data.empty_text.items()}
    train_step = step_lib.make_train_step(config, model, mesh, shardings, empty_text=empty, rules=rules,
                                          batch_keys=batch_keys)

    writer = writer_lib.MetricWriter(out_dir / "tb", console=not quiet)
    n_params = transformer_lib.count_params(state.params)
    if start == 0 and not quiet and jax.process_index() == 0:
        from clu import parameter_overview

        print(parameter_overview.get_parameter_overview(jax.device_get(state.params), include_stats=False))
        writer.write_hparams({"stage": stage, "params": n_params, **config.train.to_dict(), **config[stage].to_dict()})
    tokens_per_step = int(t.batch_size) * model.config.num_tokens
    abstract_inputs = _abstract_inputs(model, config, int(t.batch_size))
    flops_per_step = 3.0 * step_lib.forward_flops(model, nn.unbox(abstract).params, abstract_inputs)
    peak = step_lib.peak_flops_per_device(t) * jax.device_count()

    losses, step_times = {}, []
    pending = []  # device metrics since the last log
    last_good = start
    t_log, steps_since = time.perf_counter(), 0
    bar = writer_lib.progress(total=end, initial=start, desc=stage, disable=quiet or jax.process_index() != 0)
    stopped = "done"
    # (scale-out helper) watchdog: a step that never completes (a hung peer) ends the process with a
    # clear message after config.distributed.step_timeout_s (0 = off); see muse_jax/distributed.py.
    from muse_jax import distributed

    dog = distributed.Watchdog(float(config.distributed.step_timeout_s) if "distributed" in config else 0.0)
    with ckpt_lib.PreemptionHandler() as preempt, dog:
        try:
            for s in range(start, end):
                batch = partitioning.shard_batch(next(it), mesh, rules)
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch, step_rng)
                pending.append(metrics)
                steps_since += 1
                done = s + 1
                log_now = done % int(t.log_every) == 0 or done == end
                save_now = ckpt.should_save(done) or done == end
                stop_now = preempt.should_stop()
                if log_now or save_now or stop_now:
                    host = jax.device_get(pending)
                    for i, m in enumerate(host):
                        losses[done - len(host) + i + 1] = float(m["loss"])
                    for i, m in enumerate(host):
                        ckpt_lib.check_finite(m, done - len(host) + i + 1)
                    pending = []
                    if log_now:
                        dt = time.perf_counter() - t_log
                        sps = steps_since / dt
                        step_times.append(dt / steps_since)
                        avg = {k: float(np.mean([m[k] for m in host])) for k in ("loss", "accuracy", "grad_norm")}
                        scalars = {f"train/{k}": v for k, v in avg.items()}
                        scalars.update({"train/lr": float(host[-1]["lr"]), "perf/steps_per_s": sps,
                                        "perf/tokens_per_s": sps * tokens_per_step})
                        if flops_per_step:
                            scalars["perf/model_tflops_per_s"] = sps * flops_per_step / 1e12
                            if peak:
                                scalars["perf/mfu"] = sps * flops_per_step / peak
                        writer.write_scalars(done, scalars)
                        bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['accuracy']:.3f}")
                        t_log, steps_since = time.perf_counter(), 0
                    if save_now or stop_now:
                        ckpt.save(done, state, data_iterator=it, force=True)
                        last_good = done
                    if int(t.sample_every) and done % int(t.sample_every) == 0 and data.preview is not None:
                        _write_preview(model, state, data, jax.random.fold_in(sample_rng, done), writer, out_dir, done)
                bar.update(1)
                dog.kick(done)
                del t0
                if stop_now:
                    stopped = "preempted"
                    log.warning("stopping %s at step %d on SIGTERM (checkpoint saved)", stage, done)
                    break
        except ckpt_lib.NonFiniteError as e:
            ckpt.wait()
            bar.close()
            writer.close()
            ckpt.close()
            raise ckpt_lib.NonFiniteError(f"{stage}: {e} (last good checkpoint: step {ckpt.latest_step()})") from None
    bar.close()
    ckpt.close()
    writer.flush()
    writer.close()
    del last_good
    steady = step_times[1:] or step_times  # the first log interval includes compilation
    sec = float(np.median(steady)) if steady else float("nan")
    return {
        "stage": stage, "final_step": int(jax.device_get(state.step)), "losses": losses, "status": stopped,
        "seconds_per_step": sec, "tokens_per_s": tokens_per_step / sec if step_times else float("nan"),
        "params": n_params, "state": state,
    }


def _write_preview(model, state, data, rng, writer, out_dir, step):
    params = state.ema_params if state.ema_params is not None else state.params
    try:
        images = preview_samples(model, jax.device_get(params), data, rng)
    except Exception as e:  # a preview must never stop training
        log.warning("sample preview failed at step %d: %s", step, e)
        return
    if images is None:
        return
    grid = writer_lib.image_grid(images, cols=len(images) // 2)
    writer.write_images(step, {"samples": grid})
    if jax.process_index() == 0:
        from PIL import Image

        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        with (out_dir / "samples" / f"step_{step}.png").open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")


def train(config, workdir, stages=STAGES, quiet: bool = False) -> list[dict]:
    """Trains the given stages in order (each resumes if it has checkpoints)."""
    out = []
    for stage in stages:
        r = train_stage(config, workdir, stage, quiet=quiet)
        r.pop("state")
        out.append(r)
        if jax.process_index() == 0:
            print(f"{stage}: {r['final_step']} steps, {r['seconds_per_step']:.3f} s/step, "
                  f"{r['tokens_per_s']:.0f} tokens/s ({r['status']})")
    return out
