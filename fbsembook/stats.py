"""The statistics of the book's comparisons: one module for every claim's interval and test.

Pure functions of numbers and evaluation dicts (numpy only, no torch), unit-tested in
``tests/book/test_stats.py``; :mod:`fbsembook.rules` applies them to the claims with the
verdict rules of ``fbsembook/claims_rules.yaml``. Every choice below is the book's (the
papers report single numbers without intervals).

* **Paired relative margins** (:func:`paired_margins`): a metric of two methods on the same
  test images, paired by ``(subject, image)``, each averaged over its noise realisations
  first; per image ``(ref - new) / ref`` for a metric where lower is better (NRMSE) and
  ``(new - ref) / ref`` where higher is better (SSIM), so a positive margin always means
  "``new`` is better". With several training runs (seeds) of an arm, one margin per seed
  and image (the i-th runs of the two arms are paired).
* **Hierarchical bootstrap** (:func:`hierarchical_bootstrap`): a percentile interval (95 %)
  on the mean margin, resampling subjects, then images within each resampled subject, and,
  for margins of training runs, training seeds. Seeds and test images are crossed (every run
  is evaluated on the same images), so seeds are resampled independently of the subjects.
  Resampling the images as well as the subjects counts the within-subject spread about
  twice: the interval is slightly conservative when there are many subjects. With few
  subjects (fewer than about 8) a percentile interval is too narrow, whatever the number of
  images: the rules flag that.
* **Equivalence** (:func:`tost`): two one-sided tests against ``-margin`` and ``+margin``,
  with bootstrap p-values; at ``alpha`` they are the ``1 - 2 alpha`` (90 %) interval lying
  inside ``(-margin, margin)``. "Does not notably hurt" is one-sided: only the lower test
  (non-inferiority) decides it.
* **Spread ratio** (:func:`spread_ratio`): the ratio of two standard deviations across
  training seeds with a percentile bootstrap interval (seeds resampled within each arm).
  With 10 seeds per arm its 95 % interval spans about a factor 2 each way.
* **Holm's step-down correction** (:func:`holm`) for a family of claims. A claim outside the
  family is labelled *exploratory*: its interval and p-value are reported unadjusted.
* **Verdicts** (:func:`verdict`, :func:`noninferiority_verdict`, :func:`weakest`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "REPRODUCED",
    "DIRECTION_ONLY",
    "INCONCLUSIVE",
    "NOT_REPRODUCED",
    "VERDICTS",
    "BETTER",
    "relative_margin",
    "metric_by_image",
    "PairedMargins",
    "paired_margins",
    "image_layout",
    "by_subject",
    "Interval",
    "percentile_interval",
    "bootstrap_p_value",
    "hierarchical_bootstrap",
    "TOST",
    "tost",
    "SpreadRatio",
    "spread_ratio",
    "holm",
    "verdict",
    "noninferiority_verdict",
    "weakest",
]

REPRODUCED = "reproduced"
DIRECTION_ONLY = "direction only"
INCONCLUSIVE = "inconclusive"
NOT_REPRODUCED = "not reproduced"
#: the verdicts, strongest first (:func:`weakest` picks the last one present)
VERDICTS = (REPRODUCED, DIRECTION_ONLY, INCONCLUSIVE, NOT_REPRODUCED)
#: which way a metric is better
BETTER = ("lower", "higher")


def relative_margin(new, ref, better: str = "lower"):
    """``(ref - new) / ref`` (``better="lower"``) or ``(new - ref) / ref`` (``"higher"``):
    how much better ``new`` is than ``ref``, relative to ``ref`` (arrays element-wise)."""
    if better not in BETTER:
        raise ValueError(f"better must be one of {BETTER}, got {better!r}")
    new, ref = np.asarray(new, dtype=float), np.asarray(ref, dtype=float)
    out = (ref - new) / ref if better == "lower" else (new - ref) / ref
    return float(out) if out.ndim == 0 else out


def metric_by_image(evaluation: Mapping, method: str, metric: str) -> dict[tuple, float]:
    """``(subject, image) -> metric`` of ``method`` in an evaluation's ``rows``, averaged over
    the noise realisations of each image; rows where the metric is undefined (None, NaN) are
    left out, and so is an image without a defined value."""
    groups: dict[tuple, list[float]] = {}
    for r in evaluation["rows"]:
        if r["method"] != method:
            continue
        if r.get("subject") is None:
            raise ValueError(f"row {r.get('sample')} of {method!r} has no subject: cannot pair by (subject, image)")
        key = (r["subject"], r["sample"] if r.get("image") is None else r["image"])
        v = r.get(metric)
        vals = groups.setdefault(key, [])
        if v is not None and math.isfinite(float(v)):
            vals.append(float(v))
    if not groups:
        raise ValueError(f"the evaluation has no rows for method {method!r}")
    return {k: float(np.mean(v)) for k, v in groups.items() if v}


def _as_runs(x) -> list[Mapping]:
    return [x] if isinstance(x, Mapping) else list(x)


@dataclasses.dataclass(frozen=True)
class PairedMargins:
    """Relative margins of one comparison: ``values[seed, subject, j]`` is the margin of the
    ``j``-th image of ``subjects[subject]`` (``images[subject][j]``), NaN past a subject's
    images. ``new_mean`` / ``ref_mean``: the mean metric of each side over the same pairs."""

    values: np.ndarray
    subjects: tuple
    images: tuple
    new_mean: float
    ref_mean: float

    @property
    def n_seeds(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def n_images(self) -> int:
        return sum(len(i) for i in self.images)

    @property
    def mean(self) -> float:
        """The mean margin over every seed and image (each image counts once)."""
        return float(np.nanmean(self.values))


def paired_margins(new, ref, metric: str = "nrmse", new_method: str = "fbsem", ref_method: str = "fbsem",
                   better: str = "lower") -> PairedMargins:
    """The per-image relative margins (:func:`relative_margin`) of ``new_method`` in ``new``
    over ``ref_method`` in ``ref``: each an evaluation or a list of evaluations, one per
    training seed (the i-th of each side are paired; a single evaluation, e.g. of the
    baselines, is paired with every seed of the other side). Only images with a defined
    metric on both sides in every seed are kept."""
    news, refs = _as_runs(new), _as_runs(ref)
    if len(news) != len(refs) and 1 not in (len(news), len(refs)):
        raise ValueError(f"cannot pair {len(news)} runs with {len(refs)}")
    n = max(len(news), len(refs))
    news, refs = (s * n if len(s) == 1 else s for s in (news, refs))
    tables = [(metric_by_image(a, new_method, metric), metric_by_image(b, ref_method, metric))
              for a, b in zip(news, refs)]
    keys = set.intersection(*(set(a) & set(b) for a, b in tables))
    if not keys:
        raise ValueError(f"no test image has {metric!r} for both {new_method!r} and {ref_method!r}")
    subjects, images = image_layout(keys)
    new_v = by_subject([a for a, _ in tables], subjects, images)
    ref_v = by_subject([b for _, b in tables], subjects, images)
    vals = relative_margin(new_v, ref_v, better)
    ok = ~np.isnan(new_v)
    return PairedMargins(vals, subjects, images, float(new_v[ok].mean()), float(ref_v[ok].mean()))


def image_layout(keys) -> tuple[tuple, tuple]:
    """``(subjects, images)`` of a set of ``(subject, image)`` keys: the subjects sorted, and
    each subject's images sorted (the layout of :class:`PairedMargins` and of
    :func:`by_subject`'s arrays)."""
    subjects = tuple(sorted({s for s, _ in keys}, key=str))
    images = tuple(tuple(sorted((i for s, i in keys if s == subj), key=str)) for subj in subjects)
    return subjects, images


