"""The book as a reader gets it (issue 15): pages that render with no network (MathJax
shipped with the build, every image and internal link resolving, no console errors), that
lead with the science (folded code, a generated rerun box, the chapter list from _toc.yml)
and that teach (a notation page, exercises whose solutions run in the smoke build).

Fast tests check fbsembook.presentation / fbsembook.sphinx_ext and the sources; the slow ones
open the pages of the shared smoke build (conftest.py) in headless Chromium through its
DevTools protocol (headless_browser.py), with the network switched off.
"""

from __future__ import annotations

import html as html_lib
import io
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import numpy as np
import pytest

from fbsembook import chapters, presentation
from fbsembook.sphinx_ext import chapter_list_markdown, chapter_summary

REPO = Path(__file__).resolve().parents[2]
EXERCISE_CHAPTERS = ("01_forward_model", "03_baselines", "04_original_fbsem", "07_sequential_training")
NOTATION_SYMBOLS = ("$y$", "$x$", "$A$", "$n$", "$a$", "$b$", "$s_m$", "$K$", "$M$", r"$\gamma$", r"$\beta$", "$t_k$")


# ----------------------------------------------------------------------------------------
# fast: the presentation of an executed chapter, the chapter list, the sources
# ----------------------------------------------------------------------------------------
def _notebook():
    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell("# A chapter\n\nThe science comes first."),
        v4.new_code_cell("import os\n%matplotlib inline"),
        v4.new_code_cell('profile = os.environ.get("FBSEM_PROFILE", "cpu")  # smoke | cpu | paper\n'
                         "image_size = None  # image pixels per side\ndevice = None  # cpu | cuda",
                         metadata={"tags": ["parameters"]}),
        v4.new_code_cell('p = profile_params({"image_size": {"smoke": 48, "default": 128}, "device": "auto"}, '
                         "profile, globals())\np"),
        v4.new_code_cell("def helper(x):\n    return 2 * x"),
        v4.new_code_cell("y = helper(3)\nprint(y)"),
        v4.new_code_cell("plt.plot([1, 2])", outputs=[v4.new_output("display_data", data={"image/png": "iVBOR"})]),
        v4.new_code_cell("plt.imshow(z)", metadata={"tags": ["show-input"]},
                         outputs=[v4.new_output("display_data", data={"image/png": "iVBOR"})]),
        v4.new_markdown_cell("```{solution-start} ex-1\n:class: dropdown\n```"),
        v4.new_code_cell("plt.plot(solution)", outputs=[v4.new_output("display_data", data={"image/png": "iVBOR"})]),
        v4.new_markdown_cell("```{solution-end}\n```"),
    ]
    return v4.new_notebook(cells=cells)


def test_plumbing_is_folded_and_results_stay_open():
    nb = _notebook()
    folded = presentation.fold_code(nb)
    # set-up, parameters, profile_params (its table stays: only the input is folded), helper, plot
    assert folded == [1, 2, 3, 4, 6]
    assert all(presentation.FOLD_TAG in nb.cells[i].metadata["tags"] for i in folded)
    assert "parameters" in nb.cells[2].metadata["tags"]  # papermill's tag kept
    assert presentation.FOLD_TAG not in nb.cells[5].metadata.get("tags", [])  # a computation
    assert presentation.FOLD_TAG not in nb.cells[7].metadata["tags"]  # show-input wins
    assert presentation.FOLD_TAG not in nb.cells[9].metadata.get("tags", [])  # an exercise's solution


def test_rerun_box_under_the_title():
    nb = _notebook()
    presentation.present(nb, "03_some_chapter", "smoke", {"image_size": 64}, seconds=12.3)
    title = nb.cells[0].source
    assert title.startswith("# A chapter\n")
    assert title.index(presentation.RERUN_CLASS) < title.index("The science comes first.")
    assert "fbsem book run 3 --profile smoke -p image_size 64" in title  # the exact command, with its override
    assert "executed with the `smoke` profile in 12 s" in title
    assert "- `image_size`: image pixels per side" in title and "- `device`" not in title
    assert "--profile my.yaml" in title and "notation page </book/notation>" in title
    presentation.present(nb, "03_some_chapter", "smoke", {"image_size": 64})  # again: one box
    assert nb.cells[0].source.count(presentation.RERUN_CLASS) == 1
    box = presentation.rerun_box(_notebook(), 3, "smoke")
    assert "e.g. `fbsem book run 3 --profile smoke -p image_size 48`" in box  # the profile's own value
    assert "notation" not in presentation.rerun_box(_notebook(), 3, "smoke", notation=False)  # a book without one
    no_title = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("no title here")])
    with pytest.raises(ValueError, match="title"):
        presentation.present(no_title, "01_x", "smoke")


