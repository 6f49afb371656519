"""Flax CLIP: parity with Hugging Face `CLIPModel` (two layouts, both EOS rules), load_hf checks,
CLIP score, preprocessing and the presets' parameter counts."""
import functools
import json
import math

import jax
import numpy as np
import pytest

from muse_jax.models import clip

VOCAB, CONTEXT = 100, 16

# (vision, text) kwargs of two small random models: a B/32-like layout (patch 8 of 32, 4 x 4
# patches, exact gelu, legacy eos_token_id == 2) and an L/14-like one (patch 4, more layers
# and heads, quick_gelu, eos_token_id != 2: the first-occurrence rule).
LAYOUTS = {
    "b32_like": (dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, hidden_act="gelu"),
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      hidden_act="gelu", eos_token_id=2)),
    "l14_like": (dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=8, hidden_act="quick_gelu", layer_norm_eps=1e-6),
                 dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      hidden_act="quick_gelu", eos_token_id=VOCAB - 3)),
}


@functools.cache
def _hf_model(layout):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vision, text = LAYOUTS[layout]
    hc = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, pad_token_id=1, bos_token_id=0, **text),
        vision_config=vision, projection_dim=24,
    )
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.CLIPModel(hc).float().eval()
    with torch.no_grad():  # perturb everything (norms start at 1 / 0, biases at 0) so each mapping matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _features(out):
    """transformers 5.x returns an output object (projected features in pooler_output); 4.x a tensor."""
    return (out if hasattr(out, "numpy") else out.pooler_output).detach().numpy()


def _ids(eos):
    rng = np.random.default_rng(1)
    ids = rng.integers(3, VOCAB - 4, (3, CONTEXT))
    mask = np.ones(ids.shape, bool)
    ids[0, 0], ids[0, 11], mask[0, 12:] = 0, eos, False  # padded row; pad ids after the end token
    ids[1, 0], ids[1, -1] = 0, eos  # full row
    ids[2, 0], ids[2, 5], mask[2, 6:] = 0, eos, False
    if eos == 2:  # legacy rule: the largest id marks the end token (as 49407 does in CLIP's vocabulary)
        ids[0, 11], ids[1, -1], ids[2, 5] = VOCAB - 1, VOCAB - 1, VOCAB - 1
    else:  # first-occurrence rule: larger ids elsewhere, and end tokens repeated as padding
        ids[:, 2] = VOCAB - 1
        ids[0, 12:] = eos
    return ids, mask


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_parity(layout, tmp_path):
    import torch

    model = _hf_model(layout)
    cfg = clip.CLIPConfig.from_hf(model.config.to_dict())
    vision, text = LAYOUTS[layout]
    assert cfg.vision.patch_size == vision["patch_size"] and cfg.text.eos_token_id == text["eos_token_id"]
    assert cfg.vision.hidden_act == vision["hidden_act"] and cfg.projection_dim == 24

    model.save_pretrained(tmp_path)
    from_dir = clip.load_hf(tmp_path)  # config from config.json
    from_sd = clip.load_hf(model.state_dict(), cfg)
    assert jax.tree_util.tree_structure(from_dir) == jax.tree_util.tree_structure(from_sd)
    for a, b in zip(jax.tree_util.tree_leaves(from_dir), jax.tree_util.tree_leaves(from_sd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg_dir = clip.CLIPConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert cfg_dir == cfg

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)  # already normalised, NCHW for HF
    ids, mask = _ids(cfg.text.eos_token_id)
    with torch.no_grad():
        ref_img = _features(model.get_image_features(pixel_values=torch.tensor(pixels)))
        ref_txt = _features(model.get_text_features(input_ids=torch.tensor(ids),
                                                    attention_mask=torch.tensor(mask.astype(np.int64))))
    with jax.default_matmul_precision("highest"):
        img = np.asarray(clip.embed_images(from_dir, pixels.transpose(0, 2, 3, 1), config=cfg))
        txt = np.asarray(clip.embed_texts(from_dir, ids, mask, config=cfg))
    assert img.shape == (2, 24) and txt.shape == (3, 24)
    assert _rel_err(img, ref_img) < 1e-5, _rel_err(img, ref_img)
    assert _rel_err(txt, ref_txt) < 1e-5, _rel_err(txt, ref_txt)

    # uint8 path: host preprocessing, then the same tower as HF on those pixel values.
    images = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    pre = clip.preprocess_images(images, 32)
    assert pre.shape == (2, 32, 32, 3) and pre.dtype == np.float32
    with torch.no_grad():
        ref_u8 = _features(model.get_image_features(pixel_values=torch.tensor(pre.transpose(0, 3, 1, 2))))
    with jax.default_matmul_precision("highest"):
        img_u8 = np.asarray(clip.embed_images(from_dir, images, config=cfg))
    assert _rel_err(img_u8, ref_u8) < 1e-5


def test_preprocess_matches_definition_and_hf_processor():
    rng = np.random.default_rng(0)
    const = np.full((20, 30, 3), 200, np.uint8)  # resized constant stays constant
    out = clip.preprocess_image(const, 16)
    expect = (200 / 255 - np.asarray(clip.IMAGE_MEAN)) / np.asarray(clip.IMAGE_STD)
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out, np.broadcast_to(expect, out.shape), atol=1e-5)
    # No resize needed: only the centre crop (offset round(6 / 2) = 3 columns) and normalisation.
    img = rng.integers(0, 256, (32, 38, 3), dtype=np.uint8)
    crop = (img[:, 3:35].astype(np.float32) / 255 - np.asarray(clip.IMAGE_MEAN)) / np.asarray(clip.IMAGE_STD)
    np.testing.assert_allclose(clip.preprocess_image(img, 32), crop, atol=1e-6)

    transformers = pytest.importorskip("transformers")
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_cls is None:
        pytest.skip("no PIL-backed CLIPImageProcessor in this transformers")
    proc = processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)  # -> 32 x 38: even crop margin, same offset
    ref = proc(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(clip.preprocess_images(images, 32), ref, atol=1e-5)


def test_pair_cosines():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 24)).astype(np.float32)
    b = rng.standard_normal((6, 24)).astype(np.float32)
    b[0] = 3 * a[0]  # cos 1
    b[1] = -a[1]  # cos -1
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    got = np.asarray(clip.pair_cosines(a, b))
    np.testing.assert_allclose(got, cos, rtol=1e-5, atol=1e-6)
    assert got[0] == pytest.approx(1, abs=1e-5) and got[1] == pytest.approx(-1, abs=1e-5)
    with pytest.raises(ValueError):
        clip.pair_cosines(a, b[:3])


