"""The workdir: its layout, and the only loaders of what training put there.

A workdir W holds everything a trained pipeline needs:

  W/config.json                 the resolved config (sample, edit and eval read it)
  W/data/                       the shapes dataset (tfds array_record; a local folder, see below)
  W/tokenizer/config.json       the VQGAN's architecture, training section and image size
  W/tokenizer/checkpoints/<n>/  Orbax checkpoints (tokenizer train state + data position)
  W/tokenizer/tb/, eval.json    TensorBoard events; the final test evaluation
  W/tokenizer/<name>/...        the same for a named tokenizer (`config.<stage>.tokenizer`: one per
                                stage, as the paper's f16 base and f8 super-res VQGANs)
  W/text/spm.model              the sentencepiece vocabulary (trained on the captions if absent)
  W/cache/tokens_<split>.npz    image tokens of a split, and captions_<split>.json
  W/cache/text/                 frozen-T5 embeddings of the captions (a local folder)
  W/cache/jax/                  the persistent XLA compilation cache
  W/<stage>/config.json         the config a stage ("base", "superres") was trained with
  W/<stage>/checkpoints/<n>/    Orbax checkpoints (TrainState + data position)
  W/<stage>/tb/, samples/       TensorBoard events; sample previews
  W/<stage>/ema/<n>/, ema.json  the offline EMA of the checkpoints (`muse-jax ema`, training/ema.py) and
                                what went into it; loaded in place of any other parameters
  W/samples/, W/eval/, W/report.md   the quickstart's sample grids, evaluation and report
  W/init_from.json              the workdir W was started from and its stages' steps (`train --init-from`);
                                a LoRA stage's frozen weights are read there
An imported aMUSEd workdir (muse_jax/amused.py) has one stage, W/base, whose checkpoint 0 is the imported
weights; fine-tuning (training/finetune.py) adds checkpoints 1, 2, ... and W/base/finetune.json.

W may be a bucket URI (gs://...): everything is written there except the dataset and the text
cache, local files by nature, which go to `paths.local_dir(W, ...)`.

Loaders read parameters only, never optimizer state (`checkpoint.restore_subtree`).
"""
from __future__ import annotations

import json
import warnings
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from muse_jax import checkpoint as ckpt_lib
from muse_jax import config as config_lib
from muse_jax import distributed, partitioning, paths
from muse_jax.data import text as text_lib
from muse_jax.models import transformer as transformer_lib
from muse_jax.models import vqgan

CONFIG_FILE = "config.json"
EMA_FILE = "ema.json"
INIT_FILE = "init_from.json"  # W/init_from.json: the workdir W was started from (`train --init-from W0`)
TOKENIZER = "tokenizer"
SPM_MODEL = "text/spm.model"


def path(workdir):
    """W as a pathlib.Path (local) or an epath.Path (a URI)."""
    return paths.as_path(workdir)


def data_dir(workdir):
    """Where the tfds dataset is built: W/data, or a local folder for a remote W."""
    return paths.local_dir(workdir, "data")


def cache_dir(workdir):
    return path(workdir) / "cache"


def text_cache_dir(workdir):
    """Frozen-T5 embeddings of the captions (memory-mapped, so always local)."""
    return paths.local_dir(workdir, "cache", "text")


def tokenizer_dir(workdir, name: str = ""):
    """W/tokenizer (the shared tokenizer, name "") or W/tokenizer/<name>."""
    if name and (name in ("checkpoints", "tb") or not name.replace("_", "").replace("-", "").isalnum()):
        raise ValueError(f"tokenizer name {name!r}: expected letters, digits, '_' or '-' (not checkpoints/tb)")
    return path(workdir) / TOKENIZER / name if name else path(workdir) / TOKENIZER


def stage_tokenizer(config, stage: str) -> str:
    """The name of the tokenizer `stage` reads its tokens with ("" = the shared W/tokenizer)."""
    return str(config[stage].get("tokenizer", ""))


def stage_dir(workdir, stage: str):
    if stage not in config_lib.STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {config_lib.STAGES}")
    return path(workdir) / stage


def checkpoint_dir(workdir, stage: str):
    """W/<stage>/checkpoints; W/tokenizer[/<name>]/checkpoints for stage "tokenizer[/<name>]"."""
    if stage == TOKENIZER or stage.startswith(TOKENIZER + "/"):
        return tokenizer_dir(workdir, stage[len(TOKENIZER) + 1:]) / "checkpoints"
    return stage_dir(workdir, stage) / "checkpoints"


def ema_dir(workdir, stage: str):
    """W/<stage>/ema: the offline EMA of the stage's checkpoints, an Orbax checkpoint of `ema_params`."""
    return stage_dir(workdir, stage) / "ema"


