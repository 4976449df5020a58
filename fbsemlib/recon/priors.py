r"""Quadratic-form priors for De Pierro MAP-EM: a plain quadratic (Gaussian MRF) prior
and the MR-guided Bowsher prior.

Normalisation
-------------
Every prior here is the weighted quadratic form over a 3x3 (in-plane) or 3x3x3
neighbourhood ``N_j`` of each voxel ``j``

.. math::  R(x) = \tfrac12 \sum_j \sum_{k \in N_j} w_{jk} (x_j - x_k)^2 ,

each *ordered* pair ``(j, k)`` counted once (so an unordered pair with symmetric weights
is counted twice: ``R = sum_{pairs} w_jk (x_j - x_k)^2``). Neighbours outside the image
are excluded (``w_jk = 0``; no periodic or mirrored boundary). The MAP-EM objective is
``Phi(x) = L(x) - beta R(x)`` (``L``: Poisson log-likelihood).

Only the symmetric part of the weights matters: ``(x_j - x_k)^2`` is symmetric, so
``R`` is unchanged when ``w`` is replaced by ``(w + w^T) / 2``. All weights below are
symmetric (``w_jk = w_kj``) unless stated; then ``dR/dx_j = 2 sum_k w_jk (x_j - x_k)``.

De Pierro's separable surrogate
-------------------------------
With ``c_jk = (x^n_j + x^n_k) / 2`` at the current image ``x^n``, convexity of the square
gives, for every pair,

.. math::  (x_j - x_k)^2 = \big(\tfrac12(2x_j - 2c_{jk}) - \tfrac12(2x_k - 2c_{jk})\big)^2
           \le 2 (x_j - c_{jk})^2 + 2 (x_k - c_{jk})^2 ,

with equality at ``x = x^n``. Summing with ``w_jk / 2`` and using the symmetry of ``w``
and ``c`` (the ``x_k`` half relabels into the ``x_j`` half)

.. math::  R(x) \le \sum_j 2 \sum_k w_{jk} (x_j - c_{jk})^2
              = \sum_j \tfrac{w_j}{2} (x_j - \bar x_j)^2 + C(x^n),

.. math::  \bar x_j = \frac{\sum_k w_{jk} (x^n_j + x^n_k)}{2 \sum_k w_{jk}}, \qquad
           w_j = 4 \sum_k w_{jk} ,

touching ``R`` at ``x^n`` (same value and gradient). With the EM surrogate of ``L``,
``sum_j s_j (x^{em}_j ln x_j - x_j)``, the surrogate of ``Phi`` is per voxel

    s_j (x_em_j ln z - z) - (beta w_j / 2) (z - xbar_j)^2 ,

whose maximiser is exactly ``fbsemlib.recon.em.fuse(x_em, xbar, s, beta * w)``. Hence
``surrogate(x^n)`` returns ``(xbar, w)`` with **w = 4 sum_k w_jk**, and every MAP-EM
iteration with one subset increases ``Phi`` (tested). A voxel without neighbours
(``sum_k w_jk = 0``) gets ``xbar_j = x^n_j`` and ``w_j = 0`` (plain EM there).

Comparison with the original FBSEM code: its ``MAPEM2D`` fuses with ``gamma = beta *
sum_k w_jk`` and the same ``xbar``, so its ``beta`` is 4x the ``beta`` used here for the
same weights (its row-normalised inverse-distance weights correspond to
``normalise=True``).

Bowsher weights (asymmetric) and their symmetrisation
-----------------------------------------------------
Bowsher et al. (2004): voxel ``j`` keeps the ``B = num_neighbours`` neighbours ``k`` of
its window with the smallest ``|mr_j - mr_k|`` (``b_jk = 1``, else 0). ``k`` may choose
``j`` without ``j`` choosing ``k``, so ``b`` is not symmetric. Options (``symmetrise``):

* ``"mean"`` (default): ``w = (b + b^T) / 2`` (values 0, 1/2, 1). This is *exact* for the
  usual asymmetric Bowsher energy ``1/2 sum_j sum_{k in B_j} (x_j - x_k)^2`` (each voxel
  summing over its own chosen neighbours; its gradient involves ``b + b^T``), so the
  surrogate majorises that energy and MAP-EM is monotone in it.
* ``"max"`` (union: ``k`` in ``B_j`` or ``j`` in ``B_k``) and ``"min"`` (intersection):
  symmetric graphs, also exact majorisers of their own ``R``.
* ``"none"``: the original FBSEM code's row weights ``b_jk`` in the surrogate centre and
  weight. ``value`` and ``gradient`` still give the ``"mean"`` energy, which this
  surrogate does *not* majorise in general (no monotonicity guarantee); for fidelity only.

The original code's 3x3 window contains the centre voxel (difference 0), so its "4 most
similar" are the centre plus 3 neighbours, with row-normalised inverse-distance weights
and periodic borders; ``BowsherPrior(mr, 3, weights="inverse_distance", normalise=True,
symmetrise="none")`` is the closest match (up to the border handling). Ties in
``|mr_j - mr_k|`` are broken towards the nearer neighbour, then in a fixed order.

Shapes and devices: images are ``(..., Z, Y, X)`` (plain ``(Z, Y, X)`` or batched
``(B, C, Z, Y, X)``); the Bowsher MR image has shape ``(..., Z, Y, X)`` broadcastable to
the images it is used with (one MR per batch item, or one shared). Everything is
vectorised torch (shifted views of a zero-padded image), on the image's device and dtype,
and differentiable in ``x``.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["QuadraticFormPrior", "QuadraticPrior", "BowsherPrior", "neighbourhood_offsets"]

_NEIGHBOURHOODS = ("3x3", "3x3x3", "auto")
_WEIGHTS = ("inverse_distance", "uniform")
_SYMMETRISE = ("mean", "max", "min", "none")


def neighbourhood_offsets(neighbourhood: str) -> tuple[tuple[int, int, int], ...]:
    """The ``(dz, dy, dx)`` offsets of a ``"3x3"`` (8, in-plane) or ``"3x3x3"`` (26)
    neighbourhood, centre excluded, nearest first (then lexicographic)."""
    if neighbourhood == "3x3":
        offs = [(0, dy, dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2)]
    elif neighbourhood == "3x3x3":
        offs = list(itertools.product((-1, 0, 1), repeat=3))
    else:
        raise ValueError(f"neighbourhood must be '3x3' or '3x3x3', got {neighbourhood!r}")
    offs = [o for o in offs if o != (0, 0, 0)]
    return tuple(sorted(offs, key=lambda o: (sum(d * d for d in o), o)))


def _check_image(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 3:
        raise ValueError(f"{name} must have shape (..., Z, Y, X) (at least 3 dims), got {tuple(x.shape)}")


def _pad(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 1, 1, 1, 1, 1))


def _view(xp: torch.Tensor, o: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``out[..., z, y, x] = x[..., z + dz, y + dy, x + dx]`` (0 outside) from the padded ``xp``."""
    (dz, dy, dx), (nz, ny, nx) = o, shape
    return xp[..., 1 + dz : 1 + dz + nz, 1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]


