"""Configs load by name or path, accept typed overrides, and refuse bad ones clearly."""
import pathlib

import pytest

from muse_jax import config as config_lib
from muse_jax.training import loop


def test_named_config_and_overrides():
    cfg = config_lib.load_config("shapes", ["--config.data.batch_size=64", "--config.data.source=procedural"])
    assert cfg.data.batch_size == 64 and cfg.data.source == "procedural"
    assert config_lib.load_config("paper:muse_3b").base.num_layers == 48
    assert config_lib.load_config("vqgan:f8").train_tokenizer.image_size == 512
    assert config_lib.load_config("vqgan_f16_8192").train_tokenizer.image_size == 256


def test_config_files_load_by_path_and_import_the_named_ones(tmp_path):
    own = tmp_path / "mine.py"
    own.write_text("from muse_jax.configs import shapes\n\n\ndef get_config(arg=None):\n"
                   "    c = shapes.get_config()\n    c.data.batch_size = int(arg or 7)\n    return c\n")
    assert config_lib.load_config(str(own)).data.batch_size == 7
    assert config_lib.load_config(f"{own}:9", ["--config.seed=3"]).data.batch_size == 9
    with pytest.raises(FileNotFoundError, match="no file"):
        config_lib.load_config(str(tmp_path / "missing.py"))


def test_named_configs_load_after_a_plain_install_from_any_directory(tmp_path):
    """`pip install .` (not editable) into a fresh target: the configs ship inside the package."""
    import os
    import shutil
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    src, target = tmp_path / "src", tmp_path / "site"  # a copy: the build writes build/ beside setup.py
    shutil.copytree(repo / "muse_jax", src / "muse_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(repo / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, cwd=tmp_path, capture_output=True)
    code = ("import muse_jax, muse_jax.config as c; assert 'site' in muse_jax.__file__, muse_jax.__file__; "
            "print(c.load_config('muse_3b').base.width, c.load_config('shapes').name, "
            "c.load_config('paper:superres_268m').superres.grid_size)")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True).stdout.split()
    assert out == ["2048", "shapes", "64"]


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


def test_paper_configs_are_variants_of_one_file():
    base, big, sr = (config_lib.load_config(n) for n in ("muse_632m", "muse_3b", "superres_268m"))
    assert (base.base.num_layers, base.base.width, big.base.num_layers, big.base.width) == (16, 1536, 48, 2048)
    assert (sr.superres.num_layers, sr.superres.num_lowres_layers, sr.superres.grid_size) == (32, 16, 64)
    for c, stage in ((base, "base"), (big, "base"), (sr, "superres")):
        assert (c[stage].codebook_size, c[stage].text_dim, c[stage].dtype) == (8192, 4096, "bfloat16")
        assert (c.train.batch_size, c.train.optimizer, c.text.encoder.d_model) == (512, "adafactor", 4096)
        # The shapes default's per-stage overrides (super-res batch 8, warm start from the base) are gone.
        t = loop.stage_config(c, stage).train
        assert (t.batch_size, t.num_steps, t.init_from) == (512, 1_000_000, "")
    with pytest.raises(ValueError, match="variant"):
        config_lib.load_config("paper:muse_9b")


def test_shapes_long_is_the_cascade_of_a_tokenizer_per_stage_with_a_curve():
    from muse_jax.models import vqgan
    from muse_jax.training import loop

    long, default = config_lib.load_config("shapes:long"), config_lib.load_config("shapes")
    assert config_lib.load_config("shapes_long").to_dict() == long.to_dict()
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.build_config("shapes:longer")
    # Each stage's tokens come from its own tokenizer, at the size its grid needs.
    for stage, px in (("base", 32), ("superres", 64)):
        tok = config_lib.tokenizer_config(long, long[stage].tokenizer)
        factor = vqgan.VQGANConfig.from_dict(tok.vqgan).factor
        assert long[stage].grid_size * factor == tok.train_tokenizer.image_size == px
        assert tok.train_tokenizer.lowres_every == 0
    assert long.superres.lowres_grid_size == long.base.grid_size == 16
    assert default.base.tokenizer == default.superres.tokenizer == "" and "tokenizers" not in default
    # The curve's checkpoints (k/4 of each stage's steps) are ones the stage keeps.
    points = long.quickstart.curve_points
    for stage in ("base", "superres"):
        t = loop.stage_config(long, stage).train
        for k in range(1, points + 1):
            step = t.num_steps * k // points
            assert t.num_steps * k % points == 0 and step % t.keep_every == 0 and step % t.checkpoint_every == 0
