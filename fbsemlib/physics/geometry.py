"""Scanner, sinogram and image-grid geometry.

Conventions follow parallelproj 2.x (``RegularPolygonPETScannerGeometry`` with
``symmetry_axis=2`` and clockwise endpoint ordering, ``RegularPolygonPETLORDescriptor``
with span 1), so that a sinogram computed by either backend means the same thing bin for
bin; parallelproj 2.0.1 anchors its views elsewhere by default, and
:func:`fbsemlib.physics._parallelproj.parallelproj_lor_descriptor` gives the descriptor
options that reproduce these bins (tested against it).

World coordinates are in mm, ``(x, y, z)`` with z the scanner (axial) axis and the
origin at the scanner centre.

Array layouts used throughout fbsemlib (torch, C-order):

* images:     ``(..., Z, Y, X)`` -- e.g. ``(B, C, Z, Y, X)``; a 2D image has ``Z == 1``.
  parallelproj stores the same image as an ``(x, y, z)`` array: ours is its
  ``permute(2, 1, 0)``.
* sinograms:  ``(..., planes, views, radial)`` -- parallelproj's
  ``SinogramSpatialAxisOrder.PVR``.

Crystal ``k`` of a ring (``0 <= k < num_sides * crystals_per_side``) sits on side
``s = k // crystals_per_side``; side 0 is centred on the -y axis and indices run
"clockwise" in parallelproj's default view (+y pointing down), i.e. with increasing
polar angle in the usual x-right / y-up view. Sinogram bin ``(view v, radial r)``
joins in-ring crystals ``start[v, r]`` and ``end[v, r]``, given by the zig-zag
sequence ``(0, n-1), (0, n-2), (1, n-2), (1, n-3), ...`` shifted by ``-v``
(modulo ``n``) and trimmed by ``radial_trim`` at both ends; hence
``num_radial = n - 1 - 2 radial_trim`` and ``num_views = n // 2``.
Planes (span 1) are ordered by ring difference ``0, +1, -1, +2, -2, ...`` and,
within one ring difference, by ``start_ring + end_ring``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np
import torch

from fbsemlib.physics.subsets import subset_views
from fbsemlib.provenance import is_int

__all__ = [
    "RingScanner",
    "SinogramGeometry",
    "ParallelBeamGeometry",
    "ImageGrid",
    "scanner_preset",
    "sinogram_preset",
    "SCANNER_PRESETS",
]


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _positive_int(name: str, value: int) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class RingScanner:
    """A cylindrical scanner made of stacked regular-polygon rings (parallelproj's
    ``RegularPolygonPETScannerGeometry``, ``symmetry_axis=2``).

    Parameters
    ----------
    radius_mm: inner radius of the polygon (centre to detector face).
    num_sides: number of flat sides (detector blocks) per ring.
    crystals_per_side: crystal positions per side (gaps included).
    crystal_spacing_mm: pitch of crystal positions along a side.
    num_rings: number of rings.
    ring_spacing_mm: axial pitch of the rings; rings are centred on z = 0.
    gap_positions: within-side positions that hold no crystal (e.g. ``(8,)`` for the
        mMR). They keep their place in the geometry and get zero efficiency in the
        normalisation (see :mod:`fbsemlib.physics.forward_model`).
    """

    radius_mm: float
    num_sides: int
    crystals_per_side: int
    crystal_spacing_mm: float
    num_rings: int = 1
    ring_spacing_mm: float = 4.0
    gap_positions: tuple[int, ...] = ()
    name: str = "custom"

    def __post_init__(self) -> None:
        _positive("radius_mm", self.radius_mm)
        _positive_int("num_sides", self.num_sides)
        _positive_int("crystals_per_side", self.crystals_per_side)
        _positive("crystal_spacing_mm", self.crystal_spacing_mm)
        _positive_int("num_rings", self.num_rings)
        _positive("ring_spacing_mm", self.ring_spacing_mm)
        object.__setattr__(self, "gap_positions", tuple(int(g) for g in self.gap_positions))
        for g in self.gap_positions:
            if not 0 <= g < self.crystals_per_side:
                raise ValueError(f"gap position {g} outside 0..{self.crystals_per_side - 1}")
        if self.num_crystals_per_ring < 4 or self.num_crystals_per_ring % 2:
            raise ValueError(
                "num_sides * crystals_per_side must be even and >= 4 (the sinogram pairs "
                f"crystals in views of n/2), got {self.num_crystals_per_ring}"
            )
        half_side = 0.5 * self.crystals_per_side * self.crystal_spacing_mm
        if half_side > self.radius_mm * math.tan(math.pi / self.num_sides) * 1.5:
            raise ValueError(
                "crystals_per_side * crystal_spacing_mm is far wider than a polygon side "
                f"of radius {self.radius_mm} mm with {self.num_sides} sides"
            )

    @property
    def num_crystals_per_ring(self) -> int:
        return self.num_sides * self.crystals_per_side

    @property
    def ring_positions_mm(self) -> np.ndarray:
        """z of every ring in mm, centred on 0."""
        r = np.arange(self.num_rings, dtype=np.float64)
        return (r - (self.num_rings - 1) / 2.0) * self.ring_spacing_mm

    def crystal_xy_mm(self) -> np.ndarray:
        """In-ring crystal positions, ``(num_crystals_per_ring, 2)`` as (x, y) in mm."""
        n_side = self.crystals_per_side
        k = np.arange(self.num_crystals_per_ring)
        side, within = k // n_side, k % n_side
        # parallelproj's clockwise ordering re-indexes the counter-clockwise layout
        side = (self.num_sides - side) % self.num_sides
        within = n_side - 1 - within
        pos = self.crystal_spacing_mm * (within - (n_side - 1) / 2.0)
        phi = math.pi + 2.0 * math.pi * side / self.num_sides
        y = np.cos(phi) * self.radius_mm - np.sin(phi) * pos
        x = np.sin(phi) * self.radius_mm + np.cos(phi) * pos
        return np.stack([x, y], axis=-1)

    def crystal_is_gap(self) -> np.ndarray:
        """Boolean ``(num_crystals_per_ring,)``: True where the position is a block gap."""
        k = np.arange(self.num_crystals_per_ring)
        # same re-indexing as crystal_xy_mm so that gaps sit at the physical position
        within = self.crystals_per_side - 1 - (k % self.crystals_per_side)
        return np.isin(within, np.asarray(self.gap_positions, dtype=int))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gap_positions"] = list(self.gap_positions)
        return d


@dataclass(frozen=True)
class SinogramGeometry:
    """Span-1 sinogram of a :class:`RingScanner` (parallelproj's
    ``RegularPolygonPETLORDescriptor``), layout ``(planes, views, radial)``.

    ``views`` optionally restricts the sinogram to a subset of views (used for
    ordered subsets); ``None`` means all ``num_crystals_per_ring // 2`` views.
    """

    scanner: RingScanner
    radial_trim: int = 3
    max_ring_difference: int | None = None
    views: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = self.scanner.num_crystals_per_ring
        if not isinstance(self.radial_trim, (int, np.integer)) or self.radial_trim < 0:
            raise ValueError(f"radial_trim must be a non-negative integer, got {self.radial_trim!r}")
        if n - 1 - 2 * self.radial_trim < 1:
            raise ValueError(
                f"radial_trim={self.radial_trim} leaves no radial bins for {n} crystals per ring"
            )
        mrd = self.scanner.num_rings - 1 if self.max_ring_difference is None else self.max_ring_difference
        if not isinstance(mrd, (int, np.integer)) or mrd < 0:
            raise ValueError(f"max_ring_difference must be a non-negative integer, got {mrd!r}")
        object.__setattr__(self, "max_ring_difference", int(min(mrd, self.scanner.num_rings - 1)))
        if self.views is not None:
            v = tuple(int(i) for i in self.views)
            if len(v) == 0:
                raise ValueError("views must not be empty")
            if min(v) < 0 or max(v) >= n // 2:
                raise ValueError(f"views must lie in 0..{n // 2 - 1}")
            object.__setattr__(self, "views", v)

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_radial(self) -> int:
        return self.scanner.num_crystals_per_ring - 1 - 2 * self.radial_trim

    @property
    def num_views_total(self) -> int:
        return self.scanner.num_crystals_per_ring // 2

    @property
    def view_indices(self) -> np.ndarray:
        if self.views is None:
            return np.arange(self.num_views_total)
        return np.asarray(self.views)

    @property
    def num_views(self) -> int:
        return len(self.view_indices)

    @cached_property
    def _planes(self) -> tuple[np.ndarray, np.ndarray]:
        R, D = self.scanner.num_rings, self.max_ring_difference
        pairs = [(s, e) for s in range(R) for e in range(R) if abs(e - s) <= D]
        pairs.sort(key=lambda p: (abs(p[1] - p[0]), -(p[1] - p[0]), p[0] + p[1]))
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    @property
    def start_ring(self) -> np.ndarray:
        return self._planes[0]

    @property
    def end_ring(self) -> np.ndarray:
        return self._planes[1]

    @property
    def num_planes(self) -> int:
        return len(self.start_ring)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(planes, views, radial)``."""
        return (self.num_planes, self.num_views, self.num_radial)

    # -- crystal pairs -----------------------------------------------------------------
    def crystal_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """In-ring crystal indices ``(start, end)``, each ``(views, radial)``."""
        n = self.scanner.num_crystals_per_ring
        m = 2 * (n // 2)
        start_seq = np.arange(m - 1) // 2
        end_seq = np.concatenate(([-1], -((np.arange(m - 2) + 4) // 2)))
        t = self.radial_trim
        sl = slice(t, -t if t > 0 else None)
        v = self.view_indices[:, None]
        start = (start_seq[sl][None, :] - v) % n
        end = (end_seq[sl][None, :] - v) % n
        return start.astype(np.int64), end.astype(np.int64)

    def lor_endpoints(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end points of every bin in mm, each ``(planes, views, radial, 3)``
        as ``(x, y, z)``."""
        xy = self.scanner.crystal_xy_mm()
        zr = self.scanner.ring_positions_mm
        s, e = self.crystal_pairs()
        P, V, R = self.shape
        start = np.empty((P, V, R, 3))
        end = np.empty((P, V, R, 3))
        start[..., :2] = xy[s][None]
        end[..., :2] = xy[e][None]
        start[..., 2] = zr[self.start_ring][:, None, None]
        end[..., 2] = zr[self.end_ring][:, None, None]
        return torch.as_tensor(start, dtype=dtype), torch.as_tensor(end, dtype=dtype)

    def subset(self, m: int, num_subsets: int) -> "SinogramGeometry":
        """Ordered subset ``m`` of ``num_subsets``: views ``m, m + num_subsets, ...`` of this
        sinogram (:func:`~fbsemlib.physics.subsets.subset_views`)."""
        views = subset_views(self.view_indices, m, num_subsets)
        return SinogramGeometry(self.scanner, self.radial_trim, self.max_ring_difference, tuple(views))

    def to_dict(self) -> dict:
        return {
            "kind": "ring",
            "scanner": self.scanner.to_dict(),
            "radial_trim": self.radial_trim,
            "max_ring_difference": self.max_ring_difference,
            "views": None if self.views is None else list(self.views),
        }


@dataclass(frozen=True)
class ParallelBeamGeometry:
    """2D parallel-beam sinogram (``num_views`` angles over [0, pi), ``num_radial``
    detector bins of ``bin_width_mm``), layout ``(1, views, radial)``.

    Used to compare with parallel-beam toolboxes (ASTRA). View ``v`` has angle
    ``theta_v = pi v / num_views``; the ray direction is ``(cos theta, sin theta)`` and
    bin ``r`` lies at signed distance ``(r - (num_radial - 1) / 2) bin_width_mm``
    along ``(-sin theta, cos theta)``.
    """

    num_views: int
    num_radial: int
    bin_width_mm: float = 1.0
    views: tuple[int, ...] | None = None
    length_mm: float = 2000.0

    @property
    def view_indices(self) -> np.ndarray:
        return np.arange(self.num_views) if self.views is None else np.asarray(self.views)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, len(self.view_indices), self.num_radial)

    @property
    def num_planes(self) -> int:
        return 1

    def lor_endpoints(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        theta = np.pi * self.view_indices / self.num_views
        d = (np.arange(self.num_radial) - (self.num_radial - 1) / 2.0) * self.bin_width_mm
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        cx, cy = -s * d[None], c * d[None]
        h = self.length_mm / 2
        start = np.stack([cx - h * c, cy - h * s, np.zeros_like(cx)], -1)[None]
        end = np.stack([cx + h * c, cy + h * s, np.zeros_like(cx)], -1)[None]
        return torch.as_tensor(start, dtype=dtype), torch.as_tensor(end, dtype=dtype)

    def subset(self, m: int, num_subsets: int) -> "ParallelBeamGeometry":
        views = subset_views(self.view_indices, m, num_subsets)
        return ParallelBeamGeometry(self.num_views, self.num_radial, self.bin_width_mm, tuple(int(v) for v in views), self.length_mm)

    def to_dict(self) -> dict:
        return {"kind": "parallel", **asdict(self), "views": None if self.views is None else list(self.views)}


@dataclass(frozen=True)
class ImageGrid:
    """A voxel grid ``(nz, ny, nx)`` with ``voxel_size_mm = (dz, dy, dx)``.

    ``origin_mm`` is the world position ``(z, y, x)`` of the centre of voxel
    ``[0, 0, 0]``; by default the grid is centred on the scanner centre. A 2D image
    is ``nz == 1`` (its single slice sits at z = 0).
    """

    shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    origin_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"shape must be (nz, ny, nx), got {self.shape!r}")
        for n in self.shape:
            _positive_int("shape entries", n)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if len(self.voxel_size_mm) != 3:
            raise ValueError(f"voxel_size_mm must be (dz, dy, dx), got {self.voxel_size_mm!r}")
        for v in self.voxel_size_mm:
            _positive("voxel_size_mm entries", float(v))
        object.__setattr__(self, "voxel_size_mm", tuple(float(v) for v in self.voxel_size_mm))
        if self.origin_mm is None:
            origin = tuple(-(n - 1) / 2.0 * v for n, v in zip(self.shape, self.voxel_size_mm))
            object.__setattr__(self, "origin_mm", origin)
        else:
            if len(self.origin_mm) != 3:
                raise ValueError("origin_mm must be (z, y, x)")
            object.__setattr__(self, "origin_mm", tuple(float(o) for o in self.origin_mm))

    @property
    def is_2d(self) -> bool:
        return self.shape[0] == 1

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    def axis_mm(self, axis: int) -> np.ndarray:
        """Voxel-centre coordinates along ``axis`` (0 = z, 1 = y, 2 = x)."""
        return self.origin_mm[axis] + np.arange(self.shape[axis]) * self.voxel_size_mm[axis]

    def fov_radius_mm(self) -> float:
        """Radius of the largest centred disc that fits in the x-y extent of the grid."""
        ry = self.shape[1] * self.voxel_size_mm[1] / 2
        rx = self.shape[2] * self.voxel_size_mm[2] / 2
        return float(min(rx, ry))

    def fov_mask(self, margin_voxels: float = 1.0) -> torch.Tensor:
        """Boolean ``(nz, ny, nx)`` cylinder mask of the transaxial field of view."""
        y = torch.as_tensor(self.axis_mm(1))[:, None]
        x = torch.as_tensor(self.axis_mm(2))[None, :]
        r = self.fov_radius_mm() - margin_voxels * max(self.voxel_size_mm[1:])
        m = (x**2 + y**2) <= r**2
        return m[None].expand(self.shape[0], -1, -1).clone()

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "voxel_size_mm": list(self.voxel_size_mm), "origin_mm": list(self.origin_mm)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageGrid":
        return cls(tuple(d["shape"]), tuple(d["voxel_size_mm"]), tuple(d["origin_mm"]) if d.get("origin_mm") else None)


def sinogram_geometry_from_dict(d: dict):
    """Inverse of ``SinogramGeometry.to_dict`` / ``ParallelBeamGeometry.to_dict``."""
    d = dict(d)
    kind = d.pop("kind", "ring")
    if kind == "parallel":
        views = d.pop("views", None)
        return ParallelBeamGeometry(**d, views=None if views is None else tuple(views))
    sc = dict(d["scanner"])
    sc["gap_positions"] = tuple(sc.get("gap_positions", ()))
    views = d.get("views")
    return SinogramGeometry(
        RingScanner(**sc), d["radial_trim"], d["max_ring_difference"], None if views is None else tuple(views)
    )


# --------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------
SCANNER_PRESETS: dict[str, dict] = {
    # Siemens Biograph mMR-like: 56 blocks x (8 crystals + 1 gap position) = 504 per ring,
    # 252 views; radial_trim=79 gives 345 radial bins (the zig-zag convention of
    # parallelproj always yields an odd number; the mMR's own sinogram has 344).
    "mmr": dict(
        scanner=dict(radius_mm=328.0, num_sides=56, crystals_per_side=9, crystal_spacing_mm=4.0843,
                     num_rings=64, ring_spacing_mm=4.0625, gap_positions=(8,), name="mmr"),
        radial_trim=79,
    ),
    # a 2D (single ring) mMR
    "mmr2d": dict(
        scanner=dict(radius_mm=328.0, num_sides=56, crystals_per_side=9, crystal_spacing_mm=4.0843,
                     num_rings=1, ring_spacing_mm=4.0625, gap_positions=(8,), name="mmr2d"),
        radial_trim=79,
    ),
    # small CPU-friendly scanners for tests and the default book profile
    "small2d": dict(
        scanner=dict(radius_mm=180.0, num_sides=24, crystals_per_side=8, crystal_spacing_mm=5.2,
                     num_rings=1, ring_spacing_mm=4.0, gap_positions=(7,), name="small2d"),
        radial_trim=40,
    ),
    "tiny2d": dict(
        scanner=dict(radius_mm=120.0, num_sides=16, crystals_per_side=6, crystal_spacing_mm=5.0,
                     num_rings=1, ring_spacing_mm=4.0, gap_positions=(), name="tiny2d"),
        radial_trim=16,
    ),
    "small3d": dict(
        scanner=dict(radius_mm=180.0, num_sides=24, crystals_per_side=8, crystal_spacing_mm=5.2,
                     num_rings=8, ring_spacing_mm=4.0, gap_positions=(7,), name="small3d"),
        radial_trim=40, max_ring_difference=3,
    ),
}


def scanner_preset(name: str, num_rings: int | None = None) -> RingScanner:
    """A named :class:`RingScanner`; ``num_rings`` overrides the preset (e.g. a few-ring
    mMR slab). Presets: ``mmr`` (64 rings), ``mmr2d`` (one ring), ``small2d``, ``tiny2d``,
    ``small3d``. :func:`sinogram_preset` adds the preset's sinogram (radial trim, ring
    difference)."""
    if name not in SCANNER_PRESETS:
        raise ValueError(f"unknown scanner preset {name!r}; choose one of {sorted(SCANNER_PRESETS)}")
    sc = dict(SCANNER_PRESETS[name]["scanner"])
    if num_rings is not None:
        sc["num_rings"] = num_rings
    return RingScanner(**sc)


def sinogram_preset(name: str, num_rings: int | None = None, max_ring_difference: int | None = None) -> SinogramGeometry:
    """The :class:`SinogramGeometry` of preset ``name`` (see :func:`scanner_preset`)."""
    scanner = scanner_preset(name, num_rings)
    p = SCANNER_PRESETS[name]
    mrd = max_ring_difference if max_ring_difference is not None else p.get("max_ring_difference")
    return SinogramGeometry(scanner, radial_trim=p["radial_trim"], max_ring_difference=mrd)
