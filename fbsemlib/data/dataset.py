"""The samples of one split of a simulated dataset, as a torch ``Dataset``:
:class:`PETDataset`.

Each item is a dict with exactly the keys of :data:`fbsemlib.data.batch.SAMPLE_KEYS` (the
fields of :class:`~fbsemlib.data.batch.PETBatch`), so PyTorch's default collate batches
them and consumers read them with :meth:`PETBatch.from_mapping`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbsemlib.data.batch import SAMPLE_KEYS
from fbsemlib.data.format import DatasetError, open_dataset
from fbsemlib.data.schema import IMAGE_META, SAMPLE_META, SPLITS

__all__ = ["PETDataset", "SAMPLE_KEYS"]

#: where the arrays of a sample are stored: key -> (HDF5 dataset, whether its rows are the
#: file's samples (``True``) or its images, which the noise realisations share)
_SAMPLE_ARRAYS: dict[str, tuple[str, bool]] = {
    "y": ("samples/y", True),
    "multiplicative": ("sinograms/multiplicative", False),
    "additive": ("sinograms/additive", False),
    "mr": ("images/mr", False),
    "targets": ("images/targets", False),
    "target_final": ("images/target_final", False),
    "activity": ("images/activity", False),
    "brain_mask": ("images/brain_mask", False),
}


def _tensor(key: str, arr) -> torch.Tensor:
    """A stored array as served: the brain mask boolean, everything else float32."""
    arr = np.asarray(arr)
    return torch.from_numpy(arr.astype(bool) if key == "brain_mask" else arr.astype(np.float32, copy=False))


class PETDataset(torch.utils.data.Dataset):
    """Samples of one split of a simulated dataset.

    ``dataset[i]`` is a dict with exactly the keys of :data:`SAMPLE_KEYS`:

    ================  ===============================  =======================================
    key               shape / dtype                    meaning
    ================  ===============================  =======================================
    ``y``             ``(1, P, V, R)`` float32         measured (Poisson) sinogram
    ``multiplicative````(1, P, V, R)`` float32         ``m = n a`` (x acquisition scale)
    ``additive``      ``(1, P, V, R)`` float32         ``b`` = randoms + scatter
    ``mr``            ``(1, Z, Y, X)`` float32         MR image
    ``targets``       ``(K, 1, Z, Y, X)`` float32      OSEM sub-iterates of the noise-free data
    ``target_final``  ``(1, Z, Y, X)`` float32         high-count reference reconstruction
    ``activity``      ``(1, Z, Y, X)`` float32         true phantom activity
    ``brain_mask``    ``(1, Z, Y, X)`` bool            brain mask
    ``index``         int                              sample index in this split
    ================  ===============================  =======================================

    so that PyTorch's default collate gives a batch with a leading ``B`` dimension. The
    expected data of an image ``x`` is ``multiplicative * A x + additive`` with ``A`` =
    :meth:`make_projector`. Samples are ordered by subject, then image (slice, rotation),
    then noise realisation; :meth:`info` gives the metadata and :meth:`extra` the arrays
    not in the contract (mu-map, lesion masks, noise-free data, ...).

    ``load_into_memory=True`` reads the split into (``device``) tensors once; otherwise
    arrays are read from the HDF5 files on each access (files are opened lazily per
    process, so DataLoader workers work).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", device=None, load_into_memory: bool = True,
                 checksums: bool = True, **expected):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.info_ = open_dataset(path, checksums=checksums, **expected)
        self.path = Path(path)
        self.split = split
        self.device = None if device is None else torch.device(device)
        self.load_into_memory = bool(load_into_memory)
        self._files = self.info_.files(split)
        if not self._files:
            raise DatasetError(f"split {split!r} of dataset {str(self.path)!r} is empty (0 subjects; splits: "
                               + ", ".join(f"{s}={len(self.info_.subjects(s))}" for s in SPLITS) + ")")
        import h5py

        # sample index -> (file number, image index within the file, sample row within the file)
        index = []
        self._meta: list[dict] = []
        for fi, fp in enumerate(self._files):
            with h5py.File(fp, "r") as f:
                subject = int(f.attrs["subject"])
                smp = {k: f[f"samples/{k}"][()] for k in SAMPLE_META}
                img = {k: f[f"images/{k}"][()] for k in IMAGE_META}
                for s in range(len(smp["image_index"])):
                    i = int(smp["image_index"][s])
                    index.append((fi, i, s))
                    self._meta.append(dict(
                        subject=subject, file=fp.name, image=i, realisation=int(smp["realisation"][s]),
                        slice_index=int(img["slice_index"][i]), rotation_deg=float(img["rotation_deg"][i]),
                        counts=float(img["counts"][i]), trues=float(img["trues"][i]), scale=float(img["scale"][i]),
                        noise_seed=int(smp["seed"][s]), total_counts=float(smp["total_counts"][s]),
                    ))
        self._index = index
        self._handles: dict = {}
        self._pid = None
        self._mem = None
        if self.load_into_memory:
            self._load()

    # -- metadata ----------------------------------------------------------------------
    @property
    def geometry(self):
        return self.info_.geometry

    @property
    def grid(self):
        return self.info_.grid

    @property
    def num_iterations(self) -> int:
        return self.info_.num_iterations

    @property
    def num_subsets(self) -> int:
        return self.info_.num_subsets

    @property
    def num_modules(self) -> int:
        return self.info_.num_modules

    @property
    def recipe(self):
        return self.info_.recipe

    @property
    def manifest(self) -> dict:
        return self.info_.manifest

    @property
    def subjects(self) -> list[int]:
        return self.info_.subjects(self.split)

    def make_projector(self, device=None, backend: str = "torch", **kwargs):
        """The projector of the simulation (geometry, grid and PSF of the recipe)."""
        dev = device if device is not None else (self.device or "cpu")
        return self.info_.make_projector(dev, backend=backend, **kwargs)

    def info(self, i: int) -> dict:
        """Metadata of sample ``i``: subject, image, realisation, slice, rotation, counts, seeds."""
        return dict(self._meta[self._check_index(i)])

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return (f"PETDataset({str(self.path)!r}, split={self.split!r}, samples={len(self)}, "
                f"subjects={len(self._files)}, K={self.num_modules}, image={self.grid.shape}, "
                f"sinogram={self.geometry.shape})")

    # -- loading -----------------------------------------------------------------------
    def _check_index(self, i) -> int:
        if isinstance(i, torch.Tensor):
            i = int(i)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        n = len(self._index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        return int(i) % n

    def _file(self, fi: int):
        import h5py

        if self._pid != os.getpid():
            self._handles = {}
            self._pid = os.getpid()
        h = self._handles.get(fi)
        if h is None:
            h = self._handles[fi] = h5py.File(self._files[fi], "r")
        return h

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device is not None else t

    def _load(self) -> None:
        import h5py

        parts = {k: [] for k in _SAMPLE_ARRAYS}
        img_offset, smp_offset = [], []
        off = soff = 0
        for fp in self._files:
            with h5py.File(fp, "r") as f:
                for k, (where, _) in _SAMPLE_ARRAYS.items():
                    parts[k].append(f[where][()])
                img_offset.append(off)
                smp_offset.append(soff)
                off += int(f.attrs["num_images"])
                soff += int(f.attrs["num_samples"])
        self._mem = {k: self._on_device(_tensor(k, np.concatenate(v, axis=0))) for k, v in parts.items()}
        # rows of every sample in the concatenated image / sample arrays
        self._irow = [img_offset[fi] + i for fi, i, _ in self._index]
        self._srow = [smp_offset[fi] + s for fi, _, s in self._index]

    def _arrays(self, idx: int) -> dict[str, torch.Tensor]:
        """The arrays of sample ``idx`` as stored (without the channel dimension)."""
        if self._mem is not None:
            rows = (self._irow[idx], self._srow[idx])
            return {k: self._mem[k][rows[per_sample]] for k, (_, per_sample) in _SAMPLE_ARRAYS.items()}
        fi, i, s = self._index[idx]
        f = self._file(fi)
        return {k: self._on_device(_tensor(k, f[where][s if per_sample else i]))
                for k, (where, per_sample) in _SAMPLE_ARRAYS.items()}

    def __getitem__(self, i) -> dict:
        """Sample ``i`` as a dict with the keys of :data:`SAMPLE_KEYS`: one channel
        dimension in front of every array (after ``K`` for the targets) and ``index``."""
        idx = self._check_index(i)
        a = {k: v.unsqueeze(1 if k == "targets" else 0) for k, v in self._arrays(idx).items()}
        a["index"] = idx
        return {k: a[k] for k in SAMPLE_KEYS}

    def extra(self, i: int, keys=None) -> dict:
        """Arrays of sample ``i`` outside the training contract, as tensors ``(1, ...)``:
        ``mu_map``, ``lesion_mask_pet``, ``lesion_mask_mr`` (uint8 labels: ``i + 1`` =
        lesion ``i`` of :meth:`lesion_info`),
        ``attenuation``, ``ybar`` (noise-free data), ``normalisation``."""
        idx = self._check_index(i)
        fi, im, _ = self._index[idx]
        keys = keys or ("mu_map", "lesion_mask_pet", "lesion_mask_mr", "attenuation", "ybar", "normalisation")
        where = {"mu_map": "images", "lesion_mask_pet": "images", "lesion_mask_mr": "images",
                 "attenuation": "sinograms", "ybar": "sinograms", "normalisation": "sinograms"}
        f = self._file(fi)
        out = {}
        for k in keys:
            if k not in where:
                raise KeyError(f"unknown extra key {k!r}; choose from {sorted(where)}")
            ds = f[f"{where[k]}/{k}"]
            arr = ds[()] if k == "normalisation" else ds[im]
            t = torch.from_numpy(np.asarray(arr)).unsqueeze(0)
            out[k] = self._on_device(t)
        return out

    def lesion_info(self, i: int) -> Any:
        idx = self._check_index(i)
        fi, im, _ = self._index[idx]
        raw = self._file(fi)["images"].attrs.get("lesion_info", "[]")
        info = json.loads(raw)
        return info[im] if im < len(info) else None

    def close(self) -> None:
        for h in self._handles.values():
            try:
                h.close()
            except Exception:
                pass
        self._handles = {}

    def __getstate__(self):
        st = dict(self.__dict__)
        st["_handles"] = {}
        st["_pid"] = None
        return st

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
