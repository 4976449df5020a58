"""``fbsem memory``: the peak memory of one training step for K unrolled modules
(:mod:`fbsemlib.training.memory`), printed as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from fbsemlib.config import check_limit
from fbsemlib.errors import UserError
from fbsemlib.provenance import is_int
from fbsemlib.training.memory import MODES, measure_training_memory, memory_device, resolve_spec

__all__ = ["cmd_memory"]


def cmd_memory(args) -> int:
    """``fbsem memory --config FILE --modules K --mode MODE [--device D] [--dims 2d|3d]``:
    print the :class:`~fbsemlib.training.memory.MemoryReport` as JSON. The device defaults
    to ``cuda`` when available, else ``cpu``; on CPU the RSS of a subprocess is measured
    unless the config's ``memory.subprocess_rss`` is false."""
    K = getattr(args, "modules", None)
    if not is_int(K) or K < 1:
        raise UserError(f"--modules must be an integer >= 1, got {K!r}")
    check_limit("--modules", K, "num_modules")
    mode = getattr(args, "mode", None)
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    config = getattr(args, "config", None)
    if config is None:
        raise UserError("--config is required")
    p = Path(config)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist" if not p.exists()
                        else f"config path {str(p)!r} is not a file")
    dims = getattr(args, "dims", None)
    if dims is not None and dims not in ("2d", "3d"):
        raise UserError(f"--dims must be 2d or 3d, got {dims!r}")
    dev = memory_device(getattr(args, "device", None))
    spec = resolve_spec(p, dims=dims)
    report = measure_training_memory(spec, K, mode, device=dev,
                                     subprocess_rss=spec.subprocess_rss and dev.type == "cpu")
    print(json.dumps(report.to_dict(), indent=2))
    return 0
