"""Fine-tuning an imported aMUSEd workdir on image-text data, fully or with LoRA adapters.

    muse-jax train --workdir W                                 # W made by `muse-jax import-amused`
    muse-jax train --workdir W --config amused_256_lora --config.data.train_files='shards/{000..099}.tar'

aMUSEd's training objective, run by the ordinary training loop (training/loop.py) and step:
  images [B, S, S, 3] uint8 ──W's VQGAN encoder (frozen, in the step)──> tokens [B, g*g]
  captions ──CLIP BPE (host)──> ids ──CLIP-L/14 text (frozen, in the step)──> penultimate hidden
      states [B, 77, 768] + projected pooled embedding [B, 768]
  micro-conditions [B, 5] = (original width, height, crop top, crop left, aesthetic score), from
      each record (data/preprocess.py); a record without a score gets config.train.aesthetic_score
  cosine masking, cross entropy on the masked tokens (label smoothing: config.train.label_smoothing),
  config.train.text_drop_rate of the captions replaced by the empty prompt's hidden states and pooled
  embedding, so the model keeps its unconditional branch (guidance).

W stays an aMUSEd workdir: the imported weights are checkpoint 0 of W/base/checkpoints, which is
never deleted; training saves steps 1, 2, ... there (TrainState: params, opt_state, EMA), and the run
config goes to W/base/finetune.json (W/base/config.json keeps describing the model). With LoRA
(`config.lora.rank > 0`, models/lora.py) only the adapters are trained and checkpointed; the
frozen weights are always read from checkpoint 0. `muse_jax.amused.load` (sample, edit, eval)
reads the newest checkpoint (its EMA where kept), with the adapters on top of checkpoint 0 for LoRA;
`muse-jax lora merge` writes a workdir with the adapters folded in.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import amused, distributed
from muse_jax import checkpoint as ckpt_lib
from muse_jax import workdir as workdir_lib
from muse_jax.data import clip_bpe, image_text, stage_data
from muse_jax.models import clip, uvit, vqgan
from muse_jax.models import lora as lora_lib
from muse_jax.training import online

BASE_STEP = 0  # the imported weights' checkpoint
MICRO_KEYS = ("original_size", "crop_top_left", "aesthetic_score")


def is_finetune(workdir) -> bool:
    """Whether `train` on W fine-tunes an imported aMUSEd."""
    return amused.is_amused(workdir)


def default_config(workdir) -> str:
    """The config `train` uses without --config: the fine-tuning recipe at W's resolution, else shapes."""
    if not is_finetune(workdir):
        return "shapes"
    return "amused_512_finetune" if int(amused.stage_config(workdir)["image_size"]) > 256 else "amused_256_finetune"


def check_config(config, workdir) -> None:
    """Refuses, before anything is written: a config of the other family (a Muse config on an aMUSEd workdir
    and the reverse), switching between full and LoRA fine-tuning on one workdir, and images of another size
    than the imported model's."""
    family = config.get("family", "muse")
    if is_finetune(workdir) and family != "amused":
        raise ValueError(f"{workdir} holds an imported aMUSEd; train it with a fine-tuning config "
                         f"(--config {default_config(workdir)}), not {config.get('name', 'this one')!r}")
    if not is_finetune(workdir) and family == "amused":
        raise ValueError(f"config {config.get('name', '')!r} fine-tunes an imported aMUSEd, and {workdir} is not one "
                         f"(`muse-jax import-amused --workdir W SRC` makes one)")
    if is_finetune(workdir):
        run = amused.read_finetune(workdir)
        trained = [s for s in workdir_lib.checkpoint_steps(workdir, "base") if s != BASE_STEP]
        spec = lora_lib.LoraSpec.from_config(config)
        before = run and run.get("lora") and lora_lib.LoraSpec.from_dict(run["lora"])
        if trained and run and (spec or None) != (before or None):
            kind = lambda s: f"LoRA {s.to_dict()}" if s else "full fine-tuning"  # noqa: E731
            raise ValueError(f"{workdir} holds {kind(before)} checkpoints (steps {trained}); this config asks for "
                             f"{kind(spec)}: fine-tune into a new workdir (`--init-from {workdir}`)")
        size = int(amused.stage_config(workdir)["image_size"])
        if int(config.data.image_size) != size:
            raise ValueError(f"config.data.image_size={config.data.image_size}: this aMUSEd workdir takes {size} px "
                             f"images")


