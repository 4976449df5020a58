"""A minimal chapter of the book for tests: a MyST notebook with the book's front matter, a
title, a set-up cell, the ``parameters`` cell (the profile line first) and more code cells."""

from __future__ import annotations

FRONT_MATTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


def _cell(code: str, tags: str = "") -> str:
    head = f":tags: [{tags}]\n\n" if tags else ""
    return f"```{{code-cell}} ipython3\n{head}{code.strip()}\n```\n"


def myst_chapter(title: str, setup: str, parameters: str = "", *cells: str) -> str:
    """The chapter's MyST text: ``setup`` (``import os`` is prepended), the parameters cell
    (``profile = ...`` then ``parameters``) and ``cells``, one code cell each."""
    params = 'profile = os.environ.get("FBSEM_PROFILE", "cpu")\n' + parameters
    body = [_cell("import os\n" + setup), _cell(params, "parameters"), *(_cell(c) for c in cells)]
    return FRONT_MATTER + f"\n# {title}\n\n" + "\n".join(body)
