"""Verdicts: pure functions of numbers (no I/O, no torch) that say whether a claim or a
performance target holds, unit-tested in ``tests/book/test_verdicts.py``.

Each returns a :class:`Verdict`: one of :data:`REPRODUCED`, :data:`PARTLY`,
:data:`NOT_REPRODUCED`, :data:`NOT_TESTED`, with the numbers it was computed from and a
one-line reason. The thresholds are the book's choices (the papers give none); each is a
named constant below, the default of its verdict function and the number the chapters'
rule texts print (:mod:`fbsembook.claims`):

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

and the performance targets of the benchmarks (:func:`projector_targets`,
:func:`verdict_flat`, :func:`verdict_time_ratio`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "REPRODUCED",
    "PARTLY",
    "NOT_REPRODUCED",
    "NOT_TESTED",
    "VERDICTS",
    "CONSISTENCY_TIE",
    "LOWER_ERROR_TIE",
    "ACCURACY_TOLERANCE",
    "ACCURACY_PARTIAL",
    "MEMORY_CLAIM",
    "MEMORY_ROUNDING",
    "MEMORY_PARTIAL",
    "FLAT_TOLERANCE",
    "FLAT_FROM_K",
    "TIME_RATIO_TARGET",
    "PROJECTOR_SPEEDUP_BATCH1",
    "PROJECTOR_SPEEDUP_BATCHN",
    "Verdict",
    "finite",
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
]

# -- the book's thresholds (the papers state none) ----------------------------------------
#: (a) standard deviations over seeds within this (relative) of each other: partly
CONSISTENCY_TIE = 0.1
#: (c) a new NRMSE higher than the reference by at most this (relative): partly
LOWER_ERROR_TIE = 0.01
#: (d) sequential NRMSE at most this much (relative) above end-to-end: "not notably" worse
ACCURACY_TOLERANCE = 0.05
#: (d) ... at most this much: partly
ACCURACY_PARTIAL = 0.10
#: (e) the 2022 paper's "up to 98 %" less memory ...
MEMORY_CLAIM = 0.98
#: ... reproduced when the measured reduction rounds to it (>= 97.5 %) ...
MEMORY_ROUNDING = 0.005
#: ... and partly from 90 %
MEMORY_PARTIAL = 0.90
#: sequential memory "flat in K": max / min - 1 at most this ...
FLAT_TOLERANCE = 0.10
#: ... over K >= this
FLAT_FROM_K = 5
#: sequential training time at most this times end-to-end's (same epochs per module)
TIME_RATIO_TARGET = 1.2
#: projector speed-up over ASTRA's CPU Joseph projector: at batch 1 ...
PROJECTOR_SPEEDUP_BATCH1 = 3.0
#: ... and per image at the largest batch (16)
PROJECTOR_SPEEDUP_BATCHN = 20.0

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


def finite(*vals) -> bool:
    """Every value is a finite Python number (not None, not NaN or inf)."""
    return all(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


# ----------------------------------------------------------------------------------------
# plain numbers
# ----------------------------------------------------------------------------------------
def relative_difference(a: float, b: float) -> float:
    """``(a - b) / b`` (``a`` relative to the reference ``b``)."""
    if not finite(a, b) or b == 0:
        raise ValueError(f"relative_difference needs finite numbers and b != 0, got {a!r}, {b!r}")
    return (a - b) / b


def memory_reduction(sequential: float, end_to_end: float) -> float:
    """``1 - sequential / end_to_end``: the fraction of memory that sequential training saves."""
    if not finite(sequential, end_to_end) or end_to_end <= 0 or sequential < 0:
        raise ValueError(f"memory_reduction needs sequential >= 0 and end_to_end > 0, got {sequential!r}, {end_to_end!r}")
    return 1.0 - sequential / end_to_end


def flatness(Ks: Sequence[int], values: Sequence[float], k_min: int = 5, k_max: int | None = None) -> float:
    """``max / min - 1`` of ``values`` over the ``Ks`` in ``[k_min, k_max]``: 0 for a flat
    curve, 0.1 when it varies by 10 %."""
    sel = [v for k, v in zip(Ks, values) if k >= k_min and (k_max is None or k <= k_max) and finite(v)]
    if len(sel) < 2:
        raise ValueError(f"flatness needs at least two values with K in [{k_min}, {k_max}], got {len(sel)}")
    lo, hi = min(sel), max(sel)
    if lo <= 0:
        raise ValueError("flatness needs positive values")
    return hi / lo - 1.0


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``y = a + b x`` (one point: slope through 0)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if finite(x, y)]
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
    vals = [float(v) for v in values if finite(v)]
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# ----------------------------------------------------------------------------------------
# verdicts of the paper's claims
# ----------------------------------------------------------------------------------------
def verdict_consistency(std_itdep: float | None, std_final: float | None, n_seeds: int, tie: float = CONSISTENCY_TIE,
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
    if n_seeds < 2 or not finite(std_itdep, std_final):
        return Verdict(NOT_TESTED, f"needs at least 2 training seeds (got {n_seeds})", nums)
    ratio = lambda a, b: a / b if b > 0 else (float("nan") if a == 0 else float("inf"))  # noqa: E731
    nums["ratio"] = ratio(std_itdep, std_final)
    extra = ""
    if sample_stds is not None and finite(*sample_stds):
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


def verdict_lower_error(nrmse_new: float, nrmse_ref: float, tie: float = LOWER_ERROR_TIE,
                        what: str = "iteration-dependent networks", ref: str = "shared network") -> Verdict:
    """(c) ``nrmse_new`` is (slightly) lower than ``nrmse_ref``. Higher by at most ``tie``
    (relative, default 1 %): partly (no difference to speak of)."""
    nums = {"new": nrmse_new, "ref": nrmse_ref}
    if not finite(nrmse_new, nrmse_ref):
        return Verdict(NOT_TESTED, "missing numbers", nums)
    rel = relative_difference(nrmse_new, nrmse_ref)
    nums["relative"] = rel
    if rel < 0:
        return Verdict(REPRODUCED, f"{what} {nrmse_new:.2f} % < {ref} {nrmse_ref:.2f} % ({rel:+.1%})", nums)
    if rel <= tie:
        return Verdict(PARTLY, f"{what} {nrmse_new:.2f} % vs {ref} {nrmse_ref:.2f} % ({rel:+.1%}, within {tie:.0%})",
                       nums)
    return Verdict(NOT_REPRODUCED, f"{what} {nrmse_new:.2f} % > {ref} {nrmse_ref:.2f} % ({rel:+.1%})", nums)


def verdict_no_notable_loss(nrmse_sequential: float, nrmse_end_to_end: float, tol: float = ACCURACY_TOLERANCE,
                            partial: float = ACCURACY_PARTIAL) -> Verdict:
    """(d) Sequential training does not notably hurt accuracy: its NRMSE is at most ``tol``
    (relative, 5 %) above end-to-end training's (lower is fine); at most ``partial`` (10 %):
    partly."""
    nums = {"sequential": nrmse_sequential, "end_to_end": nrmse_end_to_end}
    if not finite(nrmse_sequential, nrmse_end_to_end):
        return Verdict(NOT_TESTED, "missing numbers", nums)
    rel = relative_difference(nrmse_sequential, nrmse_end_to_end)
    nums["relative"] = rel
    msg = f"NRMSE sequential {nrmse_sequential:.2f} % vs end-to-end {nrmse_end_to_end:.2f} % ({rel:+.1%})"
    if rel <= tol:
        return Verdict(REPRODUCED, msg + f", within +{tol:.0%}", nums)
    if rel <= partial:
        return Verdict(PARTLY, msg + f", within +{partial:.0%}", nums)
    return Verdict(NOT_REPRODUCED, msg + f", more than +{partial:.0%}", nums)


def verdict_memory_reduction(reduction: float | None, claimed: float = MEMORY_CLAIM, rounding: float = MEMORY_ROUNDING,
                             partial: float = MEMORY_PARTIAL, extrapolated: bool = False) -> Verdict:
    """(e) Sequential training needs up to ``claimed`` (98 %) less memory than end-to-end:
    reproduced when the reduction rounds to at least the claim (``>= claimed - rounding``),
    partly from ``partial`` (90 %). ``extrapolated``: the end-to-end value was extrapolated
    (it did not fit in memory), which the reason says."""
    nums = {"reduction": reduction, "claimed": claimed, "extrapolated": extrapolated}
    if not finite(reduction):
        return Verdict(NOT_TESTED, "no measurement", nums)
    note = " (end-to-end extrapolated: it did not fit)" if extrapolated else ""
    if reduction >= claimed - rounding:
        return Verdict(REPRODUCED, f"reduction {reduction:.1%} >= {claimed:.0%}{note}", nums)
    if reduction >= partial:
        return Verdict(PARTLY, f"reduction {reduction:.1%} < {claimed:.0%} but >= {partial:.0%}{note}", nums)
    return Verdict(NOT_REPRODUCED, f"reduction {reduction:.1%} < {partial:.0%}{note}", nums)


def verdict_flat(Ks: Sequence[int], values: Sequence[float], tol: float = FLAT_TOLERANCE, k_min: int = FLAT_FROM_K,
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
    vals = {k: v for k, v in baselines.items() if finite(v)}
    if not finite(fbsem) or not vals:
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
    names = [k for k in paper if k in ours and finite(ours[k])]
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
    if not finite(t_sequential, t_end_to_end) or t_end_to_end <= 0 or epochs_per_module < 1 or epochs < 1:
        raise ValueError("training_time_ratio needs positive times and epochs")
    return (t_sequential / epochs_per_module) / (t_end_to_end / epochs)


def verdict_time_ratio(ratio: float | None, target: float = TIME_RATIO_TARGET) -> Verdict:
    """Sequential training time at most ``target`` x end-to-end's (same epochs per module)."""
    nums = {"ratio": ratio, "target": target}
    if not finite(ratio):
        return Verdict(NOT_TESTED, "no measurement", nums)
    if ratio <= target:
        return Verdict(REPRODUCED, f"sequential / end-to-end = {ratio:.2f} <= {target}", nums)
    return Verdict(NOT_REPRODUCED, f"sequential / end-to-end = {ratio:.2f} > {target}", nums)


def projector_targets(rows: Iterable[Mapping], impl: str = "fbsemlib-torch-matrix", device: str = "cpu",
                      target_batch1: float = PROJECTOR_SPEEDUP_BATCH1, target_batchN: float = PROJECTOR_SPEEDUP_BATCHN,
                      case_prefix: str = "2D parallel") -> dict:
    """Speed-ups over ASTRA's CPU Joseph projector of ``impl`` at the smallest and largest
    batch (per image), from the rows of ``projector.json``; ``met_*`` are None when a number
    is missing."""
    rows = [r for r in rows if str(r.get("case", "")).startswith(case_prefix)]
    astra = [r for r in rows if r.get("impl") == "astra-cpu-joseph" and finite(r.get("s_per_image"))]
    ours = {int(r["batch"]): r for r in rows if r.get("impl") == impl and r.get("device") == device
            and finite(r.get("s_per_image"))}
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
