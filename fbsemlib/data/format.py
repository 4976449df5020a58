"""Dataset folders on disk (layout: :mod:`fbsemlib.data.schema`): the writer, the
manifest, validation and :class:`DatasetInfo`.

The writer (:func:`write_subject`, :func:`manifest_files`, :func:`write_manifest`) is what
:func:`fbsemlib.data.simulate.simulate_dataset` writes through; every write goes to a
``*.part`` file first and is renamed when complete. :func:`validate_dataset` /
:func:`open_dataset` check a folder (checksums, structure, shapes, versions, and
optionally the expected geometry / grid / schedule) and raise :class:`DatasetError` (a
``ValueError``) saying what is wrong. :class:`fbsemlib.data.dataset.PETDataset` serves the
samples of a validated folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fbsemlib.config import ConfigError, diff, from_dict
from fbsemlib.errors import UserError
from fbsemlib.data.recipe import DataConfig
from fbsemlib.data.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IMAGE_ARRAYS,
    IMAGE_META,
    MANIFEST,
    SAMPLE_META,
    SINOGRAM_ARRAYS,
    SPLITS,
    SUBJECT_FILE,
)
from fbsemlib.physics.cache import shared_projector
from fbsemlib.physics.geometry import ImageGrid, sinogram_geometry_from_dict
from fbsemlib.outputs import atomic_write_bytes, atomic_write_text
from fbsemlib.provenance import json_default, versions

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "open_dataset",
    "validate_dataset",
    "sha256_file",
    "library_versions",
    "dumps",
    "utc_now",
    "subject_attrs",
    "write_subject",
    "is_complete_subject_file",
    "is_dataset_manifest",
    "DATASET_FILES",
    "RUN_LOG",
    "manifest_files",
    "write_manifest",
]

class DatasetError(UserError, ValueError):
    """A dataset folder is missing, incomplete, corrupted or incompatible."""


#: what a dataset folder may hold (the output-folder rule, :func:`fbsemlib.outputs.check_output_folder`)
DATASET_FILES = (MANIFEST, MANIFEST + ".part", "subject-*.h5", "subject-*.h5.part", "recipe.json", "simulation.json")
#: how a dataset was made (time, resumed subjects, when): kept apart from the manifest and
#: the subject files, whose bytes depend only on the recipe and the library version
RUN_LOG = "simulation.json"


def is_dataset_manifest(folder: Path) -> bool:
    """Whether ``folder/manifest.json`` is an fbsemlib dataset manifest (valid JSON naming
    this format, whatever its version): what makes a folder recognisably a dataset."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT_NAME


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
    def recipe(self) -> DataConfig:
        """The recipe as a :class:`~fbsemlib.data.recipe.DataConfig`."""
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
        return sinogram_geometry_from_dict(self.manifest["geometry"])

    @cached_property
    def grid(self) -> ImageGrid:
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
        """The projector the data was simulated with (same geometry, grid and PSF): the
        process-wide one of :func:`fbsemlib.physics.cache.shared_projector`, so the
        simulation, every split and every model of this geometry share one object and its
        system matrices (and those of its ordered-subset projectors) are built once."""
        return shared_projector(self.geometry, self.grid, device=device, backend=backend,
                                psf_fwhm_mm=self.psf_fwhm_mm, **kwargs)

    def summary(self) -> dict:
        """The manifest's summary, with the run log's time and resumed subjects when present."""
        out = dict(self.manifest.get("summary", {}))
        try:
            log = json.loads((self.path / RUN_LOG).read_text())
            out.update({k: log[k] for k in ("seconds", "resumed_subjects") if k in log})
        except (OSError, ValueError, TypeError):
            pass
        return out

    @property
    def content_hash(self) -> str:
        """SHA-256 (hex) of the dataset's content: its recipe hash and the SHA-256 of every
        subject file, in order. Two folders with the same content hash hold byte-identical
        data (no time stamp is stored in them)."""
        files = self.manifest.get("files", {})
        doc = [self.manifest.get("recipe_hash"), [[k, files[k]["sha256"]] for k in sorted(files)]]
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


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
    if not isinstance(manifest["files"], dict) or not all(isinstance(e, dict) for e in manifest["files"].values()):
        raise DatasetError(f"{str(mpath)!r} is corrupted: 'files' must map file names to entries")
    for name in manifest["files"]:
        if not _inside_name(name):
            raise DatasetError(f"{str(mpath)!r} names the file {name!r}, outside the dataset folder: a dataset's "
                               "files are plain names in its own folder (refused)")
    return manifest


