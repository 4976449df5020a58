"""Reconstruct a user's measured data with a trained FBSEM-Net (``fbsem reconstruct``).

The input file holds the sinogram ``y`` and, optionally, the factors of its expected value
``multiplicative * A x + additive`` and the MR image ``mr``: HDF5 (datasets of those
names), ``.pt`` (a tensor, or a dict of those names) or ``.npy`` (``y`` only). Shapes are
checked against the model's geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fbsemlib.errors import UserError
from fbsemlib.training import load_trained

__all__ = ["read_sinogram_file", "reconstruct_file"]

_INPUT_KEYS = ("y", "multiplicative", "additive", "mr")


def read_sinogram_file(path: Path) -> dict:
    """The tensors of :data:`_INPUT_KEYS` found in ``path`` (float32, on the CPU)."""
    if not path.exists():
        raise UserError(f"sinogram file {str(path)!r} does not exist")
    suf = "".join(path.suffixes[-1:]).lower()
    if suf in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: torch.from_numpy(np.asarray(f[k][()])).float() for k in _INPUT_KEYS if k in f}
    if suf == ".npy":
        return {"y": torch.from_numpy(np.load(path)).float()}
    if suf in (".pt", ".pth"):
        d = torch.load(path, map_location="cpu", weights_only=True)
        if torch.is_tensor(d):
            return {"y": d.float()}
        return {k: v.float() for k, v in d.items() if k in _INPUT_KEYS}
    raise UserError(f"unsupported sinogram file {str(path)!r}: use .h5 (datasets y, multiplicative, additive, mr), "
                    ".pt (a tensor or such a dict) or .npy (y only)")


def reconstruct_file(model_dir, sinogram_path, out_path=None, device=None) -> Path:
    """Reconstruct the data in ``sinogram_path`` with a trained model; writes ``.npy``."""
    net, _ = load_trained(model_dir, device=device)
    P = net.projector
    d = read_sinogram_file(Path(sinogram_path))
    if "y" not in d:
        raise UserError(f"{sinogram_path}: no sinogram 'y' found")

    def shape5(t, name, trailing):
        t = t.to(P.device)
        while t.ndim < 5:
            t = t[None]
        if tuple(t.shape[-3:]) != tuple(trailing):
            raise UserError(f"{name} has shape {tuple(t.shape)}; expected (..., {', '.join(map(str, trailing))}) "
                            "for this model's geometry")
        return t

    y = shape5(d["y"], "y", P.out_shape)
    if bool((y < 0).any()) or not bool(torch.isfinite(y).all()):
        raise UserError("y must be finite and non-negative")
    mult = shape5(d["multiplicative"], "multiplicative", P.out_shape) if "multiplicative" in d else None
    add = shape5(d["additive"], "additive", P.out_shape) if "additive" in d else None
    mr = shape5(d["mr"], "mr", P.in_shape) if "mr" in d else None
    if net.config.use_mr and mr is None:
        raise UserError("this model uses an MR image: give 'mr' in the input file")
    with torch.no_grad():
        x = net(y, mult, add, mr)
    out = Path(out_path) if out_path else Path(sinogram_path).with_name(Path(sinogram_path).stem + "_fbsem.npy")
    np.save(out, x.cpu().numpy()[:, 0])
    return out
