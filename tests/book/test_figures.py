"""fbsembook.figures: one colour scale with a labelled colour bar, the colour-blind-safe style,
and alt text on every figure of an executed chapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402

from fbsembook import figures  # noqa: E402
from myst_chapter import myst_chapter

REPO = Path(__file__).resolve().parents[2]
FBSEM = [sys.executable, "-c", "import sys; from fbsemlib.cli import main; sys.exit(main())"]


def test_show_images_one_scale_one_labelled_colour_bar():
    imgs = [np.ones((1, 4, 4)), 3 * np.ones((1, 4, 4))]
    fig, axes = figures.show_images(imgs, ["OSEM", "FBSEM-Net"], suptitle="test sample")
    assert [ax.images[0].get_clim() for ax in axes] == [(0.0, 3.0), (0.0, 3.0)]
    bars = [ax for ax in fig.get_axes() if ax not in list(axes)]
    assert len(bars) == 1 and bars[0].get_ylabel().startswith(figures.ACTIVITY_UNIT)
    alt = figures.describe(fig)
    assert alt.startswith("test sample. 2 panels: image OSEM | image FBSEM-Net") and "activity (a.u.)" in alt
    plt.close(fig)
    fig, axes = figures.show_images(imgs, vmax=None, unit="mm", cmap=["gray", "magma"])
    assert len(fig.get_axes()) == 4 and axes[0].images[0].get_clim() == (0.0, 1.0)
    plt.close(fig)


def test_style_is_colour_blind_safe():
    figures.setup()
    colours = [c["color"].upper() for c in matplotlib.rcParams["axes.prop_cycle"]]
    assert colours == [c.upper() for c in figures.OKABE_ITO]
    assert matplotlib.rcParams["image.cmap"] == figures.CMAP_ACTIVITY
    # the chapters' "tab:" colour names are drawn from the same palette (red next to green: vermillion, green)
    from matplotlib.colors import to_hex

    assert {to_hex(n).upper() for n in ("tab:red", "tab:green", "tab:blue", "tab:orange")} <= set(figures.OKABE_ITO)
    assert to_hex("tab:gray") == "#7f7f7f"


def test_apply_alt_text_fills_every_image_cell():
    nb = nbformat.v4.new_notebook()
    png = {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}
    nb.cells = [
        nbformat.v4.new_code_cell("plot()", outputs=[nbformat.v4.new_output("display_data", png,
                                                                            metadata={"image/png": {"alt": "a plot"}})]),
        nbformat.v4.new_code_cell("other()", outputs=[nbformat.v4.new_output("display_data", png)]),
        nbformat.v4.new_code_cell("x = 1"),
    ]
    nb.cells[1].metadata["mystnb"] = {"image": {"width": "50%"}}
    figures.apply_alt_text(nb, "chapter 01_x")
    assert nb.cells[0].metadata["mystnb"]["image"]["alt"] == "a plot"
    assert nb.cells[1].metadata["mystnb"]["image"] == {"width": "50%", "alt": "Figure 2 of chapter 01_x"}
    assert "mystnb" not in nb.cells[2].metadata


CHAPTER = myst_chapter(
    "Figures", "import numpy as np\nimport matplotlib.pyplot as plt\n%matplotlib inline", "",
    'fig, ax = plt.subplots()\nax.plot([0, 1], [1, 0])\nax.set_title("counts against time")\nplt.show()')


def test_executed_figures_carry_alt_text(tmp_path):
    root = tmp_path / "b"
    (root / "book").mkdir(parents=True)
    (root / "_config.yml").write_text((REPO / "_config.yml").read_text())
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/_executed/01_figs\n")
    (root / "book" / "01_figs.md").write_text(CHAPTER)
    proc = subprocess.run([*FBSEM, "book", "run", "1", "--profile", "smoke"], cwd=root, text=True, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    nb = nbformat.read(root / "book" / "_executed" / "01_figs.ipynb", as_version=4)
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any("image/png" in o.get("data", {}) for o in cell.outputs)
    assert cell.metadata["mystnb"]["image"]["alt"] == "plot counts against time"