def test_load_hf_rejects_missing_and_extra():
    model = _hf_model("b32_like")
    cfg = clip.CLIPConfig.from_hf(model.config.to_dict())
    sd = dict(model.state_dict())
    clip.load_hf(sd, cfg)  # complete: fine
    assert clip.num_params(cfg) == sum(p.numel() for p in model.parameters())
    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.fc2.bias"):
        clip.load_hf(missing, cfg)
    extra = dict(sd, **{"vision_model.encoder.layers.9.mlp.fc1.bias": sd["visual_projection.weight"][0]})
    with pytest.raises(ValueError, match="unexpected.*layers.9"):
        clip.load_hf(extra, cfg)
    wrong = dict(sd)
    wrong["text_projection.weight"] = sd["text_projection.weight"][:, :-1]
    with pytest.raises(ValueError, match="text_projection.weight"):
        clip.load_hf(wrong, cfg)
    with pytest.raises(ValueError, match="config"):
        clip.load_hf(sd)  # a state dict needs a config


@pytest.mark.parametrize("preset,hf_count", [("vit-b-32", 151_277_313), ("vit-l-14", 427_616_513)])
def test_preset_param_counts(preset, hf_count):
    cfg = clip.CLIPConfig.preset(preset)
    assert cfg.text.vocab_size == 49408 and cfg.text.max_position_embeddings == 77 and cfg.vision.image_size == 224
    assert cfg.vision.intermediate_size == 4 * cfg.vision.hidden_size
    shapes = clip.param_shapes(cfg)  # jax.eval_shape of init: nothing allocated
    n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert abs(n - hf_count) / hf_count < 0.005, n
    assert shapes["vision_model"]["position_embedding"].shape[0] == (224 // cfg.vision.patch_size) ** 2 + 1
    assert shapes["text_projection"]["kernel"].shape == (cfg.text.hidden_size, cfg.projection_dim)


# ----------------------------------------------------------------------------------------------
# The text tower alone, as aMUSEd's text encoder (CLIPTextModelWithProjection).

TEXT_LAYERS = 3


@functools.cache
def _hf_text_model(eos):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tc = transformers.CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
                                     hidden_act="quick_gelu", projection_dim=24, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=eos)
    tc._attn_implementation = "eager"
    torch.manual_seed(1)
    model = transformers.CLIPTextModelWithProjection(tc).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _padded_ids(eos):
    """Rows as aMUSEd's tokenizer gives them: <bos> tokens <eos>, padded to the full length; no mask."""
    rng = np.random.default_rng(2)
    end = VOCAB - 1 if eos == 2 else eos  # legacy rule: the end token is the largest id
    pad = 1 if eos == 2 else eos  # first-occurrence rule: padded with the end token, as CLIP-L/14's tokenizer
    ids = np.full((3, CONTEXT), pad)
    for row, n in enumerate((5, CONTEXT - 2, 0)):
        ids[row, :n + 2] = [0, *rng.integers(3, VOCAB - 4, n), end]
    return ids


