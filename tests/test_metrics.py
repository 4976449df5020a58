import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import fbsemlib as fb
from fbsemlib.evaluation.metrics import (
    BiasStd,
    background_variability,
    bias_std,
    contrast_recovery,
    gaussian_filter_reflect,
    nrmse,
    psnr,
    ssim,
)


def _img(shape=(1, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5


def test_nrmse_hand_values():
    ref = _img()
    assert nrmse(ref * 1.1, ref) == pytest.approx(10.0)
    assert nrmse(ref * 1.1, ref, percent=False) == pytest.approx(0.1)
    assert nrmse(ref, ref) == 0.0
    # mask: the error outside is ignored
    x = ref.clone()
    x[0, :8] = 0
    m = torch.zeros(ref.shape, dtype=torch.bool)
    m[0, 8:] = True
    assert nrmse(x, ref, m) == 0.0
    assert nrmse(x, ref, m.double()) == 0.0  # 0/1 masks work too
    # batched: one value per item, shared reference broadcasts
    xb = torch.stack([ref * 1.1, ref * 0.8])[:, None]
    out = nrmse(xb, ref)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1)
    assert torch.allclose(out[:, 0], torch.tensor([10.0, 20.0], dtype=torch.float64))
    assert isinstance(nrmse(ref.numpy() * 1.1, ref.numpy()), float)


def test_psnr_formula():
    ref = _img()
    x = ref + 0.1
    dr = float(ref.max() - ref.min())
    assert psnr(x, ref) == pytest.approx(10 * math.log10(dr**2 / 0.01))
    assert psnr(x, ref, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(ref, ref) == math.inf
    # masked data range and MSE
    m = torch.zeros(ref.shape, dtype=torch.bool)
    m[0, :4, :4] = True
    drm = float(ref[m].max() - ref[m].min())
    x2 = ref.clone()
    x2[0, 4:] += 5.0  # outside the mask
    assert psnr(x2 + 0.1, ref, m) == pytest.approx(10 * math.log10(drm**2 / 0.01))
    # batched with per-item data range
    xb = torch.stack([ref + 0.1, ref + 0.2])
    out = psnr(xb, ref, data_range=torch.tensor([1.0, 2.0]))
    assert torch.allclose(out, torch.tensor([20.0, 10 * math.log10(4 / 0.04)], dtype=torch.float64))


def test_ssim_identical_and_matches_skimage():
    ref = _img((1, 40, 48), seed=1)
    assert ssim(ref, ref) == pytest.approx(1.0)
    g = np.random.default_rng(2)
    a = g.random((40, 48))
    b = np.clip(a + 0.15 * g.standard_normal(a.shape), 0, None)
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    ms, smap = structural_similarity(b, a, **kw)
    val, ours = ssim(torch.tensor(b), torch.tensor(a), data_range=1.0, return_map=True)
    assert ours.shape == (40, 48)
    assert np.abs(ours.numpy() - smap).max() < 1e-3
    # skimage averages the map without a border of the window radius (5)
    m = torch.zeros(40, 48, dtype=torch.bool)
    m[5:-5, 5:-5] = True
    assert abs(ssim(torch.tensor(b), torch.tensor(a), m, data_range=1.0) - ms) < 1e-3
    assert abs(val - float(smap.mean())) < 1e-3
    # (..., Z, Y, X) single-slice layout and 2D-per-slice mode on a volume
    assert ssim(torch.tensor(b)[None], torch.tensor(a)[None], data_range=1.0) == pytest.approx(val)
    vol_b = torch.tensor(np.stack([b, b[::-1].copy()]))
    vol_a = torch.tensor(np.stack([a, a[::-1].copy()]))
    assert ssim(vol_b, vol_a, data_range=1.0, spatial_dims=2) == pytest.approx(val)


def test_ssim_3d_matches_skimage_and_batches():
    g = np.random.default_rng(3)
    a = g.random((12, 20, 22))
    b = a + 0.2 * g.standard_normal(a.shape)
    _, smap = structural_similarity(
        b, a, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
    )
    val, ours = ssim(torch.tensor(b), torch.tensor(a), data_range=1.0, return_map=True)
    assert np.abs(ours.numpy() - smap).max() < 1e-3
    xb = torch.stack([torch.tensor(b), torch.tensor(a)])[:, None]
    out = ssim(xb, torch.tensor(a), data_range=1.0)
    assert out.shape == (2, 1) and float(out[0, 0]) == pytest.approx(val) and float(out[1, 0]) == pytest.approx(1.0)


def test_gaussian_filter_matches_scipy():
    from scipy import ndimage

    g = np.random.default_rng(4)
    a = g.random((3, 7, 9))  # an axis shorter than the radius exercises repeated reflection
    ours = gaussian_filter_reflect(torch.tensor(a), (0.0, 2.0, 1.0), truncate=4.0).numpy()
    ref = ndimage.gaussian_filter(a, (0.0, 2.0, 1.0), mode="reflect", truncate=4.0)
    assert np.abs(ours - ref).max() < 1e-12


def _lesion_phantom():
    x = torch.full((1, 20, 20), 2.0, dtype=torch.float64)
    hot = torch.zeros(x.shape, dtype=torch.bool)
    hot[0, 3:7, 3:7] = True
    cold = torch.zeros_like(hot)
    cold[0, 12:16, 12:16] = True
    bg = ~(hot | cold)
    x[hot] = 8.0
    x[cold] = 0.5
    return x, hot, cold, bg


def test_contrast_recovery():
    x, hot, cold, bg = _lesion_phantom()
    assert contrast_recovery(x, hot, bg, 8.0, 2.0) == pytest.approx(1.0)
    assert contrast_recovery(x, cold, bg, 0.5, 2.0) == pytest.approx(1.0)
    flat = torch.full_like(x, 2.0)
    assert contrast_recovery(flat, hot, bg, 8.0, 2.0) == pytest.approx(0.0)
    assert contrast_recovery(flat, cold, bg, 0.5, 2.0) == pytest.approx(0.0)
    # half the contrast: (5 / 2 - 1) / (4 - 1) = 0.5
    half = x.clone()
    half[hot] = 5.0
    assert contrast_recovery(half, hot, bg, 8.0, 2.0) == pytest.approx(0.5)
    # batched
    out = contrast_recovery(torch.stack([x, flat]), hot, bg, 8.0, 2.0)
    assert torch.allclose(out, torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="true_lesion_value equals"):
        contrast_recovery(x, hot, bg, 2.0, 2.0)
    with pytest.raises(ValueError, match="true_background_value"):
        contrast_recovery(x, hot, bg, 2.0, 0.0)
    with pytest.raises(ValueError, match="lesion_mask is empty"):
        contrast_recovery(x, torch.zeros_like(hot), bg, 8.0, 2.0)


def test_background_variability():
    x = torch.full((1, 10, 10), 4.0, dtype=torch.float64)
    m = torch.zeros(x.shape, dtype=torch.bool)
    m[0, :2, :5] = True  # 10 voxels
    assert background_variability(x, m) == 0.0
    x[0, 0, :5] = 3.0
    x[0, 1, :5] = 5.0  # mean 4, sample std sqrt(10 / 9)
    assert background_variability(x, m) == pytest.approx(100 * math.sqrt(10 / 9) / 4)
    assert background_variability(x, m, percent=False) == pytest.approx(math.sqrt(10 / 9) / 4)
    # across ROIs: ROI means 3 and 5 -> std sqrt(2), mean 4
    r1 = torch.zeros_like(m)
    r1[0, 0, :5] = True
    r2 = torch.zeros_like(m)
    r2[0, 1, :5] = True
    assert background_variability(x, [r1, r2]) == pytest.approx(100 * math.sqrt(2) / 4)
    with pytest.raises(ValueError, match="at least 2 ROIs"):
        background_variability(x, [r1])


def test_bias_std_exact_two_realisations():
    ref = _img((1, 6, 6), seed=5)
    s = 0.3
    e = s / math.sqrt(2)  # sample std of {-e, +e} is s
    reals = torch.stack([ref * 1.1 - e, ref * 1.1 + e])
    out = bias_std(reals, ref)
    assert isinstance(out, BiasStd)
    mu = float(ref.mean())
    assert out.ref_mean == pytest.approx(mu)
    assert out.bias == pytest.approx(10.0)
    assert out.rms_bias == pytest.approx(100 * math.sqrt(float((0.1 * ref).pow(2).mean())) / mu)
    assert out.std == pytest.approx(100 * s / mu)
    assert out.roi_std == pytest.approx(100 * s / mu)  # every voxel moves together here
    assert torch.allclose(out.std_map, torch.full_like(ref, 100 * s / mu))
    assert torch.allclose(out.bias_map, 100 * 0.1 * ref / mu)
    assert torch.allclose(out.mean_image, ref * 1.1)


def test_bias_std_random_realisations():
    g = torch.Generator().manual_seed(6)
    ref = torch.full((1, 8, 8), 10.0, dtype=torch.float64)
    R, sigma = 4000, 2.0
    reals = ref * 0.95 + sigma * torch.randn((R,) + ref.shape, generator=g, dtype=torch.float64)
    out = bias_std(reals, ref, percent=False)
    assert out.bias == pytest.approx(-0.05, abs=0.002)
    assert out.std == pytest.approx(sigma / 10, rel=0.02)
    assert out.roi_std == pytest.approx(sigma / 10 / 8, rel=0.05)  # independent voxels: / sqrt(64)
    assert float(out.std_map.mean()) == pytest.approx(sigma / 10, rel=0.02)
    # batched over a leading dim after R
    out_b = bias_std(torch.stack([reals, reals * 2], 1), ref)
    assert out_b.bias.shape == (2,) and out_b.bias_map.shape == (2,) + ref.shape
    assert float(out_b.bias[1]) == pytest.approx(90.0, abs=0.2)


def test_bad_inputs():
    ref = _img()
    with pytest.raises(ValueError, match="shape mismatch"):
        nrmse(torch.ones(1, 16, 15), ref)
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(torch.ones(3, 1, 16, 16), torch.ones(2, 1, 16, 16))
    with pytest.raises(ValueError, match="mask"):
        nrmse(ref, ref, torch.ones(1, 15, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is empty"):
        nrmse(ref, ref, torch.zeros(1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is empty"):  # empty for one batch item
        m = torch.ones(2, 1, 16, 16, dtype=torch.bool)
        m[1] = False
        psnr(torch.stack([ref, ref]), ref, m)
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    for fn in (nrmse, psnr, ssim):
        with pytest.raises(ValueError, match="x contains NaN"):
            fn(bad, ref)
        with pytest.raises(ValueError, match="ref contains NaN"):
            fn(ref, bad)
    with pytest.raises(ValueError, match="realisations contains NaN"):
        bias_std(torch.stack([bad, ref]), ref)
    with pytest.raises(ValueError, match="R >= 2"):
        bias_std(ref[None], ref)
    with pytest.raises(ValueError, match="mask must be boolean"):
        nrmse(ref, ref, torch.full(ref.shape, 0.5))
    with pytest.raises(ValueError, match="ref is zero"):
        nrmse(ref, torch.zeros_like(ref))
    with pytest.raises(ValueError, match="data_range"):
        psnr(ref, torch.ones_like(ref) + 0.0 * ref)
    with pytest.raises(ValueError, match="spatial_dims"):
        ssim(ref, ref, spatial_dims=1)
    with pytest.raises(TypeError, match="x must be"):
        nrmse([1.0, 2.0], ref)


def test_exported():
    assert fb.metrics.nrmse is nrmse and fb.QuadraticPrior is fb.recon.priors.QuadraticPrior
    assert fb.BowsherPrior is fb.recon.priors.BowsherPrior
