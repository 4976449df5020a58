"""Verdicts: pure functions of numbers (no I/O, no torch) that say whether a claim or a
performance target holds, unit-tested in ``tests/book/test_verdicts.py``.

Each returns a :class:`Verdict`: one of :data:`REPRODUCED`, :data:`PARTLY`,
:data:`NOT_REPRODUCED`, :data:`NOT_TESTED`, with the numbers it was computed from and a
one-line reason. They judge the performance targets of the benchmarks and chapters 7, 8
and 10 (:func:`projector_targets`, :func:`verdict_flat`, :func:`verdict_time_ratio`,
:func:`verdict_memory_reduction`); the thresholds are the book's choices, each a named
constant below. The papers' claims (a)-(g) are NOT judged here: their rules are
``fbsembook/claims_rules.yaml``, applied with intervals by :mod:`fbsembook.rules`.
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
    "memory_reduction",
    "flatness",
    "linear_fit",
    "extrapolate_linear",
    "verdict_memory_reduction",
    "verdict_flat",
    "verdict_time_ratio",
    "training_time_ratio",
    "projector_targets",
]

# -- the book's thresholds (the papers state none) ----------------------------------------
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


# ----------------------------------------------------------------------------------------
# verdicts of the paper's claims
# ----------------------------------------------------------------------------------------
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
