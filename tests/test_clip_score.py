"""The zero-shot CLIP score is torchmetrics' CLIPScore: max(100 * mean(cos), 0), the mean clamped.

The reference is torchmetrics' metric itself (`pip install --no-deps torchmetrics==1.9.0
lightning-utilities==0.15.3`), its CLIP model and processor replaced by stand-ins that return
given embeddings, so that its own normalisation, accumulation and clamp are what is compared.
Without torchmetrics the test is skipped.
"""
import types

import numpy as np
import pytest

from muse_jax.evaluation import zero_shot


def _torchmetrics_clip_score(monkeypatch, image_emb, text_emb, batch_size=3) -> float:
    torch = pytest.importorskip("torch")
    clip_module = pytest.importorskip("torchmetrics.multimodal.clip_score")
    images, texts = torch.from_numpy(image_emb), torch.from_numpy(text_emb)

    class Model(torch.nn.Module):  # item i: image i holds the value i; caption i reads "i"
        config = types.SimpleNamespace()

        def get_image_features(self, pixel_values):
            return images[pixel_values[:, 0, 0, 0].long()]

        def get_text_features(self, input_ids, attention_mask):
            return texts[input_ids[:, 0]]

    def processor(images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            return {"pixel_values": torch.stack(images)}
        ids = torch.tensor([[int(t)] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    monkeypatch.setattr(clip_module, "_get_clip_model_and_processor", lambda name: (Model(), processor))
    metric = clip_module.CLIPScore()
    n = len(image_emb)
    for start in range(0, n, batch_size):  # accumulated over batches, as an evaluation would
        idx = range(start, min(start + batch_size, n))
        metric.update([torch.full((3, 2, 2), float(i)) for i in idx], [str(i) for i in idx])
    return float(metric.compute())


def test_clip_score_is_torchmetrics(monkeypatch):
    rng = np.random.default_rng(0)
    text = rng.standard_normal((8, 16))
    image = text + 0.8 * rng.standard_normal((8, 16))  # mostly aligned pairs ...
    image[[1, 4, 6]] = -image[[1, 4, 6]]  # ... three of them with negative cosines
    cos = (image * text).sum(-1) / np.linalg.norm(image, axis=-1) / np.linalg.norm(text, axis=-1)
    assert (cos < 0).sum() == 3 and cos.mean() > 0
    want = _torchmetrics_clip_score(monkeypatch, image.astype(np.float32), text.astype(np.float32))
    got = zero_shot.clip_score(image.astype(np.float32), text.astype(np.float32))
    assert got == pytest.approx(want, abs=1e-4)
    assert got == pytest.approx(100 * cos.mean(), abs=1e-4)
    assert got < 100 * np.maximum(cos, 0).mean() - 1  # not the mean of the pairs clamped each
    # a negative mean is clamped to 0, as torchmetrics does
    assert zero_shot.clip_score(-image, text) == 0.0 == _torchmetrics_clip_score(monkeypatch, -image, text)
