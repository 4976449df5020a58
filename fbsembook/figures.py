"""Figures people can read: one style, colour-blind-safe colours, colour bars with units, one
colour scale across compared images, and alt text on every figure.

* :data:`OKABE_ITO` -- the Okabe-Ito palette (distinguishable with every common colour-vision
  deficiency; matplotlib's default ``tab10`` is not), the line colours of every figure;
  images use perceptually uniform maps (:data:`CMAP_ACTIVITY` ``magma``, :data:`CMAP_MR`
  ``gray``) and a diverging ColorBrewer map for differences (:data:`CMAP_DIFFERENCE`);
* :func:`setup` -- sets those in matplotlib's ``rcParams`` (once; called by :func:`install`);
* :func:`show_images` -- images side by side on ONE colour scale (by default) with a colour
  bar labelled with its unit;
* :func:`shared_colorbar` -- one labelled colour bar for panels drawn on one scale;
* :func:`describe` -- the alt text of a figure, from its titles, axis labels and colour bars;
* :func:`install` -- in a chapter's kernel (the book's kernel runs it at start-up, see
  :mod:`fbsembook.execute`): applies :func:`setup` and attaches :func:`describe` to every
  figure the notebook displays (in the output's metadata, ``image/png: {alt: ...}``);
* :func:`apply_alt_text` -- after execution: copies each cell's figure descriptions to the
  cell metadata MyST-NB reads (``mystnb: image: alt``), so every image of the HTML page has
  an ``alt`` attribute; an image without a description gets its chapter and position.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["OKABE_ITO", "TAB_TO_OKABE_ITO", "CMAP_ACTIVITY", "CMAP_MR", "CMAP_DIFFERENCE", "ACTIVITY_UNIT", "setup", "show_images", "shared_colorbar",
           "describe", "install", "apply_alt_text"]

#: Okabe & Ito (2008), "Color Universal Design": orange, sky blue, bluish green, yellow, blue,
#: vermillion, reddish purple, black
OKABE_ITO: tuple[str, ...] = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
CMAP_ACTIVITY = "magma"
CMAP_MR = "gray"
CMAP_DIFFERENCE = "RdBu_r"
#: the unit of the activity images (simulated: arbitrary units proportional to the tracer concentration)
ACTIVITY_UNIT = "activity (a.u.)"
_IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml")
_MARK = "_fbsem_alt"


#: the Tableau colour names the chapters use, drawn from the Okabe-Ito palette instead, so that a
#: chapter's ``color="tab:red"`` next to ``"tab:green"`` stays distinguishable (gray stays gray)
TAB_TO_OKABE_ITO: dict[str, str] = {"tab:blue": "#0072B2", "tab:orange": "#E69F00", "tab:green": "#009E73",
                                    "tab:red": "#D55E00", "tab:purple": "#CC79A7", "tab:cyan": "#56B4E9",
                                    "tab:olive": "#F0E442", "tab:brown": "#000000"}


def setup() -> None:
    """Set the book's figure style in matplotlib's ``rcParams`` and map the ``tab:`` colour
    names to :data:`TAB_TO_OKABE_ITO` (idempotent)."""
    import matplotlib as mpl
    import matplotlib.colors as mcolors
    from cycler import cycler

    names = mcolors.get_named_colors_mapping()  # the table colour names resolve in (public API)
    for name, hex_ in TAB_TO_OKABE_ITO.items():
        names[name] = hex_  # item by item: its __setitem__ clears matplotlib's colour cache

    mpl.rcParams.update({
        "axes.prop_cycle": cycler(color=list(OKABE_ITO)),
        "image.cmap": CMAP_ACTIVITY,
        "image.interpolation": "nearest",
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "legend.fontsize": 8,
        "figure.dpi": 100,
    })


def _as_slice(img: Any) -> np.ndarray:
    from fbsembook.report import as_slice

    return as_slice(img)


def show_images(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    *,
    unit: str | None = ACTIVITY_UNIT,
    ncols: int | None = None,
    cmap: str | Sequence[str] = CMAP_ACTIVITY,
    vmin: float | None = 0.0,
    vmax: float | str | None = "shared",
    colorbar: bool = True,
    size: float = 2.6,
    suptitle: str | None = None,
):
    """Show images (each ``(..., Z, Y, X)``: the middle slice of the first item) in a grid;
    returns ``(fig, axes)`` (axes flattened, unused ones hidden).

    ``vmax="shared"`` (default): ONE colour scale for every panel (``vmin`` to the largest
    value), drawn as one colour bar labelled ``unit``; ``None``: each panel its own scale and
    colour bar; a number: that value for all. ``vmin`` likewise a number or ``None``. ``cmap``
    is one colour map or one per image."""
    import matplotlib.pyplot as plt

    slices = [_as_slice(im) for im in images]
    n = len(slices)
    if n == 0:
        raise ValueError("no images to show")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    cmaps = [cmap] * n if isinstance(cmap, str) else list(cmap)
    if len(cmaps) != n:
        raise ValueError(f"{len(cmaps)} colour maps for {n} images")
    ncols = min(n, ncols or n)
    nrows = -(-n // ncols)
    shared = vmax is not None
    one_bar = colorbar and shared and len(set(cmaps)) == 1
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, constrained_layout=True,
                             figsize=(size * ncols + (0.8 if one_bar else 0.5 * ncols if colorbar else 0),
                                      size * nrows + (0.4 if suptitle else 0)))
    axes = axes.ravel()
    top = max(float(np.nanmax(s)) for s in slices) if vmax == "shared" else vmax
    im = None
    for i, ax in enumerate(axes):
        if i >= n:
            ax.axis("off")
            continue
        im = ax.imshow(slices[i], cmap=cmaps[i], vmin=vmin, vmax=top, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
        if colorbar and not one_bar:
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            if unit:
                cb.set_label(unit, fontsize=8)
    if one_bar and im is not None:
        cb = fig.colorbar(im, ax=list(axes[:n]), fraction=0.046 if nrows == 1 else 0.03, pad=0.02)
        if unit:
            cb.set_label(unit + (" (one scale for all panels)" if n > 1 else ""), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig, axes


def shared_colorbar(fig, axes, mappable, label: str | None = ACTIVITY_UNIT):
    """One colour bar for ``axes`` (panels drawn on the same scale as ``mappable``), labelled
    with ``label`` (its unit); returns it."""
    cb = fig.colorbar(mappable, ax=list(np.ravel(axes)), fraction=0.046 / max(1, np.ndim(axes)), pad=0.02)
    if label:
        cb.set_label(label, fontsize=8)
    return cb


def describe(fig) -> str:
    """Alt text of a matplotlib figure: its title, then each panel's title (or axis labels)
    and each colour bar's label."""
    parts: list[str] = []
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text().strip():
        parts.append(sup.get_text().strip())
    panels, bars = [], []
    for ax in fig.get_axes():
        if not ax.get_visible() or not ax.axison and not ax.images and not ax.lines:
            continue
        if getattr(ax, "_colorbar", None) is not None or ax.get_label() == "<colorbar>":
            label = ax.get_ylabel() or ax.get_xlabel()
            if label:
                bars.append(label)
            continue
        title = ax.get_title().strip()
        labels = " vs ".join(x for x in (ax.get_ylabel().strip(), ax.get_xlabel().strip()) if x)
        kind = "image" if ax.images else "plot" if ax.lines or ax.collections or ax.patches else ""
        text = "; ".join(x for x in (title, labels) if x)
        if text or kind:
            panels.append(f"{kind} {text}".strip() if text else kind)
    if panels:
        count = f"{len(panels)} panels: " if len(panels) > 1 else ""
        parts.append(count + " | ".join(dict.fromkeys(panels)))
    if bars:
        parts.append("colour scale: " + ", ".join(dict.fromkeys(bars)))
    return " ".join(". ".join(parts).split()) if parts else "figure"  # one line: titles may hold line breaks


