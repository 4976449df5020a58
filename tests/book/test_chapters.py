"""fbsembook.chapters: the chapters of ``_toc.yml`` and another chapter's parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from fbsembook.chapters import chapter_defaults
from myst_chapter import myst_chapter


CHAPTER = myst_chapter("A chapter", "%matplotlib inline", "seeds = None", """p = profile_params(
    {
        "seeds": {"smoke": [0], "cpu": [0, 1], "paper": [0, 1, 2, 3, 4]},
        "counts": {"smoke": [5.0e4, 1.0e5], "default": [2.0e5, 5.0e5]},
        "width": 8,
        "computed": M.memory_3d_kwargs("cpu"),
    },
    profile,
    globals(),
)""")


def test_chapter_defaults(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "05_some_chapter.md").write_text(CHAPTER)
    d = chapter_defaults(5, "cpu", root=tmp_path)
    assert d == {"seeds": [0, 1], "counts": [2.0e5, 5.0e5], "width": 8}
    assert chapter_defaults(5, "smoke", root=tmp_path)["counts"] == [5.0e4, 1.0e5]
    assert chapter_defaults(5, "paper", root=tmp_path)["seeds"] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        chapter_defaults(6, "cpu", root=tmp_path)
    (tmp_path / "book" / "06_other.md").write_text(CHAPTER.replace("profile_params(", "other("))
    with pytest.raises(ValueError):
        chapter_defaults(6, "cpu", root=tmp_path)


def test_chapter_defaults_of_the_book_chapters():
    """The results chapter reads the seeds of chapters 5 and 6 this way."""
    root = Path(__file__).resolve().parents[2]
    for n in (5, 6):
        if not list((root / "book").glob(f"{n:02d}_*.md")):
            pytest.skip(f"chapter {n} is not written yet")
        for profile in ("smoke", "cpu", "paper"):
            d = chapter_defaults(n, profile, root=root)
            assert isinstance(d["seeds"], list) and all(isinstance(s, int) for s in d["seeds"])


def test_build_and_source_folders_are_not_book_pages():
    """Folders that `make` creates (the venv, the parallelproj build with its READMEs, caches) and
    the code folders are excluded from the Sphinx build: a Markdown file there would be a page
    outside the table of contents, a warning that `-W` turns into a failed `make book`."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    excluded = set(yaml.safe_load((root / "_config.yml").read_text())["exclude_patterns"])
    for folder in (".venv", ".parallelproj", ".cache", "fbsemlib", "fbsembook", "tests", "examples", "tools"):
        assert folder in excluded, folder
