"""Loading diffusers `VQModel` weights (the aMUSEd / open-muse VQGAN layout) into `vqgan.VQGAN`.

    config, params = load_diffusers_dir("amused/vqvae")       # a saved VQModel folder, nothing downloaded
    tokenizer = vqgan.ImageTokenizer(config, params)
"""
from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.models.vqgan import VQGANConfig, init_params


def config_from_diffusers(dcfg: Mapping[str, Any], **overrides) -> VQGANConfig:
    """The VQGANConfig that reproduces a diffusers `VQModel` config (its `.config` dict)."""
    dcfg = dict(dcfg)
    if dcfg.get("norm_type", "group") != "group":
        raise ValueError(f"diffusers norm_type={dcfg['norm_type']!r} is not supported (only 'group')")
    if dcfg.get("act_fn", "silu") != "silu":
        raise ValueError(f"diffusers act_fn={dcfg['act_fn']!r} is not supported (only 'silu')")
    for key in ("down_block_types", "up_block_types"):
        bad = {t for t in dcfg.get(key, ()) if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")}
        if bad:
            raise ValueError(f"diffusers {key} {sorted(bad)} are not supported")
    latent = int(dcfg.get("latent_channels", 3))
    code_dim = dcfg.get("vq_embed_dim") or latent
    kw = dict(
        channels=tuple(dcfg["block_out_channels"]),
        num_res_blocks=int(dcfg.get("layers_per_block", 1)),
        latent_channels=latent,
        codebook_size=int(dcfg.get("num_vq_embeddings", 256)),
        code_dim=int(code_dim),
        norm_groups=int(dcfg.get("norm_num_groups", 32)),
        in_channels=int(dcfg.get("in_channels", 3)),
        out_channels=int(dcfg.get("out_channels", 3)),
        downsample="conv",
        mid_attention=bool(dcfg.get("mid_block_add_attention", True)),
        quant_conv=True,
        l2_normalize=False,
        pixel_range="0,1",  # aMUSEd's pipelines feed the VQModel un-normalised [0, 1] images and clip its output there
    )
    kw.update(overrides)
    return VQGANConfig(**kw)


_DIFFUSERS_RENAMES = (
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down_\1_res_\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down_\1_downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up_\1_res_\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.up_\1_upsample."),
    (r"\.mid_block\.resnets\.(\d+)\.", r".mid.res_\1."),
    (r"\.mid_block\.attentions\.0\.", r".mid.attn."),
    (r"\.to_out\.0\.", r".to_out."),
    (r"\.conv_norm_out\.", r".norm_out."),
    (r"^quantize\.embedding\.weight$", r"quantizer.codebook"),
)


def load_diffusers(state_dict: Mapping[str, Any], config: VQGANConfig, image_size: int = 64):
    """Converts a diffusers `VQModel` state dict (torch tensors or numpy) into VQGAN params.

    Conv weights OIHW -> HWIO, linear weights transposed, norm weight -> scale.
    Every expected parameter must be present with the right shape and nothing may be left
    over; otherwise a ValueError lists the differences.
    """
    expected = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0), image_size)))
    expected_flat = {"/".join(k): v for k, v in flax_flatten(expected).items()}
    out, unexpected = {}, []
    for key, value in state_dict.items():
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        name = key
        for pattern, repl in _DIFFUSERS_RENAMES:
            name = re.sub(pattern, repl, name)
        parts = name.split(".")
        if parts[-1] == "codebook":
            leaf = "codebook"
        elif parts[-1] == "bias":
            leaf = "bias"
        elif parts[-1] == "weight":
            if arr.ndim == 4:
                arr, leaf = arr.transpose(2, 3, 1, 0), "kernel"
            elif arr.ndim == 2:
                arr, leaf = arr.T, "kernel"
            elif arr.ndim == 1:
                leaf = "scale"
            else:
                unexpected.append(key)
                continue
        else:
            unexpected.append(key)
            continue
        path = "/".join([*parts[:-1], leaf])
        if path not in expected_flat:
            unexpected.append(key)
            continue
        if arr.shape != expected_flat[path].shape:
            raise ValueError(f"{key}: shape {arr.shape} does not match {path} {expected_flat[path].shape}")
        out[path] = jnp.asarray(arr, jnp.float32)
    missing = sorted(set(expected_flat) - set(out))
    if missing or unexpected:
        raise ValueError(f"diffusers weights do not fit: missing {missing}, unexpected {sorted(unexpected)}")
    return flax_unflatten({tuple(k.split("/")): v for k, v in out.items()})


def flax_flatten(tree) -> dict[tuple[str, ...], Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def flax_unflatten(flat):
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)




def load_diffusers_dir(path, image_size: int = 256, **overrides):
    """(VQGANConfig, params) from a saved diffusers VQModel folder (config.json + safetensors/bin).

    E.g. the `vqvae` folder of aMUSEd (f16, 8192 codes). Nothing is downloaded.
    """
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: expected a diffusers VQModel folder")
    config = config_from_diffusers(json.loads(cfg_file.read_text()), **overrides)
    st = sorted(path.glob("*.safetensors"))
    if st:
        from safetensors.numpy import load_file

        state_dict = {}
        for f in st:
            state_dict.update(load_file(str(f)))
    else:
        bins = sorted(path.glob("*.bin"))
        if not bins:
            raise FileNotFoundError(f"no .safetensors or .bin weights in {path}")
        import torch

        state_dict = torch.load(bins[0], map_location="cpu", weights_only=True)
    return config, load_diffusers(state_dict, config, image_size)
