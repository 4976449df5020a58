"""Simulated PET datasets on disk: format, manifest, validation and a torch ``Dataset``.

Layout of a dataset folder (written by :func:`fbsemlib.data.simulate.simulate_dataset`)::

    DIR/
      manifest.json          written last; lists every file with its SHA-256 and size,
                             the split of every subject, the recipe and its hash, the
                             geometry, the image grid, the unrolled schedule, versions
      subject-0000.h5        one HDF5 file per subject (all its 2D slices / rotations
      subject-0001.h5        and noise realisations)
      ...

A folder without a readable ``manifest.json`` is not a dataset (an interrupted
``fbsem simulate`` leaves its work in ``DIR.tmp-<recipe hash>`` instead, and the next run
with the same recipe resumes from there).

One subject file (``N`` = images = slices x rotations, ``S`` = samples = ``N`` x noise
realisations, ``K`` = unrolled modules = iterations x subsets, images ``(Z, Y, X)``,
sinograms ``(P, V, R)`` = ``(planes, views, radial)``; all images float32 unless noted)::

    /                       attrs: format, format_version, subject, split, subject_seed,
                            recipe_hash, recipe (JSON), geometry (JSON), grid (JSON),
                            num_iterations, num_subsets, num_images, num_samples,
                            fbsemlib_version, library_versions (JSON), created
    /images/activity        (N, Z, Y, X)   true activity (phantom units, e.g. GM ~ 96)
    /images/mu_map          (N, Z, Y, X)   attenuation coefficients, 1/mm
    /images/mr              (N, Z, Y, X)   synthetic T1 MR image
    /images/brain_mask      (N, Z, Y, X)   uint8 (0/1)
    /images/lesion_mask_pet (N, Z, Y, X)   uint8 labels: 0 = no lesion, i + 1 = lesion i of
                                           lesion_info[n] (present in PET; kind, contrast there)
    /images/lesion_mask_mr  (N, Z, Y, X)   uint8 labels, the same for the MR lesions
    /images/targets         (N, K, Z, Y, X) iteration-dependent targets: OSEM sub-iterate
                                           k = 1..K of the noise-free data ``ybar``
    /images/target_final    (N, Z, Y, X)   high-count reference reconstruction
    /images/{slice_index, rotation_deg, counts, trues, scale, seed}    (N,) metadata
            attrs: lesion_info (JSON list, one entry per image)
    /sinograms/multiplicative (N, P, V, R) ``m = t n a``: scale x normalisation x attenuation
    /sinograms/attenuation  (N, P, V, R)   ``a = exp(-A mu)``
    /sinograms/additive     (N, P, V, R)   ``b`` = randoms + scatter (expected counts)
    /sinograms/ybar         (N, P, V, R)   noise-free expected data ``m A x + b``
    /sinograms/normalisation (P, V, R)     ``n`` (efficiency products, 0 in block gaps)
    /sinograms/crystal_efficiencies (rings, crystals)
    /samples/y              (S, P, V, R)   Poisson data (integer-valued float32)
    /samples/{image_index, realisation, seed, total_counts}   (S,) metadata

:func:`validate_dataset` / :func:`open_dataset` check all of it (checksums, structure,
shapes, versions, and optionally the expected geometry / grid / schedule) and raise
:class:`DatasetError` (a ``ValueError``) saying what is wrong. :class:`PETDataset` serves
samples to training code with a fixed set of keys (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbsemlib.config import diff

__all__ = [
    "DatasetError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DatasetInfo",
    "open_dataset",
    "validate_dataset",
    "PETDataset",
    "SPLITS",
    "SAMPLE_KEYS",
    "sha256_file",
]

FORMAT_NAME = "fbsem-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation", "test")
#: the keys of every sample served by :class:`PETDataset`
SAMPLE_KEYS = ("y", "multiplicative", "additive", "mr", "targets", "target_final", "activity", "brain_mask", "index")

# name -> (group, leading size symbol, trailing shape symbol, dtype kind)
_IMAGE_ARRAYS = ("activity", "mu_map", "mr", "brain_mask", "lesion_mask_pet", "lesion_mask_mr", "target_final")
_IMAGE_META = ("slice_index", "rotation_deg", "counts", "trues", "scale", "seed")
_SINO_ARRAYS = ("multiplicative", "attenuation", "additive", "ybar")
_SAMPLE_META = ("image_index", "realisation", "seed", "total_counts")


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete, corrupted or incompatible."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


#: how :func:`fbsemlib.config.diff` words a dataset's values against the expected ones
_DIFF_WORDING = dict(names=("dataset", "expected"), sep=" vs ", rel_tol=1e-9, abs_tol=1e-12)


def _to_jsonable(d):
    """Round-trip through JSON (tuples -> lists) so that comparisons are like for like."""
    return json.loads(json.dumps(d))


# ----------------------------------------------------------------------------------------
# manifest / validation
# ----------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    """A validated dataset folder (returned by :func:`open_dataset`)."""

    path: Path
    manifest: dict

    @property
    def recipe_dict(self) -> dict:
        return self.manifest["recipe"]

    @cached_property
    def recipe(self):
        """The recipe as a :class:`fbsemlib.data.simulate.DataConfig`."""
        from fbsemlib.config import ConfigError, from_dict
        from fbsemlib.data.simulate import DataConfig

        try:
            return from_dict(DataConfig, self.manifest["recipe"], "data")
        except ConfigError as e:
            raise DatasetError(f"the recipe of dataset {str(self.path)!r} is not readable by this fbsemlib "
                               f"version: {e}") from None

    @property
    def recipe_hash(self) -> str:
        return self.manifest["recipe_hash"]

    @cached_property
    def geometry(self):
        from fbsemlib.physics.geometry import sinogram_geometry_from_dict

        return sinogram_geometry_from_dict(self.manifest["geometry"])

    @cached_property
    def grid(self):
        from fbsemlib.physics.geometry import ImageGrid

        return ImageGrid.from_dict(self.manifest["grid"])

    @property
    def num_iterations(self) -> int:
        return int(self.manifest["num_iterations"])

    @property
    def num_subsets(self) -> int:
        return int(self.manifest["num_subsets"])

    @property
    def num_modules(self) -> int:
        return self.num_iterations * self.num_subsets

    @property
    def psf_fwhm_mm(self):
        return self.manifest.get("psf_fwhm_mm")

    def subjects(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return list(self.manifest["splits"].get(split, []))

    def files(self, split: str | None = None) -> list[Path]:
        """Subject files (of one split), in subject order."""
        out = []
        for name, entry in sorted(self.manifest["files"].items(), key=lambda kv: kv[1]["subject"]):
            if split is None or entry["split"] == split:
                out.append(self.path / name)
        return out

    def make_projector(self, device="cpu", backend: str = "torch", **kwargs):
        """The projector the data was simulated with (same geometry, grid and PSF). Its
        ordered-subset projectors are built once and cached (``subset(m, M)`` returns the
        same object on every call), so repeated OSEM / unrolled runs do not rebuild them."""
        from fbsemlib.physics.projector import Projector

        return Projector(self.geometry, self.grid, backend=backend, device=device, psf_fwhm_mm=self.psf_fwhm_mm,
                         **kwargs)

    def summary(self) -> dict:
        return dict(self.manifest.get("summary", {}))


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        raise DatasetError(f"dataset folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise DatasetError(f"dataset path {str(path)!r} is not a folder")
    mpath = path / MANIFEST
    if not mpath.exists():
        tmp = sorted(p.name for p in path.parent.glob(path.name + ".tmp-*"))
        hint = f" (an interrupted simulation left {tmp[0]!r}: rerun `fbsem simulate` to complete it)" if tmp else ""
        raise DatasetError(f"{str(path)!r} is not a complete dataset: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{str(mpath)!r} is corrupted (not valid JSON: {e})") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{str(mpath)!r} is corrupted (not a JSON object)")
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{str(mpath)!r} is not an fbsemlib dataset manifest (format={manifest.get('format')!r})")
    ver = manifest.get("format_version")
    if ver != FORMAT_VERSION:
        raise DatasetError(f"dataset {str(path)!r} has format version {ver!r}, this fbsemlib reads version "
                           f"{FORMAT_VERSION}: re-simulate it with this version (fbsem simulate --overwrite)")
    for key in ("files", "splits", "recipe", "recipe_hash", "geometry", "grid", "num_iterations", "num_subsets"):
        if key not in manifest:
            raise DatasetError(f"{str(mpath)!r} is corrupted: key {key!r} is missing")
    return manifest


def _check_expected(manifest: dict, geometry=None, grid=None, num_iterations=None, num_subsets=None,
                    recipe_hash=None) -> None:
    diffs = []
    if geometry is not None:
        exp = geometry.to_dict() if hasattr(geometry, "to_dict") else geometry
        diffs += [f"geometry {d}" for d in diff(manifest["geometry"], _to_jsonable(exp), **_DIFF_WORDING)]
    if grid is not None:
        exp = grid.to_dict() if hasattr(grid, "to_dict") else grid
        diffs += [f"grid {d}" for d in diff(manifest["grid"], _to_jsonable(exp), **_DIFF_WORDING)]
    if num_iterations is not None and int(manifest["num_iterations"]) != int(num_iterations):
        diffs.append(f"num_iterations: dataset {manifest['num_iterations']} vs expected {num_iterations}")
    if num_subsets is not None and int(manifest["num_subsets"]) != int(num_subsets):
        diffs.append(f"num_subsets: dataset {manifest['num_subsets']} vs expected {num_subsets}")
    if recipe_hash is not None and manifest["recipe_hash"] != recipe_hash:
        diffs.append(f"recipe_hash: dataset {manifest['recipe_hash']} vs expected {recipe_hash}")
    if diffs:
        raise DatasetError("dataset is incompatible with what was expected: " + "; ".join(diffs))


def _check_subject_file(fpath: Path, entry: dict, manifest: dict) -> None:
    """Structure of one subject file against the manifest."""
    import h5py

    from fbsemlib.physics.geometry import sinogram_geometry_from_dict, ImageGrid

    name = fpath.name
    geom = sinogram_geometry_from_dict(manifest["geometry"])
    grid = ImageGrid.from_dict(manifest["grid"])
    K = int(manifest["num_iterations"]) * int(manifest["num_subsets"])
    img = tuple(grid.shape)
    sino = tuple(geom.shape)
    try:
        f = h5py.File(fpath, "r")
    except Exception as e:  # truncated, not HDF5, ...
        raise DatasetError(f"{name} cannot be opened as HDF5 (truncated or corrupted?): {e}") from None
    with f:
        try:
            a = f.attrs
            if a.get("format") != FORMAT_NAME or int(a.get("format_version", -1)) != FORMAT_VERSION:
                raise DatasetError(f"{name}: format {a.get('format')!r} version {a.get('format_version')!r}, "
                                   f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}")
            if a.get("recipe_hash") != manifest["recipe_hash"]:
                raise DatasetError(f"{name} belongs to another recipe (hash {a.get('recipe_hash')!r}, manifest "
                                   f"{manifest['recipe_hash']!r})")
            if int(a["subject"]) != int(entry["subject"]) or a["split"] != entry["split"]:
                raise DatasetError(f"{name}: subject/split {int(a['subject'])}/{a['split']} differ from the "
                                   f"manifest's {entry['subject']}/{entry['split']}")
            d = diff(json.loads(a["geometry"]), manifest["geometry"], **_DIFF_WORDING)
            if d:
                raise DatasetError(f"{name}: geometry differs from the manifest: {'; '.join(d)}")
            N, S = int(a["num_images"]), int(a["num_samples"])
            if N != int(entry["num_images"]) or S != int(entry["num_samples"]):
                raise DatasetError(f"{name}: {N} images / {S} samples, manifest says "
                                   f"{entry['num_images']} / {entry['num_samples']}")
            expect = {}
            for k in _IMAGE_ARRAYS:
                expect[f"images/{k}"] = (N,) + img
            expect["images/targets"] = (N, K) + img
            for k in _IMAGE_META:
                expect[f"images/{k}"] = (N,)
            for k in _SINO_ARRAYS:
                expect[f"sinograms/{k}"] = (N,) + sino
            expect["sinograms/normalisation"] = sino
            expect["samples/y"] = (S,) + sino
            for k in _SAMPLE_META:
                expect[f"samples/{k}"] = (S,)
            for key, shape in expect.items():
                if key not in f:
                    raise DatasetError(f"{name}: dataset {key!r} is missing")
                if tuple(f[key].shape) != shape:
                    raise DatasetError(f"{name}: {key!r} has shape {tuple(f[key].shape)}, expected {shape}")
            ii = f["samples/image_index"][()]
            if ii.size and (ii.min() < 0 or ii.max() >= N):
                raise DatasetError(f"{name}: samples/image_index out of range 0..{N - 1}")
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{name} is corrupted: {type(e).__name__}: {e}") from None


def validate_dataset(
    path: str | os.PathLike,
    *,
    checksums: bool = True,
    structure: bool = True,
    geometry=None,
    grid=None,
    num_iterations: int | None = None,
    num_subsets: int | None = None,
    recipe_hash: str | None = None,
) -> DatasetInfo:
    """Check a dataset folder and return its :class:`DatasetInfo`; raise
    :class:`DatasetError` naming the problem otherwise.

    Checks: ``manifest.json`` is present, valid and of this format version; every listed
    file exists with the recorded size and (``checksums``) SHA-256; (``structure``) every
    subject file opens, belongs to this recipe, and holds every array with the shape
    implied by the geometry, grid and schedule; and, when given, that the dataset's
    geometry / grid / schedule / recipe hash equal the expected ones (the message lists
    every difference)."""
    path = Path(path)
    manifest = _read_manifest(path)
    _check_expected(manifest, geometry, grid, num_iterations, num_subsets, recipe_hash)
    seen = {s: set() for s in SPLITS}
    for name, entry in manifest["files"].items():
        fpath = path / name
        if not fpath.exists():
            raise DatasetError(f"dataset {str(path)!r}: file {name} listed in the manifest is missing")
        size = fpath.stat().st_size
        if size != int(entry["size"]):
            raise DatasetError(f"dataset {str(path)!r}: file {name} has {size} bytes, the manifest records "
                               f"{entry['size']} (truncated or modified)")
        if checksums:
            h = sha256_file(fpath)
            if h != entry["sha256"]:
                raise DatasetError(f"dataset {str(path)!r}: file {name} fails its SHA-256 checksum (corrupted or "
                                   f"modified): {h[:16]}... != {entry['sha256'][:16]}...")
        if entry.get("split") not in seen:
            raise DatasetError(f"dataset {str(path)!r}: file {name} has unknown split {entry.get('split')!r}")
        seen[entry["split"]].add(int(entry["subject"]))
        if structure:
            _check_subject_file(fpath, entry, manifest)
    for s in SPLITS:
        listed = set(int(i) for i in manifest["splits"].get(s, []))
        if listed != seen[s]:
            raise DatasetError(f"dataset {str(path)!r}: the manifest's {s} split {sorted(listed)} does not match its "
                               f"files {sorted(seen[s])}")
    all_ids = [i for s in SPLITS for i in manifest["splits"].get(s, [])]
    if len(all_ids) != len(set(all_ids)):
        raise DatasetError(f"dataset {str(path)!r}: a subject appears in more than one split")
    return DatasetInfo(path, manifest)


def open_dataset(path: str | os.PathLike, *, checksums: bool = True, **expected) -> DatasetInfo:
    """Validate (see :func:`validate_dataset`) and return the dataset's :class:`DatasetInfo`."""
    return validate_dataset(path, checksums=checksums, **expected)


