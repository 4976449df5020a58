"""How an executed chapter reads: the science first, the code one click away.

:func:`present` is applied to every chapter notebook right after papermill executed it
(:mod:`fbsembook.execute`), so the published page and the downloadable ``.ipynb`` agree:

* **folded code**: the input of the set-up cells (everything up to the cell that resolves
  the parameters, whose table stays visible), of cells that only import or define helpers,
  and of cells that draw figures is tagged ``hide-input`` (Jupyter Book shows a "Show code
  cell source" toggle; the outputs stay). A cell tagged ``show-input`` is never folded, nor
  is the code of an exercise's solution (between ``solution-start`` and ``solution-end``).
* **the chapter's answer up front**: a chapter glues the short answer it computes
  (:func:`answer`, MyST-NB's ``glue``) and its opening paragraph pastes it with
  ``{glue:md}`key```, so a page opens with its question and its answer, measured.
* **a "Rerun this chapter" box** under the title, generated from the chapter's
  ``parameters`` cell: the exact command that reproduces the page, the parameters worth
  changing with their meaning, and a link to the notation page.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = ["FOLD_TAG", "KEEP_TAG", "RERUN_CLASS", "parameter_help", "fold_code", "rerun_box", "present", "answer"]

FOLD_TAG = "hide-input"
KEEP_TAG = "show-input"
RERUN_CLASS = "fbsem-rerun"  # CSS class of the box (found again by tests and on re-presentation)
NOTATION_DOC = "/book/notation"  # Sphinx document of the notation page
_ALREADY_SHAPED = {FOLD_TAG, KEEP_TAG, "remove-input", "hide-cell", "remove-cell", "hide-output"}
_IMAGE_MIMES = ("image/png", "image/svg+xml", "image/jpeg")


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _python(source: str) -> ast.Module | None:
    """The cell's code without IPython magics / shell lines, parsed (None if it does not parse)."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


def _only_definitions(source: str) -> bool:
    """True for a cell of imports, functions and classes only (plumbing, not a result)."""
    tree = _python(source)
    if tree is None or not tree.body:
        return False
    plumbing = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return all(isinstance(node, plumbing) for node in tree.body)


def _draws_a_figure(cell) -> bool:
    return any(any(m in (o.get("data") or {}) for m in _IMAGE_MIMES) for o in cell.get("outputs", []) or [])


def _setup_end(cells) -> int:
    """Index of the last set-up cell: the one calling ``profile_params`` (else the
    ``parameters`` cell, else -1)."""
    end = -1
    for i, cell in enumerate(cells):
        if cell.cell_type != "code":
            continue
        if "parameters" in _tags(cell) or "injected-parameters" in _tags(cell):
            end = max(end, i)
        if "profile_params(" in cell.source:
            return i
    return end


def fold_code(nb) -> list[int]:
    """Tag the plumbing cells of ``nb`` ``hide-input`` (see the module docstring); returns
    the indices of the cells it folded."""
    cells = nb.cells
    setup_end = _setup_end(cells)
    folded = []
    in_solution = False
    for i, cell in enumerate(cells):
        if cell.cell_type == "markdown":
            if re.search(r"\{solution-start\}", cell.source):
                in_solution = True
            if re.search(r"\{solution-end\}", cell.source):
                in_solution = False
            continue
        if cell.cell_type != "code" or in_solution or _ALREADY_SHAPED & set(_tags(cell)):
            continue
        if i <= setup_end or _only_definitions(cell.source) or _draws_a_figure(cell):
            cell.setdefault("metadata", {})["tags"] = _tags(cell) + [FOLD_TAG]
            folded.append(i)
    return folded


