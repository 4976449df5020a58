"""The parameters of a brain phantom: :class:`PhantomConfig`, the tissue classes
:data:`TISSUES` and their default PET / MR values, and the argument checks shared by the
phantom builders."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from fbsemlib.physics.geometry import ImageGrid
from fbsemlib.provenance import is_int, is_number

__all__ = ["TISSUES", "PhantomConfig", "check_number", "check_range", "check_grid", "check_seed", "check_config"]

#: Tissue classes, in the order used by ``Phantom.tissues`` (air is the remainder).
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "bone", "soft", "skin")

_DEFAULT_PET = {"gm": 96.0, "wm": 32.0, "csf": 4.0, "bone": 8.0, "soft": 8.0, "skin": 16.0}
_DEFAULT_MR = {"gm": 106.0, "wm": 154.0, "csf": 48.0, "bone": 20.0, "soft": 110.0, "skin": 92.0}


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` if ``lo_open``), else a
    ``ValueError`` naming ``name``."""
    if not is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return v


def check_range(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, integer: bool = False) -> tuple:
    """``value`` as a ``(low, high)`` pair with ``low <= high``, both checked by
    :func:`check_number` (integers if ``integer``)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    if integer:
        for v in value:
            if not is_int(v):
                raise ValueError(f"{name} must hold integers, got {value!r}")
    a = check_number(f"{name}[0]", value[0], lo=lo, hi=hi, lo_open=lo_open)
    b = check_number(f"{name}[1]", value[1], lo=lo, hi=hi, lo_open=lo_open)
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
        out[k] = check_number(f"{name}[{k!r}]", v, lo=0.0)
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
        n = check_number
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
        self.activity_scale_range = check_range("activity_scale_range", self.activity_scale_range,
                                                lo=0.0, lo_open=True)
        self.mr_values = _check_values("mr_values", self.mr_values, _DEFAULT_MR)
        self.mr_contrast_jitter = n("mr_contrast_jitter", self.mr_contrast_jitter, lo=0.0, hi=0.9)
        self.mr_bias_amplitude = n("mr_bias_amplitude", self.mr_bias_amplitude, lo=0.0, hi=1.0)
        self.mr_noise_std = n("mr_noise_std", self.mr_noise_std, lo=0.0)
        self.mu_soft_per_mm = n("mu_soft_per_mm", self.mu_soft_per_mm, lo=0.0)
        self.mu_bone_per_mm = n("mu_bone_per_mm", self.mu_bone_per_mm, lo=0.0)
        self.num_lesions_2d = check_range("num_lesions_2d", self.num_lesions_2d, lo=0, integer=True)
        self.num_lesions_3d = check_range("num_lesions_3d", self.num_lesions_3d, lo=0, integer=True)
        self.lesion_radius_mm = check_range("lesion_radius_mm", self.lesion_radius_mm, lo=0.0, lo_open=True)
        self.hot_fraction = n("hot_fraction", self.hot_fraction, lo=0.0, hi=1.0)
        self.p_pet_only = n("p_pet_only", self.p_pet_only, lo=0.0, hi=1.0)
        self.p_mr_only = n("p_mr_only", self.p_mr_only, lo=0.0, hi=1.0)
        if self.p_pet_only + self.p_mr_only > 1.0 + 1e-12:
            raise ValueError(f"p_pet_only + p_mr_only must be <= 1, got {self.p_pet_only} + {self.p_mr_only}")
        self.pet_hot_contrast = check_range("pet_hot_contrast", self.pet_hot_contrast, lo=1.0)
        self.pet_cold_contrast = check_range("pet_cold_contrast", self.pet_cold_contrast, lo=0.0, hi=1.0)
        self.mr_hot_contrast = check_range("mr_hot_contrast", self.mr_hot_contrast, lo=1.0)
        self.mr_cold_contrast = check_range("mr_cold_contrast", self.mr_cold_contrast, lo=0.0, hi=1.0)
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


def check_grid(grid: Any) -> ImageGrid:
    """``grid`` if it is an :class:`ImageGrid`, else a ``ValueError``."""
    if not isinstance(grid, ImageGrid):
        raise ValueError(f"grid must be an fbsemlib ImageGrid, got {type(grid).__name__}")
    return grid


def check_seed(seed: Any) -> int:
    """``seed`` as a non-negative ``int``, else a ``ValueError``."""
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_config(config: Any) -> PhantomConfig:
    """A :class:`PhantomConfig` from one, from its dict, or the defaults for ``None``."""
    if config is None:
        return PhantomConfig()
    if isinstance(config, Mapping):
        return PhantomConfig.from_dict(config)
    if not isinstance(config, PhantomConfig):
        raise ValueError(f"config must be a PhantomConfig, a dict or None, got {type(config).__name__}")
    return config