# ----------------------------------------------------------------------------------------
# torch Dataset
# ----------------------------------------------------------------------------------------
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
                smp = {k: f[f"samples/{k}"][()] for k in _SAMPLE_META}
                img = {k: f[f"images/{k}"][()] for k in _IMAGE_META}
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

    def _load(self) -> None:
        import h5py

        img_keys = ("mr", "targets", "target_final", "activity", "brain_mask")
        sino_keys = ("multiplicative", "additive")
        parts = {k: [] for k in img_keys + sino_keys + ("y",)}
        img_offset, smp_offset = [], []
        off = soff = 0
        for fi, fp in enumerate(self._files):
            with h5py.File(fp, "r") as f:
                for k in img_keys:
                    parts[k].append(f[f"images/{k}"][()])
                for k in sino_keys:
                    parts[k].append(f[f"sinograms/{k}"][()])
                parts["y"].append(f["samples/y"][()])
                img_offset.append(off)
                smp_offset.append(soff)
                off += int(f.attrs["num_images"])
                soff += int(f.attrs["num_samples"])
        mem = {}
        for k, v in parts.items():
            arr = np.concatenate(v, axis=0)
            t = torch.from_numpy(arr.astype(bool) if k == "brain_mask" else arr.astype(np.float32, copy=False))
            mem[k] = t.to(self.device) if self.device is not None else t
        # rows of every sample in the concatenated image / sample arrays
        irow = [img_offset[fi] + i for fi, i, _ in self._index]
        srow = [smp_offset[fi] + s for fi, _, s in self._index]
        self._mem = mem
        self._irow, self._srow = irow, srow

    def _arrays(self, idx: int) -> dict:
        if self._mem is not None:
            m, ir, sr = self._mem, self._irow[idx], self._srow[idx]
            return dict(
                y=m["y"][sr], multiplicative=m["multiplicative"][ir], additive=m["additive"][ir],
                mr=m["mr"][ir], targets=m["targets"][ir], target_final=m["target_final"][ir],
                activity=m["activity"][ir], brain_mask=m["brain_mask"][ir],
            )
        fi, i, s = self._index[idx]
        f = self._file(fi)
        out = dict(
            y=f["samples/y"][s], multiplicative=f["sinograms/multiplicative"][i],
            additive=f["sinograms/additive"][i], mr=f["images/mr"][i], targets=f["images/targets"][i],
            target_final=f["images/target_final"][i], activity=f["images/activity"][i],
            brain_mask=f["images/brain_mask"][i],
        )
        res = {}
        for k, v in out.items():
            t = torch.from_numpy(np.asarray(v).astype(bool) if k == "brain_mask" else np.asarray(v, dtype=np.float32))
            res[k] = t.to(self.device) if self.device is not None else t
        return res

    def __getitem__(self, i) -> dict:
        idx = self._check_index(i)
        a = self._arrays(idx)
        K = a["targets"].shape[0]
        return {
            "y": a["y"].unsqueeze(0),
            "multiplicative": a["multiplicative"].unsqueeze(0),
            "additive": a["additive"].unsqueeze(0),
            "mr": a["mr"].unsqueeze(0),
            "targets": a["targets"].reshape((K, 1) + tuple(a["targets"].shape[1:])),
            "target_final": a["target_final"].unsqueeze(0),
            "activity": a["activity"].unsqueeze(0),
            "brain_mask": a["brain_mask"].unsqueeze(0),
            "index": idx,
        }

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
            out[k] = t.to(self.device) if self.device is not None else t
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
