"""The paper's claims, this book's numbers and the verdicts (used by the book's chapters 7-10).

Two parts:

* **Verdicts** -- pure functions of numbers (no I/O, no torch), unit-tested in
  ``tests/test_claims.py``. Each returns a :class:`Verdict`: one of
  :data:`REPRODUCED`, :data:`PARTLY`, :data:`NOT_REPRODUCED`, :data:`NOT_TESTED`, with the
  numbers it was computed from and a one-line reason. The thresholds are the book's
  choices (the paper gives none); they are arguments with stated defaults:

  ===========================================  ======================================  ==================
  claim                                        reproduced                              partly
  ===========================================  ======================================  ==================
  (a) it-dep targets: more consistent runs     std over seeds lower than final-target  within ``tie``
  (b) it-dep targets generalise better         better on every out-of-distribution set on some
  (c) it-dep networks: slightly lower error    NRMSE lower than the shared network     within ``tie``
  (d) sequential does not notably hurt         NRMSE at most ``tol`` (5 %) worse       at most 10 % worse
  (e) memory up to 98 % lower (3D)             reduction >= 97.5 % (rounds to 98 %)    >= 90 %
  (f) FBSEM-Net beats MAP-EM and PF-OSEM       lower NRMSE than every baseline         than some
  (g) ranking FBSEM < MAP-EM < OSEM            same order                              same best method
  ===========================================  ======================================  ==================

  and the targets of the benchmarks (:func:`projector_targets`, :func:`verdict_flat`,
  :func:`verdict_time_ratio`).

* **Collecting numbers** -- :func:`memory_sweep` (peak training memory against the number
  of modules K for several training modes, cached like the other experiments so that the
  chapters that show it share one measurement, with out-of-memory handled and linear
  extrapolation), :func:`load_bench_results` (the JSON files of ``fbsem bench``) and small
  readers of :func:`fbsembook.experiments.evaluate` results.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "REPRODUCED",
    "PARTLY",
    "NOT_REPRODUCED",
    "NOT_TESTED",
    "VERDICTS",
    "Verdict",
    "relative_difference",
    "memory_reduction",
    "flatness",
    "linear_fit",
    "extrapolate_linear",
    "seed_std",
    "verdict_consistency",
    "verdict_lower_error",
    "verdict_no_notable_loss",
    "verdict_memory_reduction",
    "verdict_flat",
    "verdict_beats",
    "verdict_count",
    "ranking",
    "verdict_ranking",
    "verdict_time_ratio",
    "training_time_ratio",
    "projector_targets",
    "method_mean",
    "method_std",
    "MEMORY_3D",
    "memory_3d_kwargs",
    "memory_sweep",
    "sweep_value",
    "sweep_table",
    "chapter_defaults",
    "bench_memory_sweeps",
    "bench_training_ratio",
    "load_bench_results",
    "bench_command",
    "BENCH_NAMES",
]

REPRODUCED = "reproduced"
PARTLY = "partly"
NOT_REPRODUCED = "not reproduced"
NOT_TESTED = "not tested"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTED)


@dataclasses.dataclass
class Verdict:
    """A verdict with the numbers behind it."""

    verdict: str
    reason: str
    numbers: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}; one of {VERDICTS}")

    def __str__(self) -> str:
        return f"{self.verdict}: {self.reason}"

    @property
    def ok(self) -> bool:
        return self.verdict == REPRODUCED


def _finite(*vals) -> bool:
    return all(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


# ----------------------------------------------------------------------------------------
# plain numbers
# ----------------------------------------------------------------------------------------
def relative_difference(a: float, b: float) -> float:
    """``(a - b) / b`` (``a`` relative to the reference ``b``)."""
    if not _finite(a, b) or b == 0:
        raise ValueError(f"relative_difference needs finite numbers and b != 0, got {a!r}, {b!r}")
    return (a - b) / b


def memory_reduction(sequential: float, end_to_end: float) -> float:
    """``1 - sequential / end_to_end``: the fraction of memory that sequential training saves."""
    if not _finite(sequential, end_to_end) or end_to_end <= 0 or sequential < 0:
        raise ValueError(f"memory_reduction needs sequential >= 0 and end_to_end > 0, got {sequential!r}, {end_to_end!r}")
    return 1.0 - sequential / end_to_end


def flatness(Ks: Sequence[int], values: Sequence[float], k_min: int = 5, k_max: int | None = None) -> float:
    """``max / min - 1`` of ``values`` over the ``Ks`` in ``[k_min, k_max]``: 0 for a flat
    curve, 0.1 when it varies by 10 %."""
    sel = [v for k, v in zip(Ks, values) if k >= k_min and (k_max is None or k <= k_max) and _finite(v)]
    if len(sel) < 2:
        raise ValueError(f"flatness needs at least two values with K in [{k_min}, {k_max}], got {len(sel)}")
    lo, hi = min(sel), max(sel)
    if lo <= 0:
        raise ValueError("flatness needs positive values")
    return hi / lo - 1.0


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x`` (one point: slope through 0)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if _finite(x, y)]
    if not pts:
        raise ValueError("linear_fit needs at least one finite point")
    if len(pts) == 1:
        x, y = pts[0]
        return 0.0, (y / x if x else 0.0)
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return my, 0.0
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return my - b * mx, b


def extrapolate_linear(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """The value at ``x`` of the least-squares line through ``(xs, ys)``."""
    a, b = linear_fit(xs, ys)
    return a + b * x


def seed_std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (``ddof = 1``) of per-seed results; None for fewer than 2."""
    vals = [float(v) for v in values if _finite(v)]
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# ----------------------------------------------------------------------------------------
# verdicts of the paper's claims
# ----------------------------------------------------------------------------------------
def verdict_consistency(std_itdep: float | None, std_final: float | None, n_seeds: int, tie: float = 0.1,
                        sample_stds: tuple[float | None, float | None] | None = None) -> Verdict:
    """(a) Iteration-dependent targets make training runs more consistent: the standard
    deviation over training seeds of the test NRMSE (or another metric) is lower with
    iteration-dependent targets (``std_itdep``) than with the single final target
    (``std_final``). Within ``tie`` (relative) of each other: partly. Fewer than 2 seeds
    (``n_seeds``: runs per setting): not tested.

    ``numbers`` hold the inputs and ``ratio`` (``std_itdep / std_final``); with
    ``sample_stds = (itdep, final)`` -- the mean per-sample across-run standard deviations
    (``sample_std`` of :func:`fbsembook.analysis.seed_spread`) -- also ``sample_ratio``,
    which the reason reports (how differently the runs treat the same image)."""
    nums = {"std_itdep": std_itdep, "std_final": std_final, "seeds": n_seeds}
    if n_seeds < 2 or not _finite(std_itdep, std_final):
        return Verdict(NOT_TESTED, f"needs at least 2 training seeds (got {n_seeds})", nums)
    ratio = lambda a, b: a / b if b > 0 else (float("nan") if a == 0 else float("inf"))  # noqa: E731
    nums["ratio"] = ratio(std_itdep, std_final)
    extra = ""
    if sample_stds is not None and _finite(*sample_stds):
        nums["sample_ratio"] = ratio(*sample_stds)
        extra = f"; per-sample std ratio {nums['sample_ratio']:.2f}"
    if std_itdep < std_final:
        if std_final > 0 and (std_final - std_itdep) / std_final <= tie:
            return Verdict(PARTLY, f"std {std_itdep:.3g} vs {std_final:.3g}: lower, but within {tie:.0%}{extra}",
                           nums)
        return Verdict(REPRODUCED, f"std over {n_seeds} seeds {std_itdep:.3g} < {std_final:.3g}{extra}", nums)
    if std_final > 0 and (std_itdep - std_final) / std_final <= tie:
        return Verdict(PARTLY, f"std {std_itdep:.3g} vs {std_final:.3g}: equal within {tie:.0%}{extra}", nums)
    if std_final == 0 and std_itdep == 0:
        return Verdict(PARTLY, "both standard deviations are 0", nums)
    return Verdict(NOT_REPRODUCED, f"std over {n_seeds} seeds {std_itdep:.3g} >= {std_final:.3g}{extra}", nums)


