"""Simulated PET/MR training data for FBSEM-Net: the recipe, the simulation, the CLI.

A *recipe* (:class:`DataConfig`, the ``data:`` section of an experiment YAML file such
as ``data/smoke.yaml``, ``data/cpu.yaml``, ``data/paper.yaml``) fixes everything; the
same recipe and seed give bit-identical arrays. :func:`simulate_dataset` writes the
dataset folder described in :mod:`fbsemlib.data.format`; ``fbsem simulate`` drives it.

What is simulated, per subject
------------------------------
1. A brain phantom (:func:`fbsemlib.data.phantoms.make_subject`, ICBM152-based, with PET
   and MR lesions) for every 2D slice: slice ``j`` of ``slices_per_subject`` lies at MNI
   height ``linspace(*slice_range_mm)[j]`` (plus the phantom's own random jitter, the
   same for all slices of a subject); the anatomy (deformation, scale, rotation, tissue
   values) is that of the subject, the lesions are drawn in each slice. A 3D recipe
   (``image_shape[0] > 1``) uses one volume per subject.
2. ``rotations_per_slice`` in-plane rotations of each slice about the grid centre
   (angles drawn uniformly in ``+-max_rotation_deg``; a single rotation is 0 deg, the
   phantom already carries a random head rotation). Images are rotated with linear
   interpolation, masks with nearest-neighbour (so lesions stay inside the brain mask).
3. Forward model ``ybar = t n a A x + b`` (:mod:`fbsemlib.physics.forward_model`):
   ``A`` the Joseph projector of the preset geometry (with the recipe's PSF, if any),
   ``a = exp(-A mu)``, ``n`` = crystal-efficiency products with zeros in block gaps
   (efficiencies log-normal with ``crystal_efficiency_spread``, drawn ONCE per dataset:
   one scanner), ``b = t n (s + r)``: scatter ``s`` = the attenuated trues ``a A x``
   blurred by a Gaussian (``scatter_fwhm_mm`` radially, ``scatter_fwhm_deg`` across
   views) and a flat randoms term ``r``, scaled so that the scatter fraction
   ``S / (T + S)`` and the randoms fraction ``R / (T + S + R)`` equal the recipe's.
   ``t`` (the acquisition scale, folded into the stored ``multiplicative = t n a``) makes
   the expected total counts ``sum(ybar)`` equal the image's count level, drawn
   log-uniformly in ``counts_range``. Images therefore stay in phantom activity units
   at every count level, as in the original FBSEM-Net code.
4. Noisy data ``y ~ Poisson(ybar)`` (``torch.poisson`` with a seeded generator), once per
   noise realisation (``noise_realisations`` per split; realisations share the image,
   its count level and its targets).
5. Iteration-dependent targets: the ``K = num_iterations x num_subsets`` OSEM
   sub-iterates of the NOISE-FREE data ``ybar`` with the same factors, the same
   interleaved subsets visited 0..M-1 at every iteration and the same initial image
   (ones in the sensitivity support): ``fbsemlib.recon.algorithms.osem(..., return_iterates=True)``,
   i.e. exactly the schedule of the unrolled network.
6. The final target of the original FBSEM-Net: OSEM (``reference_iterations`` x
   ``reference_subsets``, by default the unrolled schedule) of Poisson data drawn at the
   high-count level ``high_count`` (1e10 in the original) with the same factors (the
   acquisition scale ``t`` multiplied by ``high_count / counts``).

Seeds
-----
Everything derives from ``numpy.random.SeedSequence(seed, spawn_key=...)`` with fixed
keys: ``(0,)`` crystal efficiencies, ``(1,)`` the subject -> split permutation,
``(2, i, ...)`` subject ``i`` (phantom seed, count levels, rotations, one torch
generator per noise realisation and for the high-count data). A subject's data do not
depend on the number of subjects, on the other subjects or on an interruption; all ops
are deterministic on the CPU. CUDA simulation (``device=``) is allowed but its results
are not guaranteed bit-identical to the CPU's.

Writing is atomic: subjects are written one file at a time into ``DIR.tmp-<hash>``
(each as ``*.part``, renamed when complete), ``manifest.json`` last, then the folder is
renamed to ``DIR``. An interrupted run leaves no ``DIR``; rerunning the same recipe
resumes from the finished subject files. An existing complete dataset with the same
recipe hash is reused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbsemlib.config import ConfigError, from_dict, load_experiment, to_dict
from fbsemlib.physics.projector import Projector
from fbsemlib.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    DatasetError,
    DatasetInfo,
    sha256_file,
    validate_dataset,
)
from fbsemlib.physics.geometry import SCANNER_PRESETS, ImageGrid, SinogramGeometry, sinogram_preset

__all__ = [
    "DataConfig",
    "load_data_config",
    "recipe_hash",
    "split_subjects",
    "SimulationContext",
    "simulate_subject",
    "simulate_dataset",
    "cached_dataset",
    "default_data_root",
    "cmd_simulate",
    "DEFAULT_OUT",
]

#: default folder of generated datasets, relative to the repository (git-ignored)
DEFAULT_OUT = Path("data/generated")


def default_data_root() -> Path:
    """Where :func:`cached_dataset` keeps datasets: ``$FBSEM_DATA_DIR`` if set, else
    ``data/generated`` of the source checkout (when fbsemlib runs from one), else
    ``./data/generated``."""
    env = os.environ.get("FBSEM_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists() and (repo / "fbsemlib").is_dir():
        return repo / DEFAULT_OUT
    return Path.cwd() / DEFAULT_OUT

_COMPRESSION = ("gzip", "lzf", "none")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


# ----------------------------------------------------------------------------------------
# recipe
# ----------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """The simulation recipe (the ``data:`` section of an experiment file).

    Geometry
        scanner: preset name (``mmr``, ``mmr2d``, ``small2d``, ``tiny2d``, ``small3d``).
        num_rings, max_ring_difference: optional overrides of the preset (a 2D recipe
            needs one ring, a 3D one several).
        image_shape: ``(Z, Y, X)``; ``Z == 1`` is 2D.
        voxel_size_mm: ``(dz, dy, dx)``.
        psf_fwhm_mm: image-space Gaussian PSF of the projector (``None``: none).
    Subjects
        phantom: dict passed to :class:`fbsemlib.data.phantoms.PhantomConfig` (validated).
        num_subjects: number of subjects.
        split: subjects per split, ``{train, validation, test}``: integer counts summing
            to ``num_subjects`` or fractions summing to 1 (rounded by largest remainder).
            Subjects are assigned to splits by a seeded permutation: splits are disjoint
            BY SUBJECT.
        slices_per_subject: 2D axial slices per subject (must be 1 in 3D).
        slice_range_mm: MNI heights of the first and last slice (evenly spaced; one slice
            sits at the middle).
        rotations_per_slice: in-plane rotations per slice; ``max_rotation_deg`` bounds them.
    Counts and physics
        counts_range: ``(low, high)`` expected total counts (prompts, trues + scatter +
            randoms) of one sample (a 2D slice or a 3D volume), drawn log-uniformly.
        high_count: expected counts of the high-count reference data.
        noise_realisations: Poisson realisations per image, per split.
        scatter_fraction: ``S / (T + S)``; randoms_fraction: ``R / (T + S + R)``.
        scatter_fwhm_mm, scatter_fwhm_deg: smoothness of the scatter sinogram.
        crystal_efficiency_spread: sigma of the log-normal crystal efficiencies (0: all 1).
    Unrolled schedule
        num_iterations x num_subsets = num_modules (K). Give any two (or just
        ``num_subsets`` with one of the others); ``num_modules`` must be a multiple of
        ``num_subsets``.
        reference_iterations, reference_subsets: OSEM schedule of the high-count
            reference (default: the unrolled schedule).
    Other
        seed: master seed. compression: HDF5 compression (``gzip``, ``lzf``, ``none``).
        name: a label.
    """

    name: str = "custom"
    # geometry
    scanner: str = "small2d"
    num_rings: int | None = None
    max_ring_difference: int | None = None
    image_shape: tuple[int, int, int] = (1, 96, 96)
    voxel_size_mm: tuple[float, float, float] = (2.0, 2.5, 2.5)
    psf_fwhm_mm: float | None = None
    # subjects
    phantom: dict = field(default_factory=dict)
    num_subjects: int = 20
    split: dict[str, int | float] = field(default_factory=lambda: {"train": 14, "validation": 2, "test": 4})
    slices_per_subject: int = 1
    slice_range_mm: tuple[float, float] = (-8.0, 32.0)
    rotations_per_slice: int = 1
    max_rotation_deg: float = 15.0
    # counts and physics
    counts_range: tuple[float, float] = (1e6, 1e7)
    high_count: float = 1e10
    noise_realisations: dict[str, int] = field(default_factory=lambda: {"train": 1, "validation": 1, "test": 1})
    scatter_fraction: float = 0.3
    randoms_fraction: float = 0.2
    scatter_fwhm_mm: float = 80.0
    scatter_fwhm_deg: float = 30.0
    crystal_efficiency_spread: float = 0.1
    # unrolled schedule
    num_iterations: int | None = None
    num_subsets: int = 6
    num_modules: int | None = None
    reference_iterations: int | None = None
    reference_subsets: int | None = None
    # other
    seed: int = 0
    compression: str = "gzip"

    def __post_init__(self) -> None:
        err = lambda msg: ConfigError(f"invalid section 'data': {msg}")  # noqa: E731
        if not isinstance(self.name, str):
            raise err(f"name must be a string, got {self.name!r}")
        # -- geometry
        if self.scanner not in SCANNER_PRESETS:
            raise err(f"unknown scanner preset {self.scanner!r}; choose one of {sorted(SCANNER_PRESETS)}")
        if self.num_rings is not None and (not _is_int(self.num_rings) or self.num_rings < 1):
            raise err(f"num_rings must be a positive integer or null, got {self.num_rings!r}")
        if self.max_ring_difference is not None and (not _is_int(self.max_ring_difference)
                                                     or self.max_ring_difference < 0):
            raise err(f"max_ring_difference must be a non-negative integer or null, got {self.max_ring_difference!r}")
        shp = tuple(self.image_shape)
        if len(shp) != 3 or not all(_is_int(n) and n >= 1 for n in shp):
            raise err(f"image_shape must be three positive integers (Z, Y, X), got {self.image_shape!r}")
        self.image_shape = tuple(int(n) for n in shp)
        vs = tuple(self.voxel_size_mm)
        if len(vs) != 3 or not all(_is_num(v) and v > 0 for v in vs):
            raise err(f"voxel_size_mm must be three positive numbers (dz, dy, dx), got {self.voxel_size_mm!r}")
        self.voxel_size_mm = tuple(float(v) for v in vs)
        if self.psf_fwhm_mm is not None:
            if not _is_num(self.psf_fwhm_mm) or self.psf_fwhm_mm < 0:
                raise err(f"psf_fwhm_mm must be a non-negative number or null, got {self.psf_fwhm_mm!r}")
            self.psf_fwhm_mm = float(self.psf_fwhm_mm) if self.psf_fwhm_mm > 0 else None
        # -- subjects
        if not isinstance(self.phantom, dict):
            raise err(f"phantom must be a mapping of PhantomConfig keys, got {self.phantom!r}")
        self.phantom_config()  # validates
        if not _is_int(self.num_subjects) or self.num_subjects < 1:
            raise err(f"num_subjects must be a positive integer, got {self.num_subjects!r}")
        self.split_counts()  # validates
        for k in ("slices_per_subject", "rotations_per_slice"):
            v = getattr(self, k)
            if not _is_int(v) or v < 1:
                raise err(f"{k} must be a positive integer, got {v!r}")
        sr = tuple(self.slice_range_mm)
        if len(sr) != 2 or not all(_is_num(v) for v in sr) or sr[0] > sr[1]:
            raise err(f"slice_range_mm must be (low, high) with low <= high, got {self.slice_range_mm!r}")
        self.slice_range_mm = (float(sr[0]), float(sr[1]))
        if not _is_num(self.max_rotation_deg) or not 0 <= self.max_rotation_deg <= 180:
            raise err(f"max_rotation_deg must lie in [0, 180], got {self.max_rotation_deg!r}")
        self.max_rotation_deg = float(self.max_rotation_deg)
        if self.image_shape[0] > 1 and self.slices_per_subject != 1:
            raise err(f"slices_per_subject must be 1 for a 3D image (image_shape[0] = {self.image_shape[0]}), "
                      f"got {self.slices_per_subject}")
        # -- counts / physics
        cr = tuple(self.counts_range)
        if len(cr) != 2 or not all(_is_num(v) and v > 0 for v in cr):
            raise err(f"counts_range must be two positive numbers (low, high), got {self.counts_range!r}")
        if cr[0] > cr[1]:
            raise err(f"counts_range must satisfy low <= high, got {self.counts_range!r}")
        self.counts_range = (float(cr[0]), float(cr[1]))
        if not _is_num(self.high_count) or self.high_count <= 0:
            raise err(f"high_count must be a positive number, got {self.high_count!r}")
        self.high_count = float(self.high_count)
        if self.high_count < self.counts_range[1]:
            raise err(f"high_count ({self.high_count:g}) must be at least the top of counts_range "
                      f"({self.counts_range[1]:g})")
        if not isinstance(self.noise_realisations, dict):
            raise err(f"noise_realisations must be a mapping split -> count, got {self.noise_realisations!r}")
        for k, v in self.noise_realisations.items():
            if k not in SPLITS:
                raise err(f"noise_realisations: unknown split {k!r} (splits: {', '.join(SPLITS)})")
            if not _is_int(v) or v < 1:
                raise err(f"noise_realisations[{k!r}] must be a positive integer, got {v!r}")
        self.noise_realisations = {s: int(self.noise_realisations.get(s, 1)) for s in SPLITS}
        for k in ("scatter_fraction", "randoms_fraction"):
            v = getattr(self, k)
            if not _is_num(v) or not 0 <= v < 1:
                raise err(f"{k} must lie in [0, 1), got {v!r}")
            setattr(self, k, float(v))
        for k in ("scatter_fwhm_mm", "scatter_fwhm_deg"):
            v = getattr(self, k)
            if not _is_num(v) or v <= 0:
                raise err(f"{k} must be a positive number, got {v!r}")
            setattr(self, k, float(v))
        if not _is_num(self.crystal_efficiency_spread) or not 0 <= self.crystal_efficiency_spread <= 1:
            raise err(f"crystal_efficiency_spread must lie in [0, 1], got {self.crystal_efficiency_spread!r}")
        self.crystal_efficiency_spread = float(self.crystal_efficiency_spread)
        # -- schedule
        M = self.num_subsets
        if not _is_int(M) or M < 1:
            raise err(f"num_subsets must be a positive integer, got {M!r}")
        for k in ("num_iterations", "num_modules", "reference_iterations", "reference_subsets"):
            v = getattr(self, k)
            if v is not None and (not _is_int(v) or v < 1):
                raise err(f"{k} must be a positive integer, got {v!r}")
        K, I = self.num_modules, self.num_iterations
        if K is not None and K % M:
            raise err(f"num_modules K={K} must be a multiple of num_subsets={M} (K = iterations x subsets)")
        if K is not None and I is not None and I * M != K:
            raise err(f"num_modules={K} differs from num_iterations x num_subsets = {I} x {M} = {I * M}")
        if I is None:
            I = K // M if K is not None else 10
        self.num_iterations, self.num_modules = int(I), int(I * M)
        # -- seed, storage
        if not _is_int(self.seed) or self.seed < 0:
            raise err(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.compression not in _COMPRESSION:
            raise err(f"compression must be one of {_COMPRESSION}, got {self.compression!r}")
        # -- geometry consistency (cheap: no projector is built)
        try:
            geom = self.geometry()
            grid = self.grid()
        except ValueError as e:
            raise err(str(e)) from None
        rings = geom.scanner.num_rings
        if grid.is_2d and rings != 1:
            raise err(f"a 2D image (image_shape[0] = 1) needs a one-ring scanner; {self.scanner!r} has {rings} "
                      f"rings (set num_rings: 1 or choose a 2D preset)")
        if not grid.is_2d and rings == 1:
            raise err(f"a 3D image (image_shape[0] = {grid.shape[0]}) needs a multi-ring scanner; "
                      f"{self.scanner!r} has one ring")
        for name, m in (("num_subsets", M), ("reference_subsets", self.reference_subsets)):
            if m is not None and m > geom.num_views:
                raise err(f"{name}={m} exceeds the {geom.num_views} views of scanner {self.scanner!r}")
        if grid.fov_radius_mm() >= geom.scanner.radius_mm:
            raise err(f"the image field of view (radius {grid.fov_radius_mm():.1f} mm) does not fit inside scanner "
                      f"{self.scanner!r} (radius {geom.scanner.radius_mm} mm): reduce image_shape or voxel_size_mm")

    # -- derived ---------------------------------------------------------------------------
    @property
    def K(self) -> int:
        return self.num_iterations * self.num_subsets

    @property
    def is_2d(self) -> bool:
        return self.image_shape[0] == 1

    @property
    def ref_iterations(self) -> int:
        return self.reference_iterations or self.num_iterations

    @property
    def ref_subsets(self) -> int:
        return self.reference_subsets or self.num_subsets

    @property
    def images_per_subject(self) -> int:
        return self.slices_per_subject * self.rotations_per_slice

    def geometry(self) -> SinogramGeometry:
        return sinogram_preset(self.scanner, self.num_rings, self.max_ring_difference)

    def grid(self) -> ImageGrid:
        return ImageGrid(tuple(self.image_shape), tuple(self.voxel_size_mm))

    def phantom_config(self):
        from fbsemlib.data.phantoms import PhantomConfig

        return from_dict(PhantomConfig, self.phantom, "data.phantom")

    def split_counts(self) -> dict[str, int]:
        """Subjects per split (fractions resolved by largest remainder)."""
        err = lambda msg: ConfigError(f"invalid section 'data': {msg}")  # noqa: E731
        sp = self.split
        if not isinstance(sp, dict) or not sp:
            raise err(f"split must be a mapping {{train: .., validation: .., test: ..}}, got {sp!r}")
        for k, v in sp.items():
            if k not in SPLITS:
                raise err(f"split: unknown split {k!r} (splits: {', '.join(SPLITS)})")
            if not _is_num(v) or v < 0:
                raise err(f"split[{k!r}] must be a non-negative number, got {v!r}")
        vals = {s: sp.get(s, 0) for s in SPLITS}
        N = self.num_subjects
        if all(_is_int(v) for v in vals.values()):
            counts = {s: int(v) for s, v in vals.items()}
            if sum(counts.values()) != N:
                raise err(f"split counts {counts} sum to {sum(counts.values())}, not num_subjects = {N}")
            return counts
        total = float(sum(float(v) for v in vals.values()))
        if abs(total - 1.0) > 1e-6 or any(float(v) > 1 for v in vals.values()):
            raise err(f"split must be integer counts summing to num_subjects ({N}) or fractions summing to 1, "
                      f"got {sp}")
        raw = {s: float(v) * N for s, v in vals.items()}
        counts = {s: int(math.floor(r + 1e-9)) for s, r in raw.items()}
        rest = N - sum(counts.values())
        order = sorted(SPLITS, key=lambda s: -(raw[s] - counts[s]))
        for s in order[:rest]:
            counts[s] += 1
        return counts

    def to_dict(self) -> dict:
        return to_dict(self)


def load_data_config(path: str | os.PathLike, seed: int | None = None) -> DataConfig:
    """The ``data:`` section of experiment file ``path`` as a :class:`DataConfig`."""
    sections = load_experiment(path)
    if "data" not in sections:
        raise ConfigError(f"config file {str(path)!r} has no 'data' section (sections: {sorted(sections) or 'none'})")
    d = dict(sections["data"])
    if seed is not None:
        d["seed"] = seed
    return from_dict(DataConfig, d, "data")


def recipe_hash(cfg: DataConfig) -> str:
    """SHA-256 of the canonical JSON of the recipe (and the format version)."""
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "recipe": to_dict(cfg)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _ss(cfg: DataConfig, *key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(cfg.seed, spawn_key=tuple(int(k) for k in key))


def _int_seed(ss: np.random.SeedSequence) -> int:
    """A 63-bit integer seed from a SeedSequence."""
    a, b = ss.generate_state(2, dtype=np.uint32)
    return int((int(a) << 31) ^ int(b)) & ((1 << 63) - 1)


def split_subjects(cfg: DataConfig) -> dict[str, list[int]]:
    """Subject ids of each split (a seeded permutation; disjoint)."""
    counts = cfg.split_counts()
    perm = np.random.default_rng(_ss(cfg, 1)).permutation(cfg.num_subjects)
    out, o = {}, 0
    for s in SPLITS:
        out[s] = sorted(int(i) for i in perm[o:o + counts[s]])
        o += counts[s]
    return out


# ----------------------------------------------------------------------------------------
# simulation
# ----------------------------------------------------------------------------------------
_PROJECTORS: dict = {}


def _projector(geometry: SinogramGeometry, grid: ImageGrid, psf_fwhm_mm, device):
    """A cached projector (its system matrices, and its subsets', are built once per process)."""
    key = (json.dumps(geometry.to_dict(), sort_keys=True), json.dumps(grid.to_dict(), sort_keys=True),
           psf_fwhm_mm, str(torch.device(device)))
    if key not in _PROJECTORS:
        if len(_PROJECTORS) >= 4:
            _PROJECTORS.pop(next(iter(_PROJECTORS)))
        _PROJECTORS[key] = Projector(geometry, grid, backend="torch", device=device, psf_fwhm_mm=psf_fwhm_mm)
    return _PROJECTORS[key]


class SimulationContext:
    """What all subjects share: geometry, grid, projector, normalisation (one scanner)."""

    def __init__(self, cfg: DataConfig, device="cpu"):
        from fbsemlib.physics.forward_model import normalisation_factors
        self.cfg = cfg
        self.device = torch.device(device)
        self.geometry = cfg.geometry()
        self.grid = cfg.grid()
        self.projector = _projector(self.geometry, self.grid, cfg.psf_fwhm_mm, self.device)
        sc = self.geometry.scanner
        rng = np.random.default_rng(_ss(cfg, 0))
        z = rng.standard_normal((sc.num_rings, sc.num_crystals_per_ring))
        self.crystal_efficiencies = np.exp(cfg.crystal_efficiency_spread * z) if cfg.crystal_efficiency_spread > 0 \
            else np.ones_like(z)
        self.normalisation = normalisation_factors(self.geometry, self.crystal_efficiencies, torch.float32).to(self.device)
        # scatter blur (bins): radial spacing from the LOR geometry, views span 180 deg
        start, end = self.geometry.lor_endpoints(torch.float64)
        s, e = start[0, 0, :, :2].numpy(), end[0, 0, :, :2].numpy()
        d = e - s
        dist = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]) / np.linalg.norm(d, axis=1)
        spacing = float(np.median(np.abs(np.diff(dist)))) or 1.0
        from fbsemlib.physics.psf import FWHM_TO_SIGMA

        self.radial_spacing_mm = spacing
        self.scatter_sigma_bins = (
            0.0,
            cfg.scatter_fwhm_deg * FWHM_TO_SIGMA / (180.0 / self.geometry.num_views),
            cfg.scatter_fwhm_mm * FWHM_TO_SIGMA / spacing,
        )
        self.phantom_config = cfg.phantom_config()


