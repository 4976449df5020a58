"""The results chapter's numbers: every method's metrics with intervals, the share of the
removable error, and the forest plot of the claims' margins.

Pure functions of evaluation dicts (:func:`fbsembook.experiments.evaluate`) and of the
verdicts of :mod:`fbsembook.rules`; the intervals are those of :mod:`fbsembook.stats`
(hierarchical bootstrap over subjects -> images, and over training seeds when a method
is given as several runs), so that a number in the table and a margin in the forest plot
carry the same kind of uncertainty.

* :func:`mean_interval`: the mean of a metric of one method with its 95 % interval;
* :func:`removable_share`: the share of the *removable* error, noisy OSEM -> the last
  target ``t_K``, that a method removes, ``(NRMSE_OSEM - NRMSE_method) / (NRMSE_OSEM -
  NRMSE(t_K))`` (ratio of means over the test images; its interval resamples numerator and
  denominator together). 100 % is all that reproducing the iteration-dependent targets can
  give; more than 100 % goes past the targets towards the phantom;
* :func:`method_table`: one row per method with both, NRMSE against the phantom and
  against ``t_K``, SSIM, and the lesions' contrast recovery (hot, cold) and white-matter
  background variability;
* :func:`forest_plot`: each claim's margin (or margins) with its interval, the minimum
  effect that counts and the tie band.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from fbsembook import stats as S

__all__ = ["PAPER_2021_NRMSE", "per_image", "mean_interval", "removable_share", "method_table", "TABLE_METRICS", "forest_plot",
           "claims_data", "verdict_table", "target_nrmse_by_module"]

#: Test NRMSE (%) of the 2021 FBSEM-Net paper on its 2D BrainWeb data (a number to compare with,
#: not a result of this book)
PAPER_2021_NRMSE: dict[str, float] = {"FBSEM-Net": 14.4, "MAP-EM": 17.7, "OSEM": 20.7}

#: metric -> (column, scale to display, decimals): what :func:`method_table` shows
TABLE_METRICS: dict[str, tuple[str, float, int]] = {
    "nrmse": ("NRMSE vs phantom (%)", 1.0, 2),
    "nrmse_last_target": ("NRMSE vs t_K (%)", 1.0, 2),
    "ssim": ("SSIM", 1.0, 3),
    "crc_hot": ("CRC hot", 1.0, 2),
    "crc_cold": ("CRC cold", 1.0, 2),
    "bv_wm": ("BV white matter (%)", 1.0, 2),
}


def _runs(x) -> list[Mapping]:
    return [x] if isinstance(x, Mapping) else list(x)


def per_image(evaluations, method: str, metric: str) -> np.ndarray:
    """``(seeds, subjects, images)`` values of ``metric`` of ``method`` (each image averaged
    over its noise realisations, :func:`fbsembook.stats.metric_by_image`), NaN past a
    subject's images; ``evaluations``: one evaluation or a list (one per training seed; only
    the images defined in all of them are kept)."""
    tables = [S.metric_by_image(e, method, metric) for e in _runs(evaluations)]
    keys = set.intersection(*(set(t) for t in tables))
    if not keys:
        raise ValueError(f"no test image has {metric!r} for {method!r}")
    return S.by_subject(tables, *S.image_layout(keys))


def mean_interval(evaluations, method: str, metric: str, n_boot: int = 4000, seed: int = 0,
                  level: float = 0.95) -> S.Interval:
    """The mean of ``metric`` of ``method`` over the test images (and seeds) with its
    ``level`` hierarchical-bootstrap interval."""
    return S.hierarchical_bootstrap(per_image(evaluations, method, metric), n_boot, level, seed)


def removable_share(evaluations, method: str, osem: Mapping, n_boot: int = 4000, seed: int = 0,
                    level: float = 0.95) -> S.Interval:
    """The share of the removable error (see the module docstring) that ``method`` removes,
    with its interval. ``osem``: the evaluation holding ``osem`` rows (the baselines');
    ``target_floor`` (NRMSE of ``t_K``) is read from ``evaluations``' rows."""
    runs = _runs(evaluations)
    m = per_image(runs, method, "nrmse")
    o = per_image([osem] * len(runs), "osem", "nrmse")
    floor = per_image(runs, method, "target_floor")
    if m.shape != o.shape or m.shape != floor.shape:
        raise ValueError("the method, OSEM and the targets must be evaluated on the same test images")
    num, den = o - m, o - floor
    a = S.hierarchical_bootstrap(num, n_boot, level, seed)
    b = S.hierarchical_bootstrap(den, n_boot, level, seed)  # the same resampling (same seed and shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = a.replicates / b.replicates
    return S.percentile_interval(reps, a.estimate / b.estimate if b.estimate else math.nan, level)


def _fmt(iv: S.Interval | None, scale: float = 1.0, decimals: int = 2) -> str:
    if iv is None:
        return "-"
    f = f"{{:.{decimals}f}}"
    return f"{f.format(iv.estimate * scale)} [{f.format(iv.low * scale)}, {f.format(iv.high * scale)}]"


def method_table(methods: Sequence[tuple[str, object, str]], osem: Mapping, n_boot: int = 4000,
                 seed: int = 0) -> list[dict]:
    """One row per ``(label, evaluation(s), method)``: every metric of
    :data:`TABLE_METRICS` as ``mean [95 % CI]`` and the share of the removable error (%).
    A metric a method lacks (e.g. no cold lesion in the test images) shows ``-``."""
    rows = []
    for label, ev, method in methods:
        row = {"method": label}
        for metric, (col, scale, dec) in TABLE_METRICS.items():
            try:
                row[col] = _fmt(mean_interval(ev, method, metric, n_boot, seed), scale, dec)
            except ValueError:
                row[col] = "-"
        try:
            row["share of removable error (%)"] = _fmt(removable_share(ev, method, osem, n_boot, seed), 100.0, 0)
        except ValueError:
            row["share of removable error (%)"] = "-"
        rows.append(row)
    return rows


def forest_plot(verdicts: Mapping, ax=None, colours: Mapping[str, str] | None = None):
    """The claims' margins as a forest plot: one line per comparison (per test set), its
    estimate and interval (%), the minimum effect that counts (a tick) and the tie band
    (grey); coloured by the claim's verdict. ``verdicts``: claim key ->
    :class:`fbsembook.rules.ClaimVerdict`. Returns the axes."""
    import matplotlib.pyplot as plt

    colours = dict(colours or {S.REPRODUCED: "#009E73", S.DIRECTION_ONLY: "#56B4E9", S.INCONCLUSIVE: "#E69F00",
                               S.NOT_REPRODUCED: "#D55E00"})
    lines = []
    for key, v in verdicts.items():
        for c in v.comparisons:
            if c.estimate is None:
                continue
            n = c.numbers
            lines.append((f"({key}) {c.label}", c, v.verdict, n.get("minimum_effect"), n.get("tie_band"),
                          n.get("equivalence_margin")))
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.45 * max(len(lines), 2) + 1.2))
    # the axis spans the estimates and thresholds, at most -100 % .. +110 %: a longer interval
    # (e.g. a spread ratio from few seeds) is drawn to the edge with an arrow head
    finite = [100 * x for _, c, *_ in lines for x in (c.estimate, c.low, c.high) if x is not None and np.isfinite(x)]
    finite += [100 * t for *_, me, tie, eq in lines for t in (me, eq) if t]
    lo, hi = max(-100.0, min(finite + [0.0]) - 5), min(110.0, max(finite + [0.0]) + 5)
    clip = lambda v: min(max(100 * v, lo), hi)  # noqa: E731
    for i, (label, c, verdict, me, tie, eq) in enumerate(lines):
        y = len(lines) - 1 - i
        col = colours.get(verdict, "grey")
        if tie:
            ax.add_patch(plt.Rectangle((-100 * tie, y - 0.35), 200 * tie, 0.7, color="0.88", zorder=0))
        if eq:
            ax.plot([-100 * eq] * 2, [y - 0.35, y + 0.35], color="k", lw=1.5)
        if me:
            ax.plot([100 * me] * 2, [y - 0.35, y + 0.35], color="k", lw=1.5)
        if c.low is not None and c.high is not None and not (np.isnan(c.low) or np.isnan(c.high)):
            a, b = clip(c.low), clip(c.high)
            ax.plot([a, b], [y, y], color=col, lw=2.5)
            for end, v, mk in ((a, 100 * c.low, "<"), (b, 100 * c.high, ">")):
                if v != end:  # beyond the axis
                    ax.plot([end], [y], mk, color=col, ms=8)
        ax.plot([clip(c.estimate)], [y], "o", color=col, ms=7)
    ax.set_xlim(lo, hi)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(lines)), [ln[0] for ln in reversed(lines)], fontsize=8)
    ax.set_xlabel("relative margin in the paper's direction (%): > 0 = the claim's direction")
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2.5, label=k) for k, c in colours.items()]
    handles += [plt.Rectangle((0, 0), 1, 1, color="0.88", label="tie band"),
                plt.Line2D([], [], color="k", lw=1.5, label="minimum effect / equivalence margin")]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    return ax


