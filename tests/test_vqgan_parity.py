"""Parity with diffusers' VQModel (the aMUSEd / open-muse VQGAN layout), random weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from muse_jax.models import vqgan, vqgan_diffusers  # noqa: E402


def _diffusers_model(mid_attention: bool, num_levels: int = 3):
    torch.manual_seed(0)
    model = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_levels,
        up_block_types=("UpDecoderBlock2D",) * num_levels,
        block_out_channels=(32, 64, 64)[:num_levels] if num_levels <= 3 else (32,) * num_levels,
        layers_per_block=1,
        latent_channels=16,
        vq_embed_dim=8,
        num_vq_embeddings=64,
        norm_num_groups=8,
        mid_block_add_attention=mid_attention,
    ).eval()
    with torch.no_grad():
        # A well-spread codebook (the default init is uniform in +-1/K), and non-trivial norms.
        model.quantize.embedding.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("mid_attention,num_levels", [(True, 3), (False, 5)])
def test_diffusers_vqmodel_parity(mid_attention, num_levels):
    model = _diffusers_model(mid_attention, num_levels)
    cfg = vqgan_diffusers.config_from_diffusers(model.config)
    assert cfg.factor == 2 ** (num_levels - 1) and cfg.mid_attention == mid_attention
    size = 4 * cfg.factor
    params = vqgan_diffusers.load_diffusers(model.state_dict(), cfg, image_size=size)

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        h = model.encode(torch.from_numpy(x)).latents
        _, _, (_, _, ref_idx) = model.quantize(h)
        ref_idx = ref_idx.reshape(2, size // cfg.factor, size // cfg.factor).numpy()
        ref_img = model.decode(h).sample.numpy().transpose(0, 2, 3, 1)

    m = vqgan.VQGAN(cfg)
    # Latents agree closely, and no latent is near a tie between two codes.
    lat = m.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), method=vqgan.VQGAN.encode_latents)
    np.testing.assert_allclose(np.asarray(lat), h.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    tokens = jax.jit(lambda p, im: m.apply({"params": p}, im, method=vqgan.VQGAN.encode))(
        params, jnp.asarray(x.transpose(0, 2, 3, 1))
    )
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens), ref_idx)
    assert len(np.unique(ref_idx)) > 1

    img = jax.jit(lambda p, t: m.apply({"params": p}, t, method=vqgan.VQGAN.decode))(params, tokens)
    rel = np.linalg.norm(np.asarray(img) - ref_img) / np.linalg.norm(ref_img)
    assert rel <= 1e-4, rel


def test_load_diffusers_rejects_mismatched_weights():
    model = _diffusers_model(True)
    cfg = vqgan_diffusers.config_from_diffusers(model.config, mid_attention=False)
    with pytest.raises(ValueError, match="unexpected"):
        vqgan_diffusers.load_diffusers(model.state_dict(), cfg, image_size=16)
    cfg = vqgan_diffusers.config_from_diffusers(model.config)
    sd = dict(model.state_dict())
    del sd["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match="missing.*decoder/conv_out/bias"):
        vqgan_diffusers.load_diffusers(sd, cfg, image_size=16)


def test_import_into_a_workdir_as_a_named_tokenizer(tmp_path, capsys):
    """`muse-jax import-tokenizer`: the saved VQModel becomes W/tokenizer/base, encoding as diffusers does."""
    from muse_jax import cli
    from muse_jax import workdir as workdir_lib

    model = _diffusers_model(False, 3)
    model.save_pretrained(str(tmp_path / "vq"))
    w = tmp_path / "W"
    args = ["import-tokenizer", "--workdir", str(w), "--diffusers", str(tmp_path / "vq"), "--tokenizer", "base",
            "--image-size", "32"]
    assert cli.main(args) == 0
    assert "f4, 64 codes, 32 px" in capsys.readouterr().out
    tok = workdir_lib.load_image_tokenizer(w, name="base")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        h = model.encode(torch.from_numpy(x.astype(np.float32) / 255).permute(0, 3, 1, 2)).latents
        ref = model.quantize(h)[2][2].reshape(2, 8, 8).numpy()
    np.testing.assert_array_equal(np.asarray(tok.encode(x)), ref)
    assert cli.main(args) == 2 and "already holds a tokenizer" in capsys.readouterr().err