def _rotate(arr: np.ndarray, angle: float, order: int) -> np.ndarray:
    """In-plane rotation of ``(Z, Y, X)`` about the grid centre."""
    if angle == 0.0:
        return arr.copy()
    from scipy import ndimage

    return ndimage.rotate(arr, angle, axes=(2, 1), reshape=False, order=order, mode="constant", cval=0,
                          prefilter=False)


def _lesion_labels(masks: np.ndarray, shape) -> np.ndarray:
    """``(L, Z, Y, X)`` bool -> uint8 label image (lesion ``i`` -> ``i + 1``)."""
    lab = np.zeros(shape, dtype=np.uint8)
    for i in range(masks.shape[0]):
        lab[masks[i]] = i + 1
    return lab


def _phantom_images(ctx: SimulationContext, subject: int) -> dict:
    """Phantom arrays of every image (slice x rotation) of a subject, numpy ``(N, ...)``."""
    from fbsemlib.data.phantoms import make_subject

    cfg = ctx.cfg
    pseed = int(_ss(cfg, 2, subject, 0).generate_state(1, dtype=np.uint32)[0])
    rng = np.random.default_rng(_ss(cfg, 2, subject, 1))
    S, Rn = cfg.slices_per_subject, cfg.rotations_per_slice
    if cfg.is_2d:
        lo, hi = cfg.slice_range_mm
        heights = [0.5 * (lo + hi)] if S == 1 else list(np.linspace(lo, hi, S))
    else:
        heights = [None]
    if Rn == 1:
        angles = np.zeros((S, 1))
    else:
        angles = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg, size=(S, Rn))
    keys = ("activity", "mu_map", "mr", "brain_mask", "lesion_mask_pet", "lesion_mask_mr")
    out = {k: [] for k in keys}
    out.update(slice_index=[], rotation_deg=[], lesion_info=[], phantom_params=[])
    for j, h in enumerate(heights):
        pcfg = ctx.phantom_config if h is None else dataclasses.replace(ctx.phantom_config, slice_z_mm=float(h))
        ph = make_subject(ctx.grid, pseed, pcfg)
        base = dict(
            activity=ph.activity.cpu().numpy().astype(np.float32),
            mu_map=ph.mu_map.cpu().numpy().astype(np.float32),
            mr=ph.mr.cpu().numpy().astype(np.float32),
            brain_mask=ph.brain_mask.cpu().numpy().astype(np.uint8),
            lesion_mask_pet=_lesion_labels(ph.lesion_masks_pet.cpu().numpy(), ctx.grid.shape),
            lesion_mask_mr=_lesion_labels(ph.lesion_masks_mr.cpu().numpy(), ctx.grid.shape),
        )
        for r in range(Rn):
            ang = float(angles[j, r])
            for k in keys:
                order = 1 if base[k].dtype == np.float32 else 0
                v = _rotate(base[k], ang, order)
                if order == 1:
                    v = np.clip(v, 0, None).astype(np.float32)
                out[k].append(v)
            out["slice_index"].append(j)
            out["rotation_deg"].append(ang)
            info = []
            for li, d in enumerate(ph.lesion_info):
                d = dict(d)
                m = (out["lesion_mask_pet"][-1] == li + 1) | (out["lesion_mask_mr"][-1] == li + 1)
                if ang != 0.0 and m.any():  # centre of the rotated lesion
                    idx = np.argwhere(m).mean(axis=0)
                    d["centre_mm"] = [float(ctx.grid.origin_mm[a] + idx[a] * ctx.grid.voxel_size_mm[a]) for a in range(3)]
                d["num_voxels_pet"] = int((out["lesion_mask_pet"][-1] == li + 1).sum())
                d["num_voxels_mr"] = int((out["lesion_mask_mr"][-1] == li + 1).sum())
                d["label"] = li + 1
                info.append(d)
            out["lesion_info"].append(info)
            out["phantom_params"].append({k: v for k, v in ph.params.items() if k not in ("config", "grid")})
    for k in keys:
        out[k] = np.stack(out[k])
    out["phantom_seed"] = pseed
    out["counts"] = np.exp(rng.uniform(np.log(cfg.counts_range[0]), np.log(cfg.counts_range[1]), size=len(out["activity"])))
    return out


