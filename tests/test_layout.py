"""The package's layers: every import of a muse_jax module points to the same layer or one below.

Read from the source (ast), so function-local imports count too. Within a layer, Python itself
refuses cycles at import time only for top-level imports; the layers keep the order explicit.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "muse_jax"

# Lowest first. A module belongs to the first entry that is it or a package above it.
LAYERS = (
    ("foundation", ("paths", "precision", "distributed", "masking", "sampling", "image_ops")),
    ("models", ("models",)),
    ("configs", ("config", "configs")),
    ("data", ("data",)),
    # What the loaders, the trainer and the evaluation read, place and log: Orbax checkpoints on a mesh.
    ("checkpoints and meshes", ("checkpoint", "partitioning", "writer")),
    ("workdir", ("workdir", "amused")),
    ("inference", ("editing", "cascade")),
    ("evaluation", ("evaluation",)),
    # Inference and evaluation read trained workdirs and never import the trainer.
    ("training", ("training",)),
    ("entry points", ("planning", "quickstart", "cli")),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of a dotted name below muse_jax (e.g. "training.loop")."""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise KeyError(module)


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = path
    return out


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, muse_jax module) for every import in the file, resolved to a module where it names one."""
    known = modules()
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[len("muse_jax."):] in known
                     else node.module for a in node.names]
        else:
            continue
        for n in names:
            if n == "muse_jax" or n.startswith("muse_jax."):
                found.append((node.lineno, n[len("muse_jax."):] if n != "muse_jax" else ""))
    return [(line, m) for line, m in found if m]


def test_every_module_has_a_layer():
    assert [m for m in modules() if not _has_layer(m)] == []


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_imports_point_down_only():
    upward = []
    for name, path in modules().items():
        own = layer_of(name)
        for line, target in imports_of(path):
            if layer_of(target) > own:
                upward.append(f"muse_jax/{path.relative_to(PACKAGE)}:{line} ({LAYERS[own][0]}) imports "
                              f"muse_jax.{target} ({LAYERS[layer_of(target)][0]})")
    assert upward == []


def test_module_names_are_unique_outside_configs():
    names = {}
    for name in modules():
        if name == "configs" or name.startswith("configs."):
            continue
        names.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from muse_jax.cli import main\n    from muse_jax.training import loop\n")
    assert imports_of(bad) == [(2, "cli"), (3, "training.loop")]
    assert layer_of("cli") > layer_of("models.vqgan")
    assert layer_of("training.loop") > max(layer_of("cascade"), layer_of("evaluation.zero_shot"))
    with pytest.raises(KeyError):
        layer_of("nowhere")
