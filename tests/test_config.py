"""Configs load by name or path, accept typed overrides, and refuse bad ones clearly."""
import pytest

from muse_jax import config as config_lib
from muse_jax.training import loop


def test_named_config_and_overrides():
    cfg = config_lib.load_config("shapes", ["--config.data.batch_size=64", "--config.data.source=procedural"])
    assert cfg.data.batch_size == 64 and cfg.data.source == "procedural"
    assert config_lib.load_config("configs/shapes.py").data.batch_size == 32


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="no field"):
        config_lib.load_config("shapes", ["--config.data.bogus=1"])


def test_wrong_type_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        config_lib.load_config("shapes", ["--config.data.batch_size=abc"])


def test_unknown_config_and_stray_arguments_are_refused():
    with pytest.raises(FileNotFoundError, match="named configs"):
        config_lib.load_config("nope")
    with pytest.raises(ValueError, match="overrides look like"):
        config_lib.load_config("shapes", ["--batch_size=3"])


def test_config_is_locked():
    cfg = config_lib.load_config("shapes")
    with pytest.raises(AttributeError):
        cfg.data.batchsize = 3


def test_paper_configs_share_one_helper_which_is_not_a_config():
    base, big, sr = (config_lib.load_config(n) for n in ("muse_632m", "muse_3b", "superres_268m"))
    assert (base.base.num_layers, base.base.width, big.base.num_layers, big.base.width) == (16, 1536, 48, 2048)
    assert (sr.superres.num_layers, sr.superres.num_lowres_layers, sr.superres.grid_size) == (32, 16, 64)
    for c, stage in ((base, "base"), (big, "base"), (sr, "superres")):
        assert (c[stage].codebook_size, c[stage].text_dim, c[stage].dtype) == (8192, 4096, "bfloat16")
        assert (c.train.batch_size, c.train.optimizer, c.text.encoder.d_model) == (512, "adafactor", 4096)
        # The shapes default's per-stage overrides (super-res batch 8, warm start from the base) are gone.
        t = loop.stage_config(c, stage).train
        assert (t.batch_size, t.num_steps, t.init_from) == (512, 1_000_000, "")
    with pytest.raises(ValueError, match="shared helpers, not a config"):
        config_lib.load_config("_paper")
