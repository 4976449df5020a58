"""Publishing the executed chapters: refuse missing or failed ones, build the HTML with
``jupyter-book build -W -n --keep-going`` (``execute_notebooks: off`` in ``_config.yml``, so
the HTML shows exactly what was executed) into ``book/_build/html``, and prepare the
notebooks that ``pytest --nbval-lax`` checks against the executed outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from fbsembook.chapters import Chapter, chapters, convert, source_sha256
from fbsembook.profiles import book_root

__all__ = ["BUILD_PARENT", "check_executed", "html", "nbval_notebook"]

BUILD_PARENT = "book"  # jupyter-book --path-output: HTML lands in book/_build/html


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _has_error_output(path: Path) -> bool:
    nb = json.loads(path.read_text())
    return any(o.get("output_type") == "error" for c in nb.get("cells", []) for o in c.get("outputs", []) or [])


def check_executed(root: Path, echo: Callable[[str], None] = _echo) -> list[str]:
    """Problems that stop the HTML build (missing / failed chapters); prints a table of
    what will be published and warns about chapters executed from an older source."""
    problems = []
    rows = []
    for c in chapters(root):
        if c.failed.exists() and (not c.executed.exists() or c.failed.stat().st_mtime >= c.executed.stat().st_mtime):
            problems.append(f"{c.name}: its last execution failed ({c.failed.relative_to(root)}); fix it and rerun `fbsem book run {c.number or c.name}`")
            continue
        if not c.executed.exists():
            problems.append(f"{c.name}: not executed yet; run `fbsem book execute` (or `fbsem book run {c.number or c.name}`)")
            continue
        if _has_error_output(c.executed):
            problems.append(f"{c.name}: the executed notebook contains an error output")
            continue
        meta = json.loads(c.executed.read_text()).get("metadata", {}).get("fbsem", {})
        stale = c.source.exists() and meta.get("source_sha256") not in (None, source_sha256(c.source))
        rows.append((c.name, meta.get("profile", "?"), meta.get("parameters") or {}, stale))
    if rows:
        w = max(len(r[0]) for r in rows)
        echo("publishing executed notebooks:")
        for name, prof, params, stale in rows:
            extra = f"  parameters {params}" if params else ""
            echo(f"  {name:<{w}}  profile {prof}{extra}" + ("  (STALE: source changed since execution)" if stale else ""))
    return problems


def html(root: Path | None = None, echo: Callable[[str], None] = _echo) -> int:
    """``jupyter-book build -W -n --keep-going`` of the executed notebooks into
    ``book/_build/html``. Returns the exit status."""
    root = Path(root) if root is not None else book_root()
    problems = check_executed(root, echo)
    if problems:
        for p in problems:
            echo(f"error: {p}")
        return 1
    cmd = [
        sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
        "build", str(root), "--path-output", str(root / BUILD_PARENT), "--builder", "html",
        "--all", "-W", "-n", "--keep-going",
    ]
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    t0 = time.perf_counter()
    echo("building HTML: jupyter-book build -W -n --keep-going (notebooks are not re-executed)")
    proc = subprocess.run(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_dir = root / BUILD_PARENT / "_build" / "html"
    if proc.returncode != 0:
        echo(proc.stdout[-8000:])
        echo(f"error: jupyter-book build failed (exit {proc.returncode}) after {time.perf_counter() - t0:.1f} s")
        return proc.returncode or 1
    missing = [c.html for c in chapters(root) if not (out_dir / c.html).is_file()]
    if missing:
        echo(f"error: no HTML page for {', '.join(missing)}")
        return 1
    (out_dir / ".nojekyll").touch()
    echo(f"HTML built in {time.perf_counter() - t0:.1f} s: {out_dir / 'index.html'}")
    return 0


def nbval_notebook(chapter: Chapter, reference: Path | None = None):
    """The jupytext-converted chapter with, as reference outputs for the cells marked
    ``# NBVAL_CHECK_OUTPUT``, the outputs of the executed notebook ``reference`` (default:
    ``chapter.executed``). Run it with ``FBSEM_PROFILE`` set to that notebook's profile and
    ``pytest --nbval-lax``: it checks that no cell fails and that the marked cells print
    the same thing when the profile comes from the environment."""
    import nbformat

    nb = convert(chapter)
    ref = nbformat.read(reference or chapter.executed, as_version=4)
    by_source = {c.source: c for c in ref.cells if c.cell_type == "code"}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if "NBVAL_CHECK_OUTPUT" in cell.source:
            r = by_source.get(cell.source)
            if r is None:
                raise ValueError(f"{chapter.name}: a NBVAL_CHECK_OUTPUT cell is not in {reference or chapter.executed} (re-execute it)")
            cell.outputs = r.outputs
            cell.execution_count = r.execution_count
    return nb
