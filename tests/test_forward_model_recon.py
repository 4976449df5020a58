import math

import numpy as np
import pytest
import torch

import fbsemlib as fb
from fbsemlib.physics.forward_model import PETForwardModel, attenuation_factors, normalisation_factors, poisson_log_likelihood
from fbsemlib.recon.em import em_fusion_step, em_update, fuse, fusion_objective
from fbsemlib.recon.algorithms import map_em, mlem, osem, postfilter


def _disc(grid, r_mm, value=1.0):
    y = torch.as_tensor(grid.axis_mm(1))[:, None]
    x = torch.as_tensor(grid.axis_mm(2))[None, :]
    img = ((x**2 + y**2) <= r_mm**2).to(torch.float64) * value
    return img[None].expand(grid.shape).clone()


@pytest.fixture(scope="module")
def setup():
    sino = fb.sinogram_preset("small2d")
    grid = fb.ImageGrid((1, 48, 48), (2.0, 4.0, 4.0))
    P = fb.Projector(sino, grid, backend="torch")
    x = _disc(grid, 70.0, 1.0)
    x[0, 20:26, 20:26] = 4.0
    mu = _disc(grid, 80.0, 0.0096)
    rng = np.random.default_rng(0)
    eff = rng.uniform(0.8, 1.2, size=(1, sino.scanner.num_crystals_per_ring))
    n = normalisation_factors(sino, eff, dtype=torch.float64)
    model0 = PETForwardModel.from_components(P, mu, n)
    trues = model0.linear(x)
    b = torch.full_like(trues, float(trues.mean()) * 0.2)
    model = PETForwardModel(P, model0.multiplicative, b)
    ybar = model.expected(x)
    g = torch.Generator().manual_seed(0)
    y = torch.poisson(ybar * 2.0, generator=g) / 2.0
    return sino, grid, P, model, x, y


def test_normalisation_has_gaps(setup):
    sino = setup[0]
    n = normalisation_factors(sino)
    assert n.shape == sino.shape
    assert float(n.min()) == 0.0 and float(n.max()) == 1.0
    s, e = sino.crystal_pairs()
    gap = sino.scanner.crystal_is_gap()
    assert torch.equal(n[0] == 0, torch.as_tensor(gap[s] | gap[e]))
    with pytest.raises(ValueError, match="crystal_efficiencies must have shape"):
        normalisation_factors(sino, np.ones(3))


def test_attenuation_factors_match_analytic(setup):
    sino, grid, P = setup[:3]
    mu = _disc(grid, 80.0, 0.01)
    a = attenuation_factors(P, mu)
    assert a.shape == sino.shape and float(a.max()) <= 1.0 and float(a.min()) > 0
    # through the centre: exp(-0.01 * 160)
    central = a[0, :, sino.num_radial // 2]
    # (binary disc on 4 mm voxels: the path length varies by a few per cent with the view)
    assert torch.allclose(central, torch.full_like(central, math.exp(-1.6)), rtol=0.05)
    with pytest.raises(ValueError, match="non-negative"):
        attenuation_factors(P, -mu)


def test_loglik_increases_every_mlem_iteration(setup):
    _, _, _, model, _, y = setup
    x = None
    lls = []
    x = mlem(model, y, 1)
    for _ in range(15):
        lls.append(float(model.log_likelihood(x, y)))
        x = mlem(model, y, 1, x0=x)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(lls, lls[1:]))
    assert lls[-1] > lls[0]


def test_osem_one_subset_equals_mlem(setup):
    _, _, _, model, _, y = setup
    assert torch.allclose(osem(model, y, 3, 1), mlem(model, y, 3))


def test_osem_iterates_and_nonnegativity(setup):
    _, _, _, model, x_true, y = setup
    x, its = osem(model, y, 2, 4, return_iterates=True)
    assert len(its) == 8 and torch.equal(its[-1], x)
    assert float(x.min()) >= 0
    # OSEM approaches the truth in the disc
    err = float((x - x_true).norm() / x_true.norm())
    assert err < 0.5


def test_map_em_beta_zero_is_osem(setup):
    _, _, _, model, _, y = setup

    class Dummy:
        def surrogate(self, x):
            raise AssertionError("not called for beta = 0")

    assert torch.allclose(map_em(model, y, Dummy(), 0.0, 2, 4), osem(model, y, 2, 4))


