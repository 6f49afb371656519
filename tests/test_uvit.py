"""The Flax UVit2D (aMUSEd transformer) against diffusers' `UVit2DModel`, sharded, and its loader's errors."""
import json

import jax
import numpy as np
import pytest
from _multidevice import run_with_devices

from muse_jax.models import uvit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Small configs: hidden_size != block_out_channels exercises the attention blocks' kv_mapper; the second
# has the 2x2 down / up-sampling, biases everywhere and no kv_mapper. micro_cond_embed_dim is the width of
# all 5 sinusoidal micro-conditions together: 5 * micro_cond_encode_dim.
SMALL = dict(
    hidden_size=32, block_out_channels=24, in_channels=16, num_res_blocks=2, num_hidden_layers=2,
    num_attention_heads=4, block_num_heads=2, codebook_size=32, vocab_size=40, micro_cond_encode_dim=8,
    micro_cond_embed_dim=40, cond_embed_dim=24, encoder_hidden_size=20, intermediate_size=48, sample_size=8,
)
UPDOWN = dict(SMALL, block_out_channels=32, num_res_blocks=1, downsample=True, upsample=True, use_bias=True)
GRID, TEXT_LEN = 8, 7


def _torch_model(kwargs, seed=0):
    """A diffusers UVit2DModel with every parameter moved off its init (norm scales != 1, GRN != 0)."""
    torch.manual_seed(seed)
    model = diffusers.UVit2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(config, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.codebook_size, (batch, GRID, GRID))
    tokens[rng.random(tokens.shape) < 0.4] = config.mask_token_id
    enc = rng.normal(size=(batch, TEXT_LEN, config.encoder_hidden_size)).astype(np.float32)
    pooled = rng.normal(size=(batch, config.cond_embed_dim)).astype(np.float32)
    micro = np.tile(np.array([[256, 256, 0, 0, 6], [512, 384, 10, 3, 5.5]], np.float32), (batch // 2 + 1, 1))[:batch]
    return tokens, enc, pooled, micro


def _relative_error(kwargs, params_fn):
    model = _torch_model(kwargs)
    config = uvit.UVit2DConfig.from_diffusers(dict(model.config))
    tokens, enc, pooled, micro = _inputs(config)
    with torch.no_grad():
        ref = model(*(torch.tensor(x) for x in (tokens, enc, pooled, micro))).numpy()  # [B, K, g, g]
    ref = ref.transpose(0, 2, 3, 1).reshape(ref.shape[0], GRID * GRID, -1)  # row-major: [b, i*g + j, k]
    cfg, params = params_fn(model, config)
    out = jax.jit(uvit.UVit2D(cfg).apply)({"params": params}, tokens.reshape(len(tokens), -1), enc, pooled, micro)
    assert out.shape == ref.shape and out.dtype == np.float32
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def test_parity_with_diffusers():
    err = _relative_error(SMALL, lambda m, c: (c, uvit.convert_diffusers(m.state_dict(), c)))
    print(f"max relative error (no down/up-sampling): {err:.2e}")
    assert err <= 1e-4


def test_parity_updown_through_saved_folder(tmp_path):
    def load(model, config):
        model.save_pretrained(tmp_path)
        assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
        cfg, params = uvit.load_diffusers_dir(tmp_path)
        assert cfg == config
        # The same tree (and logical names) as a fresh init.
        assert jax.tree.structure(params) == jax.tree.structure(uvit.abstract_params(cfg))
        return cfg, params

    err = _relative_error(UPDOWN, load)
    print(f"max relative error (down/up-sampling, via save_pretrained): {err:.2e}")
    assert err <= 1e-4


def test_config_and_loader_details(tmp_path):
    cfg = uvit.UVit2DConfig()
    assert cfg.mask_token_id == 8255 and cfg.num_micro_conds == 5
    assert uvit.UVit2DConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = {"_class_name": "UVit2DModel", "_diffusers_version": "0.25.0", **SMALL}
    assert uvit.UVit2DConfig.from_diffusers(d, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="num_layers"):
        uvit.UVit2DConfig.from_diffusers({**d, "num_layers": 3})
    with pytest.raises(FileNotFoundError, match="config.json"):
        uvit.load_diffusers_dir(tmp_path / "nothing")
    small = uvit.UVit2DConfig(**SMALL)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        uvit.load_diffusers_dir(tmp_path)
    # PyTorch .bin weights (torch is installed here).
    model = _torch_model(SMALL)
    model.save_pretrained(tmp_path, safe_serialization=False)
    _, params = uvit.load_diffusers_dir(tmp_path)
    np.testing.assert_array_equal(params["embed"]["embeddings"]["embedding"],
                                  model.state_dict()["embed.embeddings.weight"].numpy())
    assert uvit.num_params(small) == sum(p.numel() for p in model.parameters())


def test_convert_errors_name_the_key():
    config = uvit.UVit2DConfig(**SMALL)
    state = {k: v.numpy() for k, v in _torch_model(SMALL).state_dict().items()}
    missing = dict(state)
    del missing["transformer_layers.1.attn2.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['transformer_layers.1.attn2.to_k.weight'\]"):
        uvit.convert_diffusers(missing, config)
    wrong = dict(state, **{"embed.embeddings.weight": np.zeros((41, 16), np.float32)})
    with pytest.raises(ValueError, match=r"embed.embeddings.weight: shape \(41, 16\), expected \(40, 16\)"):
        uvit.convert_diffusers(wrong, config)
    extra = dict(state, **{"down_block.downsample.conv.weight": np.zeros((24, 24, 2, 2), np.float32)})
    with pytest.raises(ValueError, match="unexpected keys .*down_block.downsample.conv.weight"):
        uvit.convert_diffusers(extra, config)


def test_bfloat16_close_to_float32():
    config = uvit.UVit2DConfig(**SMALL)
    params = uvit.convert_diffusers(_torch_model(SMALL).state_dict(), config)
    tokens, enc, pooled, micro = _inputs(config)
    run = lambda cfg: np.asarray(jax.jit(uvit.UVit2D(cfg).apply)(  # noqa: E731
        {"params": params}, tokens.reshape(2, -1), enc, pooled, micro))
    f32 = run(config)
    bf16 = run(uvit.UVit2DConfig(**SMALL, dtype="bfloat16"))
    assert bf16.dtype == np.float32
    # bf16 rounding (~4e-3 relative) moves these random-weight logits by a few percent, as much as
    # perturbing the float32 parameters by 4e-3 does; a wrong bf16 path would be far off.
    err = np.abs(bf16 - f32).max() / np.abs(f32).max()
    print(f"bfloat16 vs float32 max relative difference: {err:.3f}")
    assert err <= 0.1


SHARDED = """
import flax.linen as nn
import jax
import numpy as np
from muse_jax.models import uvit
from muse_jax import partitioning

# Widths divisible by fsdp=8 and tensor=2; batch 8 divides both meshes' batch axes.
cfg = uvit.UVit2DConfig(hidden_size=32, block_out_channels=24, in_channels=16, num_res_blocks=1,
                        num_hidden_layers=2, num_attention_heads=4, block_num_heads=2, codebook_size=32,
                        vocab_size=40, micro_cond_encode_dim=8, micro_cond_embed_dim=40, cond_embed_dim=24,
                        encoder_hidden_size=16, intermediate_size=48, downsample=True, upsample=True)
rng = np.random.default_rng(0)
params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32),
                      nn.unbox(uvit.init_params(cfg, jax.random.key(0))))
b, g = 8, 8
tokens = rng.integers(0, cfg.vocab_size, (b, g * g)).astype(np.int32)
enc = rng.normal(size=(b, 5, cfg.encoder_hidden_size)).astype(np.float32)
pooled = rng.normal(size=(b, cfg.cond_embed_dim)).astype(np.float32)
micro = np.tile(np.array([[256, 256, 0, 0, 6]], np.float32), (b, 1))
model = uvit.UVit2D(cfg)
forward = lambda p, *x: model.apply({"params": p}, *x)
ref = np.asarray(jax.jit(forward)(params, tokens, enc, pooled, micro))
abstract = jax.eval_shape(lambda: uvit.init_params(cfg, jax.random.key(0)))
for mesh_cfg in ({"data": 1, "fsdp": 8, "tensor": 1}, {"data": 4, "fsdp": 1, "tensor": 2}):
    mesh, rules = partitioning.make_mesh(mesh_cfg), partitioning.DEFAULT_RULES
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    sharded = jax.device_put(params, shardings)
    split = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(sharded)
             if not x.sharding.is_fully_replicated]
    assert split, mesh_cfg
    batch = partitioning.shard_batch({"t": tokens, "e": enc, "p": pooled, "m": micro}, mesh, rules)
    with partitioning.axis_rules(mesh, rules):
        out = jax.jit(forward)(sharded, batch["t"], batch["e"], batch["p"], batch["m"])
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    print(f"{mesh_cfg}: {len(split)} split parameters, max relative error {err:.2e}")
    assert err <= 1e-5, (mesh_cfg, err)
print("OK")
"""


def test_sharded_equals_single_device():
    out = run_with_devices(SHARDED, n=8)
    print(out)
    assert "OK" in out
