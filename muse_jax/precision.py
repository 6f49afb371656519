"""Matmul precision of the compiled training step and sampler.

    step = precision.jit(step_fn, "default", donate_argnums=(0,))   # jax.jit + the precision

Set by `config.train.matmul_precision` (training steps) and `config.sample.matmul_precision`
(sampling and editing programs; `muse-jax sample|edit --matmul-precision`).

"default": the backend's fast matmul with float32 parameters, activations and accumulation. On
TPUs that is XLA's default (bfloat16 multiplies); on GPUs XLA's default (TF32 on Ampere and newer);
on an x86 CPU with bfloat16 matmul instructions (AMX-BF16 or AVX512-BF16) the float32 dots are
handed to oneDNN, which multiplies bfloat16-rounded inputs into float32 accumulators, as a TPU
does (on the project's AMX CPU: ~3x XLA's float32 throughput on a 2048^3 product, 1.1-2.2x on whole
training steps and decodes, see benchmarks/RESULTS.md). Elsewhere it is plain float32, also where
oneDNN keeps float32 kernels despite the instructions (a 2-core AMD EPYC with AVX512-BF16: oneDNN 3.7
runs its avx512_core f32 matmul there), which the probe below detects.
"highest": float32 multiplies everywhere (`jax.default_matmul_precision("highest")`; on CPU,
XLA's own dots). Use it for numerical parity checks, and as the way out should a dot ever fail
to compile through oneDNN (XLA's oneDNN path is experimental).

oneDNN takes its rounding mode from the environment variable ONEDNN_DEFAULT_FPMATH_MODE, which it
reads once per process. `cpu_compiler_options` sets it only while one tiny probe program runs,
then restores it (PyTorch's own oneDNN reads the same variable: leaving it set would round
PyTorch's float32 convolutions too), and checks with the probe that the multiplies are rounded.
If they are not (another oneDNN user in the process fixed the mode first), the CPU path is not
used and the dots stay XLA's.
"""
from __future__ import annotations

import functools
import os
import platform
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("default", "highest")

# XLA:CPU debug options: every float32 dot becomes its own oneDNN call (no fusion with its
# neighbours: oneDNN graph partitions with element-wise producers or several dots fail to compile).
_ONEDNN_OPTIONS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
_FPMATH_ENV = "ONEDNN_DEFAULT_FPMATH_MODE"


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def cpu_has_bf16_matmul() -> bool:
    """True on an x86-64 Linux CPU that advertises AMX-BF16 or AVX512-BF16."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


@functools.cache
def cpu_compiler_options() -> dict[str, Any]:
    """The XLA options that route float32 CPU dots to oneDNN in bfloat16 mode; {} where unavailable.

    Runs the probe once per process (see the module docstring)."""
    if not cpu_has_bf16_matmul():
        return {}
    saved = os.environ.get(_FPMATH_ENV)
    if saved is None:  # a value the user set is kept (and the probe tells whether it rounds)
        os.environ[_FPMATH_ENV] = "BF16"
    try:
        # 1 + 2^-10 rounds to 1 in bfloat16 (8 significant bits): the rounded product of a row of
        # 64 of them with a column of ones is exactly 64, the float32 one 64 + 2^-4. (oneDNN keeps
        # float32 kernels for very small products, e.g. 16 x 16: those are not rounded.)
        x = np.full((64, 64), 1 + 2.0**-10, np.float32)
        probe = jax.jit(jnp.matmul, compiler_options=_ONEDNN_OPTIONS)
        out = np.asarray(probe(x, np.ones((64, 64), np.float32)))
    except Exception:  # an XLA build without oneDNN: keep XLA's dots
        return {}
    finally:
        if saved is None:
            os.environ.pop(_FPMATH_ENV, None)
    if not np.all(out == 64.0):
        return {}
    # XLA cannot serialise oneDNN calls into the persistent compilation cache: such programs are
    # recompiled in each process (seconds for this project's models), which is all the warning says.
    warnings.filterwarnings("ignore", message=".*ToProto is not implemented for thunk kind: onednn")
    return dict(_ONEDNN_OPTIONS)


def compiler_options(precision: str, backend: str | None = None) -> dict[str, Any]:
    """XLA compiler options for programs compiled at `precision` on `backend` (default: JAX's)."""
    check(precision)
    if precision == "default" and (backend or jax.default_backend()) == "cpu":
        return cpu_compiler_options()
    return {}


def multiplies(precision: str, backend: str | None = None) -> str:
    """What float32 matmul inputs are rounded to at `precision`: "float32", "bfloat16" or "backend default"."""
    check(precision)
    backend = backend or jax.default_backend()
    if precision == "highest":
        return "float32"
    if backend == "cpu":
        return "bfloat16" if cpu_compiler_options() else "float32"
    return "bfloat16" if backend == "tpu" else "backend default"


def jit(fun: Callable, precision: str, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled at the given matmul precision."""
    check(precision)
    if precision == "highest":
        @functools.wraps(fun)
        def traced(*args, **kwargs):
            with jax.default_matmul_precision("highest"):
                return fun(*args, **kwargs)

        return jax.jit(traced, **jit_kwargs)
    options = compiler_options(precision)
    return jax.jit(fun, compiler_options=options or None, **jit_kwargs)
