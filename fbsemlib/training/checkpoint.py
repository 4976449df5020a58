"""Crash-safe files and random-number-generator states for training runs.

* :func:`atomic_torch_save` (and the helpers of :mod:`fbsemlib.outputs`, re-exported here)
  write to a temporary file in the destination folder, ``fsync`` it, then ``os.replace`` it over the destination (and
  ``fsync`` the folder), so a reader sees either the old complete file or the new
  complete file, never a partial one. If anything fails before the replace (a crash in
  ``torch.save``, a full disk, a kill), the previous file is untouched and the temporary
  file is removed (or, after a hard kill, left behind under a ``.tmp-`` name that no
  reader opens).
* :func:`load_checkpoint` reads with ``weights_only=True`` (checkpoints contain tensors and
  plain Python values only: no pickled objects).
* :func:`rng_state` / :func:`set_rng_state`: Python, NumPy, torch CPU and CUDA generators,
  stored as tensors / plain values so that they load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbsemlib.outputs import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "load_checkpoint",
           "rng_state", "set_rng_state"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see the module docstring)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_torch_save` (``weights_only=True``)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, NumPy, torch (CPU and every CUDA device) generator states."""
    version, internal, gauss = random.getstate()
    npst = np.random.get_state(legacy=False)
    out = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": npst["bit_generator"],
            "key": torch.from_numpy(np.asarray(npst["state"]["key"]).astype(np.int64)),
            "pos": int(npst["state"]["pos"]),
            "has_gauss": int(npst["has_gauss"]),
            "gauss": float(npst["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return out


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state` (missing parts are left alone)."""
    if "python" in state:
        p = state["python"]
        random.setstate((int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state({
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        })
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