def verdict_lower_error(nrmse_new: float, nrmse_ref: float, tie: float = 0.01,
                        what: str = "iteration-dependent networks", ref: str = "shared network") -> Verdict:
    """(c) ``nrmse_new`` is (slightly) lower than ``nrmse_ref``. Higher by at most ``tie``
    (relative, default 1 %): partly (no difference to speak of)."""
    nums = {"new": nrmse_new, "ref": nrmse_ref}
    if not _finite(nrmse_new, nrmse_ref):
        return Verdict(NOT_TESTED, "missing numbers", nums)
    rel = relative_difference(nrmse_new, nrmse_ref)
    nums["relative"] = rel
    if rel < 0:
        return Verdict(REPRODUCED, f"{what} {nrmse_new:.2f} % < {ref} {nrmse_ref:.2f} % ({rel:+.1%})", nums)
    if rel <= tie:
        return Verdict(PARTLY, f"{what} {nrmse_new:.2f} % vs {ref} {nrmse_ref:.2f} % ({rel:+.1%}, within {tie:.0%})",
                       nums)
    return Verdict(NOT_REPRODUCED, f"{what} {nrmse_new:.2f} % > {ref} {nrmse_ref:.2f} % ({rel:+.1%})", nums)


def verdict_no_notable_loss(nrmse_sequential: float, nrmse_end_to_end: float, tol: float = 0.05,
                            partial: float = 0.10) -> Verdict:
    """(d) Sequential training does not notably hurt accuracy: its NRMSE is at most ``tol``
    (relative, 5 %) above end-to-end training's (lower is fine); at most ``partial`` (10 %):
    partly."""
    nums = {"sequential": nrmse_sequential, "end_to_end": nrmse_end_to_end}
    if not _finite(nrmse_sequential, nrmse_end_to_end):
        return Verdict(NOT_TESTED, "missing numbers", nums)
    rel = relative_difference(nrmse_sequential, nrmse_end_to_end)
    nums["relative"] = rel
    msg = f"NRMSE sequential {nrmse_sequential:.2f} % vs end-to-end {nrmse_end_to_end:.2f} % ({rel:+.1%})"
    if rel <= tol:
        return Verdict(REPRODUCED, msg + f", within +{tol:.0%}", nums)
    if rel <= partial:
        return Verdict(PARTLY, msg + f", within +{partial:.0%}", nums)
    return Verdict(NOT_REPRODUCED, msg + f", more than +{partial:.0%}", nums)