def simulate_subject(ctx: SimulationContext, subject: int, split: str) -> dict:
    """Simulate every image and sample of one subject; returns numpy arrays (see
    :mod:`fbsemlib.data.format` for the layout) plus metadata."""
    from fbsemlib.physics.forward_model import PETForwardModel, attenuation_factors
    from fbsemlib.physics.psf import gaussian_filter
    from fbsemlib.recon.algorithms import osem

    cfg = ctx.cfg
    dev = ctx.device
    P = ctx.projector
    ph = _phantom_images(ctx, subject)
    N = ph["activity"].shape[0]
    x = torch.from_numpy(ph["activity"]).to(dev)
    mu = torch.from_numpy(ph["mu_map"]).to(dev)
    n = ctx.normalisation
    with torch.no_grad():
        a = attenuation_factors(P, mu)  # (N, P, V, R)
        ax = (P(x) * a).double()  # attenuated trues, unit acquisition scale
        trues_unit = ax * n.double()
        T = trues_unit.sum(dim=(-3, -2, -1))
        sf, rf = cfg.scatter_fraction, cfg.randoms_fraction
        S = T * (sf / (1 - sf))
        R = (T + S) * (rf / (1 - rf))
        scat = gaussian_filter(ax, ctx.scatter_sigma_bins).clamp_min(0) * n.double()
        scat_sum = scat.sum(dim=(-3, -2, -1)).clamp_min(1e-300)
        n_sum = n.double().sum()
        counts = torch.as_tensor(ph["counts"], dtype=torch.float64, device=dev)
        scale = counts / (T + S + R)
        view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
        additive64 = view(scale * S / scat_sum) * scat + view(scale * R / n_sum) * n.double()
        mult = (view(scale) * (n.double() * a.double())).float()
        additive = additive64.float()
        model = PETForwardModel(P, mult, additive)
        ybar = model.expected(x)  # float32: exactly what the network's model computes
        # noise realisations
        R_ = cfg.noise_realisations[split]
        ys, img_idx, real, seeds = [], [], [], []
        for i in range(N):
            for r in range(R_):
                sd = _int_seed(_ss(cfg, 2, subject, 2, i, r))
                g = torch.Generator(device=dev).manual_seed(sd)
                ys.append(torch.poisson(ybar[i], generator=g))
                img_idx.append(i)
                real.append(r)
                seeds.append(sd)
        y = torch.stack(ys)
        # iteration-dependent targets: OSEM sub-iterates of the noise-free data
        _, its = osem(model, ybar, cfg.num_iterations, cfg.num_subsets, return_iterates=True)
        targets = torch.stack(its, dim=1)  # (N, K, Z, Y, X)
        del its
        # high-count reference
        hc = torch.as_tensor(cfg.high_count, dtype=torch.float64, device=dev) / counts
        hc_model = PETForwardModel(P, (view(hc) * mult.double()).float(), (view(hc) * additive64).float())
        ybar_hc = hc_model.expected(x).double()
        y_hc = []
        for i in range(N):
            g = torch.Generator(device=dev).manual_seed(_int_seed(_ss(cfg, 2, subject, 3, i)))
            y_hc.append(torch.poisson(ybar_hc[i], generator=g))
        y_hc = torch.stack(y_hc).float()
        target_final = osem(hc_model, y_hc, cfg.ref_iterations, cfg.ref_subsets)
    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return dict(
        subject=subject, split=split, phantom_seed=ph["phantom_seed"],
        images=dict(
            activity=ph["activity"], mu_map=ph["mu_map"], mr=ph["mr"], brain_mask=ph["brain_mask"],
            lesion_mask_pet=ph["lesion_mask_pet"], lesion_mask_mr=ph["lesion_mask_mr"],
            targets=cpu(targets).astype(np.float32), target_final=cpu(target_final).astype(np.float32),
            slice_index=np.asarray(ph["slice_index"], np.int64), rotation_deg=np.asarray(ph["rotation_deg"], np.float64),
            counts=np.asarray(ph["counts"], np.float64), trues=cpu(T * scale).astype(np.float64),
            scale=cpu(scale).astype(np.float64), seed=np.full(N, ph["phantom_seed"], np.int64),
        ),
        lesion_info=ph["lesion_info"], phantom_params=ph["phantom_params"],
        sinograms=dict(
            multiplicative=cpu(mult), attenuation=cpu(a).astype(np.float32), additive=cpu(additive),
            ybar=cpu(ybar).astype(np.float32),
        ),
        samples=dict(
            y=cpu(y).astype(np.float32), image_index=np.asarray(img_idx, np.int64),
            realisation=np.asarray(real, np.int64), seed=np.asarray(seeds, np.int64),
            total_counts=cpu(y.double().sum(dim=(-3, -2, -1))),
        ),
    )


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------
def _versions() -> dict:
    import h5py
    import scipy

    from fbsemlib import __version__

    v = {"python": platform.python_version(), "fbsemlib": __version__, "torch": torch.__version__,
         "numpy": np.__version__, "scipy": scipy.__version__, "h5py": h5py.__version__,
         "hdf5": h5py.version.hdf5_version}
    try:
        import nilearn

        v["nilearn"] = nilearn.__version__
    except Exception:  # pragma: no cover
        pass
    return v


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _dumps(o) -> str:
    return json.dumps(o, sort_keys=True, default=_json_default)


