import json

import numpy as np
import pytest
import torch

import fbsemlib as fb
from markers import requires_cuda, requires_parallelproj

METHODS = ["matrix", "on-the-fly"]


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


# ------------------------------------------------------------- PSF-free part, composites
def _tiny(psf=None, **kw):
    return fb.Projector(fb.sinogram_preset("tiny2d"), fb.ImageGrid((1, 10, 10), (2.0, 12.0, 12.0)), backend="torch",
                        psf_fwhm_mm=psf, **kw)


def test_without_psf_shares_the_projector_and_leaves_it_unchanged():
    P, A = _tiny(20.0), _tiny()
    L = P.without_psf()
    assert L is P.without_psf() and A.without_psf() is A
    x = torch.rand(2, *P.in_shape, dtype=torch.float64)
    assert torch.equal(L(x), A(x)) and not torch.allclose(P(x), A(x))
    y = torch.rand(2, *P.out_shape, dtype=torch.float64)
    assert torch.equal(L.adjoint(y), A.adjoint(y))
    assert P._matrices and set(P._matrices) == {torch.float64}  # L used P's matrix
    # attenuation factors: exp(-A mu) without the PSF, and the (possibly shared) projector keeps it
    psf = P.psf
    a = fb.attenuation_factors(P, x[0])
    assert P.psf is psf and torch.equal(a, torch.exp(-A(x[0])))


def test_composite_exposes_only_its_sinogram_helpers():
    P = _tiny()
    G = fb.GaussianPSF(P.grid, 20.0)
    C = P @ G
    assert isinstance(C, fb.CompositeOperator) and (C.a, C.b) == (P, G)
    s, e = C.lor_endpoints()
    assert torch.equal(s, P.lor_endpoints()[0]) and torch.equal(e, P.lor_endpoints()[1])
    Cs = C.subset(1, 3)
    assert Cs.a is P.subset(1, 3) and Cs.b is G and [c.a for c in C.subsets(3)] == P.subsets(3)
    x = torch.rand(1, *P.in_shape, dtype=torch.float64)
    assert torch.equal(Cs(x), C(x)[..., 1::3, :])
    for name in ("grid", "sinogram", "psf", "method", "no_such_thing"):  # no blanket forwarding
        assert not hasattr(C, name), name
    # a composite serves as the projector of a forward model
    model = fb.PETForwardModel(C, torch.full(P.out_shape, 0.5), None)
    assert torch.allclose(model.subset(1, 3).expected(x.float()), 0.5 * C(x.float())[..., 1::3, :])


def test_subset_of_one_and_move_to_the_same_device_are_the_projector_itself():
    P = _tiny()
    assert P.subset(0, 1) is P and P.to("cpu") is P and P.to(torch.device("cpu")) is P
    assert P.subset(1, 3) is P.subset(1, 3)
    for m, M in ((1, 1), (3, 3), (0, 0), (0, P.out_shape[1] + 1)):
        with pytest.raises(ValueError, match="subset|num_subsets"):
            P.subset(m, M)


# ------------------------------------------------------------------------ the projector cache
@pytest.fixture
def cache(monkeypatch):
    from fbsemlib.physics import cache as c

    monkeypatch.setattr(c, "_cache", type(c._cache)())
    return c


def _geometry():
    return fb.sinogram_preset("tiny2d"), fb.ImageGrid((1, 10, 10), (2.0, 12.0, 12.0))


def test_cache_one_projector_per_key(cache):
    sino, grid = _geometry()
    P = cache.shared_projector(sino, grid)
    assert cache.shared_projector(sino, grid, device=torch.device("cpu"), backend="torch") is P
    assert cache.shared_projector(fb.sinogram_preset("tiny2d"), fb.ImageGrid((1, 10, 10), (2.0, 12.0, 12.0))) is P
    others = [cache.shared_projector(sino, grid, psf_fwhm_mm=4.0),
              cache.shared_projector(sino, grid, psf_fwhm_mm=(4.0, 4.0, 5.0)),
              cache.shared_projector(sino, grid, method="on-the-fly")]
    assert len({id(P)} | {id(o) for o in others}) == 4 and cache.cached_count() == 4
    assert others[0].psf is not None and others[2].method == "on-the-fly"
    cache.clear()
    assert cache.cached_count() == 0 and cache.shared_projector(sino, grid) is not P


def test_cache_drops_the_least_recently_used(cache):
    sino, grid = _geometry()
    ps = [cache.shared_projector(sino, grid, psf_fwhm_mm=float(k + 1)) for k in range(cache.CACHE_SIZE)]
    assert cache.shared_projector(sino, grid, psf_fwhm_mm=1.0) is ps[0]  # now the most recent
    cache.shared_projector(sino, grid, psf_fwhm_mm=99.0)  # one too many: ps[1] goes
    assert cache.cached_count() == cache.CACHE_SIZE
    assert cache.shared_projector(sino, grid, psf_fwhm_mm=1.0) is ps[0]
    assert cache.shared_projector(sino, grid, psf_fwhm_mm=2.0) is not ps[1]


def test_cache_spec_round_trip(cache):
    sino, grid = _geometry()
    for psf in (None, 4.0, (3.0, 4.0, 5.0)):
        P = cache.shared_projector(sino.subset(1, 2), grid, psf_fwhm_mm=psf)
        spec = cache.projector_spec(P)
        assert json.loads(json.dumps(spec)) == spec
        Q = cache.projector_from_spec(json.loads(json.dumps(spec)), "cpu")
        assert Q.sinogram == P.sinogram and Q.grid == P.grid and Q.backend == "torch"
        assert cache.projector_spec(Q) == spec
    pb = fb.ParallelBeamGeometry(num_views=12, num_radial=15, bin_width_mm=2.0)
    Q = cache.projector_from_spec(cache.projector_spec(fb.Projector(pb, grid, backend="torch")))
    assert Q.sinogram == pb


def test_cache_parallelproj_spec_falls_back_to_torch(cache, monkeypatch):
    sino, grid = _geometry()
    spec = {**cache.projector_spec(cache.shared_projector(sino, grid)), "backend": "parallelproj"}
    monkeypatch.setattr(cache, "parallelproj_available", lambda: False)
    with pytest.warns(UserWarning, match="parallelproj"):
        Q = cache.projector_from_spec(spec)
    assert Q.backend == "torch" and Q is cache.shared_projector(sino, grid)


@requires_cuda
@pytest.mark.cuda
def test_cache_one_projector_per_device(cache):
    sino, grid = _geometry()
    P, Q = cache.shared_projector(sino, grid), cache.shared_projector(sino, grid, device="cuda")
    assert P is not Q and Q.device.type == "cuda" and P.to("cuda").device.type == "cuda"