def verdict_memory_reduction(reduction: float | None, claimed: float = 0.98, rounding: float = 0.005,
                             partial: float = 0.90, extrapolated: bool = False) -> Verdict:
    """(e) Sequential training needs up to ``claimed`` (98 %) less memory than end-to-end:
    reproduced when the reduction rounds to at least the claim (``>= claimed - rounding``),
    partly from ``partial`` (90 %). ``extrapolated``: the end-to-end value was extrapolated
    (it did not fit in memory), which the reason says."""
    nums = {"reduction": reduction, "claimed": claimed, "extrapolated": extrapolated}
    if not _finite(reduction):
        return Verdict(NOT_TESTED, "no measurement", nums)
    note = " (end-to-end extrapolated: it did not fit)" if extrapolated else ""
    if reduction >= claimed - rounding:
        return Verdict(REPRODUCED, f"reduction {reduction:.1%} >= {claimed:.0%}{note}", nums)
    if reduction >= partial:
        return Verdict(PARTLY, f"reduction {reduction:.1%} < {claimed:.0%} but >= {partial:.0%}{note}", nums)
    return Verdict(NOT_REPRODUCED, f"reduction {reduction:.1%} < {partial:.0%}{note}", nums)


def verdict_flat(Ks: Sequence[int], values: Sequence[float], tol: float = 0.10, k_min: int = 5,
                 k_max: int | None = None) -> Verdict:
    """Memory flat in K: ``max / min - 1 <= tol`` over ``K in [k_min, k_max]``."""
    try:
        f = flatness(Ks, values, k_min, k_max)
    except ValueError as e:
        return Verdict(NOT_TESTED, str(e), {})
    rng = f"K = {k_min}..{k_max if k_max is not None else max(Ks)}"
    nums = {"flatness": f, "tol": tol}
    if f <= tol:
        return Verdict(REPRODUCED, f"varies by {f:.1%} over {rng} (<= {tol:.0%})", nums)
    return Verdict(NOT_REPRODUCED, f"varies by {f:.1%} over {rng} (> {tol:.0%})", nums)


