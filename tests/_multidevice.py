"""Runs a Python snippet in a subprocess with N forced CPU devices (XLA flags must precede jax import)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_with_devices(code: str, n: int = 8, timeout: float = 240, env: dict | None = None) -> str:
    """Runs `code` with `n` CPU devices; returns stdout; fails the test with stderr on error."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"{full_env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=full_env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout
