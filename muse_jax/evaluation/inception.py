"""InceptionV3 as used for FID (Szegedy et al. 2016; the TF 2015-12-05 graph of Heusel et al.
2017), in Flax linen, matching the network of the `pytorch-fid` package so that its weights
file converts 1:1 (`load_torch_state_dict`), and returning the 2048-d pool3 features.

The FID network differs from the classification InceptionV3 in its pooling branches: the
average pools of the A, C and first E blocks exclude the zero padding from the average, and
the last E block max-pools. Input: images in [0, 1], resized bilinearly to 299x299 (no
antialiasing, half-pixel centres: PyTorch's `interpolate(..., align_corners=False)`), then
scaled to [-1, 1]. Weights are never downloaded: the user supplies a file.

Two resize protocols bring images to 299x299 (`RESIZE_PROTOCOLS`):
  "legacy"  pytorch-fid's: the float tensor in [0, 1] resized bilinearly inside the network, as
            above (clean-fid calls it "legacy_pytorch"); what this module did from the start.
  "clean"   clean-fid's (Parmar et al. 2022): each channel of the uint8 image as a float32 PIL
            image, PIL's bicubic filter (antialiased when shrinking), clipped to [0, 255], not
            quantised (`clean_resize`); then scaled as clean-fid's InceptionV3 wrapper does,
            (x - 128) / 128 rather than 2 x / 255 - 1 (`clean_input`), into the same network
            without its own resize and scaling. Its FIDs compare with clean-fid's "clean" ones.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 2048
INPUT_SIZE = 299


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, inference statistics) -> ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), _pair(self.strides), padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3x3 stride-1 average pool, zero padding excluded from the average (TF semantics)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/c/d (35x35): 1x1, 5x5, double 3x3 and pool branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..e (17x17): factorised 7x7 branches."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c (8x8): expanded 1x3 / 3x1 branches; `pool` is "avg" (7b) or "max" (7c)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def bilinear_matrix(in_size: int, out_size: int, dtype=np.float32) -> np.ndarray:
    """[out, in] bilinear interpolation weights, half-pixel centres, no antialiasing
    (PyTorch's `interpolate(mode="bilinear", align_corners=False)` along one axis, with its
    index arithmetic done in `dtype` as PyTorch does for inputs of that dtype)."""
    f32 = np.dtype(dtype).type
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0.astype(f32)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), (f32(1.0) - frac).astype(np.float64))
    np.add.at(m, (np.arange(out_size), i1), frac.astype(np.float64))
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes [N, H, W, C] to [N, size[0], size[1], C] as `bilinear_matrix` describes."""
    wy = jnp.asarray(bilinear_matrix(x.shape[1], size[0], x.dtype), x.dtype)
    wx = jnp.asarray(bilinear_matrix(x.shape[2], size[1], x.dtype), x.dtype)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", wy, x, precision=hp)
    return jnp.einsum("pw,nowc->nopc", wx, x, precision=hp)


class InceptionV3(nn.Module):
    """The FID InceptionV3: [N, H, W, 3] images in [0, 1] -> [N, 2048] pool3 features
    (computed in the input's float dtype: float32, or float64 under `jax.enable_x64`)."""

    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected [N, H, W, 3] images, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))  # pool3


# pytorch_fid.inception.InceptionV3 keeps the layers in `blocks.<i>.<j>`; the weights file it
# downloads (and torchvision's Inception3) names them directly. Both are accepted.
_BLOCK_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{j}": n for j, n in enumerate(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                                                  "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")  # the classifier heads: not part of the features


@functools.cache
def _variable_shapes() -> dict[str, Any]:
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    return jax.tree_util.tree_map(lambda s: s.shape, shapes)