def verdict_beats(fbsem: float, baselines: Mapping[str, float]) -> Verdict:
    """(f) FBSEM-Net has a lower NRMSE than every baseline (all: reproduced; some: partly)."""
    nums = {"fbsem": fbsem, **{k: v for k, v in baselines.items()}}
    vals = {k: v for k, v in baselines.items() if _finite(v)}
    if not _finite(fbsem) or not vals:
        return Verdict(NOT_TESTED, "missing numbers", nums)
    beaten = [k for k, v in vals.items() if fbsem < v]
    lost = [k for k in vals if k not in beaten]
    desc = ", ".join(f"{k} {v:.2f} %" for k, v in vals.items())
    if not lost:
        return Verdict(REPRODUCED, f"FBSEM-Net {fbsem:.2f} % < {desc}", nums)
    if beaten:
        return Verdict(PARTLY, f"FBSEM-Net {fbsem:.2f} % beats {', '.join(beaten)}, not {', '.join(lost)} ({desc})",
                       nums)
    return Verdict(NOT_REPRODUCED, f"FBSEM-Net {fbsem:.2f} % beats none of {desc}", nums)


def verdict_count(n_better: int | None, n_cases: int | None, what: str = "test sets") -> Verdict:
    """(b) A claim checked on several cases (e.g. out-of-distribution test sets): better on
    all of them: reproduced; on some: partly; on none: not reproduced."""
    nums = {"better": n_better, "cases": n_cases}
    if not n_cases or n_better is None:
        return Verdict(NOT_TESTED, f"no {what}", nums)
    if not 0 <= n_better <= n_cases:
        raise ValueError(f"n_better={n_better} must be within 0..{n_cases}")
    if n_better == n_cases:
        return Verdict(REPRODUCED, f"better on all {n_cases} {what}", nums)
    if n_better > 0:
        return Verdict(PARTLY, f"better on {n_better} of {n_cases} {what}", nums)
    return Verdict(NOT_REPRODUCED, f"better on none of the {n_cases} {what}", nums)


def ranking(values: Mapping[str, float]) -> list[str]:
    """Names sorted by increasing value (ties keep the given order)."""
    return [k for k, _ in sorted(values.items(), key=lambda kv: kv[1])]


def verdict_ranking(ours: Mapping[str, float], paper: Mapping[str, float]) -> Verdict:
    """(g) The same NRMSE ranking as the paper (over the names of ``paper``): reproduced;
    the same best method only: partly."""
    names = [k for k in paper if k in ours and _finite(ours[k])]
    nums = {"ours": dict(ours), "paper": dict(paper)}
    if len(names) < 2:
        return Verdict(NOT_TESTED, "fewer than two methods to rank", nums)
    r_ours = ranking({k: ours[k] for k in names})
    r_paper = ranking({k: paper[k] for k in names})
    nums.update(ranking_ours=r_ours, ranking_paper=r_paper)
    txt = " < ".join(r_ours)
    if r_ours == r_paper:
        return Verdict(REPRODUCED, f"same ranking: {txt}", nums)
    if r_ours[0] == r_paper[0]:
        return Verdict(PARTLY, f"same best method, ranking {txt} (paper: {' < '.join(r_paper)})", nums)
    return Verdict(NOT_REPRODUCED, f"ranking {txt} (paper: {' < '.join(r_paper)})", nums)


