"""The book machinery (fbsembook.profiles, chapters, execute, publish and build: `fbsem book ...`;
_config.yml / _toc.yml).

The slow tests share one smoke-profile build of a copy of the working tree (the
``smoke_book`` fixture of conftest.py), so they never touch book/_build or book/_executed of
the checkout itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import numpy as np
import pytest

from fbsembook import chapters, execute, profiles, publish
from myst_chapter import myst_chapter

REPO = Path(__file__).resolve().parents[2]
# `fbsem ...` with this interpreter (`python -m fbsemlib.cli` would load cli.py twice, as
# __main__ and as fbsemlib.cli, and miss the UserError -> exit 2 mapping)
FBSEM = [sys.executable, "-c", "import sys; from fbsemlib.cli import main; sys.exit(main())"]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("MPLBACKEND", profiles.ROOT_ENV, profiles.PROFILE_ENV, profiles.CACHE_ENV):
        env.pop(var, None)
    env.update(extra)
    return env


def _fbsem(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FBSEM, *args], cwd=root, env=_clean_env(), text=True, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


# ----------------------------------------------------------------------------------------
# fast unit tests
# ----------------------------------------------------------------------------------------
def test_profile_params_resolution():
    defaults = {"n": {"smoke": 8, "cpu": 64, "paper": 172}, "lr": 1e-3, "k": {"smoke": 2, "default": 10}}
    ns = {"n": None, "lr": None, "k": None}
    p = profiles.profile_params(defaults, "smoke", ns)
    assert (p.n, p.lr, p.k, p.profile) == (8, 1e-3, 2, "smoke")
    assert p.sources == {"n": "profile", "lr": "profile", "k": "profile"}
    p = profiles.profile_params(defaults, "paper", {**ns, "lr": 0.5})
    assert (p.n, p.lr, p.k) == (172, 0.5, 10) and p.sources["lr"] == "override"
    assert "override" in repr(p) and "<table>" in p._repr_html_()
    with pytest.raises(KeyError, match="not declared in the parameters cell"):
        profiles.profile_params(defaults, "cpu", {"n": None})
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.profile_params(defaults, "gpu", ns)
    with pytest.raises(KeyError, match="no value for profile"):
        profiles.profile_params({"n": {"smoke": 1}}, "cpu")


def test_profile_from_environment(monkeypatch):
    monkeypatch.delenv(profiles.PROFILE_ENV, raising=False)
    assert profiles.resolve_profile() == "cpu"
    monkeypatch.setenv(profiles.PROFILE_ENV, "smoke")
    assert profiles.resolve_profile() == "smoke"
    assert profiles.resolve_profile("paper") == "paper"


def test_parameter_values_are_yaml_scalars():
    v = execute.parse_parameter_values([("a", "64"), ("b", "1e-3"), ("c", "true"), ("d", "null"),
                                     ("e", "tiny2d"), ("f", "[1, 2]"), ("g", "'64'")])
    assert v == {"a": 64, "b": 1e-3, "c": True, "d": None, "e": "tiny2d", "f": [1, 2], "g": "64"}
    from fbsemlib.errors import UserError

    with pytest.raises(UserError):
        execute.parse_parameter_values([("not-a-name", "1")])


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(profiles.CACHE_ENV, str(tmp_path / "c"))
    assert profiles.cache_dir("data", "x") == tmp_path / "c" / "data" / "x"
    assert (tmp_path / "c" / "data" / "x").is_dir()
    monkeypatch.delenv(profiles.CACHE_ENV)
    monkeypatch.chdir(REPO)
    assert profiles.cache_dir(create=False) == REPO / ".cache" / "fbsem"


def test_toc_and_config_layout():
    import yaml

    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert cfg["only_build_toc_files"] is True
    files = chapters.toc_files(REPO)
    assert files[0] in ("book/intro", "book/00_introduction")
    for f in files:
        if not f.startswith(chapters.EXECUTED_DIR + "/"):
            assert (REPO / f"{f}.md").is_file(), f
    chs = chapters.chapters(REPO)
    assert chs and chs[0].name == "01_forward_model"
    assert chapters.find_chapter("1", REPO) == chs[0]
    assert chapters.find_chapter("01", REPO) == chs[0]
    assert chapters.find_chapter("forward_model", REPO) == chs[0]
    assert chapters.find_chapter("book/01_forward_model.md", REPO) == chs[0]


@pytest.mark.parametrize("chapter", chapters.chapters(REPO), ids=lambda c: c.name)
def test_chapter_follows_the_conventions(chapter):
    """Every chapter: NN_slug.md, a MyST notebook, a `parameters` cell whose first line reads
    the profile from FBSEM_PROFILE and whose other parameters default to None."""
    import ast

    assert re.fullmatch(r"\d\d_[a-z0-9_]+", chapter.name), chapter.name
    text = chapter.source.read_text()
    assert "format_name: myst" in text
    nb = chapters.convert(chapter)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    first = cell.source.strip().splitlines()[0]
    assert re.match(r'profile\s*=\s*os\.environ\.get\(\s*["\']FBSEM_PROFILE["\']', first), first
    names = chapters.notebook_parameters(nb)
    assert names[0] == "profile"
    for node in ast.parse(cell.source).body[1:]:
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value is None, (
            f"{chapter.name}: parameters other than `profile` must default to None (the profile's value): "
            f"{ast.unparse(node)}")


# ----------------------------------------------------------------------------------------
# the shared smoke build
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(smoke_book):
    """The smoke build that the slow tests of tests/book share (conftest.py)."""
    return smoke_book


@pytest.mark.slow
def test_build_smoke_produces_every_page(built):
    root, proc = built["root"], built["proc"]
    assert proc.returncode == 0, proc.stdout[-6000:]
    html = root / "book" / "_build" / "html"
    assert (html / "index.html").is_file()
    assert (html / "book" / "intro.html").is_file()
    chs = chapters.chapters(root)
    assert chs
    for c in chs:
        assert (html / c.html).is_file(), c.html
        assert c.executed.is_file()
        nb = nbformat.read(c.executed, as_version=4)
        assert nb.metadata["fbsem"]["profile"] == "smoke"
        assert nb.metadata["papermill"]["parameters"]["profile"] == "smoke"
        assert not any(o.get("output_type") == "error" for cell in _code_cells(nb) for o in cell.outputs)
        assert re.search(rf"^{c.name}\s+smoke\s+ok\s+[\d.]+ s$", proc.stdout, re.M), f"no summary row for {c.name}"
    assert "total (wall)" in proc.stdout
    # the page shows the executed outputs, it was not re-executed by jupyter-book
    page = (html / chs[0].html).read_text()
    assert "adjoint test passed: True" in page


@pytest.mark.slow
def test_nbval_on_converted_notebooks(built, tmp_path):
    """pytest --nbval-lax on the jupytext conversions, the profile from FBSEM_PROFILE; the
    `# NBVAL_CHECK_OUTPUT` cells are compared with the outputs of the papermill run. A
    tampered copy of chapter 1 must fail, which proves the comparison happens."""
    root = built["root"]
    assert built["proc"].returncode == 0
    files = []
    for c in chapters.chapters(root):
        nb = publish.nbval_notebook(c)
        path = c.source.with_name(f"{c.name}.nbval.ipynb")  # next to the source: same working directory
        nbformat.write(nb, path)
        files.append(path)
    first = chapters.chapters(root)[0]
    nb = publish.nbval_notebook(first)
    checked = [c for c in _code_cells(nb) if "NBVAL_CHECK_OUTPUT" in c.source]
    assert checked and "adjoint test passed: True" in _stream_text(checked[0])
    checked[0].outputs[0]["text"] = "adjoint test passed: False\n"
    tampered = first.source.with_name(f"{first.name}.tampered.nbval.ipynb")
    nbformat.write(nb, tampered)

    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\n")
    junit = tmp_path / "nbval.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-c", str(ini), "--rootdir", str(root / "book"), "-p", "no:cacheprovider",
         "--nbval-lax", "--nbval-current-env", f"--junitxml={junit}", *map(str, files), str(tampered)],
        cwd=root / "book", env=_clean_env(FBSEM_PROFILE="smoke"), text=True, timeout=600,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    cases = ET.parse(junit).getroot().iter("testcase")
    failed: dict[str, int] = {}
    total: dict[str, int] = {}
    for case in cases:
        name = case.get("classname", "") + case.get("file", "") + case.get("name", "")
        key = "tampered" if "tampered" in name else "good"
        total[key] = total.get(key, 0) + 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed[key] = failed.get(key, 0) + 1
    assert total.get("good", 0) >= len(files), proc.stdout[-4000:]
    assert failed.get("good", 0) == 0, proc.stdout[-6000:]
    assert failed.get("tampered", 0) == 1, proc.stdout[-6000:]
    assert "adjoint test passed: False" in proc.stdout


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
            proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                                  capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"apt-get could not install chromium: {e}")
    exe = shutil.which("chromium")
    if proc.returncode != 0 or not exe:
        pytest.skip(f"apt-get could not install chromium: {(proc.stderr or proc.stdout)[-500:]}")
    return exe


def _screenshot(exe: str, url: str, png: Path, size: tuple[int, int], profile_dir: Path):
    from PIL import Image

    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile_dir}", f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
           "--virtual-time-budget=3000", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot of {url}: {proc.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _figure_blocks(img: np.ndarray, block: int = 32) -> int:
    """Blocks of the image mostly made of saturated colours: plots (colour maps, coloured
    lines), never text or the theme's chrome."""
    sat = (img.max(-1) - img.min(-1)) > 50
    H, W = sat.shape
    b = sat[: H // block * block, : W // block * block].reshape(H // block, block, W // block, block)
    return int((b.mean((1, 3)) > 0.5).sum())


@pytest.mark.slow
def test_pages_render_in_headless_chromium(built, tmp_path):
    root = built["root"]
    assert built["proc"].returncode == 0
    exe = _chromium()
    html = root / "book" / "_build" / "html"
    shots = {}
    for name, page, size in [
        ("intro", html / "book" / "intro.html", (1280, 2000)),
        # tall: the first figure of a chapter comes after its set-up and parameter cells
        ("chapter", html / chapters.chapters(root)[0].html, (1280, 6000)),
    ]:
        png = tmp_path / f"{name}.png"
        img = _screenshot(exe, page.as_uri(), png, size, tmp_path / f"chromium-{name}")
        nonwhite = float((img.min(-1) < 235).mean())
        assert nonwhite > 0.02 and float(img.std()) > 15, f"{name} page looks blank ({png})"
        shots[name] = img
        keep = os.environ.get("FBSEM_KEEP_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, Path(keep) / png.name)
    # the chapter page embeds the matplotlib figures as <img> files that exist
    page = (html / chapters.chapters(root)[0].html).read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+\.png)"', page)
    assert len(srcs) >= 3, srcs
    for s in srcs:
        assert (html / chapters.chapters(root)[0].html).parent.joinpath(s).resolve().is_file(), s
    # ... and the screenshot shows them; the intro (text only) has no such region
    assert _figure_blocks(shots["chapter"]) >= 10
    assert _figure_blocks(shots["intro"]) == 0


@pytest.mark.slow
def test_run_one_chapter_with_a_parameter(built):
    root = built["root"]
    assert built["proc"].returncode == 0
    ch = chapters.chapters(root)[0]
    before = ch.executed.stat().st_mtime
    proc = _fbsem(root, "book", "run", "1", "-p", "lors_shown", "5", "--profile", "smoke")
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert ch.executed.stat().st_mtime > before
    nb = nbformat.read(ch.executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert re.search(r"^lors_shown = 5$", injected[0].source, re.M)
    assert re.search(r'^profile = "smoke"$', injected[0].source, re.M)
    assert nb.metadata["papermill"]["parameters"] == {"profile": "smoke", "lors_shown": 5}
    assert nb.metadata["fbsem"]["parameters"] == {"lors_shown": 5}
    # the parameter table of the chapter says where the value came from
    table = next(o for c in _code_cells(nb) for o in c.outputs if "text/html" in o.get("data", {})
                 and "lors_shown" in o["data"]["text/html"])
    assert re.search(r"lors_shown</code></td><td><code>5</code></td><td>override", table["data"]["text/html"])
    # html publishes it
    proc = _fbsem(root, "book", "html")
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "parameters {'lors_shown': 5}" in proc.stdout
    # user errors: exit 2, no execution
    bad = _fbsem(root, "book", "run", "1", "-p", "no_such_parameter", "1", "--profile", "smoke")
    assert bad.returncode == 2 and "unknown parameter" in bad.stdout, bad.stdout
    bad = _fbsem(root, "book", "run", "99", "--profile", "smoke")
    assert bad.returncode == 2 and "no chapter" in bad.stdout


BROKEN_CHAPTER = myst_chapter(
    "Broken", "", "fail = None",
    'import sys\nprint(sys.executable)\nif fail is None or fail:\n    raise ValueError("boom from the broken chapter")')


@pytest.mark.slow
def test_failures_are_reported(tmp_path):
    """A failing cell fails `execute` with the chapter and the error; `html` then refuses to
    publish; a Sphinx warning (here a broken reference) fails `html` (-W)."""
    root = tmp_path / "b"
    (root / "book").mkdir(parents=True)
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    shutil.copy2(REPO / "book" / "references.bib", root / "book" / "references.bib")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/_executed/01_broken\n")
    (root / "book" / "intro.md").write_text("# Intro\n\nSee {doc}`_executed/01_broken`.\n")
    (root / "book" / "01_broken.md").write_text(BROKEN_CHAPTER)

    proc = _fbsem(root, "book", "execute", "--profile", "smoke")
    assert proc.returncode == 1
    assert "01_broken" in proc.stdout and "FAILED" in proc.stdout
    assert "ValueError: boom from the broken chapter" in proc.stdout
    assert (root / "book" / "_executed" / "01_broken.failed.ipynb").is_file()
    proc = _fbsem(root, "book", "html")
    assert proc.returncode == 1 and "last execution failed" in proc.stdout

    # the parameter fixes it; the kernel is this interpreter
    proc = _fbsem(root, "book", "run", "broken", "-p", "fail", "false", "--profile", "smoke")
    assert proc.returncode == 0, proc.stdout[-4000:]
    nb = nbformat.read(root / "book" / "_executed" / "01_broken.ipynb", as_version=4)
    assert _stream_text(_code_cells(nb)[-1]).strip() == sys.executable
    assert not (root / "book" / "_executed" / "01_broken.failed.ipynb").exists()
    proc = _fbsem(root, "book", "html")
    assert proc.returncode == 0, proc.stdout[-4000:]

    # a warning fails the HTML build
    (root / "book" / "intro.md").write_text("# Intro\n\nSee {doc}`_executed/01_broken` and {doc}`missing_page`.\n")
    proc = _fbsem(root, "book", "html")
    assert proc.returncode != 0
    assert "missing_page" in proc.stdout


@pytest.mark.slow
def test_your_data_chapter_runs_in_the_smoke_build(built):
    """Chapter 11 reconstructs its stand-in files (HDF5 + NIfTI) with the cached run and the
    baselines; the command-line NIfTI output is the same image; the figure has alt text."""
    root = built["root"]
    assert built["proc"].returncode == 0
    ch = chapters.find_chapter("your_data", root)
    assert re.search(rf"^{ch.name}\s+smoke\s+ok\s+[\d.]+ s$", built["proc"].stdout, re.M)
    nb = nbformat.read(ch.executed, as_version=4)
    text = "".join(_stream_text(c) for c in _code_cells(nb))
    assert "the same image as above: True" in text and "recon.nii.gz" in text
    figs = [c for c in _code_cells(nb) if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert figs and all(c.metadata["mystnb"]["image"]["alt"] for c in figs)
    page = (root / "book" / "_build" / "html" / ch.html).read_text()
    assert re.search(r'<img alt="your data: every reconstruction on one colour scale', page)
