"""The book's ``fbsem`` commands, ``book`` and ``bench``, registered with the library's CLI
through the ``fbsemlib.commands`` entry-point group (see ``pyproject.toml``)."""

from __future__ import annotations

import argparse

from fbsemlib.cli import Command


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", nargs="?", default="all")
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--device", default=None)


def _add_book(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "run", "execute", "html"], help="build = execute all + html")
    p.add_argument("chapter", nargs="?", default=None, help="chapter number or name (for run)")
    p.add_argument("--profile", default=None,
                   help="smoke | cpu | paper, or the path of your own experiment YAML (a copy of data/<profile>.yaml)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a chapter parameter (-p seeds '[0, 1]') or, dotted, an override of the profile "
                        "(-p model.width 32, -p data.counts_range '[1e5, 1e6]'); values are YAML")
    p.add_argument("--jobs", type=int, default=1)


BENCH = Command("fbsembook.bench", "cmd_bench", "run benchmarks", _add_bench)
BOOK = Command("fbsembook.build", "cmd_book", "execute and build the book", _add_book)
