"""Checkpointer: bit-exact restore, data-iterator resume, corrupt fallback, other mesh, guards."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multidevice import run_with_devices

from muse_jax import checkpoint as ckpt_lib
from muse_jax.data import loader, shapes


def _state(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16),
        },
        "step": jnp.int32(seed),
    }


def _loader():
    return iter(loader.make_loader(shapes.ShapesSource("train", 64, 0), batch_size=4, seed=3))


def _equal(a, b):
    return all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_bit_exact_restore_keep_last_and_iterator_resume(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", save_every=2, keep=2)
    it = _loader()
    states = {}
    for step in range(1, 7):
        next(it)
        states[step] = _state(step)
        ck.save(step, states[step], data_iterator=it)
    expected_next = next(it)["index"]
    ck.close()
    assert ck.all_steps() == [4, 6]  # every 2 steps, keep the last 2

    ck2 = ckpt_lib.Checkpointer(tmp_path / "ck", save_every=2, keep=2)
    it2 = _loader()
    restored, step = ck2.restore(jax.tree.map(jnp.zeros_like, _state(0)), data_iterator=it2)
    assert step == 6 and _equal(restored, states[6])
    np.testing.assert_array_equal(next(it2)["index"], expected_next)
    older, step = ck2.restore(_state(0), step=4)
    assert step == 4 and _equal(older, states[4])


def test_parameters_alone_read_back_from_a_relative_path(tmp_path, monkeypatch):
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", save_every=1, keep=1)
    ck.save(3, _state(3), force=True)
    ck.close()
    monkeypatch.chdir(tmp_path)  # sample --workdir W with a relative W
    assert ckpt_lib.saved_fields("ck", 3) == {"params": 2, "step": 1}
    params, step = ckpt_lib.restore_subtree("ck", {"params": _state(0)["params"]})
    assert step == 3 and _equal(params["params"], _state(3)["params"])


def test_corrupt_newest_falls_back_and_missing_errors(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", save_every=1, keep=3)
    for step in (1, 2):
        ck.save(step, _state(step))
    ck.close()
    for f in (tmp_path / "ck" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", save_every=1, keep=3)
    restored, step = ck.restore(_state(0))
    assert step == 1 and _equal(restored, _state(1))
    assert ck.all_steps() == [1]  # the corrupt step was moved aside ...
    assert (tmp_path / "ck" / "2.corrupt").is_dir()
    assert ck.save(2, _state(5), force=True)  # ... so training can save step 2 again
    ck.close()

    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoints in"):
        ckpt_lib.Checkpointer(tmp_path / "empty").restore(_state(0))
    wrong = {"params": {"w": jnp.zeros((3, 8)), "b": jnp.zeros((8,), jnp.bfloat16)}, "step": jnp.int32(0)}
    with pytest.raises(ckpt_lib.CheckpointError, match="no readable checkpoint"):
        ckpt_lib.Checkpointer(tmp_path / "ck").restore(wrong)
    assert sorted(ckpt_lib.Checkpointer(tmp_path / "ck").all_steps()) == [1, 2]  # nothing moved


def test_restore_onto_another_mesh(tmp_path):
    code = """
        import json, sys
        import jax, jax.numpy as jnp, numpy as np, ml_collections
        from jax.sharding import NamedSharding, PartitionSpec as P
        from muse_jax import checkpoint as C, partitioning as pt
        mesh = pt.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
        w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("fsdp", "tensor")))
        b = jax.device_put(jnp.arange(8).astype(jnp.bfloat16), NamedSharding(mesh, P("tensor")))
        ck = C.Checkpointer(sys.argv[1], save_every=1)
        ck.save(1, {"w": w, "b": b}); ck.close()
        # restore onto a (1, 8, 1) mesh in this process
        mesh2 = pt.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)))
        tgt = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh2, P("fsdp"))),
               "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=NamedSharding(mesh2, P()))}
        r, _ = C.Checkpointer(sys.argv[1]).restore(tgt)
        print("RESULT" + json.dumps({"spec": str(r["w"].sharding.spec), "shape": dict(r["w"].sharding.mesh.shape),
              "ok": bool((np.asarray(r["w"]) == np.arange(64.0).reshape(8, 8)).all())}))
    """
    d = tmp_path / "ck"
    out = run_with_devices(code.replace("sys.argv[1]", repr(str(d))))
    res = json.loads(out.split("RESULT", 1)[1])
    assert res["ok"] and res["spec"] == "P('fsdp',)" and res["shape"]["fsdp"] == 8
    # and onto the single device of this process
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tgt = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=one),
           "b": jax.ShapeDtypeStruct((8,), jnp.bfloat16, sharding=one)}
    r, step = ckpt_lib.Checkpointer(d).restore(tgt)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(r["w"]), np.arange(64.0).reshape(8, 8))
    np.testing.assert_array_equal(np.asarray(r["b"], np.float32), np.arange(8))


def test_nonfinite_guard_and_sigterm_flag():
    ckpt_lib.check_finite({"loss": jnp.float32(1.0), "grad_norm": 2.0}, 3)
    with pytest.raises(ckpt_lib.NonFiniteError, match="loss is nan at step 7"):
        ckpt_lib.check_finite({"loss": jnp.float32(np.nan)}, 7)
    with pytest.raises(ckpt_lib.NonFiniteError, match="grad_norm is inf"):
        ckpt_lib.check_finite({"loss": 1.0, "grad_norm": np.inf}, 7)
    with ckpt_lib.PreemptionHandler() as pre:
        assert not pre.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert pre.requested and pre.should_stop()
    assert signal.getsignal(signal.SIGTERM) is not pre._handle
