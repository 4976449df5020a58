"""The PET forward model and its pieces.

Expected data for an image ``x >= 0``:

    ybar = n * a * (A x) + b

with ``A`` the line-integral projector (optionally with PSF), ``n`` the normalisation
(detector efficiencies, zero in block gaps), ``a = exp(-A mu)`` the attenuation
factors and ``b`` the additive background (randoms + scatter), all sinogram shaped.
The model stores ``m = n * a`` (the *multiplicative* factors) and ``b``.

Sinogram-shaped tensors are ``(..., planes, views, radial)`` and broadcast against the
projection of an image batch ``(B, C, Z, Y, X) -> (B, C, planes, views, radial)``:
per-subject factors are ``(B, 1, planes, views, radial)``, shared ones ``(planes, views, radial)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fbsemlib.physics.geometry import SinogramGeometry
from fbsemlib.physics.operators import check_tensor
from fbsemlib.physics.projector import Projector
from fbsemlib.physics.subsets import sinogram_subset, subset_slice

__all__ = [
    "PETForwardModel",
    "attenuation_factors",
    "normalisation_factors",
    "poisson_log_likelihood",
]


def attenuation_factors(projector: Projector, mu_map_per_mm: torch.Tensor) -> torch.Tensor:
    """``a = exp(-A mu)`` for a mu-map in 1/mm of shape ``(..., Z, Y, X)``.

    The PSF of the projector (if any) is not applied to the mu-map
    (:meth:`Projector.without_psf`; the projector, which may be shared, is not changed)."""
    check_tensor(mu_map_per_mm, "mu_map_per_mm", projector.in_shape, nonnegative=True)
    return torch.exp(-projector.without_psf()(mu_map_per_mm))


def normalisation_factors(
    sinogram: SinogramGeometry,
    crystal_efficiencies: np.ndarray | torch.Tensor | None = None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Normalisation ``n`` of every bin: ``eff[start] * eff[end]``, zero where either
    crystal is a block gap (``RingScanner.gap_positions``). ``crystal_efficiencies``
    has shape ``(num_rings, num_crystals_per_ring)`` (default: ones)."""
    sc = sinogram.scanner
    shape = (sc.num_rings, sc.num_crystals_per_ring)
    if crystal_efficiencies is None:
        eff = np.ones(shape)
    else:
        eff = np.asarray(crystal_efficiencies, dtype=np.float64)
        if eff.shape != shape:
            raise ValueError(f"crystal_efficiencies must have shape {shape}, got {eff.shape}")
        if not np.all(np.isfinite(eff)) or np.any(eff < 0):
            raise ValueError("crystal_efficiencies must be finite and non-negative")
    eff = eff * (~sc.crystal_is_gap())[None, :]
    s, e = sinogram.crystal_pairs()
    n = eff[sinogram.start_ring][:, s] * eff[sinogram.end_ring][:, e]
    return torch.as_tensor(n, dtype=dtype)


def poisson_log_likelihood(y: torch.Tensor, ybar: torch.Tensor, reduce_dims: int = 3) -> torch.Tensor:
    """``sum(y log ybar - ybar)`` over the last ``reduce_dims`` dimensions (constant
    ``-log y!`` omitted); bins with ``ybar == 0`` contribute 0 when ``y == 0``."""
    ll = torch.xlogy(y, ybar) - ybar
    return ll.sum(dim=tuple(range(-reduce_dims, 0)))


@dataclass
class PETForwardModel:
    """``ybar = m * A x + b`` with ``m = n * a`` (multiplicative) and ``b`` (additive).

    ``multiplicative`` and ``additive`` are sinogram-shaped tensors (or None for 1 and 0)
    that broadcast against the projection. ``subset(k, K)`` gives the model of one
    ordered subset (its projector and the matching views of every factor).
    """

    projector: Projector
    multiplicative: torch.Tensor | None = None
    additive: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out = tuple(self.projector.out_shape)
        for name in ("multiplicative", "additive"):
            t = getattr(self, name)
            if t is None:
                continue
            check_tensor(t, name, out, device=self.projector.device, nonnegative=True)

    @classmethod
    def from_components(
        cls,
        projector: Projector,
        mu_map_per_mm: torch.Tensor | None = None,
        normalisation: torch.Tensor | None = None,
        background: torch.Tensor | None = None,
    ) -> "PETForwardModel":
        """Build ``m = n * exp(-A mu)`` and ``b`` from their components."""
        m = None
        if mu_map_per_mm is not None:
            m = attenuation_factors(projector, mu_map_per_mm)
        if normalisation is not None:
            normalisation = normalisation.to(projector.device)
            m = normalisation if m is None else m * normalisation
        return cls(projector, m, background)

    # -- shapes / subsets ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.projector.device

    def subset(self, k: int, num_subsets: int) -> "PETForwardModel":
        """The model of ordered subset ``k`` of ``num_subsets``: the subset's projector and
        its views of every factor (:mod:`fbsemlib.physics.subsets`). One subset is the
        model itself (same projector)."""
        subset_slice(k, num_subsets, self.projector.out_shape[1])  # a clear error for a bad subset
        sub = self.projector if num_subsets == 1 else self.projector.subset(k, num_subsets)
        take = lambda t: sinogram_subset(t, k, num_subsets)  # noqa: E731
        return PETForwardModel(sub, take(self.multiplicative), take(self.additive))

    def subsets(self, num_subsets: int) -> list["PETForwardModel"]:
        return [self.subset(k, num_subsets) for k in range(num_subsets)]

    def to(self, device) -> "PETForwardModel":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PETForwardModel(self.projector.to(device), mv(self.multiplicative), mv(self.additive))

    # -- the model ---------------------------------------------------------------------
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``m * A x``."""
        p = self.projector(x)
        return p if self.multiplicative is None else p * self.multiplicative

    def linear_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T (m * y)``."""
        return self.projector.adjoint(y if self.multiplicative is None else y * self.multiplicative)

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        """Expected data ``ybar = m * A x + b``."""
        ybar = self.linear(x)
        return ybar if self.additive is None else ybar + self.additive

    __call__ = expected

    def sensitivity(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """``s = A^T m`` (image shaped; batched when the factors are)."""
        dtype = like.dtype if like is not None else torch.float32
        ones = torch.ones(self.projector.out_shape, dtype=dtype, device=self.device)
        m = ones if self.multiplicative is None else (ones * self.multiplicative.to(dtype))
        return self.projector.adjoint(m)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Poisson log-likelihood of data ``y`` given image ``x`` (one value per batch item)."""
        return poisson_log_likelihood(y, self.expected(x))

    def check_data(self, y: torch.Tensor, name: str = "sinogram") -> None:
        """Raise a clear error unless ``y`` is a finite, non-negative sinogram of this model."""
        check_tensor(y, name, self.projector.out_shape, device=self.device, nonnegative=True)
