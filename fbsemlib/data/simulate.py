"""Simulated PET/MR training data for FBSEM-Net: from a recipe to a dataset folder.

A *recipe* (:class:`~fbsemlib.data.recipe.DataConfig`, the ``data:`` section of an
experiment YAML file such as ``data/smoke.yaml``, ``data/cpu.yaml``, ``data/paper.yaml``)
fixes everything; the same recipe and seed give bit-identical arrays.
:func:`simulate_dataset` writes the dataset folder described in
:mod:`fbsemlib.data.schema` (through the writer of :mod:`fbsemlib.data.format`);
:func:`cached_dataset` keeps one per recipe; ``fbsem simulate`` (:mod:`fbsemlib.cli.simulate`)
drives it.

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
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from fbsemlib.config import ConfigError, available_memory_bytes
from fbsemlib.errors import UserError
from fbsemlib.data.format import (
    DatasetError,
    DatasetInfo,
    dumps,
    DATASET_FILES,
    is_complete_subject_file,
    is_dataset_manifest,
    library_versions,
    manifest_files,
    RUN_LOG,
    subject_attrs,
    utc_now,
    validate_dataset,
    write_manifest,
    write_subject,
)
from fbsemlib.data.phantoms import make_subject
from fbsemlib.data.recipe import DataConfig, recipe_hash
from fbsemlib.data.schema import FORMAT_NAME, FORMAT_VERSION, MANIFEST, SPLITS, SUBJECT_FILE
from fbsemlib.outputs import LOCK_NAME, FolderLock, atomic_write_json, check_output_folder
from fbsemlib.data.resolution import block_labels, block_mask, block_mean
from fbsemlib.physics.cache import shared_projector
from fbsemlib.physics.forward_model import PETForwardModel, attenuation_factors, normalisation_factors
from fbsemlib.physics.psf import FWHM_TO_SIGMA, gaussian_filter
from fbsemlib.recon.algorithms import osem

__all__ = [
    "split_subjects",
    "SimulationContext",
    "simulate_subject",
    "simulate_dataset",
    "cached_dataset",
    "default_data_root",
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


# ----------------------------------------------------------------------------------------
# seeds and splits
# ----------------------------------------------------------------------------------------
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
class SimulationContext:
    """What all subjects share: geometry, grid, projector, normalisation (one scanner)."""

    def __init__(self, cfg: DataConfig, device="cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.geometry = cfg.geometry()
        self.grid = cfg.grid()
        # the process-wide projector: its system matrices (and its subsets') are built once
        self.projector = shared_projector(self.geometry, self.grid, device=self.device, backend="torch",
                                          psf_fwhm_mm=cfg.psf_fwhm_mm)
        # the phantom's grid and projector (the same as the reconstruction's without oversampling)
        self.oversampling = cfg.simulation_oversampling
        self.simulation_grid = cfg.simulation_grid()
        self.simulation_projector = self.projector if self.oversampling == 1 else shared_projector(
            self.geometry, self.simulation_grid, device=self.device, backend="torch", psf_fwhm_mm=cfg.psf_fwhm_mm)
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
    fine = {"activity": [], "mu_map": []}  # on the simulation grid
    for j, h in enumerate(heights):
        pcfg = ctx.phantom_config if h is None else dataclasses.replace(ctx.phantom_config, slice_z_mm=float(h))
        ph = make_subject(ctx.simulation_grid, pseed, pcfg)
        base = dict(
            activity=ph.activity.cpu().numpy().astype(np.float32),
            mu_map=ph.mu_map.cpu().numpy().astype(np.float32),
            mr=ph.mr.cpu().numpy().astype(np.float32),
            brain_mask=ph.brain_mask.cpu().numpy().astype(np.uint8),
            lesion_mask_pet=_lesion_labels(ph.lesion_masks_pet.cpu().numpy(), ctx.simulation_grid.shape),
            lesion_mask_mr=_lesion_labels(ph.lesion_masks_mr.cpu().numpy(), ctx.simulation_grid.shape),
        )
        f = ctx.oversampling
        for r in range(Rn):
            ang = float(angles[j, r])
            for k in keys:
                order = 1 if base[k].dtype == np.float32 else 0
                v = _rotate(base[k], ang, order)
                if order == 1:
                    v = np.clip(v, 0, None).astype(np.float32)
                    if k in ("activity", "mu_map"):  # what the data are simulated from
                        fine[k].append(v)
                    v = block_mean(v, f)
                else:
                    v = block_labels(v, f) if k.startswith("lesion") else block_mask(v, f)
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
    out["fine"] = {k: np.stack(v) for k, v in fine.items()}
    out["phantom_seed"] = pseed
    out["counts"] = np.exp(rng.uniform(np.log(cfg.counts_range[0]), np.log(cfg.counts_range[1]), size=len(out["activity"])))
    return out


def simulate_subject(ctx: SimulationContext, subject: int, split: str) -> dict:
    """Simulate every image and sample of one subject; returns numpy arrays (see
    :mod:`fbsemlib.data.schema` for the layout) plus metadata."""
    cfg = ctx.cfg
    dev = ctx.device
    P = ctx.projector
    ph = _phantom_images(ctx, subject)
    N = ph["activity"].shape[0]
    x = torch.from_numpy(ph["activity"]).to(dev)
    n = ctx.normalisation
    with torch.no_grad():
        # the truth: the phantom on the simulation grid, projected with its own projector
        Pf = ctx.simulation_projector
        x_f = torch.from_numpy(ph["fine"]["activity"]).to(dev)
        a_true = attenuation_factors(Pf, torch.from_numpy(ph["fine"]["mu_map"]).to(dev))  # (N, P, V, R)
        ax = (Pf(x_f) * a_true).double()  # attenuated trues, unit acquisition scale
        trues_unit = ax * n.double()
        T = trues_unit.sum(dim=(-3, -2, -1))
        sf, rf = cfg.scatter_fraction, cfg.randoms_fraction
        S = T * (sf / (1 - sf))
        R = (T + S) * (rf / (1 - rf))
        n_sum = n.double().sum()
        counts = torch.as_tensor(ph["counts"], dtype=torch.float64, device=dev)
        scale = counts / (T + S + R)
        view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731

        def background(attenuated_trues):  # scatter (scaled to the total S) + flat randoms
            scat = gaussian_filter(attenuated_trues, ctx.scatter_sigma_bins).clamp_min(0) * n.double()
            scat_sum = scat.sum(dim=(-3, -2, -1)).clamp_min(1e-300)
            return view(scale * S / scat_sum) * scat + view(scale * R / n_sum) * n.double()

        true_additive64 = background(ax)
        ybar64 = view(scale) * n.double() * ax + true_additive64  # expected data
        ybar = ybar64.float()
        # what the reconstruction is told (DataConfig.background): the attenuation of its own
        # grid's mu-map (the true one without oversampling) and the true or estimated background
        a = a_true if ctx.oversampling == 1 else attenuation_factors(P, torch.from_numpy(ph["mu_map"]).to(dev))
        additive64 = true_additive64 if cfg.background == "exact" else background((P(x) * a).double())
        mult = (view(scale) * (n.double() * a.double())).float()
        additive = additive64.float()
        model = PETForwardModel(P, mult, additive)
        inverse_crime = ctx.oversampling == 1 and cfg.background == "exact"  # the model is the truth
        if inverse_crime:
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
        if inverse_crime:
            ybar_hc = hc_model.expected(x).double()
        else:  # the same scan, high_count / counts times longer
            ybar_hc = view(hc) * ybar64
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
# the dataset folder
# ----------------------------------------------------------------------------------------
def _check_out(out: Path, h: str, overwrite: bool) -> DatasetInfo | None:
    """Apply the output-folder rule to ``out``; returns a reusable dataset or None (write).

    ``overwrite`` replaces only a folder recognisably a dataset (its manifest names this
    format); anything else is refused whatever the flag."""
    try:
        state = check_output_folder(out, "dataset", DATASET_FILES)
    except UserError as e:
        raise ConfigError(str(e)) from None  # simulate_dataset's errors stay ConfigErrors (ValueErrors)
    if state != "own":
        return None
    if not is_dataset_manifest(out):
        raise ConfigError(f"output folder {str(out)!r} is not an fbsemlib dataset (no {MANIFEST} of this format): "
                          "refusing to write there, --overwrite included; choose another --out")
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
    need, avail = cfg.memory_estimate_bytes(), available_memory_bytes()
    if avail is not None and need > avail:
        raise ConfigError(f"recipe {cfg.name!r} needs about {need / 2**30:.1f} GiB per subject and "
                          f"{avail / 2**30:.1f} GiB are available: reduce image_shape, the images per subject, "
                          "the noise realisations or num_modules")
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
    except OSError as e:
        raise ConfigError(f"cannot write into {str(tmp)!r}: {e.strerror or e}") from None
    with FolderLock(tmp, "the dataset being simulated in"):  # one simulation per folder; a killed one leaves none
        manifest = _simulate_into(tmp, cfg, h, device, progress, say, t0)
        (tmp / LOCK_NAME).unlink(missing_ok=True)
        _move_into_place(tmp, out, parent, h)
    return DatasetInfo(out, manifest)


def _simulate_into(tmp: Path, cfg: DataConfig, h: str, device, progress: bool, say, t0: float) -> dict:
    """Simulate every subject not yet complete in ``tmp`` and write the manifest; returns it."""
    from tqdm import tqdm

    try:
        (tmp / "recipe.json").write_text(dumps({"recipe_hash": h, "recipe": cfg.to_dict()}) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write into {str(tmp)!r}: {e.strerror or e}") from None
    splits = split_subjects(cfg)
    split_of = {i: s for s, ids in splits.items() for i in ids}
    ctx = SimulationContext(cfg, device)
    attrs = subject_attrs(cfg, h, ctx.geometry, ctx.grid)
    scanner = dict(normalisation=ctx.normalisation.cpu().numpy(), crystal_efficiencies=ctx.crystal_efficiencies)
    resumed = 0
    bar = tqdm(total=cfg.num_subjects, desc=f"simulate {cfg.name}", unit="subject", disable=not progress)
    try:
        for i in range(cfg.num_subjects):
            fp = tmp / SUBJECT_FILE.format(i)
            if fp.exists() and is_complete_subject_file(fp, h):
                resumed += 1
            else:
                res = simulate_subject(ctx, i, split_of[i])
                write_subject(fp, res, attrs, compression=cfg.compression, **scanner)
                del res
            bar.update()
    finally:
        bar.close()
    if resumed:
        say(f"resumed: {resumed} subject file(s) from an interrupted run were reused")

    # manifest (last)
    files, summary = manifest_files(tmp, split_of)
    lib = library_versions()
    elapsed = time.perf_counter() - t0
    manifest = dict(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, fbsemlib_version=lib["fbsemlib"],
        recipe_hash=h, recipe=cfg.to_dict(), seed=cfg.seed,
        geometry=ctx.geometry.to_dict(), grid=ctx.grid.to_dict(), psf_fwhm_mm=cfg.psf_fwhm_mm,
        num_iterations=cfg.num_iterations, num_subsets=cfg.num_subsets, num_modules=cfg.K,
        splits=splits, files=files, library_versions=lib,
        seeds={"master": cfg.seed, "scheme": "numpy SeedSequence(seed, spawn_key): (0,) efficiencies, "
               "(1,) split permutation, (2, subject, 0) phantom, (2, subject, 1) counts/rotations, "
               "(2, subject, 2, image, realisation) Poisson noise, (2, subject, 3, image) high-count noise"},
        summary=summary,
    )
    write_manifest(tmp, manifest)
    # the run's log, apart from the content (the manifest and the files stay byte-identical)
    atomic_write_json(tmp / RUN_LOG, dict(seconds=round(elapsed, 2), resumed_subjects=resumed, created=utc_now()))
    (tmp / "recipe.json").unlink(missing_ok=True)
    return manifest


def _move_into_place(tmp: Path, out: Path, parent: Path, h: str) -> None:
    """Rename the complete ``tmp`` to ``out`` (an existing ``out`` is renamed away first and
    removed after)."""
    if out.exists():
        old = parent / f"{out.name}.old-{h[:12]}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


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