def by_subject(tables: Sequence[Mapping[tuple, float]], subjects: Sequence, images: Sequence) -> np.ndarray:
    """``(len(tables), subjects, images)`` array of ``(subject, image) -> value`` tables laid
    out by :func:`image_layout`, NaN past a subject's images."""
    out = np.full((len(tables), len(subjects), max(len(i) for i in images)), np.nan)
    for r, t in enumerate(tables):
        for si, (subj, ims) in enumerate(zip(subjects, images)):
            for j, im in enumerate(ims):
                out[r, si, j] = t[subj, im]
    return out


# ----------------------------------------------------------------------------------------
# intervals
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Interval:
    """An estimate with its ``level`` (e.g. 0.95) percentile bootstrap interval
    ``[low, high]`` and the bootstrap ``replicates`` it came from."""

    estimate: float
    low: float
    high: float
    level: float
    replicates: np.ndarray = dataclasses.field(repr=False, compare=False)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "n_boot": int(len(self.replicates))}


def percentile_interval(replicates: np.ndarray, estimate: float, level: float = 0.95) -> Interval:
    """The ``level`` percentile interval of bootstrap ``replicates`` (order statistics: an
    infinite replicate, e.g. a spread ratio over a zero spread, stays infinite)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reps = np.asarray(replicates, dtype=float)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        raise ValueError("no defined bootstrap replicate")
    a = (1 - level) / 2
    low, high = np.quantile(reps, [a, 1 - a], method="inverted_cdf")
    return Interval(float(estimate), float(low), float(high), float(level), reps)


def bootstrap_p_value(replicates: np.ndarray, null: float = 0.0, alternative: str = "greater") -> float:
    """Bootstrap p-value of the null ``parameter <= null`` (``alternative="greater"``), or
    ``>= null`` (``"less"``), or twice the smaller of the two (``"two-sided"``): the share of
    replicates on the null's side, ``(1 + count) / (1 + B)`` so that it is never 0. It is
    below ``alpha`` exactly when the one-sided ``1 - alpha`` percentile bound excludes
    ``null`` (to one replicate)."""
    reps = np.asarray(replicates, dtype=float)
    reps = reps[~np.isnan(reps)]
    le = (1 + np.count_nonzero(reps <= null)) / (1 + reps.size)
    ge = (1 + np.count_nonzero(reps >= null)) / (1 + reps.size)
    if alternative == "greater":
        return float(le)
    if alternative == "less":
        return float(ge)
    if alternative == "two-sided":
        return float(min(1.0, 2 * min(le, ge)))
    raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _packed(values) -> tuple[np.ndarray, np.ndarray]:
    """``(seeds, subjects, images)`` values with each subject's images first (NaN after) and
    the number of images of each subject; the same images in every seed."""
    v = np.asarray(values.values if isinstance(values, PairedMargins) else values, dtype=float)
    if v.ndim == 2:
        v = v[None]
    if v.ndim != 3 or v.size == 0:
        raise ValueError(f"margins must be (subjects, images) or (seeds, subjects, images), got shape {v.shape}")
    ok = ~np.isnan(v)
    if not (ok == ok[0]).all():
        raise ValueError("every seed must have the same images")
    order = np.argsort(~ok[0], axis=1, kind="stable")
    v = np.take_along_axis(v, np.broadcast_to(order, v.shape), axis=2)
    counts = ok[0].sum(axis=1)
    v, counts = v[:, counts > 0], counts[counts > 0]
    if counts.size == 0:
        raise ValueError("no defined margin")
    return v, counts


def hierarchical_bootstrap(margins, n_boot: int = 10_000, level: float = 0.95, seed=0,
                           levels: Iterable[str] = ("seeds", "subjects", "images")) -> Interval:
    """Percentile interval on the mean of ``margins`` (a :class:`PairedMargins`, or an array
    ``(subjects, images)`` or ``(seeds, subjects, images)``, NaN where a subject has fewer
    images) by resampling with replacement the ``levels``: ``"seeds"`` (independently of
    the subjects: seeds and images are crossed), ``"subjects"``, and ``"images"`` within
    each resampled subject. A replicate is the mean over the resampled images (each counts
    once, so a subject counts by its number of images) of the margin averaged over the
    resampled seeds; the estimate is the same mean without resampling. ``seed``: an int or
    a ``numpy`` Generator. Vectorised: 10 000 replicates of 20 subjects x 10 images take a
    few tens of milliseconds."""
    levels = set(levels)
    if not levels <= {"seeds", "subjects", "images"}:
        raise ValueError(f"unknown levels {sorted(levels - {'seeds', 'subjects', 'images'})}")
    v, counts = _packed(margins)
    R, S, M = v.shape
    B = int(n_boot)
    rng = _rng(seed)
    flat = np.nan_to_num(v).reshape(R, S * M)
    if "seeds" in levels and R > 1:
        draws = rng.integers(0, R, (B, R)) + R * np.arange(B)[:, None]
        weights = np.bincount(draws.ravel(), minlength=B * R).reshape(B, R)
        per_seed = weights @ flat / R  # (B, S * M): each replicate's seed-averaged margins
    else:
        per_seed = flat.mean(axis=0, keepdims=True)
    subj = rng.integers(0, S, (B, S)) if "subjects" in levels else np.broadcast_to(np.arange(S), (B, S))
    n_sel = counts[subj][..., None]  # (B, S, 1)
    if "images" in levels:
        img = np.floor(rng.random((B, S, M)) * n_sel).astype(np.int64)
    else:
        img = np.broadcast_to(np.arange(M), (B, S, M))
    valid = np.arange(M) < n_sel
    idx = np.where(valid, subj[..., None] * M + np.minimum(img, M - 1), 0).reshape(B, S * M)
    picked = per_seed[0][idx] if per_seed.shape[0] == 1 else np.take_along_axis(per_seed, idx, axis=1)
    reps = (picked * valid.reshape(B, S * M)).sum(axis=1) / valid.reshape(B, -1).sum(axis=1)
    estimate = float(np.nansum(v.mean(axis=0)) / counts.sum())
    return percentile_interval(reps, estimate, level)


# ----------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TOST:
    """Two one-sided tests with equivalence ``margin``: ``p_lower`` of the null ``effect <=
    -margin``, ``p_upper`` of ``effect >= +margin``, and the ``1 - 2 alpha`` interval."""

    p_lower: float
    p_upper: float
    interval: Interval
    margin: float
    alpha: float

    @property
    def equivalent(self) -> bool:
        """Both nulls rejected: the effect lies within ``(-margin, margin)``."""
        return max(self.p_lower, self.p_upper) < self.alpha

    @property
    def noninferior(self) -> bool:
        """The lower null rejected: the effect is above ``-margin`` (not notably worse)."""
        return self.p_lower < self.alpha

    @property
    def p_value(self) -> float:
        """The TOST p-value, ``max(p_lower, p_upper)``."""
        return max(self.p_lower, self.p_upper)


def tost(margins, margin: float, alpha: float = 0.05, n_boot: int = 10_000, seed=0,
         levels: Iterable[str] = ("seeds", "subjects", "images")) -> TOST:
    """Equivalence test of the mean of ``margins`` (an :class:`Interval`, whose replicates are
    used, or what :func:`hierarchical_bootstrap` takes) with bootstrap p-values
    (:func:`bootstrap_p_value`); the interval is the ``1 - 2 alpha`` (90 % at 0.05) one."""
    if not margin > 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    boot = margins if isinstance(margins, Interval) else hierarchical_bootstrap(margins, n_boot, 0.95, seed, levels)
    reps = boot.replicates
    return TOST(bootstrap_p_value(reps, -margin, "greater"), bootstrap_p_value(reps, margin, "less"),
                percentile_interval(reps, boot.estimate, 1 - 2 * alpha), float(margin), float(alpha))


@dataclasses.dataclass(frozen=True)
class SpreadRatio:
    """``std_new / std_ref`` (sample standard deviations across seeds) with its interval."""

    std_new: float
    std_ref: float
    n_new: int
    n_ref: int
    interval: Interval

    @property
    def ratio(self) -> float:
        return self.interval.estimate


def _ratio(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(a, dtype=float) / np.asarray(b, dtype=float)


def spread_ratio(new: Sequence[float], ref: Sequence[float], n_boot: int = 10_000, level: float = 0.95,
                 seed=0) -> SpreadRatio:
    """The ratio of the standard deviations (``ddof = 1``) of ``new`` and ``ref`` (e.g. the
    test-mean NRMSE of each training seed of two arms; below 1: ``new`` is more consistent)
    with a percentile bootstrap interval, the seeds of each arm resampled independently. A
    zero spread in the denominator gives an infinite ratio, both zero an undefined one
    (left out of the interval)."""
    a, b = (np.asarray([x for x in s if x is not None and math.isfinite(x)], dtype=float) for s in (new, ref))
    if a.size < 2 or b.size < 2:
        raise ValueError(f"a spread needs at least 2 values per arm, got {a.size} and {b.size}")
    rng = _rng(seed)
    B = int(n_boot)
    sa = a[rng.integers(0, a.size, (B, a.size))].std(axis=1, ddof=1)
    sb = b[rng.integers(0, b.size, (B, b.size))].std(axis=1, ddof=1)
    std_a, std_b = float(a.std(ddof=1)), float(b.std(ddof=1))
    return SpreadRatio(std_a, std_b, int(a.size), int(b.size),
                       percentile_interval(_ratio(sa, sb), float(_ratio(std_a, std_b)), level))


def holm(p_values, alpha: float = 0.05):
    """Holm's step-down correction of a family of p-values: sorted ascending, the i-th
    (from 0) of m is multiplied by ``m - i``, made non-decreasing and capped at 1. Returns
    ``(adjusted, rejected)`` in the input's order (lists, or dicts for a mapping): a null is
    rejected when its adjusted p-value is below ``alpha``, which controls the family-wise
    error at ``alpha`` under any dependence between the tests. The family is the
    confirmatory claims; a claim labelled *exploratory* instead (e.g. on test sets of the
    book's own choosing) stays out of it and is reported unadjusted, with that label."""
    keys = list(p_values) if isinstance(p_values, Mapping) else None
    p = np.asarray([p_values[k] for k in keys] if keys is not None else list(p_values), dtype=float)
    if np.isnan(p).any() or ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must be in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = adj_sorted
    rejected = adjusted < alpha
    if keys is not None:
        return dict(zip(keys, adjusted.tolist())), dict(zip(keys, rejected.tolist()))
    return adjusted.tolist(), rejected.tolist()


# ----------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------
def _bounds(interval) -> tuple[float, float]:
    low, high = (interval.low, interval.high) if isinstance(interval, Interval) else interval
    if math.isnan(low) or math.isnan(high) or low > high:
        raise ValueError(f"not an interval: {interval!r}")
    return float(low), float(high)


def verdict(interval, minimum_effect: float, tie_band: float) -> str:
    """The verdict of a claimed effect from the interval ``[low, high]`` of a margin that is
    positive in the paper's direction (an :class:`Interval` or a pair), the smallest effect
    that counts as reproducing it (``minimum_effect > 0``) and the band of effects too small
    to matter (``0 <= tie_band <= minimum_effect``). In this order:

    1. **reproduced**: ``low > minimum_effect``, the whole interval lies beyond the minimum
       effect;
    2. **not reproduced**: ``high < tie_band``, the interval rules out every effect that
       matters: it lies below 0 (the opposite effect), inside the tie band, or across both;
    3. **direction only**: ``low > 0``, an effect in the paper's direction, but the interval
       does not exclude effects below the minimum;
    4. **inconclusive** otherwise: the interval holds 0 and effects that matter.

    So an effect of zero is never reproduced: it is inconclusive when the interval is wider
    than the tie band, not reproduced when the data are precise enough to place it inside.
    A measurement without sampling error is the interval ``(x, x)``."""
    low, high = _bounds(interval)
    if not minimum_effect > 0 or not 0 <= tie_band <= minimum_effect:
        raise ValueError(f"need minimum_effect > 0 and 0 <= tie_band <= minimum_effect, got {minimum_effect}, "
                         f"{tie_band}")
    if low > minimum_effect:
        return REPRODUCED
    if high < tie_band:
        return NOT_REPRODUCED
    if low > 0:
        return DIRECTION_ONLY
    return INCONCLUSIVE


def noninferiority_verdict(interval, margin: float) -> str:
    """The verdict of "``new`` does not notably hurt" from the ``1 - 2 alpha`` interval
    (:attr:`TOST.interval`) of a margin positive when ``new`` is better and the largest
    loss that is not notable, ``margin > 0``: **reproduced** when ``low > -margin`` (the
    lower one-sided test rejects "worse by ``margin`` or more"), **not reproduced** when
    ``high < -margin`` (notably worse), **inconclusive** otherwise. ("Direction only" has no
    meaning here: a claim of no notable loss has no direction.)"""
    low, high = _bounds(interval)
    if not margin > 0:
        raise ValueError(f"the margin must be positive, got {margin}")
    if low > -margin:
        return REPRODUCED
    if high < -margin:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def weakest(verdicts: Iterable[str]) -> str:
    """The weakest of several verdicts (order of :data:`VERDICTS`): a claim made of several
    comparisons (an intersection-union test) holds only as far as its weakest one."""
    vs = list(verdicts)
    bad = [v for v in vs if v not in VERDICTS]
    if not vs or bad:
        raise ValueError(f"need verdicts among {VERDICTS}, got {vs}")
    return max(vs, key=VERDICTS.index)

