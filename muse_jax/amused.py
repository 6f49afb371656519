"""aMUSEd (Patil et al. 2024), the public Muse-family weights, as an ordinary one-stage workdir.

    summary = import_pipeline(W, "/path/to/amused-256")   # a diffusers pipeline folder, or a hub id
    loaded = load(W, mesh=None)                            # UVit2D + CLIP-L/14 text + their parameters

`import_pipeline` reads a diffusers `AmusedPipeline` folder (as `save_pretrained` or a hub snapshot
lays it out: transformer/, text_encoder/, tokenizer/, vqvae/, scheduler/; safetensors, or .bin with
torch installed) and writes:

  W/config.json                    family "amused", the sampling defaults (aMUSEd's) and the mesh
  W/tokenizer/                     the f16 VQGAN (`workdir.import_diffusers_tokenizer`)
  W/base/config.json               the UVit2D's config, the token grid, mask id, micro-conditioning
  W/base/checkpoints/0/            its parameters (Orbax, `{"params": ...}`)
  W/text/clip/config.json          the CLIP text encoder's config (transformers' field names)
  W/text/clip/checkpoints/0/       its parameters (text tower and text projection)
  W/text/clip/tokenizer/           CLIP's BPE files (vocab.json, merges.txt, tokenizer_config.json, ...)

Everything is read and checked before anything is written, so a refused import leaves W as it was.
`sample`, `edit`, `eval` and `cascade.Pipeline.from_workdir` then work on W as on a trained Muse
workdir, on one device or with the parameters sharded over a mesh by their logical axis names.

aMUSEd's sampler settings become the workdir's `config.sample`: 12 steps of the "amused" scheduler
of the decode loop, Gumbel temperature 2 -> 0, guidance 9 in Muse's convention
((1 + g) cond - g uncond, which is aMUSEd's guidance_scale 10: uncond + 10 (cond - uncond)) against
the empty prompt, micro-conditioning (width, height, crop top, crop left, aesthetic score) =
(S, S, 0, 0, 6) at S pixels, image-to-image strength 0.5 for `edit` without a mask, and the linear
mask schedule for inpainting (`AmusedInpaintPipeline` switches its scheduler to it).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from muse_jax import checkpoint as ckpt_lib
from muse_jax import partitioning
from muse_jax import workdir as workdir_lib
from muse_jax.data import clip_bpe
from muse_jax.models import clip, uvit, vqgan_diffusers

FAMILY = "amused"
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vqvae", "scheduler")
CLIP_DIR = "text/clip"
FINETUNE_FILE = "finetune.json"  # W/base/finetune.json: the fine-tuning run (training/finetune.py)
# aMUSEd's pipeline defaults, in this project's option names (cascade.SampleOptions).
SAMPLE_DEFAULTS = dict(steps=12, guidance=9.0, guidance_schedule="constant", choice_temperature=2.0,
                       temperature=1.0, top_k=0, schedule="cosine", inpaint_schedule="linear", scheduler="amused",
                       strength=0.5, negative_prompt="", batch_size=8)


def is_amused(workdir) -> bool:
    """Whether W was made by `import_pipeline` (its config.json says family "amused")."""
    p = workdir_lib.path(workdir) / workdir_lib.CONFIG_FILE
    return p.is_file() and json.loads(p.read_text()).get("family") == FAMILY


def refuse_tokenizer_training(workdir) -> None:
    """`train-tokenizer` refuses an imported aMUSEd workdir (its VQGAN is aMUSEd's) before writing anything."""
    if is_amused(workdir):
        raise ValueError(f"{workdir} holds an imported aMUSEd pipeline, whose VQGAN is not retrained; `train` "
                         f"fine-tunes its transformer")


# ----------------------------------------------------------------------------------------------
# Import.

def resolve_source(src) -> pathlib.Path:
    """A local pipeline folder as is; a hub id ("amused/amused-256") downloaded where there is network."""
    path = pathlib.Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{src} is a file; expected a diffusers pipeline folder ({', '.join(COMPONENTS)})")
    if str(src).count("/") != 1 or str(src).startswith((".", "/")):
        raise FileNotFoundError(f"{src} is neither a folder nor a hub id such as amused/amused-256")
    hint = (f"download it where there is network (`huggingface-cli download {src} --local-dir DIR`), copy DIR "
            f"here and pass DIR")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{src} is not a local folder, and huggingface_hub is not installed to fetch it "
                                f"(pip install 'muse_jax[hub]'): {hint}") from None
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(src))
    except Exception as e:  # offline, unknown id, no access: one clear line
        raise FileNotFoundError(f"cannot fetch {src} from the hub ({type(e).__name__}); {hint}") from None


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_pipeline(src) -> dict[str, Any]:
    """Every component of a pipeline folder, converted and checked against each other (nothing written)."""
    root = resolve_source(src)
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} is not a complete aMUSEd pipeline: no {', '.join(c + '/' for c in missing)} "
                                f"(expected {', '.join(c + '/' for c in COMPONENTS)})")
    ucfg, uparams = uvit.load_diffusers_dir(root / "transformer")
    ccfg, cparams = clip.load_text_hf(root / "text_encoder")
    vq_dict = _read_json(root / "vqvae" / "config.json")
    vq_config = vqgan_diffusers.config_from_diffusers(vq_dict)
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    tok_dir = root / "tokenizer"
    tokenizer = clip_bpe.CLIPTokenizer.from_dir(tok_dir)

    if vq_config.codebook_size != ucfg.codebook_size:
        raise ValueError(f"the transformer predicts {ucfg.codebook_size} codes but the VQGAN has "
                         f"{vq_config.codebook_size}: transformer/ and vqvae/ are not from one pipeline")
    mask_id = int(sched.get("mask_token_id", ucfg.vocab_size - 1))
    if not ucfg.codebook_size <= mask_id < ucfg.vocab_size:
        raise ValueError(f"scheduler mask_token_id {mask_id} is not a token of the transformer's vocabulary "
                         f"[{ucfg.codebook_size}, {ucfg.vocab_size}) beyond the codebook")
    if sched.get("masking_schedule", "cosine") not in ("cosine", "linear"):
        raise ValueError(f"scheduler masking_schedule {sched['masking_schedule']!r} is not supported")
    if ccfg.text.hidden_size != ucfg.encoder_hidden_size:
        raise ValueError(f"the text encoder is {ccfg.text.hidden_size} wide but the transformer cross-attends to "
                         f"{ucfg.encoder_hidden_size}")
    if ccfg.projection_dim != ucfg.cond_embed_dim:
        raise ValueError(f"the text encoder's pooled embedding is {ccfg.projection_dim} wide, the transformer takes "
                         f"{ucfg.cond_embed_dim}")
    largest = max(max(tokenizer.vocab.values()), *tokenizer.special_ids.values())
    if largest >= ccfg.text.vocab_size:
        raise ValueError(f"the tokenizer's ids reach {largest}, the text encoder embeds {ccfg.text.vocab_size} tokens")
    if tokenizer.max_length > ccfg.text.max_position_embeddings:
        raise ValueError(f"the tokenizer makes {tokenizer.max_length} tokens, the text encoder has "
                         f"{ccfg.text.max_position_embeddings} positions")
    factor = 2 ** (len(vq_config.channels) - 1)
    resolution = ucfg.sample_size * factor
    return dict(root=root, uvit_config=ucfg, uvit_params=uparams, clip_config=ccfg, clip_params=cparams,
                mask_token_id=mask_id, schedule=str(sched.get("masking_schedule", "cosine")),
                resolution=resolution, grid_size=int(ucfg.sample_size), tokenizer_dir=tok_dir,
                max_length=int(tokenizer.max_length),
                clip_config_dict=_read_json(root / "text_encoder" / "config.json"))


