"""Ordered subsets: the one rule that says which views form a subset.

Subset ``m`` of ``M`` (``0 <= m < M``) is every ``M``-th view starting at view ``m``: views
``m, m + M, m + 2M, ...`` of the sinogram (interleaved subsets, as in Hudson & Larkin's OSEM;
the interleaving is this package's choice). The same selection applies to view indices
(:func:`subset_views`, used by the geometries) and to every sinogram-shaped tensor
``(..., views, radial)`` (:func:`sinogram_subset`: data, normalisation, attenuation,
background), so a subset's projector and its data always agree.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fbsemlib.provenance import is_int

__all__ = ["subset_slice", "subset_views", "sinogram_subset", "sinogram_subset_index"]


def subset_slice(m: int, num_subsets: int, num_views: int) -> slice:
    """The slice of subset ``m`` of ``num_subsets`` along a views axis of ``num_views`` views
    (``m::num_subsets``); a clear error for an impossible subset."""
    if not is_int(num_subsets) or num_subsets < 1:
        raise ValueError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    if num_subsets > num_views:
        raise ValueError(f"num_subsets={num_subsets} exceeds the {num_views} views")
    if not is_int(m) or not 0 <= m < num_subsets:
        raise ValueError(f"subset index m must lie in 0..{num_subsets - 1}, got {m!r}")
    return np.s_[m::num_subsets]


def subset_views(view_indices: Sequence[int] | np.ndarray, m: int, num_subsets: int) -> np.ndarray:
    """The view indices of subset ``m`` of ``num_subsets`` (an array)."""
    views = np.asarray(view_indices)
    return views[subset_slice(m, num_subsets, len(views))]


def sinogram_subset_index(m: int, num_subsets: int, num_views: int) -> tuple:
    """Index of subset ``m``'s views in a sinogram-shaped tensor ``(..., views, radial)``."""
    return (Ellipsis, subset_slice(m, num_subsets, num_views), slice(None))


def sinogram_subset(t: torch.Tensor | None, m: int, num_subsets: int) -> torch.Tensor | None:
    """Subset ``m``'s views of a sinogram-shaped tensor ``(..., views, radial)`` (a view of
    ``t``, not a copy); None stays None (an absent factor)."""
    if t is None:
        return None
    return t[sinogram_subset_index(m, num_subsets, t.shape[-2])]
