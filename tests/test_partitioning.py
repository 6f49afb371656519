"""Mesh building, rules, state/batch shardings (multi-device checks run in a subprocess)."""
import json

import ml_collections
import pytest
from _multidevice import run_with_devices

from muse_jax import partitioning


def _mesh_cfg(**kw):
    c = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.update(kw)
    return c


def test_make_mesh_single_device_and_errors():
    import jax

    mesh = partitioning.make_mesh(_mesh_cfg())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        partitioning.make_mesh(_mesh_cfg(fsdp=-1))
    with pytest.raises(ValueError, match="needs 4 devices"):
        partitioning.make_mesh(_mesh_cfg(data=2, tensor=2))
    with pytest.raises(ValueError, match="mesh.tensor=0"):
        partitioning.make_mesh(_mesh_cfg(tensor=0))


def test_rules_from_config_and_bad_axis():
    cfg = ml_collections.ConfigDict()
    cfg.partitioning = ml_collections.ConfigDict()
    cfg.partitioning.rules = (("batch", ("data", "fsdp")), ("embed", None))
    assert partitioning.logical_rules(cfg) == (("batch", ("data", "fsdp")), ("embed", None))
    assert partitioning.logical_rules(None) == partitioning.DEFAULT_RULES
    cfg.partitioning.rules = (("embed", "model"),)
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        partitioning.logical_rules(cfg)


def test_meshes_shardings_and_batch_errors_on_8_devices():
    out = run_with_devices(
        """
        import json
        import flax.linen as nn, jax, jax.numpy as jnp, ml_collections, numpy as np
        from muse_jax import partitioning as pt

        def cfg(d, f, t):
            return ml_collections.ConfigDict(dict(data=d, fsdp=f, tensor=t))

        res = {}
        res["shapes"] = [dict(pt.make_mesh(cfg(*s)).shape) for s in [(-1, 1, 1), (1, -1, 1), (2, 2, 2), (-1, 1, 4)]]
        try:
            pt.make_mesh(cfg(3, -1, 1))
        except ValueError as e:
            res["mesh_err"] = str(e)

        class M(nn.Module):
            @nn.compact
            def __call__(self, x):
                w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")), (16, 32))
                e = self.param("e", nn.with_logical_partitioning(nn.initializers.normal(), ("vocab", "embed")), (257, 16))
                return x @ w, e

        rules = pt.DEFAULT_RULES
        mesh = pt.make_mesh(cfg(2, 2, 2))
        abstract = jax.eval_shape(M().init, jax.random.key(0), jnp.ones((1, 16)))
        sh = pt.state_shardings(abstract, mesh, rules)
        res["w"] = str(sh["params"]["w"].spec)
        res["e"] = str(sh["params"]["e"].spec)   # 257 not divisible by tensor=2 -> unsharded
        params = jax.jit(lambda r: nn.unbox(M().init(r, jnp.ones((1, 16)))), out_shardings=sh)(jax.random.key(0))
        res["w_shards"] = len({str(s.index) for s in params["params"]["w"].addressable_shards})

        batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
        g = pt.shard_batch(batch, mesh)
        res["batch_spec"] = str(g["x"].sharding.spec)
        res["batch_equal"] = bool((np.asarray(g["x"]) == batch["x"]).all())
        res["batch_shard_rows"] = g["x"].addressable_shards[0].data.shape[0]
        try:
            pt.shard_batch({"x": np.zeros((6, 3), np.float32)}, mesh)
        except ValueError as e:
            res["batch_err"] = str(e)
        try:
            pt.shard_batch({"c": np.array(["a"] * 8)}, mesh)
        except ValueError as e:
            res["str_err"] = str(e)
        print("RESULT" + json.dumps(res))
        """
    )
    res = json.loads(out.split("RESULT", 1)[1])
    assert res["shapes"] == [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 2, "fsdp": 1, "tensor": 4},
    ]
    assert "multiple of 3" in res["mesh_err"]
    assert res["w"] == "P('fsdp', 'tensor')"
    assert res["e"] == "P(None, 'fsdp')"
    assert res["w_shards"] == 4  # 2 (fsdp) x 2 (tensor) distinct blocks
    assert res["batch_spec"] == "P(('data', 'fsdp'), None)"
    assert res["batch_equal"] and res["batch_shard_rows"] == 2
    assert "global batch size 6" in res["batch_err"] and "total size 4" in res["batch_err"]
    assert "'data': 2" in res["batch_err"]
    assert "non-numeric" in res["str_err"]
