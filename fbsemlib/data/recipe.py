"""The simulation recipe: :class:`DataConfig` (the ``data:`` section of an experiment
file), its validation, and :func:`recipe_hash`, the key of a simulated dataset.

The recipe fixes everything that is simulated (see :mod:`fbsemlib.data.simulate`): the same
recipe and seed give bit-identical data. :func:`recipe_hash` hashes the canonical JSON of
the recipe together with the format name and version of :mod:`fbsemlib.data.schema`, so a
cached dataset is reused exactly when its recipe and format are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field

from fbsemlib.config import ConfigError, check_limit, from_dict, load_section, to_dict
from fbsemlib.data.phantoms import PhantomConfig
from fbsemlib.data.schema import FORMAT_NAME, FORMAT_VERSION, SPLITS
from fbsemlib.physics.geometry import SCANNER_PRESETS, ImageGrid, SinogramGeometry, sinogram_preset
from fbsemlib.provenance import is_int, is_number

__all__ = ["DataConfig", "load_data_config", "recipe_hash", "COMPRESSION", "BACKGROUNDS"]

#: the HDF5 compressions a recipe may ask for
COMPRESSION = ("gzip", "lzf", "none")


def _finite_number(v) -> bool:
    """A finite real number (not a bool)."""
    return is_number(v) and math.isfinite(float(v))


#: a recipe's ``name``: a folder name under the data root, never a path
#: what the reconstruction is told of attenuation and background (see DataConfig)
BACKGROUNDS = ("exact", "estimated")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")

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
    What the reconstruction is told (no inverse crime)
        simulation_oversampling: the phantom is drawn and projected on a grid this many
            times finer in-plane (same field of view); the reconstruction grid sees its
            block averages. 1 simulates on the reconstruction grid with its own projector
            (an inverse crime; the smoke profile's choice, for speed).
        background: ``exact`` tells the reconstruction the true attenuation and expected
            scatter + randoms; ``estimated`` tells it what a reconstruction could estimate:
            attenuation from the reconstruction-grid mu-map, scatter simulated from the
            reconstruction-grid images and scaled to the true scatter total (a perfect
            tail fit), randoms from their variance-reduced (flat, efficiency-weighted)
            estimate.
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
    simulation_oversampling: int = 1
    background: str = "exact"
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
        if not _NAME.fullmatch(self.name):
            raise err(f"name must be a plain name (letters, digits, '.', '_', '-'; at most 100, not starting with "
                      f"'.' or '-'): it names a folder under the data root, got {self.name!r}")
        # -- geometry
        if self.scanner not in SCANNER_PRESETS:
            raise err(f"unknown scanner preset {self.scanner!r}; choose one of {sorted(SCANNER_PRESETS)}")
        if self.num_rings is not None and (not is_int(self.num_rings) or self.num_rings < 1):
            raise err(f"num_rings must be a positive integer or null, got {self.num_rings!r}")
        if self.max_ring_difference is not None and (not is_int(self.max_ring_difference)
                                                     or self.max_ring_difference < 0):
            raise err(f"max_ring_difference must be a non-negative integer or null, got {self.max_ring_difference!r}")
        shp = tuple(self.image_shape)
        if len(shp) != 3 or not all(is_int(n) and n >= 1 for n in shp):
            raise err(f"image_shape must be three positive integers (Z, Y, X), got {self.image_shape!r}")
        self.image_shape = tuple(int(n) for n in shp)
        vs = tuple(self.voxel_size_mm)
        if len(vs) != 3 or not all(_finite_number(v) and v > 0 for v in vs):
            raise err(f"voxel_size_mm must be three positive numbers (dz, dy, dx), got {self.voxel_size_mm!r}")
        self.voxel_size_mm = tuple(float(v) for v in vs)
        if self.psf_fwhm_mm is not None:
            if not _finite_number(self.psf_fwhm_mm) or self.psf_fwhm_mm < 0:
                raise err(f"psf_fwhm_mm must be a non-negative number or null, got {self.psf_fwhm_mm!r}")
            self.psf_fwhm_mm = float(self.psf_fwhm_mm) if self.psf_fwhm_mm > 0 else None
        # -- subjects
        if not isinstance(self.phantom, dict):
            raise err(f"phantom must be a mapping of PhantomConfig keys, got {self.phantom!r}")
        self.phantom_config()  # validates
        if not is_int(self.num_subjects) or self.num_subjects < 1:
            raise err(f"num_subjects must be a positive integer, got {self.num_subjects!r}")
        self.split_counts()  # validates
        for k in ("slices_per_subject", "rotations_per_slice"):
            v = getattr(self, k)
            if not is_int(v) or v < 1:
                raise err(f"{k} must be a positive integer, got {v!r}")
        sr = tuple(self.slice_range_mm)
        if len(sr) != 2 or not all(_finite_number(v) for v in sr) or sr[0] > sr[1]:
            raise err(f"slice_range_mm must be (low, high) with low <= high, got {self.slice_range_mm!r}")
        self.slice_range_mm = (float(sr[0]), float(sr[1]))
        if not _finite_number(self.max_rotation_deg) or not 0 <= self.max_rotation_deg <= 180:
            raise err(f"max_rotation_deg must lie in [0, 180], got {self.max_rotation_deg!r}")
        self.max_rotation_deg = float(self.max_rotation_deg)
        if self.image_shape[0] > 1 and self.slices_per_subject != 1:
            raise err(f"slices_per_subject must be 1 for a 3D image (image_shape[0] = {self.image_shape[0]}), "
                      f"got {self.slices_per_subject}")
        # -- counts / physics
        cr = tuple(self.counts_range)
        if len(cr) != 2 or not all(_finite_number(v) and v > 0 for v in cr):
            raise err(f"counts_range must be two positive numbers (low, high), got {self.counts_range!r}")
        if cr[0] > cr[1]:
            raise err(f"counts_range must satisfy low <= high, got {self.counts_range!r}")
        self.counts_range = (float(cr[0]), float(cr[1]))
        if not _finite_number(self.high_count) or self.high_count <= 0:
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
            if not is_int(v) or v < 1:
                raise err(f"noise_realisations[{k!r}] must be a positive integer, got {v!r}")
        self.noise_realisations = {s: int(self.noise_realisations.get(s, 1)) for s in SPLITS}
        for k in ("scatter_fraction", "randoms_fraction"):
            v = getattr(self, k)
            if not _finite_number(v) or not 0 <= v < 1:
                raise err(f"{k} must lie in [0, 1), got {v!r}")
            setattr(self, k, float(v))
        for k in ("scatter_fwhm_mm", "scatter_fwhm_deg"):
            v = getattr(self, k)
            if not _finite_number(v) or v <= 0:
                raise err(f"{k} must be a positive number, got {v!r}")
            setattr(self, k, float(v))
        if not _finite_number(self.crystal_efficiency_spread) or not 0 <= self.crystal_efficiency_spread <= 1:
            raise err(f"crystal_efficiency_spread must lie in [0, 1], got {self.crystal_efficiency_spread!r}")
        self.crystal_efficiency_spread = float(self.crystal_efficiency_spread)
        # -- schedule
        M = self.num_subsets
        if not is_int(M) or M < 1:
            raise err(f"num_subsets must be a positive integer, got {M!r}")
        for k in ("num_iterations", "num_modules", "reference_iterations", "reference_subsets"):
            v = getattr(self, k)
            if v is not None and (not is_int(v) or v < 1):
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
        if not is_int(self.seed) or self.seed < 0:
            raise err(f"seed must be a non-negative integer, got {self.seed!r}")
        self._check_limits()
        if not is_int(self.simulation_oversampling) or not 1 <= self.simulation_oversampling <= 4:
            raise err(f"simulation_oversampling must be an integer in 1..4, got {self.simulation_oversampling!r}")
        self.simulation_oversampling = int(self.simulation_oversampling)
        if self.background not in BACKGROUNDS:
            raise err(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.compression not in COMPRESSION:
            raise err(f"compression must be one of {COMPRESSION}, got {self.compression!r}")
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

    def _check_limits(self) -> None:
        """Sizes, counts and the seed within :data:`fbsemlib.config.LIMITS` (a typo is refused
        before anything is allocated; what fits this machine: :meth:`memory_estimate_bytes`)."""
        try:
            for n in self.image_shape:
                check_limit("data.image_shape", n, "image_side")
            check_limit("data.num_subjects", self.num_subjects, "num_subjects")
            for k in ("slices_per_subject", "rotations_per_slice", "num_iterations"):
                check_limit(f"data.{k}", getattr(self, k), "per_subject")
            for k in ("num_modules", "reference_iterations", "reference_subsets"):
                if getattr(self, k) is not None:
                    check_limit(f"data.{k}", getattr(self, k), "num_modules")
            for v in self.noise_realisations.values():
                check_limit("data.noise_realisations", v, "noise_realisations")
            check_limit("data.seed", self.seed, "seed")
        except ConfigError as e:
            raise ConfigError(f"invalid section 'data': {e}") from None

    def memory_estimate_bytes(self) -> int:
        """A generous estimate of the memory one subject's simulation holds: per image and
        noise realisation the ``K`` targets and a few more images, and a few sinograms."""
        voxels = math.prod(self.image_shape)
        bins = math.prod(self.geometry().shape)
        per = voxels * (self.K + 8) + bins * 6
        return self.images_per_subject * max(self.noise_realisations.values()) * per * 4

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

    def simulation_grid(self) -> ImageGrid:
        """The grid the phantom is drawn and projected on: :meth:`grid` refined in-plane by
        ``simulation_oversampling`` (same centre and field of view; each reconstruction
        voxel is a block of ``f x f`` of its voxels)."""
        f = self.simulation_oversampling
        z, y, x = self.image_shape
        dz, dy, dx = self.voxel_size_mm
        return ImageGrid((z, y * f, x * f), (dz, dy / f, dx / f))

    def phantom_config(self) -> PhantomConfig:
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
            if not _finite_number(v) or v < 0:
                raise err(f"split[{k!r}] must be a non-negative number, got {v!r}")
        vals = {s: sp.get(s, 0) for s in SPLITS}
        N = self.num_subjects
        if all(is_int(v) for v in vals.values()):
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
    d = dict(load_section(path, "data"))
    if seed is not None:
        d["seed"] = seed
    return from_dict(DataConfig, d, "data")


def recipe_hash(cfg: DataConfig) -> str:
    """SHA-256 of the canonical JSON of the recipe (and the format name and version)."""
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "recipe": to_dict(cfg)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

