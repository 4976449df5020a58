"""The parallelproj backend (fbsemlib/physics/_parallelproj.py): kernels, batches, subsets, PSF,
autograd, devices, and its parity with the torch Joseph paths.

Every test here is marked ``parallelproj`` and skipped, with the reason, only when parallelproj's
kernels are not importable. ``make parallelproj`` builds them into .venv; ``.ci/run`` does so
from ../shared/vendor and sets FBSEM_REQUIRE_PARALLELPROJ=1, which makes these tests run (and
fail) instead of skipping when the build did not give importable kernels.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import fbsemlib as fb
from fbsemlib.physics._parallelproj import parallelproj_available, parallelproj_info

REQUIRED = os.environ.get("FBSEM_REQUIRE_PARALLELPROJ") == "1"
pytestmark = [
    pytest.mark.parallelproj,
    pytest.mark.skipif(not parallelproj_available() and not REQUIRED,
                       reason="parallelproj not importable (make parallelproj PARALLELPROJ_SRC=../shared/vendor builds it)"),
]


def _tiny2d(**kw):
    sino, grid = fb.sinogram_preset("tiny2d"), fb.ImageGrid((1, 16, 16), (2.0, 9.0, 9.0))
    return fb.Projector(sino, grid, backend="parallelproj", **kw), fb.Projector(sino, grid, backend="torch", **kw)


def _small3d(**kw):
    """Three rings, every ring difference (oblique planes), a grid wider than the scanner's
    inscribed circle."""
    sc = fb.RingScanner(radius_mm=40.0, num_sides=8, crystals_per_side=5, crystal_spacing_mm=4.0, num_rings=3,
                        ring_spacing_mm=4.0)
    sino, grid = fb.SinogramGeometry(sc, radial_trim=4), fb.ImageGrid((6, 16, 16), (2.0, 4.0, 4.0))
    return fb.Projector(sino, grid, backend="parallelproj", **kw), fb.Projector(sino, grid, backend="torch", **kw)


def _close(a, b, rel=1e-5):
    """Equal up to float32 rounding, relative to the largest value."""
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


# ------------------------------------------------------------------------------ kernels
def test_kernels_importable_and_described():
    assert parallelproj_available()
    info = parallelproj_info()
    assert info["parallelproj_core_version"] or info["parallelproj_version"]
    assert isinstance(info["parallelproj_cuda"], bool)


def test_fbsem_info_reports_parallelproj(capsys):
    from fbsemlib.cli import main

    assert main(["info", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["parallelproj"] is True
    assert out["parallelproj_core_version"] == parallelproj_info()["parallelproj_core_version"]
    assert out["parallelproj_cuda"] in (True, False)


def test_kernels_get_preallocated_float32_buffers_and_no_copies(monkeypatch):
    """The kernels are handed C-contiguous float32 torch tensors (DLPack) and write into the
    tensors that are returned: no conversion to numpy, no copy of the result."""
    Q, _ = _tiny2d()
    core = Q._parallelproj.module
    if Q._parallelproj.api != 2:
        pytest.skip("parallelproj 1.x kernels return new arrays")
    seen = {}

    def spy(name):
        real = getattr(core, name)

        def call(*args):
            seen[name] = args
            return real(*args)

        return call

    monkeypatch.setattr(core, "joseph3d_fwd", spy("joseph3d_fwd"))
    monkeypatch.setattr(core, "joseph3d_back", spy("joseph3d_back"))
    x = torch.rand(1, *Q.in_shape)
    y = Q(x)
    b = Q.adjoint(y)
    for name in ("joseph3d_fwd", "joseph3d_back"):
        for a in seen[name][:6]:
            assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.is_contiguous()
    assert seen["joseph3d_fwd"][5].data_ptr() == y.data_ptr()  # the output buffer is the result
    assert b.untyped_storage().data_ptr() == seen["joseph3d_back"][2].untyped_storage().data_ptr()
    # the endpoints stay on the operator between calls
    assert Q._parallelproj._geometry(x.device)[0] is seen["joseph3d_fwd"][0]


def test_back_projection_is_zeroed_every_call():
    """parallelproj's back-projection adds into its output: calling twice must not accumulate."""
    Q, T = _tiny2d()
    y = torch.rand(2, *Q.out_shape)
    b1, b2 = Q.adjoint(y), Q.adjoint(y)
    assert torch.equal(b1, b2) or _close(b1, b2, 1e-6)
    assert _close(b1, T.adjoint(y))


