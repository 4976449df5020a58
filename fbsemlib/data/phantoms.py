"""Offline brain phantoms for PET/MR: random subjects from the ICBM152 2009 template,
a loader for BrainWeb files already on disk, and simple test objects.

Everything here works without network access. Brain subjects are built from the ICBM152
2009 template shipped inside the ``nilearn`` wheel (T1, grey- and white-matter probability
maps, 1 mm). The template is skull-stripped, so a CSF layer, a skull, a soft-tissue layer
and skin are added as shells around the (smoothed) brain. Each subject is a seeded random
draw of a smooth non-rigid deformation, a rotation, an isotropic scaling, grey/white
contrast, a global activity scale and hot/cold lesions placed in white matter, drawn
independently in PET and MR (so PET-only and MR-only lesions exist, as in the FBSEM-Net
data).

Conventions
-----------
* Volumes are ``torch.float32`` tensors ``(nz, ny, nx)`` on an :class:`~fbsemlib.physics.geometry.ImageGrid`
  (world mm, z axial). A 2D subject (``nz == 1``) is one axial slice.
* Head orientation on the grid: +x is the subject's right (neurological view), +y is
  posterior (the nose points to row 0, i.e. up with ``imshow``), +z is superior.
* The brain (bounding box of the brain mask) is centred on the grid centre; for a 2D grid
  the grid plane passes through the source world (MNI) height ``slice_z_mm``.
* Units: activity in arbitrary units (GM 96, WM 32 before the global scale, as in the
  original FBSEM-Net data), ``mu_map`` in 1/mm, ``mr`` in arbitrary T1 units (WM 154,
  GM 106), lengths in mm.
* Tissue classes (:data:`TISSUES`): ``gm``, ``wm``, ``csf``, ``bone`` (skull),
  ``soft`` (fat, muscle, other soft tissue), ``skin``; the remainder is air.
  ``Phantom.tissues`` holds their partial-volume fractions on the grid (they sum to <= 1).

Lesion masks
------------
``Phantom.lesion_masks_pet`` and ``Phantom.lesion_masks_mr`` are boolean tensors
``(L, nz, ny, nx)`` with ONE SHARED INDEX: entry ``i`` describes ``lesion_info[i]``. The
PET mask of an MR-only lesion (and vice versa) is all False. Lesions are spheres (discs in
the plane of a 2D grid) made of the voxels whose centre lies within the radius; every mask
voxel is inside ``brain_mask``. Lesion intensity replaces the tissue value:
``contrast * WM value`` (hot: contrast > 1, cold: contrast < 1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from fbsemlib.physics.geometry import ImageGrid

__all__ = [
    "TISSUES",
    "Phantom",
    "PhantomConfig",
    "make_subject",
    "make_subjects",
    "shepp_logan",
    "simple_phantom",
    "load_brainweb",
    "BRAINWEB_LABELS",
]

#: Tissue classes, in the order used by ``Phantom.tissues`` (air is the remainder).
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "bone", "soft", "skin")

_DEFAULT_PET = {"gm": 96.0, "wm": 32.0, "csf": 4.0, "bone": 8.0, "soft": 8.0, "skin": 16.0}
_DEFAULT_MR = {"gm": 106.0, "wm": 154.0, "csf": 48.0, "bone": 20.0, "soft": 110.0, "skin": 92.0}

#: BrainWeb discrete ("crisp") labels of the 20 normal anatomical models -> tissue class.
BRAINWEB_LABELS: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "gm",
    3: "wm",
    4: "soft",  # fat
    5: "soft",  # muscle
    6: "skin",  # muscle/skin
    7: "bone",  # skull
    8: "soft",  # vessels
    9: "soft",  # around fat
    10: "bone",  # dura mater (grouped with bone as in the `brainweb` package's mu-map)
    11: "bone",  # bone marrow
}
_BRAINWEB_BRAIN_LABELS = ("gm", "wm", "csf")
# BrainWeb 20 normal models: 362 x 434 x 362 (z, y, x) at 0.5 mm, starting at (-72, -126, -90) mm
_BRAINWEB_RAW_SHAPE = (362, 434, 362)
_BRAINWEB_ORIGIN_ZYX = (-72.0, -126.0, -90.0)

_DEFORM_HALF_WIDTH_MM = 128.0  # control lattice of the deformation covers +-128 mm
_BIAS_SPACING_MM = 64.0  # control-point spacing of the MR bias field


# ======================================================================================
# configuration
# ======================================================================================
def _check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return v


def _check_range(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, integer: bool = False) -> tuple:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    if integer:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must hold integers, got {value!r}")
    a = _check_number(f"{name}[0]", value[0], lo=lo, hi=hi, lo_open=lo_open)
    b = _check_number(f"{name}[1]", value[1], lo=lo, hi=hi, lo_open=lo_open)
    if a > b:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r} (inverted range)")
    return (int(a), int(b)) if integer else (a, b)


def _check_values(name: str, value: Any, defaults: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict tissue -> value, got {value!r}")
    unknown = set(value) - set(TISSUES)
    if unknown:
        raise ValueError(f"{name} has unknown tissue(s) {sorted(unknown)}; known: {list(TISSUES)}")
    out = dict(defaults)
    for k, v in value.items():
        out[k] = _check_number(f"{name}[{k!r}]", v, lo=0.0)
    return {k: out[k] for k in TISSUES}


@dataclass
class PhantomConfig:
    """All parameters of :func:`make_subject` (and of :func:`load_brainweb` with a seed).

    Random quantities are drawn uniformly in the stated intervals from a
    ``numpy.random.Generator`` seeded by the subject seed. Serialise with
    :meth:`to_dict` / :meth:`from_dict` (JSON/YAML friendly).

    Anatomy
        template_resolution: ICBM152 template resolution in mm, 1 or 2.
        scale_range: isotropic scale factor drawn in ``[1 - s, 1 + s]``.
        rotation_deg: rotation about the axial (z) axis drawn in ``[-r, r]`` degrees.
        tilt_deg: 3D only: rotations about x and y drawn in ``[-t, t]`` degrees.
        shift_mm: translation drawn in ``[-s, s]`` mm per axis (in-plane only for 2D).
        deform_amplitude_mm: standard deviation (mm) of the random displacement at the
            control points of a smooth cubic-spline deformation (0 disables it).
        deform_spacing_mm: control-point spacing of that deformation (its smoothness).
        slice_z_mm: 2D only: world (MNI) height z of the axial slice; the default 8 mm
            passes through the basal ganglia and thalamus.
        slice_jitter_mm: 2D only: random offset of the slice drawn in ``[-j, j]`` mm.
        centre_z_mm: 3D only: world (MNI) height put at the grid centre; ``None`` centres
            the brain's bounding box.
        csf_thickness_mm, skull_thickness_mm, soft_thickness_mm, skin_thickness_mm:
            shells added around the skull-stripped template, from inside out.
    PET
        pet_values: activity per tissue before the global scale (GM : WM = 96 : 32 = 3 : 1).
        pet_contrast_jitter: GM and WM activities are each multiplied by a factor drawn
            in ``[1 - j, 1 + j]`` (0 keeps the 3 : 1 ratio exact).
        activity_scale_range: global activity scale drawn in this range.
    MR (T1-like)
        mr_values: T1 value per tissue (WM 154, GM 106).
        mr_contrast_jitter: as ``pet_contrast_jitter`` for the MR GM and WM values.
        mr_bias_amplitude: standard deviation of the log of a smooth multiplicative bias
            field (control spacing 64 mm); 0 disables it.
        mr_noise_std: Gaussian noise standard deviation relative to the WM value (0: none).
    Attenuation
        mu_soft_per_mm, mu_bone_per_mm: linear attenuation coefficients (1/mm) at 511 keV
            (0.0975 /cm and 0.13 /cm).
    Lesions
        num_lesions_2d, num_lesions_3d: (min, max) number of lesions (inclusive).
        lesion_radius_mm: radius range in mm.
        hot_fraction: probability that a lesion is hot (drawn separately in PET and MR).
        p_pet_only, p_mr_only: probabilities that a lesion exists in PET only / MR only;
            the rest appear in both.
        pet_hot_contrast, pet_cold_contrast, mr_hot_contrast, mr_cold_contrast:
            lesion / white-matter intensity ratio ranges.
        lesion_separation_mm: minimum gap between two lesion surfaces.
    """

    # anatomy
    template_resolution: int = 1
    scale_range: float = 0.08
    rotation_deg: float = 15.0
    tilt_deg: float = 4.0
    shift_mm: float = 0.0
    deform_amplitude_mm: float = 3.0
    deform_spacing_mm: float = 32.0
    slice_z_mm: float = 8.0
    slice_jitter_mm: float = 6.0
    centre_z_mm: float | None = None
    csf_thickness_mm: float = 1.5
    skull_thickness_mm: float = 6.0
    soft_thickness_mm: float = 3.0
    skin_thickness_mm: float = 2.0
    # PET
    pet_values: dict = field(default_factory=lambda: dict(_DEFAULT_PET))
    pet_contrast_jitter: float = 0.1
    activity_scale_range: tuple = (0.8, 1.25)
    # MR
    mr_values: dict = field(default_factory=lambda: dict(_DEFAULT_MR))
    mr_contrast_jitter: float = 0.05
    mr_bias_amplitude: float = 0.05
    mr_noise_std: float = 0.0
    # attenuation
    mu_soft_per_mm: float = 0.00975
    mu_bone_per_mm: float = 0.013
    # lesions
    num_lesions_2d: tuple = (2, 5)
    num_lesions_3d: tuple = (10, 15)
    lesion_radius_mm: tuple = (2.5, 6.0)
    hot_fraction: float = 0.6
    p_pet_only: float = 0.25
    p_mr_only: float = 0.25
    pet_hot_contrast: tuple = (1.5, 3.0)
    pet_cold_contrast: tuple = (0.0, 0.5)
    mr_hot_contrast: tuple = (1.15, 1.4)
    mr_cold_contrast: tuple = (0.4, 0.8)
    lesion_separation_mm: float = 2.0

    def __post_init__(self) -> None:
        n = _check_number
        if self.template_resolution not in (1, 2) or isinstance(self.template_resolution, bool):
            raise ValueError(f"template_resolution must be 1 or 2 (mm), got {self.template_resolution!r}")
        self.template_resolution = int(self.template_resolution)
        self.scale_range = n("scale_range", self.scale_range, lo=0.0, hi=0.5)
        self.rotation_deg = n("rotation_deg", self.rotation_deg, lo=0.0, hi=180.0)
        self.tilt_deg = n("tilt_deg", self.tilt_deg, lo=0.0, hi=45.0)
        self.shift_mm = n("shift_mm", self.shift_mm, lo=0.0)
        self.deform_amplitude_mm = n("deform_amplitude_mm", self.deform_amplitude_mm, lo=0.0)
        self.deform_spacing_mm = n("deform_spacing_mm", self.deform_spacing_mm, lo=4.0)
        self.slice_z_mm = n("slice_z_mm", self.slice_z_mm)
        self.slice_jitter_mm = n("slice_jitter_mm", self.slice_jitter_mm, lo=0.0)
        if self.centre_z_mm is not None:
            self.centre_z_mm = n("centre_z_mm", self.centre_z_mm)
        for name in ("csf_thickness_mm", "skull_thickness_mm", "soft_thickness_mm", "skin_thickness_mm"):
            setattr(self, name, n(name, getattr(self, name), lo=0.0, hi=50.0))
        self.pet_values = _check_values("pet_values", self.pet_values, _DEFAULT_PET)
        self.pet_contrast_jitter = n("pet_contrast_jitter", self.pet_contrast_jitter, lo=0.0, hi=0.9)
        self.activity_scale_range = _check_range("activity_scale_range", self.activity_scale_range,
                                                 lo=0.0, lo_open=True)
        self.mr_values = _check_values("mr_values", self.mr_values, _DEFAULT_MR)
        self.mr_contrast_jitter = n("mr_contrast_jitter", self.mr_contrast_jitter, lo=0.0, hi=0.9)
        self.mr_bias_amplitude = n("mr_bias_amplitude", self.mr_bias_amplitude, lo=0.0, hi=1.0)
        self.mr_noise_std = n("mr_noise_std", self.mr_noise_std, lo=0.0)
        self.mu_soft_per_mm = n("mu_soft_per_mm", self.mu_soft_per_mm, lo=0.0)
        self.mu_bone_per_mm = n("mu_bone_per_mm", self.mu_bone_per_mm, lo=0.0)
        self.num_lesions_2d = _check_range("num_lesions_2d", self.num_lesions_2d, lo=0, integer=True)
        self.num_lesions_3d = _check_range("num_lesions_3d", self.num_lesions_3d, lo=0, integer=True)
        self.lesion_radius_mm = _check_range("lesion_radius_mm", self.lesion_radius_mm, lo=0.0, lo_open=True)
        self.hot_fraction = n("hot_fraction", self.hot_fraction, lo=0.0, hi=1.0)
        self.p_pet_only = n("p_pet_only", self.p_pet_only, lo=0.0, hi=1.0)
        self.p_mr_only = n("p_mr_only", self.p_mr_only, lo=0.0, hi=1.0)
        if self.p_pet_only + self.p_mr_only > 1.0 + 1e-12:
            raise ValueError(f"p_pet_only + p_mr_only must be <= 1, got {self.p_pet_only} + {self.p_mr_only}")
        self.pet_hot_contrast = _check_range("pet_hot_contrast", self.pet_hot_contrast, lo=1.0)
        self.pet_cold_contrast = _check_range("pet_cold_contrast", self.pet_cold_contrast, lo=0.0, hi=1.0)
        self.mr_hot_contrast = _check_range("mr_hot_contrast", self.mr_hot_contrast, lo=1.0)
        self.mr_cold_contrast = _check_range("mr_cold_contrast", self.mr_cold_contrast, lo=0.0, hi=1.0)
        self.lesion_separation_mm = n("lesion_separation_mm", self.lesion_separation_mm, lo=0.0)

    def to_dict(self) -> dict:
        """Plain dict (lists instead of tuples), suitable for JSON/YAML."""
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PhantomConfig":
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise."""
        if not isinstance(d, Mapping):
            raise ValueError(f"PhantomConfig.from_dict needs a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PhantomConfig key(s): {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def replace(self, **changes: Any) -> "PhantomConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


# ======================================================================================
# the phantom
# ======================================================================================
@dataclass(repr=False)
class Phantom:
    """One subject on an :class:`ImageGrid`; all volumes are ``(nz, ny, nx)`` tensors.

    Attributes
    ----------
    activity: float32 PET activity (arbitrary units; GM : WM = 3 : 1 up to the contrast jitter).
    mu_map: float32 linear attenuation coefficient in 1/mm.
    mr: float32 T1-like MR image (arbitrary units).
    brain_mask: bool, the brain (grey + white matter, ventricles and sulcal CSF).
    lesion_masks_pet, lesion_masks_mr: bool ``(L, nz, ny, nx)``, index shared with
        ``lesion_info`` (a lesion absent from a modality has an all-False mask there).
    lesion_info: one dict per lesion: ``centre_mm`` (z, y, x world mm), ``radius_mm``,
        ``in_pet``, ``in_mr``, ``pet_kind`` / ``mr_kind`` ("hot", "cold" or None when
        absent), ``pet_contrast`` / ``mr_contrast`` (lesion / WM intensity ratio or None),
        ``num_voxels``.
    tissues: float32 partial-volume fraction of each class in :data:`TISSUES`.
    grid: the grid.
    seed: the seed of the draw (None for a deterministic BrainWeb load).
    params: every drawn or derived parameter (scale, angles, slice height, tissue values,
        activity scale, ...) plus ``config`` (the :class:`PhantomConfig` as a dict).
    """

    activity: torch.Tensor
    mu_map: torch.Tensor
    mr: torch.Tensor
    brain_mask: torch.Tensor
    lesion_masks_pet: torch.Tensor
    lesion_masks_mr: torch.Tensor
    lesion_info: list
    tissues: dict
    grid: ImageGrid
    seed: int | None
    params: dict

    @property
    def num_lesions(self) -> int:
        return len(self.lesion_info)

    def lesion_union(self, modality: str = "pet") -> torch.Tensor:
        """Boolean ``(nz, ny, nx)`` union of the lesions present in ``modality`` ("pet" or "mr")."""
        if modality not in ("pet", "mr"):
            raise ValueError(f"modality must be 'pet' or 'mr', got {modality!r}")
        m = self.lesion_masks_pet if modality == "pet" else self.lesion_masks_mr
        return m.any(dim=0) if m.shape[0] else torch.zeros(self.grid.shape, dtype=torch.bool, device=m.device)

    def to(self, device: str | torch.device) -> "Phantom":
        """A copy with every tensor on ``device``."""
        mv = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, activity=mv(self.activity), mu_map=mv(self.mu_map), mr=mv(self.mr),
            brain_mask=mv(self.brain_mask), lesion_masks_pet=mv(self.lesion_masks_pet),
            lesion_masks_mr=mv(self.lesion_masks_mr), tissues={k: mv(v) for k, v in self.tissues.items()},
        )

    def __repr__(self) -> str:
        pet = sum(d["in_pet"] for d in self.lesion_info)
        mr = sum(d["in_mr"] for d in self.lesion_info)
        return (f"Phantom(shape={tuple(self.grid.shape)}, voxel_size_mm={self.grid.voxel_size_mm}, "
                f"seed={self.seed}, lesions={self.num_lesions} (pet {pet}, mr {mr}), "
                f"source={self.params.get('source')!r}, device={self.activity.device})")


