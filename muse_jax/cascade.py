"""The Muse cascade: prompts -> base tokens -> super-resolution tokens -> VQGAN decode, and editing.

    pipe = Pipeline.from_workdir(W)                      # tokenizer + trained stages of W (muse_jax.workdir)
    images = pipe.generate(["a red circle"], num_per_prompt=4, seed=0)   # uint8 [4, 64, 64, 3]
    out = pipe.inpaint(images, masks, ["a blue square"] * 4)            # pixels outside masks kept
    out = pipe.edit(images, ["a green triangle"] * 4)                   # mask-free editing

Each stage (base, super-res) runs as one jitted program per (batch, options): text encoding,
then the decode loop of `muse_jax.sampling` with classifier-free guidance as one batched
forward of 2B (the unconditional branch is the empty prompt, or the negative prompt). The
batch is cut into chunks of `batch_size` (the last one padded), each sharded over the mesh's
batch axes, so one shape is compiled however many images are asked for. Sample i of chunk c
uses `fold_in(key(seed), c)`: the same seed and batch size give the same images.

An imported aMUSEd workdir (`muse_jax.amused`) loads as one stage whose CLIP text encoder runs
inside the program, sampled with aMUSEd's scheduler (`SampleOptions.scheduler="amused"`); `edit`
without a mask is then image-to-image at `strength`.

With a mesh, each stage's parameters (the EMA ones where kept) are restored from its checkpoint
straight into the shardings their logical axis names get from the rules (FSDP, tensor
parallelism: no device holds more than its share), never reading the optimizer state, and the
programs run under those rules, so the model's activation constraints apply as in training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import amused, editing, image_ops, partitioning, precision, sampling
from muse_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """Options of one sampling / editing call (defaults: `config.sample`)."""

    steps: int = 12
    sr_steps: int = 8
    guidance: float = 3.0
    guidance_schedule: str = "constant"
    choice_temperature: float = 4.5
    temperature: float = 1.0
    top_k: int = 0
    schedule: str = "cosine"
    negative_prompt: str = ""
    batch_size: int = 16
    edit_iterations: int = 12
    edit_fraction: float = 0.08
    edit_choice_temperature: float = 1.0
    matmul_precision: str = "default"  # muse_jax.precision.PRECISIONS
    scheduler: str = "muse"  # sampling.SCHEDULERS ("amused": aMUSEd's, the default of imported aMUSEd workdirs)
    strength: float = 0.0  # > 0: `edit` without a mask is image-to-image at this strength ("amused" only)
    micro_conditioning: tuple[float, ...] = ()  # aMUSEd: (width, height, crop top, crop left, aesthetic score)
    inpaint_schedule: str = ""  # the mask schedule of inpainting ("": `schedule`; aMUSEd inpaints with "linear")

    def __post_init__(self):
        precision.check(self.matmul_precision)
        object.__setattr__(self, "micro_conditioning", tuple(float(v) for v in self.micro_conditioning))
        if self.micro_conditioning and len(self.micro_conditioning) != 5:
            raise ValueError(f"micro_conditioning takes 5 numbers (width, height, crop top, crop left, aesthetic "
                             f"score), got {len(self.micro_conditioning)}")
        if not 0.0 <= self.strength <= 1.0 or (self.strength and self.scheduler != "amused"):
            raise ValueError(f"strength must be in [0, 1] and needs scheduler 'amused', got {self.strength} "
                             f"({self.scheduler})")
        if self.guidance_schedule not in sampling.GUIDANCE_SCHEDULES:
            raise ValueError(
                f"unknown guidance schedule {self.guidance_schedule!r}; expected one of {sampling.GUIDANCE_SCHEDULES}"
            )
        if self.batch_size < 1:
            raise ValueError(f"sample batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 1 or self.sr_steps < 1 or self.edit_iterations < 1:
            raise ValueError(
                f"steps, sr_steps and edit_iterations must be >= 1, got {self.steps}, {self.sr_steps}, "
                f"{self.edit_iterations}"
            )
        if self.strength and int(self.steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} of {self.steps} steps runs no step; raise either")
        self.decode_options("base")  # validates schedule, temperatures, top_k
        editing.num_resampled(1, self.edit_fraction)

    @classmethod
    def from_config(cls, cfg, **overrides) -> SampleOptions:
        """From a `config.sample` section (missing keys keep their defaults), then overrides."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
        d = {k: v for k, v in d.items() if k in names}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def decode_options(self, stage: str, img2img: bool = False) -> sampling.DecodeOptions:
        steps = self.steps if stage == "base" else self.sr_steps
        return sampling.DecodeOptions(
            num_steps=steps, mask_schedule=self.schedule, choice_temperature=self.choice_temperature,
            temperature=self.temperature, top_k=self.top_k, scheduler=self.scheduler,
            first_step=steps - int(steps * self.strength) if img2img else 0,
        )