# --------------------------------------------------------------- batches, subsets, PSF
def test_batches_and_leading_dimensions():
    Q, T = _small3d()
    x = torch.rand(2, 3, *Q.in_shape)
    y = Q(x)
    assert y.shape == (2, 3) + Q.out_shape
    for i in range(2):
        for j in range(3):
            assert torch.equal(y[i, j], Q(x[i, j]))
    assert _close(y, T(x))
    s = torch.rand(4, *Q.out_shape)
    assert _close(Q.adjoint(s), T.adjoint(s))


def test_float64_in_float64_out():
    Q, T = _tiny2d()
    x = torch.rand(2, *Q.in_shape, dtype=torch.float64)
    y = Q(x)
    assert y.dtype == torch.float64 and Q.adjoint(y).dtype == torch.float64
    assert _close(y, T(x))


@pytest.mark.parametrize("num_subsets", [3, 7])
def test_subsets(num_subsets):
    Q, T = _small3d()
    x = torch.rand(2, *Q.in_shape)
    y = Q(x)
    s = torch.rand(2, *Q.out_shape)
    for m in range(num_subsets):
        Qm = Q.subset(m, num_subsets)
        assert Qm.backend == "parallelproj" and Qm is Q.subset(m, num_subsets)
        assert _close(Qm(x), y[:, :, m::num_subsets])
        only_m = torch.zeros_like(s)
        only_m[:, :, m::num_subsets] = s[:, :, m::num_subsets]
        assert _close(Qm.adjoint(s[:, :, m::num_subsets].contiguous()), T.adjoint(only_m))


def test_psf():
    Q, T = _small3d(psf_fwhm_mm=(4.0, 10.0, 10.0))
    x = torch.rand(1, *Q.in_shape)
    assert _close(Q(x), T(x))
    s = torch.rand(1, *Q.out_shape)
    assert _close(Q.adjoint(s), T.adjoint(s))
    assert _close(Q.without_psf()(x), T.without_psf()(x))


# ----------------------------------------------------------------------------- autograd
def test_autograd_forward_and_adjoint_are_each_others_gradient():
    Q, _ = _tiny2d()
    x = torch.rand(2, *Q.in_shape, requires_grad=True)
    w = torch.rand(2, *Q.out_shape)
    (Q(x) * w).sum().backward()
    assert _close(x.grad, Q.adjoint(w), 1e-6)  # the kernel's atomic adds: summation order varies
    s = torch.rand(2, *Q.out_shape, requires_grad=True)
    v = torch.rand(2, *Q.in_shape)
    (Q.adjoint(s) * v).sum().backward()
    assert torch.equal(s.grad, Q(v))
    assert Q.adjointness_error(dtype=torch.float32, batch=2) < 1e-5
    assert Q.adjointness_error(dtype=torch.float64) < 1e-5  # float32 kernels


def test_autograd_through_a_loss():
    """A reconstruction-style loss: d/dx sum((Ax - y)^2) = 2 A^T (Ax - y)."""
    Q, T = _small3d()
    x = torch.rand(1, *Q.in_shape, requires_grad=True)
    y = torch.rand(1, *Q.out_shape) * 50
    ((Q(x) - y) ** 2).sum().backward()
    with torch.no_grad():
        expected = 2 * T.adjoint(T(x) - y)
    assert _close(x.grad, expected, 1e-4)