def import_pipeline(workdir, src) -> dict[str, Any]:
    """Writes the aMUSEd pipeline `src` as workdir W (module doc). Refuses a W that holds anything."""
    w = workdir_lib.path(workdir)
    existed = w.exists()
    if existed and (not w.is_dir() or any(w.iterdir())):
        raise ValueError(f"{w} is not empty; import into a new workdir")
    p = read_pipeline(src)
    res, grid = p["resolution"], p["grid_size"]
    sample = dict(SAMPLE_DEFAULTS, schedule=p["schedule"])
    stage = {
        "family": FAMILY, "uvit": p["uvit_config"].to_dict(), "imported_from": str(p["root"]),
        "base": {"grid_size": grid, "codebook_size": p["uvit_config"].codebook_size, "tokenizer": ""},
        "mask_token_id": p["mask_token_id"], "image_size": res,
        "micro_conditioning": [res, res, 0, 0, 6],
        "text": {"kind": "clip", "max_length": p["max_length"], "hidden_layer": -2},
    }
    config = {"family": FAMILY, "sample": sample, "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
              "image_size": res, "imported_from": str(p["root"])}
    try:
        w.mkdir(parents=True, exist_ok=True)
        workdir_lib.import_diffusers_tokenizer(w, p["root"] / "vqvae", image_size=res)
        save_params(workdir_lib.checkpoint_dir(w, "base"), p["uvit_params"])
        (workdir_lib.stage_dir(w, "base") / workdir_lib.CONFIG_FILE).write_text(_dump(stage))
        clip_dir = w / CLIP_DIR
        save_params(clip_dir / "checkpoints", p["clip_params"])
        (clip_dir / workdir_lib.CONFIG_FILE).write_text(_dump(p["clip_config_dict"]))
        (clip_dir / "tokenizer").mkdir(parents=True, exist_ok=True)
        for f in p["tokenizer_dir"].iterdir():  # vocab.json, merges.txt, tokenizer.json, tokenizer_config.json ...
            if f.is_file():
                (clip_dir / "tokenizer" / f.name).write_bytes(f.read_bytes())
        (w / workdir_lib.CONFIG_FILE).write_text(_dump(config))  # last: W is an aMUSEd workdir from here on
    except BaseException:  # leave W as it was: absent, or an empty folder
        for child in w.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
        if not existed:
            w.rmdir()
        raise
    return dict(workdir=str(w), resolution=res, grid_size=grid, uvit_params=uvit.num_params(p["uvit_config"]),
                text_params=int(sum(np.size(x) for x in jax.tree_util.tree_leaves(p["clip_params"]))))