def muse_text_embed(model, params, text: dict) -> tuple[jax.Array, jax.Array]:
    """(emb [B, L, D], mask [B, L]) of a Muse stage's text: {"ids", "mask"} through its joint T5, or
    {"emb", "mask"} from a frozen encoder as they are."""
    if model.text_encoder_config is not None:
        return model.apply({"params": params}, text["ids"], text["mask"], method=model.encode_text), text["mask"]
    return text["emb"], text["mask"]


def muse_logits(model, params, tokens, emb, mask, lowres=None) -> jax.Array:
    """A Muse stage's logits [B, N, K] for tokens [B, N] (super-resolution: with its lowres tokens)."""
    args = (tokens, emb, mask) if lowres is None else (tokens, emb, mask, lowres)
    return model.apply({"params": params}, *args, deterministic=True)


@dataclasses.dataclass(eq=False)
class Stage:
    """One masked transformer ready for sampling, independent of how it was built.

    prepare_text(prompts) -> dict of numpy arrays [B, ...]   (host: tokenize / frozen encoder)
    embed(params, text_inputs) -> (emb [B, L, D], mask [B, L])  (traced: e.g. a joint T5)
    apply(params, tokens [B, N], emb, mask, lowres [B, M] | None) -> logits [B, N, K]
    """

    name: str
    params: Any
    grid_size: int
    mask_token_id: int
    prepare_text: Callable[[Sequence[str]], dict]
    embed: Callable[[Any, dict], tuple]
    apply: Callable[..., jax.Array]
    lowres_grid_size: int = 0
    micro_conditioning: tuple[float, ...] | None = None  # the default of a stage that takes micro-conditions
    image_tokenizer: str = ""  # the workdir's image tokenizer the stage was trained on ("": W/tokenizer)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_model(cls, name, model, params, text_tokenizer, text_encode: Callable | None = None) -> Stage:
        """From a `muse_jax.models.transformer` stage: a jointly trained T5 inside the model, or a
        frozen `text_encode(prompts) -> (emb, mask)` (e.g. `muse_jax.text.make_encode_fn`)."""
        cfg = model.config
        if model.text_encoder_config is not None:

            def prepare_text(prompts):
                _warn_unknown(text_tokenizer, prompts)
                ids, mask = text_tokenizer(list(prompts))
                return {"ids": ids, "mask": mask}

        else:
            if text_encode is None:
                raise ValueError(f"stage {name!r} has no text encoder of its own: a frozen text_encode is needed")

            def prepare_text(prompts):
                _warn_unknown(text_tokenizer, prompts)
                emb, mask = text_encode(list(prompts))
                return {"emb": np.asarray(emb), "mask": np.asarray(mask)}

        embed, apply = functools.partial(muse_text_embed, model), functools.partial(muse_logits, model)
        return cls(name, params, cfg.grid_size, model.mask_token_id, prepare_text, embed, apply,
                   cfg.lowres_grid_size)

    @classmethod
    def from_amused(cls, loaded) -> Stage:
        """An imported aMUSEd (`muse_jax.amused.load`): CLIP-L/14 text encoding runs inside the program
        (params["clip"]), the UVit2D takes its penultimate hidden states, the projected pooled embedding
        and the micro-conditions."""
        from muse_jax.models import clip

        tokenizer = loaded.tokenizer

        def prepare_text(prompts):
            distinct = sorted(set(prompts))
            cut = [p for p, n in zip(distinct, tokenizer.num_tokens(distinct)) if n > tokenizer.max_length]
            if cut:
                warnings.warn(f"{len(cut)} of {len(distinct)} distinct prompts are longer than {tokenizer.max_length} "
                              f"CLIP tokens and were cut (e.g. {cut[0][:60]!r})", UserWarning, stacklevel=2)
            ids, _ = tokenizer(list(prompts))
            return {"ids": ids}

        def embed(params, t):
            hidden, pooled = clip.text_hidden_and_embeds(params["clip"], t["ids"], config=loaded.clip_config,
                                                         hidden_layer=loaded.hidden_layer)
            return {"hidden": hidden, "pooled": pooled, "micro": t["micro"]}, None

        def apply(params, tokens, emb, mask, lowres=None):
            return loaded.uvit.apply({"params": params["uvit"]}, tokens, emb["hidden"], emb["pooled"], emb["micro"])

        return cls("base", loaded.params, loaded.grid_size, loaded.mask_token_id, prepare_text, embed, apply,
                   micro_conditioning=loaded.micro_conditioning)

    @classmethod
    def from_workdir(cls, workdir, name: str, mesh=None, rules=None, step: int | None = None) -> Stage:
        """A trained stage ("base" or "superres") of W: its parameters (EMA where kept; the checkpoint of
        `step` if given, default the newest; sharded over `mesh` by their logical axis names) and text
        tokenizer."""
        model, params, config = workdir_lib.load_stage(workdir, name, mesh=mesh, rules=rules, step=step)
        spm = workdir_lib.text_tokenizer(workdir, config.text)
        tokenizer = workdir_lib.stage_tokenizer(config, name)
        if model.text_encoder_config is not None:
            return dataclasses.replace(cls.from_model(name, model, params, spm), image_tokenizer=tokenizer)
        if not config.text.get("checkpoint", ""):
            raise FileNotFoundError(
                f"stage {name} of {workdir} was trained on a frozen T5's embeddings, but its config names no "
                "config.text.checkpoint to load that T5 from")
        from muse_jax.data import text as text_lib
        from muse_jax.models import t5

        tcfg = t5.T5Config.coerce(config.text.encoder)
        encoder = t5.T5Encoder(tcfg)
        encode = text_lib.make_encode_fn(spm, encoder, t5.load_hf(config.text.checkpoint, tcfg))
        return dataclasses.replace(cls.from_model(name, model, params, spm, text_encode=encode),
                                   image_tokenizer=tokenizer)