def training_time_ratio(t_sequential: float, epochs_per_module: int, t_end_to_end: float, epochs: int) -> float:
    """Sequential over end-to-end training time for the same number of epochs per module:
    ``(t_seq / epochs_per_module) / (t_e2e / epochs)`` (each module sees ``epochs`` epochs of
    end-to-end training and ``epochs_per_module`` epochs of sequential training)."""
    if not _finite(t_sequential, t_end_to_end) or t_end_to_end <= 0 or epochs_per_module < 1 or epochs < 1:
        raise ValueError("training_time_ratio needs positive times and epochs")
    return (t_sequential / epochs_per_module) / (t_end_to_end / epochs)


def verdict_time_ratio(ratio: float | None, target: float = 1.2) -> Verdict:
    """Sequential training time at most ``target`` x end-to-end's (same epochs per module)."""
    nums = {"ratio": ratio, "target": target}
    if not _finite(ratio):
        return Verdict(NOT_TESTED, "no measurement", nums)
    if ratio <= target:
        return Verdict(REPRODUCED, f"sequential / end-to-end = {ratio:.2f} <= {target}", nums)
    return Verdict(NOT_REPRODUCED, f"sequential / end-to-end = {ratio:.2f} > {target}", nums)


def projector_targets(rows: Iterable[Mapping], impl: str = "fbsemlib-torch-matrix", device: str = "cpu",
                      target_batch1: float = 3.0, target_batchN: float = 20.0, case_prefix: str = "2D parallel") -> dict:
    """Speed-ups over ASTRA's CPU Joseph projector of ``impl`` at the smallest and largest
    batch (per image), from the rows of ``projector.json``; ``met_*`` are None when a number
    is missing."""
    rows = [r for r in rows if str(r.get("case", "")).startswith(case_prefix)]
    astra = [r for r in rows if r.get("impl") == "astra-cpu-joseph" and _finite(r.get("s_per_image"))]
    ours = {int(r["batch"]): r for r in rows if r.get("impl") == impl and r.get("device") == device
            and _finite(r.get("s_per_image"))}
    out: dict[str, Any] = {"impl": impl, "device": device, "target_batch1": target_batch1,
                           "target_batchN": target_batchN, "speedup_batch1": None, "speedup_batchN": None,
                           "batchN": None, "met_batch1": None, "met_batchN": None,
                           "astra_s": astra[0]["s_per_image"] if astra else None}
    if not astra or not ours:
        return out
    t_astra = float(astra[0]["s_per_image"])
    b1, bN = min(ours), max(ours)
    out["speedup_batch1"] = t_astra / float(ours[b1]["s_per_image"])
    out["met_batch1"] = out["speedup_batch1"] >= target_batch1
    if bN != b1:
        out["batchN"] = bN
        out["speedup_batchN"] = t_astra / float(ours[bN]["s_per_image"])
        out["met_batchN"] = out["speedup_batchN"] >= target_batchN
    return out


# ----------------------------------------------------------------------------------------
# readers of evaluation results (fbsembook.experiments.evaluate)
# ----------------------------------------------------------------------------------------
def method_mean(evaluation: Mapping, method: str = "fbsem", metric: str = "nrmse") -> float | None:
    """Mean of ``metric`` of ``method`` over the test samples of an evaluation."""
    s = (evaluation.get("summary") or {}).get(method, {}).get(metric) or {}
    return s.get("mean")


def method_std(evaluation: Mapping, method: str = "fbsem", metric: str = "nrmse") -> float | None:
    """Standard deviation of ``metric`` of ``method`` over the test samples."""
    s = (evaluation.get("summary") or {}).get(method, {}).get(metric) or {}
    return s.get("std")


# ----------------------------------------------------------------------------------------
# memory against K (cached)
# ----------------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or isinstance(e, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(e, (RuntimeError, MemoryError)) and ("out of memory" in str(e).lower()
                                                          or isinstance(e, MemoryError))


