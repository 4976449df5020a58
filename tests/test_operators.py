"""The shared operator checks (tests/operator_checks.py) over every linear operator: the three
torch projector paths (matrix, on-the-fly, axial segments), the parallel-beam geometry,
ordered subsets, the PSF, a projector with PSF and its PSF-free part, composites, the linear
part of the forward model, parallelproj (when importable) and CUDA (when available)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import fbsemlib as fb
from markers import requires_cuda, requires_parallelproj
from operator_checks import (
    autodiff_test,
    batching_test,
    device_test,
    dotproduct_adjointness_test,
    dtype_test,
    random_input,
)


def _tiny2d():
    return fb.sinogram_preset("tiny2d"), fb.ImageGrid((1, 10, 10), (2.0, 12.0, 12.0))


def _tiny3d(vz: float = 2.0):
    """A small span-1 3D scanner (3 rings, every ring difference) whose ring spacing is two
    voxels: all three torch paths apply."""
    sc = fb.RingScanner(radius_mm=30.0, num_sides=8, crystals_per_side=4, crystal_spacing_mm=4.0, num_rings=3,
                        ring_spacing_mm=4.0)
    sino = fb.SinogramGeometry(sc, radial_trim=4, max_ring_difference=2)
    return sino, fb.ImageGrid((int(12 / vz), 10, 10), (vz, 4.0, 4.0))


def _projector(geometry, method="matrix", backend="torch", **kw):
    def make(device):
        sino, grid = geometry()
        if backend == "parallelproj":
            return fb.Projector(sino, grid, backend="parallelproj", device=device, **kw)
        return fb.Projector(sino, grid, backend="torch", method=method, device=device, **kw)

    return make


class _ModelLinear:
    """The linear part ``m * A x`` of a forward model and its adjoint ``A^T (m y)`` as an operator."""

    def __init__(self, model: fb.PETForwardModel):
        self.model = model
        self.in_shape, self.out_shape = model.projector.in_shape, model.projector.out_shape
        self.device = model.device

    def __call__(self, x):
        return self.model.linear(x)

    def adjoint(self, y):
        return self.model.linear_adjoint(y)


def _forward_model(subset: int | None = None):
    def make(device):
        P = _projector(_tiny3d, psf_fwhm_mm=5.0)(device)
        g = torch.Generator().manual_seed(5)
        mult = (0.5 + torch.rand(P.out_shape, generator=g)).to(device)  # float32, as in datasets
        model = fb.PETForwardModel(P, mult, torch.full(P.out_shape, 0.1, device=device))
        return _ModelLinear(model if subset is None else model.subset(subset, 3))

    return make


def _parallel_beam(device):
    g = fb.ParallelBeamGeometry(num_views=12, num_radial=15, bin_width_mm=2.0)
    return fb.Projector(g, fb.ImageGrid((1, 10, 10), (1.0, 2.0, 2.0)), backend="torch", device=device)


@dataclass
class Case:
    make: Callable[[torch.device], object]
    gradcheck: bool = True  # torch's finite-difference check too (float64 maths only)
    rtol: float = 1e-10  # float64 checks


CASES = {
    "matrix-2d": Case(_projector(_tiny2d, "matrix")),
    "on-the-fly-2d": Case(_projector(_tiny2d, "on-the-fly")),
    "matrix-3d": Case(_projector(_tiny3d, "matrix")),
    "on-the-fly-3d": Case(_projector(_tiny3d, "on-the-fly", max_chunk_samples=2000)),
    "segments-3d": Case(_projector(_tiny3d, "segments")),
    "parallel-beam": Case(_parallel_beam),
    "subset-matrix-2d": Case(lambda d: _projector(_tiny2d, "matrix")(d).subset(1, 3)),
    "subset-on-the-fly-3d": Case(lambda d: _projector(_tiny3d, "on-the-fly")(d).subset(2, 3)),
    "subset-segments-3d": Case(lambda d: _projector(_tiny3d, "segments")(d).subset(0, 4)),
    "psf": Case(lambda d: fb.GaussianPSF(_tiny3d()[1], (3.0, 5.0, 6.0), device=d)),
    "projector-with-psf": Case(_projector(_tiny3d, "matrix", psf_fwhm_mm=5.0)),
    "projector-without-psf": Case(lambda d: _projector(_tiny3d, "segments", psf_fwhm_mm=5.0)(d).without_psf()),
    "composite": Case(lambda d: _projector(_tiny3d, "on-the-fly")(d) @ fb.GaussianPSF(_tiny3d()[1], 5.0, device=d)),
    "composite-subset": Case(lambda d: (_projector(_tiny2d)(d) @ fb.GaussianPSF(_tiny2d()[1], 20.0, device=d)).subset(2, 3)),
    "forward-model": Case(_forward_model()),
    "forward-model-subset": Case(_forward_model(subset=1)),
}
PARALLELPROJ = {
    "parallelproj-2d": Case(_projector(_tiny2d, backend="parallelproj"), gradcheck=False, rtol=1e-4),
    "parallelproj-3d": Case(_projector(_tiny3d, backend="parallelproj"), gradcheck=False, rtol=1e-4),
}
ALL = [pytest.param(n, id=n) for n in CASES] + [
    pytest.param(n, id=n, marks=[pytest.mark.parallelproj, requires_parallelproj]) for n in PARALLELPROJ]


def _case(name: str) -> Case:
    return CASES.get(name) or PARALLELPROJ[name]


@pytest.fixture(scope="module")
def cpu_ops():
    """Each case's operator on the CPU, built once (the projectors keep their matrices)."""
    return {}


def _op(cpu_ops, name):
    if name not in cpu_ops:
        cpu_ops[name] = _case(name).make(torch.device("cpu"))
    return cpu_ops[name]


@pytest.mark.parametrize("name", ALL)
def test_adjointness(cpu_ops, name):
    op = _op(cpu_ops, name)
    x, y = random_input(op, batch=(2,), seed=1), random_input(op, adjoint=True, batch=(2,), seed=2)
    dotproduct_adjointness_test(op, x, y, rtol=_case(name).rtol)


@pytest.mark.parametrize("name", ALL)
def test_autodiff(cpu_ops, name):
    op, case = _op(cpu_ops, name), _case(name)
    autodiff_test(op, random_input(op, seed=4), rtol=case.rtol, gradcheck=case.gradcheck)


@pytest.mark.parametrize("name", ALL)
def test_batching(cpu_ops, name):
    op = _op(cpu_ops, name)
    batching_test(op, random_input(op, seed=5), rtol=max(_case(name).rtol, 1e-12))


@pytest.mark.parametrize("name", ALL)
def test_dtype(cpu_ops, name):
    op = _op(cpu_ops, name)
    dtype_test(op, random_input(op, seed=6))


@pytest.mark.parametrize("name", ALL)
def test_device_cpu(name):
    case = _case(name)
    device_test(case.make, random_input(case.make(torch.device("cpu")), seed=7), "cpu")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", ALL)
def test_device_cuda(name):
    case = _case(name)
    device_test(case.make, random_input(case.make(torch.device("cpu")), seed=7), "cuda")
    op = case.make(torch.device("cuda"))
    x = random_input(op, batch=(2,), seed=1)
    dotproduct_adjointness_test(op, x, random_input(op, adjoint=True, batch=(2,), seed=2), rtol=max(case.rtol, 1e-8))
    autodiff_test(op, x[:1], rtol=max(case.rtol, 1e-8), gradcheck=False)
