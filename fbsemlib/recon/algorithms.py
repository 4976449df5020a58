"""Reconstruction baselines: MLEM, OSEM, post-filtered OSEM and MAP-EM.

All functions take a :class:`~fbsemlib.physics.forward_model.PETForwardModel` and measured
data ``y`` (``(..., planes, views, radial)``, broadcast like the model's factors) and
return images ``(..., Z, Y, X)``. Every (sub)iteration is
:func:`fbsemlib.recon.em.em_fusion_step` (an EM update, fused with a prior for MAP-EM).
Subsets are interleaved views (:mod:`fbsemlib.physics.subsets`), visited in order
``0, 1, ..., num_subsets - 1`` at every iteration; the initial image is ``x0 = 1`` inside
the sensitivity support (as FBSEM-Net uses).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from fbsemlib.physics.forward_model import PETForwardModel
from fbsemlib.physics.operators import check_tensor
from fbsemlib.physics.psf import FWHM_TO_SIGMA, gaussian_filter
from fbsemlib.physics.subsets import sinogram_subset
from fbsemlib.provenance import is_int
from fbsemlib.recon.em import Regulariser, em_fusion_step

__all__ = ["initial_image", "mlem", "osem", "postfilter", "map_em"]


def _check(model: PETForwardModel, y: torch.Tensor, num_iterations: int, num_subsets: int) -> None:
    if not isinstance(model, PETForwardModel):
        raise TypeError(f"model must be a PETForwardModel, got {type(model).__name__}")
    model.check_data(y, "y")
    for name, v in (("num_iterations", num_iterations), ("num_subsets", num_subsets)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_subsets > model.projector.out_shape[1]:
        raise ValueError(f"num_subsets={num_subsets} exceeds the {model.projector.out_shape[1]} views")


def initial_image(model: PETForwardModel, y: torch.Tensor) -> torch.Tensor:
    """Ones inside the support of the sensitivity image, batch-shaped like ``A^T y``."""
    s = model.sensitivity(y)
    lead = torch.broadcast_shapes(y.shape[:-3], s.shape[:-3])
    return (s > 0).to(y.dtype).expand(tuple(lead) + tuple(model.projector.in_shape)).clone()


def _run(
    model: PETForwardModel,
    y: torch.Tensor,
    num_iterations: int,
    num_subsets: int,
    x0: torch.Tensor | None,
    regulariser: Regulariser | None,
    return_iterates: bool,
    progress: bool,
    desc: str,
):
    subsets = model.subsets(num_subsets)
    ys = [sinogram_subset(y, k, num_subsets) for k in range(num_subsets)]
    sens = [m.sensitivity(y) for m in subsets]
    x = initial_image(model, y) if x0 is None else x0.clone()
    if x0 is not None:
        check_tensor(x0, "x0", model.projector.in_shape, device=model.device, nonnegative=True)
    iterates = []
    bar = tqdm(total=num_iterations * num_subsets, desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        for _ in range(num_iterations):
            for k in range(num_subsets):
                x = em_fusion_step(subsets[k], x, ys[k], sens[k], regulariser)
                if return_iterates:
                    iterates.append(x.clone())
                bar.update()
    bar.close()
    return (x, iterates) if return_iterates else x


def osem(
    model: PETForwardModel,
    y: torch.Tensor,
    num_iterations: int,
    num_subsets: int = 1,
    x0: torch.Tensor | None = None,
    return_iterates: bool = False,
    progress: bool = False,
):
    """Ordered-subsets EM. With ``return_iterates`` also returns the list of the
    ``num_iterations * num_subsets`` sub-iterates (the iteration-dependent targets when
    ``y`` is noise-free)."""
    _check(model, y, num_iterations, num_subsets)
    return _run(model, y, num_iterations, num_subsets, x0, None, return_iterates, progress, "OSEM")


def mlem(model: PETForwardModel, y: torch.Tensor, num_iterations: int, x0=None, return_iterates=False, progress=False):
    """Maximum-likelihood EM (OSEM with one subset)."""
    return osem(model, y, num_iterations, 1, x0, return_iterates, progress)


def postfilter(x: torch.Tensor, fwhm_mm, voxel_size_mm) -> torch.Tensor:
    """Gaussian post-filter of images ``(..., Z, Y, X)`` (FWHM in mm, scalar or (z, y, x))."""
    if isinstance(fwhm_mm, (int, float)):
        fwhm_mm = (float(fwhm_mm),) * 3
    sig = tuple(f * FWHM_TO_SIGMA / v for f, v in zip(fwhm_mm, voxel_size_mm))
    shp = x.shape
    out = gaussian_filter(x.reshape((-1,) + tuple(shp[-3:])), sig)
    return out.reshape(shp)


def map_em(
    model: PETForwardModel,
    y: torch.Tensor,
    prior,
    beta: float,
    num_iterations: int,
    num_subsets: int = 1,
    x0: torch.Tensor | None = None,
    return_iterates: bool = False,
    progress: bool = False,
):
    """MAP-EM by De Pierro's separable surrogate: every (sub)iteration fuses the EM
    image with the prior's surrogate centre (:func:`fbsemlib.recon.em.fuse`),

        x <- fuse(x_em, x_reg, s_m, beta * w),   (x_reg, w) = prior.surrogate(x),

    ``prior.surrogate`` returning the surrogate centre and its voxel weight (see
    :mod:`fbsemlib.recon.priors`). ``beta`` is a scalar or a tensor broadcastable to the
    images (e.g. one value per batch item); ``beta = 0`` is OSEM."""
    _check(model, y, num_iterations, num_subsets)
    beta_t = torch.as_tensor(beta, dtype=y.dtype, device=y.device)
    if not bool(torch.isfinite(beta_t).all()) or bool((beta_t < 0).any()):
        raise ValueError(f"beta must be finite and non-negative, got {beta!r}")
    zero = not bool((beta_t != 0).any())

    def regulariser(x):
        x_reg, w = prior.surrogate(x)
        return x_reg, beta_t * w

    return _run(model, y, num_iterations, num_subsets, x0, None if zero else regulariser, return_iterates, progress,
                "MAP-EM")

