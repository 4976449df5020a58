"""From the simulation grid to the reconstruction grid (no inverse crime).

The phantom is drawn and projected on a grid ``f`` times finer in-plane than the
reconstruction's (:meth:`fbsemlib.data.recipe.DataConfig.simulation_grid`, same centre and
field of view), so each reconstruction voxel is a block of ``f x f`` simulation voxels.
What the reconstruction and the metrics see is the block average: activity, mu-map and MR
are means over the block (the activity a perfect reconstruction on the coarse grid could
reach), masks keep a voxel when at least half of its block is inside.
"""

from __future__ import annotations

import numpy as np

__all__ = ["block_mean", "block_mask", "block_labels"]


def _blocks(arr: np.ndarray, f: int) -> np.ndarray:
    *lead, y, x = arr.shape
    if y % f or x % f:
        raise ValueError(f"in-plane shape {(y, x)} is not a multiple of the oversampling {f}")
    return arr.reshape(*lead, y // f, f, x // f, f)


def block_mean(arr: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` in-plane blocks of ``(..., Y*f, X*f)``, in float64 then cast back."""
    if f == 1:
        return arr.copy()
    return _blocks(arr.astype(np.float64), f).mean(axis=(-3, -1)).astype(arr.dtype)


def block_mask(mask: np.ndarray, f: int) -> np.ndarray:
    """A boolean / 0-1 mask on the coarse grid: at least half of the block is inside."""
    if f == 1:
        return mask.copy()
    return (_blocks(mask.astype(np.float64), f).mean(axis=(-3, -1)) >= 0.5).astype(mask.dtype)


def block_labels(labels: np.ndarray, f: int) -> np.ndarray:
    """A label image (0 = background, ``i`` = lesion ``i``) on the coarse grid: each label
    keeps the coarse voxels at least half covered by it (labels never overlap, so at most
    one label can cover half a block, ties going to the lower label)."""
    if f == 1:
        return labels.copy()
    out = np.zeros(labels.shape[:-2] + (labels.shape[-2] // f, labels.shape[-1] // f), labels.dtype)
    for lab in np.unique(labels):
        if lab == 0:
            continue
        keep = block_mask(labels == lab, f).astype(bool) & (out == 0)
        out[keep] = lab
    return out