# ======================================================================================
# anatomical sources (uint8 tissue fractions in source voxel space)
# ======================================================================================
@dataclass(frozen=True, eq=False)
class _Source:
    """Tissue fractions on a source grid. ``counts[k] * unit`` is the fraction of tissue
    ``k``; integer counts keep the partition of unity exact under linear interpolation."""

    counts: dict  # tissue -> uint8 array (source index space)
    brain: np.ndarray  # uint8 0/1 brain mask
    unit: float
    affine: np.ndarray  # 4x4: source index -> RAS world mm (x, y, z)
    centre_ras: np.ndarray  # (3,) RAS of the centre of the brain's bounding box
    name: str


def _bbox_centre_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("the source volume holds no brain voxels")
    corners = np.stack([idx.min(0), idx.max(0)]).astype(np.float64)
    ras = corners @ affine[:3, :3].T + affine[:3, 3]
    return ras.mean(axis=0)


def _load_nilearn_template(resolution: int):
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise RuntimeError(
            "fbsemlib.data.phantoms needs nilearn (the ICBM152 2009 template ships inside its wheel): "
            "pip install nilearn"
        ) from exc
    try:
        t1 = datasets.load_mni152_template(resolution=resolution)
        gm = datasets.load_mni152_gm_template(resolution=resolution)
        wm = datasets.load_mni152_wm_template(resolution=resolution)
    except Exception as exc:
        raise RuntimeError(
            "could not read the ICBM152 2009 template files shipped inside nilearn "
            "(nilearn/datasets/data/mni_icbm152_*.nii.gz); reinstall nilearn. fbsemlib never "
            f"downloads them. Original error: {exc!r}"
        ) from exc
    return t1, gm, wm


