"""Command-line interface: ``fbsem <command> ...`` (also ``python -m fbsemlib``).

Each command is a function ``cmd_<name>(args) -> int`` in its own module of this package
(``fbsemlib.cli.<name>``), imported only when it runs; this module declares the arguments
and dispatches. Errors that a user can
fix (bad config, missing file) are reported as ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

from fbsemlib.errors import UserError
from fbsemlib.outputs import DISK_ERRNOS

__all__ = ["main", "build_parser", "Command", "UserError", "failure_message"]


@dataclass(frozen=True)
class Command:
    """One ``fbsem`` sub-command: ``module.function(args) -> int`` is imported only when the
    command runs, so ``fbsem --help`` stays fast; ``add_arguments`` declares its options."""

    module: str
    function: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


#: entry-point group through which other packages add commands (the book adds ``book``
#: and ``bench``); the library itself never imports them
PLUGIN_GROUP = "fbsemlib.commands"


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (its `data` section is used)")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete dataset")
    p.add_argument("--no-progress", action="store_true")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--mode", choices=["end-to-end", "sequential"], default=None)
    p.add_argument("--data", default=None, help="dataset folder (default: simulate or reuse the cached one)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="training output folder")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", default=None, help="where to write the JSON + CSV table (default: --model)")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation")


def _add_reconstruct(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--sinogram", required=True,
                   help="HDF5 / .pt file with the sinogram and its factors (or .npy / .nii / .nii.gz: the sinogram only)")
    p.add_argument("--out", default=None,
                   help="output image: X.npy and X.nii.gz (NIfTI with the grid's affine) are both written "
                        "(default: <sinogram>_fbsem next to the input)")
    p.add_argument("--mr", default=None, help="NIfTI MR image on the model's grid (instead of 'mr' in the sinogram file)")
    p.add_argument("--mu-map", default=None,
                   help="NIfTI attenuation map on the model's grid: exp(-A mu) multiplies the multiplicative factors")
    p.add_argument("--mu-unit", choices=["per_mm", "per_cm"], default="per_mm", help="unit of the --mu-map values")
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--unit-factors", action="store_true",
                   help="the input has no factors: take multiplicative = 1 and additive = 0")


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("--modules", type=int, required=True, help="number of unrolled modules K")
    p.add_argument("--mode", choices=["end-to-end", "checkpointed", "sequential"], required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--dims", choices=["2d", "3d"], default=None)


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--device", default=None, help="training / evaluation device (default: cuda when available)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the experiment (YAML value; repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each step (median)")
    p.add_argument("--json", action="store_true", help="print JSON")


COMMANDS: dict[str, Command] = {
    "info": Command("fbsemlib.cli.info", "cmd_info", "versions, backends and devices", _add_info),
    "simulate": Command("fbsemlib.cli.simulate", "cmd_simulate", "simulate a dataset from a recipe", _add_simulate),
    "train": Command("fbsemlib.cli.train", "cmd_train", "train FBSEM-Net (end-to-end or sequential)", _add_train),
    "evaluate": Command("fbsemlib.cli.evaluate", "cmd_evaluate", "evaluate a trained model against baselines", _add_evaluate),
    "reconstruct": Command("fbsemlib.cli.evaluate", "cmd_reconstruct", "reconstruct a sinogram with a trained model", _add_reconstruct),
    "memory": Command("fbsemlib.cli.memory", "cmd_memory", "peak training memory for K unrolled modules", _add_memory),
    "plan": Command("fbsemlib.cli.plan", "cmd_plan", "forecast wall time, memory and disk of an experiment",
                    _add_plan),
}


def all_commands() -> dict[str, Command]:
    """The library's commands plus those that installed packages register under
    :data:`PLUGIN_GROUP` (each entry point names a :class:`Command`)."""
    commands = dict(COMMANDS)
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name not in commands:
            commands[ep.name] = ep.load()
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fbsem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in all_commands().items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can cause or fix ends as one line
    ``error: ...`` and exit status 2 (:func:`failure_message`); Ctrl-C is exit 130; anything
    else is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = all_commands()[args.command]
    try:
        fn = getattr(importlib.import_module(command.module), command.function)
        rc = fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, MemoryError) as e:
        print(f"error: {failure_message(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch's (CPU or CUDA allocator); other errors are bugs
            raise
        print(f"error: {failure_message(MemoryError())} ({str(e).splitlines()[0] if str(e) else 'out of memory'})",
              file=sys.stderr)
        return 2
    return int(rc or 0)


def failure_message(e: BaseException) -> str:
    """The one line printed for an expected failure: a :class:`UserError`'s message, a
    file-system error in words (no space, read-only, permissions: nothing was changed),
    or memory exhaustion."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MemoryError):
        return "out of memory: reduce the sizes in the configuration (image_shape, batch_size, num_modules)"
    where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
    reason = DISK_ERRNOS.get(e.errno or -1) or e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    return f"{reason}{':' if where else ''}{where}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
