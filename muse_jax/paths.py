"""Workdir paths that may be local or remote (gs://bucket/run, s3://...): one pathlib-like API.

How to use:
    w = paths.as_path(workdir)              # pathlib.Path locally; etils.epath.Path for a URI
    (w / "base" / "config.json").write_text(text)        # the same calls either way
    paths.local_dir(workdir, "data")        # W/data locally; a local folder for a remote W

Remote paths go through `etils.epath`, which uses fsspec for gs://, s3://, az:// (gs:// needs
gcsfs: `pip install -e '.[gcs]'`). Orbax and TensorBoard (tensorboardX) take the URI as is.
Things that must be local files (the tfds dataset read by array_record, memory-mapped text
caches) go to `local_dir`: for a remote workdir a folder under $MUSE_JAX_LOCAL_DIR (default
~/.cache/muse_jax/remote) named after the URI, rebuilt on each host when missing.
"""
from __future__ import annotations

import os
import pathlib

from etils import epath

LOCAL_DIR_ENV = "MUSE_JAX_LOCAL_DIR"


def is_remote(path) -> bool:
    """True for a URI such as gs://bucket/x (file:// and plain paths are local)."""
    if isinstance(path, pathlib.PurePath) and not isinstance(path, epath.Path):
        return False
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def as_path(path) -> pathlib.Path | epath.Path:
    """`path` as pathlib.Path (local) or epath.Path (remote URI); both support / open read_text
    write_text mkdir exists is_file is_dir glob rename replace."""
    if isinstance(path, (str, os.PathLike)) and is_remote(path):
        return epath.Path(os.fspath(path))
    s = os.fspath(path)
    return pathlib.Path(s[len("file://"):] if s.startswith("file://") else s)


def local_dir(workdir, *parts: str) -> pathlib.Path:
    """W/parts for a local W; for a remote W a per-URI local folder (`$MUSE_JAX_LOCAL_DIR`)."""
    if not is_remote(workdir):
        return as_path(workdir).joinpath(*parts)
    base = os.environ.get(LOCAL_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "muse_jax", "remote")
    scheme, rest = os.fspath(workdir).split("://", 1)
    return pathlib.Path(base, scheme, *[p for p in rest.split("/") if p not in ("", ".", "..")], *parts)


def rmtree(path) -> None:
    """Removes a directory tree, local or remote."""
    path = as_path(path)
    if isinstance(path, epath.Path):
        path.rmtree()
    else:
        import shutil

        shutil.rmtree(path)