def load_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Flax variables {"params", "batch_stats"} from a pytorch-fid (or FID Inception3) state dict.

    Accepts tensors or arrays; checks that every variable is filled with the right shape.
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith(_IGNORED_PREFIXES):
            continue
        for prefix, name in _BLOCK_NAMES.items():
            if key.startswith(prefix + "."):
                key = name + key[len(prefix):]
                break
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        *path, layer, leaf = key.split(".")
        if layer == "conv" and leaf == "weight":
            tree, leaf_name, array = params, "kernel", array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif layer == "bn" and leaf in ("weight", "bias"):
            tree, leaf_name = params, {"weight": "scale", "bias": "bias"}[leaf]
        elif layer == "bn" and leaf in ("running_mean", "running_var"):
            tree, leaf_name = stats, {"running_mean": "mean", "running_var": "var"}[leaf]
        else:
            raise ValueError(f"unexpected entry {key!r} in the InceptionV3 state dict")
        node = tree
        for part in path + [layer]:
            node = node.setdefault(part, {})
        node[leaf_name] = array
    variables = {"params": params, "batch_stats": stats}
    expected = _variable_shapes()
    got = jax.tree_util.tree_map(lambda a: a.shape, variables)
    if got != expected:
        flat_e = dict(jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0])
        flat_g = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0])
        missing = sorted(jax.tree_util.keystr(k) for k in flat_e.keys() - flat_g.keys())
        extra = sorted(jax.tree_util.keystr(k) for k in flat_g.keys() - flat_e.keys())
        wrong = sorted(jax.tree_util.keystr(k) for k in flat_e.keys() & flat_g.keys() if flat_e[k] != flat_g[k])
        raise ValueError(f"state dict does not fit InceptionV3: missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"wrong shape {wrong[:5]}")
    return jax.tree_util.tree_map(jnp.asarray, variables)


def load_inception(path: str) -> dict[str, Any]:
    """Flax variables from a user-supplied file: a PyTorch state dict (.pth/.pt, e.g. pytorch-fid's
    pt_inception-2015-12-05-*.pth; needs torch) or an .npz written by `save_npz`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"InceptionV3 weights not found at {path!r} (they are never downloaded; "
                                "supply pytorch-fid's pt_inception-2015-12-05 .pth or a converted .npz)")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return load_torch_state_dict(dict(f))
    import torch  # only for reading PyTorch files

    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    return load_torch_state_dict(state_dict)


def save_npz(state_dict: Mapping[str, Any], path: str) -> None:
    """Writes a PyTorch InceptionV3 state dict as a torch-free .npz (same keys)."""
    arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()
              if not k.endswith("num_batches_tracked")}
    np.savez(path, **arrays)


RESIZE_PROTOCOLS = ("clean", "legacy")
# How each protocol's features are named in stamps and cached statistics ("clean-fid": clean-fid's
# resize and scaling; features named "clean" were scaled 2 x / 255 - 1 and are not reused).
PROTOCOL_IDS = {"clean": "clean-fid", "legacy": "legacy"}


def clean_resize(images: np.ndarray, size: int | None = None) -> np.ndarray:
    """clean-fid's resize: uint8 [N, H, W, 3] -> float32 [N, size, size, 3] in [0, 255] (default 299),
    each channel resized as a float32 PIL image with the bicubic filter, clipped, not quantised."""
    from PIL import Image

    size = size or INPUT_SIZE
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(np.asarray(images)):
        for c in range(3):
            channel = Image.fromarray(image[..., c].astype(np.float32))  # mode "F"
            out[i, ..., c] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return np.clip(out, 0.0, 255.0)


def clean_input(images: np.ndarray) -> np.ndarray:
    """What the "clean" protocol feeds the network: `clean_resize`, then clean-fid's scaling
    (x - 128) / 128 -> float32 [N, 299, 299, 3] in [-1, 0.9921875]."""
    return (clean_resize(images) - np.float32(128.0)) / np.float32(128.0)


@functools.partial(jax.jit, static_argnames="resize")
def _pool3(variables, images, resize: str = "legacy"):
    """[N, 2048] pool3 features; the weights are an argument, so one compiled program serves every
    set of weights. "legacy": [N, H, W, 3] images in [0, 255] (uint8 or float), scaled to [0, 1]
    and resized and normalised by the network; "clean": `clean_input`'s array, as it is."""
    if resize == "clean":
        return InceptionV3(resize_input=False, normalize_input=False).apply(variables, images)
    return InceptionV3().apply(variables, images.astype(jnp.float32) / 255.0)


def make_feature_fn(variables: Mapping[str, Any], resize: str = "legacy"):
    """A function: [N, H, W, 3] uint8 images -> [N, 2048] float32 pool3 features, with the
    `resize` protocol ("legacy": on the device; "clean": `clean_input` on the host first)."""
    if resize == "legacy":
        return lambda images: _pool3(variables, images)
    if resize == "clean":
        return lambda images: _pool3(variables, clean_input(np.asarray(images)), resize="clean")
    raise ValueError(f"unknown resize protocol {resize!r}; expected one of {RESIZE_PROTOCOLS}")


def inception_features(images: np.ndarray, variables: Mapping[str, Any], batch_size: int = 50,
                       feature_fn=None, resize: str = "legacy") -> np.ndarray:
    """[N, 2048] pool3 features of [N, H, W, 3] uint8 images, computed in batches (`feature_fn`
    if given, else `make_feature_fn(variables, resize)`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected [N, H, W, 3] uint8 images, got {images.shape} {images.dtype}")
    fn = feature_fn or make_feature_fn(variables, resize)
    batch_size = max(1, min(batch_size, len(images)))
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pad = batch_size - len(batch)  # keep one compiled shape
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out.append(np.asarray(fn(batch))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


def fingerprint(variables: Mapping[str, Any]) -> str:
    """A short hash of the weights (part of the FID statistics cache key)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()[:16]


def parameter_count(variables: Mapping[str, Any], collections: Sequence[str] = ("params",)) -> int:
    """Number of scalars in the given variable collections."""
    return int(sum(np.prod(x.shape) for c in collections for x in jax.tree_util.tree_leaves(variables[c])))
