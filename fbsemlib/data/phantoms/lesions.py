"""Lesions of a phantom: how many, their size, where (in white matter, inside the brain,
apart from each other), in which modality, hot or cold and how bright."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from fbsemlib.data.phantoms.config import PhantomConfig
from fbsemlib.physics.geometry import ImageGrid

__all__ = ["draw_lesions"]

def _edt(mask: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it or outside
    the grid (in-plane for a 2D grid)."""
    if grid.is_2d:
        m = np.pad(mask[0], 1)
        d = ndimage.distance_transform_edt(m, sampling=grid.voxel_size_mm[1:])[1:-1, 1:-1]
        return d[None]
    m = np.pad(mask, 1)
    return ndimage.distance_transform_edt(m, sampling=grid.voxel_size_mm)[1:-1, 1:-1, 1:-1]


def draw_lesions(rng: np.random.Generator, cfg: PhantomConfig, grid: ImageGrid, wm: np.ndarray,
                 brain: np.ndarray) -> tuple[list, np.ndarray]:
    """Lesion attributes and centres; returns (info list, (L, nz, ny, nx) bool geometry masks)."""
    lo, hi = cfg.num_lesions_2d if grid.is_2d else cfg.num_lesions_3d
    count = int(rng.integers(lo, hi + 1))
    attrs = []
    for _ in range(count):  # a fixed number of draws per lesion
        radius = rng.uniform(*cfg.lesion_radius_mm)
        u_where, u_pet, c_pet, u_mr, c_mr = rng.random(5)
        in_pet = not (cfg.p_pet_only <= u_where < cfg.p_pet_only + cfg.p_mr_only)
        in_mr = u_where >= cfg.p_pet_only
        pet_hot, mr_hot = u_pet < cfg.hot_fraction, u_mr < cfg.hot_fraction
        pr = cfg.pet_hot_contrast if pet_hot else cfg.pet_cold_contrast
        mrr = cfg.mr_hot_contrast if mr_hot else cfg.mr_cold_contrast
        attrs.append(dict(
            radius_mm=float(radius), in_pet=bool(in_pet), in_mr=bool(in_mr),
            pet_kind=("hot" if pet_hot else "cold") if in_pet else None,
            pet_contrast=float(pr[0] + c_pet * (pr[1] - pr[0])) if in_pet else None,
            mr_kind=("hot" if mr_hot else "cold") if in_mr else None,
            mr_contrast=float(mrr[0] + c_mr * (mrr[1] - mrr[0])) if in_mr else None,
        ))
    masks = np.zeros((0,) + grid.shape, dtype=bool)
    if count == 0:
        return [], masks
    d_wm = _edt(wm >= 0.5, grid)
    d_brain = _edt(brain, grid)
    axes = [grid.axis_mm(a) for a in range(3)]
    placed: list[tuple[np.ndarray, float]] = []
    info, mask_list = [], []
    for a in attrs:
        r = a["radius_mm"]
        inside = d_brain > r  # every voxel within r of the centre lies in the brain mask
        cand = None
        for depth in (1.0, 0.5, 0.0):  # prefer lesions entirely in white matter
            c = np.flatnonzero(inside & (d_wm > depth * r))
            if placed and c.size:
                zi, yi, xi = np.unravel_index(c, grid.shape)
                pos = np.stack([axes[0][zi], axes[1][yi], axes[2][xi]], axis=1)
                ok = np.ones(c.size, dtype=bool)
                for p, rp in placed:
                    dd = pos - p
                    if grid.is_2d:
                        dd[:, 0] = 0.0
                    ok &= np.sqrt((dd**2).sum(1)) > r + rp + cfg.lesion_separation_mm
                c = c[ok]
            if c.size:
                cand, used_depth = c, depth
                break
        if cand is None:
            warnings.warn(f"no room for a lesion of radius {r:.1f} mm in white matter on this grid: skipped",
                          RuntimeWarning, stacklevel=3)
            continue
        flat = int(cand[rng.integers(cand.size)])
        zi, yi, xi = np.unravel_index(flat, grid.shape)
        centre = np.array([axes[0][zi], axes[1][yi], axes[2][xi]])
        dz = np.zeros(1) if grid.is_2d else axes[0] - centre[0]
        d2 = (dz[:, None, None] ** 2 + (axes[1] - centre[1])[None, :, None] ** 2
              + (axes[2] - centre[2])[None, None, :] ** 2)
        m = np.broadcast_to(d2 <= r * r, grid.shape).copy()
        placed.append((centre, r))
        mask_list.append(m)
        info.append(dict(centre_mm=tuple(float(v) for v in centre), **a, num_voxels=int(m.sum()),
                         wm_depth_fraction=used_depth))
    if mask_list:
        masks = np.stack(mask_list)
    return info, masks