@pytest.mark.parametrize("eos", [2, VOCAB - 3])
def test_text_hidden_and_embeds_match_hf_text_model_with_projection(eos, tmp_path):
    import torch

    model = _hf_text_model(eos)
    model.save_pretrained(tmp_path)
    cfg, params = clip.load_text_hf(tmp_path)
    assert set(params) == {"text_model", "text_projection"}
    assert cfg.projection_dim == 24 and cfg.text.num_hidden_layers == TEXT_LAYERS and cfg.text.eos_token_id == eos
    assert clip.CLIPConfig.from_hf(model.config) == cfg  # a transformers CLIPTextConfig object too

    ids = _padded_ids(eos)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), output_hidden_states=True)  # no attention mask, as aMUSEd
    assert len(out.hidden_states) == TEXT_LAYERS + 1
    with jax.default_matmul_precision("highest"):
        hidden, embeds = clip.text_hidden_and_embeds(params, ids, config=cfg)
        assert hidden.shape == (3, CONTEXT, 32) and embeds.shape == (3, 24)
        assert _rel_err(np.asarray(hidden), out.hidden_states[-2].numpy()) < 1e-4
        assert _rel_err(np.asarray(embeds), out.text_embeds.numpy()) < 1e-4
        for layer in (0, -1, TEXT_LAYERS - 1):  # HF's indexing: 0 the embeddings, -1 the last layer (before the norm)
            h, _ = clip.text_hidden_and_embeds(params, ids, config=cfg, hidden_layer=layer)
            assert _rel_err(np.asarray(h), out.hidden_states[layer].numpy()) < 1e-4, layer
        # Traceable: inside another jitted function.
        jitted = jax.jit(lambda p, i: clip.text_hidden_and_embeds(p, i, config=cfg))(params, ids)
    np.testing.assert_allclose(np.asarray(jitted[0]), np.asarray(hidden), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_layer"):
        clip.text_hidden_and_embeds(params, ids, config=cfg, hidden_layer=TEXT_LAYERS + 1)


def test_text_hidden_and_embeds_on_full_clip_params():
    """A CLIPModel's params (and checkpoint) serve the text side too; with a mask, text_embeds = embed_texts."""
    model = _hf_model("l14_like")
    cfg = clip.CLIPConfig.from_hf(model.config.to_dict())
    full = clip.load_hf(model.state_dict(), cfg)
    text_cfg, text_only = clip.load_text_hf(model.state_dict(), cfg)  # vision weights skipped
    assert text_cfg == cfg and set(text_only) == {"text_model", "text_projection"}
    ids, mask = _ids(cfg.text.eos_token_id)
    with jax.default_matmul_precision("highest"):
        _, embeds = clip.text_hidden_and_embeds(full, ids, mask, config=cfg)
        _, embeds_text_only = clip.text_hidden_and_embeds(text_only, ids, mask, config=cfg)
        ref = clip.embed_texts(full, ids, mask, config=cfg)
    np.testing.assert_allclose(np.asarray(embeds), np.asarray(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(embeds_text_only))
    with pytest.raises(ValueError, match="text_projection"):
        clip.text_hidden_and_embeds({"text_model": full["text_model"]}, ids, config=cfg)


def test_load_text_hf_errors(tmp_path):
    model = _hf_text_model(2)
    sd = dict(model.state_dict())
    cfg, _ = clip.load_text_hf(sd, model.config.to_dict())
    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="missing.*text_model.encoder.layers.1.mlp.fc2.bias"):
        clip.load_text_hf(missing, cfg)
    extra = dict(sd, **{"text_model.encoder.layers.7.mlp.fc1.bias": sd["text_projection.weight"][0]})
    with pytest.raises(ValueError, match="unexpected.*layers.7"):
        clip.load_text_hf(extra, cfg)
    with pytest.raises(ValueError, match="config"):
        clip.load_text_hf(sd)  # a state dict needs a config
    with pytest.raises(FileNotFoundError, match="nowhere"):
        clip.load_text_hf(tmp_path / "nowhere")
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="no_config has no config.json"):
        clip.load_text_hf(tmp_path / "no_config")
    model.save_pretrained(tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_weights.*model.safetensors"):
        clip.load_text_hf(tmp_path / "no_weights")
    with pytest.raises(ValueError, match="CLIPTextConfig"):
        clip.CLIPConfig.from_hf({"model_type": "t5", "d_model": 8})
