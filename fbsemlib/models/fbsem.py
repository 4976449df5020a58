"""FBSEM-Net: forward-backward splitting EM, unrolled.

Module ``k = 0..K-1`` (iteration ``k // M``, subset ``m = k % M``) maps the current
image ``x_k`` to

    x_em  = x_k / s_m * A_m^T( m_m y_m / (m_m A_m x_k + b_m) )       (EM step, subset m)
    x_reg = CNN_k(x_k [, MR])                                         (learned regulariser)
    x_k+1 = fuse(x_em, x_reg, s_m, gamma_k)                           (closed-form fusion)

where ``fuse`` maximises ``s_m (x_em ln z - z) - gamma_k/2 (z - x_reg)^2`` voxel-wise, so the
effective regularisation strength is ``gamma_k / s_m``: the EM-then-fuse step of MAP-EM
(:func:`fbsemlib.recon.em.em_fusion_step`) with a learned regulariser. The losses are in
:mod:`fbsemlib.models.losses`.

Choices (stated, and configurable in :class:`ModelConfig`):

* ``gamma_k = softplus(rho_k) * mean(s_m) / mean(x_k)``: a dimensionless learned strength
  ``g_k = softplus(rho_k) > 0`` (smooth reparameterisation instead of the original reset
  to 0.01) scaled by the per-sample mean subset sensitivity and image level inside the
  field of view, so the same ``g_k`` means the same relative pull at any count level.
* The CNN sees ``x_k / mean(x_k)`` and its output is scaled back (scale equivariance);
  the MR channel is ``mr_scale * MR / max(MR)`` as in the original.
* ``shared=True``: one CNN and one ``rho`` for all modules (the original FBSEM-Net);
  ``shared=False``: one per module (iteration-dependent networks, the 2022 paper).
* ``detach_em=True``: the EM step is computed on a detached copy (as the original);
  ``False`` differentiates through the projector as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from fbsemlib.physics.forward_model import PETForwardModel
from fbsemlib.physics.operators import check_tensor
from fbsemlib.physics.projector import Projector
from fbsemlib.physics.subsets import sinogram_subset, sinogram_subset_index
from fbsemlib.provenance import is_int
from fbsemlib.recon.em import em_fusion_step

__all__ = ["ModelConfig", "RegulariserCNN", "FBSEMNet", "UnrollContext"]


@dataclass
class ModelConfig:
    """Architecture and options of FBSEM-Net (the ``model:`` section of an experiment)."""

    shared: bool = False  # one network for all modules (original) vs one per module
    depth: int = 5  # conv layers in the regulariser (>= 2)
    width: int = 32  # feature channels
    kernel_size: int = 3
    batch_norm: bool = True
    use_mr: bool = True  # MR image as a second input channel
    mr_scale: float = 5.0
    detach_em: bool = True  # EM step on a detached copy (original) or differentiated
    gamma_init: float = 1.0  # initial dimensionless strength g = softplus(rho)
    final_relu: bool = True

    def __post_init__(self) -> None:
        for name in ("depth", "width", "kernel_size"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.depth < 2:
            raise ValueError(f"model.depth must be >= 2, got {self.depth}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be odd, got {self.kernel_size}")
        if not (self.gamma_init > 0):
            raise ValueError(f"model.gamma_init must be > 0, got {self.gamma_init!r}")
        if not (self.mr_scale > 0):
            raise ValueError(f"model.mr_scale must be > 0, got {self.mr_scale!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class RegulariserCNN(nn.Module):
    """The residual CNN of the original FBSEM-Net:
    ``conv(in->w)+BN+ReLU, (depth-2) x [conv(w->w)+BN+ReLU], conv(w->1)+BN``, plus the
    PET input, then ReLU. 2D (``Conv2d``) or 3D (``Conv3d``)."""

    def __init__(self, in_channels: int, config: ModelConfig, dims: int):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        Norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        k, w, pad = config.kernel_size, config.width, config.kernel_size // 2
        layers: list[nn.Module] = []
        chans = [in_channels] + [w] * (config.depth - 1) + [1]
        for i in range(config.depth):
            layers.append(Conv(chans[i], chans[i + 1], k, padding=pad, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(Norm(chans[i + 1]))
            if i < config.depth - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.final_relu = config.final_relu
        self.dims = dims

    def forward(self, x: torch.Tensor, mr: torch.Tensor | None = None) -> torch.Tensor:
        inp = x if mr is None else torch.cat([x, mr], dim=1)
        out = self.body(inp) + x
        return F.relu(out) if self.final_relu else out


@dataclass
class UnrollContext:
    """Per-batch quantities shared by all modules: subset forward models, subset data
    and sensitivities, the MR channel, the FOV support and the initial image."""

    models: list[PETForwardModel]
    ys: list[torch.Tensor]
    sens: list[torch.Tensor]
    sens_mean: list[torch.Tensor]
    mr: torch.Tensor | None
    support: torch.Tensor
    x0: torch.Tensor


class FBSEMNet(nn.Module):
    """K = ``num_iterations * num_subsets`` unrolled FBSEM modules.

    Images are ``(B, 1, Z, Y, X)``; data ``y``, ``multiplicative`` (n * a) and
    ``additive`` (b) are ``(B, 1, planes, views, radial)``; ``mr`` is ``(B, 1, Z, Y, X)``.
    ``net.to(device)`` / ``.cuda()`` / ``.cpu()`` move the projector too (the same
    projector when it is already there).
    """

    def __init__(self, projector: Projector, num_iterations: int, num_subsets: int, config: ModelConfig | None = None):
        super().__init__()
        if not isinstance(projector, Projector):
            raise TypeError(f"projector must be a Projector, got {type(projector).__name__}")
        for name, v in (("num_iterations", num_iterations), ("num_subsets", num_subsets)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if num_subsets > projector.out_shape[1]:
            raise ValueError(f"num_subsets={num_subsets} exceeds the {projector.out_shape[1]} views")
        self.config = config or ModelConfig()
        self.projector = projector
        self.num_iterations = num_iterations
        self.num_subsets = num_subsets
        self.dims = 2 if projector.grid.shape[0] == 1 else 3
        n_nets = 1 if self.config.shared else self.num_modules
        in_ch = 2 if self.config.use_mr else 1
        self.regularisers = nn.ModuleList([RegulariserCNN(in_ch, self.config, self.dims) for _ in range(n_nets)])
        rho0 = float(torch.log(torch.expm1(torch.tensor(self.config.gamma_init))))
        self.rho = nn.Parameter(torch.full((n_nets,), rho0))

    # -- structure ----------------------------------------------------------------------
    @property
    def num_modules(self) -> int:
        return self.num_iterations * self.num_subsets

    def net_index(self, k: int) -> int:
        return 0 if self.config.shared else k

    def gamma(self, k: int) -> torch.Tensor:
        """Dimensionless strength ``g_k = softplus(rho_k)`` of module k."""
        return F.softplus(self.rho[self.net_index(k)])

    def module_parameters(self, k: int) -> list[nn.Parameter]:
        """The trainable parameters used by module k (its CNN and its ``rho``)."""
        return list(self.regularisers[self.net_index(k)].parameters()) + [self.rho]

    def _apply(self, fn, *args, **kwargs):
        """``to`` / ``cuda`` / ``cpu`` / ``double`` ... of the parameters, then the projector
        follows the parameters' device (:meth:`Projector.to`)."""
        super()._apply(fn, *args, **kwargs)
        self.projector = self.projector.to(self.rho.device)
        return self

    # -- per batch ----------------------------------------------------------------------
    def prepare(self, y, multiplicative=None, additive=None, mr=None, x0=None) -> UnrollContext:
        """Build the :class:`UnrollContext` of a batch (no gradients needed here)."""
        P, M = self.projector, self.num_subsets
        dev = P.device
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.ndim != 5 or tuple(y.shape[-3:]) != tuple(P.out_shape) or y.shape[1] != 1:
            raise ValueError(f"y must have shape (B, 1, {', '.join(map(str, P.out_shape))}), got {tuple(y.shape)}")
        check_tensor(y, "y", P.out_shape, device=dev, nonnegative=True)
        for name, t in (("multiplicative", multiplicative), ("additive", additive)):
            if t is not None:
                check_tensor(t, name, P.out_shape, device=dev, nonnegative=True)
        if mr is not None:
            check_tensor(mr, "mr", P.in_shape, device=dev)
        if self.config.use_mr and mr is None:
            raise ValueError("this FBSEMNet uses an MR channel (model.use_mr) but mr is None")
        with torch.no_grad():
            models, ys, sens, smean = [], [], [], []
            for m in range(M):
                fm = self.subset_model(m, multiplicative, additive)
                models.append(fm)
                ys.append(y[self.subset_slice(m)])
                sens.append(self._batched_sensitivity(fm, y))
            support = sens[0] > 0
            for s in sens:
                support = support & (s > 0)
            for s in sens:
                smean.append(_masked_mean(s, support))
            if x0 is None:
                x0 = support.to(y.dtype)
            mr_in = None
            if self.config.use_mr:
                if tuple(mr.shape) != tuple(x0.shape):
                    raise ValueError(f"mr must have shape {tuple(x0.shape)}, got {tuple(mr.shape)}")
                mmax = mr.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
                mr_in = self.config.mr_scale * mr / mmax
        return UnrollContext(models, ys, sens, smean, mr_in, support, x0)

    def subset_slice(self, m: int):
        """Index of subset ``m``'s views in a sinogram-shaped tensor ``(..., planes, views, radial)``."""
        return sinogram_subset_index(m, self.num_subsets, self.projector.out_shape[1])

    def subset_model(self, m: int, multiplicative=None, additive=None) -> PETForwardModel:
        """The forward model of subset ``m`` (its projector, kept by the projector, and its
        views of the sinogram-shaped factors)."""
        M = self.num_subsets
        return PETForwardModel(self.projector.subset(m, M), sinogram_subset(multiplicative, m, M),
                               sinogram_subset(additive, m, M))

    @staticmethod
    def _batched_sensitivity(fm: PETForwardModel, y: torch.Tensor) -> torch.Tensor:
        s = fm.sensitivity(y)
        return s.expand((y.shape[0],) + tuple(s.shape[-4:])) if s.ndim == 5 else s.expand((y.shape[0], 1) + tuple(s.shape[-3:]))

    @torch.no_grad()
    def subset_sensitivity(self, m: int, y: torch.Tensor, multiplicative=None, additive=None) -> torch.Tensor:
        """``s_m = A_m^T (n a)_m`` of every batch item, ``(B, 1, Z, Y, X)`` (as :meth:`prepare`)."""
        return self._batched_sensitivity(self.subset_model(m, multiplicative, additive), y)

    # -- one module ---------------------------------------------------------------------
    def step(self, k: int, x: torch.Tensor, ctx: UnrollContext) -> torch.Tensor:
        """Module ``k``: ``x_k -> x_{k+1}`` (see module docstring)."""
        m = k % self.num_subsets
        net = self.regularisers[self.net_index(k)]

        def regulariser(x):
            scale = _masked_mean(x.detach(), ctx.support).clamp_min(1e-12)
            x_reg = self._cnn(net, x / scale, ctx.mr) * scale
            return x_reg, self.gamma(k) * ctx.sens_mean[m] / scale

        x_next = em_fusion_step(ctx.models[m], x, ctx.ys[m], ctx.sens[m], regulariser, detach_em=self.config.detach_em)
        return x_next * ctx.support

    def _cnn(self, net: RegulariserCNN, x: torch.Tensor, mr: torch.Tensor | None) -> torch.Tensor:
        if self.dims == 2:
            out = net(x[:, :, 0], None if mr is None else mr[:, :, 0])
            return out[:, :, None]
        return net(x, mr)

    # -- the whole network --------------------------------------------------------------
    def forward(
        self,
        y: torch.Tensor,
        multiplicative: torch.Tensor | None = None,
        additive: torch.Tensor | None = None,
        mr: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        return_all: bool = False,
        checkpoint: bool = False,
        modules: Sequence[int] | None = None,
    ):
        """Run modules ``0..K-1`` (or ``modules``) from ``x0``. Returns the last image, or
        the list of all module outputs with ``return_all``. ``checkpoint=True``
        recomputes each module in the backward pass (gradient checkpointing)."""
        ctx = self.prepare(y, multiplicative, additive, mr, x0)
        return self.run(ctx, return_all=return_all, checkpoint=checkpoint, modules=modules)

    def run(self, ctx: UnrollContext, x: torch.Tensor | None = None, return_all=False, checkpoint=False, modules=None):
        x = ctx.x0 if x is None else x
        outs = []
        for k in (range(self.num_modules) if modules is None else modules):
            if checkpoint and torch.is_grad_enabled():
                x = _checkpoint(self.step, k, x, ctx, use_reentrant=False)
            else:
                x = self.step(k, x, ctx)
            if return_all:
                outs.append(x)
        return outs if return_all else x


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-batch-item mean of ``x`` over ``mask``, shaped ``(B, 1, 1, 1, 1)``."""
    m = mask.to(x.dtype).expand_as(x)
    num = (x * m).flatten(1).sum(1)
    den = m.flatten(1).sum(1).clamp_min(1)
    return (num / den).view(-1, *([1] * (x.ndim - 1)))
