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


def _braces(pattern: str) -> list[str]:
    """Brace expansion as in shells and webdataset: `a{00..02}b` -> a00b a01b a02b; `{x,y}`."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced braces in {pattern!r}")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    if ".." in body and "," not in body and "{" not in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise ValueError(f"range {{{body}}} in {pattern!r}: expected {{first..last}} with numbers")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items, depth, part = [], 0, ""
        for ch in body:  # split on top-level commas
            if ch == "," and depth == 0:
                items.append(part)
                part = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            part += ch
        items.append(part)
    return [p for item in items for p in _braces(head + item + tail)]


def expand(patterns) -> list[str]:
    """The files named by one pattern or a list of them, local or remote, in order.

    Each pattern is brace-expanded (`shards/{00000..00099}.tar`, `{train,extra}/*.parquet`),
    then globbed where it holds `*`, `?` or `[`; a name without wildcards must exist. A pattern
    that matches nothing is an error naming it (patterns separated by whitespace or "::" too).
    """
    if isinstance(patterns, str):
        patterns = [p for part in patterns.split("::") for p in part.split()]
    out = []
    for pattern in patterns:
        found = []
        for name in _braces(pattern):
            if any(c in name for c in "*?["):
                path = as_path(name)
                anchor = path.parent
                while any(c in anchor.name for c in "*?["):
                    anchor = anchor.parent
                rel = os.fspath(path)[len(os.fspath(anchor)):].lstrip("/")
                found += sorted(os.fspath(p) if not is_remote(name) else str(p) for p in anchor.glob(rel))
            elif as_path(name).exists():
                found.append(name)
            else:
                raise FileNotFoundError(f"{name} does not exist (from {pattern!r})")
        if not found:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        out += found
    return out