def build_model(config, workdir) -> uvit.UVit2D:
    """W's UVit2D with the run's compute dtype (`config.model.dtype`) and rematerialised transformer layers
    (`config.model.remat`); wrapped with LoRA adapters when `config.lora.rank > 0`."""
    cfg = amused.stage_config(workdir)
    ucfg = uvit.UVit2DConfig.from_dict(cfg["uvit"])
    overrides = {k: v for k, v in dict(config.get("model") or {}).items() if k in ("dtype", "remat", "hidden_dropout")}
    model = uvit.UVit2D(dataclasses.replace(ucfg, **overrides))
    spec = lora_lib.LoraSpec.from_config(config)
    if spec is None:
        return model
    model = lora_lib.wrap(model, spec)
    # refuses, in one line, targets that match no layer
    lora_lib.init_adapters(model, jax.random.key(0), *uvit.dummy_inputs(model.config, 1, 1), abstract=True)
    return model


def write_run_config(config, workdir) -> None:
    """W/base/finetune.json: the run's config (process 0 only; after all checks have passed)."""
    if jax.process_index() != 0:
        return
    spec = lora_lib.LoraSpec.from_config(config)
    out = {"config": config.to_dict(), "lora": None if spec is None else spec.to_dict(), "base_step": BASE_STEP}
    p = workdir_lib.stage_dir(workdir, "base") / amused.FINETUNE_FILE
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(p)


def base_params(workdir, shardings, dtype: str = "float32"):
    """The imported UVit2D parameters (checkpoint 0), placed on `shardings` and cast to `dtype`."""
    abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                      nn.unbox(amused.abstract_params(workdir)[2]["uvit"]))
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    tree, _ = ckpt_lib.restore_subtree(workdir_lib.checkpoint_dir(workdir, "base"), {"params": target},
                                       step=BASE_STEP)
    return jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x.astype(dtype), p), out_shardings=shardings)(
        tree["params"])


def amused_stage_data(config, workdir, mesh, rules) -> stage_data.StageData:
    """Images, CLIP ids and micro-conditions streamed from `config.data`; tokens, text states and the
    micro-condition vectors computed inside the step by `prepare` (the frozen VQGAN encoder and CLIP)."""
    w = workdir_lib.path(workdir)
    cfg, ccfg, boxed = amused.abstract_params(w)
    tokenizer = clip_bpe.CLIPTokenizer.from_dir(w / amused.CLIP_DIR / "tokenizer",
                                                max_length=int(cfg["text"]["max_length"]))
    image_tok = workdir_lib.load_image_tokenizer(w)
    size = int(cfg["image_size"])
    clip_params = amused.load_clip_params(w)
    prepare = prepare_step(config, image_tok.config, image_tok.params, ccfg, clip_params, boxed["clip"], size,
                           int(cfg["text"].get("hidden_layer", -2)), mesh=mesh, rules=rules)

    def batches(local_batch: int):
        inner = image_text.Batches(image_text.make_dataset(config.data, "train", image_size=size), local_batch)
        return stage_data.TextBatches(inner, tokenizer, keep=("image", *MICRO_KEYS))

    length = tokenizer.max_length
    example = {"image": np.zeros((size, size, 3), np.uint8), "text_ids": np.zeros((length,), np.int32),
               "text_mask": np.zeros((length,), bool), "original_size": np.zeros((2,), np.int32),
               "crop_top_left": np.zeros((2,), np.int32), "aesthetic_score": np.zeros((), np.float32)}
    ids, _ = tokenizer([""])
    hidden, pooled = clip.text_hidden_and_embeds(clip_params, ids, config=ccfg,
                                                 hidden_layer=int(cfg["text"].get("hidden_layer", -2)))
    empty = {"text_states": np.asarray(hidden)[0], "pooled_text": np.asarray(pooled)[0]}
    return stage_data.StageData(None, empty, None, batches=batches, example=example, prepare=prepare)