#: The 3D problem of the memory measurements, per book profile (keyword arguments of
#: :func:`fbsemlib.training.memory.memory_problem`, config ``None``): the chapters that show the 3D
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
    """A copy of :data:`MEMORY_3D` for ``profile``."""
    if profile not in MEMORY_3D:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(MEMORY_3D)}")
    return json.loads(json.dumps(MEMORY_3D[profile]))


def memory_sweep(config: Any = None, Ks: Sequence[int] = (1, 2, 5, 10, 20, 40, 60),
                 modes: Sequence[str] = ("end-to-end", "checkpointed", "sequential"), device: str = "cpu",
                 cache: bool = True, host_fraction: float = 0.5, progress: bool = False, **problem_kwargs) -> dict:
    """Peak memory of one training step for every ``K`` and ``mode``
    (:func:`fbsemlib.training.memory.measure_training_memory`) on the problem
    ``memory_problem(config, **problem_kwargs)``.

    Returns ``{"spec", "resolved", "device", "Ks", "modes", "rows"}`` (``resolved``: the
    scanner preset, rings, ring difference, image shape and voxel size after defaults); each row has ``mode``, ``K``, ``status``
    (``"ok"``, ``"oom"``: the step ran out of memory, ``"skipped"``: a smaller K of the same
    mode already did, or on CPU the linear prediction from the smaller Ks exceeds
    ``host_fraction`` of the available memory) and, when measured, ``peak_bytes`` and the
    other fields of :class:`~fbsemlib.training.memory.MemoryReport`. Cached (JSON) under
    ``<cache>/memory/`` by the resolved problem, the Ks, the modes, the device and the
    torch version: chapters asking for the same sweep share one measurement."""
    import torch

    from fbsembook.build import cache_dir
    from fbsembook.experiments import config_hash
    from fbsemlib.training.memory import available_bytes, measure_training_memory, memory_problem, resolve_spec

    spec = resolve_spec(config, **problem_kwargs)
    Ks = [int(k) for k in Ks]
    modes = list(modes)
    key = {"spec": spec.to_dict(), "Ks": Ks, "modes": modes, "device": str(device), "torch": torch.__version__,
           "version": 2}
    path = Path(cache_dir("memory")) / f"sweep-{spec.dims}-{config_hash(key)}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    problem = memory_problem(spec, device=device)
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
                avail = available_bytes()
                if avail is not None and pred > host_fraction * avail:
                    rows.append({**row, "status": "skipped", "predicted_bytes": int(pred),
                                 "reason": f"predicted {pred / 2**30:.1f} GiB > {host_fraction:.0%} of the free memory"})
                    failed = True
                    continue
            try:
                rep = measure_training_memory(problem, K, mode, device=device)
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
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=float))
        os.replace(tmp, path)
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


# ----------------------------------------------------------------------------------------
# another chapter's parameters
# ----------------------------------------------------------------------------------------
def _call_name(func) -> str | None:
    import ast

    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def chapter_defaults(number: int, profile: str, root: str | os.PathLike | None = None) -> dict:
    """The values, in ``profile``, of the parameters of chapter ``number``
    (``book/NN_*.md``) as its own ``profile_params({...}, profile, globals())`` call
    resolves them when nothing is overridden.

    The results chapter asks for the SAME runs and evaluations as the chapters that
    computed them (so that they come from the cache); reading their per-profile defaults
    from their sources keeps one definition of e.g. the training seeds. Only the entries of
    the defaults dict that are Python literals are read (others are left out). Raises
    ``ValueError`` when there is no such chapter or no ``profile_params`` call with a dict."""
    import ast

    import jupytext

    from fbsembook.build import BOOK_DIR, book_root, profile_params

    base = Path(root) if root is not None else book_root()
    files = sorted((base / BOOK_DIR).glob(f"{int(number):02d}_*.md"))
    if len(files) != 1:
        raise ValueError(f"expected one chapter {int(number):02d}_*.md in {base / BOOK_DIR}, found {len(files)}")
    nb = jupytext.read(files[0])
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:  # IPython magics
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and _call_name(node.func) == "profile_params" and node.args
                    and isinstance(node.args[0], ast.Dict)):
                defaults = {}
                for k, v in zip(node.args[0].keys, node.args[0].values):
                    try:
                        defaults[ast.literal_eval(k)] = ast.literal_eval(v)
                    except (ValueError, TypeError, SyntaxError):
                        continue
                return dict(profile_params(defaults, profile))
    raise ValueError(f"{files[0].name}: no profile_params({{...}}) call with a dict of defaults")


