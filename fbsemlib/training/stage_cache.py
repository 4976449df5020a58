"""The sequential trainer's cache: what stage ``k`` needs of every sample, computed once.

Stage ``k`` trains module ``k`` on inputs ``x_k`` produced by the frozen modules
``0..k-1``. Those inputs are cached for the whole training and validation sets, together
with the per-sample part of the module context (the sensitivity image of subset ``k % M``,
the FOV support, the mean subset sensitivities and the scaled MR channel), so a stage
step runs no back-projection besides its own EM step. The cache lives in memory, or as
``.npy`` memmaps under ``out_dir/cache/`` (removed at the end of the run) when it is
larger than ``train.cache_memory_mb``. It is not saved in checkpoints: on resume it is
rebuilt by running the finished (frozen) modules, which reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageCache", "SplitCache", "cache_bytes"]


def cache_bytes(num_samples: int, voxels: int) -> int:
    """Bytes the cache needs at most: ``x`` and the subset sensitivity, two generations
    each while the next stage's inputs are computed, the MR channel (float32) and the
    (bool) support."""
    return num_samples * voxels * (4 * 4 + 4 + 1)


class ImageCache:
    """``N`` arrays of shape ``shape`` (float32 or bool), in memory (a CPU tensor) or on disk
    (an ``.npy`` memmap at ``path``)."""

    def __init__(self, n: int, shape: tuple[int, ...], where: str, path: Path | None = None, dtype=torch.float32):
        self.n, self.shape, self.where, self.path, self.dtype = n, tuple(shape), where, path, dtype
        if where == "memory":
            self._t = torch.zeros((n,) + self.shape, dtype=dtype)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            npd = np.bool_ if dtype == torch.bool else np.float32
            self._mm = np.lib.format.open_memmap(str(path), mode="w+", dtype=npd, shape=(n,) + self.shape)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if self.where == "memory":
            return self._t[idx]
        return torch.from_numpy(np.ascontiguousarray(self._mm[idx.numpy()]))

    def set(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        v = values.detach().to("cpu", self.dtype)
        if self.where == "memory":
            self._t[idx] = v
        else:
            self._mm[idx.numpy()] = v.numpy()

    def all(self) -> torch.Tensor:
        return self.get(torch.arange(self.n))

    def flush(self) -> None:
        if self.where == "disk":
            self._mm.flush()

    def delete(self) -> None:
        if self.where == "disk":
            if hasattr(self, "_mm"):
                del self._mm
            try:
                self.path.unlink()
            except OSError:
                pass
        else:
            self._t = None


@dataclass
class SplitCache:
    """What stage ``k`` needs of every sample of a split, besides the measured data: the
    input ``x_k`` and the per-sample context of :meth:`FBSEMNet.prepare` (sensitivity of
    subset ``k % M``, FOV support, mean subset sensitivities, scaled MR)."""

    x: ImageCache
    sens: ImageCache
    support: ImageCache
    sens_mean: torch.Tensor  # (N, M)
    mr: ImageCache | None

    def delete(self) -> None:
        for c in (self.x, self.sens, self.support, self.mr):
            if c is not None:
                c.delete()
