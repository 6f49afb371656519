"""Tokens computed inside the train step equal the host tokenizer's; a tokenizer per stage and its checks."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from muse_jax import config as config_lib
from muse_jax import image_ops, partitioning
from muse_jax import workdir as workdir_lib
from muse_jax.models import vqgan
from muse_jax.training import online

TINY_VQGAN = dict(channels=(8, 8, 8), num_res_blocks=1, latent_channels=8, code_dim=8, codebook_size=64,
                  norm_groups=4)


def _config():
    cfg = config_lib.load_config("shapes")
    cfg.vqgan.update(TINY_VQGAN)
    for stage in ("base", "superres"):
        cfg[stage].codebook_size = 64
    return cfg


def _tokenizer(cfg, seed=0, **changes):
    vcfg = vqgan.VQGANConfig.from_dict({**cfg.vqgan.to_dict(), **changes})
    # Random parameters of the right shapes (an init would compile or run op by op: tens of seconds here).
    abstract = jax.eval_shape(lambda: nn.unbox(vqgan.init_params(vcfg, jax.random.key(0), 64)))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
    return vqgan.ImageTokenizer(vcfg, params)


def test_in_step_tokens_equal_the_host_tokenizers():
    cfg = _config()
    tok = _tokenizer(cfg)
    mesh = partitioning.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = partitioning.logical_rules(cfg)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tokenizers = {"base": tok, "superres": tok}
    assert online.Prepare.build(cfg, "base", tokenizers, mesh=mesh, rules=rules).image_size == 32
    prep = online.Prepare.build(cfg, "superres", tokenizers, mesh=mesh, rules=rules)
    assert prep.image_size == 64
    out = jax.jit(prep.fn)(prep.frozen, {"image": images, "text_mask": np.ones((2, 3), bool)})
    assert "image" not in out and out["text_mask"].shape == (2, 3)
    # the super-res stage's tokens, and its low-res tokens (the base stage's) of the images area-downsampled
    np.testing.assert_array_equal(out["tokens"], np.asarray(tok.encode(images)).reshape(2, -1))
    low = np.asarray(tok.encode(image_ops.downsample_area(images, 2))).reshape(2, -1)
    np.testing.assert_array_equal(out["lowres_tokens"], low)
    # the rounded area mean is image_ops.downsample_area's, to the pixel
    np.testing.assert_array_equal(online.downsample_area_in_step(images, 4), image_ops.downsample_area(images, 4))


def test_stage_tokenizer_checks_and_named_tokenizer_sections():
    cfg = _config()
    mesh = partitioning.make_mesh(cfg.mesh, jax.devices()[:1])
    rules = partitioning.logical_rules(cfg)
    wrong = _tokenizer(cfg, codebook_size=32)
    with pytest.raises(ValueError, match="has 32 codes; config.base.codebook_size is 64"):
        online.Prepare.build(cfg, "base", {"base": wrong}, mesh=mesh, rules=rules)
    cfg.superres.lowres_grid_size = 4
    tok = _tokenizer(cfg)
    with pytest.raises(ValueError, match="lowres_grid_size=4 is not config.base.grid_size=8"):
        online.Prepare.build(cfg, "superres", {"base": tok, "superres": tok}, mesh=mesh, rules=rules)

    smoke = config_lib.load_config("smoke")
    sr = config_lib.tokenizer_config(smoke, "superres")
    assert sr.train_tokenizer.image_size == 128 and sr.vqgan.channels == (16, 32, 32, 32)
    assert smoke.train_tokenizer.image_size == 64  # the config itself is not changed
    assert config_lib.tokenizer_config(smoke, "") is smoke
    with pytest.raises(ValueError, match="config.tokenizers.nope: no such tokenizer"):
        config_lib.tokenizer_config(smoke, "nope")
    with smoke.unlocked():
        smoke.tokenizers.base.vqgan.widths = (1, 2)
    with pytest.raises(ValueError, match="config.tokenizers.base.vqgan.widths: no such field"):
        config_lib.tokenizer_config(smoke, "base")
    assert str(workdir_lib.tokenizer_dir("W", "base")) == "W/tokenizer/base"
    with pytest.raises(ValueError, match="tokenizer name"):
        workdir_lib.tokenizer_dir("W", "../x")
    with pytest.raises(FileNotFoundError, match="--tokenizer superres"):
        workdir_lib.load_image_tokenizer("W-missing", name="superres")


def test_paper_configs_have_real_data_and_a_tokenizer_per_stage():
    for name, px in (("muse_632m", 256), ("muse_3b", 256), ("superres_268m", 512)):
        cfg = config_lib.load_config(name)
        assert cfg.data.source == "webdataset" and cfg.data.image_size == px and cfg.data.train_files == ""
        assert (cfg.base.tokenizer, cfg.superres.tokenizer) == ("base", "superres")
        base, sr = (config_lib.tokenizer_config(cfg, n) for n in ("base", "superres"))
        f = lambda c: 2 ** (len(c.vqgan.channels) - 1)  # noqa: E731
        assert (base.train_tokenizer.image_size, f(base), base.vqgan.codebook_size) == (256, 16, 8192)
        assert (sr.train_tokenizer.image_size, f(sr), sr.vqgan.codebook_size) == (512, 8, 8192)
        assert cfg.base.grid_size * f(base) == 256
        if name == "superres_268m":
            assert cfg.superres.grid_size * f(sr) == 512 and cfg.superres.lowres_grid_size == cfg.base.grid_size


def test_a_frozen_t5_needs_its_checkpoint_and_sentencepiece_model(tmp_path):
    from muse_jax.data import stage_data

    cfg = config_lib.load_config("shapes", ["--config.text.trainable=False"])
    with pytest.raises(ValueError, match="needs config.text.checkpoint"):
        stage_data.frozen_text_embeddings(cfg, None, ["a caption"], tmp_path)
    with pytest.raises(ValueError, match="needs config.text.spm_model"):
        workdir_lib.text_tokenizer(tmp_path, cfg.text, captions=lambda: ["a caption"])
    assert not (tmp_path / "text").exists()  # no vocabulary was trained for the pretrained T5



LEAK = """
import gc
import sys
sys.path.insert(0, "tests")
import flax.linen as nn
import jax
import numpy as np
from test_online import _config, _tokenizer
from muse_jax.models import t5
from muse_jax import partitioning
from muse_jax.training import online

