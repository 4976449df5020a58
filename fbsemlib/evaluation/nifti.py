"""NIfTI-1 images on the library's image grid (``nibabel``, imported only when used).

Axis convention
---------------
The library's images are arrays ``(Z, Y, X)`` on an :class:`~fbsemlib.physics.geometry.ImageGrid`
(``voxel_size_mm = (dz, dy, dx)``, ``origin_mm`` = the scanner position ``(z, y, x)`` of the
centre of voxel ``[0, 0, 0]``). A NIfTI file indexes its data ``[i, j, k]`` with ``i`` the
fastest axis in its affine, so the array is written transposed: NIfTI ``i, j, k`` are the
library's ``x, y, z``, and the affine maps them to the scanner's coordinates in mm::

    [x]   [dx  0  0  x0] [i]
    [y] = [ 0 dy  0  y0] [j]        (x0, y0, z0) = origin_mm reversed
    [z]   [ 0  0 dz  z0] [k]
    [1]   [ 0  0  0   1] [1]

with ``qform_code = sform_code = 1`` (scanner-based coordinates; units mm). The scanner's
``x, y, z`` (parallelproj's: ``x, y`` transaxial, ``z`` along the bore) are taken as the
NIfTI world axes, RAS-like: they are the patient's right-left, anterior-posterior and
inferior-superior axes only for the patient position the data were acquired in. A batch of
images ``(B, Z, Y, X)`` is a 4D file ``(X, Y, Z, B)`` (a 3D file when ``B = 1``). Sinograms
``(P, V, R)`` are written the same way, reversed: ``(R, V, P[, B])``, with a unit affine.

Reading accepts axis-aligned affines only (a flipped axis, e.g. a radiological file, is
flipped back); :func:`read_image_on_grid` refuses an image whose grid (shape, voxel size,
origin) differs from the model's, naming both.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fbsemlib.errors import UserError
from fbsemlib.outputs import atomic_write
from fbsemlib.physics.geometry import ImageGrid

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "grid_affine", "grid_from_affine", "write_nifti", "read_nifti",
           "read_image_on_grid", "write_sinogram_nifti", "read_sinogram_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_VOXEL_TOL_MM = 1e-3


def is_nifti(path) -> bool:
    """Whether ``path`` ends in ``.nii`` or ``.nii.gz``."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def grid_affine(grid: ImageGrid) -> np.ndarray:
    """The 4 x 4 NIfTI affine of ``grid`` (see the module docstring)."""
    a = np.eye(4)
    a[:3, :3] = np.diag(grid.voxel_size_mm[::-1])
    a[:3, 3] = grid.origin_mm[::-1]
    return a


def grid_from_affine(affine, shape_ijk) -> ImageGrid:
    """The :class:`ImageGrid` of a NIfTI image with array shape ``shape_ijk`` (``i, j, k``
    = ``x, y, z``) and an axis-aligned ``affine`` with positive voxel sizes."""
    a = np.asarray(affine, dtype=float)
    m = a[:3, :3]
    if not np.allclose(m, np.diag(np.diag(m)), atol=1e-6 * max(1.0, np.abs(m).max())):
        raise UserError(f"the image's affine is rotated or oblique ({np.round(m, 4).tolist()}); only axis-aligned "
                        "grids are supported: resample it onto the model's grid first")
    d = np.diag(m)
    if np.any(d <= 0):
        raise UserError(f"the image's affine has non-positive voxel sizes {d.tolist()}")
    return ImageGrid(tuple(int(n) for n in shape_ijk[:3][::-1]), tuple(float(v) for v in d[::-1]),
                     tuple(float(o) for o in a[:3, 3][::-1]))


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, gz: bool) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def write_nifti(path, image, grid: ImageGrid) -> Path:
    """Write ``image`` (``(Z, Y, X)`` or a batch ``(B, Z, Y, X)`` / ``(B, 1, Z, Y, X)`` on
    ``grid``) to ``path`` (``.nii`` or ``.nii.gz``) atomically; returns the path."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if tuple(a.shape[-3:]) != tuple(grid.shape):
        raise UserError(f"image of shape {a.shape} does not lie on the grid {grid.shape}")
    a = a.reshape((-1,) + tuple(grid.shape))
    data = a.transpose(3, 2, 1, 0)  # (X, Y, Z, B)
    if data.shape[-1] == 1:
        data = data[..., 0]
    payload = _nifti_bytes(data, grid_affine(grid), str(path).lower().endswith(".gz"))
    return atomic_write(Path(path), lambda f: f.write(payload))


def _load(path: Path, what: str):
    import nibabel as nib

    if not path.is_file():
        raise UserError(f"{what} file {str(path)!r} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds on damaged files
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {what} file {str(path)!r} as NIfTI ({type(e).__name__}: {first})") from None
    return img, data


def read_nifti(path, what: str = "image") -> tuple[np.ndarray, ImageGrid]:
    """``(array, grid)`` of a NIfTI image: ``(Z, Y, X)``, or ``(B, Z, Y, X)`` for a 4D file;
    axes the affine flips are flipped back so that the grid's voxel sizes are positive."""
    path = Path(path)
    img, data = _load(path, what)
    if data.ndim == 2:
        data = data[..., None]
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (3, 4):
        raise UserError(f"{what} {str(path)!r} has shape {data.shape}; expected 3D (x, y, z) or 4D (x, y, z, batch)")
    affine = np.array(img.affine, dtype=float)
    for ax in range(3):  # an axis with a negative step (e.g. a radiological x) is stored the other way round
        step = affine[:3, ax]
        if np.count_nonzero(np.abs(step) > 1e-9) == 1 and step[np.argmax(np.abs(step))] < 0:
            n = data.shape[ax]
            data = np.flip(data, axis=ax)
            affine[:3, 3] += step * (n - 1)
            affine[:3, ax] = -step
    grid = grid_from_affine(affine, data.shape[:3])
    arr = data.transpose(3, 2, 1, 0) if data.ndim == 4 else data.transpose(2, 1, 0)
    return np.ascontiguousarray(arr), grid


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:g}" for x in v) + ")"


