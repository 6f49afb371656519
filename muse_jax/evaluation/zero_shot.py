"""Zero-shot evaluation on a caption set, as the paper reports it: FID (InceptionV3 pool3) and
CLIP score of images generated from captions (Muse: FID-30K and CLIP score on COCO-2014 val
captions), and the FID-vs-CLIP front over guidance (Figure 8). `muse-jax eval --prompts`.

Writes into OUT:
  zero_shot.json                           the evaluation at the given sampling settings
  sweep_{guidance,temperature}.{json,png}  one evaluation per value, and FID against CLIP score
  chunks/<settings>/chunk_{k:05d}.npz      features of chunk k of the prompts (settings.json beside)
  images/<settings>/{index:06d}.png        the generated images (save_images)
  reference/fid_stats--*.npz               reference statistics (pytorch-fid's mu / sigma file)

The prompts are cut into chunks of the pipeline's batch size B: chunk k holds prompts
[kB, (k+1)B) and is generated with a seed drawn from (seed, k), so its images depend neither on
how many processes share the work nor on interruptions. Process p of P generates chunks p, p+P,
...; each chunk's features are written atomically (temporary file, then rename) with a stamp
(workdir checkpoints, sampling settings, prompts, seed, feature extractors). A rerun skips the
chunks already written, so a killed evaluation continues where it stopped and gives the same
numbers; a chunk with another stamp is an error. After a barrier, process 0 reads every chunk
and scores. OUT must be one folder that every process sees (a shared filesystem).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from muse_jax import distributed
from muse_jax import workdir as workdir_lib
from muse_jax.evaluation import caption_sets, fid, scores, sweep


def _digest(value: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Rows repeated from the last so that x has `size` rows (one compiled shape per batch size)."""
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


# ----------------------------------------------------------------------------------------------
# What is computed from each chunk of images.

