"""Reconstruct a user's measured data with a trained FBSEM-Net (``fbsem reconstruct``).

The input file holds the sinogram ``y``, the factors of its expected value
``multiplicative * A x + additive`` and, for a model that uses one, the MR image ``mr``:
HDF5 (datasets of those names), ``.pt`` (a tensor, or a dict of those names), ``.npy`` or
NIfTI ``.nii`` / ``.nii.gz`` (``y`` only; :func:`fbsemlib.evaluation.nifti.write_sinogram_nifti`'s
axis order). The MR image and an attenuation map can also be NIfTI images on the model's grid
(``mr_path``, ``mu_map_path``; :mod:`fbsemlib.evaluation.nifti`): a mu-map's attenuation
factors ``exp(-A mu)`` multiply ``multiplicative``. The input is checked as strictly as the training data: shapes against the
model's geometry, one batch size (or 1) for every array, finite values, ``y`` and
``additive`` non-negative, ``multiplicative`` positive. The factors are required; with
``unit_factors`` (``--unit-factors``) their absence means ``multiplicative = 1`` and
``additive = 0`` (a choice the user states, never a silent default).

The output is a ``.npy`` file and a NIfTI image with the grid's affine (voxel size and
origin in mm), both written atomically, only when the image is finite, and never over an
existing file unless ``overwrite``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fbsemlib.errors import UserError
from fbsemlib.evaluation.nifti import NIFTI_SUFFIXES, is_nifti, read_image_on_grid, read_sinogram_nifti, write_nifti
from fbsemlib.outputs import atomic_write, ensure_writable
from fbsemlib.training import load_trained

__all__ = ["read_sinogram_file", "reconstruct_file", "output_paths", "UserData", "load_user_data", "MU_UNITS"]

_INPUT_KEYS = ("y", "multiplicative", "additive", "mr")
_FORMATS = (".h5 (datasets y, multiplicative, additive, mr), .pt (a tensor or such a dict), .npy or "
            ".nii / .nii.gz (y only)")
#: units of a mu-map file -> factor to 1/mm (water: 0.0096 /mm = 0.096 /cm)
MU_UNITS = {"per_mm": 1.0, "per_cm": 0.1}
_MU_MAX_PER_MM = 0.05  # about 3x cortical bone: a larger value is a mu-map in other units


def _tensor(value, path: Path, key: str) -> torch.Tensor:
    arr = value.numpy() if torch.is_tensor(value) else np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.ndim == 0:
        raise UserError(f"{str(path)!r}: {key!r} must be a numeric array, got {arr.dtype} of shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def read_sinogram_file(path: Path) -> dict:
    """The tensors of :data:`_INPUT_KEYS` found in ``path`` (float32, on the CPU); a file
    that cannot be read as its suffix says is a :class:`UserError`."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"sinogram file {str(path)!r} does not exist")
    if not path.is_file():
        raise UserError(f"sinogram path {str(path)!r} is not a file")
    suf = path.suffix.lower()
    try:
        if suf in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                return {k: _tensor(f[k][()], path, k) for k in _INPUT_KEYS if k in f}
        if suf == ".npy":
            return {"y": _tensor(np.load(path, allow_pickle=False), path, "y")}
        if is_nifti(path):
            return {"y": _tensor(read_sinogram_nifti(path), path, "y")}
        if suf in (".pt", ".pth"):
            d = torch.load(path, map_location="cpu", weights_only=True)
            if torch.is_tensor(d):
                return {"y": _tensor(d, path, "y")}
            if not isinstance(d, dict):
                raise UserError(f"{str(path)!r} holds a {type(d).__name__}, expected a tensor or a dict of tensors")
            return {k: _tensor(v, path, k) for k, v in d.items() if k in _INPUT_KEYS}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py, NumPy and torch's unpickler raise many kinds on damaged files
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read sinogram file {str(path)!r} ({type(e).__name__}: {first}); "
                        f"give {_FORMATS}") from None
    raise UserError(f"unsupported sinogram file {str(path)!r}: give {_FORMATS}")