@functools.lru_cache(maxsize=4)
def _template_source(resolution: int, csf_mm: float, skull_mm: float, soft_mm: float, skin_mm: float) -> _Source:
    """ICBM152 2009 tissue fractions plus synthetic CSF/skull/soft-tissue/skin shells (cached)."""
    t1_img, gm_img, wm_img = _load_nilearn_template(resolution)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.clip(np.rint(np.asarray(gm_img.dataobj, dtype=np.float32) * 255.0), 0, 255).astype(np.int16)
    wm = np.clip(np.rint(np.asarray(wm_img.dataobj, dtype=np.float32) * 255.0), 0, 255).astype(np.int16)

    # brain: nilearn's mask (T1 > 0.2) or tissue, closed and hole-filled (ventricles included)
    brain = (t1 > 0.2) | (gm + wm > 127)
    brain = ndimage.binary_closing(brain, structure=ndimage.generate_binary_structure(3, 1), iterations=2)
    brain = ndimage.binary_fill_holes(brain)
    # a smooth hull bridging the sulci: the inner surface of the CSF layer / skull
    hull = ndimage.gaussian_filter(brain.astype(np.float32), sigma=4.0 / vox) > 0.5
    hull = ndimage.binary_fill_holes(hull | brain)
    # distance outside the hull, computed in its bounding box plus the shells (speed)
    r_out = csf_mm + skull_mm + soft_mm + skin_mm
    idx = np.argwhere(hull)
    pad = np.ceil(r_out / vox).astype(int) + 2
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, hull.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = np.full(hull.shape, np.inf, dtype=np.float64)
    dist[box] = ndimage.distance_transform_edt(~hull[box], sampling=vox)

    intracranial = hull | (dist <= csf_mm)
    gm = np.where(intracranial, gm, 0)
    wm = np.where(intracranial, np.minimum(wm, 255 - gm), 0)
    csf = np.where(intracranial, 255 - gm - wm, 0)
    r1 = csf_mm + skull_mm
    r2 = r1 + soft_mm
    r3 = r2 + skin_mm
    outside = ~intracranial
    bone = outside & (dist <= r1)
    soft = outside & (dist > r1) & (dist <= r2)
    skin = outside & (dist > r2) & (dist <= r3)
    counts = {
        "gm": gm.astype(np.uint8), "wm": wm.astype(np.uint8), "csf": csf.astype(np.uint8),
        "bone": bone.astype(np.uint8) * np.uint8(255), "soft": soft.astype(np.uint8) * np.uint8(255),
        "skin": skin.astype(np.uint8) * np.uint8(255),
    }
    for a in counts.values():
        a.flags.writeable = False
    brain_u8 = brain.astype(np.uint8)
    brain_u8.flags.writeable = False
    return _Source(counts=counts, brain=brain_u8, unit=1.0 / 255.0, affine=affine,
                   centre_ras=_bbox_centre_ras(brain, affine), name=f"icbm152_2009_{resolution}mm")


