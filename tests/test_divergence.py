"""Divergence guard (NaN, loss or parameter blow-up) with a health record, and Ctrl-C as a preemption."""
import json
import os
import signal

import numpy as np
import pytest
from test_train import _data, _params, tiny_config

from muse_jax import checkpoint as ckpt_lib
from muse_jax.training import loop

# The training loop turns on JAX's persistent compilation cache (config.train.compilation_cache_dir).
pytestmark = pytest.mark.usefixtures("restore_jax_cache_config")


def test_guard_flags_nan_and_blow_ups_against_the_runs_history():
    guard = ckpt_lib.DivergenceGuard(loss_factor=10, param_factor=10, start_param_norm=5.0, min_history=3)
    for step, loss in enumerate([8.0, 6.0, 5.0, 40.0], 1):  # 40 < 10 x the median 6
        guard.check(step, {"loss": loss, "grad_norm": 1.0, "param_norm": 20.0})
    assert guard.last == {"loss": 40.0, "param_norm": 20.0}
    with pytest.raises(ckpt_lib.DivergenceError, match="loss 1000 at step 5 is over 10 x 7, the median"):
        guard.check(5, {"loss": 1000.0, "param_norm": 20.0})
    assert guard.failed_step == 5
    with pytest.raises(ckpt_lib.DivergenceError, match="param_norm 51 at step 6 is over 10 x 5"):
        guard.check(6, {"loss": 5.0, "param_norm": 51.0})
    with pytest.raises(ckpt_lib.NonFiniteError, match="grad_norm is inf at step 7"):
        guard.check(7, {"loss": 5.0, "grad_norm": np.inf})
    # Too little history for a median yet; and a factor of 0 turns its check off.
    ckpt_lib.DivergenceGuard(loss_factor=10, param_factor=10, start_param_norm=1.0).check(1, {"loss": 1e6})
    off = ckpt_lib.DivergenceGuard(loss_factor=0, param_factor=0, start_param_norm=1.0, min_history=1)
    for step, loss in enumerate([1.0, 1e6], 1):
        off.check(step, {"loss": loss, "param_norm": 1e9})
    with pytest.raises(ckpt_lib.NonFiniteError):
        off.check(3, {"loss": np.nan})


def test_diverging_run_names_the_last_healthy_checkpoint_and_resumes_from_it(tmp_path):
    sane = ("--config.train.num_steps=8", "--config.train.checkpoint_every=2")
    cfg = tiny_config(*sane)
    loop.train_stage(cfg, tmp_path, "base", data=_data(cfg), stop_at=4, quiet=True)

    # An absurd learning rate from step 5 on: the parameters blow up and the run stops before saving them.
    absurd = tiny_config(*sane, "--config.train.lr=1e6")
    with pytest.raises(ckpt_lib.DivergenceError) as e:
        loop.train_stage(absurd, tmp_path, "base", data=_data(cfg), quiet=True)
    msg = str(e.value)
    assert "param_norm" in msg and "at step 5" in msg and "last good checkpoint: step 4" in msg, msg
    assert f"muse-jax train --workdir {tmp_path} --stage base" in msg and "--config.train.lr=<below the 1e+06 it diverged with>" in msg, msg
    assert "\n" not in msg
    ckpt_dir = tmp_path / "base" / "checkpoints"
    assert ckpt_lib.Checkpointer(ckpt_dir).all_steps() == [2, 4]
    health = json.loads((tmp_path / "base" / "health.json").read_text())
    assert sorted(health) == ["2", "4", "5"]
    assert health["4"]["healthy"] and health["4"]["checkpoint"] and np.isfinite(health["4"]["param_norm"])
    assert not health["5"]["healthy"] and not health["5"]["checkpoint"]

    # The documented command (a plain resume at a sane rate) continues from step 4 with finite losses.
    r = loop.train_stage(cfg, tmp_path, "base", data=_data(cfg), quiet=True)
    assert r["final_step"] == 8 and sorted(r["losses"]) == [5, 6, 7, 8]
    assert all(np.isfinite(v) for v in r["losses"].values())
    assert all(health["healthy"] for health in ckpt_lib.read_health(tmp_path / "base" / "health.json").values()
               if health["checkpoint"])

    # Diverging before the first checkpoint: the message says there is none, and the next run starts over.
    with pytest.raises(ckpt_lib.DivergenceError, match="no checkpoint was saved before it.*Retrain from scratch"):
        loop.train_stage(absurd, tmp_path / "fresh", "base", data=_data(cfg), quiet=True)
    assert not ckpt_lib.Checkpointer(tmp_path / "fresh" / "base" / "checkpoints").all_steps()


def test_a_loss_blow_up_stops_the_run(tmp_path, monkeypatch):
    """The loss check, inside the loop: step 13's loss (and later ones) reported 1000 times larger."""
    real = loop.step_lib.make_train_step

    def make_train_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(state, batch, rng):
            state, metrics = step(state, batch, rng)
            if int(state.step) >= 13:
                metrics = dict(metrics, loss=metrics["loss"] * 1000)
            return state, metrics

        return run

    monkeypatch.setattr(loop.step_lib, "make_train_step", make_train_step)
    cfg = tiny_config("--config.train.num_steps=16", "--config.train.checkpoint_every=4")
    with pytest.raises(ckpt_lib.DivergenceError, match=r"loss .* at step 13 is over 10 x .*last good checkpoint: step 12"):
        loop.train_stage(cfg, tmp_path, "base", data=_data(cfg), quiet=True)


def _interrupt_at(monkeypatch, at_step):
    """Sends SIGINT (Ctrl-C) while the batch of step `at_step` is prepared."""
    calls = {"n": 0}
    real = loop.partitioning.shard_batch

    def shard_batch(batch, mesh, rules=None):
        calls["n"] += 1
        if calls["n"] == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(batch, mesh, rules)

    monkeypatch.setattr(loop.partitioning, "shard_batch", shard_batch)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config("--config.train.num_steps=8", "--config.train.checkpoint_every=2")
    full = loop.train_stage(cfg, tmp_path / "full", "base", data=_data(cfg), quiet=True)

    _interrupt_at(monkeypatch, 5)
    r = loop.train_stage(cfg, tmp_path / "int", "base", data=_data(cfg), quiet=True)
    assert r["status"] == "preempted" and r["final_step"] == 5
    ckpt_dir = tmp_path / "int" / "base" / "checkpoints"
    assert ckpt_lib.Checkpointer(ckpt_dir).all_steps() == [4, 5]
    assert not [p.name for p in ckpt_dir.iterdir() if "orbax-checkpoint-tmp" in p.name]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back

    monkeypatch.undo()
    # A save cut short by a kill leaves a temporary folder: the next run removes it.
    (ckpt_dir / "6.orbax-checkpoint-tmp-1234567").mkdir()
    resumed = loop.train_stage(cfg, tmp_path / "int", "base", data=_data(cfg), quiet=True)
    assert resumed["final_step"] == 8 and sorted(resumed["losses"]) == [6, 7, 8]
    for s in (6, 7, 8):
        assert resumed["losses"][s] == full["losses"][s]
    for a, b in zip(_params(full), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert not [p.name for p in ckpt_dir.iterdir() if "orbax-checkpoint-tmp" in p.name]


def test_a_second_ctrl_c_stops_at_once():
    with ckpt_lib.PreemptionHandler() as pre:
        os.kill(os.getpid(), signal.SIGINT)
        assert pre.requested and pre.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