# ------------------------------------------------------------------------------ devices
def test_cpu_kernels_reject_cuda_tensors_with_a_clear_error():
    if parallelproj_info()["parallelproj_cuda"]:
        pytest.skip("these kernels were built with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(ValueError, match="CUDA"):
        _tiny2d(device="cuda")[0](torch.rand(1, 1, 16, 16, device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_tensors_through_dlpack():
    if not parallelproj_info()["parallelproj_cuda"]:
        pytest.skip("parallelproj's kernels were built without CUDA")
    Qc, T = _small3d()
    Qg = Qc.to("cuda")
    x = torch.rand(2, *Qc.in_shape)
    yg = Qg(x.cuda())
    assert yg.device.type == "cuda"
    assert _close(yg.cpu(), T(x))
    s = torch.rand(2, *Qc.out_shape)
    assert _close(Qg.adjoint(s.cuda()).cpu(), T.adjoint(s))


# ------------------------------------------------------------------------------- parity
# The kernels compute sample positions in float32 from coordinates of up to Rv voxels (the largest
# LOR endpoint coordinate in voxel units), so every position carries an error of a few float32
# ulps of Rv: delta = 4 eps Rv voxels (eps = 2^-23). A sample of an image whose neighbouring
# voxels differ by at most 2 max|x| then moves by at most 2 max|x| delta, and a LOR's samples
# (one per plane, weight = step) add up to its chord through the image box grown by the one
# voxel a sample can reach beyond it:
#     per LOR:    |A_pp x - A_torch x|_i <= chord_i * 2 max|x| * delta
#     per voxel:  |A_pp^T y - A_torch^T y|_j <= (largest column sum of A around j) * 2 max|y| * delta
# (a position error moves at most a fraction delta of a sample's weight between neighbouring
# voxels). The measured worst case is 0.02 to 0.1 of these bounds; each convention difference
# the backend removes (field-of-view edge, principal-axis ties) exceeds them (tested below).
EPS32 = float(np.finfo(np.float32).eps)

PARITY_CASES = {
    # the 2D mMR of the benchmarks and the book: 172 x 172 voxels of 2.086 mm, 252 x 345 bins
    "mmr2d": (lambda: fb.sinogram_preset("mmr2d"), (1, 172, 172), (2.031, 2.086, 2.086)),
    # an image box wider than the inscribed circle: LOR endpoints inside the box's corners
    "small2d": (lambda: fb.sinogram_preset("small2d"), (1, 64, 64), (2.0, 4.0, 4.0)),
    # 3D, 8 rings, ring differences up to 3 (oblique planes), isotropic voxels
    "small3d": (lambda: fb.sinogram_preset("small3d"), (8, 48, 48), (4.0, 4.0, 4.0)),
    # 3D, anisotropic voxels (z half the ring spacing, as for the 3D mMR), 7 rings, differences <= 6
    "small3d-aniso": (lambda: fb.sinogram_preset("small3d", num_rings=7, max_ring_difference=6), (14, 40, 40),
                      (2.0, 4.5, 4.5)),
}


def _parity_case(name):
    make, shape, vox = PARITY_CASES[name]
    sino, grid = make(), fb.ImageGrid(shape, vox)
    return sino, grid, fb.Projector(sino, grid, backend="parallelproj"), fb.Projector(sino, grid, backend="torch")


def _delta_voxels(sino, grid) -> float:
    from fbsemlib.physics._joseph import to_index_coords

    s, e = sino.lor_endpoints()
    return 4 * EPS32 * float(torch.cat([to_index_coords(s, grid), to_index_coords(e, grid)]).abs().max())


def _chord_mm(sino, grid, margin_voxels: float = 1.0) -> torch.Tensor:
    """Length (mm) of every LOR inside the image box grown by ``margin_voxels`` on each side."""
    s, e = (t.reshape(-1, 3).numpy()[:, ::-1] for t in sino.lor_endpoints())  # (z, y, x)
    o, v, n = np.asarray(grid.origin_mm), np.asarray(grid.voxel_size_mm), np.asarray(grid.shape)
    lo, hi = o - (0.5 + margin_voxels) * v, o + (n - 0.5 + margin_voxels) * v
    d = e - s
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - s) / d, (hi - s) / d
    flat, inside = d == 0, (s >= lo) & (s <= hi)
    tmin = np.where(flat, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2)).max(1).clip(0, 1)
    tmax = np.where(flat, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2)).min(1).clip(0, 1)
    return torch.from_numpy(np.maximum(tmax - tmin, 0) * np.linalg.norm(d, axis=1)).reshape(sino.shape)


