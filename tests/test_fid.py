"""FID: the Frechet distance, cached reference statistics and the in-domain shapes features."""
import os

import numpy as np
import pytest
import scipy.linalg

from muse_jax.evaluation import features, fid


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d, rank in [(5, None), (40, None), (40, 12)]:  # full-rank and singular covariances
        s1, s2 = _random_cov(rng, d, rank), _random_cov(rng, d, rank)
        m1, m2 = rng.normal(size=d), rng.normal(size=d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        want = (m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean)
        assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_fid_of_a_shift_is_the_squared_shift():
    x = np.random.default_rng(1).normal(size=(500, 16))
    shift = np.linspace(-1, 1, 16)
    assert fid.fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid.fid_from_features(x, x + shift) == pytest.approx(shift @ shift, rel=1e-9)


def test_statistics_errors_name_the_problem():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="disagree in shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.fixture(scope="module")
def real_sets():
    images = features.shapes_images(0, "test", 192)
    return images[:96], images[96:]


def test_shapes_fid_is_zero_on_itself_and_grows_with_noise(real_sets):
    ref, other = real_sets
    ref_feats = features.shapes_features(ref)
    assert ref_feats.shape == (96, 243) and np.isfinite(ref_feats).all()
    assert fid.fid_from_features(ref_feats, ref_feats) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    values = []
    for sigma in (0, 4, 12, 36):
        noisy = np.clip(other + rng.normal(0.0, sigma, other.shape), 0, 255).astype(np.uint8)
        values.append(fid.fid_from_features(ref_feats, features.shapes_features(noisy)))
    print("shapes FID vs noise sigma 0, 4, 12, 36:", np.round(values, 2))
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[-1] > 5 * values[0]


def test_reference_statistics_are_cached(tmp_path, monkeypatch):
    calls = []

    def extract(images):
        calls.append(len(images))
        return features.shapes_features(images)

    kw = dict(seed=0, split="test", num=24, extract=extract, extractor_id="test-extractor")
    mu, sigma = features.shapes_reference_statistics(str(tmp_path), **kw)
    mu2, sigma2 = features.shapes_reference_statistics(str(tmp_path), **kw)
    assert calls == [24]
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert len(os.listdir(tmp_path)) == 1
    features.shapes_reference_statistics(str(tmp_path), **{**kw, "num": 25})  # another dataset id
    features.shapes_reference_statistics(str(tmp_path), **{**kw, "extractor_id": "other"})
    assert calls == [24, 25, 24] and len(os.listdir(tmp_path)) == 3
    images = features.shapes_images(0, "test", 24)
    assert fid.fid_from_statistics(features.shapes_features(images), (mu, sigma)) == pytest.approx(0.0, abs=1e-6)


def test_shapes_features_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        features.shapes_features(np.zeros((2, 64, 64, 3), np.float32))