@dataclasses.dataclass(eq=False)
class Scorer:
    """The feature extractors applied to generated images; a missing one is not computed.

    inception: Flax variables of the FID InceptionV3, with the `resize` protocol ("clean" or
    "legacy", `inception.RESIZE_PROTOCOLS`). clip: CLIP params with their config, tokenizer
    (texts -> ids, mask) and the model's name as reported.
    """

    inception: Any = None
    resize: str = "clean"
    clip: Any = None
    clip_config: Any = None
    clip_tokenize: Callable | None = None
    clip_name: str | None = None

    def __post_init__(self):
        from muse_jax.evaluation import inception

        if self.resize not in inception.RESIZE_PROTOCOLS:
            raise ValueError(f"unknown resize protocol {self.resize!r}; expected one of {inception.RESIZE_PROTOCOLS}")
        self._inception_fn = None
        self._identity = None

    def identity(self) -> dict[str, Any]:
        """What identifies the features (part of every chunk's stamp): weight hashes, resize, names."""
        if self._identity is None:
            from muse_jax.evaluation import inception

            self._identity = {
                "inception": None if self.inception is None else inception.fingerprint(self.inception),
                "resize": inception.PROTOCOL_IDS[self.resize],
                "clip": None if self.clip is None else f"{self.clip_name}:{inception.fingerprint(self.clip)}",
            }
        return self._identity

    def inception_features(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """[N, 2048] pool3 features of uint8 images, in padded batches of `batch_size`."""
        from muse_jax.evaluation import inception

        if self._inception_fn is None:
            self._inception_fn = inception.make_feature_fn(self.inception, self.resize)
        n = len(images)
        padded = _pad(images, -(-n // batch_size) * batch_size)
        return inception.inception_features(padded, self.inception, batch_size, self._inception_fn)[:n]

    def __call__(self, images: np.ndarray, prompts: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
        """The features of one chunk: inception [n, 2048]; clip_image, clip_text [n, D] (CLIP's
        projected embeddings, which `clip_score` scores)."""
        out = {}
        if self.inception is not None:
            out["inception"] = self.inception_features(images, batch_size)
        if self.clip is not None:
            from muse_jax.models import clip

            n = len(images)
            ids, mask = self.clip_tokenize(list(prompts) + [prompts[-1]] * (batch_size - n))
            image_emb = np.asarray(clip.embed_images(self.clip, _pad(images, batch_size), config=self.clip_config))[:n]
            text_emb = np.asarray(clip.embed_texts(self.clip, ids, mask, config=self.clip_config))[:n]
            out["clip_image"], out["clip_text"] = image_emb, text_emb
        return out


def load_scorer(inception_path: str | None = None, resize: str = "clean", clip_path: str | None = None,
                clip_model: str | None = None) -> Scorer:
    """A Scorer from weight files: InceptionV3 (pytorch-fid .pth or .npz) and a Hugging Face CLIP
    checkpoint directory (config.json, *.safetensors, vocab.json, merges.txt); `clip_model` (a
    preset, "vit-b-32" or "vit-l-14") gives the config and the reported name instead of config.json."""
    from muse_jax.data import clip_bpe
    from muse_jax.evaluation import inception
    from muse_jax.models import clip

    variables = inception.load_inception(inception_path) if inception_path else None
    if not clip_path:
        if clip_model:
            raise ValueError("--clip-model names the CLIP checkpoint given with --clip; --clip is missing")
        return Scorer(variables, resize)
    params = clip.load_hf(clip_path, clip_model)
    if clip_model:
        config = clip.CLIPConfig.preset(clip_model)
    else:
        config = clip.CLIPConfig.from_hf(json.loads((pathlib.Path(clip_path) / "config.json").read_text()))
    name = clip_model or pathlib.Path(clip_path).resolve().name
    tokenize = clip_bpe.CLIPTokenizer.from_dir(clip_path, config.text.max_position_embeddings)
    return Scorer(variables, resize, params, config, tokenize, name)


# ----------------------------------------------------------------------------------------------
# Chunks: generated and featurised by each process, read back by process 0.

def sampling_settings(pipe, overrides: dict) -> dict[str, Any]:
    """The pipeline's sampling options with `overrides` applied, as a JSON-able dict."""
    opts = dataclasses.replace(pipe.options, **{k: v for k, v in overrides.items() if v is not None})
    return dataclasses.asdict(opts)


def chunk_folder(out_dir, settings: dict) -> pathlib.Path:
    """OUT/chunks/<hash of the sampling settings>: one folder per evaluation point."""
    return pathlib.Path(out_dir) / "chunks" / _digest(settings)


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk `chunk` (a function of the run's seed and the chunk index only)."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0] & 0x7FFFFFFF)


def _chunk_path(folder: pathlib.Path, k: int) -> pathlib.Path:
    return folder / f"chunk_{k:05d}.npz"


def _read_chunk(path: pathlib.Path, stamp: dict) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        found = json.loads(str(f["stamp"]))
        expected = json.loads(json.dumps(stamp))
        if found != expected:
            differ = sorted(k for k in expected.keys() | found.keys() if found.get(k) != expected.get(k))
            raise ValueError(f"{path} was written by another evaluation (it differs in: {', '.join(differ)}); "
                             f"use a fresh --out (or delete {path.parent})")
        return {k: f[k] for k in f.files if k != "stamp"}


def _write_chunk(path: pathlib.Path, stamp: dict, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, stamp=np.asarray(json.dumps(stamp, sort_keys=True)), **arrays)
    os.replace(tmp, path)


def _chunk_prompts_digest(prompts: Sequence[str]) -> str:
    return _digest(list(prompts), 16)


def generate_chunks(pipe, prompts: Sequence[str], folder, stamp: dict, scorer: Scorer, *, seed: int,
                    overrides: dict, process_index: int = 0, process_count: int = 1, images_dir=None,
                    on_chunk: Callable[[int], None] | None = None, say=print) -> int:
    """This process's share of the chunks (k = process_index, process_index + process_count, ...):
    generates each one not yet in `folder`, computes its features and writes it; returns how many
    were generated. `on_chunk(k)` is called after chunk k is written."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images_dir is not None:
        pathlib.Path(images_dir).mkdir(parents=True, exist_ok=True)
    b = stamp["chunk_size"]
    num_chunks = -(-len(prompts) // b)
    made = 0
    for k in range(process_index, num_chunks, process_count):
        indices = np.arange(k * b, min((k + 1) * b, len(prompts)))
        chunk_prompts = [prompts[i] for i in indices]
        digest = _chunk_prompts_digest(chunk_prompts)
        path = _chunk_path(folder, k)
        if path.exists():
            old = _read_chunk(path, stamp)
            if np.array_equal(old["indices"], indices):
                if str(old["prompts"]) != digest:
                    raise ValueError(f"{path} holds other prompts than {stamp['prompts_source']} gives now; "
                                     "use a fresh --out")
                continue
            # else: the last chunk of a shorter evaluation, made again in full
        t0 = time.perf_counter()
        images = scores.generate_batch(pipe, chunk_prompts, seed=chunk_seed(seed, k), overrides=overrides)
        t1 = time.perf_counter()
        features = scorer(images, chunk_prompts, b)
        t2 = time.perf_counter()
        if images_dir is not None:
            import PIL.Image

            for i, image in zip(indices, images):
                PIL.Image.fromarray(image).save(pathlib.Path(images_dir) / f"{i:06d}.png")
        _write_chunk(path, stamp, dict(features, indices=indices, prompts=np.asarray(digest),
                                       seconds=np.float64(t1 - t0), feature_seconds=np.float64(t2 - t1),
                                       first=np.bool_(made == 0)))
        made += 1
        say(f"  chunk {k + 1}/{num_chunks}: {len(indices)} images in {t1 - t0:.2f}s (+{t2 - t1:.2f}s features)")
        if on_chunk is not None:
            on_chunk(k)
    return made


def read_chunks(folder, num_prompts: int, stamp: dict) -> dict[str, np.ndarray]:
    """Every chunk of an evaluation of `num_prompts` prompts, concatenated in prompt order, plus
    `sec_per_image` and `feature_sec_per_image` (over chunks generated after a process's first,
    which includes compilation; over all chunks when there are no others)."""
    folder = pathlib.Path(folder)
    b = stamp["chunk_size"]
    num_chunks = -(-num_prompts // b)
    missing = [k for k in range(num_chunks) if not _chunk_path(folder, k).exists()]
    if missing:
        raise ValueError(f"{len(missing)} of {num_chunks} chunks are missing in {folder} (e.g. chunk {missing[0]}): "
                         "has every process finished? Rerun the evaluation to complete them")
    chunks = [_read_chunk(_chunk_path(folder, k), stamp) for k in range(num_chunks)]
    out = {key: np.concatenate([c[key] for c in chunks])
           for key in chunks[0] if key not in ("prompts", "seconds", "feature_seconds", "first")}
    if not np.array_equal(out["indices"], np.arange(num_prompts)):
        raise ValueError(f"the chunks in {folder} do not cover prompts 0..{num_prompts - 1}; use a fresh --out")
    timed = [c for c in chunks if not c["first"]] or chunks
    count = sum(len(c["indices"]) for c in timed)
    out["sec_per_image"] = sum(float(c["seconds"]) for c in timed) / count
    out["feature_sec_per_image"] = sum(float(c["feature_seconds"]) for c in timed) / count
    return out


# ----------------------------------------------------------------------------------------------
# Reference statistics and scores.

def reference_statistics(reference: str | None, scorer: Scorer, image_size: int, cache_dir, *,
                         batch_size: int = 16, data_dir: str | None = None):
    """((mu, sigma), path of their .npz) of the reference: read from a pytorch-fid .npz, or
    computed once from a folder or tfds source (images centre-cropped and resized to
    `image_size`) and cached in `cache_dir` as such a file. (None, None) without a reference or
    without InceptionV3 weights."""
    if reference is None or scorer.inception is None:
        return None, None
    if reference.endswith(".npz"):
        return fid.load_statistics(reference), os.path.abspath(reference)
    count, batches = caption_sets.reference_images(reference, image_size, batch_size, data_dir)
    identity = scorer.identity()
    extractor_id = f"inception-v3-fid-pool3-{identity['inception']}-{identity['resize']}"
    dataset_id = f"{caption_sets.describe(reference)}|{count} images|{image_size}px"
    compute = lambda: np.concatenate([scorer.inception_features(x, batch_size) for x in batches])  # noqa: E731
    stats = fid.cached_statistics(str(cache_dir), extractor_id, dataset_id, compute)
    return stats, fid.statistics_path(str(cache_dir), extractor_id, dataset_id)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """torchmetrics' CLIPScore of the pairs (image_emb[i], text_emb[i]): max(100 * mean(cos), 0),
    the cosine of each pair's embeddings averaged over the pairs, and the mean clamped at 0 (not
    each pair: a negative cosine lowers the score)."""
    a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(max(100.0 * cos.mean(), 0.0))


def score(chunks: dict[str, np.ndarray], reference, scorer: Scorer) -> dict[str, Any]:
    """FID against the reference statistics and the CLIP score (`clip_score`); None, with a note
    saying why, where not computed."""
    out: dict[str, Any] = {"num": int(len(chunks["indices"])), "fid": None, "fid_resize": scorer.resize,
                           "clip_score": None, "clip_model": scorer.clip_name}
    if scorer.inception is None:
        out["fid_note"] = "no InceptionV3 weights (--inception): FID not computed"
    elif reference is None:
        out["fid_note"] = "no reference (--reference): FID not computed"
    elif out["num"] < 2:
        out["fid_note"] = "FID needs at least 2 images"
    else:
        out["fid"] = fid.fid_from_statistics(chunks["inception"], reference)
    if scorer.clip is None:
        out["clip_note"] = "no CLIP checkpoint (--clip): CLIP score not computed"
    else:
        out["clip_score"] = clip_score(chunks["clip_image"], chunks["clip_text"])
    out["sec_per_image"] = float(chunks["sec_per_image"])
    out["feature_sec_per_image"] = float(chunks["feature_sec_per_image"])
    return out


# ----------------------------------------------------------------------------------------------
# The evaluation.

def trained_checkpoints(workdir) -> dict:
    """Every checkpoints/ folder of W up to two levels down (the tokenizers, the stages) and the
    steps saved in it, and each stage's offline EMA (`muse-jax ema`, which sampling prefers): what
    identifies the trained pipeline in the stamps."""
    root = pathlib.Path(workdir)
    found = {}
    for pattern in ("checkpoints", "*/checkpoints", "*/*/checkpoints"):
        for folder in sorted(root.glob(pattern)):
            steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
            found[str(folder.parent.relative_to(root))] = steps
    for stage in ("base", "superres"):
        if (root / stage).is_dir() and (ema := workdir_lib.ema_meta(root, stage)) is not None:
            found[f"{stage}/ema"] = ema
    return found


def _local_mesh():
    """A data-parallel mesh over this process's devices: each process samples its own prompts."""
    import jax

    from muse_jax import partitioning

    return partitioning.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())


def evaluate(pipe, prompts: Sequence[str], out_dir, *, base_stamp: dict, scorer: Scorer, reference, seed: int,
             overrides: dict, process_index: int, process_count: int, save_images: bool = False,
             on_chunk=None, say=print) -> dict[str, Any] | None:
    """One evaluation point: this process's chunks, a barrier, then (process 0) the scores."""
    settings = sampling_settings(pipe, overrides)
    folder = chunk_folder(out_dir, settings)
    stamp = dict(base_stamp, settings=settings, chunk_size=int(pipe.options.batch_size))
    if process_index == 0:  # for people reading OUT/chunks; the stamps are what is checked
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    images_dir = pathlib.Path(out_dir) / "images" / folder.name if save_images else None
    generate_chunks(pipe, prompts, folder, stamp, scorer, seed=seed, overrides=overrides,
                    process_index=process_index, process_count=process_count, images_dir=images_dir,
                    on_chunk=on_chunk, say=say)
    distributed.sync(f"zero_shot_{folder.name}")
    if process_index != 0:
        return None
    result = score(read_chunks(folder, len(prompts), stamp), reference, scorer)
    result.update(settings=settings, chunks=str(folder))
    if images_dir is not None:
        result["images"] = str(images_dir)
    return result


def run(workdir, prompts_source: str, out_dir, *, num: int, reference: str | None = None,
        tfds_data_dir: str | None = None, inception_path: str | None = None, resize: str = "clean",
        clip_path: str | None = None, clip_model: str | None = None, seed: int = 0, steps: int | None = None,
        sr_steps: int | None = None, guidance: float | None = None, sweep_guidance: Sequence[float] = (),
        sweep_temperature: Sequence[float] = (), save_images: bool = False, scorer: Scorer | None = None,
        process_index: int | None = None, process_count: int | None = None, on_chunk=None,
        quiet: bool = False) -> dict[str, Any] | None:
    """Zero-shot FID and CLIP score of workdir W on the first `num` captions of `prompts_source`
    (`caption_sets`); see the module doc. Every process runs it (process index and count default
    to JAX's); process 0 writes OUT/zero_shot.json (and the sweeps) and returns the report, the
    others return None. `scorer` (already loaded) replaces the weight files and `resize`."""
    import jax

    from muse_jax.cascade import Pipeline

    if process_index is None:
        distributed.initialize(workdir_lib.load_run_config(workdir))
        process_index, process_count = jax.process_index(), jax.process_count()
    process_count = process_count or 1
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is not in [0, {process_count})")
    say = print if (process_index == 0 and not quiet) else (lambda *a: None)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    prompts = caption_sets.read_prompts(prompts_source, num, seed, tfds_data_dir)
    scorer = scorer or load_scorer(inception_path, resize, clip_path, clip_model)
    mesh = _local_mesh() if jax.process_count() > 1 else None
    pipe = Pipeline.from_workdir(workdir, mesh=mesh)
    base_stamp = {
        "workdir": os.path.abspath(str(workdir)),
        "checkpoints": trained_checkpoints(workdir),
        "prompts_source": caption_sets.describe(prompts_source), "seed": int(seed),
        "features": scorer.identity(),
    }
    reference_stats = stats_path = None
    if process_index == 0:
        say(f"reference statistics from {reference} ..." if reference and scorer.inception is not None else
            "no FID: " + ("no --inception weights" if scorer.inception is None else "no --reference"))
        reference_stats, stats_path = reference_statistics(
            reference, scorer, pipe.image_size, out_dir / "reference", batch_size=pipe.options.batch_size,
            data_dir=tfds_data_dir)
    common = dict(base_stamp=base_stamp, scorer=scorer, reference=reference_stats, seed=seed,
                  process_index=process_index, process_count=process_count, say=say)
    overrides = {"steps": steps, "sr_steps": sr_steps, "guidance": guidance}

    say(f"generating {len(prompts)} images from {prompts_source} (process {process_index} of {process_count}) ...")
    result = evaluate(pipe, prompts, out_dir, overrides=overrides, save_images=save_images, on_chunk=on_chunk,
                      **common)
    sweeps = {}
    for name, values in (("guidance", sweep_guidance), ("temperature", sweep_temperature)):
        if not values:
            continue
        rows = []
        for v in values:
            say(f"sweep {name}={v:g}: generating {len(prompts)} images ...")
            r = evaluate(pipe, prompts, out_dir, overrides=dict(overrides, **{name: float(v)}), **common)
            if r is not None:
                rows.append({"guidance": r["settings"]["guidance"], "temperature": r["settings"]["temperature"],
                             **{k: r[k] for k in ("fid", "clip_score", "sec_per_image", "feature_sec_per_image")}})
        if rows:
            paths = sweep.write_front(rows, str(out_dir), f"sweep_{name}", name, clip_model=scorer.clip_name)
            sweeps[name] = {"results": rows, "json": paths[0], "png": paths[1]}
    if result is None:
        return None
    result.update(prompts_source=caption_sets.describe(prompts_source), seed=int(seed), reference=reference,
                  reference_statistics=stats_path, workdir=base_stamp["workdir"],
                  checkpoints=base_stamp["checkpoints"], sweeps=sweeps)
    scores.write_json(result, str(out_dir / "zero_shot.json"))
    fid_text = "n/a" if result["fid"] is None else f"{result['fid']:.3f}"
    clip_text = "n/a" if result["clip_score"] is None else f"{result['clip_score']:.3f} ({result['clip_model']})"
    say(f"FID {fid_text} ({scorer.resize} resize), CLIP score {clip_text}, {result['sec_per_image'] * 1000:.1f} ms/image "
        f"-> {out_dir / 'zero_shot.json'}")
    return result
