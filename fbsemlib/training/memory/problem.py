"""The synthetic problem of a memory measurement (:func:`memory_problem`): no data set is
needed.

A disc phantom with a hot and a cold spot (the MR image: the same outline with another
contrast), random multiplicative factors ``1 + U(0, 1)``, a constant background (20 % of
the mean of the noise-free data), Poisson data; the targets are a synthetic converging
sequence of images. Module ``k`` uses subset ``k % num_subsets``; ``K`` need not be a
multiple of ``num_subsets``: the network is built with ``ceil(K / num_subsets)``
iterations and only modules ``0..K-1`` are run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fbsemlib.errors import UserError
from fbsemlib.models.fbsem import FBSEMNet, UnrollContext
from fbsemlib.physics.cache import shared_projector
from fbsemlib.physics.geometry import ImageGrid, sinogram_preset
from fbsemlib.physics.projector import Projector
from fbsemlib.training.memory.spec import MemorySpec, check_positive_int, resolve_spec

__all__ = ["MemoryProblem", "memory_problem", "build_problem"]


@dataclass
class MemoryProblem:
    """A synthetic batch: projector, images, factors and data (all on ``device``)."""

    spec: MemorySpec
    projector: Projector
    image: torch.Tensor  # (B, 1, Z, Y, X)
    mr: torch.Tensor
    multiplicative: torch.Tensor  # (B, 1, planes, views, radial)
    additive: torch.Tensor
    y: torch.Tensor
    device: torch.device

    @property
    def dims(self) -> str:
        return self.spec.dims

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.projector.grid.shape)

    @property
    def batch_size(self) -> int:
        return int(self.y.shape[0])

    def build_net(self, num_modules: int) -> FBSEMNet:
        """FBSEM-Net with ``ceil(K / num_subsets)`` iterations (modules ``0..K-1`` are used)."""
        check_positive_int("num_modules", num_modules)
        M = self.spec.num_subsets
        torch.manual_seed(self.spec.seed + 1)
        return FBSEMNet(self.projector, math.ceil(num_modules / M), M, self.spec.model_config).to(self.device)

    def prepare(self, net: FBSEMNet) -> UnrollContext:
        return net.prepare(self.y, self.multiplicative, self.additive, self.mr if net.config.use_mr else None)

    def targets(self, modules, x0: torch.Tensor) -> torch.Tensor:
        """Synthetic iteration-dependent targets ``(B, len(modules), 1, Z, Y, X)`` on the
        host: ``t_k = x0 + (image - x0) * (1 - 0.8 ** (k + 1))`` (a converging sequence)."""
        img = self.image.detach().cpu()
        x0 = x0.detach().cpu()
        return torch.stack([x0 + (img - x0) * (1 - 0.8 ** (k + 1)) for k in modules], 1).contiguous()


def _disc_images(grid: ImageGrid, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A simple non-anatomical image: a disc (value 1) with a hot disc (3) and a cold disc
    (0.3); the MR image has the same outline with another contrast."""
    Z, Y, X = grid.shape
    yy = torch.linspace(-1, 1, Y).view(Y, 1)
    xx = torch.linspace(-1, 1, X).view(1, X)
    imgs, mrs = [], []
    for _ in range(batch):
        c = (torch.rand(4, generator=gen) - 0.5) * 0.2
        body = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2) <= 0.6**2
        hot = ((yy - 0.25 - c[2]) ** 2 + (xx + 0.2 - c[3]) ** 2) <= 0.15**2
        cold = ((yy + 0.25) ** 2 + (xx - 0.25) ** 2) <= 0.12**2
        img = body.float() + 2.0 * hot.float() - 0.7 * cold.float()
        mr = body.float() * 2.0 - 1.0 * hot.float() + 0.5 * cold.float()
        imgs.append(img.clamp_min(0).expand(Z, Y, X))
        mrs.append(mr.clamp_min(0).expand(Z, Y, X))
    return torch.stack(imgs)[:, None].contiguous(), torch.stack(mrs)[:, None].contiguous()


def memory_problem(
    config: str | os.PathLike | Mapping | MemorySpec | None = None,
    *,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> MemoryProblem:
    """Build the synthetic problem of a memory measurement.

    ``config``: an experiment YAML path, a dict of its sections (``{"memory": ...,
    "model": ..., "data": ...}``), a :class:`MemorySpec`, or None (defaults).
    ``overrides``: :class:`MemorySpec` fields (``dims``, ``preset``, ``image_shape``,
    ``batch_size``, ``num_subsets``, ...) and the shortcuts ``width`` / ``depth`` (and
    any other :class:`ModelConfig` field), which win over the config."""
    spec = resolve_spec(config, **overrides)
    return build_problem(spec, torch.device(device))


def build_problem(spec: MemorySpec, device: torch.device) -> MemoryProblem:
    """The problem of ``spec`` on ``device`` (the projector is the shared one of its geometry)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    r = spec.resolved()
    try:
        sino = sinogram_preset(r["preset"], num_rings=r["num_rings"], max_ring_difference=r["max_ring_difference"])
        grid = ImageGrid(r["image_shape"], r["voxel_size_mm"])
        P = shared_projector(sino, grid, device=device, backend="torch", psf_fwhm_mm=spec.psf_fwhm_mm or None,
                             method=spec.projector_method)
    except ValueError as e:
        raise UserError(f"invalid memory problem geometry: {e}") from None
    gen = torch.Generator().manual_seed(spec.seed)
    B = spec.batch_size
    img, mr = _disc_images(grid, B, gen)
    img, mr = img.to(device), mr.to(device)
    mult = (1.0 + torch.rand((B, 1) + tuple(P.out_shape), generator=gen)).to(device)
    with torch.no_grad():
        lin = P(img) * mult
        counts = 2e5 if spec.dims == "2d" else 2e6
        scale = counts / lin.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
        img, lin = img * scale, lin * scale
        add = (0.2 * lin.flatten(1).mean(1)).view(-1, 1, 1, 1, 1).expand_as(lin).contiguous()
        ybar = lin + add
        y = torch.poisson(ybar.cpu(), generator=gen).to(device)
    return MemoryProblem(spec, P, img, mr, mult, add, y, device)