def read_image_on_grid(path, grid: ImageGrid, what: str = "image") -> np.ndarray:
    """A NIfTI image that must lie on ``grid`` (the model's): ``(Z, Y, X)`` or
    ``(B, Z, Y, X)``. A different shape, voxel size or origin (more than half a voxel) is a
    :class:`UserError` naming both grids."""
    arr, g = read_nifti(path, what)
    problems = []
    if tuple(g.shape) != tuple(grid.shape):
        problems.append(f"shape (z, y, x) {tuple(g.shape)} vs the model's {tuple(grid.shape)}")
    if not np.allclose(g.voxel_size_mm, grid.voxel_size_mm, atol=_VOXEL_TOL_MM):
        problems.append(f"voxel size (dz, dy, dx) {_fmt(g.voxel_size_mm)} mm vs the model's "
                        f"{_fmt(grid.voxel_size_mm)} mm")
    if not problems and np.any(np.abs(np.subtract(g.origin_mm, grid.origin_mm)) > np.asarray(grid.voxel_size_mm) / 2):
        problems.append(f"origin (z, y, x) {_fmt(g.origin_mm)} mm vs the model's {_fmt(grid.origin_mm)} mm")
    if problems:
        raise UserError(f"{what} {str(path)!r} is not on the model's image grid: {'; '.join(problems)}. "
                        "Resample it onto the model's grid (the affine of a NIfTI image that `fbsem reconstruct` "
                        "writes is that grid)")
    return arr


def write_sinogram_nifti(path, sinogram) -> Path:
    """Write a sinogram ``(P, V, R)`` or a batch ``(B, P, V, R)`` / ``(B, 1, P, V, R)`` as
    NIfTI ``(R, V, P[, B])`` with a unit affine (bins have no position in mm)."""
    a = sinogram.detach().cpu().numpy() if hasattr(sinogram, "detach") else np.asarray(sinogram)
    if a.ndim < 3:
        raise UserError(f"a sinogram needs 3 dimensions (planes, views, radial bins), got shape {a.shape}")
    a = a.reshape((-1,) + tuple(a.shape[-3:])).transpose(3, 2, 1, 0)
    if a.shape[-1] == 1:
        a = a[..., 0]
    payload = _nifti_bytes(a, np.eye(4), str(path).lower().endswith(".gz"))
    return atomic_write(Path(path), lambda f: f.write(payload))


def read_sinogram_nifti(path) -> np.ndarray:
    """A sinogram written by :func:`write_sinogram_nifti`: ``(P, V, R)`` or ``(B, P, V, R)``."""
    _, data = _load(Path(path), "sinogram")
    if data.ndim not in (3, 4):
        raise UserError(f"sinogram {str(path)!r} has shape {data.shape}; expected (radial, views, planes[, batch])")
    return np.ascontiguousarray(data.transpose(3, 2, 1, 0) if data.ndim == 4 else data.transpose(2, 1, 0))