def _dump(d) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def save_params(directory, params) -> None:
    """`params` as a parameters-only checkpoint 0 in `directory` (Orbax, `{"params": ...}`)."""
    ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
    ckpt.save(0, {"params": jax.tree_util.tree_map(np.asarray, params)}, force=True)
    ckpt.close()


# ----------------------------------------------------------------------------------------------
# Loading.

@dataclasses.dataclass(eq=False)
class Loaded:
    """An imported aMUSEd: the models, their parameters (placed), the tokenizer and the stage's facts."""

    uvit: uvit.UVit2D
    clip_config: Any
    params: dict  # {"uvit": ..., "clip": ...}
    tokenizer: clip_bpe.CLIPTokenizer
    grid_size: int
    mask_token_id: int
    micro_conditioning: tuple[float, ...]
    hidden_layer: int


def stage_config(workdir) -> dict:
    p = workdir_lib.stage_dir(workdir, "base") / workdir_lib.CONFIG_FILE
    cfg = _read_json(p)
    if cfg.get("family") != FAMILY:
        raise ValueError(f"{p} is not an imported aMUSEd stage")
    return cfg


def abstract_params(workdir) -> tuple[dict, clip.CLIPConfig, dict]:
    """(stage config, CLIP config, boxed abstract parameters {"uvit", "clip"} with their logical axis names)."""
    cfg = stage_config(workdir)
    ucfg = uvit.UVit2DConfig.from_dict(cfg["uvit"])
    ccfg = clip.CLIPConfig.from_hf(_read_json(workdir_lib.path(workdir) / CLIP_DIR / workdir_lib.CONFIG_FILE))
    ids = jax.ShapeDtypeStruct((1, int(cfg["text"]["max_length"])), jax.numpy.int32)
    text_model = clip.CLIPTextWithProjection(ccfg)
    boxed = {"uvit": jax.eval_shape(lambda: uvit.init_params(ucfg, jax.random.key(0))),
             "clip": jax.eval_shape(lambda i: text_model.init(jax.random.key(0), i)["params"], ids)}
    return cfg, ccfg, boxed


