"""The EM update and its fusion with a regularised image: the one (sub)iteration shared by
OSEM, MAP-EM (:mod:`fbsemlib.recon.algorithms`) and FBSEM-Net (:mod:`fbsemlib.models.fbsem`).

EM update on a subset with forward model ``ybar = m A x + b`` and sensitivity ``s = A^T m``
(Shepp & Vardi / Hudson & Larkin):

    x_em = x / s * A^T( m y / (m A x + b) )

set to 0 where ``s = 0`` (outside the field of view; a choice: the image is undefined there).

Fusion (De Pierro's separable surrogate for MAP-EM; FBSEM-Net uses the same closed form with
a learned regulariser): per voxel, the fused image maximises

    s (x_em ln z - z) - (gamma / 2) (z - x_reg)^2 ,

a Poisson EM term (weight ``s``: the subset sensitivity) plus a quadratic pull towards
``x_reg``. With ``a = gamma / s`` and ``b = 1 - a x_reg`` the non-negative root of
``a z^2 + b z - x_em = 0`` is

    z = 2 x_em / ( b + sqrt(b^2 + 4 a x_em) )          (b >= 0)
      = ( -b + sqrt(b^2 + 4 a x_em) ) / (2 a)          (b <  0; same value, no cancellation)

so ``gamma -> 0`` gives ``z = x_em`` (plain EM) and ``s -> 0`` gives ``z = max(x_reg, 0)``.

One step (:func:`em_fusion_step`) is ``x -> fuse(em_update(x), x_reg, s, gamma)`` with
``(x_reg, gamma) = regulariser(x)``: the prior's surrogate centre and ``beta`` times its
weight for MAP-EM, the CNN output and the learned strength for FBSEM-Net, none for OSEM.
"""

from __future__ import annotations

from typing import Callable

import torch

from fbsemlib.physics.forward_model import PETForwardModel

__all__ = ["em_update", "fuse", "em_fusion_step", "fusion_objective", "EPS"]

EPS = 1e-8  # guards the division by the expected data

#: ``regulariser(x) -> (x_reg, gamma)``: the image the step is pulled towards and the strength
Regulariser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def em_update(model: PETForwardModel, x: torch.Tensor, y: torch.Tensor,
              sensitivity: torch.Tensor | None = None) -> torch.Tensor:
    """One EM update ``x / s * A^T( m y / (m A x + b) )`` of ``x`` for data ``y`` of ``model``
    (a subset's model and data for OSEM), zero where ``s = 0``. ``sensitivity``: the
    precomputed ``s = A^T m`` (the same at every iteration; computed when None)."""
    s = model.sensitivity(x) if sensitivity is None else sensitivity
    ybar = model.expected(x)
    ratio = y / ybar.clamp_min(EPS)
    back = model.linear_adjoint(ratio)
    pos = s > 0
    return torch.where(pos, x * back / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(x))


def em_fusion_step(model: PETForwardModel, x: torch.Tensor, y: torch.Tensor, sensitivity: torch.Tensor | None = None,
                   regulariser: Regulariser | None = None, *, detach_em: bool = False) -> torch.Tensor:
    """One (sub)iteration ``x -> fuse(em_update(x), x_reg, s, gamma)`` with
    ``(x_reg, gamma) = regulariser(x)``; without a regulariser it is the EM update itself.
    ``detach_em`` computes the EM update on a detached copy without gradients (FBSEM-Net's
    original choice: the gradient flows through the regulariser only)."""
    s = model.sensitivity(x) if sensitivity is None else sensitivity
    if detach_em:
        with torch.no_grad():
            x_em = em_update(model, x.detach(), y, s)
    else:
        x_em = em_update(model, x, y, s)
    if regulariser is None:
        return x_em
    x_reg, gamma = regulariser(x)
    return fuse(x_em, x_reg, s, gamma)


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
