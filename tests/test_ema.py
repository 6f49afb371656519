"""Offline EMA over checkpoints (`muse-jax ema`): kept checkpoints, the average, what sampling loads."""
import json
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

from muse_jax import cascade, cli, workdir
from muse_jax.config import load_config
from muse_jax.data import stage_data, text
from muse_jax.data.shapes import make_example
from muse_jax.training import ema, loop

OVERRIDES = [
    "--config.base.codebook_size=64", "--config.base.grid_size=4", "--config.base.num_layers=1",
    "--config.base.width=32", "--config.base.mlp_dim=64", "--config.base.num_heads=4", "--config.base.text_dim=32",
    "--config.text.max_length=8", "--config.text.encoder.vocab_size=32", "--config.text.encoder.d_model=32",
    "--config.text.encoder.d_kv=8", "--config.text.encoder.d_ff=32", "--config.text.encoder.num_layers=1",
    "--config.text.encoder.num_heads=4", "--config.train.batch_size=8", "--config.train.warmup_steps=1",
    "--config.train.lr=1e-2", "--config.train.log_every=1", "--config.train.sample_every=0",
    # 5 steps, checkpoints at 2, 4 and 5 (the end); kept: the newest and the multiples of 2
    "--config.train.num_steps=5", "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=1",
    "--config.train.keep_every=2",
    "--config.train.ema_decay=0.5",  # an online EMA too: the offline one wins
]

# test_train.py's persistent XLA cache (the training loop turns it on): reruns skip compilation.
CACHE = pathlib.Path(tempfile.gettempdir()) / f"muse_jax_test_xla_cache_{os.getuid()}"
pytestmark = pytest.mark.usefixtures("restore_jax_cache_config")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    w = tmp_path_factory.mktemp("ema")
    config = load_config("shapes", [*OVERRIDES, f"--config.train.compilation_cache_dir={CACHE}"])
    loop.train_stage(config, w, "base", data=stage_data.synthetic(config, "base", num=64, text_length=8), quiet=True)
    captions = [make_example(0, "train", i)["caption"] for i in range(50)]
    text.train_sentencepiece(captions, w / workdir.SPM_MODEL, 64)  # Stage.from_workdir reads it
    return w


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def _numpy_ema(w, steps, decay):
    out = None
    for s in steps:
        p = _flat(workdir.load_stage(w, "base", step=s, use_ema=False)[1])
        out = p if out is None else {k: decay * out[k] + (1 - decay) * p[k] for k in p}
    return out


def test_keep_every_keeps_the_multiples_besides_the_newest(trained):
    assert workdir.checkpoint_steps(trained, "base") == [2, 4, 5]


def test_offline_ema_matches_numpy_and_sampling_loads_it(trained):
    got, meta = ema.run(trained, "base", decay=0.7, every=2)
    assert meta == {"decay": 0.7, "every": 2, "steps": [2, 4]}
    assert json.loads((trained / "base" / workdir.EMA_FILE).read_text()) == meta
    want = _numpy_ema(trained, [2, 4], 0.7)
    _assert_close(_flat(got), want)

    # Sampling loads it, in place of the EMA kept in the checkpoints; the newer step 5 is named.
    with pytest.warns(UserWarning, match="offline EMA ends at step 4, the newest checkpoint is step 5"):
        stage = cascade.Stage.from_workdir(trained, "base")
    _assert_close(_flat(stage.params), want)
    online = _flat(workdir.load_stage(trained, "base", step=5)[1])  # an explicit step: the checkpoint's
    assert not np.allclose(online["['decoder']['block_0']['mlp']['wi']['kernel']"],
                           want["['decoder']['block_0']['mlp']['wi']['kernel']"])
    # Without ema.json, the checkpoints again (the online EMA of the newest).
    shutil.move(trained / "base" / workdir.EMA_FILE, trained / "ema.json.away")
    try:
        _assert_close(_flat(workdir.load_stage(trained, "base")[1]), online)
    finally:
        shutil.move(trained / "ema.json.away", trained / "base" / workdir.EMA_FILE)


def test_cli_and_clear_errors(trained, tmp_path, capsys):
    assert cli.main(["ema", "--workdir", str(trained), "--stage", "base", "--every", "2", "--decay", "0.5"]) == 0
    assert "steps [2, 4]" in capsys.readouterr().out
    assert workdir.ema_meta(trained, "base")["decay"] == 0.5
    with pytest.warns(UserWarning, match="offline EMA"):
        _, params, _ = workdir.load_stage(trained, "base")
    _assert_close(_flat(params), _numpy_ema(trained, [2, 4], 0.5))

    for args, message in ((["--decay", "1"], "strictly between 0 and 1"),
                          (["--every", "4"], "1 kept checkpoint"),  # only step 4
                          (["--every", "3"], "0 kept checkpoint")):
        assert cli.main(["ema", "--workdir", str(trained), "--stage", "base", *args]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["ema", "--workdir", str(tmp_path), "--stage", "base"]) == 2
    assert "no trained base stage" in capsys.readouterr().err
    (tmp_path / "base").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        ema.run(tmp_path, "base")
    assert workdir.ema_meta(trained, "base")["decay"] == 0.5  # a refused run leaves the EMA as it was
