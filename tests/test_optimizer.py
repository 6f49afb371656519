"""The transformers' optimizer: AdamW and the factored Adafactor with the paper's b1, b2, weight decay."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from muse_jax.config import load_config
from muse_jax.training import optimizer


def _train_cfg(name="adafactor", **kw):
    overrides = {"optimizer": name, "warmup_steps": 0, **kw}
    return load_config("shapes", [f"--config.train.{k}={v}" for k, v in overrides.items()]).train


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {"dense": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": jax.random.normal(k[1], (6,))},
            "attn": {"kernel": jax.random.normal(k[2], (2, 5, 3))},
            "norm": {"scale": 1.0 + jax.random.normal(k[3], (6,))}}


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_zero_gradient_step_is_lr_scaled_decoupled_weight_decay(name):
    t = _train_cfg(name, lr=2e-3, weight_decay=0.045)
    tx = optimizer.make_optimizer(t)
    lr = float(optimizer.learning_rate_schedule(t)(0))
    assert lr == pytest.approx(2e-3)
    params = _params()
    updates, _ = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    paths, p_leaves = zip(*jax.tree_util.tree_flatten_with_path(params)[0])
    for path, p, u, q in zip(paths, p_leaves, jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(new)):
        p, u, q = np.asarray(p, np.float64), np.asarray(u), np.asarray(q)
        if p.ndim >= 2:
            np.testing.assert_allclose(u, -lr * 0.045 * p, rtol=1e-6, atol=0)
            np.testing.assert_allclose(q, p - lr * 0.045 * p, rtol=1e-7, atol=0)
        else:
            assert np.all(u == 0) and np.all(q == p), jax.tree_util.keystr(path)


def _fit(name, steps=200, lr=3e-2):
    kx, kw, kn = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (256, 16))
    w_true = 0.5 * jax.random.normal(kw, (16, 8))
    y = x @ w_true + 0.3 + 0.01 * jax.random.normal(kn, (256, 8))
    params = {"kernel": jnp.zeros((16, 8)), "bias": jnp.zeros((8,))}
    loss_fn = lambda p: jnp.mean(jnp.square(x @ p["kernel"] + p["bias"] - y))  # noqa: E731
    tx = optimizer.make_optimizer(_train_cfg(name, lr=lr, num_steps=steps, end_lr_fraction=0.1))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, first = tx.init(params), float(loss_fn(params))
    for _ in range(steps):
        params, state, _ = step(params, state)
    return first, float(loss_fn(params))


def test_adafactor_fits_like_adamw():
    first, adafactor = _fit("adafactor")
    _, adamw = _fit("adamw")
    assert adafactor < 0.1 * first, (first, adafactor)
    assert adafactor < 3 * adamw and adamw < 3 * adafactor, (adafactor, adamw)


def _state_float_elements(state):
    leaves = jax.tree_util.tree_leaves(state)
    scalars = [x for x in leaves if x.ndim == 0]
    assert all(not jnp.issubdtype(x.dtype, jnp.floating) for x in scalars)  # step counts only
    return sum(x.size for x in leaves if x.ndim > 0 and jnp.issubdtype(x.dtype, jnp.floating))


def test_adafactor_state_is_factored():
    params = {"m": jnp.ones((512, 256)), "v": jnp.ones((256,)), "t": jnp.ones((4, 64, 32))}
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    adamw = optimizer.make_optimizer(_train_cfg("adamw")).init(params)
    adafactor = optimizer.make_optimizer(_train_cfg("adafactor")).init(params)
    assert _state_float_elements(adamw) == 2 * n
    assert _state_float_elements(adafactor) == n + (512 + 256) + 256 + 4 * (64 + 32)


def test_adafactor_state_shards_momentum_like_params():
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    from muse_jax import partitioning

    boxed = {"dense": {"kernel": nn.Partitioned(jnp.ones((8, 6)), ("embed", "mlp")),
                       "bias": nn.Partitioned(jnp.ones((6,)), ("mlp",))}}
    opt_state = optimizer.make_optimizer(_train_cfg("adafactor")).init(nn.unbox(boxed))
    specs = partitioning.logical_specs({"params": boxed, "opt_state": opt_state})
    ada = specs["opt_state"][1][0]
    assert ada.mu["dense"]["kernel"] == P("embed", "mlp") and ada.mu["dense"]["bias"] == P("mlp")
    assert ada.nu["dense"]["bias"] == P("mlp")
    assert ada.nu["dense"]["kernel"] == (P(), P())


def _reference(params, grads_seq, lr, b1, b2, wd, eps=1e-30):
    """NumPy (float64) Adafactor as documented in optimizer.scale_by_adafactor, plus decay and lr."""
    m = {k: np.zeros_like(p) for k, p in params.items()}
    v = {k: (np.zeros(p.shape[:-1]), np.zeros(p.shape[-1:])) if p.ndim >= 2 else np.zeros_like(p) for k, p in params.items()}
    out, clipped = [], False
    for t, grads in enumerate(grads_seq, start=1):
        step = {}
        for k, p in params.items():
            g = grads[k]
            g2 = g * g + eps
            if p.ndim >= 2:
                r = b2 * v[k][0] + (1 - b2) * g2.mean(1)
                c = b2 * v[k][1] + (1 - b2) * g2.mean(0)
                v[k] = (r, c)
                v_hat = np.outer(r, c) / r.mean() / (1 - b2**t)
            else:
                v[k] = b2 * v[k] + (1 - b2) * g2
                v_hat = v[k] / (1 - b2**t)
            u = g / np.sqrt(v_hat)
            rms = np.sqrt(np.mean(u * u))
            clipped |= rms > 1
            u = u / max(1.0, rms)
            m[k] = b1 * m[k] + (1 - b1) * u
            step[k] = -lr * (m[k] / (1 - b1**t) + (wd * p if p.ndim >= 2 else 0))
        out.append(step)
    return out, clipped


def test_adafactor_matches_numpy_reference():
    """Two steps on a [3, 4] matrix and a [4] vector, against the float64 reference from float32 inputs."""
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    # The first matrix gradient is far from rank one, so its update is RMS-clipped; the second keeps
    # the first's signs (momentum adds rather than cancels, which float32 could not resolve to 1e-6).
    g1 = {"w": np.array([[5.0, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, -3.0]]), "b": rng.normal(size=(4,))}
    grads_seq = [g1, {k: g * rng.uniform(0.3, 3.0, size=g.shape) for k, g in g1.items()}]
    f32 = lambda tree: {k: x.astype(np.float32) for k, x in tree.items()}  # noqa: E731
    f64 = lambda tree: {k: np.asarray(x, np.float64) for k, x in tree.items()}  # noqa: E731
    params, grads_seq = f32(params), [f32(g) for g in grads_seq]
    expected, clipped = _reference(f64(params), [f64(g) for g in grads_seq], lr=1e-2, b1=0.9, b2=0.96, wd=0.045)
    assert clipped

    tx = optimizer.make_optimizer(_train_cfg("adafactor", lr=1e-2, b1=0.9, b2=0.96, weight_decay=0.045, grad_clip=0.0))
    update = jax.jit(tx.update)
    state = tx.init(params)
    for grads, want in zip(grads_seq, expected):
        updates, state = update(grads, state, params)
        for k in params:
            np.testing.assert_allclose(np.asarray(updates[k]), want[k], rtol=1e-6, atol=1e-6 * np.abs(want[k]).max(), err_msg=k)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'lion'"):
        optimizer.make_optimizer(_train_cfg("lion"))