def _inside_name(name) -> bool:
    """Whether ``name`` is a plain file name (no folder part, not absolute, not ``..``)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not os.path.isabs(name))


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
            for k in IMAGE_ARRAYS:
                expect[f"images/{k}"] = (N,) + img
            expect["images/targets"] = (N, K) + img
            for k in IMAGE_META:
                expect[f"images/{k}"] = (N,)
            for k in SINOGRAM_ARRAYS:
                expect[f"sinograms/{k}"] = (N,) + sino
            expect["sinograms/normalisation"] = sino
            expect["samples/y"] = (S,) + sino
            for k in SAMPLE_META:
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
# writing
# ----------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    """The versions recorded in every subject file and manifest (provenance)."""
    return versions("scipy", "h5py", "hdf5", "nilearn")


def dumps(o: Any) -> str:
    """The JSON of an HDF5 attribute (sorted keys; numpy scalars and arrays as values)."""
    return json.dumps(o, sort_keys=True, default=json_default)


def utc_now() -> str:
    """The ``created`` time stamp of files and manifests (UTC, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def subject_attrs(recipe: DataConfig, recipe_hash: str, geometry, grid: ImageGrid) -> dict:
    """The root attributes that every subject file of a dataset shares."""
    lib = library_versions()
    return dict(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, recipe_hash=recipe_hash, recipe=dumps(recipe.to_dict()),
        geometry=dumps(geometry.to_dict()), grid=dumps(grid.to_dict()),
        num_iterations=recipe.num_iterations, num_subsets=recipe.num_subsets,
        fbsemlib_version=lib["fbsemlib"], library_versions=dumps(lib),
    )


def _compression_options(compression: str) -> dict:
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {"compression": "lzf", "shuffle": True}


def write_subject(path: Path, subject: dict, attrs: dict, *, compression: str, normalisation: np.ndarray,
                  crystal_efficiencies: np.ndarray) -> None:
    """Write one subject file: built in memory, then written atomically
    (:func:`fbsemlib.outputs.atomic_write`), so that a full or read-only disk is one
    ``OSError`` from a plain write and leaves no partial file (HDF5 writing straight to a
    full disk ends in a cascade of errors and a crash).

    ``subject`` is what :func:`fbsemlib.data.simulate.simulate_subject` returns (groups
    ``images``, ``sinograms``, ``samples`` of numpy arrays plus ``subject``, ``split``,
    ``phantom_seed``, ``lesion_info``, ``phantom_params``); ``attrs`` are the shared
    :func:`subject_attrs`; ``normalisation`` and ``crystal_efficiencies`` (one scanner)
    are stored in every file. Arrays of three or more dimensions are chunked one image
    or sample at a time and compressed with ``compression`` (``gzip``, ``lzf``, ``none``)."""
    import h5py

    kw = _compression_options(compression)
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=True) as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        N = subject["images"]["activity"].shape[0]
        S = subject["samples"]["y"].shape[0]
        f.attrs.update(subject=int(subject["subject"]), split=subject["split"],
                       subject_seed=int(subject["phantom_seed"]), num_images=N, num_samples=S)

        def put(group, name, arr):
            arr = np.ascontiguousarray(arr)
            if arr.ndim >= 3:
                group.create_dataset(name, data=arr, chunks=(1,) + arr.shape[1:], **kw)
            else:
                group.create_dataset(name, data=arr)

        g = f.create_group("images")
        for k, v in subject["images"].items():
            put(g, k, v)
        g.attrs["lesion_info"] = dumps(subject["lesion_info"])
        g.attrs["phantom_params"] = dumps(subject["phantom_params"])
        g = f.create_group("sinograms")
        for k, v in subject["sinograms"].items():
            put(g, k, v)
        g.create_dataset("normalisation", data=np.asarray(normalisation, np.float32))
        g.create_dataset("crystal_efficiencies", data=np.asarray(crystal_efficiencies, np.float64))
        g = f.create_group("samples")
        for k, v in subject["samples"].items():
            put(g, k, v)
        f.attrs["complete"] = 1
    atomic_write_bytes(path, image.getvalue())


def is_complete_subject_file(path: Path, recipe_hash: str) -> bool:
    """A finished subject file of the recipe ``recipe_hash`` (an interrupted run resumes from it)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("recipe_hash") == recipe_hash and int(f.attrs.get("complete", 0)) == 1 \
                and "samples/y" in f
    except Exception:
        return False


def manifest_files(folder: Path, split_of: dict[int, str]) -> tuple[dict, dict]:
    """The manifest's ``files`` (name -> SHA-256, size, subject, split, images, samples) of
    the subject files of ``split_of`` (subject -> split) in ``folder``, in subject order,
    and their summary: subjects / images / samples per split and in all, the range of
    the images' expected counts, the bytes on disk."""
    import h5py

    files = {}
    cmin, cmax, n_img, n_smp = math.inf, -math.inf, 0, 0
    per_split = {s: {"subjects": 0, "images": 0, "samples": 0} for s in SPLITS}
    for i in sorted(split_of):
        fp = folder / SUBJECT_FILE.format(i)
        with h5py.File(fp, "r") as f:
            N, S = int(f.attrs["num_images"]), int(f.attrs["num_samples"])
            c = f["images/counts"][()]
        cmin, cmax = min(cmin, float(c.min())), max(cmax, float(c.max()))
        n_img += N
        n_smp += S
        s = split_of[i]
        per_split[s]["subjects"] += 1
        per_split[s]["images"] += N
        per_split[s]["samples"] += S
        files[fp.name] = dict(sha256=sha256_file(fp), size=fp.stat().st_size, subject=i, split=s,
                              num_images=N, num_samples=S)
    summary = dict(splits=per_split, images=n_img, samples=n_smp, counts_min=cmin, counts_max=cmax,
                   disk_bytes=sum(v["size"] for v in files.values()))
    return files, summary


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write ``folder/manifest.json`` (via a ``.part`` file): what makes a folder a dataset,
    so it is written last, once every subject file is complete."""
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, default=json_default) + "\n")