def _shift(x: torch.Tensor, o: Sequence[int]) -> torch.Tensor:
    return _view(_pad(x), o, x.shape[-3:])


class QuadraticFormPrior:
    """Base class: ``R(x) = 1/2 sum_j sum_k w_jk (x_j - x_k)^2`` (see the module docstring).

    Subclasses provide ``offsets`` and ``_weights(x)``: a tensor ``(K, ..., Z, Y, X)`` of the
    symmetric weights ``w_{j, j + offset_k}`` (zero for neighbours outside the image) on
    ``x``'s device and dtype, broadcastable to ``x`` after the first dimension, and may
    override ``_surrogate_weights(x)`` (default: the same weights)."""

    offsets: tuple[tuple[int, int, int], ...] = ()

    # -- to implement ------------------------------------------------------------------
    def _weights(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _surrogate_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self._weights(x)

    def _check_x(self, x: torch.Tensor) -> None:
        _check_image(x, "x")

    # -- public API --------------------------------------------------------------------
    def weight_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_k w_jk`` per voxel (shape broadcastable to ``x``)."""
        self._check_x(x)
        return self._weights(x).sum(0)

    def surrogate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """De Pierro's separable surrogate at ``x``: ``(x_reg, w)`` with
        ``x_reg_j = sum_k w_jk (x_j + x_k) / (2 sum_k w_jk)`` (``x_j`` where the sum is 0)
        and ``w_j = 4 sum_k w_jk`` (broadcastable to ``x``), so that
        ``fuse(x_em, x_reg, s, beta * w)`` maximises the surrogate of ``L - beta R``."""
        self._check_x(x)
        w = self._surrogate_weights(x)
        xp = _pad(x)
        shape = x.shape[-3:]
        num = None
        for k, o in enumerate(self.offsets):
            t = w[k] * _view(xp, o, shape)
            num = t if num is None else num + t
        total = w.sum(0)
        pos = total > 0
        x_reg = torch.where(pos, (total * x + num) / (2 * torch.where(pos, total, torch.ones_like(total))), x)
        return x_reg, 4 * total

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """``R(x)`` summed over the last three dimensions (shape ``x.shape[:-3]``, or the
        broadcast of it with the prior's own leading dimensions)."""
        self._check_x(x)
        w = self._weights(x)
        xp = _pad(x)
        shape = x.shape[-3:]
        r = None
        for k, o in enumerate(self.offsets):
            t = w[k] * (x - _view(xp, o, shape)) ** 2
            r = t if r is None else r + t
        return 0.5 * r.sum(dim=(-3, -2, -1))

    __call__ = value

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``dR/dx_j = 2 sum_k w_jk (x_j - x_k)`` (symmetric weights)."""
        self._check_x(x)
        w = self._weights(x)
        xp = _pad(x)
        shape = x.shape[-3:]
        g = None
        for k, o in enumerate(self.offsets):
            t = w[k] * (x - _view(xp, o, shape))
            g = t if g is None else g + t
        return 2 * g


def _base_weights(offsets, weights: str, voxel_size, normalise: bool) -> list[float]:
    if weights not in _WEIGHTS:
        raise ValueError(f"weights must be one of {_WEIGHTS}, got {weights!r}")
    vs = (1.0, 1.0, 1.0) if voxel_size is None else tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or not all(v > 0 and math.isfinite(v) for v in vs):
        raise ValueError(f"voxel_size must be three positive numbers (z, y, x), got {voxel_size!r}")
    if weights == "uniform":
        b = [1.0] * len(offsets)
    else:
        b = [1.0 / math.sqrt(sum((d * v) ** 2 for d, v in zip(o, vs))) for o in offsets]
    if normalise:
        s = sum(b)
        b = [v / s for v in b]
    return b


def _resolve_neighbourhood(neighbourhood: str, nz: int) -> str:
    if neighbourhood not in _NEIGHBOURHOODS:
        raise ValueError(f"neighbourhood must be one of {_NEIGHBOURHOODS}, got {neighbourhood!r}")
    if neighbourhood == "auto":
        return "3x3" if nz == 1 else "3x3x3"
    return neighbourhood


class QuadraticPrior(QuadraticFormPrior):
    """Quadratic (Gaussian MRF) prior ``R(x) = 1/2 sum_j sum_{k in N_j} w_jk (x_j - x_k)^2``.

    ``neighbourhood``: ``"3x3"`` (8 in-plane neighbours), ``"3x3x3"`` (26) or ``"auto"``
    (3x3 for single-slice images ``Z == 1``, else 3x3x3). ``weights``:
    ``"inverse_distance"`` (``1 / |offset|``, distances in units of ``voxel_size``
    ``(z, y, x)``, default 1 per axis) or ``"uniform"`` (1). ``normalise=True`` divides all
    weights by their sum over the full window (so ``sum_k w_jk = 1`` inside the image, as
    the original FBSEM code's weights). Neighbours outside the image are excluded."""

    def __init__(self, neighbourhood: str = "auto", weights: str = "inverse_distance",
                 voxel_size: Sequence[float] | None = None, normalise: bool = False):
        if neighbourhood not in _NEIGHBOURHOODS:
            raise ValueError(f"neighbourhood must be one of {_NEIGHBOURHOODS}, got {neighbourhood!r}")
        _base_weights(neighbourhood_offsets("3x3"), weights, voxel_size, normalise)  # validate
        self.neighbourhood = neighbourhood
        self.weights = weights
        self.voxel_size = voxel_size
        self.normalise = bool(normalise)
        self._cache: dict = {}

    def _setup(self, shape):
        nb = _resolve_neighbourhood(self.neighbourhood, shape[0])
        offsets = neighbourhood_offsets(nb)
        return offsets, _base_weights(offsets, self.weights, self.voxel_size, self.normalise)

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[-3:])
        key = (shape, x.dtype, x.device)
        if key not in self._cache:
            offsets, base = self._setup(shape)
            ones = torch.ones(shape, dtype=x.dtype, device=x.device)
            onesp = _pad(ones)
            w = torch.stack([b * _view(onesp, o, shape) for o, b in zip(offsets, base)])
            self._cache = {key: (offsets, w)}  # keep only the latest
        self.offsets, w = self._cache[key]
        return w

    def __repr__(self) -> str:
        return (f"QuadraticPrior(neighbourhood={self.neighbourhood!r}, weights={self.weights!r}, "
                f"voxel_size={self.voxel_size!r}, normalise={self.normalise})")


class BowsherPrior(QuadraticFormPrior):
    """MR-guided Bowsher prior: a quadratic prior whose neighbours of voxel ``j`` are the
    ``num_neighbours`` voxels of its window with the most similar MR value (smallest
    ``|mr_j - mr_k|``), neighbours outside the image excluded (a border voxel with fewer
    valid neighbours keeps them all).

    ``mr_image``: ``(..., Z, Y, X)``, broadcastable to the PET images (one MR per batch
    item, e.g. ``(B, 1, Z, Y, X)``, or shared ``(Z, Y, X)``); finite. ``neighbourhood``:
    ``"auto"`` (3x3 when ``Z == 1``, else 3x3x3), ``"3x3"`` or ``"3x3x3"``.
    ``num_neighbours``: 1 .. window size - 1 (8 or 26). ``weights``: ``"uniform"`` (the
    selected neighbours get 1) or ``"inverse_distance"``; ``normalise`` as in
    :class:`QuadraticPrior`. ``symmetrise``: ``"mean"`` (default), ``"max"``, ``"min"`` or
    ``"none"`` (see the module docstring).

    Attributes: ``offsets`` (the K window offsets), ``selected`` (bool ``(K, ..., Z, Y, X)``:
    the asymmetric Bowsher choice ``b_jk``), ``weight_maps`` (the symmetric ``w_jk`` used by
    ``value``/``gradient``, ``(K, ..., Z, Y, X)``)."""

    def __init__(self, mr_image: torch.Tensor, num_neighbours: int = 4, neighbourhood: str = "auto",
                 weights: str = "uniform", symmetrise: str = "mean",
                 voxel_size: Sequence[float] | None = None, normalise: bool = False):
        _check_image(mr_image, "mr_image")
        if not bool(torch.isfinite(mr_image).all()):
            raise ValueError("mr_image contains NaN or Inf values")
        nb = _resolve_neighbourhood(neighbourhood, mr_image.shape[-3])
        offsets = neighbourhood_offsets(nb)
        K = len(offsets)
        if isinstance(num_neighbours, bool) or not isinstance(num_neighbours, int) or not 1 <= num_neighbours <= K:
            raise ValueError(f"num_neighbours must be an integer in [1, {K}] for a {nb} window, got {num_neighbours!r}")
        if symmetrise not in _SYMMETRISE:
            raise ValueError(f"symmetrise must be one of {_SYMMETRISE}, got {symmetrise!r}")
        base = _base_weights(offsets, weights, voxel_size, normalise)
        self.neighbourhood, self.num_neighbours, self.symmetrise = nb, num_neighbours, symmetrise
        self.weights, self.voxel_size, self.normalise = weights, voxel_size, bool(normalise)
        self.offsets = offsets
        self.mr_shape = tuple(mr_image.shape)

        mr = mr_image.detach()
        shape = mr.shape[-3:]
        mrp = _pad(mr)
        validp = _pad(torch.ones(shape, dtype=torch.bool, device=mr.device))
        inf = torch.tensor(float("inf"), dtype=mr.dtype, device=mr.device)
        diffs = torch.stack([
            torch.where(_view(validp, o, shape), (mr - _view(mrp, o, shape)).abs(), inf) for o in offsets
        ])
        order = torch.sort(diffs, dim=0, stable=True).indices  # ties: nearer (earlier) offset first
        sel = torch.zeros(diffs.shape, dtype=torch.bool, device=mr.device)
        sel.scatter_(0, order[:num_neighbours], True)
        sel &= torch.isfinite(diffs)
        self.selected = sel

        bw = torch.tensor(base, dtype=mr.dtype, device=mr.device).reshape((K,) + (1,) * mr.ndim)
        row = sel.to(mr.dtype) * bw  # b_jk: row j, column j + offset_k
        opp = [offsets.index(tuple(-d for d in o)) for o in offsets]
        # transpose: w^T_{j, j+o} = w_{j+o, j} = row[opp(o)] evaluated at j + o
        col = torch.stack([_shift(row[opp[k]], o) for k, o in enumerate(offsets)])
        if symmetrise in ("mean", "none"):
            sym = 0.5 * (row + col)
        elif symmetrise == "max":
            sym = torch.maximum(row, col)
        else:
            sym = torch.minimum(row, col)
        self.weight_maps = sym
        self._row = row if symmetrise == "none" else sym
        self._cast_key = None

    def _check_x(self, x: torch.Tensor) -> None:
        _check_image(x, "x")
        try:
            b = torch.broadcast_shapes(tuple(x.shape), self.mr_shape)
        except RuntimeError:
            b = None
        if b != tuple(x.shape):
            raise ValueError(
                f"mr_image shape {self.mr_shape} does not match the image shape {tuple(x.shape)} "
                "(it must have the same (Z, Y, X) and broadcast to the image's batch dimensions)"
            )

    def _cast(self, x: torch.Tensor) -> None:
        key = (x.dtype, x.device)
        if key != self._cast_key:
            self.weight_maps = self.weight_maps.to(device=x.device, dtype=x.dtype)
            self._row = self._row.to(device=x.device, dtype=x.dtype)
            self.selected = self.selected.to(device=x.device)
            self._cast_key = key

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        self._cast(x)
        return self.weight_maps

    def _surrogate_weights(self, x: torch.Tensor) -> torch.Tensor:
        self._cast(x)
        return self._row

    def to(self, device=None, dtype=None) -> "BowsherPrior":
        """Move the stored weights (in place; returns ``self``)."""
        self.weight_maps = self.weight_maps.to(device=device, dtype=dtype)
        self._row = self._row.to(device=device, dtype=dtype)
        if device is not None:
            self.selected = self.selected.to(device=device)
        self._cast_key = None
        return self

    def __repr__(self) -> str:
        return (f"BowsherPrior(mr_shape={self.mr_shape}, num_neighbours={self.num_neighbours}, "
                f"neighbourhood={self.neighbourhood!r}, weights={self.weights!r}, symmetrise={self.symmetrise!r})")