cfg = _config()
cfg.text.trainable = False
module = t5.T5Encoder(t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
ids = np.ones((1, int(cfg.text.max_length)), np.int32)
params = jax.tree_util.tree_map(jax.numpy.asarray, nn.unbox(module.init(jax.random.key(0), ids)["params"]))
shapes = {{tuple(x.shape) for x in jax.tree_util.tree_leaves(params) if x.size >= 64 * 32}}  # on device 0, as loaded
mesh = partitioning.make_mesh({{"data": 1, "fsdp": -1, "tensor": 1}})
rules = partitioning.logical_rules(cfg)
if {text_only}:
    prep = online.Prepare.text_only(cfg, (module, params), mesh=mesh, rules=rules)
else:
    prep = online.Prepare.build(cfg, "base", {{"base": _tokenizer(cfg)}}, mesh=mesh, rules=rules,
                                text_encoder=(module, params))
del params
gc.collect()
live = [x for x in jax.live_arrays() if tuple(x.shape) in shapes]
print(sum(len(x.sharding.device_set) == 1 for x in live), sum(len(x.sharding.device_set) > 1 for x in live))
"""


@pytest.mark.parametrize("text_only", [True, False])
def test_no_device_keeps_a_whole_frozen_t5_once_the_step_input_is_built(text_only):
    """The loader's T5 parameters (on one device) are placed sharded, and the step input keeps no reference
    to them: only the sharded copies stay alive."""
    from _multidevice import run_with_devices

    whole, sharded = map(int, run_with_devices(LEAK.format(text_only=text_only), n=4).split())
    assert sharded > 0 and whole == 0
