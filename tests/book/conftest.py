"""The one smoke-profile build of the book that the slow tests of tests/book share
(test_book.py, test_rendered_pages.py): ``fbsem book build --profile smoke`` in a copy of
the working tree (what a clean clone plus the current edits would hold), so the tests never
touch book/_build or book/_executed of the checkout itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_COPY = (".git/", ".venv/", "book/_build/", "book/_executed/", ".cache/")
# `fbsem ...` with this interpreter (`python -m fbsemlib.cli` would load cli.py twice)
FBSEM = [sys.executable, "-c", "import sys; from fbsemlib.cli import main; sys.exit(main())"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the variables that would redirect the book (profile, root,
    cache, matplotlib backend)."""
    env = dict(os.environ)
    for var in ("MPLBACKEND", "FBSEM_BOOK_ROOT", "FBSEM_PROFILE", "FBSEM_CACHE", "FBSEM_OVERRIDES"):
        env.pop(var, None)
    env.update(extra)
    return env


def repo_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the checkout (a clean clone + edits)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                             check=True, capture_output=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()]
    return [f for f in files if not f.startswith(SKIP_COPY) and "__pycache__" not in f and (REPO / f).is_file()]


def copy_tree(dst: Path) -> Path:
    for f in repo_files():
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    return dst


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """``{"root", "proc", "seconds", "html"}`` of the shared smoke build."""
    root = copy_tree(tmp_path_factory.mktemp("book-build"))
    t0 = time.perf_counter()
    proc = subprocess.run([*FBSEM, "book", "build", "--profile", "smoke", "--jobs", "2"], cwd=root, env=clean_env(),
                          text=True, timeout=1800, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    print(proc.stdout[-3000:])
    print(f"fbsem book build --profile smoke: {seconds:.1f} s")
    return {"root": root, "proc": proc, "seconds": seconds, "html": root / "book" / "_build" / "html"}
