"""``fbsem plan``: forecast the wall time, peak memory and disk of an experiment's stages
(simulate, each training mode, evaluate, the book) from a few steps timed on this machine
(:mod:`fbsemlib.evaluation.forecast`)."""

from __future__ import annotations

import json
import os
import sys

import yaml

from fbsemlib.config import load_experiment, override_sections
from fbsemlib.errors import UserError
from fbsemlib.evaluation.forecast import forecast_experiment, format_table
from fbsemlib.training.device import resolve_device

__all__ = ["cmd_plan", "parse_overrides"]


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.epochs=3", "data.split={train: 1, test: 1}"]`` -> dotted keys and YAML values."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {key}: the value is not valid YAML: {e}") from None
    return out


def cmd_plan(args) -> int:
    """``fbsem plan --config FILE [--device D] [--set K=V ...] [--repeats N] [--json]``."""
    sections = override_sections(load_experiment(args.config), parse_overrides(args.set))
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    dev = resolve_device(args.device)
    sim_dev = os.environ.get("FBSEM_SIMULATE_DEVICE", "cpu")  # as `fbsem simulate`
    say = (lambda m: None) if args.json else (lambda m: print(f"plan: {m}", file=sys.stderr, flush=True))
    fc = forecast_experiment(sections, device=dev, simulate_device=sim_dev, repeats=args.repeats, log=say)
    print(json.dumps(fc.to_dict(), indent=2, default=str) if args.json else format_table(fc))
    return 0
