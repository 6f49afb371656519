"""Metrics to TensorBoard (tensorboardX, no TensorFlow) and the console; a progress bar.

How to use:
    writer = MetricWriter(workdir / "tb")          # only process 0 writes; others are no-ops
    writer.write_hparams({"lr": 1e-4})
    for step in progress(range(start, num_steps), initial=start, total=num_steps, desc="vqgan"):
        ...
        writer.write_scalars(step, {"loss": loss, "lr": lr})      # also printed to the console
        writer.write_images(step, {"samples": uint8_images_NHWC})
    writer.close()

The interface mirrors `clu.metric_writers` (write_scalars, write_images, write_hparams, flush,
close), which cannot be imported without TensorFlow. Accumulate with `clu.metrics` and pass
the computed values here. `console=False` keeps scalars off the console (e.g. under a tqdm bar,
use `progress_bar.set_postfix` instead); `console_every` prints only every N-th call.
`logdir` may be a gs:// or s3:// URI: tensorboardX writes there itself (gs:// needs
google-cloud-storage, installed with the `gcs` extra); for other remote schemes the events go to
a local folder (`muse_jax.paths.local_dir`) and a warning names it.
"""
from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from muse_jax import image_ops, paths

log = logging.getLogger(__name__)
TENSORBOARDX_SCHEMES = ("gs://", "s3://")  # remote logdirs tensorboardX writes itself

def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"


class MetricWriter:
    """TensorBoard event files under `logdir` plus console lines; no-op on processes other than 0."""

    def __init__(self, logdir: str | pathlib.Path, *, console: bool = True, console_every: int = 1):
        self.active = jax.process_index() == 0
        self.console = console
        self.console_every = max(1, int(console_every))
        self._calls = 0
        self._tb = None
        if self.active:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(tensorboard_logdir(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One TensorBoard scalar per key; one console line `step N | k=v ...`."""
        if not self.active:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, int(step))
        self._calls += 1
        if self.console and (self._calls - 1) % self.console_every == 0:
            line = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            _print(f"step {int(step)} | {line}")

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Images uint8 [H,W,C] or [N,H,W,C] (a batch is tiled into one grid)."""
        if not self.active:
            return
        for k, img in images.items():
            img = np.asarray(img)
            if img.ndim == 4:
                img = image_ops.image_grid(img, cols=int(np.ceil(np.sqrt(len(img)))), pad=0)
            if img.dtype != np.uint8:
                raise ValueError(f"image {k!r}: expected uint8, got {img.dtype}")
            self._tb.add_image(k, img, int(step), dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text summaries (e.g. the prompts of sample images)."""
        if not self.active:
            return
        for k, t in texts.items():
            self._tb.add_text(k, str(t), int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters (flattened, non-scalar values as strings) for TensorBoard's HParams tab, written
        into this writer's own event file (a second writer on the same folder may open the same file name
        and overwrite it)."""
        if not self.active:
            return
        from tensorboardX.summary import hparams as hparams_summaries

        flat = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flatten(hparams).items()
        }
        file_writer = self._tb._get_file_writer()
        for summary in hparams_summaries(flat, {}):  # the experiment, session start and session end
            file_writer.add_summary(summary)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tensorboard_logdir(logdir) -> str:
    """The logdir string for tensorboardX: a local folder (created), gs:// or s3:// as is, else local."""
    if not paths.is_remote(logdir):
        path = paths.as_path(logdir)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    uri = str(paths.as_path(logdir))
    if uri.startswith(TENSORBOARDX_SCHEMES):
        return uri
    local = paths.local_dir(logdir)
    log.warning("tensorboardX cannot write to %s; TensorBoard events go to %s", uri, local)
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) or hasattr(v, "items") and not isinstance(v, (str, bytes)):
            out.update(_flatten(dict(v.items()), f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out



def _print(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg)  # keeps an active progress bar intact
    except ImportError:  # pragma: no cover
        print(msg, flush=True)


def progress(iterable: Iterable | None = None, *, disable: bool | None = None, **kwargs):
    """A tqdm bar on process 0 (disabled elsewhere); kwargs go to tqdm (total, initial, desc)."""
    from tqdm import tqdm

    if disable is None:
        disable = jax.process_index() != 0
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, disable=disable, **kwargs)
