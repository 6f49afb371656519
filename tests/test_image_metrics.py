"""PSNR, SSIM and codebook usage against closed forms and a direct window-by-window SSIM."""
import json

import numpy as np
import pytest

from muse_jax.evaluation import metrics, sweep


def test_psnr_known_values():
    a = np.random.default_rng(0).integers(0, 246, (2, 16, 16, 3)).astype(np.uint8)
    assert np.all(np.isinf(metrics.psnr(a, a)))
    got = metrics.psnr(a, a + 10)
    np.testing.assert_allclose(got, 10 * np.log10(255**2 / 100.0))
    assert np.ndim(metrics.psnr(a[0], a[0] + 10)) == 0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(a, a[:1])


def _ssim_direct(a, b, size=11, sigma=1.5, L=255.0):
    """SSIM computed window by window with an explicit 2-D Gaussian (Wang et al. 2004)."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for ch in range(a.shape[-1]):
        for i in range(a.shape[0] - size + 1):
            for j in range(a.shape[1] - size + 1):
                x, y = a[i:i + size, j:j + size, ch], b[i:i + size, j:j + size, ch]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                cxy = (w * (x - mx) * (y - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(vals)


def test_ssim_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (18, 20, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    assert metrics.ssim(a, b) == pytest.approx(_ssim_direct(a, b), abs=1e-10)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    batch = metrics.ssim(np.stack([a, a]), np.stack([a, b]))
    np.testing.assert_allclose(batch, [1.0, _ssim_direct(a, b)], atol=1e-10)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = np.full((16, 16, 1), 100.0), np.full((16, 16, 1), 150.0)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_codebook_usage():
    k = 16
    uniform = metrics.codebook_usage(np.arange(k * 4) % k, k)
    assert uniform == {"num_used": k, "fraction_used": 1.0, "perplexity": pytest.approx(k)}
    single = metrics.codebook_usage(np.full((3, 8), 5), k)
    assert single == {"num_used": 1, "fraction_used": 1 / k, "perplexity": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="token ids"):
        metrics.codebook_usage(np.array([0, k]), k)


def test_write_sweep(tmp_path):
    results = [dict(steps=s, guidance=g, accuracy=0.1 * s, fid=10.0 / s, sec_per_image=0.01 * s)
               for s in (4, 8, 12, 24) for g in (0.0, 3.0)]
    json_path, png_path = sweep.write_sweep(results, str(tmp_path / "out"))
    with open(json_path) as f:
        assert json.load(f)["results"] == results
    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    sweep.write_sweep(results, str(tmp_path / "out"), name="by_guidance", x="guidance")
    with pytest.raises(ValueError, match="lacks"):
        sweep.write_sweep([{"steps": 4}], str(tmp_path))