# ----------------------------------------------------------------------------------------
# benchmark results (fbsem bench ...)
# ----------------------------------------------------------------------------------------
BENCH_NAMES = ("projector", "memory", "training", "simulation")


def bench_command(name: str) -> str:
    """The command that writes ``benchmarks/results/<name>.json``."""
    return f"fbsem bench {name}"


def bench_memory_sweeps(doc: Mapping | None) -> dict[str, dict]:
    """The rows of ``memory.json`` (``fbsem bench memory``) as one :func:`memory_sweep`-like
    dict per case (``{"device", "rows": [{"mode", "K", "status", "peak_bytes"}, ...]}``), so
    that :func:`sweep_value` and :func:`sweep_table` apply. Rows without a number (a case
    that ran out of memory, if the benchmark records one) get ``status`` ``"oom"``."""
    out: dict[str, dict] = {}
    for r in (doc or {}).get("rows", []):
        case = str(r.get("case", "?"))
        K = r.get("modules", r.get("K"))
        if K is None or r.get("mode") is None:
            continue
        sw = out.setdefault(case, {"device": r.get("device"), "image_shape": r.get("image_shape"), "rows": []})
        ok = _finite(r.get("peak_bytes"))
        sw["rows"].append({"mode": r["mode"], "K": int(K), "status": r.get("status", "ok" if ok else "oom"),
                           **({"peak_bytes": float(r["peak_bytes"])} if ok else {})})
    for sw in out.values():
        sw["modes"] = list(dict.fromkeys(r["mode"] for r in sw["rows"]))
        sw["Ks"] = sorted({r["K"] for r in sw["rows"]})
    return out


def bench_training_ratio(doc: Mapping | None) -> float | None:
    """Sequential over end-to-end wall time in ``training.json`` (``fbsem bench training``,
    which trains both modes for the same number of epochs per module); None if missing."""
    rows = (doc or {}).get("rows", [])
    t = {r.get("mode"): r.get("time_s") for r in rows}
    e = {r.get("mode"): r.get("epochs_per_module", 1) or 1 for r in rows}
    if not (_finite(t.get("sequential")) and _finite(t.get("end-to-end"))) or t["end-to-end"] <= 0:
        return None
    return training_time_ratio(t["sequential"], e["sequential"], t["end-to-end"], e["end-to-end"])


def load_bench_results(directory: str | os.PathLike | None = None, names: Sequence[str] = BENCH_NAMES,
                       allow_quick: bool = False) -> dict[str, dict | None]:
    """``{name: document or None}`` for the ``fbsem bench`` results in ``directory``
    (default ``benchmarks/results``). A ``<name>_quick.json`` (tiny sizes, not meant for
    judging speed) is used only with ``allow_quick`` and when the full file is missing; the
    document then has ``"quick": True``. Unreadable files give None (and ``"error"`` is not
    raised)."""
    from fbsembook.bench import RESULTS_DIR

    d = Path(directory) if directory is not None else RESULTS_DIR
    out: dict[str, dict | None] = {}
    for name in names:
        doc = None
        for fname, quick in ((f"{name}.json", False), (f"{name}_quick.json", True)):
            if quick and not allow_quick:
                continue
            p = d / fname
            if not p.is_file():
                continue
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict):
                doc = None
                continue
            doc.setdefault("rows", [])
            doc["quick"] = quick
            doc["path"] = str(p)
            break
        out[name] = doc
    return out