def ema_meta(workdir, stage: str) -> dict | None:
    """W/<stage>/ema.json ({"decay", "every", "steps"}) where `muse-jax ema` has run, else None."""
    p = stage_dir(workdir, stage) / EMA_FILE
    return _read_json(p) if p.is_file() else None


def checkpoint_steps(workdir, stage: str) -> list[int]:
    d = checkpoint_dir(workdir, stage)
    return sorted(int(p.name) for p in d.glob("[0-9]*") if p.name.isdigit()) if d.is_dir() else []


def _read_json(p) -> dict:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------- configs


def load_run_config(workdir) -> ml_collections.ConfigDict:
    """W/config.json if present (written by the quickstart), else the config the base stage was
    trained with (W/base/config.json), else the embedded shapes default."""
    for p in (path(workdir) / CONFIG_FILE, stage_dir(workdir, "base") / CONFIG_FILE):
        if p.is_file():
            return ml_collections.ConfigDict(_read_json(p))
    return config_lib.load_config("shapes")


def load_stage_config(workdir, stage: str) -> ml_collections.ConfigDict:
    """The config `stage` was trained with (W/<stage>/config.json)."""
    p = stage_dir(workdir, stage) / CONFIG_FILE
    if not p.is_file() or not checkpoint_dir(workdir, stage).is_dir():
        raise FileNotFoundError(
            f"no trained {stage} stage in {workdir}: {p} or {checkpoint_dir(workdir, stage)} is missing "
            f"(run `muse-jax train --workdir {workdir} --stage {stage}` first)")
    return ml_collections.ConfigDict(_read_json(p))


# ----------------------------------------------------------------------------- image tokenizer


def tokenizer_meta(workdir, name: str = "") -> dict:
    """W/tokenizer[/<name>]/config.json: {"vqgan": ..., "train_tokenizer": ..., "image_size": ...}."""
    p = tokenizer_dir(workdir, name) / CONFIG_FILE
    if not p.is_file():
        flag = f" --tokenizer {name}" if name else ""
        raise FileNotFoundError(f"no trained tokenizer in {tokenizer_dir(workdir, name)}: {p} is missing "
                                f"(run `muse-jax train-tokenizer --workdir W{flag}` first)")
    try:
        meta = json.loads(p.read_text())
        vqgan.VQGANConfig.from_dict(meta["vqgan"])
        int(meta["image_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"tokenizer config {p} is unreadable or corrupt: {e}") from None
    return meta


def load_image_tokenizer(workdir, step: int | None = None, mesh=None, name: str = "") -> vqgan.ImageTokenizer:
    """W's trained VQGAN (the shared one, or `name`; latest checkpoint, or `step`) as a jitted `ImageTokenizer`."""
    meta = tokenizer_meta(workdir, name)
    config = vqgan.VQGANConfig.from_dict(meta["vqgan"])
    abstract = jax.eval_shape(lambda: nn.unbox(vqgan.init_params(config, jax.random.key(0), int(meta["image_size"]))))
    try:
        tree, _ = ckpt_lib.restore_subtree(checkpoint_dir(workdir, _tokenizer_stage(name)), {"params": abstract},
                                           step=step)
    except ckpt_lib.CheckpointError as e:
        raise ValueError(f"cannot load the tokenizer in {tokenizer_dir(workdir, name)}: {e}") from None
    return vqgan.ImageTokenizer(config, tree["params"], mesh=mesh)


def import_diffusers_tokenizer(workdir, diffusers_dir, *, name: str = "", image_size: int = 256):
    """Writes a diffusers VQModel folder (e.g. aMUSEd's f16 `vqvae`) as W's tokenizer `name`: its
    config.json and a parameters-only checkpoint, loaded by `load_image_tokenizer` like a trained one."""
    from muse_jax.models import vqgan_diffusers

    out = tokenizer_dir(workdir, name)
    if checkpoint_steps(workdir, _tokenizer_stage(name)):
        raise ValueError(f"{out} already holds a tokenizer; import into a fresh name or workdir")
    config, params = vqgan_diffusers.load_diffusers_dir(diffusers_dir, image_size)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"vqgan": config.to_dict(), "train_tokenizer": {"imported_from": str(diffusers_dir)},
            "image_size": int(image_size)}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir, _tokenizer_stage(name)), async_save=False)
    ckpt.save(0, {"params": nn.unbox(params)}, force=True)
    ckpt.close()
    return out


def _tokenizer_stage(name: str) -> str:
    return f"{TOKENIZER}/{name}" if name else TOKENIZER