def parameter_help(nb) -> dict[str, str]:
    """``{name: comment}`` of the ``parameters`` cell (``profile`` and ``device`` left out:
    the box names them separately)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in _tags(cell):
            out = {}
            for line in cell.source.splitlines():
                m = re.match(r"\s*([A-Za-z_]\w*)\s*=\s*None\s*(?:#\s*(.*))?$", line)
                if m and m.group(1) not in ("profile", "device"):
                    out[m.group(1)] = (m.group(2) or "").strip()
            return out
    return {}


def _literal_defaults(nb, profile: str) -> dict[str, Any]:
    """The chapter's own defaults for ``profile``, where they are Python literals
    (:func:`fbsembook.chapters.notebook_defaults`; none when they cannot be resolved here)."""
    from fbsembook.chapters import notebook_defaults

    try:
        return notebook_defaults(nb, profile) or {}
    except Exception:  # an experiment file that cannot be read here: no values shown
        return {}


def _cli_value(value: Any) -> str:
    """A value as ``fbsem book run -p NAME VALUE`` reads it (YAML), quoted for the shell."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = re.sub(r"\n\.\.\.$", "", text)
    return text if re.fullmatch(r"[\w.+\-/]+", text) else "'" + text.replace("'", "'\"'\"'") + "'"


def _profile_arg(profile: str) -> str:
    from fbsembook.profiles import PROFILES

    return profile if profile in PROFILES else Path(profile).name


def rerun_box(nb, number: int | str, profile: str, overrides: Mapping[str, Any] | None = None,
              seconds: float | None = None, notation: bool = True) -> str:
    """The MyST text of the "Rerun this chapter" admonition of chapter ``number`` (with a
    link to the notation page when the book has one, ``notation``)."""
    overrides = {k: v for k, v in (overrides or {}).items() if k != "profile"}
    helps = parameter_help(nb)
    values = {**_literal_defaults(nb, profile), **overrides}
    run = f"fbsem book run {number} --profile {_profile_arg(profile)}"
    exact = run + "".join(f" -p {k} {_cli_value(v)}" for k, v in overrides.items())
    example = next((k for k in helps if k in values and k not in overrides), None)
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = [
        f"::::{{admonition}} Rerun this chapter: `{exact}`",
        f":class: tip dropdown {RERUN_CLASS}",
        f"This page was executed with the `{_profile_arg(profile)}` profile{took}. From the repository root,",
        "```bash",
        exact + "   # this page, as it is",
        "fbsem book html   # rebuild the HTML",
        "```",
    ]
    if example is not None:
        lines.append(f"Change a parameter with `-p NAME VALUE`, e.g. `{run} -p {example} {_cli_value(values[example])}` "
                     "(the value this page used); `-p device cpu` forces the CPU.")
    lines.append("A profile is `smoke` (seconds), `cpu` (a laptop) or `paper` (a GPU), or your own copy of "
                 "`data/cpu.yaml` given as `--profile my.yaml`."
                 + (f" The symbols ($y$, $x$, $A$, $K$, ...) are defined on the {{doc}}`notation page <{NOTATION_DOC}>`."
                    if notation else ""))
    if helps:
        lines += ["", ":::{dropdown} Parameters worth changing (this page's values are in its parameters table)"]
        lines += [f"- `{k}`: {h}" if h else f"- `{k}`" for k, h in helps.items()]
        lines.append(":::")
    lines.append("::::")
    return "\n".join(lines)


def _insert_after_title(cells, text: str) -> bool:
    for cell in cells:
        if cell.cell_type != "markdown":
            continue
        lines = cell.source.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"#\s+\S", line):
                cell.source = "\n".join(lines[: i + 1] + ["", text, ""] + lines[i + 1:])
                return True
        return False
    return False


def present(nb, chapter: str, profile: str, overrides: Mapping[str, Any] | None = None,
            seconds: float | None = None, notation: bool = True) -> None:
    """Fold the plumbing of the executed chapter ``chapter`` (its name, ``NN_slug``) and put
    the rerun box under its title (in place; a notebook that already has the box keeps it)."""
    fold_code(nb)
    if any(RERUN_CLASS in c.source for c in nb.cells if c.cell_type == "markdown"):
        return
    m = re.match(r"(\d+)_", chapter)
    key = int(m.group(1)) if m else chapter  # what `fbsem book run` takes
    if not _insert_after_title(nb.cells, rerun_box(nb, key, profile, overrides, seconds, notation)):
        raise ValueError("the chapter's first markdown cell has no '# title' line to put the rerun box under")


def answer(key: str, markdown: str) -> str:
    """Glue ``markdown`` under ``key`` in the running notebook (not displayed where it is
    computed), for the chapter's opening to paste with ``{glue:md}`key```; returns it."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(key, Markdown(markdown), display=False)
    return markdown