# ======================================================================================
# random subject generation
# ======================================================================================
def _check_grid(grid: Any) -> ImageGrid:
    if not isinstance(grid, ImageGrid):
        raise ValueError(f"grid must be an fbsemlib ImageGrid, got {type(grid).__name__}")
    return grid


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_config(config: Any) -> PhantomConfig:
    if config is None:
        return PhantomConfig()
    if isinstance(config, Mapping):
        return PhantomConfig.from_dict(config)
    if not isinstance(config, PhantomConfig):
        raise ValueError(f"config must be a PhantomConfig, a dict or None, got {type(config).__name__}")
    return config


def _rotation_xyz(rot_z: float, tilt_x: float, tilt_y: float) -> np.ndarray:
    a, b, c = np.deg2rad([rot_z, tilt_x, tilt_y])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ ry @ rx


def _lattice_eval(coeffs: np.ndarray, pts_zyx: np.ndarray, half_width: float, spacing: float) -> np.ndarray:
    """Cubic-spline interpolation of control values ``coeffs`` (nz, ny, nx) on a lattice
    spanning ``[-half_width, half_width]`` mm, at points ``(3, N)`` (z, y, x) mm."""
    c = ndimage.spline_filter(coeffs, order=3, mode="nearest")
    idx = (pts_zyx + half_width) / spacing
    return ndimage.map_coordinates(c, idx, order=3, mode="nearest", prefilter=False)