def test_chapter_summary(tmp_path):
    src = tmp_path / "05_x.md"
    src.write_text("---\njupytext: {}\n---\n\n# The title\n\n```{note}\nskip me\n```\n\nFirst line of the\n"
                   "paragraph. It runs into an equation,\n\n$$\nx = 1\n$$\n\nSecond paragraph.\n")
    assert chapter_summary(src) == ("The title", "First line of the paragraph.")
    src.write_text("# T\n\nOne paragraph $x$ {cite:p}`key`.\n\nTwo.\n")
    assert chapter_summary(src) == ("T", "One paragraph $x$ {cite:p}`key`.")
    # a chapter's glued answer belongs to its page: the summary keeps the question
    src.write_text("# T\n\n**Question.** Does it work? **Answer.** {glue:md}`t_answer`\n\nMore.\n")
    assert chapter_summary(src) == ("T", "**Question.** Does it work?")


def test_chapter_list_covers_the_toc():
    text = chapter_list_markdown(REPO)
    chs = chapters.chapters(REPO)
    for c in chs:
        title, summary = chapter_summary(c.source)
        assert f"</book/_executed/{c.name}>" in text and title in text, c.name
        assert summary, f"{c.name}: no first paragraph to summarise it"
    assert len(re.findall(r"^\d+\. ", text, re.M)) == len(chs)
    assert "planned" not in text.lower()


def test_notation_page_and_exercises_in_the_sources():
    notation = (REPO / "book" / "notation.md").read_text()
    for symbol in NOTATION_SYMBOLS:
        assert symbol in notation, f"the notation page does not define {symbol}"
    assert "book/notation" in chapters.toc_files(REPO)
    for name in EXERCISE_CHAPTERS:
        text = (REPO / "book" / f"{name}.md").read_text()
        assert "```{exercise}" in text, name
        gated = re.search(r"```\{solution-start\}.*?```\{solution-end\}", text, re.S)
        assert gated and "```{code-cell}" in gated.group(0), f"{name}: no code cell inside its solution"


def test_book_config_renders_offline():
    import yaml

    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    ext = cfg["sphinx"]["extra_extensions"]
    assert {"sphinx-mathjax-offline", "sphinx_exercise", "fbsembook.sphinx_ext"} <= set(ext)
    lock = (REPO / "requirements-lock.txt").read_text()
    assert re.search(r"^sphinx-mathjax-offline==", lock, re.M) and re.search(r"^sphinx-exercise==", lock, re.M)


# ----------------------------------------------------------------------------------------
# slow: the built pages in headless Chromium, offline
# ----------------------------------------------------------------------------------------
_PAGE_JS = r"""(() => {
  const skip = el => el.closest('pre, code, script, style, mjx-container, .highlight, textarea, .output');
  const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  while (walker.nextNode()) {
    const n = walker.currentNode, el = n.parentElement;
    if (!el || skip(el) || !el.getClientRects().length) continue;
    const m = n.textContent.match(/\\\(|\\\)|\\\[|\\\]|\$\$|\\(frac|mathrm|bar|hat|odot|top|lVert|sum|text)\b/);
    if (m) raw.push(n.textContent.trim().slice(0, 120));
  }
  const maths = [...document.querySelectorAll('span.math, div.math')];
  return {
    raw,
    maths: maths.length,
    untypeset: maths.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80)),
    mjx: document.querySelectorAll('mjx-container').length,
    mathjaxFonts: [...document.fonts].filter(f => f.family.includes('MJX') && f.status === 'loaded').length,
    images: [...document.images].map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  };
})()"""

