"""Command-line interface: ``fbsem <command> ...`` (also ``python -m fbsemlib``).

Each command lives in its own function ``cmd_<name>(args) -> int`` next to the code it
drives; this module only declares the arguments and dispatches. Errors that a user can
fix (bad config, missing file) are reported as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "UserError"]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit 2."""


# command name -> (module, function, help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("fbsemlib.cli", "cmd_info", "versions, backends and devices"),
    "simulate": ("fbsemlib.simulation", "cmd_simulate", "simulate a dataset from a recipe"),
    "train": ("fbsemlib.training", "cmd_train", "train FBSEM-Net (end-to-end or sequential)"),
    "evaluate": ("fbsemlib.evaluation", "cmd_evaluate", "evaluate a trained model against baselines"),
    "reconstruct": ("fbsemlib.evaluation", "cmd_reconstruct", "reconstruct a sinogram with a trained model"),
    "memory": ("fbsemlib.memory", "cmd_memory", "peak training memory for K unrolled modules"),
    "bench": ("fbsemlib.bench", "cmd_bench", "run benchmarks"),
    "book": ("fbsemlib.book", "cmd_book", "execute and build the book"),
}


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments of each command (kept here so `fbsem --help` is complete without
    importing torch-heavy modules)."""
    if name == "info":
        _add_info(p)
    elif name == "simulate":
        p.add_argument("--config", required=True, help="experiment YAML (its `data` section is used)")
        p.add_argument("--out", required=True, help="output dataset folder")
        p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
        p.add_argument("--overwrite", action="store_true", help="replace an existing complete dataset")
        p.add_argument("--no-progress", action="store_true")
    elif name == "train":
        p.add_argument("--config", required=True)
        p.add_argument("--mode", choices=["end-to-end", "sequential"], default=None)
        p.add_argument("--data", default=None, help="dataset folder (default: simulate or reuse the cached one)")
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--device", default=None)
        p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
        p.add_argument("--no-progress", action="store_true")
    elif name == "evaluate":
        p.add_argument("--model", required=True, help="training output folder")
        p.add_argument("--data", required=True, help="dataset folder")
        p.add_argument("--out", default=None, help="where to write the JSON + CSV table (default: --model)")
        p.add_argument("--device", default=None)
    elif name == "reconstruct":
        p.add_argument("--model", required=True)
        p.add_argument("--sinogram", required=True, help="HDF5 / .npy / .pt file with the sinogram (and factors)")
        p.add_argument("--out", default=None)
        p.add_argument("--device", default=None)
    elif name == "memory":
        p.add_argument("--config", required=True)
        p.add_argument("--modules", type=int, required=True, help="number of unrolled modules K")
        p.add_argument("--mode", choices=["end-to-end", "checkpointed", "sequential"], required=True)
        p.add_argument("--device", default=None)
        p.add_argument("--dims", choices=["2d", "3d"], default=None)
    elif name == "bench":
        p.add_argument("which", nargs="?", default="all")
        p.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
        p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
        p.add_argument("--device", default=None)
    elif name == "book":
        p.add_argument("action", choices=["build", "run", "execute", "html"], help="build = execute all + html")
        p.add_argument("chapter", nargs="?", default=None, help="chapter number or name (for run)")
        p.add_argument("--profile", default=None, help="smoke | cpu | paper")
        p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
        p.add_argument("--jobs", type=int, default=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fbsem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        _add_arguments(name, p)
    return parser


def cmd_info(args) -> int:
    import json
    import platform

    import torch

    from . import __version__
    from .projector import parallelproj_available

    info = {
        "fbsemlib": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "parallelproj": parallelproj_available(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>15}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module, func, _ = COMMANDS[args.command]
    try:
        fn = getattr(importlib.import_module(module), func)
        rc = fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