def _grid_points(grid: ImageGrid) -> np.ndarray:
    """(3, N) (z, y, x) voxel-centre positions relative to the grid centre, mm."""
    axes = []
    for a in range(3):
        ax = grid.axis_mm(a)
        axes.append(ax - 0.5 * (ax[0] + ax[-1]))
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([zz.ravel(), yy.ravel(), xx.ravel()])


@dataclass
class _Draw:
    scale: float = 1.0
    rotation_deg: float = 0.0
    tilt_x_deg: float = 0.0
    tilt_y_deg: float = 0.0
    shift_xyz_mm: tuple = (0.0, 0.0, 0.0)
    slice_offset_mm: float = 0.0
    deform: np.ndarray | None = None  # (3, n, n, n): x, y, z displacement control values


def _draw_anatomy(rng: np.random.Generator, cfg: PhantomConfig, is_2d: bool) -> _Draw:
    # the same number of draws for 2D and 3D, so a seed means the same anatomy in both
    scale = 1.0 + rng.uniform(-cfg.scale_range, cfg.scale_range)
    rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)
    tilt = rng.uniform(-cfg.tilt_deg, cfg.tilt_deg, size=2)
    shift = rng.uniform(-cfg.shift_mm, cfg.shift_mm, size=3)
    slice_off = rng.uniform(-cfg.slice_jitter_mm, cfg.slice_jitter_mm)
    n = int(math.ceil(2 * _DEFORM_HALF_WIDTH_MM / cfg.deform_spacing_mm)) + 1
    deform = rng.standard_normal((3, n, n, n)) * cfg.deform_amplitude_mm
    if is_2d:
        tilt = np.zeros(2)
        shift[2] = 0.0
    return _Draw(scale=float(scale), rotation_deg=float(rot), tilt_x_deg=float(tilt[0]), tilt_y_deg=float(tilt[1]),
                 shift_xyz_mm=tuple(float(s) for s in shift), slice_offset_mm=float(slice_off),
                 deform=deform if cfg.deform_amplitude_mm > 0 else None)