def _warn_unknown(text_tokenizer, prompts) -> None:
    """Prompts with characters the sentencepiece vocabulary lacks (they become <unk>) are warned about."""
    unknown = text_tokenizer.unknown_pieces(prompts) if hasattr(text_tokenizer, "unknown_pieces") else {}
    if unknown:
        text, pieces = next(iter(unknown.items()))
        warnings.warn(f"{len(unknown)} of {len(set(prompts))} distinct prompts hold text the vocabulary lacks, read "
                      f"as <unk> (e.g. {''.join(pieces)[:20]!r} in {text[:60]!r})", UserWarning, stacklevel=3)


def _stage_program(stage: Stage, options: sampling.DecodeOptions | None, guided: bool, guidance_schedule: str,
                   edit: tuple[int, float, float] | None = None, matmul_precision: str = "default"):
    """One jitted program: (params, start [B,N], cond, uncond, lowres, rng, g) -> tokens [B, N].

    options: decode (generation from a fully masked start, or inpainting from given tokens);
    edit = (iterations, fraction, choice_temperature): mask-free editing instead.
    """
    num_steps = edit[0] if edit else options.num_steps

    def program(params, start, cond_text, uncond_text, lowres, rng, guidance_scale):
        emb, mask = stage.embed(params, cond_text)

        def apply_fn(tokens, inputs):
            return stage.apply(params, tokens, *inputs)

        inputs = (emb, mask, lowres)
        if guided:
            u_emb, u_mask = stage.embed(params, uncond_text)
            fn = sampling.guided_logits_fn(apply_fn, inputs, (u_emb, u_mask, lowres), guidance_scale=guidance_scale,
                                           num_steps=num_steps, guidance_schedule=guidance_schedule)
        else:
            fn = lambda tokens, step: apply_fn(tokens, inputs)  # noqa: E731
        if edit:
            iterations, fraction, choice_temperature = edit
            return editing.mask_free_edit(
                fn, start, rng, mask_token_id=stage.mask_token_id, num_iterations=iterations, fraction=fraction,
                choice_temperature=choice_temperature, temperature=options.temperature, top_k=options.top_k,
            )
        return sampling.decode(fn, start, rng, mask_token_id=stage.mask_token_id, options=options)

    return precision.jit(program, matmul_precision)


