"""Benchmarks: numbers printed as a table and written as JSON (with machine info).

``fbsem bench projector|memory|training|simulation|all [--quick] [--out DIR]``.
Timings are medians over repeats, measured side by side in one run, and reported as
ratios where a comparison is the point (machines are noisy). ``--quick`` runs tiny
sizes (used by the tests to check that the scripts work, never to judge speed).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fbsemlib import __version__
from fbsemlib.outputs import atomic_write_json
from fbsemlib.physics import ImageGrid, ParallelBeamGeometry, Projector, parallelproj_available, sinogram_preset
from fbsembook.verdicts import (FLAT_FROM_K, FLAT_TOLERANCE, MEMORY_CLAIM, PROJECTOR_SPEEDUP_BATCH1,
                                PROJECTOR_SPEEDUP_BATCHN, TIME_RATIO_TARGET)

__all__ = ["machine_info", "time_callable", "bench_projector", "write_results", "cmd_bench", "RESULTS_DIR"]

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def machine_info() -> dict:
    """CPU, cores, memory, GPU and library versions."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fbsemlib": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "parallelproj": parallelproj_available(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    for mod in ("scipy", "astra"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


def time_callable(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: bool = False) -> dict:
    """Median and spread of the wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def write_results(name: str, rows: list[dict], out_dir: str | Path | None = None, extra: dict | None = None) -> Path:
    """Write ``{machine, rows, ...}`` to ``<out_dir>/<name>.json`` atomically."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = {"benchmark": name, "machine": machine_info(), "rows": rows, **(extra or {})}
    return atomic_write_json(path, doc)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------
# projector
# ----------------------------------------------------------------------------------------
def _astra_fwd_adj(num_views: int, num_radial: int, n: int):
    """ASTRA CPU Joseph (projector type 'linear') forward + back projection of one image."""
    try:
        import astra
    except Exception:
        return None
    vg = astra.create_vol_geom(n, n)
    pg = astra.create_proj_geom("parallel", 1.0, num_radial, np.linspace(0, np.pi, num_views, endpoint=False))
    pid = astra.create_projector("linear", pg, vg)

    def run(img: np.ndarray):
        sid, s = astra.create_sino(img, pid)
        bid, b = astra.create_backprojection(s, pid)
        astra.data2d.delete(sid)
        astra.data2d.delete(bid)
        return s, b

    return run


def _scipy_csr(P: Projector):
    """The projector's float32 system matrix and its transpose as SciPy CSR matrices."""
    from fbsemlib.physics._joseph import JosephSampler, _scipy_csr

    s, e = P.lor_endpoints()
    A = _scipy_csr(JosephSampler(s, e, P.grid), torch.float32)
    return A, A.T.tocsr()


MMR_RING_SPACING_MM = 4.0625
MMR_3D_MAX_RING_DIFFERENCE = 10  # 1234 planes: ~7 s forward + adjoint on 2 cores, 4.6 GiB of matrices
MATRIX_BUDGET_3D_BYTES = 8 << 30


def bench_projector(quick: bool = False, device: str | None = None, repeats: int | None = None) -> list[dict]:
    """Forward + adjoint time per image (float32) at batch 1 and 16.

    2D: a 128 x 128 parallel-beam geometry (180 views x 185 bins, 1 mm) -- torch matrix,
    torch on-the-fly, scipy CSR and ASTRA's CPU Joseph -- and the 2D mMR geometry.
    3D (CPU and CUDA): the full 64-ring mMR (span 1, ring difference <= 10) with the
    axial-segment path, and an 8-ring slab where the segment path and the on-the-fly path
    are timed side by side (``speedup_vs_on_the_fly``).
    """
    reps = repeats or (2 if quick else 7)
    rows: list[dict] = []
    n, nv, nb = (32, 45, 47) if quick else (128, 180, 185)
    batches = (1, 4) if quick else (1, 16)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and device in (None, "cuda") else [])

    # ---- 2D parallel beam vs ASTRA and scipy
    geo = ParallelBeamGeometry(nv, nb, 1.0)
    grid = ImageGrid((1, n, n), (1.0, 1.0, 1.0))
    astra_run = _astra_fwd_adj(nv, nb, n)
    t_astra = None
    if astra_run is not None:
        img = np.random.default_rng(0).random((n, n)).astype(np.float32)
        t_astra = time_callable(lambda: astra_run(img), reps)["median_s"]
        rows.append(dict(case=f"2D parallel {n}x{n}, {nv}x{nb}", impl="astra-cpu-joseph", device="cpu", batch=1,
                         s_per_image=t_astra, ratio_to_astra=1.0))
    P0 = Projector(geo, grid, backend="torch", method="matrix")
    A, At = _scipy_csr(P0)
    for B in batches:
        X = np.random.default_rng(1).random((grid.num_voxels, B)).astype(np.float32)
        t = time_callable(lambda: At @ (A @ X), reps)["median_s"] / B
        rows.append(dict(case=f"2D parallel {n}x{n}, {nv}x{nb}", impl="scipy-csr", device="cpu", batch=B, s_per_image=t,
                         ratio_to_astra=(t_astra / t) if t_astra else None))
    for dev in devices:
        for method in ("matrix", "on-the-fly"):
            P = Projector(geo, grid, backend="torch", method=method, device=dev)
            for B in batches:
                x = torch.rand(B, 1, n, n, device=dev)
                t = time_callable(lambda: P.adjoint(P(x)), reps, sync=dev == "cuda")["median_s"] / B
                rows.append(dict(case=f"2D parallel {n}x{n}, {nv}x{nb}", impl=f"fbsemlib-torch-{method}", device=dev, batch=B,
                                 s_per_image=t, ratio_to_astra=(t_astra / t) if t_astra else None))

    # ---- 2D mMR
    sino = sinogram_preset("tiny2d" if quick else "mmr2d")
    g2 = ImageGrid((1, 32, 32), (2.0, 6.0, 6.0)) if quick else ImageGrid((1, 172, 172), (2.031, 2.086, 2.086))
    for dev in devices:
        for method in ("matrix", "on-the-fly"):
            t0 = time.perf_counter()
            P = Projector(sino, g2, backend="torch", method=method, device=dev)
            P(torch.rand(1, *g2.shape, device=dev))
            setup = time.perf_counter() - t0
            for B in batches:
                x = torch.rand(B, *g2.shape, device=dev)
                t = time_callable(lambda: P.adjoint(P(x)), reps, sync=dev == "cuda")["median_s"] / B
                rows.append(dict(case=f"2D mMR {g2.shape[1]}x{g2.shape[2]}, {sino.shape[1]}x{sino.shape[2]}",
                                 impl=f"fbsemlib-torch-{method}", device=dev, batch=B, s_per_image=t, setup_s=setup))
    if parallelproj_available():  # its CPU kernels next to the torch rows above: same case and batches
        P = Projector(sino, g2, backend="parallelproj")
        case = f"2D mMR {g2.shape[1]}x{g2.shape[2]}, {sino.shape[1]}x{sino.shape[2]}"
        for B in batches:
            x = torch.rand(B, *g2.shape)
            y = P(x)
            tf = time_callable(lambda: P(x), reps)["median_s"] / B
            ta = time_callable(lambda: P.adjoint(y), reps)["median_s"] / B
            matrix = [r["s_per_image"] for r in rows if r["case"] == case and r["batch"] == B
                      and r["impl"] == "fbsemlib-torch-matrix" and r["device"] == "cpu"]
            rows.append(dict(case=case, impl="parallelproj", device="cpu", batch=B, s_per_image=tf + ta, forward_s=tf,
                             adjoint_s=ta, ratio_to_torch_matrix=(tf + ta) / matrix[0] if matrix else None))

    # ---- 3D mMR: the axial-segment path on the full scanner, and against on-the-fly on a slab
    if quick:
        slab = (sinogram_preset("small3d", num_rings=4, max_ring_difference=1), ImageGrid((8, 24, 24), (2.0, 8.0, 8.0)))
        full = (sinogram_preset("small3d", num_rings=6, max_ring_difference=2), ImageGrid((12, 24, 24), (2.0, 8.0, 8.0)))
    else:
        # mMR voxels: z = half the ring spacing (4.0625 / 2), so rings sit on voxel slices and
        # every plane of a ring difference is an axial shift of one reference plane
        vox = (MMR_RING_SPACING_MM / 2, 2.08626, 2.08626)
        # an 8-ring slab (span 1, ring difference <= 1): 22 planes, 15 x 172 x 172 voxels
        slab = (sinogram_preset("mmr", num_rings=8, max_ring_difference=1), ImageGrid((15, 172, 172), vox))
        # the full 64-ring scanner (127 x 172 x 172 voxels), span 1, ring difference <= 10
        full = (sinogram_preset("mmr", max_ring_difference=MMR_3D_MAX_RING_DIFFERENCE), ImageGrid((127, 172, 172), vox))
    reps3 = reps if quick else 3
    for dev in devices:
        slab_t = {}
        for which, (sino3, g3) in (("slab", slab), ("full", full)):
            methods = ("on-the-fly", "segments") if which == "slab" else ("segments",)
            for method in methods:
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                t0 = time.perf_counter()
                P = Projector(sino3, g3, backend="torch", method=method, device=dev,
                              matrix_budget_bytes=MATRIX_BUDGET_3D_BYTES)
                x = torch.rand(1, *g3.shape, device=dev)
                if method == "segments":
                    y = P(x)  # builds (and caches) the per-segment matrices
                    setup = time.perf_counter() - t0
                    tf = time_callable(lambda: P(x), reps3, warmup=0, sync=dev == "cuda")["median_s"]
                else:  # slow: one timed call after one warm-up call
                    setup = time.perf_counter() - t0
                    tf = time_callable(lambda: P(x), 1 if not quick else reps3, warmup=1, sync=dev == "cuda")["median_s"]
                    y = P(x)
                ta = time_callable(lambda: P.adjoint(y), 1 if method == "on-the-fly" and not quick else reps3,
                                   warmup=0, sync=dev == "cuda")["median_s"]
                row = dict(case=f"3D mMR {which} {g3.shape}, sinogram {sino3.shape}", impl=f"fbsemlib-torch-{method}",
                           device=dev, batch=1, s_per_image=tf + ta, forward_s=tf, adjoint_s=ta, setup_s=setup,
                           num_rings=sino3.scanner.num_rings, max_ring_difference=sino3.max_ring_difference,
                           planes=sino3.num_planes, image_shape=list(g3.shape), load_avg_1min=load)
                if method == "segments":
                    row.update(matrix_bytes=P._seg.cached_bytes, matrix_nnz=P.matrix_nnz(),
                               segments_rebuilt_per_call=len(P._seg._rebuilt))
                if which == "slab":
                    slab_t[method] = tf + ta
                    if method == "segments":
                        row["speedup_vs_on_the_fly"] = slab_t["on-the-fly"] / (tf + ta)
                rows.append(row)
                del P, y
    # its CPU kernels on the same slab, forward and adjoint. Not on the full scanner: the backend
    # precomputes per-LOR sampling data for all 107 M LORs (over 20 GiB), more than this machine has
    if parallelproj_available():
        for which, (sino3, g3) in (("slab", slab),):
            P = Projector(sino3, g3, backend="parallelproj")
            x = torch.rand(1, *g3.shape)
            y = P(x)
            tf = time_callable(lambda: P(x), reps3 if quick else 1, warmup=0)["median_s"]
            ta = time_callable(lambda: P.adjoint(y), reps3 if quick else 1, warmup=0)["median_s"]
            rows.append(dict(case=f"3D mMR {which} {g3.shape}, sinogram {sino3.shape}", impl="parallelproj", device="cpu",
                             batch=1, s_per_image=tf + ta, forward_s=tf, adjoint_s=ta))
            del P, y
    return rows


PROJECTOR_COLUMNS = ["case", "impl", "device", "batch", "s_per_image", "ratio_to_astra"]


def run_projector(quick: bool, out: str | None, device: str | None) -> Path:
    rows = bench_projector(quick=quick, device=device)
    print_table(rows, PROJECTOR_COLUMNS)
    targets = {}
    ast = {r["batch"]: r["ratio_to_astra"] for r in rows if r["impl"] == "fbsemlib-torch-matrix" and r["device"] == "cpu"
           and r.get("ratio_to_astra")}
    if ast:
        b1, bN = min(ast), max(ast)
        targets = {"speedup_vs_astra_batch1": ast[b1], "speedup_vs_astra_batchN": ast[bN],
                   "target_batch1": PROJECTOR_SPEEDUP_BATCH1, "target_batch16": PROJECTOR_SPEEDUP_BATCHN,
                   "met_batch1": ast[b1] >= PROJECTOR_SPEEDUP_BATCH1, "met_batch16": ast[bN] >= PROJECTOR_SPEEDUP_BATCHN}
        print(json.dumps(targets))
    return write_results("projector" + ("_quick" if quick else ""), rows, out, {"targets": targets})


# ----------------------------------------------------------------------------------------
# training memory against K
# ----------------------------------------------------------------------------------------
MEMORY_KS = (1, 2, 5, 10, 20, 40, 60)


def bench_memory(quick: bool = False, device: str | None = None) -> list[dict]:
    """Peak memory of one training step for K unrolled modules, three modes: 2D (the
    ``cpu`` profile's problem) and a small 3D volume on CPU; the paper-sized 3D volume on
    CUDA when a GPU is present."""
    from fbsemlib.training.memory import measure_training_memory, memory_problem
    from fbsembook.experiments import profile_path

    Ks = (1, 2, 5) if quick else MEMORY_KS
    cases = []
    if quick:
        cases.append(("2D smoke", "cpu", dict(config=None, dims="2d", width=4, depth=3)))
        cases.append(("3D small", "cpu", dict(config=None, dims="3d", width=4, depth=3)))
    else:
        cases.append(("2D cpu profile", "cpu", dict(config=str(profile_path("cpu")), dims="2d")))
        cases.append(("3D small (small3d, 8x48x48)", "cpu",
                      dict(config=None, dims="3d", preset="small3d", image_shape=(8, 48, 48), width=16, depth=5)))
        if torch.cuda.is_available() and device in (None, "cuda"):
            cases.append(("3D paper-sized (mMR slab 127x172x172)", "cuda",
                          dict(config=None, dims="3d", preset="mmr", max_ring_difference=2,
                               image_shape=(127, 172, 172), batch_size=1, width=32, depth=5,
                               projector_method="on-the-fly")))
    rows = []
    for name, dev, kw in cases:
        cfg = kw.pop("config")
        prob = memory_problem(cfg, device=dev, **kw)
        oom: set[str] = set()  # modes that ran out of memory at a smaller K (larger K would too)
        for K in Ks:
            for mode in ("end-to-end", "checkpointed", "sequential"):
                if mode in oom:
                    rows.append(dict(case=name, device=dev, modules=K, mode=mode, peak_bytes=None, peak_mib=None,
                                     out_of_memory=True))
                    continue
                try:
                    r = measure_training_memory(prob, K, mode, device=dev)
                except torch.cuda.OutOfMemoryError:  # only on CUDA: the paper-sized end-to-end case
                    oom.add(mode)
                    torch.cuda.empty_cache()
                    rows.append(dict(case=name, device=dev, modules=K, mode=mode, peak_bytes=None, peak_mib=None,
                                     out_of_memory=True))
                    continue
                rows.append(dict(case=name, device=dev, modules=K, mode=mode, peak_bytes=r.peak_bytes,
                                 peak_mib=r.peak_bytes / 2**20, time_s=r.time_s, image_shape=list(r.image_shape),
                                 batch_size=r.batch_size, width=r.width, depth=r.depth))
    # reduction of sequential vs end-to-end at every K (where end-to-end fitted)
    for name in dict.fromkeys(r["case"] for r in rows):
        for K in Ks:
            e2e = next(r["peak_bytes"] for r in rows if r["case"] == name and r["modules"] == K and r["mode"] == "end-to-end")
            for r in rows:
                if r["case"] == name and r["modules"] == K:
                    r["fraction_of_end_to_end"] = (r["peak_bytes"] / e2e) if (e2e and r["peak_bytes"]) else None
    return rows


def memory_targets(rows: list[dict]) -> dict:
    """Sequential flat in K (within :data:`~fbsembook.verdicts.FLAT_TOLERANCE`, 10 %, from
    K = 5 to the largest K) and at least :data:`~fbsembook.verdicts.MEMORY_CLAIM` (98 %)
    below end-to-end at the largest K, per case."""
    out = {}
    for name in dict.fromkeys(r["case"] for r in rows):
        seq = {r["modules"]: r["peak_bytes"] for r in rows
               if r["case"] == name and r["mode"] == "sequential" and r["peak_bytes"]}
        e2e = {r["modules"]: r["peak_bytes"] for r in rows
               if r["case"] == name and r["mode"] == "end-to-end" and r["peak_bytes"]}
        if not seq:
            continue
        kmax = max(seq)
        k5 = FLAT_FROM_K if FLAT_FROM_K in seq else min(seq)
        flat = abs(seq[kmax] - seq[k5]) / seq[k5]
        # end-to-end out of memory at large K: compare at the largest K it fitted
        ke = max(k for k in e2e if k in seq) if e2e else None
        red = (1 - seq[ke] / e2e[ke]) if ke else None
        out[name] = {"K_max": kmax, "sequential_change_from_K5": flat, "flat_within_10pct": flat <= FLAT_TOLERANCE,
                     "reduction_at_K": ke, "reduction_at_K_max": red if ke == kmax else None,
                     "reduction": red, "at_least_98pct": (red >= MEMORY_CLAIM) if red is not None else None,
                     "end_to_end_out_of_memory_from_K": min((r["modules"] for r in rows if r["case"] == name
                                                             and r["mode"] == "end-to-end" and r.get("out_of_memory")),
                                                            default=None)}
    return out


def run_memory(quick: bool, out: str | None, device: str | None) -> Path:
    rows = bench_memory(quick=quick, device=device)
    print_table(rows, ["case", "device", "modules", "mode", "peak_mib", "fraction_of_end_to_end"])
    targets = memory_targets(rows)
    print(json.dumps(targets, indent=1))
    return write_results("memory" + ("_quick" if quick else ""), rows, out, {"targets": targets})


# ----------------------------------------------------------------------------------------
# training time: sequential (cached inputs) vs end-to-end
# ----------------------------------------------------------------------------------------
def bench_training(quick: bool = False, device: str | None = None, repeats: int = 1) -> list[dict]:
    """Wall time of training with the same number of epochs per module: end-to-end
    (``epochs`` passes through all K modules) vs sequential (``epochs_per_module`` passes
    per stage, cached inputs), on the ``smoke`` (quick) or ``cpu`` profile's data, with
    the profile's own ``epochs_per_module`` (cpu: 5) for both. Sequential training has
    per-stage costs that end-to-end training has not (propagating the cache: one forward
    pass of the module over the data; choosing the stage's start; the end-of-stage
    checkpoint), so the ratio falls as the epochs per module grow."""
    import tempfile

    from fbsemlib.config import from_dict
    from fbsemlib.data import PETBatch, PETDataset
    from fbsemlib.models import FBSEMNet
    from fbsemlib.training import TrainConfig, make_trainer, parse_model_section
    from fbsembook import experiments as ex

    profile = "smoke" if quick else "cpu"
    epochs = 1 if quick else int(ex.load_profile(profile)["train"]["epochs_per_module"])
    sections = ex.load_profile(profile, {"train.epochs": epochs, "train.epochs_per_module": epochs,
                                         "train.validation_every": 10**6, "train.checkpoint_every": 10**6})
    data_dir = ex.dataset(sections)
    train_ds = PETDataset(data_dir, "train")
    dev = torch.device(device or "cpu")
    P = train_ds.make_projector(dev)
    # warm-up: build the subset system matrices once, outside the timings
    item = PETBatch.from_mapping(train_ds[0])
    with torch.no_grad():
        FBSEMNet(P, train_ds.num_iterations, train_ds.num_subsets, parse_model_section(sections.get("model"))[0]).eval()(
            item.y[None].to(dev), item.multiplicative[None].to(dev), item.additive[None].to(dev), item.mr[None].to(dev))
    rows = []
    for mode in ("end-to-end", "sequential"):
        ts = []
        for rep in range(repeats):
            model_cfg, n_it, n_sub = parse_model_section(sections.get("model"))
            cfg = from_dict(TrainConfig, dict(sections["train"], mode=mode), "train")
            torch.manual_seed(0)
            net = FBSEMNet(P, train_ds.num_iterations, train_ds.num_subsets, model_cfg)
            with tempfile.TemporaryDirectory() as tmp:
                tr = make_trainer(mode, model=net, train_dataset=train_ds, val_dataset=None, config=cfg, out_dir=tmp,
                                  device=dev, progress=False)
                t = time.perf_counter()
                tr.fit()
                ts.append(time.perf_counter() - t)
        rows.append(dict(profile=profile, mode=mode, epochs_per_module=epochs, modules=train_ds.num_modules,
                         samples=len(train_ds), device=str(dev), time_s=statistics.median(ts),
                         s_per_epoch_equivalent=statistics.median(ts) / epochs))
    e2e = rows[0]["time_s"]
    for r in rows:
        r["ratio_to_end_to_end"] = r["time_s"] / e2e
    return rows


def run_training(quick: bool, out: str | None, device: str | None) -> Path:
    rows = bench_training(quick=quick, device=device)
    print_table(rows, ["profile", "mode", "modules", "samples", "epochs_per_module", "time_s", "ratio_to_end_to_end"])
    ratio = rows[1]["ratio_to_end_to_end"]
    targets = {"sequential_over_end_to_end": ratio, "target": TIME_RATIO_TARGET, "met": ratio <= TIME_RATIO_TARGET}
    print(json.dumps(targets))
    return write_results("training" + ("_quick" if quick else ""), rows, out, {"targets": targets})


# ----------------------------------------------------------------------------------------
# data simulation time
# ----------------------------------------------------------------------------------------
def bench_simulation(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time to simulate the ``smoke`` (quick) or ``cpu`` recipe in full, and one subject of
    the ``paper`` recipe (extrapolated to all subjects; the full run takes long on a CPU)."""
    import tempfile

    from fbsemlib.config import from_dict
    from fbsemlib.data import DataConfig
    from fbsemlib.data.simulate import SimulationContext, simulate_dataset, simulate_subject, split_subjects
    from fbsembook import experiments as ex

    rows = []
    for profile in (("smoke",) if quick else ("smoke", "cpu")):
        cfg = from_dict(DataConfig, ex.load_profile(profile)["data"], "data")
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            info = simulate_dataset(cfg, Path(tmp) / "ds", progress=False, device=device or "cpu")
            dt = time.perf_counter() - t
            summ = info.summary()
        rows.append(dict(recipe=profile, subjects=cfg.num_subjects, measured="full", time_s=dt,
                         s_per_subject=dt / cfg.num_subjects, disk_mb=summ.get("disk_bytes", 0) / 2**20 if summ else None))
    if not quick:
        cfg = from_dict(DataConfig, ex.load_profile("paper")["data"], "data")
        ctx = SimulationContext(cfg, device=device or "cpu")
        split = split_subjects(cfg)
        subj, sp = next((s, k) for k, v in split.items() for s in v)
        t = time.perf_counter()
        simulate_subject(ctx, subj, sp)
        dt = time.perf_counter() - t
        rows.append(dict(recipe="paper", subjects=cfg.num_subjects, measured="one subject (extrapolated)",
                         time_s=dt * cfg.num_subjects, s_per_subject=dt, disk_mb=None))
    return rows


def run_simulation(quick: bool, out: str | None, device: str | None) -> Path:
    rows = bench_simulation(quick=quick, device=device)
    print_table(rows, ["recipe", "subjects", "measured", "time_s", "s_per_subject", "disk_mb"])
    return write_results("simulation" + ("_quick" if quick else ""), rows, out)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
BENCHES: dict[str, Callable] = {"projector": run_projector, "memory": run_memory, "training": run_training,
                                "simulation": run_simulation}


def cmd_bench(args) -> int:
    from fbsemlib.errors import UserError

    which = args.which
    names = list(BENCHES) if which == "all" else [which]
    for name in names:
        if name not in BENCHES:
            raise UserError(f"unknown benchmark {name!r}; choose from {sorted(BENCHES)} or 'all'")
    for name in names:
        print(f"== {name}")
        path = BENCHES[name](args.quick, args.out, args.device)
        print(f"wrote {path}")
    return 0