def load_clip_params(workdir):
    """W's CLIP text encoder parameters, on this process's first device."""
    w = workdir_lib.path(workdir)
    abstract = nn.unbox(abstract_params(w)[2]["clip"])
    one = NamedSharding(jax.sharding.Mesh(jax.local_devices()[:1], ("data",)), PartitionSpec())
    target = ckpt_lib.abstract_with_shardings(abstract, jax.tree_util.tree_map(lambda _: one, abstract))
    try:
        tree, _ = ckpt_lib.restore_subtree(w / CLIP_DIR / "checkpoints", {"params": target})
    except ckpt_lib.CheckpointError as e:
        raise FileNotFoundError(f"cannot load the aMUSEd clip parameters of {w}: {e}") from None
    return tree["params"]


def read_finetune(workdir) -> dict | None:
    """W/base/finetune.json, written by fine-tuning (training/finetune.py): {"config", "lora", "base_step"}."""
    p = workdir_lib.stage_dir(workdir, "base") / FINETUNE_FILE
    return _read_json(p) if p.is_file() else None


def load(workdir, mesh=None, rules=None, step: int | None = None) -> Loaded:
    """W's UVit2D and CLIP text encoder, parameters restored onto `mesh` (sharded by `rules`) or one device.

    The UVit2D's parameters are the newest checkpoint's (or `step`'s): the imported weights (checkpoint 0)
    or a fine-tuned state (its EMA where kept); LoRA fine-tunes apply their adapters on top of checkpoint 0."""
    from muse_jax.models import lora as lora_lib

    w = workdir_lib.path(workdir)
    cfg, ccfg, boxed = abstract_params(w)
    ucfg = uvit.UVit2DConfig.from_dict(cfg["uvit"])
    model = uvit.UVit2D(ucfg)
    run = read_finetune(w)
    steps = workdir_lib.checkpoint_steps(w, "base")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"cannot load the aMUSEd transformer of {w}: no checkpoint of step {step} "
                                f"(kept: {steps})")
    step = step if step is not None else (steps[-1] if steps else None)
    spec = lora_lib.LoraSpec.from_dict(run["lora"]) if run and run.get("lora") and step else None
    if spec is not None:
        model = lora_lib.wrap(model, spec, deterministic=True)
        adapters = lora_lib.split(jax.eval_shape(lambda: uvit_init(model, jax.random.key(0))))[1]
        boxed = {**boxed, "adapters": adapters}
    abstract = nn.unbox(boxed)
    if mesh is None:
        one = NamedSharding(jax.sharding.Mesh(jax.local_devices()[:1], ("data",)), PartitionSpec())
        shardings = jax.tree_util.tree_map(lambda _: one, abstract)
    else:
        shardings = partitioning.state_shardings(boxed, mesh, rules or partitioning.DEFAULT_RULES)
    base_dir = workdir_lib.checkpoint_dir(w, "base")
    field = "params"
    if step and ckpt_lib.newest_saved_fields(base_dir, [step]).get("ema_params"):
        field = "ema_params"
    params = {}
    parts = [("uvit", base_dir, step if spec is None else int(run.get("base_step", 0)), "params" if spec else field),
             ("clip", w / CLIP_DIR / "checkpoints", None, "params")]
    if spec is not None:
        parts.append(("adapters", base_dir, step, field))
    for name, directory, at, key in parts:
        target = ckpt_lib.abstract_with_shardings(abstract[name], shardings[name])
        try:
            tree, _ = ckpt_lib.restore_subtree(directory, {key: target}, step=at)
        except ckpt_lib.CheckpointError as e:
            raise FileNotFoundError(f"cannot load the aMUSEd {name} parameters of {w}: {e}") from None
        params[name] = tree[key]
    if spec is not None:
        params["uvit"] = lora_lib.combine(params["uvit"], params.pop("adapters"))
    return Loaded(
        uvit=model, clip_config=ccfg,
        params=params, tokenizer=clip_bpe.CLIPTokenizer.from_dir(w / CLIP_DIR / "tokenizer",
                                                                 max_length=int(cfg["text"]["max_length"])),
        grid_size=int(cfg["base"]["grid_size"]), mask_token_id=int(cfg["mask_token_id"]),
        micro_conditioning=tuple(float(v) for v in cfg["micro_conditioning"]),
        hidden_layer=int(cfg["text"].get("hidden_layer", -2)))


def uvit_init(model, rng):
    """Boxed parameters of `model` (a UVit2D, LoRA-wrapped or not) from one dummy example."""
    return model.init(rng, *uvit.dummy_inputs(model.config, 1, 1))["params"]