_EQUATION_JS = r"""(() => {
  const frac = document.querySelector('mjx-container[display="true"] mjx-mfrac');
  if (!frac) return null;
  const math = frac.closest('mjx-container').querySelector('mjx-math');
  math.scrollIntoView({block: 'center', behavior: 'instant'});  // the theme scrolls smoothly otherwise
  const r = math.getBoundingClientRect();  // in the viewport
  return {x: Math.floor(r.left) - 4, y: Math.floor(r.top) - 4, width: Math.ceil(r.width) + 8, height: Math.ceil(r.height) + 8};
})()"""


def _pages(html: Path, root: Path) -> list[Path]:
    return [html / "book" / "intro.html", html / "book" / "notation.html", html / "book" / "references.html",
            *(html / c.html for c in chapters.chapters(root))]


def _broken_links(page: Path, hrefs: list[str], html: Path, cache: dict[Path, str]) -> list[str]:
    """Internal (file://) links whose file, or whose #fragment in an HTML file, is missing."""
    bad = []
    for href in hrefs:
        u = urlsplit(href)
        if u.scheme != "file":
            continue
        target = Path(unquote(u.path))
        if u.path.endswith("/"):
            target = target / "index.html"
        if not target.is_file():
            bad.append(f"{href} (no such file)")
            continue
        if u.fragment and target.suffix == ".html":
            text = cache.setdefault(target, target.read_text(errors="replace"))
            frag = re.escape(unquote(u.fragment))
            if not re.search(rf'\b(id|name)="{frag}"', text):
                bad.append(f"{href} (no #{unquote(u.fragment)} there)")
    return bad


@pytest.fixture(scope="module")
def browser(smoke_book, tmp_path_factory):
    from headless_browser import Browser
    from test_book import _chromium

    assert smoke_book["proc"].returncode == 0, smoke_book["proc"].stdout[-6000:]
    with Browser(_chromium(), tmp_path_factory.mktemp("chromium")) as b:
        yield b


@pytest.mark.slow
def test_pages_render_offline(smoke_book, browser):
    """Every page: maths typeset by the MathJax shipped in _static (no raw TeX visible, the
    MathJax fonts loaded), every image loaded, no console error, no request leaving the
    machine, every internal link resolving."""
    html, root = smoke_book["html"], smoke_book["root"]
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    problems: list[str] = []
    cache: dict[Path, str] = {}
    for page in _pages(html, root):
        name = page.relative_to(html).as_posix()
        report = browser.open(page.as_uri())
        info = browser.evaluate(report["session"], _PAGE_JS)
        browser.close_page(report)
        problems += [f"{name}: {e}" for e in report.errors]
        problems += [f"{name}: request to {u}" for u in report.requests if urlsplit(u).scheme not in ("file", "data", "blob")]
        problems += [f"{name}: raw TeX in the text: {t!r}" for t in info["raw"]]
        problems += [f"{name}: maths not typeset: {t!r}" for t in info["untypeset"]]
        if info["maths"] and (info["mjx"] < info["maths"] or info["mathjaxFonts"] == 0):
            problems.append(f"{name}: {info['mjx']} MathJax outputs for {info['maths']} formulas, "
                            f"{info['mathjaxFonts']} MathJax fonts loaded")
        problems += [f"{name}: image did not load: {i['src']}" for i in info["images"] if not i["ok"]]
        problems += [f"{name}: broken link {b}" for b in _broken_links(page, info["links"], html, cache)]
        if page.name in ("intro.html", "notation.html") or "_executed" in name:
            assert info["maths"] > 0, f"{name} has no maths: was the page built?"
    assert not problems, "\n".join(problems[:40])


