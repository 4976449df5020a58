"""Reconstruct a user's measured data with a trained FBSEM-Net (``fbsem reconstruct``).

The input file holds the sinogram ``y``, the factors of its expected value
``multiplicative * A x + additive`` and, for a model that uses one, the MR image ``mr``:
HDF5 (datasets of those names), ``.pt`` (a tensor, or a dict of those names) or ``.npy``
(``y`` only). The input is checked as strictly as the training data: shapes against the
model's geometry, one batch size (or 1) for every array, finite values, ``y`` and
``additive`` non-negative, ``multiplicative`` positive. The factors are required; with
``unit_factors`` (``--unit-factors``) their absence means ``multiplicative = 1`` and
``additive = 0`` (a choice the user states, never a silent default).

The output is a ``.npy`` file written atomically, only when the image is finite, and never
over an existing file unless ``overwrite``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from fbsemlib.errors import UserError
from fbsemlib.outputs import atomic_write, ensure_writable
from fbsemlib.training import load_trained

__all__ = ["read_sinogram_file", "reconstruct_file", "output_path"]

_INPUT_KEYS = ("y", "multiplicative", "additive", "mr")
_FORMATS = ".h5 (datasets y, multiplicative, additive, mr), .pt (a tensor or such a dict) or .npy (y only)"


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


def output_path(sinogram_path, out_path=None, overwrite: bool = False) -> Path:
    """Where the image goes (``--out``, or ``<sinogram stem>_fbsem.npy`` next to the input),
    checked before any work: a ``.npy`` name, not a folder, not an existing file unless
    ``overwrite``, in a writable folder."""
    out = Path(out_path) if out_path else Path(sinogram_path).with_name(Path(sinogram_path).stem + "_fbsem.npy")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give a .npy file name")
    if out.suffix.lower() != ".npy":
        raise UserError(f"--out {str(out)!r} must end in .npy (the image is written as a NumPy file)")
    if out.exists() and not overwrite:
        raise UserError(f"{str(out)!r} exists: refusing to overwrite it (give --overwrite or another --out)")
    ensure_writable(out.parent, "the output folder")
    return out


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
        if name == "multiplicative" and bool((t <= 0).any()):
            raise UserError("multiplicative must be positive (attenuation x normalisation x scale)")
        if name == "additive" and bool((t < 0).any()):
            raise UserError("additive must be non-negative (randoms + scatter)")
        out[name] = t
    if use_mr and out["mr"] is None:
        raise UserError("this model uses an MR image: give 'mr' in the input file")
    return out["y"], out["multiplicative"], out["additive"], out["mr"]


def reconstruct_file(model_dir, sinogram_path, out_path=None, device=None, *, overwrite: bool = False,
                     unit_factors: bool = False) -> Path:
    """Reconstruct the data in ``sinogram_path`` with a trained model; writes ``.npy``
    (see the module docstring). Returns the path written."""
    out = output_path(sinogram_path, out_path, overwrite)
    net, _ = load_trained(model_dir, device=device)
    P = net.projector
    y, mult, add, mr = _checked_inputs(read_sinogram_file(Path(sinogram_path)), P, sinogram_path, unit_factors,
                                       net.config.use_mr)
    with torch.no_grad():
        x = net(y, mult, add, mr)
    image = x.cpu().numpy()[:, 0]
    if not np.isfinite(image).all():
        raise UserError("the reconstruction is not finite (NaN / Inf): nothing was written; check the model and "
                        "the input's factors")

    def write(f) -> None:
        buf = io.BytesIO()
        np.save(buf, image)
        f.write(buf.getvalue())

    return atomic_write(out, write)
