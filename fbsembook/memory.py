"""Peak training memory against the number of unrolled modules K, as the chapters measure
it: :func:`memory_sweep` runs :func:`fbsemlib.training.measure_training_memory` for several
K and training modes (out of memory handled, linear extrapolation where a step does not
fit) and caches the result, so that the chapters that show the same sweep (7: 2D; 8, 9, 10:
the 3D problem of :data:`MEMORY_3D`) share one measurement; :func:`sweep_value` and
:func:`sweep_table` read it.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from fbsembook.verdicts import extrapolate_linear, memory_reduction

__all__ = ["MEMORY_3D", "memory_3d_kwargs", "memory_sweep", "sweep_value", "sweep_table"]


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and ("out of memory" in str(e).lower()
                                                          or isinstance(e, MemoryError))


#: The 3D problem of the memory measurements, per book profile (keyword arguments of
#: :func:`fbsemlib.training.memory_problem`, config ``None``): the chapters that show the 3D
#: memory (8: 3D, 9: results, 10: performance) use these, so they share one cached sweep.
#: ``cpu`` and ``paper`` are the CPU and CUDA cases of ``fbsem bench memory``.
MEMORY_3D: dict[str, dict] = {
    # small3d, 4 rings, 4 x 24 x 24, batch 2, a tiny CNN
    "smoke": dict(dims="3d", width=8, depth=3),
    # small3d, 8 rings, 8 x 48 x 48, batch 2, 16 channels x 5 layers (the cpu profile's CNN)
    "cpu": dict(dims="3d", preset="small3d", image_shape=[8, 48, 48], width=16, depth=5),
    # the mMR (64 rings, ring difference <= 2), 127 x 172 x 172, batch 1, the original CNN
    "paper": dict(dims="3d", preset="mmr", max_ring_difference=2, image_shape=[127, 172, 172], batch_size=1,
                  width=32, depth=5, projector_method="on-the-fly"),
}


def memory_3d_kwargs(profile: str) -> dict:
    """A copy of :data:`MEMORY_3D` for ``profile`` (one's own experiment file: that of
    :func:`fbsembook.profiles.base_profile`)."""
    from fbsembook.profiles import PROFILES, base_profile

    if profile not in PROFILES and str(profile).endswith((".yaml", ".yml")):
        profile = base_profile(profile)
    if profile not in MEMORY_3D:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(MEMORY_3D)}")
    return json.loads(json.dumps(MEMORY_3D[profile]))


def memory_sweep(config: Any = None, Ks: Sequence[int] = (1, 2, 5, 10, 20, 40, 60),
                 modes: Sequence[str] = ("end-to-end", "checkpointed", "sequential"), device: str = "cpu",
                 cache: bool = True, host_fraction: float = 0.5, progress: bool = False, **problem_kwargs) -> dict:
    """Peak memory of one training step for every ``K`` and ``mode``
    (:func:`fbsemlib.training.measure_training_memory`) on the problem
    ``memory_problem(config, **problem_kwargs)``.

    Returns ``{"spec", "resolved", "device", "Ks", "modes", "rows"}`` (``resolved``: the
    scanner preset, rings, ring difference, image shape and voxel size after defaults); each row has ``mode``, ``K``, ``status``
    (``"ok"``, ``"oom"``: the step ran out of memory, ``"skipped"``: a smaller K of the same
    mode already did, or on CPU the linear prediction from the smaller Ks exceeds
    ``host_fraction`` of the available memory) and, when measured, ``peak_bytes`` and the
    other fields of :class:`~fbsemlib.training.MemoryReport`. Cached (JSON) under
    ``<cache>/memory/`` by the resolved problem, the Ks, the modes, the device and the
    torch version: chapters asking for the same sweep share one measurement."""
    import torch

    from fbsemlib.training import memory as training_memory
    from fbsembook.experiments import config_hash, write_json
    from fbsembook.profiles import cache_dir

    spec = training_memory.resolve_spec(config, **problem_kwargs)
    Ks = [int(k) for k in Ks]
    modes = list(modes)
    key = {"spec": spec.to_dict(), "Ks": Ks, "modes": modes, "device": str(device), "torch": torch.__version__,
           "version": 2}
    path = Path(cache_dir("memory")) / f"sweep-{spec.dims}-{config_hash(key)}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    problem = training_memory.memory_problem(spec, device=device)
    rows: list[dict] = []
    for mode in modes:
        done: list[tuple[int, int]] = []
        failed = False
        for K in sorted(Ks):
            row: dict[str, Any] = {"mode": mode, "K": K}
            if failed:
                rows.append({**row, "status": "skipped", "reason": "a smaller K ran out of memory"})
                continue
            if torch.device(device).type == "cpu" and len(done) >= 2:
                pred = extrapolate_linear([d[0] for d in done], [d[1] for d in done], K)
                avail = training_memory.available_bytes()
                if avail is not None and pred > host_fraction * avail:
                    rows.append({**row, "status": "skipped", "predicted_bytes": int(pred),
                                 "reason": f"predicted {pred / 2**30:.1f} GiB > {host_fraction:.0%} of the free memory"})
                    failed = True
                    continue
            try:
                rep = training_memory.measure_training_memory(problem, K, mode, device=device)
                d = rep.to_dict()
                d.pop("mode", None)
                rows.append({**row, "status": "ok", **d})
                done.append((K, rep.peak_bytes))
                if progress:
                    print(f"{mode:>12}  K={K:<3d}  {rep.peak_bytes / 2**20:10.1f} MiB", flush=True)
            except Exception as e:  # noqa: BLE001 - out of memory is an expected outcome
                if not _is_oom(e):
                    raise
                rows.append({**row, "status": "oom", "reason": str(e).splitlines()[0][:200]})
                failed = True
            finally:
                gc.collect()
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.resolved().items()}
    out = {"spec": spec.to_dict(), "resolved": resolved, "device": str(device), "Ks": Ks, "modes": modes, "rows": rows}
    if cache:
        write_json(path, out)
    return out


def sweep_value(sweep: Mapping, mode: str, K: int, field: str = "peak_bytes",
                extrapolate: bool = True) -> tuple[float | None, bool]:
    """``(value, extrapolated)`` of ``field`` at ``(mode, K)`` in a :func:`memory_sweep`
    result; when that step did not fit (or was skipped) and ``extrapolate``, the value of
    the least-squares line through the measured points of the mode (``extrapolated=True``)."""
    rows = [r for r in sweep["rows"] if r["mode"] == mode]
    for r in rows:
        if r["K"] == K and r.get("status") == "ok":
            return float(r[field]), False
    ok = [r for r in rows if r.get("status") == "ok"]
    if not extrapolate or len(ok) < 2:
        return None, False
    return float(extrapolate_linear([r["K"] for r in ok], [r[field] for r in ok], K)), True


def sweep_table(sweep: Mapping, unit: float = 2**20) -> list[dict]:
    """One row per K: the peak memory of each mode (in ``unit``, MiB by default; None where
    not measured) and the reduction of sequential vs end-to-end (None when either is missing)."""
    Ks = sorted({r["K"] for r in sweep["rows"]})
    modes = list(dict.fromkeys(r["mode"] for r in sweep["rows"]))
    out = []
    for K in Ks:
        row: dict[str, Any] = {"K": K}
        for m in modes:
            v, _ = sweep_value(sweep, m, K, extrapolate=False)
            row[m] = None if v is None else v / unit
        s, e = row.get("sequential"), row.get("end-to-end")
        row["reduction"] = memory_reduction(s, e) if (s is not None and e) else None
        out.append(row)
    return out