def prepare_step(config, vq_config: vqgan.VQGANConfig, vq_params, clip_config, clip_params, clip_boxed, image_size: int,
                 hidden_layer: int, *, mesh, rules) -> online.Prepare:
    """`Prepare.fn(frozen, batch)`: {"image", "text_ids", micro-condition fields} -> the UVit2D's inputs.
    `clip_params`/`vq_params` None: abstract (ShapeDtypeStructs with shardings, for planning)."""
    vq_boxed = online.encoder_boxed(vq_config, image_size)
    boxed = {"vqgan": vq_boxed, "clip": clip_boxed}
    if clip_params is None:
        frozen, shardings = online.abstract_placement(boxed, mesh, rules)
    else:
        frozen, shardings = online.place({"vqgan": online.encoder_only(vq_params), "clip": clip_params}, boxed,
                                         mesh, rules)
    model = vqgan.VQGAN(vq_config)
    aesthetic = float(config.train.get("aesthetic_score", 6.0))

    def fn(frozen, batch):
        images = batch["image"]
        if images.shape[1] != image_size:
            raise ValueError(f"batch images of {images.shape[1]} px; the model takes {image_size} px")
        tokens = model.apply({"params": frozen["vqgan"]}, images, method=vqgan.VQGAN.encode)
        hidden, pooled = clip.text_hidden_and_embeds(frozen["clip"], batch["text_ids"], config=clip_config,
                                                     hidden_layer=hidden_layer)
        score = batch["aesthetic_score"].astype(jnp.float32)
        micro = jnp.concatenate([batch["original_size"].astype(jnp.float32), batch["crop_top_left"].astype(jnp.float32),
                                 jnp.where(jnp.isnan(score), aesthetic, score)[:, None]], axis=1)
        return {"tokens": tokens.reshape(images.shape[0], -1), "text_states": jax.lax.stop_gradient(hidden),
                "pooled_text": jax.lax.stop_gradient(pooled), "micro_conds": micro}

    return online.Prepare(fn, frozen, shardings, image_size)


def merge_lora(workdir, out) -> dict:
    """`muse-jax lora merge`: a new workdir `out` = W with its newest LoRA adapters folded into the weights
    (checkpoint 0 of out/base: an ordinary imported aMUSEd workdir that samples, and fine-tunes again,
    without adapters). W is left as it is; a refused merge writes nothing."""
    w, out = workdir_lib.path(workdir), workdir_lib.path(out)
    if not is_finetune(w):
        raise ValueError(f"{w} is not an imported aMUSEd workdir")
    run = amused.read_finetune(w)
    if not run or not run.get("lora"):
        raise ValueError(f"{w} holds no LoRA fine-tune ({amused.FINETUNE_FILE} names no adapters)")
    steps = workdir_lib.checkpoint_steps(w, "base")
    if steps[-1] == BASE_STEP:
        raise ValueError(f"{w} holds no trained adapters yet (only the imported checkpoint {BASE_STEP})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not empty; merge into a new workdir")
    spec = lora_lib.LoraSpec.from_dict(run["lora"])
    loaded = amused.load(w)
    merged = jax.jit(lambda p: lora_lib.merge(p, spec))(loaded.params["uvit"])
    existed = out.exists()
    try:
        shutil.copytree(w, out, dirs_exist_ok=True, ignore=_merge_ignore(w))
        amused.save_params(workdir_lib.checkpoint_dir(out, "base"), merged)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir()
        raise
    return {"workdir": str(out), "step": steps[-1], "adapters": lora_lib.count(lora_lib.split(loaded.params["uvit"])[1])}


def _merge_ignore(w):
    """What `merge_lora` does not copy: W/base's checkpoints, run record, lock, logs and health record."""
    base = workdir_lib.stage_dir(w, "base").resolve()

    def ignore(directory, names):
        if pathlib.Path(directory).resolve() != base:
            return [n for n in names if n == "cache"] if pathlib.Path(directory).resolve() == w.resolve() else []
        return [n for n in names if n not in (workdir_lib.CONFIG_FILE,)]

    return ignore


# ----------------------------------------------------------------------------------------------
# `train --init-from W0`: fine-tune any trained workdir into a new one.