def _common_attrs(ctx: SimulationContext, h: str) -> dict:
    from fbsemlib import __version__

    return dict(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, recipe_hash=h, recipe=_dumps(to_dict(ctx.cfg)),
        geometry=_dumps(ctx.geometry.to_dict()), grid=_dumps(ctx.grid.to_dict()),
        num_iterations=ctx.cfg.num_iterations, num_subsets=ctx.cfg.num_subsets,
        fbsemlib_version=__version__, library_versions=_dumps(_versions()),
    )


def _write_subject(path: Path, res: dict, ctx: SimulationContext, h: str) -> None:
    import h5py

    comp = ctx.cfg.compression
    kw = {} if comp == "none" else ({"compression": "gzip", "compression_opts": 4, "shuffle": True}
                                    if comp == "gzip" else {"compression": "lzf", "shuffle": True})
    tmp = path.with_name(path.name + ".part")
    with h5py.File(tmp, "w", track_order=True) as f:
        for k, v in _common_attrs(ctx, h).items():
            f.attrs[k] = v
        N = res["images"]["activity"].shape[0]
        S = res["samples"]["y"].shape[0]
        f.attrs.update(subject=int(res["subject"]), split=res["split"], subject_seed=int(res["phantom_seed"]),
                       num_images=N, num_samples=S,
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

        def put(group, name, arr):
            arr = np.ascontiguousarray(arr)
            if arr.ndim >= 3:
                chunks = (1,) + arr.shape[1:]
                group.create_dataset(name, data=arr, chunks=chunks, **kw)
            else:
                group.create_dataset(name, data=arr)

        g = f.create_group("images")
        for k, v in res["images"].items():
            put(g, k, v)
        g.attrs["lesion_info"] = _dumps(res["lesion_info"])
        g.attrs["phantom_params"] = _dumps(res["phantom_params"])
        g = f.create_group("sinograms")
        for k, v in res["sinograms"].items():
            put(g, k, v)
        g.create_dataset("normalisation", data=ctx.normalisation.cpu().numpy().astype(np.float32))
        g.create_dataset("crystal_efficiencies", data=np.asarray(ctx.crystal_efficiencies, np.float64))
        g = f.create_group("samples")
        for k, v in res["samples"].items():
            put(g, k, v)
        f.attrs["complete"] = 1
    os.replace(tmp, path)


def _subject_file_ok(path: Path, h: str) -> bool:
    """A finished subject file of this recipe (for resuming)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("recipe_hash") == h and int(f.attrs.get("complete", 0)) == 1 and "samples/y" in f
    except Exception:
        return False


def _dir_size(p: Path) -> int:
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


def _check_out(out: Path, h: str, overwrite: bool) -> DatasetInfo | None:
    """Decide what to do with an existing ``out``; returns a reusable dataset or None."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} exists and is not a folder")
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise ConfigError(f"output folder {str(out)!r} exists, is not empty and is not a dataset: refusing to "
                              f"write there (choose another --out)")
        return None
    if overwrite:
        return None
    try:
        info = validate_dataset(out)
    except DatasetError as e:
        raise ConfigError(f"output folder {str(out)!r} holds an invalid dataset ({e}); use --overwrite to replace it")
    if info.recipe_hash != h:
        raise ConfigError(f"output folder {str(out)!r} holds a dataset of another recipe (hash "
                          f"{info.recipe_hash[:12]} != {h[:12]}); use --overwrite or another --out")
    return info