@pytest.mark.slow
def test_equations_show_in_screenshots(smoke_book, browser, tmp_path):
    """A displayed fraction on the introduction and on chapter 1, as pixels: a glyph-sized
    block of ink with the fraction bar, a long horizontal line, in it."""
    from PIL import Image

    html = smoke_book["html"]
    keep = os.environ.get("FBSEM_KEEP_SCREENSHOTS")
    for name, page in [("intro", html / "book" / "intro.html"),
                       ("chapter1", html / chapters.chapters(smoke_book["root"])[0].html)]:
        report = browser.open(page.as_uri())
        clip = browser.evaluate(report["session"], _EQUATION_JS)
        assert clip, f"{name}: no displayed equation with a fraction typeset by MathJax"
        shot = Image.open(io.BytesIO(browser.screenshot(report["session"])))  # the viewport
        browser.close_page(report)
        x0, y0 = max(clip["x"], 0), max(clip["y"], 0)
        crop = shot.crop((x0, y0, min(x0 + clip["width"], shot.width), min(y0 + clip["height"], shot.height)))
        crop.save(tmp_path / f"{name}-equation.png")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy2(tmp_path / f"{name}-equation.png", Path(keep) / f"{name}-equation.png")
        img = np.asarray(crop.convert("L"))
        ink = img < 128
        assert img.shape[0] >= 30 and img.shape[1] >= 60, f"{name}: equation only {img.shape} px"
        assert 0.01 < ink.mean() < 0.6, f"{name}: the equation's pixels look empty or solid ({ink.mean():.3f})"
        runs = [max((len(r) for r in "".join("1" if v else "0" for v in row).split("0")), default=0) for row in ink]
        assert max(runs) >= 20, f"{name}: no fraction bar in the equation's pixels"


@pytest.mark.slow
def test_intro_lists_every_chapter(smoke_book):
    html, root = smoke_book["html"], smoke_book["root"]
    intro = (html / "book" / "intro.html").read_text()
    m = re.search(r'class="[^"]*fbsem-chapter-list[^"]*">(.*?)</ol>', intro, re.S)
    assert m, "no generated chapter list on the introduction"
    listed = m.group(1)
    for c in chapters.chapters(root):
        title, _ = chapter_summary(c.source)
        assert f'href="_executed/{c.name}.html"' in listed, f"{c.name} is missing from the introduction"
        assert title.replace("'", "&#8217;") in listed or title in listed, title
    assert "planned" not in listed.lower()
    assert 'href="notation.html"' in intro


@pytest.mark.slow
def test_chapter_pages_fold_code_rerun_box_and_download(smoke_book):
    """Each chapter page: the rerun box with its command, folded code cells whose source is
    still in the page (one click shows it), a link to the notation page and the executed
    notebook to download."""
    html, root = smoke_book["html"], smoke_book["root"]
    for c in chapters.chapters(root):
        page = (html / c.html).read_text()
        text = html_lib.unescape(re.sub(r"<[^>]+>", "", page))
        assert presentation.RERUN_CLASS in page and f"fbsem book run {c.number} --profile smoke" in text, c.name
        assert "tag_hide-input" in page, f"{c.name}: no folded code"
        assert "profile = os.environ.get(" in text, f"{c.name}: the parameters cell's code is not in the page"
        assert 'href="../notation.html"' in page, f"{c.name}: no link to the notation page"
        dl = re.search(r'href="([^"]+\.ipynb)"[^>]*btn-download-source-button', page)
        assert dl, f"{c.name}: no download button for the notebook"
        assert (html / c.html).parent.joinpath(dl.group(1)).resolve().is_file(), dl.group(1)


@pytest.mark.slow
def test_exercise_solutions_run_in_the_smoke_build(smoke_book):
    html, root = smoke_book["html"], smoke_book["root"]
    for name in EXERCISE_CHAPTERS:
        nb = nbformat.read(root / "book" / "_executed" / f"{name}.ipynb", as_version=4)
        inside, ran = False, []
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                inside = ("{solution-start}" in cell.source) or (inside and "{solution-end}" not in cell.source)
            elif inside:
                outs = cell.get("outputs", [])
                assert not any(o.get("output_type") == "error" for o in outs), name
                ran.append(bool(outs))
        assert ran and all(ran), f"{name}: the solution's code cells have no output"
        page = (html / "book" / "_executed" / f"{name}.html").read_text()
        assert re.search(r'class="[^"]*exercise', page) and re.search(r'class="[^"]*solution', page), name