def _wrap(formatter_fn):
    def with_alt(fig, *args, **kwargs):
        data = formatter_fn(fig, *args, **kwargs)
        if data is None:
            return None
        if isinstance(data, tuple):
            data, md = data
            return data, {**(md or {}), "alt": describe(fig)}
        return data, {"alt": describe(fig)}

    setattr(with_alt, _MARK, True)
    return with_alt


def _attach(shell) -> None:
    """Wrap the image formatters of matplotlib figures so that they return the alt text too."""
    from matplotlib.figure import Figure

    for mime in ("image/png", "image/svg+xml", "image/jpeg"):
        formatter = shell.display_formatter.formatters.get(mime)
        if formatter is None:
            continue
        try:
            fn = formatter.lookup_by_type(Figure)
        except KeyError:
            continue
        if not getattr(fn, _MARK, False):
            formatter.for_type(Figure, _wrap(fn))


def install(shell=None) -> None:
    """In an IPython kernel: :func:`setup`, and alt text on every displayed figure (re-attached
    before each cell, since ``%matplotlib inline`` re-registers the figure formatters)."""
    setup()
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover
            return
        shell = get_ipython()
    if shell is None:
        return
    _attach(shell)
    if not getattr(shell, "_fbsem_alt_hook", False):
        shell.events.register("pre_run_cell", lambda *a: _attach(shell))
        shell.events.register("post_run_cell", lambda *a: setup())
        shell._fbsem_alt_hook = True


def apply_alt_text(nb, chapter: str = "this chapter"):
    """Give every code cell with an image output the cell metadata ``mystnb.image.alt`` that
    MyST-NB renders as the images' ``alt`` attribute: the descriptions that :func:`install`
    stored in the outputs' metadata (joined when a cell shows several), else "Figure N of
    <chapter>". An ``alt`` already in the cell's metadata is kept. Returns ``nb``."""
    n = 0
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        alts = []
        for out in cell.get("outputs", []) or []:
            mimes = [m for m in _IMAGE_MIMES if m in (out.get("data") or {})]
            if not mimes:
                continue
            n += 1
            md = (out.get("metadata") or {}).get(mimes[0]) or {}
            alts.append(str(md.get("alt") or f"Figure {n} of {chapter}"))
        if not alts:
            continue
        meta = cell.setdefault("metadata", {})
        image = meta.setdefault("mystnb", {}).setdefault("image", {})
        image.setdefault("alt", " / ".join(dict.fromkeys(alts)))
    return nb