class Pipeline:
    """Tokenizer(s) + base stage (+ super-res stage): generation, inpainting and mask-free editing.

    `tokenizer` is one ImageTokenizer for both stages, or {"base": ..., "superres": ...} (the
    paper's f16 base and f8 super-res VQGANs): each stage's tokens are encoded and decoded by its own.
    """

    def __init__(self, tokenizer, base: Stage, superres: Stage | None = None, options: SampleOptions | None = None,
                 mesh=None, rules=None):
        self.tokenizers = dict(tokenizer) if isinstance(tokenizer, dict) else {"base": tokenizer, "superres": tokenizer}
        self.base = base
        self.superres = superres
        self.tokenizer = self.tokenizers["superres" if superres is not None else "base"]  # the output images'
        self.options = options or SampleOptions()
        self.mesh = mesh
        self.rules = rules
        if superres is not None and superres.lowres_grid_size != base.grid_size:
            raise ValueError(
                f"super-res stage expects {superres.lowres_grid_size}x{superres.lowres_grid_size} low-res tokens, "
                f"the base stage makes {base.grid_size}x{base.grid_size}"
            )
        self.base_image_size = base.grid_size * self.tokenizers["base"].factor
        self.image_size = superres.grid_size * self.tokenizer.factor if superres is not None else self.base_image_size
        if self.image_size % self.base_image_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the base size {self.base_image_size}")
        self._programs: dict = {}

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_workdir(cls, workdir, mesh=None, steps: dict | None = None, **overrides) -> Pipeline:
        """Loads W's image tokenizer and trained stages (the checkpoints of `steps` = {stage: step} where
        given, else the newest); `overrides` replace `config.sample` keys."""
        workdir = workdir_lib.path(workdir)  # local or a bucket URI (gs://...)
        if not workdir.is_dir():
            raise FileNotFoundError(f"workdir {workdir} does not exist")
        config = workdir_lib.load_run_config(workdir)
        options = SampleOptions.from_config(config.get("sample"), **overrides)
        if mesh is None and len(jax.devices()) > 1 and "mesh" in config:
            mesh = partitioning.make_mesh(config.mesh)
        if amused.is_amused(workdir):  # one stage, CLIP text, the imported VQGAN
            rules = None if mesh is None else partitioning.logical_rules(config)
            base = Stage.from_amused(amused.load(workdir, mesh=mesh, rules=rules))
            return cls(workdir_lib.load_image_tokenizer(workdir, mesh=mesh), base, None, options, mesh=mesh,
                       rules=rules)
        if not workdir_lib.tokenizer_dir(workdir).is_dir():  # the first thing training makes
            raise FileNotFoundError(f"no trained tokenizer in {workdir_lib.tokenizer_dir(workdir)} (run `muse-jax "
                                    f"train-tokenizer --workdir {workdir}` first)")
        rules = None if mesh is None else partitioning.logical_rules(config)

        def stage(name):  # with a mesh: each parameter restored into the shards of its logical axes
            return Stage.from_workdir(workdir, name, mesh=mesh, rules=rules, step=(steps or {}).get(name))

        base = stage("base")
        try:
            superres = stage("superres")
        except FileNotFoundError as e:
            warnings.warn(f"{e}; sampling at the base resolution only", UserWarning, stacklevel=2)
            superres = None
        # Each stage's image tokenizer, as named by the config it was trained with.
        tokenizers = {s.name: workdir_lib.load_image_tokenizer(workdir, mesh=mesh, name=s.image_tokenizer)
                      for s in (base, superres) if s is not None}
        tokenizers.setdefault("superres", tokenizers["base"])
        return cls(tokenizers, base, superres, options, mesh=mesh, rules=rules)

    # ----------------------------------------------------------------------------- helpers
    def _options(self, overrides) -> SampleOptions:
        return dataclasses.replace(self.options, **{k: v for k, v in overrides.items() if v is not None})

    def _program(self, stage: Stage, opts: SampleOptions, guided: bool, edit: bool):
        stage_key = "base" if stage is self.base else "superres"
        img2img = edit and opts.strength > 0
        dec = opts.decode_options(stage_key, img2img=img2img)
        e = (opts.edit_iterations, opts.edit_fraction, opts.edit_choice_temperature) if edit and not img2img else None
        key = (stage_key, dec, guided, opts.guidance_schedule, e, opts.matmul_precision)
        if key not in self._programs:
            self._programs[key] = _stage_program(stage, dec, guided, opts.guidance_schedule, e, opts.matmul_precision)
        return self._programs[key]

    def _put(self, x):
        """Host array [B, ...] -> device array sharded over the mesh's batch axes (if any)."""
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(np.asarray(x), partitioning.batch_sharding(self.mesh, self.rules, np.ndim(x)))

    def _axis_rules(self):
        """The mesh and logical-axis rules the programs are traced and run under (none without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        return partitioning.axis_rules(self.mesh, self.rules or partitioning.DEFAULT_RULES)

    def _chunk_size(self, opts: SampleOptions) -> int:
        b = opts.batch_size
        if self.mesh is not None:
            axes = partitioning.batch_sharding(self.mesh, self.rules).spec[0]
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            n = int(np.prod([self.mesh.shape[a] for a in axes]))
            b = -(-b // n) * n  # a multiple of the devices the batch is split over
        return b

    def _run_stage(self, stage: Stage, start: np.ndarray, prompts: Sequence[str], lowres: np.ndarray | None,
                   rng: jax.Array, opts: SampleOptions, edit: bool = False) -> np.ndarray:
        """Runs one stage over the whole batch in padded chunks: start [B, N] -> tokens [B, N]."""
        b_total = start.shape[0]
        chunk = self._chunk_size(opts)
        guided = opts.guidance != 0
        program = self._program(stage, opts, guided, edit)
        outs = []
        for c, lo in enumerate(range(0, b_total, chunk)):
            hi = min(lo + chunk, b_total)
            pad = chunk - (hi - lo)
            padded = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x  # noqa: E731
            p = list(prompts[lo:hi]) + [prompts[hi - 1]] * pad
            cond = stage.prepare_text(p)
            uncond = stage.prepare_text([opts.negative_prompt] * chunk) if guided else None
            if stage.micro_conditioning is not None:  # the same for both branches, as aMUSEd
                micro = np.tile(np.float32(opts.micro_conditioning or stage.micro_conditioning), (chunk, 1))
                cond["micro"] = micro
                if guided:
                    uncond["micro"] = micro
            cond = jax.tree_util.tree_map(self._put, cond)
            uncond = jax.tree_util.tree_map(self._put, uncond)
            low = None if lowres is None else self._put(padded(lowres[lo:hi]))
            with self._axis_rules():
                tokens = program(stage.params, self._put(padded(start[lo:hi])), cond, uncond, low,
                                 jax.random.fold_in(rng, c), jnp.float32(opts.guidance))
            outs.append(np.asarray(tokens)[: hi - lo])
        return np.concatenate(outs)

    def _decode_images(self, tokens: np.ndarray, stage: str) -> np.ndarray:
        """`stage`'s tokens -> images, with that stage's tokenizer."""
        grid = self.base.grid_size if stage == "base" else self.superres.grid_size
        return np.asarray(self.tokenizers[stage].decode(tokens.reshape(-1, grid, grid)))

    def _check_images(self, images, masks=None):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [B, {s}, {s}, 3] for this pipeline, got {images.dtype} "
                             f"{images.shape}")
        if masks is None:
            return images, None
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        if masks.shape != images.shape[:3]:
            raise ValueError(f"mask shape {masks.shape} does not match the images {images.shape[:3]}")
        return images, image_ops.regenerate_mask(masks)

    def _encode(self, images: np.ndarray, stage: str) -> np.ndarray:
        """Images -> `stage`'s tokens: its tokenizer on the images area-downsampled to its size."""
        size = self.base_image_size if stage == "base" else self.image_size
        if images.shape[1] != size:
            images = image_ops.downsample_area(images, images.shape[1] // size)
        return np.asarray(self.tokenizers[stage].encode(images)).reshape(images.shape[0], -1)

    # ----------------------------------------------------------------------------- public API
    def generate_tokens(self, prompts: Sequence[str], *, seed: int = 0, **overrides):
        """Prompts (one per sample) -> (base tokens [B, n], super-res tokens [B, N] or None)."""
        opts = self._options(overrides)
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        start = np.full((len(prompts), self.base.num_tokens), self.base.mask_token_id, np.int32)
        base = self._run_stage(self.base, start, prompts, None, jax.random.fold_in(jax.random.key(seed), 0), opts)
        if self.superres is None:
            return base, None
        return base, self.superres_tokens(base, prompts, seed=seed, **overrides)

    def superres_tokens(self, base_tokens, prompts: Sequence[str], *, seed: int = 0, **overrides) -> np.ndarray:
        """The super-res stage alone: base tokens [B, n] and their prompts -> high-res tokens [B, N]."""
        if self.superres is None:
            raise ValueError("this pipeline has no super-res stage")
        base_tokens = np.asarray(base_tokens)
        if base_tokens.shape != (len(prompts), self.base.num_tokens):
            raise ValueError(f"base tokens must be [{len(prompts)}, {self.base.num_tokens}] for {len(prompts)} "
                             f"prompts, got {base_tokens.shape}")
        start = np.full((len(prompts), self.superres.num_tokens), self.superres.mask_token_id, np.int32)
        return self._run_stage(self.superres, start, list(prompts), base_tokens,
                               jax.random.fold_in(jax.random.key(seed), 1), self._options(overrides))

    def encode_images(self, images, stage: str | None = None) -> np.ndarray:
        """uint8 images [B, S, S, 3] -> tokens [B, n] of `stage` ("base": its tokenizer on the images
        area-downsampled to `base_image_size`; default: the output stage, super-res if present)."""
        images, _ = self._check_images(images)
        stage = stage or ("superres" if self.superres is not None else "base")
        if stage not in ("base", "superres"):
            raise ValueError(f"unknown stage {stage!r}; expected 'base' or 'superres'")
        return self._encode(images, stage)

    def decode_tokens(self, tokens, stage: str | None = None) -> np.ndarray:
        """Tokens [B, g*g] of `stage` -> uint8 images [B, g*f, g*f, 3] (default: the stage whose grid
        is g; both stages' grids being equal, the output stage)."""
        tokens = np.asarray(tokens)
        g = math.isqrt(tokens.shape[-1]) if tokens.ndim == 2 else 0
        if g == 0 or g * g != tokens.shape[1]:
            raise ValueError(f"tokens must be [batch, g*g] (a square grid), got shape {tokens.shape}")
        if stage is None:
            stage = "superres" if self.superres is not None and g == self.superres.grid_size else "base"
        if stage not in ("base", "superres") or (stage == "superres" and self.superres is None):
            raise ValueError(f"no stage {stage!r} in this pipeline")
        want = self.base.grid_size if stage == "base" else self.superres.grid_size
        if g != want:
            raise ValueError(f"{stage} tokens are {want}x{want} per image, got {g}x{g}")
        return self._decode_images(tokens, stage)

    def generate(self, prompts: Sequence[str], *, num_per_prompt: int = 1, seed: int = 0, **overrides) -> np.ndarray:
        """Prompts -> uint8 images [len(prompts) * num_per_prompt, S, S, 3], prompt-major."""
        if num_per_prompt < 1:
            raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
        expanded = [p for p in prompts for _ in range(num_per_prompt)]
        base, sr = self.generate_tokens(expanded, seed=seed, **overrides)
        if sr is None:
            return self._decode_images(base, "base")
        return self._decode_images(sr, "superres")

    def inpaint(self, images, masks, prompts: Sequence[str], *, seed: int = 0, **overrides) -> np.ndarray:
        """Inpainting / outpainting (Muse 3.3): regenerate the masked pixels (`image_ops.regenerate_mask`: True,
        >= 128 in uint8, >= 0.5 in floats) at both scales; uint8 [B, S, S, 3] -> uint8 [B, S, S, 3], pixels
        outside the masks unchanged."""
        opts = self._options(overrides)
        if opts.inpaint_schedule:
            opts = dataclasses.replace(opts, schedule=opts.inpaint_schedule)
        images, masks = self._check_images(images, masks)
        prompts = self._check_prompts(prompts, images.shape[0])
        empty = ~masks.reshape(masks.shape[0], -1).any(axis=1)
        if empty.any():
            warnings.warn(f"{int(empty.sum())} of {len(empty)} masks select no pixel (white = regenerate: True, "
                          f">= 128, or >= 0.5 for floats); those images come back unchanged", UserWarning, stacklevel=2)
        key = jax.random.key(seed)
        low_tokens = self._encode(images, "base")
        low_mask = image_ops.token_mask_from_pixels(masks, self.image_size // self.base.grid_size)
        low_mask = low_mask.reshape(images.shape[0], -1)
        start = np.where(low_mask, self.base.mask_token_id, low_tokens).astype(np.int32)
        base = self._run_stage(self.base, start, prompts, None, jax.random.fold_in(key, 0), opts)
        if self.superres is None:
            out = self._decode_images(base, "base")
        else:
            hi_tokens = self._encode(images, "superres")
            hi_mask = image_ops.token_mask_from_pixels(masks, self.image_size // self.superres.grid_size)
            hi_mask = hi_mask.reshape(images.shape[0], -1)
            start = np.where(hi_mask, self.superres.mask_token_id, hi_tokens).astype(np.int32)
            sr = self._run_stage(self.superres, start, prompts, base, jax.random.fold_in(key, 1), opts)
            out = self._decode_images(sr, "superres")
        return image_ops.composite(images, out, masks)

    def edit(self, images, prompts: Sequence[str], *, seed: int = 0, **overrides) -> np.ndarray:
        """Mask-free editing (Muse 3.3.2) at both scales: uint8 [B, S, S, 3] -> uint8 [B, S, S, 3]."""
        opts = self._options(overrides)
        images, _ = self._check_images(images)
        prompts = self._check_prompts(prompts, images.shape[0])
        key = jax.random.key(seed)
        low_tokens = self._encode(images, "base")
        base = self._run_stage(self.base, low_tokens, prompts, None, jax.random.fold_in(key, 0), opts, edit=True)
        if self.superres is None:
            return self._decode_images(base, "base")
        hi_tokens = self._encode(images, "superres")
        sr = self._run_stage(self.superres, hi_tokens, prompts, base, jax.random.fold_in(key, 1), opts, edit=True)
        return self._decode_images(sr, "superres")

    @staticmethod
    def _check_prompts(prompts, n):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1 and n > 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images")
        return prompts


# --------------------------------------------------------------------------------- files (CLI)
def read_prompts_file(path) -> list[str]:
    """One prompt per non-empty line, in file order."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts file {path}, line {number}: not UTF-8 text ({e.reason} at byte {e.start})") \
                from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def load_image(path, size: int) -> np.ndarray:
    """An RGB image file -> uint8 [size, size, 3].

    A square image of another size is resized (bicubic) with a warning; a non-square one is
    refused (it would be distorted).
    """
    import PIL.Image
    import PIL.ImageOps

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    img = PIL.ImageOps.exif_transpose(_open_image(path)).convert("RGB")  # a phone photo as it is shown
    if img.size != (size, size):
        if img.size[0] != img.size[1]:
            raise ValueError(f"image {path} is {img.size[0]}x{img.size[1]}; this pipeline needs a square image "
                             f"({size}x{size}); crop it first")
        warnings.warn(f"image {path} is {img.size[0]}x{img.size[1]}; resized to {size}x{size}", UserWarning,
                      stacklevel=2)
        img = img.resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(img, np.uint8)


def load_mask(path, image_path, size: int) -> np.ndarray:
    """A mask image of the same size as the image -> bool [size, size]: white (>= 128) = regenerate."""
    import PIL.Image
    import PIL.ImageOps

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path} does not exist")
    mask = PIL.ImageOps.exif_transpose(_open_image(path)).convert("L")
    image_size = PIL.ImageOps.exif_transpose(_open_image(image_path)).size
    if mask.size != image_size:
        raise ValueError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but image {image_path} is "
                         f"{image_size[0]}x{image_size[1]}; they must be the same size")
    if mask.size != (size, size):
        mask = mask.resize((size, size), PIL.Image.NEAREST)
    return image_ops.regenerate_mask(np.asarray(mask))


def _open_image(path):
    import PIL.Image

    try:
        return PIL.Image.open(path)
    except (PIL.UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not an image PIL can read ({type(e).__name__})") from None


def save_png(image: np.ndarray, path) -> pathlib.Path:
    import PIL.Image

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return path


def sample_to_files(pipe: Pipeline, prompts: Sequence[str], *, num: int, seed: int, out: str | None = None,
                    out_dir: str | None = None, **overrides) -> list[pathlib.Path]:
    """Samples `num` images per prompt; writes a grid (`out`, one row per prompt) and/or one PNG
    per prompt and sample (`out_dir/{prompt_index:04d}_{sample:02d}.png`)."""
    if out is None and out_dir is None:
        raise ValueError("give --out (a grid PNG) or --out-dir (one PNG per sample)")
    images = pipe.generate(prompts, num_per_prompt=num, seed=seed, **overrides)
    written = []
    if out is not None:
        written.append(save_png(image_ops.image_grid(images, cols=num), out))
    if out_dir is not None:
        for i in range(len(prompts)):
            for j in range(num):
                written.append(save_png(images[i * num + j], pathlib.Path(out_dir) / f"{i:04d}_{j:02d}.png"))
    return written