def _lor_violations(Q, T, sino, grid, x) -> torch.Tensor:
    """Per LOR: |difference| / bound (> 1 violates)."""
    bound = _chord_mm(sino, grid) * 2 * float(x.abs().max()) * _delta_voxels(sino, grid)
    return (Q(x) - T(x)).abs() / (bound + 1e-30)


def _voxel_violations(Q, T, sino, grid, y) -> torch.Tensor:
    col = T.adjoint(torch.ones(sino.shape))
    col_near = torch.nn.functional.max_pool3d(col[None], 3, stride=1, padding=1)[0]
    bound = col_near * 2 * float(y.abs().max()) * _delta_voxels(sino, grid)
    return (Q.adjoint(y) - T.adjoint(y)).abs() / (bound + 1e-30)


@pytest.mark.parametrize("name", list(PARITY_CASES))
def test_parity_per_lor_and_per_voxel(name):
    sino, grid, Q, T = _parity_case(name)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(grid.shape, generator=g)
    y = torch.rand(sino.shape, generator=g)
    fwd, adj = _lor_violations(Q, T, sino, grid, x), _voxel_violations(Q, T, sino, grid, y)
    assert float(fwd.max()) <= 1, f"{int((fwd > 1).sum())} LORs outside the float32 bound (worst {float(fwd.max()):.2f})"
    assert float(adj.max()) <= 1, f"{int((adj > 1).sum())} voxels outside the float32 bound (worst {float(adj.max()):.2f})"
    # and overall: relative L2 differences at float32 level (measured 3e-7 to 1.1e-6)
    assert float((Q(x) - T(x)).norm() / T(x).norm()) < 1e-5
    assert float((Q.adjoint(y) - T.adjoint(y)).norm() / T.adjoint(y).norm()) < 1e-5


def test_parity_at_the_field_of_view_edge():
    """An image that is zero but for its outermost voxels: the difference the kernels alone
    show (they clip samples at the outer voxel faces, torch keeps the half-voxel ramp beyond)."""
    sino, grid, Q, T = _parity_case("mmr2d")
    x = torch.rand(grid.shape, generator=torch.Generator().manual_seed(1))
    x[:, 1:-1, 1:-1] = 0
    assert float(_lor_violations(Q, T, sino, grid, x).max()) <= 1
    assert float((Q(x) - T(x)).norm() / T(x).norm()) < 1e-5
    # the kernels without the zero voxel around the image are far outside the bound
    pp = Q._parallelproj
    pp.padded_shape, pp._inner, pp._origin, pp._on = grid.shape, (slice(None),) * 4, grid.origin_mm, {}
    assert float(_lor_violations(Q, T, sino, grid, x).max()) > 10


def test_parity_of_45_degree_lors(monkeypatch):
    """LORs whose principal axis is a near tie: torch's axis for all of them, and without the
    settling the kernels' rounding picks the other axis for some, far outside the bound."""
    sino, grid, Q, T = _parity_case("small2d")
    x = torch.rand(grid.shape, generator=torch.Generator().manual_seed(2))
    assert Q._parallelproj.settled_ties > 0
    assert float(_lor_violations(Q, T, sino, grid, x).max()) <= 1
    import fbsemlib.physics._parallelproj as backend

    monkeypatch.setattr(backend, "_settle_ties", lambda start, end, want: 0)
    unsettled = fb.Projector(sino, grid, backend="parallelproj")
    assert float(_lor_violations(unsettled, T, sino, grid, x).max()) > 10