def init_workdir(workdir, source) -> dict:
    """Starts the new workdir W from W0 (`muse-jax train --workdir W --init-from W0`); returns the record
    W/init_from.json ({"workdir": W0, "family", "stages": {stage: step}}).

    aMUSEd W0 (imported or fine-tuned): W gets W0's configs, VQGAN and CLIP, and W0's newest transformer
    weights (adapters folded in for a LoRA fine-tune) as checkpoint 0: an imported-like workdir that
    `train` fine-tunes like any (fully or with LoRA, whose frozen weights are then W's checkpoint 0).
    Muse W0: W gets W0's run config, image tokenizers and text tokenizer; each stage W0 has trained starts
    from W0's newest weights of that stage (its EMA where kept) when `train` first runs it.
    Run again on the same W (a resume) it returns the record; any other non-empty W is refused, and a failed
    copy leaves W as it was. Process 0 copies; every process returns after it."""
    w, src = workdir_lib.path(workdir), workdir_lib.path(source)
    record_path = w / workdir_lib.INIT_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["workdir"] != str(src.resolve()):
            raise ValueError(f"{w} was started from {record['workdir']}, not {src}")
        return record
    if not src.is_dir():
        raise FileNotFoundError(f"--init-from {src}: no such workdir")
    family = "amused" if amused.is_amused(src) else "muse"
    stages = {s: workdir_lib.checkpoint_steps(src, s)[-1] for s in ("base", "superres")
              if workdir_lib.checkpoint_steps(src, s)}
    if not stages:
        raise ValueError(f"--init-from {src}: it holds no trained stage (no {src}/base/checkpoints)")
    if w.exists() and (not w.is_dir() or any(w.iterdir())):
        raise ValueError(f"{w} is not empty; --init-from starts a new workdir")
    record = {"workdir": str(src.resolve()), "family": family, "stages": stages}
    if jax.process_index() == 0:
        existed = w.exists()
        try:
            w.mkdir(parents=True, exist_ok=True)
            for name in (workdir_lib.CONFIG_FILE, "tokenizer", "text"):
                p = src / name
                if p.is_dir():
                    shutil.copytree(p, w / name, ignore=shutil.ignore_patterns("LOCK", "tb", "*.tmp"))
                elif p.is_file():
                    shutil.copy2(p, w / name)
            if family == "amused":
                workdir_lib.stage_dir(w, "base").mkdir(parents=True)
                shutil.copy2(workdir_lib.stage_dir(src, "base") / workdir_lib.CONFIG_FILE,
                             workdir_lib.stage_dir(w, "base") / workdir_lib.CONFIG_FILE)
                loaded = amused.load(src)
                run = amused.read_finetune(src)
                params = loaded.params["uvit"]
                if run and run.get("lora") and stages["base"] != BASE_STEP:
                    params = jax.jit(lambda p: lora_lib.merge(p, lora_lib.LoraSpec.from_dict(run["lora"])))(params)
                amused.save_params(workdir_lib.checkpoint_dir(w, "base"), params)
            tmp = record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(record_path)  # last: from here on W is W0's fine-tune
        except BaseException:
            for child in (w.iterdir() if w.exists() else []):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed and w.exists():
                w.rmdir()
            raise
    distributed.sync("init-from")
    return record


def frozen_weights(workdir, stage: str, shardings, dtype: str):
    """The weights a fine-tune of W's `stage` starts from (full) or keeps frozen under its adapters (LoRA),
    placed on `shardings` in `dtype`: an aMUSEd workdir's checkpoint 0; for a Muse stage, the newest weights
    (EMA where kept) of the workdir W was started from (`init_workdir`), read there, never copied. None for a
    Muse stage W0 lacks; a ValueError for LoRA on a Muse workdir that was not started from another."""
    if is_finetune(workdir):
        return base_params(workdir, shardings, dtype)
    record = workdir_lib.read_init(workdir)
    if record is None:
        raise ValueError("config.lora.rank > 0 on a Muse workdir: LoRA trains adapters over the weights of "
                         "another workdir (`muse-jax train --workdir W --init-from W0`)")
    if stage not in record["stages"]:
        return None
    src = record["workdir"]
    try:
        _, params, _ = workdir_lib.load_stage(src, stage, step=int(record["stages"][stage]),
                                                     sharding=shardings)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot start the {stage} stage from {src}: {e} (does the config's config.{stage} "
                         f"describe the model {src} trained?)") from None
    return jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x.astype(dtype), p), out_shardings=shardings)(params)


def init_config(source) -> str:
    """The config `train --init-from W0` uses without --config: the fine-tuning recipe for an aMUSEd W0,
    else the config W0 was trained with (W0/config.json or W0/base/config.json)."""
    src = workdir_lib.path(source)
    if amused.is_amused(src):
        return default_config(src)
    for p in (src / workdir_lib.CONFIG_FILE, workdir_lib.stage_dir(src, "base") / workdir_lib.CONFIG_FILE):
        if p.is_file():
            return str(p)
    raise FileNotFoundError(f"--init-from {src}: no config.json to train with; pass --config")
