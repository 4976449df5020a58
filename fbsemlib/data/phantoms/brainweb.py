"""Phantoms from BrainWeb files already on disk (never downloaded): :func:`load_brainweb`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from fbsemlib.data.phantoms.build import Phantom, TissueSource, bbox_centre_ras, build_phantom
from fbsemlib.data.phantoms.config import TISSUES, PhantomConfig, check_config, check_grid, check_seed
from fbsemlib.physics.geometry import ImageGrid

__all__ = ["load_brainweb", "BRAINWEB_LABELS"]

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
    grid = check_grid(grid)
    cfg = check_config(config)
    if seed is not None:
        seed = check_seed(seed)
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
    src = TissueSource(counts=counts, brain=brain.astype(np.uint8), unit=unit, affine=affine,
                  centre_ras=bbox_centre_ras(brain, affine), name=name)
    return build_phantom(src, grid, cfg, seed, device)
