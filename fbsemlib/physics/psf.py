"""Image-space resolution model: a separable Gaussian blur ``G`` (FWHM in mm).

``G`` is a convolution with a symmetric, normalised kernel and zero padding, so it is
self-adjoint (``G^T = G``). Compose it with a projector as ``A @ G`` or pass
``psf_fwhm_mm`` to :class:`~fbsemlib.physics.projector.Projector`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fbsemlib.physics.geometry import ImageGrid
from fbsemlib.physics.operators import LinearOperator

__all__ = ["GaussianPSF", "gaussian_kernel_1d", "gaussian_filter"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def gaussian_kernel_1d(sigma_vox: float, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Normalised sampled Gaussian with radius ``ceil(3 sigma)``."""
    r = max(1, int(math.ceil(3.0 * sigma_vox)))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma_vox) ** 2)
    return k / k.sum()


def gaussian_filter(x: torch.Tensor, sigmas_vox: tuple[float, float, float]) -> torch.Tensor:
    """Separable zero-padded Gaussian filter of ``x`` ``(N, Z, Y, X)`` along each axis
    with ``sigma > 0``."""
    N, Z, Y, X = x.shape
    out = x
    for axis, s in enumerate(sigmas_vox):
        if s is None or s <= 0 or x.shape[1 + axis] == 1:
            continue
        k = gaussian_kernel_1d(s, x.dtype, x.device)
        r = (k.numel() - 1) // 2
        moved = out.movedim(1 + axis, -1)
        shp = moved.shape
        flat = moved.reshape(-1, 1, shp[-1])
        flat = F.conv1d(flat, k.view(1, 1, -1), padding=r)
        out = flat.reshape(shp).movedim(-1, 1 + axis)
    return out.contiguous()


class GaussianPSF(LinearOperator):
    """Gaussian blur with ``fwhm_mm`` (scalar or ``(z, y, x)``) on ``grid``."""

    def __init__(self, grid: ImageGrid, fwhm_mm, device="cpu"):
        if isinstance(fwhm_mm, (int, float)):
            fwhm_mm = (float(fwhm_mm),) * 3
        fwhm_mm = tuple(float(f) for f in fwhm_mm)
        if len(fwhm_mm) != 3 or any((not math.isfinite(f)) or f < 0 for f in fwhm_mm):
            raise ValueError(f"fwhm_mm must be a non-negative number or (z, y, x) triple, got {fwhm_mm!r}")
        self.grid = grid
        self.fwhm_mm = fwhm_mm
        self.sigmas_vox = tuple(f * FWHM_TO_SIGMA / v for f, v in zip(fwhm_mm, grid.voxel_size_mm))
        self._device = torch.device(device)

    @property
    def in_shape(self):
        return tuple(self.grid.shape)

    @property
    def out_shape(self):
        return tuple(self.grid.shape)

    @property
    def device(self):
        return self._device

    def _apply(self, x):
        return gaussian_filter(x, self.sigmas_vox)

    def _adjoint(self, y):
        return gaussian_filter(y, self.sigmas_vox)