def test_em_fusion_step_is_em_then_fuse(setup):
    """One step: the EM update (x / s * A^T(m y / ybar), 0 where s = 0), then the fusion with
    the regulariser's image and strength; no regulariser: the EM update itself; detach_em:
    gradients reach x through the regulariser only."""
    _, _, _, model, _, y = setup
    x = mlem(model, y, 2)
    s = model.sensitivity(y)
    ybar = model.expected(x)
    ref = torch.where(s > 0, x * model.linear_adjoint(y / ybar) / torch.where(s > 0, s, 1.0), 0.0)
    x_em = em_update(model, x, y, s)
    assert torch.allclose(x_em, ref, rtol=1e-12) and torch.equal(em_update(model, x, y), x_em)
    assert torch.equal(em_fusion_step(model, x, y, s), x_em)
    assert torch.equal(mlem(model, y, 1, x0=x), x_em)
    x_reg, gamma = 0.9 * x + 0.1, torch.tensor(3.0, dtype=x.dtype)
    assert torch.equal(em_fusion_step(model, x, y, s, lambda z: (x_reg, gamma)), fuse(x_em, x_reg, s, gamma))
    xg = x.clone().requires_grad_(True)
    for detach in (True, False):
        out = em_fusion_step(model, xg, y, s, lambda z: (0.5 * z, gamma), detach_em=detach)
        assert torch.allclose(out, fuse(x_em, 0.5 * x, s, gamma), rtol=1e-12)
        g, = torch.autograd.grad(out.sum(), xg)
        if detach:
            g_reg = g
        else:
            assert not torch.allclose(g, g_reg)  # the EM update contributes only when not detached


def test_fusion_is_maximiser_and_limits():
    g = torch.Generator().manual_seed(0)
    x_em = torch.rand(1000, generator=g, dtype=torch.float64) * 5
    x_reg = torch.randn(1000, generator=g, dtype=torch.float64) * 3
    s = torch.rand(1000, generator=g, dtype=torch.float64) * 10 + 0.01
    gamma = torch.rand(1000, generator=g, dtype=torch.float64) * 20
    z = fuse(x_em, x_reg, s, gamma)
    assert float(z.min()) >= 0
    f0 = fusion_objective(z, x_em, x_reg, s, gamma)
    for d in (1e-3, -1e-3):
        zz = (z * (1 + d)).clamp_min(1e-12)
        assert bool((fusion_objective(zz, x_em, x_reg, s, gamma) <= f0 + 1e-9).all())
    # gamma -> 0 gives EM
    assert torch.allclose(fuse(x_em, x_reg, s, 1e-12), x_em, rtol=1e-6, atol=1e-9)
    assert torch.equal(fuse(x_em, x_reg, s, 0.0), x_em)
    # huge gamma pulls towards max(x_reg, 0)
    assert torch.allclose(fuse(x_em, x_reg, s, 1e9), x_reg.clamp_min(0), atol=1e-4)


def test_postfilter_preserves_mass_inside():
    grid = fb.ImageGrid((1, 64, 64), (2.0, 2.0, 2.0))
    x = torch.zeros(1, *grid.shape, dtype=torch.float64)
    x[0, 0, 32, 32] = 1.0
    f = postfilter(x, 6.0, grid.voxel_size_mm)
    assert abs(float(f.sum()) - 1.0) < 1e-9
    # FWHM check along x: half maximum at +-3 mm = 1.5 voxels
    prof = f[0, 0, 32]
    assert float(prof[32]) > float(prof[33]) > 0


def test_bad_inputs(setup):
    _, _, P, model, _, y = setup
    with pytest.raises(ValueError, match="non-negative"):
        osem(model, -y, 1, 2)
    ynan = y.clone()
    ynan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        osem(model, ynan, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        osem(model, y[..., :5], 1, 2)
    with pytest.raises(TypeError, match="floating"):
        osem(model, y.long(), 1, 2)
    with pytest.raises(ValueError, match="num_subsets"):
        osem(model, y, 1, 0)
    with pytest.raises(ValueError, match="num_iterations"):
        osem(model, y, 0, 1)
    with pytest.raises(ValueError, match="multiplicative"):
        PETForwardModel(P, torch.ones(3))
    with pytest.raises(ValueError, match="beta"):
        map_em(model, y, None, -1.0, 1)


def test_batched_factors_broadcast(setup):
    _, grid, P, model, x, y = setup
    # two subjects with different factors in one batch
    m2 = torch.stack([model.multiplicative, model.multiplicative * 0.5])[:, None]
    b2 = torch.stack([model.additive, model.additive])[:, None]
    bm = PETForwardModel(P, m2, b2)
    xb = torch.stack([x, x])[:, None]
    ybar = bm.expected(xb)
    assert ybar.shape == (2, 1) + P.out_shape
    yb = torch.stack([y, y])[:, None]
    rec = osem(bm, yb, 2, 4)
    assert rec.shape == (2, 1) + grid.shape
    assert torch.allclose(rec[0, 0], osem(model, y, 2, 4), rtol=1e-5, atol=1e-6)
