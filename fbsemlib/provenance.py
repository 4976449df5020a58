"""Provenance written next to every artefact (datasets, checkpoints, model files): the
versions of the software that made it, and the JSON encoding of numpy / torch scalars."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import torch

__all__ = ["versions", "json_default", "is_int", "is_number"]


def is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A real number (Python or numpy int / float), not a bool; may be inf or nan."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def versions(*packages: str) -> dict[str, str]:
    """``python``, ``fbsemlib``, ``torch`` and ``numpy`` versions, plus those of the named
    ``packages`` that are importable (``"hdf5"`` is h5py's HDF5 library)."""
    from fbsemlib._version import __version__

    v = {"python": platform.python_version(), "fbsemlib": str(__version__), "torch": str(torch.__version__),
         "numpy": str(np.__version__)}
    for name in packages:
        try:
            if name == "hdf5":
                import h5py

                v[name] = str(h5py.version.hdf5_version)
            else:
                v[name] = str(__import__(name).__version__)
        except Exception:  # a missing optional package is simply not listed
            pass
    return v


def json_default(o: Any) -> Any:
    """``json.dump(..., default=json_default)``: numpy scalars and arrays, one-element
    tensors, tuples and paths become JSON values; anything else is an error."""
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
