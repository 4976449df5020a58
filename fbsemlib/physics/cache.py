"""The one projector cache: one :class:`~fbsemlib.physics.projector.Projector` per geometry,
grid, PSF, backend and device in a process.

A projector builds its system matrices (and those of its ordered-subset projectors) lazily
and keeps them, so sharing one object between the simulation, the datasets, the trainers
and every loaded model means each matrix is built once. :func:`shared_projector` keeps the
:data:`CACHE_SIZE` most recently used projectors.

:func:`projector_spec` / :func:`projector_from_spec` are the JSON form stored with trained
models.
"""

from __future__ import annotations

import collections
import json
import threading
import warnings
from typing import Any, Sequence

import torch

from fbsemlib.physics.geometry import ImageGrid, sinogram_geometry_from_dict
from fbsemlib.physics.projector import Projector, parallelproj_available, resolved_device

__all__ = ["CACHE_SIZE", "shared_projector", "projector_spec", "projector_from_spec", "clear"]

#: how many projectors :func:`shared_projector` keeps (least recently used dropped first)
CACHE_SIZE = 4
_cache: "collections.OrderedDict[str, Projector]" = collections.OrderedDict()
_lock = threading.Lock()


def _key(geometry, grid: ImageGrid, backend: str, device: torch.device,
         psf_fwhm_mm: Sequence[float] | float | None, options: dict) -> str:
    psf = None if psf_fwhm_mm is None else (list(psf_fwhm_mm) if isinstance(psf_fwhm_mm, (list, tuple))
                                            else float(psf_fwhm_mm))
    return json.dumps({"sinogram": geometry.to_dict(), "grid": grid.to_dict(), "backend": backend,
                       "device": str(device), "psf_fwhm_mm": psf, "options": options},
                      sort_keys=True, default=str)


def shared_projector(geometry, grid: ImageGrid, *, device: str | torch.device = "cpu", backend: str = "torch",
                     psf_fwhm_mm: Sequence[float] | float | None = None, **options: Any) -> Projector:
    """The process-wide projector for this geometry, grid, PSF, backend and device (built on
    first use). ``options`` are passed to :class:`Projector` and are part of the key."""
    dev = resolved_device(torch.device(device))  # "cuda" and "cuda:<current>" are one key
    key = _key(geometry, grid, backend, dev, psf_fwhm_mm, options)
    with _lock:
        P = _cache.get(key)
        if P is not None:
            _cache.move_to_end(key)
            return P
    P = Projector(geometry, grid, backend=backend, device=dev, psf_fwhm_mm=psf_fwhm_mm, **options)
    with _lock:
        P = _cache.setdefault(key, P)  # another thread may have built it meanwhile
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return P


def clear() -> None:
    """Forget every cached projector (their memory is freed once nothing else holds them)."""
    with _lock:
        _cache.clear()


def cached_count() -> int:
    """How many projectors the cache holds now."""
    with _lock:
        return len(_cache)


def projector_spec(projector: Projector) -> dict:
    """What is needed to rebuild ``projector`` (JSON-serialisable)."""
    return {
        "sinogram": projector.sinogram.to_dict(),
        "grid": projector.grid.to_dict(),
        "backend": projector.backend,
        "psf_fwhm_mm": None if projector.psf is None else list(projector.psf.fwhm_mm),
    }


def projector_from_spec(spec: dict, device: str | torch.device = "cpu") -> Projector:
    """The shared projector of a :func:`projector_spec` (the torch backend, with a warning,
    when the saved backend is parallelproj and it is not installed here)."""
    backend = spec.get("backend", "torch")
    if backend == "parallelproj" and not parallelproj_available():
        warnings.warn("the model was trained with the parallelproj projector, which is not installed here; "
                      "using the torch projector (same geometry conventions)", stacklevel=2)
        backend = "torch"
    psf = spec.get("psf_fwhm_mm")
    return shared_projector(sinogram_geometry_from_dict(spec["sinogram"]), ImageGrid.from_dict(spec["grid"]),
                            device=device, backend=backend, psf_fwhm_mm=None if psf is None else tuple(psf))
