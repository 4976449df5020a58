"""Small plotting and table helpers shared by the book's chapters.

Everything takes torch tensors or numpy arrays; images may carry any leading dimensions
``(..., Z, Y, X)`` and are shown as the middle axial slice of their first item
(:func:`as_slice`).

* :func:`as_slice`        -- a 2D numpy slice of an image;
* :func:`show_images`     -- a grid of images with a shared or per-panel colour scale
  (:func:`fbsembook.figures.show_images`: colour bars with units);
* :func:`lesion_row`      -- the image row that crosses the most lesion voxels (for line profiles);
* :func:`plot_profiles`   -- line profiles of several images along one row;
* :func:`batch_mean`      -- the mean over a batch of a per-sample metric (e.g.
  :func:`fbsemlib.evaluation.metrics.nrmse` of a batch), as one float;
* :func:`plot_sweep`      -- NRMSE-vs-strength curves of a baseline sweep with the best marked;
* :func:`summary_table`   -- a "mean ± std" table of an evaluation summary;
* :func:`recipe_table`    -- a flat (key, value) table of a nested configuration dict.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fbsembook.figures import show_images

__all__ = [
    "as_slice",
    "show_images",
    "lesion_row",
    "plot_profiles",
    "batch_mean",
    "plot_sweep",
    "summary_table",
    "recipe_table",
    "METHOD_LABELS",
]

#: display names of the evaluation / baseline methods
METHOD_LABELS: dict[str, str] = {
    "fbsem": "FBSEM-Net",
    "osem": "OSEM",
    "osem_postfilter": "OSEM + Gaussian filter",
    "mapem_quadratic": "MAP-EM (quadratic)",
    "mapem_bowsher": "MAP-EM (Bowsher)",
}


def as_slice(img: Any, z: int | None = None) -> np.ndarray:
    """The 2D ``(Y, X)`` numpy slice ``z`` (default: the middle one) of the first item of
    an image ``(..., Z, Y, X)``; a 2D input is returned as a numpy array."""
    if hasattr(img, "detach"):
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    if a.ndim < 2:
        raise ValueError(f"an image needs at least 2 dimensions, got shape {a.shape}")
    if a.ndim == 2:
        return a
    a = a.reshape((-1,) + a.shape[-3:])[0]  # first item, (Z, Y, X)
    return a[a.shape[0] // 2 if z is None else z]


def lesion_row(labels: Any) -> int:
    """Index of the image row (Y) whose line crosses the most lesion voxels of a label or
    boolean image ``(..., Z, Y, X)`` (middle slice of the first item); the middle row
    when there is no lesion."""
    s = as_slice(labels) != 0
    per_row = s.sum(axis=1)
    if per_row.max() == 0:
        return s.shape[0] // 2
    return int(np.argmax(per_row))


def plot_profiles(ax, images: Mapping[str, Any], row: int, *, x_mm: Sequence[float] | None = None,
                  styles: Mapping[str, Mapping] | None = None):
    """Plot the values of every image of ``images`` (label -> image) along ``row`` of its
    middle slice on ``ax``; ``x_mm`` gives the x coordinates (default: pixel index)."""
    styles = styles or {}
    for label, img in images.items():
        line = as_slice(img)[row]
        x = np.arange(line.size) if x_mm is None else np.asarray(x_mm)
        ax.plot(x, line, label=label, **dict(styles.get(label, {})))
    ax.set_xlabel("x (mm)" if x_mm is not None else "x (pixel)")
    ax.legend(fontsize=8)
    return ax


def batch_mean(values: Any) -> float:
    """The mean of per-sample values (a float, or a tensor / array with one value per
    sample of a batch, e.g. ``metrics.nrmse(batch_images, references, masks)``) as one
    float (NumPy's mean, on the CPU)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return float(np.mean(np.asarray(values)))


def plot_sweep(ax, curve: Sequence[Sequence], best: float | None, *, label: str | None = None,
               color: str | None = None, logx: bool = True):
    """One method's sweep curve ``[(strength, nrmse), ...]`` on ``ax`` with ``best`` marked
    by a star (log x axis by default)."""
    pts = [(float(s), float(v)) for s, v in curve if s is not None]
    if not pts:
        raise ValueError("the curve has no (strength, value) points")
    s, v = np.asarray(pts).T
    (line,) = ax.plot(s, v, "o-", label=label, color=color)
    if best is not None:
        i = int(np.argmin(np.abs(s - float(best))))
        ax.plot(s[i], v[i], "*", ms=16, color=line.get_color(), markeredgecolor="k", zorder=3)
    if logx:
        ax.set_xscale("log")
    return ax


def summary_table(summary: Mapping[str, Mapping], metrics: Sequence[str] = ("nrmse", "ssim"),
                  methods: Sequence[str] | None = None, digits: int = 3):
    """A pandas DataFrame (one row per method, one column per metric, "mean ± std") of an
    evaluation ``summary`` (``{method: {metric: {"mean", "std", "n"}}}``); missing values
    show as "n/a"."""
    import pandas as pd

    methods = list(methods or summary)
    rows = {}
    for m in methods:
        cells = {}
        for k in metrics:
            d = summary.get(m, {}).get(k) or {}
            mean, std = d.get("mean"), d.get("std")
            cells[k] = "n/a" if mean is None else (f"{mean:.{digits}g} ± {std:.{digits - 1}g}" if std is not None
                                                   else f"{mean:.{digits}g}")
        rows[METHOD_LABELS.get(m, m)] = cells
    return pd.DataFrame.from_dict(rows, orient="index")


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v)


def recipe_table(config: Mapping[str, Any], prefix: str = ""):
    """A two-column pandas DataFrame (``parameter``, ``value``) of a nested configuration
    dict, nested keys joined with dots (``phantom.template_resolution``)."""
    import pandas as pd

    rows = []

    def walk(d, pre):
        for k, v in d.items():
            key = f"{pre}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, key + ".")
            else:
                rows.append((key, _fmt(v)))

    walk(config, prefix)
    return pd.DataFrame(rows, columns=["parameter", "value"])
