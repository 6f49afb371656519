"""Loading ml_collections configs from `configs/`, with `--config.a.b=value` overrides."""
from __future__ import annotations

import pathlib

import ml_collections
from absl import flags
from ml_collections import config_flags

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(spec: str) -> str:
    """`shapes`, `shapes:arg`, or a path `configs/x.py[:arg]` -> `path[:arg]`."""
    path, sep, arg = spec.partition(":")
    candidate = pathlib.Path(path)
    if not candidate.suffix:
        candidate = CONFIG_DIR / f"{path}.py"
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
    if not candidate.is_file():
        raise FileNotFoundError(f"config {spec!r}: no file {candidate} (named configs: {known})")
    if candidate.stem.startswith("_") and candidate.parent == CONFIG_DIR:
        raise ValueError(f"config {spec!r}: {candidate.name} holds shared helpers, not a config "
                         f"(named configs: {known})")
    return f"{candidate}{sep}{arg}"


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads a config file and applies `--config.field=value` overrides.

    Unknown fields and values of the wrong type raise `ValueError` naming the field.
    The returned config is locked: later code cannot add fields by typo.
    """
    for o in overrides:
        if not o.startswith("--config."):
            raise ValueError(f"unexpected argument {o!r}: overrides look like --config.field=value")
    fv = flags.FlagValues()
    argv = ["muse-jax", f"--config={resolve_config_path(spec)}", *overrides]
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except (AttributeError, KeyError) as e:
        raise ValueError(f"config {spec!r} has no field {e} (overrides: {list(overrides)})") from None
    except flags.Error as e:
        raise ValueError(f"bad config override: {e}") from None
    return fv.config


def save_config(config: ml_collections.ConfigDict, path: str | pathlib.Path) -> None:
    """Writes the config as readable JSON (the workdir's record of how it was made); a local path or a URI."""
    from muse_jax import paths

    paths.as_path(path).write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
