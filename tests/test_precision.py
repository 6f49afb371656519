"""config.*.matmul_precision: bfloat16 multiplies on a CPU that has them, float32 at "highest"."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _data, tiny_config

from muse_jax import cascade, precision
from muse_jax.training import loop

# Where the CPU advertises bfloat16 matmuls and oneDNN's probe rounds (the AMX machines). A CPU can
# advertise AVX512-BF16 and still get float32 kernels from oneDNN (a 2-core AMD EPYC did): the probe
# then keeps XLA's dots, which the first test checks too.
BF16_CPU = jax.default_backend() == "cpu" and precision.multiplies("default") == "bfloat16"


def test_default_rounds_multiplies_to_bfloat16_where_the_cpu_has_them_and_highest_never():
    env_before = os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE")
    # 1 + 2^-10 is 1 in bfloat16: a row of 64 of them times ones is 64 rounded, 64 + 2^-4 in float32.
    x = np.full((64, 64), 1 + 2.0**-10, np.float32)
    ones = np.ones((64, 64), np.float32)
    highest = precision.jit(jnp.matmul, "highest")(x, ones)
    default = precision.jit(jnp.matmul, "default")(x, ones)
    assert np.all(np.asarray(highest) == 64.0625)
    if BF16_CPU:  # this project's CPU machines (AMX-BF16): oneDNN is used and rounds
        assert precision.compiler_options("default") and precision.multiplies("default") == "bfloat16"
        assert np.all(np.asarray(default) == 64.0)
        hlo = precision.jit(jnp.matmul, "default").lower(x, ones).compile().as_text()
        assert "__onednn_fusion" in hlo
    else:  # no bfloat16 instructions, or oneDNN does not round with them: XLA's float32 dots
        assert np.all(np.asarray(default) == 64.0625) and precision.compiler_options("default") == {}
    assert precision.multiplies("highest") == "float32" and precision.compiler_options("highest") == {}
    # The probe leaves the environment as it found it (PyTorch's oneDNN reads the same variable).
    assert os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE") == env_before

    # Accumulation stays float32: a 512-long random product is off by bfloat16 input rounding only.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((128, 512), np.float32), rng.standard_normal((512, 128), np.float32)
    exact = a.astype(np.float64) @ b
    err = lambda p: float(np.abs(np.asarray(precision.jit(jnp.matmul, p)(a, b)) - exact).max() / np.abs(exact).max())  # noqa: E731
    assert err("highest") < 1e-5
    assert (1e-4 < err("default") < 1e-2) if BF16_CPU else err("default") < 1e-5


def test_bad_precision_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        precision.check("fast")
    with pytest.raises(ValueError, match="matmul_precision"):
        cascade.SampleOptions(matmul_precision="bf16")
    cfg = tiny_config("--config.train.matmul_precision=fast")
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        loop.train_stage(cfg, tmp_path / "w", "base", data=_data(cfg), quiet=True)
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(not BF16_CPU, reason="needs a CPU with bfloat16 matmul instructions")
def test_training_step_uses_the_precision_and_both_train_alike(tmp_path):
    losses = {}
    for p in ("default", "highest"):
        cfg = tiny_config("--config.train.num_steps=12", "--config.train.checkpoint_every=100",
                          "--config.train.lr=1e-2", f"--config.train.matmul_precision={p}")
        losses[p] = loop.train_stage(cfg, tmp_path / p, "base", data=_data(cfg), quiet=True)["losses"]
    d, h = (np.array([losses[p][s] for s in sorted(losses[p])]) for p in ("default", "highest"))
    assert not np.array_equal(d, h)  # the step really ran with other multiplies
    np.testing.assert_allclose(d, h, rtol=2e-2)  # ... and trains the same
    assert d[-3:].mean() < d[:3].mean()