def claims_data(*, targets: Mapping[str, Sequence], networks: Mapping[str, Sequence], sequential: Mapping,
                end_to_end: Mapping, baselines: Mapping, generalisation: Mapping | None = None,
                memory: Mapping | None = None) -> dict:
    """The data of each claim of ``fbsembook/claims_rules.yaml``, keyed by the run names of
    its comparisons (:func:`fbsembook.rules.assess_all` takes it as is):

    * ``targets``: ``{"itdep-end-to-end": [evaluation per seed], "final-target": [...]}`` (a);
    * ``generalisation``: ``{test set: {the same two runs: [evaluation per seed]}}`` (b);
    * ``networks``: ``{"itdep-end-to-end": [...], "shared-itdep": [...]}``, seeds paired (c);
    * ``sequential`` / ``end_to_end``: one evaluation each, same seed (d, f, g);
    * ``memory``: ``{"sequential": bytes, "end-to-end": bytes}`` at the claim's K (e);
    * ``baselines``: the baselines' evaluation (f, g).

    A claim whose data are missing (None) is left out: the chapter reports it as not tested."""
    data = {
        "a": dict(targets),
        "c": dict(networks),
        "d": {"sequential": sequential, "itdep-end-to-end": end_to_end},
        "f": {"sequential": sequential, "baselines": baselines},
        "g": {"sequential": sequential, "baselines": baselines},
    }
    if generalisation:
        data["b"] = {name: dict(v) for name, v in generalisation.items()}
    if memory and None not in memory.values():
        data["e"] = dict(memory)
    return data


