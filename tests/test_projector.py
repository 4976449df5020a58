import math

import numpy as np
import pytest
import torch

import fbsemlib as fb
from conftest import requires_cuda, requires_parallelproj

METHODS = ["matrix", "on-the-fly"]


def _random_geometry(seed: int, three_d: bool):
    r = np.random.default_rng(seed)
    sides = 2 * int(r.integers(4, 10))
    cps = int(r.integers(3, 7))
    spacing = float(r.uniform(3.0, 6.0))
    radius = sides * cps * spacing / (2 * math.pi) * float(r.uniform(1.0, 1.2))
    rings = int(r.integers(2, 5)) if three_d else 1
    sc = fb.RingScanner(radius_mm=radius, num_sides=sides, crystals_per_side=cps, crystal_spacing_mm=spacing,
                        num_rings=rings, ring_spacing_mm=float(r.uniform(3, 5)))
    n = sc.num_crystals_per_ring
    sino = fb.SinogramGeometry(sc, radial_trim=int(r.integers(0, n // 4)), max_ring_difference=int(r.integers(0, rings)))
    nxy = int(r.integers(8, 24))
    vxy = 0.9 * 2 * radius / math.sqrt(2) / nxy * float(r.uniform(0.5, 1.0))
    nz = int(r.integers(2, 6)) if three_d else 1
    grid = fb.ImageGrid((nz, nxy, nxy + int(r.integers(0, 3))), (float(r.uniform(2, 4)), vxy, vxy * float(r.uniform(0.8, 1.2))))
    return sino, grid


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjointness_random_geometries(method, three_d, seed):
    sino, grid = _random_geometry(seed, three_d)
    P = fb.Projector(sino, grid, backend="torch", method=method)
    assert P.adjointness_error(dtype=torch.float64, batch=2, seed=seed) < 1e-6


def test_adjointness_with_psf_and_composition():
    sino, grid = _random_geometry(5, True)
    P = fb.Projector(sino, grid, backend="torch", psf_fwhm_mm=4.0)
    assert P.adjointness_error() < 1e-6
    G = fb.GaussianPSF(grid, 5.0)
    A = fb.Projector(sino, grid, backend="torch") @ G
    assert A.adjointness_error() < 1e-6
    assert A.out_shape == sino.shape


def _disc_image(grid, radius_mm, supersample=5):
    """Anti-aliased uniform disc (value 1) by supersampling each voxel."""
    ny, nx = grid.shape[1:]
    vy, vx = grid.voxel_size_mm[1:]
    off = (np.arange(supersample) + 0.5) / supersample - 0.5
    y = grid.axis_mm(1)[:, None, None, None] + vy * off[None, None, :, None]
    x = grid.axis_mm(2)[None, :, None, None] + vx * off[None, None, None, :]
    inside = (x**2 + y**2) <= radius_mm**2
    return torch.as_tensor(inside.mean(axis=(2, 3)))


@pytest.mark.parametrize("method", METHODS)
def test_disc_chord_lengths_2d(method):
    sino = fb.sinogram_preset("small2d")
    grid = fb.ImageGrid((1, 128, 128), (2.0, 1.5, 1.5))
    R = 70.0
    img = _disc_image(grid, R)[None].to(torch.float64)
    P = fb.Projector(sino, grid, backend="torch", method=method)
    y = P(img)[0]
    s, e = P.lor_endpoints()
    s2, e2 = s[..., :2], e[..., :2]
    d = ((s2[..., 0] * e2[..., 1] - s2[..., 1] * e2[..., 0]).abs() / (e2 - s2).norm(dim=-1))[0]
    inside = d < 0.8 * R
    expected = 2 * torch.sqrt(R**2 - d[inside] ** 2)
    rel = ((y[inside] - expected) / expected).abs()
    assert inside.sum() > 1000
    assert float(rel.max()) < 0.02


def test_cylinder_chord_lengths_3d():
    sino = fb.sinogram_preset("small3d")
    grid = fb.ImageGrid((8, 96, 96), (4.0, 2.0, 2.0))
    R = 70.0
    img = _disc_image(grid, R).expand(8, -1, -1).to(torch.float64)
    P = fb.Projector(sino, grid, backend="torch")
    y = P(img)
    s, e = P.lor_endpoints()
    dxy = e[..., :2] - s[..., :2]
    d = (s[..., 0] * e[..., 1] - s[..., 1] * e[..., 0]).abs() / dxy.norm(dim=-1)
    # the chord through the infinite cylinder, scaled by the obliqueness 1/cos(polar)
    obl = (e - s).norm(dim=-1) / dxy.norm(dim=-1)
    # LORs whose whole chord inside the cylinder stays within the axial extent
    zmax = 4.0 * 8 / 2 - 4.0
    half = torch.sqrt((R**2 - d**2).clamp_min(0)) * (e[..., 2] - s[..., 2]).abs() / dxy.norm(dim=-1)
    zmid = 0.5 * (s[..., 2] + e[..., 2])
    ok = (d < 0.8 * R) & ((zmid.abs() + half) < zmax)
    expected = 2 * torch.sqrt(R**2 - d[ok] ** 2) * obl[ok]
    rel = ((y[ok] - expected) / expected).abs()
    assert ok.sum() > 1000
    assert float(rel.max()) < 0.02


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(method):
    sino = fb.sinogram_preset("tiny2d")
    grid = fb.ImageGrid((1, 10, 10), (2.0, 12.0, 12.0))
    P = fb.Projector(sino, grid, backend="torch", method=method)
    x = torch.rand(1, *grid.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: P(t), (x,), eps=1e-6, atol=1e-6)
    y = torch.rand(1, *P.out_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: P.adjoint(t), (y,), eps=1e-6, atol=1e-6)


def test_matrix_and_on_the_fly_agree_float32():
    sino = fb.sinogram_preset("small3d")
    grid = fb.ImageGrid((8, 40, 40), (4.0, 4.0, 4.0))
    A = fb.Projector(sino, grid, backend="torch", method="matrix")
    B = fb.Projector(sino, grid, backend="torch", method="on-the-fly", max_chunk_samples=5000)
    x = torch.rand(3, 1, *grid.shape)
    ya, yb = A(x), B(x)
    assert ya.shape == (3, 1) + sino.shape
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4 * float(ya.abs().max()))
    y = torch.rand(2, *sino.shape)
    assert torch.allclose(A.adjoint(y), B.adjoint(y), rtol=1e-4, atol=1e-4 * float(A.adjoint(y).abs().max()))


def test_subsets_are_view_selections():
    sino = fb.sinogram_preset("small2d")
    grid = fb.ImageGrid((1, 32, 32), (2.0, 5.0, 5.0))
    P = fb.Projector(sino, grid, backend="torch")
    x = torch.rand(1, *grid.shape)
    y = P(x)
    back = torch.zeros(1, *grid.shape)
    for m in range(4):
        Pm = P.subset(m, 4)
        assert Pm.out_shape == (1, len(range(m, sino.num_views, 4)), sino.num_radial)
        assert torch.allclose(Pm(x), y[:, :, m::4], atol=1e-5)
        back += Pm.adjoint(y[:, :, m::4])
    assert torch.allclose(back, P.adjoint(y), rtol=1e-4, atol=1e-4)


def test_batches_and_dtype_preserved():
    sino = fb.sinogram_preset("tiny2d")
    grid = fb.ImageGrid((1, 16, 16), (2.0, 8.0, 8.0))
    P = fb.Projector(sino, grid, backend="torch")
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(2, 3, *grid.shape, dtype=dtype)
        y = P(x)
        assert y.shape == (2, 3) + sino.shape and y.dtype == dtype
        assert torch.allclose(y[1, 2], P(x[1, 2]))
        assert P.adjoint(y).shape == x.shape


def test_parallel_beam_geometry_square():
    g = fb.ParallelBeamGeometry(num_views=90, num_radial=65, bin_width_mm=1.0)
    grid = fb.ImageGrid((1, 64, 64), (1.0, 1.0, 1.0))
    P = fb.Projector(g, grid, backend="torch")
    assert P.adjointness_error() < 1e-6
    x = torch.zeros(1, *grid.shape, dtype=torch.float64)
    x[0, 0, 16:48, 16:48] = 1.0
    y = P(x)[0, 0]
    # view 0: rays along x; central bins see a 32-voxel (32 mm) path
    assert abs(float(y[0, 32]) - 32.0) < 1e-6


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (lambda P: torch.rand(1, 1, 5, 5), ValueError, "image must have shape"),
        (lambda P: torch.ones((1,) + P.in_shape, dtype=torch.int64), TypeError, "floating-point"),
        (lambda P: np.ones(P.in_shape), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs(bad, exc, match):
    P = fb.Projector(fb.sinogram_preset("tiny2d"), fb.ImageGrid((1, 8, 8), (2.0, 10.0, 10.0)), backend="torch")
    with pytest.raises(exc, match=match):
        P(bad(P))


def test_bad_construction():
    grid = fb.ImageGrid((1, 8, 8), (2.0, 10.0, 10.0))
    with pytest.raises(ValueError, match="backend"):
        fb.Projector(fb.sinogram_preset("tiny2d"), grid, backend="astra")
    with pytest.raises(ValueError, match="method"):
        fb.Projector(fb.sinogram_preset("tiny2d"), grid, backend="torch", method="fast")
    with pytest.raises(ValueError, match="2D image grid"):
        fb.Projector(fb.sinogram_preset("small3d"), grid, backend="torch")
    with pytest.raises(TypeError, match="ImageGrid"):
        fb.Projector(fb.sinogram_preset("tiny2d"), (1, 8, 8))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            fb.Projector(fb.sinogram_preset("tiny2d"), grid, backend="torch", device="cuda")
    if not fb.parallelproj_available():
        with pytest.raises(ImportError, match="parallelproj"):
            fb.Projector(fb.sinogram_preset("tiny2d"), grid, backend="parallelproj")
        assert fb.Projector(fb.sinogram_preset("tiny2d"), grid).backend == "torch"


# ------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    sino = fb.sinogram_preset("small3d")
    grid = fb.ImageGrid((8, 40, 40), (4.0, 4.0, 4.0))
    Pc = fb.Projector(sino, grid, backend="torch", method=method)
    Pg = fb.Projector(sino, grid, backend="torch", method=method, device="cuda")
    x = torch.rand(2, *grid.shape)
    yc, yg = Pc(x), Pg(x.cuda())
    assert yg.device.type == "cuda"
    assert torch.allclose(yc, yg.cpu(), rtol=1e-4, atol=1e-4 * float(yc.abs().max()))
    y = torch.rand(2, *sino.shape)
    assert torch.allclose(Pc.adjoint(y), Pg.adjoint(y.cuda()).cpu(), rtol=1e-4, atol=1e-3)
    assert Pg.adjointness_error() < 1e-6
    with pytest.raises(ValueError, match="is on cpu"):
        Pg(x)


@requires_cuda
@pytest.mark.cuda
def test_cuda_gradients():
    sino = fb.sinogram_preset("tiny2d")
    grid = fb.ImageGrid((1, 10, 10), (2.0, 12.0, 12.0))
    P = fb.Projector(sino, grid, backend="torch", device="cuda")
    x = torch.rand(1, *grid.shape, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: P(t), (x,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ parallelproj
@requires_parallelproj
@pytest.mark.parallelproj
@pytest.mark.parametrize("name, shape, vox", [("small2d", (1, 64, 64), (2.0, 4.0, 4.0)), ("small3d", (8, 48, 48), (4.0, 4.0, 4.0))])
def test_parallelproj_parity(name, shape, vox):
    sino = fb.sinogram_preset(name)
    grid = fb.ImageGrid(shape, vox)
    T = fb.Projector(sino, grid, backend="torch")
    Q = fb.Projector(sino, grid, backend="parallelproj")
    x = torch.rand(2, *grid.shape)
    yt, yq = T(x), Q(x)
    assert torch.allclose(yt, yq, rtol=1e-3, atol=1e-3 * float(yt.abs().max()))
    y = torch.rand(2, *sino.shape)
    bt, bq = T.adjoint(y), Q.adjoint(y)
    assert torch.allclose(bt, bq, rtol=1e-3, atol=1e-3 * float(bt.abs().max()))
    assert Q.adjointness_error(dtype=torch.float32) < 1e-4


def test_on_the_fly_without_sample_cache_is_identical():
    """Large geometries regenerate the sample grids per call (bounded memory): same result."""
    sino = fb.sinogram_preset("small3d")
    grid = fb.ImageGrid((8, 40, 40), (4.0, 4.0, 4.0))
    A = fb.Projector(sino, grid, backend="torch", method="on-the-fly", max_chunk_samples=5000)
    B = fb.Projector(sino, grid, backend="torch", method="on-the-fly", max_chunk_samples=5000)
    B._otf.cache_bytes = 0
    x = torch.rand(2, *grid.shape)
    y = A(x)
    assert torch.equal(y, B(x)) and torch.equal(A.adjoint(y), B.adjoint(y))
    assert len(B._otf._cache) == 0 and len(A._otf._cache) == 1


# ----------------------------------------------------------------- axial-segment path
def _segment_case(num_rings=6, mrd=3, vz=2.0, origin=None):
    sino = fb.sinogram_preset("small3d", num_rings=num_rings, max_ring_difference=mrd)
    nz = int(round(num_rings * 4.0 / vz))
    return sino, fb.ImageGrid((nz, 24, 24), (vz, 8.0, 8.0), origin)


@pytest.mark.parametrize("num_rings, mrd, vz, origin", [
    (6, 3, 2.0, None),                  # rings on half-voxel indices: segment -d flips segment d
    (4, 2, 4.0, None),                  # one voxel per ring
    (5, 3, 2.0, (-4.6, -92.0, -92.0)),  # rings off the half-voxel lattice (no flip), volume shorter than the scanner
])
def test_segments_equal_matrix_path(num_rings, mrd, vz, origin):
    sino, grid = _segment_case(num_rings, mrd, vz, origin)
    M = fb.Projector(sino, grid, backend="torch", method="matrix")
    S = fb.Projector(sino, grid, backend="torch", method="segments")
    assert S.method == "segments" and S._sampler_obj is None  # no per-bin sampling needed
    x = torch.rand(3, *grid.shape, dtype=torch.float64)
    ym, ys = M(x), S(x)
    assert torch.allclose(ys, ym, rtol=1e-10, atol=1e-10 * float(ym.abs().max()))
    y = torch.rand(2, 2, *sino.shape, dtype=torch.float64)  # two batch dimensions
    bm, bs = M.adjoint(y), S.adjoint(y)
    assert bs.shape == (2, 2) + grid.shape
    assert torch.allclose(bs, bm, rtol=1e-10, atol=1e-10 * float(bm.abs().max()))
    # view subsets: a subset geometry has fewer views, same segments
    Ms, Ss = M.subset(1, 3), S.subset(1, 3)
    assert Ss.method == "segments" and Ss.out_shape == Ms.out_shape
    assert torch.allclose(Ss(x), Ms(x), rtol=1e-10, atol=1e-10 * float(ym.abs().max()))
    ysub = y[0, :, :, 1::3]
    assert torch.allclose(Ss.adjoint(ysub), Ms.adjoint(ysub), rtol=1e-10, atol=1e-10 * float(bm.abs().max()))


def test_segments_adjointness_float32_and_gradients():
    sino, grid = _segment_case(4, 2, 2.0)
    S = fb.Projector(sino, grid, backend="torch", method="segments")
    assert S.adjointness_error(dtype=torch.float64, batch=3) < 1e-12
    x = torch.rand(2, *grid.shape)
    y = torch.rand(2, *sino.shape)
    lhs = float((S(x).double() * y.double()).sum())
    rhs = float((x.double() * S.adjoint(y).double()).sum())
    assert S(x).dtype == torch.float32 and abs(lhs - rhs) / abs(lhs) < 1e-5
    xs = torch.rand(1, *grid.shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, *sino.shape, dtype=torch.float64)
    (S(xs) * w).sum().backward()
    assert torch.allclose(xs.grad, S.adjoint(w), rtol=1e-12)


def test_segments_matrix_budget_rebuilds_without_caching():
    """Segments beyond the memory budget are rebuilt on each call: same result."""
    sino, grid = _segment_case(6, 3, 2.0)
    A = fb.Projector(sino, grid, backend="torch", method="segments")
    B = fb.Projector(sino, grid, backend="torch", method="segments", matrix_budget_bytes=0)
    x = torch.rand(2, *grid.shape, dtype=torch.float64)
    y = A(x)
    assert torch.equal(y, B(x)) and torch.equal(A.adjoint(y), B.adjoint(y))
    assert B._seg.cached_bytes == 0 and not B._seg._cache
    assert A._seg.cached_bytes > 0 and len(A._seg._cache) == 4  # |d| = 0..3
    assert A.matrix_nnz() == sum(A._seg.nnz.values()) > 0


def test_auto_picks_segments_or_falls_back():
    sino, grid = _segment_case(6, 3, 2.0)
    assert fb.Projector(sino, grid, backend="torch").method == "matrix"  # the full matrix fits
    assert fb.Projector(sino, grid, backend="torch", matrix_budget_bytes=10_000).method == "segments"
    # ring spacing 4 mm is not an integer multiple of 3 mm voxels: no exact axial shift
    g3 = fb.ImageGrid((8, 24, 24), (3.0, 8.0, 8.0))
    assert fb.Projector(sino, g3, backend="torch", matrix_budget_bytes=10_000).method == "on-the-fly"
    with pytest.raises(ValueError, match="not an integer multiple"):
        fb.Projector(sino, g3, backend="torch", method="segments")
    # LORs steeper than 45 degrees (axially dominant): fall back
    steep = fb.ImageGrid((48, 4, 4), (0.5, 40.0, 40.0))
    assert fb.Projector(sino, steep, backend="torch", matrix_budget_bytes=10_000).method == "on-the-fly"
    # 2D geometries never use it
    g2 = fb.ImageGrid((1, 16, 16), (2.0, 8.0, 8.0))
    assert fb.Projector(fb.sinogram_preset("tiny2d"), g2, backend="torch", matrix_budget_bytes=100).method == "on-the-fly"
    with pytest.raises(ValueError, match="2D image grid"):
        fb.Projector(fb.sinogram_preset("tiny2d"), g2, backend="torch", method="segments")


def test_segments_with_psf():
    sino, grid = _segment_case(4, 2, 2.0)
    M = fb.Projector(sino, grid, backend="torch", method="matrix", psf_fwhm_mm=5.0)
    S = fb.Projector(sino, grid, backend="torch", method="segments", psf_fwhm_mm=5.0)
    x = torch.rand(1, *grid.shape, dtype=torch.float64)
    assert torch.allclose(S(x), M(x), rtol=1e-10, atol=1e-10 * float(M(x).abs().max()))


@requires_cuda
@pytest.mark.cuda
def test_cuda_segments_match_cpu():
    sino, grid = _segment_case(6, 3, 2.0)
    Pc = fb.Projector(sino, grid, backend="torch", method="matrix")
    Pg = fb.Projector(sino, grid, backend="torch", method="segments", device="cuda")
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        x = torch.rand(2, *grid.shape, dtype=dtype)
        yc, yg = Pc(x), Pg(x.cuda())
        assert yg.device.type == "cuda" and yg.dtype == dtype
        assert torch.allclose(yc, yg.cpu(), rtol=tol, atol=tol * float(yc.abs().max()))
        y = torch.rand(2, *sino.shape, dtype=dtype)
        bc, bg = Pc.adjoint(y), Pg.adjoint(y.cuda()).cpu()
        assert torch.allclose(bc, bg, rtol=tol, atol=tol * float(bc.abs().max()))
    assert Pg.adjointness_error() < 1e-10