def _source_coordinates(src: _Source, grid: ImageGrid, draw: _Draw, cfg: PhantomConfig,
                        pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source index coordinates (3, N) of the grid voxels, and the RAS point at the grid centre."""
    centre = np.array(src.centre_ras, dtype=np.float64)
    if grid.is_2d:
        centre[2] = cfg.slice_z_mm + draw.slice_offset_mm
    elif cfg.centre_z_mm is not None:
        centre[2] = cfg.centre_z_mm
    q_xyz = pts[::-1] - np.asarray(draw.shift_xyz_mm)[:, None]  # (x, y, z) head frame
    rot = _rotation_xyz(draw.rotation_deg, draw.tilt_x_deg, draw.tilt_y_deg)
    t_xyz = (rot.T @ q_xyz) / draw.scale
    if draw.deform is not None:
        t_zyx = t_xyz[::-1]
        t_xyz = t_xyz + np.stack([
            _lattice_eval(draw.deform[c], t_zyx, _DEFORM_HALF_WIDTH_MM, _config_spacing(cfg)) for c in range(3)
        ])
    # head frame -> RAS: +x right, +y posterior (RAS anterior is -y), +z superior
    ras = np.stack([t_xyz[0] + centre[0], -t_xyz[1] + centre[1], t_xyz[2] + centre[2]])
    inv = np.linalg.inv(src.affine)
    idx = inv[:3, :3] @ ras + inv[:3, 3:4]
    return idx, centre


def _config_spacing(cfg: PhantomConfig) -> float:
    n = int(math.ceil(2 * _DEFORM_HALF_WIDTH_MM / cfg.deform_spacing_mm)) + 1
    return 2 * _DEFORM_HALF_WIDTH_MM / (n - 1)


def _resample(src: _Source, idx: np.ndarray, shape: tuple) -> tuple[dict, np.ndarray]:
    fr = {}
    for k in TISSUES:
        v = ndimage.map_coordinates(src.counts[k], idx, order=1, mode="constant", cval=0.0,
                                    output=np.float32, prefilter=False)
        fr[k] = (v * np.float32(src.unit)).reshape(shape)
    total = sum(fr.values())
    over = total > 1.0
    if np.any(over):  # rounding only
        for k in TISSUES:
            fr[k][over] /= total[over]
    brain = ndimage.map_coordinates(src.brain, idx, order=1, mode="constant", cval=0.0,
                                    output=np.float32, prefilter=False).reshape(shape) >= 0.5
    return fr, brain


def _edt(mask: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it or outside
    the grid (in-plane for a 2D grid)."""
    if grid.is_2d:
        m = np.pad(mask[0], 1)
        d = ndimage.distance_transform_edt(m, sampling=grid.voxel_size_mm[1:])[1:-1, 1:-1]
        return d[None]
    m = np.pad(mask, 1)
    return ndimage.distance_transform_edt(m, sampling=grid.voxel_size_mm)[1:-1, 1:-1, 1:-1]


def _draw_lesions(rng: np.random.Generator, cfg: PhantomConfig, grid: ImageGrid, wm: np.ndarray,
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


def _build(src: _Source, grid: ImageGrid, cfg: PhantomConfig, seed: int | None,
           device: str | torch.device) -> Phantom:
    """Resample ``src`` with a random (seed) or identity (seed None) draw and fill in the modalities."""
    device = torch.device(device)
    shape = grid.shape
    if seed is None:
        anat_rng = pet_rng = mr_rng = les_rng = None
        draw = _Draw()
    else:
        anat_rng, pet_rng, mr_rng, les_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
        draw = _draw_anatomy(anat_rng, cfg, grid.is_2d)

    pts = _grid_points(grid)
    idx, centre = _source_coordinates(src, grid, draw, cfg, pts)
    fr, brain = _resample(src, idx, shape)

    # tissue values
    pet = dict(cfg.pet_values)
    mrv = dict(cfg.mr_values)
    act_scale = 1.0
    if seed is not None:
        j = cfg.pet_contrast_jitter
        g, w = pet_rng.uniform(1 - j, 1 + j, size=2)
        pet["gm"] *= float(g)
        pet["wm"] *= float(w)
        act_scale = float(pet_rng.uniform(*cfg.activity_scale_range))
        j = cfg.mr_contrast_jitter
        g, w = mr_rng.uniform(1 - j, 1 + j, size=2)
        mrv["gm"] *= float(g)
        mrv["wm"] *= float(w)

    activity = np.zeros(shape, np.float32)
    mr = np.zeros(shape, np.float32)
    for k in TISSUES:
        activity += fr[k] * np.float32(pet[k])
        mr += fr[k] * np.float32(mrv[k])
    activity *= np.float32(act_scale)
    soft = fr["gm"] + fr["wm"] + fr["csf"] + fr["soft"] + fr["skin"]
    mu = soft * np.float32(cfg.mu_soft_per_mm) + fr["bone"] * np.float32(cfg.mu_bone_per_mm)

    # lesions
    if seed is None:
        info, geo = [], np.zeros((0,) + shape, dtype=bool)
    else:
        info, geo = _draw_lesions(les_rng, cfg, grid, fr["wm"], brain)
    in_pet = np.array([d["in_pet"] for d in info], dtype=bool)
    in_mr = np.array([d["in_mr"] for d in info], dtype=bool)
    masks_pet = geo & in_pet[:, None, None, None]
    masks_mr = geo & in_mr[:, None, None, None]
    for i, d in enumerate(info):
        if d["in_pet"]:
            activity[geo[i]] = np.float32(act_scale * d["pet_contrast"] * pet["wm"])
        if d["in_mr"]:
            mr[geo[i]] = np.float32(d["mr_contrast"] * mrv["wm"])

    # MR bias field and noise
    if seed is not None and cfg.mr_bias_amplitude > 0:
        n = int(math.ceil(2 * _DEFORM_HALF_WIDTH_MM / _BIAS_SPACING_MM)) + 1
        coeff = mr_rng.standard_normal((n, n, n)) * cfg.mr_bias_amplitude
        log_b = _lattice_eval(coeff, pts, _DEFORM_HALF_WIDTH_MM, 2 * _DEFORM_HALF_WIDTH_MM / (n - 1))
        mr *= np.exp(log_b).astype(np.float32).reshape(shape)
    if seed is not None and cfg.mr_noise_std > 0:
        mr += (mr_rng.standard_normal(shape) * (cfg.mr_noise_std * mrv["wm"])).astype(np.float32)

    params = dict(
        source=src.name, is_2d=grid.is_2d, scale=draw.scale, rotation_deg=draw.rotation_deg,
        tilt_x_deg=draw.tilt_x_deg, tilt_y_deg=draw.tilt_y_deg, shift_xyz_mm=list(draw.shift_xyz_mm),
        deformed=draw.deform is not None, centre_ras_mm=[float(c) for c in centre],
        slice_z_mm=float(centre[2]) if grid.is_2d else None,
        pet_values=pet, activity_scale=act_scale, mr_values=mrv,
        num_lesions=len(info), config=cfg.to_dict(), grid=grid.to_dict(),
    )
    t = lambda a, dt=torch.float32: torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dt, device=device)  # noqa: E731
    return Phantom(
        activity=t(activity), mu_map=t(mu), mr=t(mr), brain_mask=t(brain, torch.bool),
        lesion_masks_pet=t(masks_pet, torch.bool), lesion_masks_mr=t(masks_mr, torch.bool),
        lesion_info=info, tissues={k: t(fr[k]) for k in TISSUES}, grid=grid, seed=seed, params=params,
    )


def make_subject(grid: ImageGrid, seed: int, config: PhantomConfig | None = None, *,
                 device: str | torch.device = "cpu") -> Phantom:
    """A random brain subject from the ICBM152 2009 template (offline), on ``grid``.

    The seed fixes everything (bit-identical output for the same seed, config and grid):
    anatomy (scale, rotation, deformation, 2D slice height), PET and MR tissue values and
    the lesions are drawn from independent streams of ``numpy.random.SeedSequence(seed)``,
    so changing e.g. the lesion settings leaves the anatomy unchanged. ``nz == 1`` gives a
    2D axial slice, otherwise a 3D volume. The first call loads the template (a few
    seconds); later calls reuse it.

    Parameters
    ----------
    grid: target :class:`ImageGrid`.
    seed: non-negative integer.
    config: :class:`PhantomConfig` (or an equivalent dict); ``None`` uses the defaults.
    device: torch device of the returned tensors.
    """
    grid = _check_grid(grid)
    seed = _check_seed(seed)
    cfg = _check_config(config)
    src = _template_source(cfg.template_resolution, cfg.csf_thickness_mm, cfg.skull_thickness_mm,
                           cfg.soft_thickness_mm, cfg.skin_thickness_mm)
    return _build(src, grid, cfg, seed, device)


def make_subjects(grid: ImageGrid, seeds: Iterable[int] | int, config: PhantomConfig | None = None, *,
                  device: str | torch.device = "cpu") -> list[Phantom]:
    """:func:`make_subject` for each seed of ``seeds`` (an int ``n`` means seeds ``0 .. n-1``)."""
    _check_grid(grid)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 0:
            raise ValueError(f"seeds must be a non-negative count or an iterable of seeds, got {seeds!r}")
        seeds = range(int(seeds))
    cfg = _check_config(config)
    return [make_subject(grid, s, cfg, device=device) for s in seeds]


# ======================================================================================
# BrainWeb files already on disk
# ======================================================================================
def _read_volume(p: Path, voxel_size_mm, origin_mm) -> tuple[np.ndarray, np.ndarray]:
    """Array and its index -> RAS affine."""
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz", ".mnc", ".mnc.gz")):
        import nibabel as nib

        img = nib.load(str(p))
        arr = np.asarray(img.dataobj)
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return arr, np.asarray(img.affine, dtype=np.float64)
    if name.endswith(".npy"):
        arr = np.load(p, allow_pickle=False)
    elif name.endswith((".bin", ".bin.gz", ".raw", ".raw.gz")):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rb") as f:
            raw = f.read()
        n = int(np.prod(_BRAINWEB_RAW_SHAPE))
        if len(raw) != 2 * n:
            raise ValueError(f"{p}: a raw BrainWeb volume must hold {n} uint16 values "
                             f"{_BRAINWEB_RAW_SHAPE}, found {len(raw)} bytes")
        arr = np.frombuffer(raw, dtype="<u2").reshape(_BRAINWEB_RAW_SHAPE)
    else:
        raise ValueError(f"{p}: unsupported BrainWeb file type; use .mnc, .mnc.gz, .nii, .nii.gz, .npy, "
                         ".bin(.gz) or .raw(.gz)")
    if arr.ndim != 3:
        raise ValueError(f"{p}: expected a 3D (z, y, x) volume, got shape {arr.shape}")
    vs = tuple(float(v) for v in voxel_size_mm)
    if len(vs) != 3 or min(vs) <= 0:
        raise ValueError(f"voxel_size_mm must be three positive numbers (dz, dy, dx), got {voxel_size_mm!r}")
    if origin_mm is None:
        if arr.shape == _BRAINWEB_RAW_SHAPE and vs == (0.5, 0.5, 0.5):
            origin_mm = _BRAINWEB_ORIGIN_ZYX
        else:
            origin_mm = tuple(-(n - 1) / 2.0 * v for n, v in zip(arr.shape, vs))
    oz, oy, ox = (float(o) for o in origin_mm)
    aff = np.zeros((4, 4))
    aff[0, 2], aff[1, 1], aff[2, 0] = vs[2], vs[1], vs[0]  # index (z, y, x) -> (x, y, z)
    aff[:3, 3] = (ox, oy, oz)
    aff[3, 3] = 1.0
    return arr, aff


def _block_counts(tissue_id: np.ndarray, vox: np.ndarray) -> tuple[dict, float, np.ndarray]:
    """Per-tissue uint8 counts over blocks of ~1 mm (sub-mm sources are averaged), from a
    volume of tissue indices (-1: background); returns (counts, unit, block factors)."""
    f = np.maximum(1, np.floor(1.0 / vox + 1e-6)).astype(int)
    unit = 1.0 / float(np.prod(f))
    sh = [(s // fi) * fi for s, fi in zip(tissue_id.shape, f)]
    tid = tissue_id[: sh[0], : sh[1], : sh[2]]
    out = {}
    for i, k in enumerate(TISSUES):
        m = tid == i
        if np.all(f == 1):
            out[k] = m.astype(np.uint8)
        else:
            m = m.reshape(sh[0] // f[0], f[0], sh[1] // f[1], f[1], sh[2] // f[2], f[2])
            out[k] = m.sum(axis=(1, 3, 5), dtype=np.uint8)
    return out, unit, f


def load_brainweb(path: str | os.PathLike | Mapping[str, str | os.PathLike], grid: ImageGrid, *,
                  seed: int | None = None, config: PhantomConfig | None = None,
                  voxel_size_mm: Sequence[float] = (0.5, 0.5, 0.5), origin_mm: Sequence[float] | None = None,
                  label_map: Mapping[int, str] | None = None, device: str | torch.device = "cpu") -> Phantom:
    """A :class:`Phantom` from BrainWeb files that are already on disk (never downloads).

    Supported inputs
    ----------------
    * A discrete ("crisp") label volume of one of the 20 normal BrainWeb subjects, labels
      0-11 as in :data:`BRAINWEB_LABELS` (override with ``label_map``: label -> tissue in
      :data:`TISSUES` or ``"background"``):

      - ``.mnc`` / ``.mnc.gz`` (MINC1, e.g. ``subject04_crisp_v.mnc.gz``) and ``.nii`` /
        ``.nii.gz``: read with nibabel, the file's affine is used;
      - ``.bin(.gz)`` / ``.raw(.gz)``: BrainWeb's ``raw_short`` download, uint16
        ``(362, 434, 362)`` in (z, y, x), as cached by the ``brainweb`` package
        (``subject_04.bin.gz``);
      - ``.npy``: a 3D label array in (z, y, x) order, x to the subject's right, y
        anterior, z superior, with ``voxel_size_mm`` (dz, dy, dx) and ``origin_mm`` (world
        z, y, x of voxel [0, 0, 0]; default BrainWeb's (-72, -126, -90) for a
        (362, 434, 362) 0.5 mm array, else the array is centred on 0).

      Values above 15 are taken as BrainWeb's raw encoding ``label << 4``.
    * Fuzzy (membership) models: a dict ``{tissue: file}`` with tissues from
      :data:`TISSUES` (e.g. ``{"gm": "subject04_gm_v.mnc.gz", "wm": ..., ...}``), each a
      volume in [0, 1] (or 0-255/4095: rescaled by its maximum), same shape and affine.

    Sub-millimetre volumes are first averaged to ~1 mm tissue fractions. The brain mask is
    GM + WM + CSF, hole-filled. With ``seed=None`` the anatomy is used as is (no
    deformation, rotation, contrast jitter, activity scaling or lesions; a 2D grid takes
    the slice at ``config.slice_z_mm``); with an integer seed the same random draws as
    :func:`make_subject` are applied, lesions included.

    Raises
    ------
    FileNotFoundError: a given path does not exist (the message names it).
    ValueError: an unsupported file type, a wrong raw size, unknown labels or tissues.
    """
    grid = _check_grid(grid)
    cfg = _check_config(config)
    if seed is not None:
        seed = _check_seed(seed)
    lm = dict(BRAINWEB_LABELS if label_map is None else label_map)
    for k, v in lm.items():
        if v not in TISSUES and v != "background":
            raise ValueError(f"label_map[{k!r}] = {v!r} is not a tissue in {list(TISSUES)} or 'background'")

    if isinstance(path, Mapping):
        unknown = set(path) - set(TISSUES)
        if unknown:
            raise ValueError(f"fuzzy model keys must be tissues in {list(TISSUES)}, got {sorted(unknown)}")
        if not path:
            raise ValueError("path: the dict of fuzzy models is empty")
        vols, affine, shape0, f = {}, None, None, None
        for k, p in path.items():
            p = Path(p).expanduser()
            if not p.is_file():
                raise FileNotFoundError(f"BrainWeb file not found: {p} (fbsemlib never downloads BrainWeb)")
            arr, aff = _read_volume(p, voxel_size_mm, origin_mm)
            if affine is None:
                affine, shape0 = aff, arr.shape
                vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
                f = np.maximum(1, np.floor(1.0 / vox + 1e-6)).astype(int)
            elif arr.shape != shape0 or not np.allclose(aff, affine):
                raise ValueError(f"fuzzy model {k!r} ({p}) does not match the shape/affine of the first one")
            arr = np.asarray(arr, dtype=np.float32)
            mx = float(arr.max()) if arr.size else 0.0
            arr = np.clip(arr / mx if mx > 1.0 else arr, 0.0, 1.0)
            sh = [(n // fi) * fi for n, fi in zip(arr.shape, f)]  # ~1 mm block average
            arr = arr[: sh[0], : sh[1], : sh[2]].reshape(sh[0] // f[0], f[0], sh[1] // f[1], f[1], sh[2] // f[2], f[2])
            vols[k] = arr.mean(axis=(1, 3, 5), dtype=np.float32)
        total = sum(vols.values())
        norm = np.where(total > 1.0, 1.0 / np.maximum(total, 1e-12), 1.0).astype(np.float32)
        counts = {}
        for k in TISSUES:
            v = vols[k] * norm if k in vols else np.zeros(total.shape, np.float32)
            counts[k] = np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)
        unit = 1.0 / 255.0
        brain_frac = sum(counts[k].astype(np.float32) for k in _BRAINWEB_BRAIN_LABELS) * unit
        brain = ndimage.binary_fill_holes(brain_frac >= 0.5)
        name = "brainweb_fuzzy:" + str(Path(next(iter(path.values()))).name)
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"BrainWeb file not found: {p} (fbsemlib never downloads BrainWeb)")
        arr, affine = _read_volume(p, voxel_size_mm, origin_mm)
        arr = np.asarray(arr)
        labels = arr if np.issubdtype(arr.dtype, np.integer) else np.rint(arr).astype(np.int32)
        if labels.size == 0 or labels.min() < 0:
            raise ValueError(f"{p}: expected non-negative integer labels")
        if labels.max() > 15:  # BrainWeb raw encoding: label << 4 (low bits may be set)
            labels = labels >> 4
        present = np.flatnonzero(np.bincount(labels.ravel()))
        unknown = set(present.tolist()) - set(lm)
        if unknown:
            raise ValueError(f"{p}: labels {sorted(unknown)} are not in label_map {sorted(lm)}")
        lut = np.full(int(present.max()) + 1, -1, dtype=np.int8)
        for lab, t in lm.items():
            if 0 <= int(lab) < lut.size and t != "background":
                lut[int(lab)] = TISSUES.index(t)
        vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        counts, unit, f = _block_counts(lut[labels], vox)
        brain_frac = sum(counts[k].astype(np.float32) for k in _BRAINWEB_BRAIN_LABELS) * unit
        brain = ndimage.binary_fill_holes(brain_frac >= 0.5)
        name = "brainweb:" + p.name
    if not np.all(f == 1):  # the block average moves voxel centres and sizes
        affine = affine.copy()
        affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((f - 1) / 2.0)
        affine[:3, :3] = affine[:3, :3] * f[None, :]
    src = _Source(counts=counts, brain=brain.astype(np.uint8), unit=unit, affine=affine,
                  centre_ras=_bbox_centre_ras(brain, affine), name=name)
    return _build(src, grid, cfg, seed, device)


# ======================================================================================
# simple test objects
# ======================================================================================
def _inplane_mm(grid: ImageGrid) -> tuple[np.ndarray, np.ndarray]:
    y = grid.axis_mm(1)
    x = grid.axis_mm(2)
    return (y - 0.5 * (y[0] + y[-1]))[:, None], (x - 0.5 * (x[0] + x[-1]))[None, :]


def shepp_logan(grid: ImageGrid, *, fov_fraction: float = 0.9, device: str | torch.device = "cpu") -> torch.Tensor:
    """The modified Shepp-Logan phantom (``skimage.data.shepp_logan_phantom``, values in
    [0, 1]) as a float32 ``(nz, ny, nx)`` tensor, centred, its outer ellipse spanning
    ``fov_fraction`` of the grid's transaxial field-of-view radius; the same slice is
    repeated along z for a 3D grid."""
    grid = _check_grid(grid)
    fov_fraction = _check_number("fov_fraction", fov_fraction, lo=0.0, lo_open=True, hi=10.0)
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
    grid = _check_grid(grid)
    if kind not in ("disc", "hot_spots"):
        raise ValueError(f"kind must be 'disc' or 'hot_spots', got {kind!r}")
    radius_fraction = _check_number("radius_fraction", radius_fraction, lo=0.0, lo_open=True, hi=1.0)
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