def test_one_slice_image_off_centre():
    """A 2D grid whose slice is not at the LORs' z: torch treats it as 2D (no z weight), and so
    does the backend (the LORs are handed over through the slice centre)."""
    sino = fb.sinogram_preset("tiny2d")
    grid = fb.ImageGrid((1, 16, 16), (4.0, 9.0, 9.0), origin_mm=(1.5, -67.5, -67.5))
    Q, T = fb.Projector(sino, grid, backend="parallelproj"), fb.Projector(sino, grid, backend="torch")
    x = torch.rand(1, *grid.shape)
    assert _close(Q(x), T(x))


@pytest.mark.parametrize("name, views", [("mmr2d", None), ("small3d", None), ("small3d-aniso", (1, 8)),
                                         ("odd-half-ring", None)])
def test_lor_endpoints_match_regular_polygon_lor_descriptor(name, views):
    """fbsemlib's sinogram bins are parallelproj's RegularPolygonPETLORDescriptor bins (with the
    options of parallelproj_lor_descriptor). parallelproj computes the crystal positions in
    float32, angles up to 2 pi included: an error up to about 2 pi eps R, twice that allowed."""
    pytest.importorskip("parallelproj.pet_lors", reason="the parallelproj Python package is not installed")
    from fbsemlib.physics._parallelproj import parallelproj_lor_descriptor

    if name == "odd-half-ring":  # n / 2 odd: the other zig-zag
        sino = fb.SinogramGeometry(fb.RingScanner(100.0, 10, 5, 5.0, num_rings=3), radial_trim=5)
    else:
        sino = PARITY_CASES[name][0]()
    if views is not None:
        sino = sino.subset(*views)
    start, end = parallelproj_lor_descriptor(sino).get_lor_coordinates(
        views=None if sino.views is None else np.asarray(sino.views))
    S, E = sino.lor_endpoints()
    assert start.shape == tuple(S.shape) and end.shape == tuple(E.shape)
    tol = 2 * 2 * np.pi * EPS32 * sino.scanner.radius_mm / np.cos(np.pi / sino.scanner.num_sides)
    assert np.abs(start - S.numpy()).max() <= tol and np.abs(end - E.numpy()).max() <= tol


# ------------------------------------------------------------------------- backend="auto"
def test_auto_picks_by_the_measured_rule(monkeypatch):
    """backend="auto" (the projector docstring's table): the torch sparse products wherever
    their matrices exist (12x to 35x faster than parallelproj's CPU kernels), parallelproj
    instead of the torch on-the-fly path (1.1x to 17x faster) when its kernels serve the device."""
    import fbsemlib.physics.projector as projector

    mmr2d = fb.sinogram_preset("mmr2d"), fb.ImageGrid((1, 172, 172), (2.031, 2.086, 2.086))
    P = fb.Projector(*mmr2d)
    assert (P.backend, P.method) == ("torch", "matrix")
    assert (P.subset(1, 4).backend, P.to("cpu").backend) == ("torch", "torch")
    sino3 = fb.sinogram_preset("small3d")
    P = fb.Projector(sino3, fb.ImageGrid((8, 48, 48), (4.0, 4.0, 4.0)), matrix_budget_bytes=1)
    assert (P.backend, P.method) == ("torch", "segments")
    off_grid = fb.ImageGrid((10, 48, 48), (3.0, 4.0, 4.0))  # ring spacing 4 mm: no axial shifts
    P = fb.Projector(sino3, off_grid, matrix_budget_bytes=1)
    assert (P.backend, P.method) == ("parallelproj", None)
    assert P.subset(2, 3).backend == "parallelproj" and P.to("cpu") is P
    # a torch method asked for is a torch projector
    assert fb.Projector(sino3, off_grid, method="on-the-fly").backend == "torch"
    # kernels that do not serve the device (CUDA kernels for CPU tensors, CPU kernels for CUDA
    # tensors), or no kernels at all: the torch on-the-fly path
    monkeypatch.setattr(projector, "parallelproj_serves", lambda device: False)
    P = fb.Projector(sino3, off_grid, matrix_budget_bytes=1)
    assert (P.backend, P.method) == ("torch", "on-the-fly")
