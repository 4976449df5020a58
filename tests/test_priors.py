import numpy as np
import pytest
import torch

import fbsemlib as fb
from markers import requires_cuda
from fbsemlib.physics.forward_model import PETForwardModel, normalisation_factors
from fbsemlib.recon.em import em_update, fuse, fusion_objective
from fbsemlib.recon.priors import BowsherPrior, QuadraticPrior, neighbourhood_offsets
from fbsemlib.recon.algorithms import map_em, mlem, osem


def _priors(mr):
    return [
        QuadraticPrior(),
        QuadraticPrior(neighbourhood="3x3", weights="uniform"),
        QuadraticPrior(neighbourhood="3x3x3", voxel_size=(2.0, 4.0, 4.0), normalise=True),
        BowsherPrior(mr),
        BowsherPrior(mr, 3, weights="inverse_distance", symmetrise="max"),
        BowsherPrior(mr, 6, symmetrise="min"),
    ]


@pytest.mark.parametrize("shape", [(1, 7, 9), (4, 5, 6), (2, 1, 3, 5, 6)])
def test_surrogate_is_tangent_majoriser(shape):
    """The separable surrogate sum_j w_j/2 (z_j - x_reg_j)^2 + C touches R at x^n (value
    and gradient, which pins the constants: w = 4 sum_k w_jk) and lies above R."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    mr = torch.rand(shape[-3:], generator=g, dtype=torch.float64)
    for prior in _priors(mr):
        xr = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(prior.value(xr).sum(), xr)
        assert torch.allclose(grad, prior.gradient(x)), prior
        x_reg, w = prior.surrogate(x)
        assert torch.allclose(w * (x - x_reg), grad), prior  # tangent at x^n
        assert torch.allclose(w, 4 * prior.weight_sum(x)), prior
        c = prior.value(x) - (0.5 * w * (x - x_reg) ** 2).sum((-3, -2, -1))
        for _ in range(10):
            z = (x + torch.randn(x.shape, generator=g, dtype=x.dtype)).abs()
            q = (0.5 * w * (z - x_reg) ** 2).sum((-3, -2, -1)) + c
            assert bool((q >= prior.value(z) - 1e-10).all()), prior
        # a 4x smaller weight (the original FBSEM code's gamma = beta sum_k w_jk with
        # this R) is not a majoriser: it falls below R along a random direction
        z = x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        c4 = prior.value(x) - (0.125 * w * (x - x_reg) ** 2).sum((-3, -2, -1))
        q4 = (0.125 * w * (z - x_reg) ** 2).sum((-3, -2, -1)) + c4
        assert bool((q4 < prior.value(z)).all()), prior


def test_quadratic_value_by_hand():
    # 1 x 1 x 2 image [a, b] with uniform 3x3 weights: the pair counted twice -> R = (a - b)^2
    x = torch.tensor([[[1.0, 4.0]]], dtype=torch.float64)
    prior = QuadraticPrior(neighbourhood="3x3", weights="uniform")
    assert float(prior.value(x)) == pytest.approx(9.0)
    x_reg, w = prior.surrogate(x)
    assert torch.allclose(x_reg, torch.full_like(x, 2.5))  # (a + b) / 2 for both voxels
    assert torch.allclose(w, torch.full_like(x, 4.0))
    # inverse distance: diagonal neighbours weigh 1/sqrt(2)
    x = torch.zeros(1, 3, 3, dtype=torch.float64)
    x[0, 1, 1] = 1.0
    prior = QuadraticPrior(neighbourhood="3x3")
    assert float(prior.value(x)) == pytest.approx(4 + 4 / np.sqrt(2))
    # normalised weights sum to 1 in the interior
    n = QuadraticPrior(neighbourhood="3x3", normalise=True).weight_sum(x)
    assert float(n[0, 1, 1]) == pytest.approx(1.0) and float(n[0, 0, 0]) < 1
    # neighbours outside the image are excluded (corner: 3 of 8, 3D corner: 7 of 26)
    u = QuadraticPrior(neighbourhood="3x3x3", weights="uniform").weight_sum(torch.zeros(4, 4, 4))
    assert float(u[0, 0, 0]) == 7 and float(u[1, 1, 1]) == 26
    assert len(neighbourhood_offsets("3x3")) == 8 and len(neighbourhood_offsets("3x3x3")) == 26


def test_constant_image_is_fixed_point_and_nonnegative():
    g = torch.Generator().manual_seed(2)
    mr = torch.rand(1, 6, 6, generator=g)
    for prior in _priors(mr):
        x = torch.full((1, 6, 6), 3.0)
        x_reg, w = prior.surrogate(x)
        assert torch.allclose(x_reg, x) and float(prior.value(x)) == 0.0
        x = torch.rand(1, 6, 6, generator=g) * (torch.rand(1, 6, 6, generator=g) > 0.5)
        x_reg, w = prior.surrogate(x)
        assert float(x_reg.min()) >= 0 and float(w.min()) >= 0


# --- MAP-EM on a small 2D problem ------------------------------------------------------
@pytest.fixture(scope="module")
def problem():
    sino = fb.sinogram_preset("small2d")
    grid = fb.ImageGrid((1, 32, 32), (2.0, 4.0, 4.0))
    P = fb.Projector(sino, grid, backend="torch")
    yy = torch.as_tensor(grid.axis_mm(1))[:, None]
    xx = torch.as_tensor(grid.axis_mm(2))[None, :]
    disc = (xx**2 + yy**2) <= 55**2
    right = disc & (xx > 0)
    x = disc.double()
    x[right] = 4.0
    mr = disc.double()
    mr[right] = 2.0
    eff = np.random.default_rng(0).uniform(0.8, 1.2, size=(1, sino.scanner.num_crystals_per_ring))
    n = normalisation_factors(sino, eff, dtype=torch.float64)
    trues = PETForwardModel(P, n).linear(x[None])
    b = torch.full_like(trues, float(trues.mean()) * 0.1)
    model = PETForwardModel(P, n, b)
    ybar = model.expected(x[None])
    scale = 2e5 / float(ybar.sum())
    y = torch.poisson(ybar * scale, generator=torch.Generator().manual_seed(0)) / scale
    # a uniform disc (no edge inside) for the smoothing tests
    ybar_flat = model.expected(disc.double()[None])
    scale = 2e5 / float(ybar_flat.sum())
    y_flat = torch.poisson(ybar_flat * scale, generator=torch.Generator().manual_seed(1)) / scale
    uniform = (disc & (xx < -8) & (xx**2 + yy**2 <= 40**2))[None]
    rows = yy[:, 0].abs() < 30
    j = int((xx[0] > 0).nonzero()[0])  # first column right of the edge
    return dict(model=model, y=y, x=x[None], mr=mr[None], uniform=uniform, rows=rows, j=j,
                y_flat=y_flat, inner=((xx**2 + yy**2) <= 40**2)[None])


@pytest.mark.parametrize("kind", ["quadratic", "bowsher"])
def test_map_em_objective_increases_monotonically(problem, kind):
    model, y = problem["model"], problem["y"]
    prior = QuadraticPrior() if kind == "quadratic" else BowsherPrior(problem["mr"])
    for beta in (0.3, 3.0):
        x = None
        phis = []
        for _ in range(12):
            x = map_em(model, y, prior, beta, 1, 1, x0=x)
            phis.append(float(model.log_likelihood(x, y) - beta * prior.value(x)))
        diffs = np.diff(phis)
        assert np.all(diffs >= -1e-9 * abs(phis[0])), (kind, beta, diffs)
        assert phis[-1] > phis[0]


def test_one_map_em_step_maximises_the_surrogate(problem):
    """fuse(x_em, x_reg, s, beta w) is the voxel-wise maximiser of the full surrogate
    s (x_em ln z - z) - beta (w/2) (z - x_reg)^2 (i.e. exactly the De Pierro update)."""
    model, y = problem["model"], problem["y"]
    prior = BowsherPrior(problem["mr"])
    x = mlem(model, y, 3)
    s = model.sensitivity(y)
    x_em = em_update(model, x, y, s)
    x_reg, w = prior.surrogate(x)
    beta = 2.0
    z = fuse(x_em, x_reg, s, beta * w)
    f0 = fusion_objective(z, x_em, x_reg, s, beta * w)
    for d in (1e-3, -1e-3):
        assert bool((fusion_objective(z * (1 + d), x_em, x_reg, s, beta * w) <= f0 + 1e-9).all())
    assert torch.equal(map_em(model, y, prior, beta, 1, 1, x0=x), z)


def test_beta_zero_is_mlem_osem_and_nonnegative(problem):
    model, y = problem["model"], problem["y"]
    prior = BowsherPrior(problem["mr"])
    assert torch.equal(map_em(model, y, prior, 0.0, 5), mlem(model, y, 5))
    assert torch.equal(map_em(model, y, QuadraticPrior(), 0.0, 2, 4), osem(model, y, 2, 4))
    assert torch.allclose(map_em(model, y, prior, 1e-12, 5), mlem(model, y, 5), rtol=1e-8, atol=1e-10)
    for p in (prior, QuadraticPrior()):
        r = map_em(model, y, p, 100.0, 5, 4)
        assert float(r.min()) >= 0


def test_larger_beta_is_smoother(problem):
    model, y, inner = problem["model"], problem["y_flat"], problem["inner"]

    def tv(im):
        return float((im[..., 1:, :] - im[..., :-1, :]).abs().sum() + (im[..., 1:] - im[..., :-1]).abs().sum())

    for prior in (QuadraticPrior(), BowsherPrior(problem["mr"])):
        stds, tvs = [], []
        for beta in (0.0, 0.3, 3.0, 30.0):
            r = map_em(model, y, prior, beta, 30)
            stds.append(float(r[inner].std()))
            tvs.append(tv(r))
        assert all(b < a for a, b in zip(stds, stds[1:])), stds
        assert all(b < a for a, b in zip(tvs, tvs[1:])), tvs


def test_bowsher_preserves_mr_edge_better_than_quadratic(problem):
    model, y, uni, rows, j = problem["model"], problem["y"], problem["uniform"], problem["rows"], problem["j"]

    def edge(im):
        prof = im[0][rows].mean(0)
        return float(prof[j] - prof[j - 1])  # true jump: 3

    rq = map_em(model, y, QuadraticPrior(), 3.0, 50)
    rb = map_em(model, y, BowsherPrior(problem["mr"]), 10.0, 50)
    std_q, std_b = float(rq[uni].std()), float(rb[uni].std())
    assert std_b <= std_q  # Bowsher at least as smooth in the uniform region ...
    assert edge(rb) > 2.5 and edge(rq) < 1.5  # ... and keeps the MR-visible edge


def test_batched_and_plain_inputs_agree(problem):
    model, y, mr = problem["model"], problem["y"], problem["mr"]
    g = torch.Generator().manual_seed(3)
    x = torch.rand((2, 1) + mr.shape, generator=g, dtype=torch.float64)
    mrb = torch.stack([mr, mr.flip(-1)])[:, None]  # one MR per batch item
    pb = BowsherPrior(mrb)
    xr_b, w_b = pb.surrogate(x)
    assert xr_b.shape == x.shape and pb.value(x).shape == (2, 1)
    for i, m in enumerate((mr, mr.flip(-1))):
        xr, w = BowsherPrior(m).surrogate(x[i, 0])
        assert torch.allclose(xr_b[i, 0], xr) and torch.allclose(w_b[i, 0], w)
    # a shared MR image broadcasts over the batch; quadratic works on any leading dims
    xr_s, _ = BowsherPrior(mr).surrogate(x)
    assert torch.allclose(xr_s[1, 0], BowsherPrior(mr).surrogate(x[1, 0])[0])
    q = QuadraticPrior()
    assert torch.allclose(q.surrogate(x)[0][1, 0], q.surrogate(x[1, 0])[0])
    # MAP-EM on a batch with per-item MR images
    yb = torch.stack([y, y])[:, None]
    r = map_em(model, yb, pb, 1.0, 3, 2)
    assert r.shape == (2, 1) + mr.shape
    assert torch.allclose(r[0, 0], map_em(model, y, BowsherPrior(mr), 1.0, 3, 2), rtol=1e-6, atol=1e-9)
    # float32 images with a float64 MR
    xr32, _ = pb.surrogate(x.float())
    assert xr32.dtype == torch.float32 and torch.allclose(xr32.double(), xr_b, rtol=1e-5, atol=1e-6)


def test_bowsher_picks_the_most_similar_neighbours():
    mr = torch.tensor([[[1.0, 7.0, 20.0],
                        [43.0, 50.0, 52.0],
                        [61.0, 90.0, 33.0]]])
    prior = BowsherPrior(mr, num_neighbours=4)
    assert prior.neighbourhood == "3x3"
    offs = prior.offsets
    chosen = {offs[k] for k in range(len(offs)) if prior.selected[k, 0, 1, 1]}
    # |50 - v|: 52 -> 2 (right), 43 -> 7 (left), 61 -> 11 (down-left), 33 -> 17 (down-right)
    assert chosen == {(0, 0, 1), (0, 0, -1), (0, 1, -1), (0, 1, 1)}
    # the corner (0, 0) has only 3 neighbours inside the image: it keeps them all
    assert int(prior.selected[:, 0, 0, 0].sum()) == 3
    assert int(prior.selected.sum(0).max()) == 4
    # corner (0, 0) = 1: |1-7| = 6, |1-43| = 42, |1-50| = 49 -> all three kept; the centre
    # did not choose (0, 0) and vice versa symmetric means: w = (b + b^T) / 2
    k_up_left = offs.index((0, -1, -1))
    k_down_right = offs.index((0, 1, 1))
    assert not bool(prior.selected[k_up_left, 0, 1, 1]) and bool(prior.selected[k_down_right, 0, 0, 0])
    assert float(prior.weight_maps[k_up_left, 0, 1, 1]) == 0.5  # centre <-> corner: one-sided
    assert float(prior.weight_maps[k_down_right, 0, 0, 0]) == 0.5
    assert float(prior.weight_maps[offs.index((0, 0, 1)), 0, 1, 1]) == 1.0  # 50 <-> 52: mutual
    # union / intersection
    assert float(BowsherPrior(mr, symmetrise="max").weight_maps[k_up_left, 0, 1, 1]) == 1.0
    assert float(BowsherPrior(mr, symmetrise="min").weight_maps[k_up_left, 0, 1, 1]) == 0.0
    # "none": the centre's own row weights in the surrogate (original FBSEM code)
    x = torch.arange(9.0).reshape(1, 3, 3)
    x_reg, w = BowsherPrior(mr, symmetrise="none").surrogate(x)
    nb = torch.tensor([5.0, 3.0, 6.0, 8.0])
    assert float(x_reg[0, 1, 1]) == pytest.approx(float((4 + nb).sum() / 8)) and float(w[0, 1, 1]) == 16
    # ties go to the nearer neighbour: in a flat MR the 4 face neighbours are chosen
    flat = BowsherPrior(torch.zeros(1, 5, 5), 4)
    picked = {flat.offsets[k] for k in range(8) if flat.selected[k, 0, 2, 2]}
    assert picked == {(0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)}
    # 3D window
    p3 = BowsherPrior(torch.rand(3, 4, 4), num_neighbours=6)
    assert p3.neighbourhood == "3x3x3" and len(p3.offsets) == 26
    assert int(p3.selected[:, 1, 1, 1].sum()) == 6


def test_bad_inputs(problem):
    mr = problem["mr"]
    with pytest.raises(ValueError, match="mr_image"):
        BowsherPrior(mr).surrogate(torch.rand(1, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="mr_image"):
        BowsherPrior(torch.stack([mr, mr, mr])).surrogate(torch.rand((2,) + mr.shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="mr_image"):
        BowsherPrior(torch.rand(4, 4))
    bad = mr.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="mr_image"):
        BowsherPrior(bad)
    with pytest.raises(TypeError, match="mr_image"):
        BowsherPrior(np.ones((1, 4, 4)))
    for n in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="num_neighbours"):
            BowsherPrior(mr, num_neighbours=n)
    with pytest.raises(ValueError, match="num_neighbours"):
        BowsherPrior(torch.rand(3, 4, 4), num_neighbours=27)
    with pytest.raises(ValueError, match="symmetrise"):
        BowsherPrior(mr, symmetrise="avg")
    with pytest.raises(ValueError, match="neighbourhood"):
        QuadraticPrior(neighbourhood="5x5")
    with pytest.raises(ValueError, match="weights"):
        QuadraticPrior(weights="gaussian")
    with pytest.raises(ValueError, match="voxel_size"):
        QuadraticPrior(voxel_size=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="x must have shape"):
        QuadraticPrior().surrogate(torch.rand(4, 4))
    with pytest.raises(ValueError, match="beta"):
        map_em(problem["model"], problem["y"], QuadraticPrior(), -1.0, 1)


@requires_cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 3, 8, 8, generator=g)
    mr = torch.rand(2, 1, 3, 8, 8, generator=g)
    for prior_cpu, prior_gpu in (
        (QuadraticPrior(), QuadraticPrior()),
        (BowsherPrior(mr), BowsherPrior(mr.cuda())),
    ):
        xr_c, w_c = prior_cpu.surrogate(x)
        xr_g, w_g = prior_gpu.surrogate(x.cuda())
        assert xr_g.is_cuda and torch.allclose(xr_g.cpu(), xr_c, atol=1e-6)
        assert torch.allclose(w_g.cpu(), w_c)
        assert torch.allclose(prior_gpu.value(x.cuda()).cpu(), prior_cpu.value(x), rtol=1e-5)
    # a CPU-built Bowsher prior follows the image to the GPU
    xr, _ = BowsherPrior(mr).surrogate(x.cuda())
    assert xr.is_cuda