def verdict_table(verdicts: Mapping) -> list[dict]:
    """One row per claim: its verdict, each comparison's margin with its interval, the
    p-values (raw and Holm-adjusted) and the family."""
    rows = []
    for key, v in verdicts.items():
        margins = []
        for c in v.comparisons:
            if c.estimate is None:
                margins.append(f"{c.label}: -")
            elif c.low == c.high:
                margins.append(f"{c.label}: {100 * c.estimate:+.1f} %")
            else:
                margins.append(f"{c.label}: {100 * c.estimate:+.1f} % [{100 * c.low:+.1f}, {100 * c.high:+.1f}]")
        row = v.row()
        rows.append({"claim": row["claim"], "verdict": v.verdict, "margin [95 % CI]": "; ".join(margins),
                     "p": row["p"], "p (Holm)": row["p (Holm)"], "family": row["family"]})
    return rows


def target_nrmse_by_module(data_dir, split: str = "test") -> np.ndarray:
    """``(samples, K)``: the NRMSE (%) to the phantom, inside the brain, of every
    iteration-dependent target ``t_k`` of the samples of ``split``: how far the targets
    themselves are from the truth (the floor of a network that reproduces them)."""
    from fbsemlib.data import PETDataset
    from fbsemlib.evaluation.metrics import nrmse

    ds = PETDataset(data_dir, split)
    out = []
    for i in range(len(ds)):
        s = ds[i]
        act, brain = s["activity"], s["brain_mask"]
        out.append([float(nrmse(t, act, brain)) for t in s["targets"]])
    return np.asarray(out)