def output_paths(sinogram_path, out_path=None, overwrite: bool = False) -> tuple[Path, Path]:
    """Where the image goes, ``(.npy, .nii.gz)`` (``--out`` names either, the other gets the
    same stem; default ``<sinogram stem>_fbsem`` next to the input), checked before any work:
    not a folder, not an existing file unless ``overwrite``, in a writable folder."""
    sino = Path(sinogram_path)
    stem = sino.name[:-len(".nii.gz")] if sino.name.lower().endswith(".nii.gz") else sino.stem
    out = Path(out_path) if out_path else sino.with_name(stem + "_fbsem.npy")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give a .npy or .nii.gz file name")
    name = out.name.lower()
    if name.endswith(".npy"):
        base = out.name[:-4]
    elif name.endswith(NIFTI_SUFFIXES):
        base = out.name[:-7] if name.endswith(".nii.gz") else out.name[:-4]
    else:
        raise UserError(f"--out {str(out)!r} must end in .npy, .nii or .nii.gz (the image is written as a NumPy "
                        "file and a NIfTI image of the same name)")
    npy = out.with_name(base + ".npy")
    nii = out if name.endswith(NIFTI_SUFFIXES) else out.with_name(base + ".nii.gz")
    for p in (npy, nii):
        if p.exists() and not overwrite:
            raise UserError(f"{str(p)!r} exists: refusing to overwrite it (give --overwrite or another --out)")
    ensure_writable(out.parent, "the output folder")
    return npy, nii


def _checked_inputs(d: dict, P, sinogram_path, unit_factors: bool, use_mr: bool) -> tuple:
    if "y" not in d:
        raise UserError(f"{sinogram_path}: no sinogram 'y' found")
    missing = [k for k in ("multiplicative", "additive") if k not in d]
    if missing and not unit_factors:
        raise UserError(f"{sinogram_path}: {' and '.join(map(repr, missing))} missing: give the factors of the data "
                        "(y ~ Poisson(multiplicative * A x + additive)), or --unit-factors to state that "
                        "multiplicative = 1 and additive = 0")

    def shape5(name, trailing):
        t = d[name].to(P.device)
        while t.ndim < 5:
            t = t[None]
        if t.ndim > 5 or tuple(t.shape[-3:]) != tuple(trailing) or t.shape[1] != 1:
            raise UserError(f"{name} has shape {tuple(d[name].shape)}; expected (..., {', '.join(map(str, trailing))}) "
                            "for this model's geometry")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"{name} holds NaN or Inf values")
        return t

    y = shape5("y", P.out_shape)
    B = y.shape[0]
    if bool((y < 0).any()):
        raise UserError("y must be non-negative (counts)")
    out = {"y": y}
    for name, trailing in (("multiplicative", P.out_shape), ("additive", P.out_shape), ("mr", P.in_shape)):
        if name not in d:
            out[name] = None
            continue
        t = shape5(name, trailing)
        if t.shape[0] not in (1, B):
            raise UserError(f"{name} has a batch of {t.shape[0]} but y has {B}: give 1 or {B}")
        if name == "multiplicative" and (bool((t < 0).any()) or not bool((t > 0).any())):
            raise UserError("multiplicative must be non-negative and not all zero (attenuation x normalisation x "
                            "scale; zero only in bins no LOR measures, e.g. detector gaps)")
        if name == "additive" and bool((t < 0).any()):
            raise UserError("additive must be non-negative (randoms + scatter)")
        out[name] = t
    # counts where the model expects none (no sensitivity and no background): not this scanner's data
    mult, add = out.get("multiplicative"), out.get("additive")
    if mult is not None:
        dead = (mult == 0) & ((add == 0) if add is not None else True)
        if bool((dead & (y > 0)).any()):
            raise UserError(f"y has {int((dead & (y > 0)).sum())} bin(s) with counts where multiplicative and additive "
                            "are both 0 (e.g. detector gaps): wrong factors or another geometry")
    if use_mr and out["mr"] is None:
        raise UserError("this model uses an MR image: give 'mr' in the input file")
    return out["y"], out["multiplicative"], out["additive"], out["mr"]