def tokenizer_identity(workdir, name: str = "") -> list[str]:
    """What identifies a trained tokenizer (its checkpoint steps): caches of its tokens keep it."""
    return [str(s) for s in sorted(checkpoint_steps(workdir, _tokenizer_stage(name)), key=str)]


def check_stage_tokenizer(config, stage: str, tokenizer) -> int:
    """Refuses a tokenizer whose codebook or token grid is not the stage's; returns the stage's pixel size.

    The stage's images are `config.<stage>.grid_size * tokenizer.factor` pixels square.
    """
    cfg, name = config[stage], stage_tokenizer(config, stage) or "(shared)"
    if tokenizer.codebook_size != int(cfg.codebook_size):
        raise ValueError(f"tokenizer {name} has {tokenizer.codebook_size} codes; config.{stage}.codebook_size is "
                         f"{int(cfg.codebook_size)}")
    return int(cfg.grid_size) * tokenizer.factor


# ----------------------------------------------------------------------------- text


def spm_path(workdir, text_config):
    """`config.text.spm_model` if set, else W/text/spm.model."""
    spm_model = text_config.get("spm_model", "") if hasattr(text_config, "get") else ""
    return paths.as_path(spm_model) if spm_model else path(workdir) / SPM_MODEL


def text_tokenizer(workdir, text_config, captions=None) -> text_lib.TextTokenizer:
    """The workdir's sentencepiece tokenizer; trained from `captions()` (a callable, called only then)
    into W/text/spm.model when there is none and no `config.text.spm_model` is given.

    One vocabulary per job: with `captions`, every process of a multi-process job must call it (it is a
    collective). Process 0 decides whether W holds a vocabulary; if not, it alone trains one on its own
    `captions()` and writes it (atomically), and after a barrier every process loads that same file.
    """
    p = spm_path(workdir, text_config)
    if text_config.get("spm_model", "") or captions is None:
        if not p.is_file():
            if text_config.get("spm_model", ""):
                raise FileNotFoundError(f"config.text.spm_model={text_config.spm_model} does not exist")
            raise FileNotFoundError(f"{p} does not exist (it is trained with the first stage: run `muse-jax train`)")
    elif not distributed.main_process_flag(p.is_file()):
        if not text_config.get("trainable", True):
            raise ValueError("config.text.trainable=False needs config.text.spm_model, the sentencepiece model of the "
                             "pretrained T5 (its ids mean nothing to the T5 otherwise)")
        if distributed.is_main_process():
            text_lib.train_sentencepiece(captions(), p, text_config.vocab_size,
                                         text_config.get("spm_model_type", "bpe"))
        distributed.sync("text_tokenizer: spm.model written")
        if not p.is_file():
            raise FileNotFoundError(f"{p}, written by process 0, is not visible here: every process of a job "
                                    "needs the same workdir (a shared filesystem or a bucket)")
    return text_lib.TextTokenizer(p, text_config.max_length)


# ----------------------------------------------------------------------------- stages


def build_stage_model(config, stage: str):
    """The masked transformer of `stage` described by `config` (with its joint T5 when trainable)."""
    if stage not in config_lib.STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {config_lib.STAGES}")
    text_cfg = config.text.encoder if config.text.trainable else None
    return transformer_lib.build(config[stage], text_cfg)


def _stage_model(workdir, stage: str):
    """(config, model, abstract inputs) of trained `stage`."""
    config = load_stage_config(workdir, stage)
    model = build_stage_model(config, stage)
    return config, model, transformer_lib.dummy_inputs(model, 1, int(config.text.max_length))


def stage_param_shardings(workdir, stage: str, mesh, rules):
    """The shardings of trained `stage`'s parameters on `mesh`, from the logical axis names of its model."""
    _, model, inputs = _stage_model(workdir, stage)
    boxed = jax.eval_shape(lambda: transformer_lib.init_params(model, jax.random.key(0), inputs))
    return partitioning.state_shardings(boxed, mesh, rules)


def _first_device():
    return NamedSharding(jax.sharding.Mesh(jax.local_devices()[:1], ("data",)), PartitionSpec())


