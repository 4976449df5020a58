"""Random brain subjects from the ICBM152 2009 template shipped inside the ``nilearn``
wheel (offline): :func:`make_subject`, :func:`make_subjects`.

The template is skull-stripped, so a CSF layer, a skull, a soft-tissue layer and skin are
added as shells around the (smoothed) brain."""

from __future__ import annotations

import functools
from typing import Iterable

import numpy as np
import torch
from scipy import ndimage

from fbsemlib.data.phantoms.build import Phantom, TissueSource, bbox_centre_ras, build_phantom
from fbsemlib.data.phantoms.config import PhantomConfig, check_config, check_grid, check_seed
from fbsemlib.physics.geometry import ImageGrid
from fbsemlib.provenance import is_int

__all__ = ["make_subject", "make_subjects"]

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
def _template_source(resolution: int, csf_mm: float, skull_mm: float, soft_mm: float, skin_mm: float) -> TissueSource:
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
    return TissueSource(counts=counts, brain=brain_u8, unit=1.0 / 255.0, affine=affine,
                   centre_ras=bbox_centre_ras(brain, affine), name=f"icbm152_2009_{resolution}mm")


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
    grid = check_grid(grid)
    seed = check_seed(seed)
    cfg = check_config(config)
    src = _template_source(cfg.template_resolution, cfg.csf_thickness_mm, cfg.skull_thickness_mm,
                           cfg.soft_thickness_mm, cfg.skin_thickness_mm)
    return build_phantom(src, grid, cfg, seed, device)


def make_subjects(grid: ImageGrid, seeds: Iterable[int] | int, config: PhantomConfig | None = None, *,
                  device: str | torch.device = "cpu") -> list[Phantom]:
    """:func:`make_subject` for each seed of ``seeds`` (an int ``n`` means seeds ``0 .. n-1``)."""
    check_grid(grid)
    if is_int(seeds):
        if seeds < 0:
            raise ValueError(f"seeds must be a non-negative count or an iterable of seeds, got {seeds!r}")
        seeds = range(int(seeds))
    cfg = check_config(config)
    return [make_subject(grid, s, cfg, device=device) for s in seeds]