@dataclass
class UserData:
    """A user's measured data, checked against a model's projector: ``y``,
    ``multiplicative``, ``additive`` ``(B, 1, P, V, R)`` and ``mr`` ``(B, 1, Z, Y, X)``
    (``None`` where absent: the model or method must not need it)."""

    y: torch.Tensor
    multiplicative: torch.Tensor | None
    additive: torch.Tensor | None
    mr: torch.Tensor | None


def _attenuation(mu_map_path, P, mu_unit: str) -> torch.Tensor:
    from fbsemlib.physics.forward_model import attenuation_factors

    if mu_unit not in MU_UNITS:
        raise UserError(f"unknown mu-map unit {mu_unit!r}; choose one of {', '.join(MU_UNITS)}")
    mu = read_image_on_grid(mu_map_path, P.grid, "mu-map") * MU_UNITS[mu_unit]
    if not np.isfinite(mu).all() or (mu < 0).any():
        raise UserError(f"mu-map {str(mu_map_path)!r} must be finite and non-negative")
    if mu.max() > _MU_MAX_PER_MM:
        raise UserError(f"mu-map {str(mu_map_path)!r} reaches {mu.max():g} /mm, far above bone (0.015 /mm): "
                        "is it in 1/cm (--mu-unit per_cm) or scaled?")
    mu_t = torch.from_numpy(mu).to(P.device)
    return attenuation_factors(P, mu_t.reshape((-1, 1) + tuple(P.in_shape)) if mu_t.ndim == 4 else mu_t)


def load_user_data(sinogram_path, projector, *, unit_factors: bool = False, use_mr: bool = False,
                   mr_path=None, mu_map_path=None, mu_unit: str = "per_mm") -> UserData:
    """Read and check a user's data for ``projector``'s geometry: the sinogram file (and its
    factors), optionally the MR image and a mu-map as NIfTI images on the projector's grid
    (a mu-map's ``exp(-A mu)`` multiplies ``multiplicative``; ``mu_unit``: ``"per_mm"`` or
    ``"per_cm"``)."""
    P = projector
    d = read_sinogram_file(Path(sinogram_path))
    if mr_path is not None:
        if "mr" in d:
            raise UserError(f"{sinogram_path} already holds an MR image 'mr': give it there or with --mr, not both")
        d["mr"] = _tensor(read_image_on_grid(mr_path, P.grid, "MR image"), Path(mr_path), "mr")
    y, mult, add, mr = _checked_inputs(d, P, sinogram_path, unit_factors, use_mr)
    if mu_map_path is not None:
        a = _attenuation(mu_map_path, P, mu_unit)
        while a.ndim < 5:
            a = a[None]
        mult = a if mult is None else mult * a
        if mult.shape[0] not in (1, y.shape[0]):
            raise UserError(f"the mu-map has a batch of {a.shape[0]} but y has {y.shape[0]}: give 1 or {y.shape[0]}")
    return UserData(y, mult, add, mr)


def reconstruct_file(model_dir, sinogram_path, out_path=None, device=None, *, overwrite: bool = False,
                     unit_factors: bool = False, mr_path=None, mu_map_path=None,
                     mu_unit: str = "per_mm") -> tuple[Path, Path]:
    """Reconstruct the data in ``sinogram_path`` (with the NIfTI ``mr_path`` / ``mu_map_path``
    of :func:`load_user_data`) with a trained model; writes ``.npy`` and NIfTI (see the
    module docstring). Returns the two paths written."""
    npy, nii = output_paths(sinogram_path, out_path, overwrite)
    net, _ = load_trained(model_dir, device=device)
    P = net.projector
    data = load_user_data(sinogram_path, P, unit_factors=unit_factors, use_mr=net.config.use_mr, mr_path=mr_path,
                          mu_map_path=mu_map_path, mu_unit=mu_unit)
    with torch.no_grad():
        x = net(data.y, data.multiplicative, data.additive, data.mr)
    image = x.cpu().numpy()[:, 0]
    if not np.isfinite(image).all():
        raise UserError("the reconstruction is not finite (NaN / Inf): nothing was written; check the model and "
                        "the input's factors")

    def write(f) -> None:
        buf = io.BytesIO()
        np.save(buf, image)
        f.write(buf.getvalue())

    return atomic_write(npy, write), write_nifti(nii, image, P.grid)
