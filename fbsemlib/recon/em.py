"""The closed-form fusion of an EM image with a regularised image (FBSEM / De Pierro).

Per voxel, the fused image is the maximiser of the separable surrogate

    s (x_em ln z - z) - (gamma / 2) (z - x_reg)^2 ,

a Poisson EM term (weight ``s``: the subset sensitivity) plus a quadratic pull towards
``x_reg``. With ``a = gamma / s`` and ``b = 1 - a x_reg`` the non-negative root of
``a z^2 + b z - x_em = 0`` is

    z = 2 x_em / ( b + sqrt(b^2 + 4 a x_em) )          (b >= 0)
      = ( -b + sqrt(b^2 + 4 a x_em) ) / (2 a)          (b <  0; same value, no cancellation)

so ``gamma -> 0`` gives ``z = x_em`` (plain EM) and ``s -> 0`` gives ``z = max(x_reg, 0)``.
"""

from __future__ import annotations

import torch

__all__ = ["fuse", "fusion_objective"]


def fuse(x_em: torch.Tensor, x_reg: torch.Tensor, sensitivity: torch.Tensor, gamma) -> torch.Tensor:
    """Fused image (see module docstring). ``gamma`` is a scalar, a tensor broadcastable
    to the images (e.g. one value per batch item, ``(B, 1, 1, 1, 1)``), or a voxel map.
    Differentiable in ``x_reg`` and ``gamma`` (and ``x_em``)."""
    gamma = torch.as_tensor(gamma, dtype=x_em.dtype, device=x_em.device)
    x_em = x_em.clamp_min(0)
    s = sensitivity
    tiny = torch.finfo(x_em.dtype).tiny ** 0.5
    pos = s > tiny
    s_safe = torch.where(pos, s, torch.ones_like(s))
    a = gamma / s_safe
    b = 1 - a * x_reg
    disc = torch.sqrt(b * b + 4 * a * x_em)
    a_safe = torch.where(a > 0, a, torch.ones_like(a))
    z_pos = 2 * x_em / (b + disc).clamp_min(tiny)
    z_neg = (disc - b) / (2 * a_safe)
    z = torch.where(b >= 0, z_pos, z_neg)
    z = torch.where(a > 0, z, x_em)  # gamma == 0: plain EM
    # x_em > 0 has a strictly positive maximiser: keep it off 0 when it underflows
    z = torch.where(x_em > 0, z.clamp_min(torch.finfo(z.dtype).tiny), z)
    return torch.where(pos, z, x_reg.clamp_min(0).expand_as(z))


def fusion_objective(z, x_em, x_reg, sensitivity, gamma) -> torch.Tensor:
    """The surrogate ``s (x_em ln z - z) - gamma/2 (z - x_reg)^2`` (voxel-wise)."""
    return sensitivity * (torch.xlogy(x_em, z) - z) - 0.5 * gamma * (z - x_reg) ** 2
