"""A phantom on an image grid: :class:`Phantom`, and :func:`build_phantom`, which
resamples an anatomical source (:class:`TissueSource`, tissue fractions in the source's
voxel space) onto the grid with a random anatomy draw and fills in PET activity, MR and
attenuation (lesions from :mod:`fbsemlib.data.phantoms.lesions`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from fbsemlib.data.phantoms.config import TISSUES, PhantomConfig
from fbsemlib.data.phantoms.lesions import draw_lesions
from fbsemlib.physics.geometry import ImageGrid

__all__ = ["Phantom", "TissueSource", "bbox_centre_ras", "build_phantom"]

_DEFORM_HALF_WIDTH_MM = 128.0  # control lattice of the deformation covers +-128 mm
_BIAS_SPACING_MM = 64.0  # control-point spacing of the MR bias field


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


@dataclass(frozen=True, eq=False)
class TissueSource:
    """Tissue fractions on a source grid. ``counts[k] * unit`` is the fraction of tissue
    ``k``; integer counts keep the partition of unity exact under linear interpolation."""

    counts: dict  # tissue -> uint8 array (source index space)
    brain: np.ndarray  # uint8 0/1 brain mask
    unit: float
    affine: np.ndarray  # 4x4: source index -> RAS world mm (x, y, z)
    centre_ras: np.ndarray  # (3,) RAS of the centre of the brain's bounding box
    name: str


def bbox_centre_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS world position (mm) of the centre of the bounding box of ``mask``."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("the source volume holds no brain voxels")
    corners = np.stack([idx.min(0), idx.max(0)]).astype(np.float64)
    ras = corners @ affine[:3, :3].T + affine[:3, 3]
    return ras.mean(axis=0)


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


def _source_coordinates(src: TissueSource, grid: ImageGrid, draw: _Draw, cfg: PhantomConfig,
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


def _resample(src: TissueSource, idx: np.ndarray, shape: tuple) -> tuple[dict, np.ndarray]:
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


def build_phantom(src: TissueSource, grid: ImageGrid, cfg: PhantomConfig, seed: int | None,
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
        info, geo = draw_lesions(les_rng, cfg, grid, fr["wm"], brain)
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
