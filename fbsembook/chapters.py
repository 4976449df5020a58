"""The book's chapters: which there are (``_toc.yml``), where their sources and executed
notebooks live, and what their ``parameters`` cells declare.

Layout (all paths relative to the repository root, which holds ``_config.yml`` and
``_toc.yml``)::

    book/intro.md               plain MyST pages (not executed)
    book/NN_slug.md             chapters: MyST-markdown notebooks (jupytext ``format_name: myst``)
    book/_executed/NN_slug.ipynb  the executed chapters (git-ignored); ``_toc.yml`` lists these
    book/_build/html/           the HTML book (git-ignored)

``_toc.yml`` refers to a chapter by its executed notebook, ``book/_executed/NN_slug``; its
source is ``book/NN_slug.md``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from fbsemlib.errors import UserError
from fbsembook.profiles import book_root, profile_params

__all__ = [
    "BOOK_DIR",
    "EXECUTED_DIR",
    "Chapter",
    "toc_files",
    "chapters",
    "find_chapter",
    "notebook_defaults",
    "convert",
    "notebook_parameters",
    "chapter_defaults",
    "source_sha256",
]

BOOK_DIR = "book"
EXECUTED_DIR = "book/_executed"


@dataclass(frozen=True)
class Chapter:
    """A chapter notebook: ``source`` (``book/NN_slug.md``) executes to ``executed``
    (``book/_executed/NN_slug.ipynb``)."""

    name: str
    source: Path
    executed: Path

    @property
    def number(self) -> int | None:
        m = re.match(r"(\d+)_", self.name)
        return int(m.group(1)) if m else None

    @property
    def slug(self) -> str:
        return re.sub(r"^\d+_", "", self.name)

    @property
    def failed(self) -> Path:
        return self.executed.with_name(self.name + ".failed.ipynb")

    @property
    def html(self) -> str:
        return f"{EXECUTED_DIR}/{self.name}.html"


def _toc_files(entry: Any) -> Iterable[str]:
    if isinstance(entry, Mapping):
        for k in ("root", "file"):
            if isinstance(entry.get(k), str):
                yield entry[k]
        for k in ("parts", "chapters", "sections"):
            for e in entry.get(k) or []:
                yield from _toc_files(e)
    elif isinstance(entry, list):
        for e in entry:
            yield from _toc_files(e)


def toc_files(root: Path) -> list[str]:
    """Every ``file`` (and the ``root``) of ``_toc.yml``, in order, without extension."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in _toc_files(toc)]


def chapters(root: Path | None = None) -> list[Chapter]:
    """The executed chapters listed in ``_toc.yml`` (entries ``book/_executed/NAME``)."""
    root = Path(root) if root is not None else book_root()
    out = []
    prefix = EXECUTED_DIR + "/"
    for f in toc_files(root):
        if f.startswith(prefix):
            name = f[len(prefix):]
            out.append(Chapter(name, root / BOOK_DIR / f"{name}.md", root / EXECUTED_DIR / f"{name}.ipynb"))
    return out


def find_chapter(key: str, root: Path | None = None) -> Chapter:
    """A chapter by number (``"5"``, ``"05"``), slug (``"forward_model"``), name
    (``"01_forward_model"``) or path (``book/01_forward_model.md``)."""
    chs = chapters(root)
    k = Path(str(key)).name
    k = re.sub(r"\.(md|ipynb)$", "", k)
    for c in chs:
        if k == c.name or k == c.slug or (k.isdigit() and c.number == int(k)):
            return c
    names = ", ".join(c.name for c in chs) or "(none)"
    raise UserError(f"no chapter {key!r} in _toc.yml; chapters: {names}")


def convert(chapter: Chapter):
    """The chapter's MyST source as an nbformat notebook (jupytext)."""
    import jupytext

    if not chapter.source.is_file():
        raise UserError(f"chapter source {chapter.source} is missing (listed in _toc.yml as {EXECUTED_DIR}/{chapter.name})")
    nb = jupytext.read(chapter.source)
    if "parameters" not in [t for c in nb.cells for t in c.get("metadata", {}).get("tags", [])]:
        raise UserError(f"{chapter.source}: no cell tagged `parameters`")
    return nb


def notebook_parameters(nb) -> list[str]:
    """Names assigned in the cell tagged ``parameters`` (the chapter's parameters)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            names = []
            for node in ast.parse(src).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Name):
                        names.append(t.id)
            return names
    return []


def source_sha256(path: Path) -> str:
    """SHA-256 of a chapter source (recorded in the executed notebook, to spot stale ones)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _call_name(func) -> str | None:
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
    import jupytext

    base = Path(root) if root is not None else book_root()
    files = sorted((base / BOOK_DIR).glob(f"{int(number):02d}_*.md"))
    if len(files) != 1:
        raise ValueError(f"expected one chapter {int(number):02d}_*.md in {base / BOOK_DIR}, found {len(files)}")
    nb = jupytext.read(files[0])
    defaults = notebook_defaults(nb, profile)
    if defaults is None:
        raise ValueError(f"{files[0].name}: no profile_params({{...}}) call with a dict of defaults")
    return defaults


def notebook_defaults(nb, profile: str) -> dict | None:
    """The values in ``profile`` of the literal entries of the first
    ``profile_params({...}, ...)`` call of a notebook (code cells with IPython magics are
    skipped); None when there is no such call."""
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
    return None
