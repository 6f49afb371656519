"""The image tokenizer's quality: PSNR, SSIM, reconstruction FID and codebook usage.

    result = evaluate(W, config, num=500)              # the first `num` test images of W's dataset
    kept = scene_alignment(reconstructions, captions)  # shapes: scenes the detector still reads right
    psnrs = reconstruct_folder(W, "in/", "out/")       # `muse-jax reconstruct`
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from muse_jax import image_ops
from muse_jax import workdir as workdir_lib
from muse_jax.data import shapes, sources
from muse_jax.evaluation import alignment, features, fid, metrics


def scores(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    tokens: np.ndarray,
    codebook_size: int,
    *,
    inception_variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """PSNR and SSIM (means over images), reconstruction FID (reconstructions vs originals,
    shapes features; InceptionV3 too when given) and codebook usage of the tokens."""
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    p = metrics.psnr(originals, reconstructions)
    report: dict[str, Any] = {
        "num_images": int(len(originals)),
        "psnr": float(np.mean(np.minimum(p, 100.0))),  # identical images count as 100 dB
        "ssim": float(np.mean(metrics.ssim(originals, reconstructions))),
        "rfid_shapes": fid.fid_from_features(features.shapes_features(originals),
                                             features.shapes_features(reconstructions)),
        "codebook": metrics.codebook_usage(tokens, codebook_size),
    }
    if inception_variables is not None:
        from muse_jax.evaluation import inception

        fn = inception.make_feature_fn(inception_variables)
        report["rfid_inception"] = fid.fid_from_features(
            inception.inception_features(originals, inception_variables, feature_fn=fn),
            inception.inception_features(reconstructions, inception_variables, feature_fn=fn))
    return report


def scene_alignment(images: np.ndarray, captions) -> dict[str, dict[str, float]]:
    """Of shapes images against their scenes' captions: the share fully right (every stated attribute,
    as the alignment evaluation judges generated images) of one-object and of two-object scenes.
    Images smaller than the scenes' 64 px are judged pixel-repeated to it."""
    images = np.asarray(images)
    if images.shape[1] != shapes.IMAGE_SIZE:
        images = image_ops.upsample_nearest(images, shapes.IMAGE_SIZE // images.shape[1])
    rows = alignment.alignment_report(images, captions, return_details=True)["details"]
    out = {}
    for name, one in (("one object", True), ("two objects", False)):
        right = [r["all"] for r in rows if r["group"].startswith("one") == one]
        if right:
            out[name] = {"num": len(right), "all": float(np.mean(right))}
    return out


def _reconstruct(tok, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    tokens = [np.asarray(tok.encode(images[s:s + batch])) for s in range(0, len(images), batch)]
    return np.concatenate(tokens), np.concatenate([np.asarray(tok.decode(t)) for t in tokens])


def evaluate(workdir, config, num: int, inception_variables=None) -> dict[str, Any]:
    """`scores` of the super-res stage's tokenizer (the output images') on the first `num` test images,
    plus `psnr_lowres`: the base stage's tokenizer at its input size (`base_image_size`, the images
    area-downsampled as its token cache makes them). One shared tokenizer serves both when the
    stages name none. On shapes also `alignment`: `scene_alignment` of the reconstructions at full
    and at base size, what each stage's tokens keep of the captions."""
    toks = {s: workdir_lib.load_image_tokenizer(workdir, name=workdir_lib.stage_tokenizer(config, s))
            for s in ("base", "superres")}
    source = sources.make_source(config.data, "test", workdir_lib.data_dir(workdir))
    examples = [source[i] for i in range(min(num, len(source)))]
    images = np.stack([ex["image"] for ex in examples])
    tokens, recons = _reconstruct(toks["superres"], images)
    result = scores(images, recons, tokens, toks["superres"].codebook_size, inception_variables=inception_variables)
    base_px = workdir_lib.check_stage_tokenizer(config, "base", toks["base"])
    low = image_ops.downsample_area(images, images.shape[1] // base_px) if base_px != images.shape[1] else images
    low_recons = _reconstruct(toks["base"], low)[1]
    result["psnr_lowres"] = float(np.mean(np.minimum(metrics.psnr(low, low_recons), 100.0)))
    result["base_image_size"] = base_px
    if sources.is_shapes(config.data):
        captions = [ex["caption"] for ex in examples]
        result["alignment"] = {"full size": scene_alignment(recons, captions),
                               "base size": scene_alignment(low_recons, captions)}
    return result


def reconstruct_folder(workdir, in_dir, out_dir) -> dict[str, float]:
    """Encodes and decodes every PNG in `in_dir` with W's tokenizer; writes same-named PNGs."""
    import PIL.Image

    in_dir, out_dir = pathlib.Path(in_dir), pathlib.Path(out_dir)
    files = sorted(in_dir.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no .png files in {in_dir}")
    tok = workdir_lib.load_image_tokenizer(workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    psnrs = {}
    for f in files:
        img = np.asarray(PIL.Image.open(f).convert("RGB"))
        rec = np.asarray(tok.reconstruct(img[None]))[0]
        PIL.Image.fromarray(rec).save(out_dir / f.name)
        mse = ((rec.astype(np.float64) - img) ** 2).mean()
        psnrs[f.name] = float(10 * np.log10(255.0**2 / max(mse, 1e-10)))
    return psnrs
