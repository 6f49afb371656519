"""LoRA (Hu et al. 2021): low-rank adapters beside a linen model's kernels, through qwix.

    spec = lora.LoraSpec.from_config(config)       # config.lora: rank, alpha, targets, dropout; None when off
    model = lora.wrap(uvit.UVit2D(cfg), spec)      # the plain model's inputs and outputs
    boxed = lora.init_adapters(model, rng, *inputs)   # the adapters alone, with their kernels' logical axis names
    adapters = nn.unbox(boxed)
    logits = model.apply({"params": lora.combine(base, adapters)}, *inputs)    # base: the plain model's params
    grads = jax.grad(lambda a: loss(model.apply({"params": lora.combine(base, a)}, *inputs)))(adapters)
    merged = lora.merge(lora.combine(base, adapters), spec)   # W + (alpha/rank) A B: the plain model applies it
    print(lora.describe(lora.combine(base, adapters)))         # "5,760 adapter parameters (6.17 % of ...)"

Every kernel that a module matching `spec.targets` (a regex that must match a whole module path,
e.g. "transformer_layers_0/attn1/to_q") multiplies with `jax.lax.dot_general` gets two parameters
beside it in the same module: `<kernel>_lora_a` [prod(inputs), rank] and `<kernel>_lora_b`
[rank, prod(outputs)], B starting at zero so a fresh wrap computes what the plain model does.
qwix finds the kernels by intercepting `jax.lax.dot_general` (and `jnp.einsum`) while the wrapped
model runs: a module must call it on the kernel itself, or on the kernel after unary ops (astype,
reshape) under jit; a matmul written `x @ w` is not seen. The adapters keep the kernel's logical
axis names (A: the first input axis', B: the first output axis'), so `partitioning.state_shardings`
shards them like their kernels.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank r, scale alpha / r, the module-path regex, dropout on the adapters' input."""

    rank: int
    alpha: float
    targets: str
    dropout: float = 0.0

    def __post_init__(self):
        if not _is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"config.lora.rank={self.rank!r}: must be a positive integer (or 0 in a config: no LoRA)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)) or not self.alpha > 0:
            raise ValueError(f"config.lora.alpha={self.alpha!r}: a positive number (adapters are scaled by alpha / rank)")
        if not isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"config.lora.targets={self.targets!r}: a regex over module paths, "
                             r"e.g. '.*transformer_layers_\d+/(attn1|attn2|ff)/.*'")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"config.lora.targets={self.targets!r}: not a valid regex ({e})") from None
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float, np.number)) \
                or not 0 <= self.dropout < 1:
            raise ValueError(f"config.lora.dropout={self.dropout!r}: a probability in [0, 1)")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """alpha / rank: the factor on x A B."""
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, config) -> LoraSpec | None:
        """From `config.lora` (or that section itself); None when it is absent or its rank is 0."""
        section = _get(config, "lora")
        if section is None and _get(config, "rank") is not None:
            section = config
        if section is None:
            return None
        rank = _get(section, "rank")
        if rank is None or (_is_int(rank) and rank == 0):
            return None
        if _is_int(rank) and rank > 0:
            for name in ("alpha", "targets"):
                if _get(section, name) is None:
                    raise ValueError(f"config.lora.{name} is missing (needed when config.lora.rank > 0)")
        dropout = _get(section, "dropout")
        return cls(rank, _get(section, "alpha"), _get(section, "targets"), 0.0 if dropout is None else dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSpec:
        """From `to_dict()` (e.g. read back from JSON); unknown or missing keys are a ValueError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in ("rank", "alpha", "targets") if n not in d]
        if unknown or missing:
            raise ValueError(f"LoRA spec {dict(d)}: unknown keys {unknown}, missing keys {missing} (fields: {names})")
        return cls(**dict(d))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _get(obj, key):
    if obj is None:
        return None
    if hasattr(obj, "get"):  # dict, ml_collections.ConfigDict
        return obj.get(key)
    return getattr(obj, key, None)


# ---------------------------------------------------------------------------------------
# The wrapped model
# ---------------------------------------------------------------------------------------


def wrap(model: nn.Module, spec: LoraSpec, *, deterministic: bool = False) -> nn.Module:
    """`model` with adapters on the kernels of the modules matching `spec.targets` (its `init` creates them).

    qwix applies adapter dropout on every call when `spec.dropout` > 0 (then `apply` needs a "dropout"
    rng); deterministic=True leaves it out, for evaluation and sampling."""
    dropout = 0.0 if deterministic else spec.dropout
    provider = qwix.LoraProvider(module_path=spec.targets, rank=spec.rank, alpha=spec.alpha, dropout=dropout)
    methods = ("__call__", "forward") if callable(getattr(type(model), "forward", None)) else ("__call__",)
    wrapped = qwix.apply_lora_to_model(model, provider, methods=methods)
    type(wrapped)._lora_spec = spec  # qwix made a class for this model alone
    return wrapped


def init_adapters(model: nn.Module, rng, *inputs, abstract: bool = False, **kwargs):
    """The adapters of a fresh `model.init(rng, *inputs, **kwargs)` of a wrapped model, boxed with their
    kernels' logical axis names: ShapeDtypeStructs with abstract=True (nothing computed), else arrays
    (one jitted init whose base parameters XLA drops). Inputs may be arrays or ShapeDtypeStructs.

    A ValueError when no kernel gets an adapter (the targets match no layer)."""

    def init(r):
        concrete = lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x  # noqa: E731
        args, kw = jax.tree_util.tree_map(concrete, (inputs, kwargs))
        rngs = {"params": r, "dropout": jax.random.fold_in(r, 1)}
        return model.init(rngs, *args, **kw)["params"]

    base, adapters = split(jax.eval_shape(init, rng))
    if not adapters:
        spec = getattr(type(model), "_lora_spec", None)
        targets = "?" if spec is None else spec.targets
        raise ValueError(f"config.lora.targets={targets!r} matches no layer of {type(model).__name__}; "
                         f"module paths look like {_example_paths(base)}")
    if abstract:
        return adapters
    return jax.jit(lambda r: split(init(r))[1])(rng)


def _example_paths(params, n: int = 6) -> str:
    """A few module paths that own a kernel (a parameter of 2+ dimensions), spread over the model."""
    paths = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = _names(path)
        module = "/".join(names[:-1])
        if len(getattr(leaf, "shape", ())) >= 2 and module not in paths:
            paths.append(module)
    if len(paths) > n:
        paths = [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)]
    return ", ".join(paths) + ", ..."


# ---------------------------------------------------------------------------------------
# Parameter trees
# ---------------------------------------------------------------------------------------


def _name(key) -> str | None:
    if isinstance(key, str):
        return key
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    return None  # e.g. a box's `value` attribute


def _names(path) -> list[str]:
    return [n for n in map(_name, path) if n is not None]


def is_adapter(path) -> bool:
    """True for the tree path (jax key path or tuple of names) of a `<kernel>_lora_a` / `_lora_b` leaf."""
    names = _names(path)
    return bool(names) and names[-1].endswith(SUFFIXES)


def split(params) -> tuple[dict, dict]:
    """(base, adapters): nested dicts, the first without adapter leaves, the second with only those
    (and only the branches that hold some). Leaves may be boxed, arrays or ShapeDtypeStructs."""
    base, adapters = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            b, a = split(value)
            if a:
                adapters[key] = a
            if b or not a:
                base[key] = b
        elif str(key).endswith(SUFFIXES):
            adapters[key] = value
        else:
            base[key] = value
    return base, adapters


def adapters_only(params) -> dict:
    """The adapters of `params` (split's second part): what a LoRA run trains. A ValueError when there are none."""
    base, adapters = split(params)
    if not adapters:
        raise ValueError("no LoRA adapters in the parameters: config.lora.targets matches no layer; "
                         f"module paths look like {_example_paths(base)}")
    return adapters


def combine(base, adapters) -> dict:
    """The inverse of `split`: `base` with the adapter leaves of `adapters` put back beside their kernels."""
    return _combine(base, adapters, ())


def _combine(base, adapters, where) -> dict:
    out = {k: _plain(v) for k, v in base.items()}
    for key, value in adapters.items():
        path = "/".join(map(str, (*where, key)))
        if isinstance(value, Mapping):
            inner = out.get(key, {})
            if not isinstance(inner, Mapping):
                raise ValueError(f"lora.combine: adapters hold a branch at {path}, the base parameters a leaf")
            out[key] = _combine(inner, value, (*where, key))
        elif not str(key).endswith(SUFFIXES):
            raise ValueError(f"lora.combine: {path} is not an adapter (names end in {' or '.join(SUFFIXES)})")
        elif key in out:
            raise ValueError(f"lora.combine: {path} is in both the base parameters and the adapters")
        else:
            out[key] = value
    return out


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def count(params) -> int:
    """How many adapter parameters `params` holds (a whole tree or the adapters alone)."""
    return sum(_size(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params) if is_adapter(path))


def describe(params) -> str:
    """The line "N adapter parameters (x % of the model's M)" for a tree holding base parameters and adapters."""
    total = sum(_size(leaf) for leaf in jax.tree_util.tree_leaves(params))
    n = count(params)
    return f"{n:,} adapter parameters ({100 * n / max(total - n, 1):.2f} % of the model's {total - n:,})"


def _size(leaf) -> int:
    return math.prod(getattr(leaf, "shape", np.shape(leaf)))


# ---------------------------------------------------------------------------------------
# Folding the adapters into the kernels
# ---------------------------------------------------------------------------------------


def merge(params, spec: LoraSpec) -> dict:
    """`params` without adapters, each kernel W replaced by W + (alpha/rank) * reshape(A @ B, W.shape).

    The plain (unwrapped) model applies the result. Valid because our kernels hold their contracted
    (input) axes first and their output axes last, as qwix's A [prod(in), r] and B [r, prod(out)] do.
    Leaves may be numpy arrays (computed with numpy), jax arrays (sharded ones too: use it under jit, the
    product keeps the kernels' shardings) or boxed; the result has each kernel's dtype."""
    base, adapters = split(params)
    return _merge(base, adapters, spec, ())


def _merge(base, adapters, spec, where) -> dict:
    out = dict(base)
    for key, value in adapters.items():
        if isinstance(value, Mapping):
            if not isinstance(base.get(key), Mapping):
                raise ValueError(f"lora.merge: adapters at {'/'.join(map(str, (*where, key)))} have no module in the "
                                 "base parameters")
            out[key] = _merge(base[key], value, spec, (*where, key))
    kernels = sorted({k[: -len(s)] for k in adapters for s in SUFFIXES if str(k).endswith(s)})
    for name in kernels:
        path = "/".join(map(str, (*where, name)))
        a, b = adapters.get(name + SUFFIXES[0]), adapters.get(name + SUFFIXES[1])
        if a is None or b is None or name not in base:
            raise ValueError(f"lora.merge: {path} needs its kernel, {name}_lora_a and {name}_lora_b; "
                             f"found {sorted(k for k in (*base, *adapters) if str(k).startswith(name))}")
        out[name] = _fold(base[name], _unboxed(a), _unboxed(b), spec, path)
    return out


def _unboxed(x):
    if isinstance(x, nn.Partitioned):
        return x.unbox(apply_constraint=False)
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _fold(w, a, b, spec: LoraSpec, path: str):
    """W + scale * reshape(A @ B, W.shape), in float32, cast back to W's dtype; boxes kept."""
    if isinstance(w, nn.meta.AxisMetadata):
        return w.replace_boxed(_fold(_unboxed(w), a, b, spec, path))
    shape = tuple(w.shape)
    leading = [math.prod(shape[:k]) for k in range(len(shape) + 1)]
    if (a.ndim != 2 or b.ndim != 2 or a.shape[1] != spec.rank or b.shape[0] != spec.rank
            or a.shape[0] not in leading or a.shape[0] * b.shape[1] != math.prod(shape)):
        raise ValueError(f"lora.merge: {path}: adapters A {tuple(a.shape)} and B {tuple(b.shape)} do not fold into "
                         f"kernel {shape} at rank {spec.rank} (A must be [prod(input axes), rank], B [rank, "
                         "prod(output axes)], the kernel's input axes first)")
    if all(isinstance(x, np.ndarray) for x in (w, a, b)):
        delta = a.astype(np.float32) @ b.astype(np.float32)
        return (w.astype(np.float32) + np.float32(spec.scale) * delta.reshape(shape)).astype(w.dtype)
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + spec.scale * delta.reshape(shape)).astype(w.dtype)
