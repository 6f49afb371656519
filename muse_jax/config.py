"""Loading configs with `--config.a.b=value` overrides, and writing them into a workdir.

    config = load_config("shapes")                        # a name from muse_jax/configs
    config = load_config("paper:muse_3b")                 # a module's named variant (= "muse_3b")
    config = load_config("my_config.py:arg", ["--config.train.lr=1e-3"])   # a file of one's own

Named configs are modules of the `muse_jax.configs` package, imported as such, so they work from
any working directory after a plain `pip install .`. A config file is loaded as a module too;
either way `get_config(arg)` returns the ConfigDict, then the overrides are applied.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import pathlib

import ml_collections
from absl import flags
from ml_collections import config_flags

from muse_jax import configs as configs_pkg

STAGES = ("base", "superres")  # the masked transformers, each a config section and a workdir folder


def named_configs() -> list[str]:
    """The names `load_config` accepts without a path."""
    plain = {m for m, arg in configs_pkg.NAMES.values() if arg is None}
    return sorted(set(configs_pkg.NAMES) | {f"{m}:ARG" for m in configs_pkg.MODULES if m not in plain})


def _module_from_file(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"muse_jax_user_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_config(spec: str) -> ml_collections.ConfigDict:
    """`spec` -> the config its `get_config(arg)` returns (no overrides).

    spec: a name (`shapes`, `muse_3b`), `module:arg` (`paper:muse_3b`, `vqgan:f8`), or a path to a
    Python file with `get_config`, optionally followed by `:arg`.
    """
    if spec.endswith(".json"):  # a config a workdir was trained with (W/config.json, W/<stage>/config.json)
        path = pathlib.Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config {spec!r}: no such file")
        try:
            return ml_collections.ConfigDict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"config {spec!r} is not valid JSON: {e}") from None
    name, sep, arg = spec.partition(":")
    arg = arg if sep else None
    if name.endswith(".py") or "/" in name:
        path = pathlib.Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"config {spec!r}: no file {path} (named configs: {named_configs()})")
        module = _module_from_file(path)
    elif name in configs_pkg.NAMES and not sep:
        module_name, arg = configs_pkg.NAMES[name]
        module = importlib.import_module(f"muse_jax.configs.{module_name}")
    elif name in configs_pkg.MODULES:
        module = importlib.import_module(f"muse_jax.configs.{name}")
    else:
        raise FileNotFoundError(f"config {spec!r} is neither a .py file nor one of the named configs {named_configs()}")
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {spec!r}: {module.__name__} has no get_config(arg)")
    config = module.get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config {spec!r}: get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """The config named by `spec` (see `build_config`) with `--config.field=value` overrides.

    Unknown fields and values of the wrong type raise `ValueError` naming the field.
    The returned config is locked: later code cannot add fields by typo.
    """
    for o in overrides:
        if not o.startswith("--config."):
            raise ValueError(f"unexpected argument {o!r}: overrides look like --config.field=value")
    config = build_config(spec)
    fv = flags.FlagValues()
    argv = ["muse-jax", *overrides]
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True, sys_argv=argv)
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


def tokenizer_config(config: ml_collections.ConfigDict, name: str = "") -> ml_collections.ConfigDict:
    """The config with the `vqgan` and `train_tokenizer` sections of tokenizer `name`.

    "" is the shared tokenizer (the sections as they are); a name applies
    `config.tokenizers.<name>.vqgan` / `.train_tokenizer` (overrides of those fields) to a copy.
    """
    if not name:
        return config
    known = sorted(config.get("tokenizers", {}) or {})
    if name not in known:
        raise ValueError(f"config.tokenizers.{name}: no such tokenizer (this config names {known or 'none'})")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for section in ("vqgan", "train_tokenizer"):
            for key, value in (config.tokenizers[name].get(section) or {}).items():
                if key not in config[section]:
                    raise ValueError(f"config.tokenizers.{name}.{section}.{key}: no such field in config.{section}")
                config[section][key] = value
    return config