def simulate_dataset(
    cfg: DataConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    log=None,
) -> DatasetInfo:
    """Simulate (or reuse) the dataset of recipe ``cfg`` in folder ``out``.

    Returns the dataset's :class:`~fbsemlib.data.format.DatasetInfo`; its ``summary()`` holds
    subjects per split, samples, count range, disk size, time and whether it was reused."""
    from tqdm import tqdm

    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    out = Path(out)
    h = recipe_hash(cfg)
    reuse = _check_out(out, h, overwrite)
    if reuse is not None:
        say(f"reusing the complete dataset in {out} (same recipe, hash {h[:12]}; --overwrite to regenerate)")
        reuse.manifest.setdefault("summary", {})["reused"] = True
        return reuse
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder's parent {str(parent)!r}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {str(out)!r} cannot be written: {str(parent)!r} is not writable")
    tmp = parent / f"{out.name}.tmp-{h[:12]}"
    try:
        tmp.mkdir(exist_ok=True)
        (tmp / "recipe.json").write_text(_dumps({"recipe_hash": h, "recipe": to_dict(cfg)}) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write into {str(tmp)!r}: {e.strerror or e}") from None

    splits = split_subjects(cfg)
    split_of = {i: s for s, ids in splits.items() for i in ids}
    ctx = SimulationContext(cfg, device)
    resumed = 0
    bar = tqdm(total=cfg.num_subjects, desc=f"simulate {cfg.name}", unit="subject", disable=not progress)
    try:
        for i in range(cfg.num_subjects):
            fp = tmp / f"subject-{i:04d}.h5"
            if fp.exists() and _subject_file_ok(fp, h):
                resumed += 1
            else:
                res = simulate_subject(ctx, i, split_of[i])
                _write_subject(fp, res, ctx, h)
                del res
            bar.update()
    finally:
        bar.close()
    if resumed:
        say(f"resumed: {resumed} subject file(s) from an interrupted run were reused")

    # manifest (last)
    import h5py

    files = {}
    cmin, cmax, n_img, n_smp = math.inf, -math.inf, 0, 0
    per_split = {s: {"subjects": 0, "images": 0, "samples": 0} for s in SPLITS}
    for i in range(cfg.num_subjects):
        fp = tmp / f"subject-{i:04d}.h5"
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
    from fbsemlib import __version__

    elapsed = time.perf_counter() - t0
    manifest = dict(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, fbsemlib_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        recipe_hash=h, recipe=to_dict(cfg), seed=cfg.seed,
        geometry=ctx.geometry.to_dict(), grid=ctx.grid.to_dict(), psf_fwhm_mm=cfg.psf_fwhm_mm,
        num_iterations=cfg.num_iterations, num_subsets=cfg.num_subsets, num_modules=cfg.K,
        splits=splits, files=files, library_versions=_versions(),
        seeds={"master": cfg.seed, "scheme": "numpy SeedSequence(seed, spawn_key): (0,) efficiencies, "
               "(1,) split permutation, (2, subject, 0) phantom, (2, subject, 1) counts/rotations, "
               "(2, subject, 2, image, realisation) Poisson noise, (2, subject, 3, image) high-count noise"},
        summary=dict(splits=per_split, images=n_img, samples=n_smp, counts_min=cmin, counts_max=cmax,
                     disk_bytes=sum(v["size"] for v in files.values()), seconds=round(elapsed, 2),
                     resumed_subjects=resumed, reused=False),
    )
    mp = tmp / MANIFEST
    mp_part = tmp / (MANIFEST + ".part")
    mp_part.write_text(json.dumps(manifest, indent=1, default=_json_default) + "\n")
    os.replace(mp_part, mp)
    (tmp / "recipe.json").unlink(missing_ok=True)
    # move into place
    if out.exists():
        old = parent / f"{out.name}.old-{h[:12]}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return DatasetInfo(out, manifest)


def cached_dataset(cfg: DataConfig, root: str | os.PathLike | None = None, *, progress: bool = True,
                   device: str | torch.device = "cpu", log=None) -> DatasetInfo:
    """The dataset of recipe ``cfg`` in ``root/<name>-<recipe hash[:12]>`` (default root:
    :func:`default_data_root`), simulated on first use and reused afterwards (a corrupted
    cached copy is regenerated)."""
    root = Path(root) if root is not None else default_data_root()
    out = root / f"{cfg.name}-{recipe_hash(cfg)[:12]}"
    overwrite = False
    if (out / MANIFEST).exists():
        try:
            info = validate_dataset(out, recipe_hash=recipe_hash(cfg))
            info.manifest.setdefault("summary", {})["reused"] = True
            return info
        except DatasetError as e:
            (log or (lambda m: None))(f"cached dataset {out} is invalid ({e}): regenerating it")
            overwrite = True
    return simulate_dataset(cfg, out, overwrite=overwrite, progress=progress, device=device, log=log)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or u == "TiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_simulate(args) -> int:
    """``fbsem simulate --config FILE --out DIR [--seed N] [--overwrite] [--no-progress]``."""
    from fbsemlib.errors import UserError

    cfg = load_data_config(args.config, seed=args.seed)
    device = os.environ.get("FBSEM_SIMULATE_DEVICE", "cpu")
    try:
        info = simulate_dataset(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                                device=device, log=lambda m: print(m, file=sys.stderr))
    except PermissionError as e:
        raise UserError(f"output folder {args.out!r} cannot be written: {e}") from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"output folder {args.out!r} cannot be written: {e}") from None
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left while writing {args.out!r} ({e}); the finished subjects stay in "
                            f"{args.out}.tmp-*: free some space and rerun to resume") from None
        raise
    s = info.summary()
    sp = s.get("splits", {})
    print(f"dataset: {info.path} ({'reused' if s.get('reused') else 'simulated'}, recipe {cfg.name!r}, "
          f"hash {info.recipe_hash[:12]})")
    g, grid = info.geometry, info.grid
    print(f"  geometry: {g.scanner.name} sinogram {tuple(g.shape)} (planes, views, radial), image {grid.shape} "
          f"voxels {grid.voxel_size_mm} mm; K = {info.num_iterations} x {info.num_subsets} = {info.num_modules}")
    for name in SPLITS:
        d = sp.get(name, {})
        print(f"  {name:>10}: {d.get('subjects', 0)} subjects, {d.get('images', 0)} images, "
              f"{d.get('samples', 0)} samples")
    if "counts_min" in s:
        print(f"  counts per sample: {s['counts_min']:.3g} .. {s['counts_max']:.3g} (expected total); "
              f"high-count reference {cfg.high_count:.3g}")
    size = s.get("disk_bytes", _dir_size(info.path))
    print(f"  disk: {_fmt_bytes(size)}; time: {s.get('seconds', 0.0):.1f} s"
          + (f" (resumed {s['resumed_subjects']} subjects)" if s.get("resumed_subjects") else ""))
    return 0