def load_stage(workdir, stage: str, *, step: int | None = None, use_ema: bool = True, mesh=None, rules=None,
               sharding=None) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """(model, params, config) of a trained stage: the loader sampling, evaluation, warm starts and the
    offline EMA share. Parameters only, each restored into the shards its logical axis names give on
    `mesh` (under `rules`), or onto `sharding` (one sharding or a tree of them); default this process's
    first device. With `use_ema`: the offline EMA of `muse-jax ema` if there is one (and no `step` is
    asked for), else the EMA weights kept in the checkpoint (config.train.ema_decay)."""
    config, model, inputs = _stage_model(workdir, stage)
    if int((config.get("lora") or {}).get("rank", 0)):
        return _load_lora_stage(workdir, stage, config, model, inputs, step=step, use_ema=use_ema, mesh=mesh,
                                rules=rules, sharding=sharding)
    boxed = jax.eval_shape(lambda: transformer_lib.init_params(model, jax.random.key(0), inputs))
    abstract = nn.unbox(boxed)
    if sharding is None:
        sharding = _first_device() if mesh is None else partitioning.state_shardings(boxed, mesh, rules)
    shardings = jax.tree_util.tree_map(lambda _: sharding, abstract) if isinstance(sharding, jax.sharding.Sharding) \
        else sharding
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    ckpt = checkpoint_dir(workdir, stage)
    steps = checkpoint_steps(workdir, stage)
    if step is not None and step not in steps:
        raise FileNotFoundError(f"cannot load the {stage} stage from {workdir}: no checkpoint of step {step} "
                                f"(kept: {steps})")
    field = "params"
    offline = ema_meta(workdir, stage) if use_ema and step is None else None
    if offline is not None:
        ckpt, field, step = ema_dir(workdir, stage), "ema_params", int(offline["steps"][-1])
        if steps and steps[-1] > step:
            warnings.warn(f"{stage}: the offline EMA ends at step {step}, the newest checkpoint is step {steps[-1]}; "
                          f"rerun `muse-jax ema --workdir {workdir} --stage {stage}`, or delete "
                          f"{stage_dir(workdir, stage) / EMA_FILE} to load the checkpoints", stacklevel=2)
    elif use_ema and steps and ckpt_lib.newest_saved_fields(ckpt, [step] if step is not None else steps).get(
            "ema_params"):
        field = "ema_params"
    try:
        tree, _ = ckpt_lib.restore_subtree(ckpt, {field: target}, step=step)
    except ckpt_lib.CheckpointError as e:
        raise FileNotFoundError(f"cannot load the {stage} stage from {workdir}: {e}") from None
    return model, tree[field], config


def read_init(workdir) -> dict | None:
    """W/init_from.json ({"workdir": W0, "family", "stages": {stage: step}}) where W was started from W0
    (`muse-jax train --workdir W --init-from W0`, training/finetune.py), else None."""
    p = path(workdir) / INIT_FILE
    return _read_json(p) if p.is_file() else None


def _load_lora_stage(workdir, stage: str, config, model, inputs, *, step, use_ema: bool, mesh, rules, sharding):
    """`load_stage` of a stage fine-tuned with LoRA: the adapters of W's checkpoint on top of the weights
    of the workdir W was started from (its checkpoint of the step recorded then), with the wrapped model."""
    from muse_jax.models import lora as lora_lib

    record = read_init(workdir)
    if record is None or stage not in record["stages"]:
        raise FileNotFoundError(f"the {stage} stage of {workdir} holds LoRA adapters, but {path(workdir) / INIT_FILE} "
                                f"does not say which weights they go on")
    wrapped = lora_lib.wrap(model, lora_lib.LoraSpec.from_config(config), deterministic=True)
    boxed = jax.eval_shape(lambda: transformer_lib.init_params(wrapped, jax.random.key(0), inputs))
    adapters = nn.unbox(lora_lib.split(boxed)[1])
    if sharding is None:
        sharding = _first_device() if mesh is None else partitioning.state_shardings(boxed, mesh, rules)
    if isinstance(sharding, jax.sharding.Sharding):
        base_sharding = adapter_shardings = sharding
    else:  # a tree for the whole wrapped model
        base_sharding, adapter_shardings = lora_lib.split(sharding)
    if isinstance(adapter_shardings, jax.sharding.Sharding):
        adapter_shardings = jax.tree_util.tree_map(lambda _: adapter_shardings, adapters)
    steps = checkpoint_steps(workdir, stage)
    if step is not None and step not in steps:
        raise FileNotFoundError(f"cannot load the {stage} stage from {workdir}: no checkpoint of step {step} "
                                f"(kept: {steps})")
    ckpt = checkpoint_dir(workdir, stage)
    field = "ema_params" if use_ema and steps and ckpt_lib.newest_saved_fields(
        ckpt, [step] if step is not None else steps).get("ema_params") else "params"
    try:
        tree, _ = ckpt_lib.restore_subtree(ckpt, {field: ckpt_lib.abstract_with_shardings(adapters, adapter_shardings)},
                                           step=step)
    except ckpt_lib.CheckpointError as e:
        raise FileNotFoundError(f"cannot load the {stage} stage's adapters from {workdir}: {e}") from None
    _, base, _ = load_stage(record["workdir"], stage, step=int(record["stages"][stage]), sharding=base_sharding)
    return wrapped, lora_lib.combine(base, tree[field]), config
