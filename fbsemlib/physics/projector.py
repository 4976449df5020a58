"""The PET projector: line integrals through an image along every sinogram bin.

``Projector(sinogram, grid)`` is a :class:`~fbsemlib.physics.operators.LinearOperator` from
images ``(..., Z, Y, X)`` to sinograms ``(..., planes, views, radial)``.

Backends
--------
``"torch"``        Joseph's method written in torch (CPU and CUDA, float32/float64,
                   differentiable). Three execution paths (``method=``):
                   ``"matrix"`` -- a precomputed CSR system matrix (fastest; chosen by
                   ``"auto"`` when the matrix and its transpose fit
                   ``matrix_budget_bytes``, 1 GiB by default: every 2D geometry and
                   small 3D ones);
                   ``"segments"`` -- span-1 ring geometries whose ring spacing is an
                   integer number of z voxels: one matrix per ring difference, applied
                   to all the planes of that segment by axial shifts
                   (:class:`~fbsemlib.physics._joseph.AxialSegments`; chosen by ``"auto"`` for
                   3D geometries whose full matrix does not fit the budget);
                   ``"on-the-fly"`` -- chunked sampling with ``grid_sample`` (memory
                   bounded by ``max_chunk_samples``; chosen for the other large 3D
                   geometries).
``"parallelproj"`` the same Joseph operator computed by parallelproj's compiled kernels
                   (C++/OpenMP, or CUDA when built with it;
                   :mod:`fbsemlib.physics._parallelproj`), when they are importable
                   (``make parallelproj`` builds them into .venv).
``"auto"``         the torch paths above, except where they would sample on the fly
                   (``method="auto"`` found neither ``"matrix"`` nor ``"segments"``) and
                   parallelproj's kernels serve the device (CPU kernels for ``"cpu"``, CUDA
                   kernels for ``"cuda"``): there parallelproj. Not merely "what is
                   installed": measured side by side on the 2-core CPU these projectors were
                   written on (float32, median of interleaved calls, per image;
                   ``tests/test_parallelproj.py`` checks that "auto" follows this rule):

                   ========================  ==========  ===============  ============  =====
                   problem, batch            torch path  torch fwd / adj  parallelproj  ratio
                   ========================  ==========  ===============  ============  =====
                   2D mMR 172x172, 1         matrix      8.4 / 11 ms      70 / 158 ms   12
                   2D mMR 172x172, 16        matrix      3.0 / 3.4 ms     64 / 156 ms   35
                   2D mMR 172x172, 1         on-the-fly  137 / 168 ms     70 / 158 ms   0.75
                   2D mMR 172x172, 16        on-the-fly  87 / 155 ms      64 / 156 ms   0.91
                   3D mMR slab, 1            segments    0.45 / 0.33 s    2.3 / 7.0 s   12
                   3D mMR slab, 1            on-the-fly  70 / 89 s        2.3 / 7.0 s   0.06
                   ========================  ==========  ===============  ============  =====

                   (ratio: parallelproj's time over torch's, forward plus adjoint; the slab is
                   8 mMR rings, ring difference <= 1, 22 planes, 15x172x172 voxels.)
                   The torch sparse products win wherever their matrices exist, whatever the
                   batch; parallelproj's OpenMP kernels beat only the ``grid_sample`` path. No
                   GPU was measured: on CUDA the same rule applies, with parallelproj only
                   when its kernels were built with CUDA.

An optional image-space Gaussian PSF (``psf_fwhm_mm``) makes the operator ``A G``.
"""

from __future__ import annotations

import torch

from fbsemlib.physics._joseph import AxialSegments, JosephSampler, OnTheFly, build_csr, csr_matmul
from fbsemlib.physics._parallelproj import ParallelprojJoseph, parallelproj_available, parallelproj_serves
from fbsemlib.physics.geometry import ImageGrid, ParallelBeamGeometry, SinogramGeometry
from fbsemlib.physics.operators import LinearOperator
from fbsemlib.physics.psf import GaussianPSF
from fbsemlib.physics.subsets import subset_slice

__all__ = ["Projector", "parallelproj_available"]


