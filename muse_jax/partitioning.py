"""Device mesh from config, logical-axis rules, and the shardings of state and batches.

How to use (a trainer):
    mesh = partitioning.make_mesh(config.mesh)                 # axes ("data", "fsdp", "tensor")
    rules = partitioning.logical_rules(config)                 # config.partitioning.rules
    abstract = jax.eval_shape(create_state, rng)               # params still boxed (nn.Partitioned)
    shardings = partitioning.state_shardings(abstract, mesh, rules)   # unboxed tree of NamedSharding
    state = jax.jit(lambda r: nn.unbox(create_state(r)), out_shardings=shardings)(rng)
    batch = partitioning.shard_batch(numpy_batch, mesh, rules)        # global jax.Arrays
    with partitioning.axis_rules(mesh, rules):                 # activations' nn.with_logical_constraint
        state, metrics = jitted_step(state, batch, rng)

Models name logical axes only (`nn.with_logical_partitioning`, `nn.with_logical_constraint`,
names listed in `muse_jax/models/layers.py`); the rules table maps them to mesh axes. Pure data
parallel, FSDP and tensor parallel are config changes only:
    DP:   --config.mesh.data=-1 --config.mesh.fsdp=1  --config.mesh.tensor=1
    FSDP: --config.mesh.data=1  --config.mesh.fsdp=-1 --config.mesh.tensor=1
    TP:   --config.mesh.data=-1 --config.mesh.fsdp=1  --config.mesh.tensor=2
A parameter dimension that a mesh axis does not divide (e.g. a codebook of 257 entries over
tensor=2) is left unsharded along that dimension rather than failing.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (str), several mesh axes (tuple) or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
)

log = logging.getLogger(__name__)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") sized by `mesh_config` (-1 = the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {}
    for axis in MESH_AXES:
        size = mesh_config.get(axis, 1) if hasattr(mesh_config, "get") else getattr(mesh_config, axis)
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r}: axis sizes are positive integers or -1 (the rest)")
        sizes[axis] = size
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1, got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes need a multiple of {fixed} devices, have {n}"
            )
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise ValueError(f"mesh {sizes} needs {fixed} devices, have {n} (set one axis to -1)")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # e.g. CPU devices without a physical topology
        array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(array, MESH_AXES)


def logical_rules(config=None) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules table: `config.partitioning.rules` if present, else the defaults."""
    rules = None
    if config is not None and "partitioning" in config:
        rules = config.partitioning.get("rules")
    rules = DEFAULT_RULES if rules is None else rules
    out = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"partitioning rule {entry!r}: expected (logical_name, mesh_axis)")
        name, target = entry
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(f"partitioning rule {entry!r}: unknown mesh axis {t!r} (axes: {MESH_AXES})")
        out.append((name, target if isinstance(target, (str, type(None))) else tuple(target)))
    return tuple(out)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules):
    """Context for tracing/calling sharded code: the mesh plus flax's logical-axis rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        return mesh.shape[axes]
    return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
    """`spec` with the mesh axes that do not divide their dimension dropped (replicated)."""
    if len(spec) > len(shape):
        log.info("%s: spec %s has more axes than shape %s; replicated", where, spec, shape)
        return P()
    out = []
    for dim, axes in zip(shape, spec):
        if axes is not None and dim % _axis_size(mesh, axes):
            log.info("%s: dim %d not divisible by mesh axes %s; left unsharded", where, dim, axes)
            axes = None
        out.append(axes)
    return P(*out)


def logical_specs(abstract_tree) -> Any:
    """Logical PartitionSpecs for every leaf of the unboxed `abstract_tree`.

    Boxed leaves (`nn.Partitioned`) give their names. An unboxed leaf whose path ends with a
    boxed leaf's path (below its top-level field) and has its shape inherits its names: so the
    Adam moments and EMA copies of a parameter are sharded like the parameter. Others: P().
    """
    is_box = lambda x: isinstance(x, nn.Partitioned)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=is_box)
    boxed = {}
    for path, leaf in flat:
        if is_box(leaf):
            boxed[tuple(path[1:])] = (leaf.value.shape, leaf.get_partition_spec())
    specs = []
    for path, leaf in flat:
        if is_box(leaf):
            specs.append(leaf.get_partition_spec())
            continue
        spec = P()
        path = tuple(path)
        for k in range(1, len(path)):
            hit = boxed.get(path[k:])
            if hit is not None and tuple(hit[0]) == tuple(getattr(leaf, "shape", ())):
                spec = hit[1]
                break
        specs.append(spec)
    unboxed_def = jax.tree_util.tree_structure(nn.unbox(abstract_tree))
    del treedef
    return jax.tree_util.tree_unflatten(unboxed_def, specs)


def state_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings (tree of the unboxed `abstract_tree`) from logical names and `rules`."""
    specs = logical_specs(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_tree))
    spec_leaves = jax.tree_util.tree_leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"internal: {len(leaves)} leaves but {len(spec_leaves)} partition specs")
    out = [
        NamedSharding(mesh, _fit(s, tuple(getattr(x, "shape", ())), mesh, jax.tree_util.keystr(p)))
        for (p, x), s in zip(leaves, spec_leaves)
    ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(nn.unbox(abstract_tree)), out)


def _batch_axes(rules):
    for name, target in rules or DEFAULT_RULES:
        if name == "batch":
            return target
    return ("data", "fsdp")


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: leading dim over the rules' `batch` axes, the rest replicated."""
    return NamedSharding(mesh, P(_batch_axes(rules), *([None] * (ndim - 1))))


def check_batch_divides(global_batch: int, mesh: Mesh, rules=None) -> None:
    """Raises ValueError naming the batch size and the mesh axis sizes if they do not fit."""
    axes = _batch_axes(rules)
    size = _axis_size(mesh, axes)
    if global_batch % size or global_batch % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch} does not divide across the mesh: the batch is split "
            f"over mesh axes {axes} of total size {size} (mesh {dict(mesh.shape)}, "
            f"{jax.process_count()} processes); choose a batch size that is a multiple of {size}"
        )


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, rules=None) -> dict[str, jax.Array]:
    """This process's numpy batch -> global jax.Arrays sharded along the batch axes."""
    out = {}
    for key, x in local_batch.items():
        x = np.asarray(x)
        if x.dtype.kind not in "biuf" and x.dtype.name not in ("bfloat16", "float16"):
            raise ValueError(f"batch field {key!r} has dtype {x.dtype}; drop non-numeric fields before sharding")
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        check_batch_divides(global_shape[0], mesh, rules)
        sharding = batch_sharding(mesh, rules, x.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out
