"""Simple test objects: the modified Shepp-Logan phantom and discs."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from fbsemlib.data.phantoms.config import check_grid, check_number
from fbsemlib.physics.geometry import ImageGrid

__all__ = ["shepp_logan", "simple_phantom"]

def _inplane_mm(grid: ImageGrid) -> tuple[np.ndarray, np.ndarray]:
    y = grid.axis_mm(1)
    x = grid.axis_mm(2)
    return (y - 0.5 * (y[0] + y[-1]))[:, None], (x - 0.5 * (x[0] + x[-1]))[None, :]


def shepp_logan(grid: ImageGrid, *, fov_fraction: float = 0.9, device: str | torch.device = "cpu") -> torch.Tensor:
    """The modified Shepp-Logan phantom (``skimage.data.shepp_logan_phantom``, values in
    [0, 1]) as a float32 ``(nz, ny, nx)`` tensor, centred, its outer ellipse spanning
    ``fov_fraction`` of the grid's transaxial field-of-view radius; the same slice is
    repeated along z for a 3D grid."""
    grid = check_grid(grid)
    fov_fraction = check_number("fov_fraction", fov_fraction, lo=0.0, lo_open=True, hi=10.0)
    from skimage.data import shepp_logan_phantom

    img = shepp_logan_phantom()  # (400, 400), the ellipse spans +-1 over the image
    half = fov_fraction * grid.fov_radius_mm()
    y, x = _inplane_mm(grid)
    n = img.shape[0]
    iy = (y / half + 1.0) * 0.5 * (n - 1) + 0 * x
    ix = (x / half + 1.0) * 0.5 * (n - 1) + 0 * y
    sl = ndimage.map_coordinates(img, [iy.ravel(), ix.ravel()], order=1, mode="constant", cval=0.0)
    sl = np.clip(sl.reshape(grid.shape[1:]), 0.0, None).astype(np.float32)
    vol = np.broadcast_to(sl, grid.shape).copy()
    return torch.from_numpy(vol).to(device)


def simple_phantom(grid: ImageGrid, kind: str = "disc", *, radius_fraction: float = 0.6,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """A float32 ``(nz, ny, nx)`` test object (a cylinder along z in 3D).

    ``kind="disc"``: a centred uniform disc of value 1 and radius ``radius_fraction`` of
    the grid's field-of-view radius. ``kind="hot_spots"``: the same disc with six hot
    discs (value 4) of radii 6 %, 9 %, ..., 21 % of the disc radius on a ring at half the
    disc radius, and a cold disc (value 0, radius 12 %) in the centre.
    """
    grid = check_grid(grid)
    if kind not in ("disc", "hot_spots"):
        raise ValueError(f"kind must be 'disc' or 'hot_spots', got {kind!r}")
    radius_fraction = check_number("radius_fraction", radius_fraction, lo=0.0, lo_open=True, hi=1.0)
    big = radius_fraction * grid.fov_radius_mm()
    y, x = _inplane_mm(grid)
    sl = ((x**2 + y**2) <= big**2).astype(np.float32)
    if kind == "hot_spots":
        ring = 0.5 * big
        for i in range(6):
            a = 2 * math.pi * i / 6
            r = big * (0.06 + 0.03 * i)
            cy, cx = ring * math.sin(a), ring * math.cos(a)
            sl[((x - cx) ** 2 + (y - cy) ** 2) <= r**2] = 4.0
        sl[(x**2 + y**2) <= (0.12 * big) ** 2] = 0.0
    vol = np.broadcast_to(sl, grid.shape).copy()
    return torch.from_numpy(vol).to(device)