class Projector(LinearOperator):
    """Joseph line-integral projector (units: image value x mm).

    Parameters
    ----------
    sinogram: :class:`SinogramGeometry` (or :class:`ParallelBeamGeometry`).
    grid: :class:`ImageGrid`.
    backend: ``"auto"`` | ``"torch"`` | ``"parallelproj"``.
    device: where inputs live and the work happens.
    method: torch backend only: ``"auto"`` | ``"matrix"`` | ``"segments"`` | ``"on-the-fly"``.
    psf_fwhm_mm: isotropic FWHM, or ``(z, y, x)``; ``None`` for no resolution model.
    matrix_budget_bytes: memory allowed for the system matrix and its transpose (the
        ``"segments"`` path caches its per-segment matrices up to this size and rebuilds
        the others on every call).
    max_chunk_samples: samples per chunk of the on-the-fly path (memory bound).
    """

    def __init__(
        self,
        sinogram: SinogramGeometry | ParallelBeamGeometry,
        grid: ImageGrid,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        method: str = "auto",
        psf_fwhm_mm: float | tuple[float, float, float] | None = None,
        matrix_budget_bytes: int = 1 << 30,
        max_chunk_samples: int = 1 << 22,
    ):
        if not isinstance(sinogram, (SinogramGeometry, ParallelBeamGeometry)):
            raise TypeError(f"sinogram must be a SinogramGeometry, got {type(sinogram).__name__}")
        if not isinstance(grid, ImageGrid):
            raise TypeError(f"grid must be an ImageGrid, got {type(grid).__name__}")
        if backend not in ("auto", "torch", "parallelproj"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'parallelproj', got {backend!r}")
        if method not in ("auto", "matrix", "segments", "on-the-fly"):
            raise ValueError(f"method must be 'auto', 'matrix', 'segments' or 'on-the-fly', got {method!r}")
        if backend == "parallelproj" and not parallelproj_available():
            raise ImportError("backend='parallelproj' but parallelproj is not installed (make parallelproj, "
                              "or conda install -c conda-forge parallelproj)")
        self.sinogram = sinogram
        self.grid = grid
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available")
        if backend == "parallelproj" and self._device.type == "cuda" and not parallelproj_serves(self._device):
            raise ValueError("parallelproj's kernels were built without CUDA: use device='cpu' or backend='torch'")
        self._backend_arg = backend
        self.backend = "torch" if backend == "auto" else backend  # "auto" may still pick parallelproj below
        self._options = dict(method=method, psf_fwhm_mm=psf_fwhm_mm, matrix_budget_bytes=matrix_budget_bytes,
                             max_chunk_samples=max_chunk_samples)
        self.psf = GaussianPSF(grid, psf_fwhm_mm, device=self._device) if psf_fwhm_mm else None
        self._endpoints = None  # every bin's (start, end), built when a path needs them
        self._sampler_obj = None
        self._pp = None
        self._matrices: dict = {}
        self._subset_cache: dict = {}
        self._otf = None
        self._seg = None
        self._line_integrals = None  # the PSF-free view (without_psf), built on first use
        self.method = None
        if self.backend == "torch":
            reason = None
            if method in ("auto", "segments"):
                reason = AxialSegments.unsupported_reason(sinogram, grid)
                if method == "segments" and reason:
                    raise ValueError(f"method='segments' does not apply: {reason}; use 'matrix' or 'on-the-fly'")
            if method in ("auto", "segments") and not reason:
                self._seg = AxialSegments(sinogram, grid, matrix_budget_bytes, max_chunk_samples)
            if method == "auto":
                nnz = self._seg.estimated_nnz() if self._seg is not None else self._sampler.estimated_nnz()
                if nnz * (8 + 8) * 2 <= matrix_budget_bytes:
                    method = "matrix"
                else:
                    method = "segments" if self._seg is not None else "on-the-fly"
            if method != "segments":
                self._seg = None
                self._sampler  # validates the geometry now
            self.method = method
            if method == "on-the-fly" and backend == "auto" and self._options["method"] == "auto" \
                    and parallelproj_serves(self._device):
                self.backend, self.method = "parallelproj", None  # the measured rule: see the module docstring
            elif method == "on-the-fly":
                self._otf = OnTheFly(self._sampler, max_chunk_samples)

    # -- shapes -------------------------------------------------------------------------
    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.grid.shape)

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return tuple(self.sinogram.shape)

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return (f"Projector(backend={self.backend!r}, method={self.method!r}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}, device={str(self.device)!r}, psf={self.psf is not None})")

    # -- geometry helpers ---------------------------------------------------------------
    @property
    def _start(self) -> torch.Tensor:
        if self._endpoints is None:
            self._endpoints = self.sinogram.lor_endpoints(torch.float64)
        return self._endpoints[0]

    @property
    def _end(self) -> torch.Tensor:
        self._start
        return self._endpoints[1]

    @property
    def _sampler(self) -> JosephSampler:
        """Joseph samples of every bin (matrix and on-the-fly paths; built on first use)."""
        if self._sampler_obj is None:
            self._sampler_obj = JosephSampler(self._start, self._end, self.grid)
        return self._sampler_obj

    @property
    def _parallelproj(self) -> ParallelprojJoseph:
        """The same Joseph operator by parallelproj's kernels (built on first use)."""
        if self._pp is None:
            self._pp = ParallelprojJoseph(self._sampler)
        return self._pp

    def lor_endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end points (mm) of every bin, each ``(planes, views, radial, 3)`` as (x, y, z)."""
        return self._start.clone(), self._end.clone()

    def subset(self, m: int, num_subsets: int) -> "Projector":
        """Projector onto the views of ordered subset ``m`` of ``num_subsets``
        (:mod:`fbsemlib.physics.subsets`); the one subset of one is this projector. Subset
        projectors are built once and kept (their system matrices are reused)."""
        subset_slice(m, num_subsets, self.out_shape[1])  # a clear error for a bad subset
        if num_subsets == 1:
            return self
        key = (int(m), int(num_subsets))
        if key not in self._subset_cache:
            self._subset_cache[key] = Projector(self.sinogram.subset(m, num_subsets), self.grid, self.backend,
                                                self._device, **self._options)
        return self._subset_cache[key]

    def subsets(self, num_subsets: int) -> list["Projector"]:
        return [self.subset(m, num_subsets) for m in range(num_subsets)]

    def to(self, device: str | torch.device) -> "Projector":
        """This projector on ``device``: itself when it is there already, else a new one
        with the same options (its matrices are built there on first use)."""
        if resolved_device(torch.device(device)) == resolved_device(self._device):
            return self
        return Projector(self.sinogram, self.grid, self._backend_arg, device, **self._options)

    def without_psf(self) -> LinearOperator:
        """The line integrals ``A`` alone (``A G`` without its PSF ``G``), sharing this
        projector's matrices and caches; this projector itself when it has no PSF."""
        if self.psf is None:
            return self
        if self._line_integrals is None:
            self._line_integrals = _LineIntegrals(self)
        return self._line_integrals

    def matrix_nnz(self) -> int | None:
        """Non-zeros of the system matrix (matrix path) or of the per-segment matrices built
        so far (segments path), else None."""
        if self._seg is not None:
            return sum(self._seg.nnz.values()) if self._seg.nnz else None
        for v in self._matrices.values():
            return v[2]
        return None

    # -- the maths ----------------------------------------------------------------------
    def _csr(self, dtype):
        if dtype not in self._matrices:
            self._matrices[dtype] = build_csr(self._sampler, dtype, self._device)
        return self._matrices[dtype]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.psf is not None:
            x = self.psf._apply(x)
        return self._line_integral(x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        x = self._line_integral_adjoint(y)
        if self.psf is not None:
            x = self.psf._adjoint(x)
        return x

    def _line_integral(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` (no PSF) of a batch ``(N, *in_shape)``."""
        N = x.shape[0]
        if self.backend == "parallelproj":
            y = self._parallelproj.forward(x)
        elif self.method == "matrix":
            A, _, _ = self._csr(x.dtype)
            y = csr_matmul(A, x.reshape(N, -1))
        elif self.method == "segments":
            y = self._seg.forward(x.reshape((N,) + self.in_shape))
        else:
            y = self._otf.forward(x)
        return y.reshape((N,) + self.out_shape)

    def _line_integral_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` (no PSF) of a batch ``(N, *out_shape)``."""
        N = y.shape[0]
        if self.backend == "parallelproj":
            x = self._parallelproj.adjoint(y.reshape(N, -1))
        elif self.method == "matrix":
            _, At, _ = self._csr(y.dtype)
            x = csr_matmul(At, y.reshape(N, -1))
        elif self.method == "segments":
            x = self._seg.adjoint(y.reshape(N, -1))
        else:
            x = self._otf.adjoint(y.reshape(N, -1))
        return x.reshape((N,) + self.in_shape)


def resolved_device(device: torch.device) -> torch.device:
    """``device`` with the current CUDA device's index made explicit (``cuda`` -> ``cuda:0``)."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _LineIntegrals(LinearOperator):
    """The PSF-free part ``A`` of a projector ``A G`` (e.g. for attenuation factors
    ``exp(-A mu)``): a view of the projector, whose matrices and caches it uses."""

    def __init__(self, projector: Projector):
        self.projector = projector

    @property
    def in_shape(self):
        return self.projector.in_shape

    @property
    def out_shape(self):
        return self.projector.out_shape

    @property
    def device(self):
        return self.projector.device

    def _apply(self, x):
        return self.projector._line_integral(x)

    def _adjoint(self, y):
        return self.projector._line_integral_adjoint(y)
