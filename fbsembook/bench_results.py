"""Reading the results of ``fbsem bench`` (``benchmarks/results/<name>.json``) for the
performance chapter: :func:`load_bench_results`, the memory rows as sweeps that
:mod:`fbsembook.memory` can read (:func:`bench_memory_sweeps`) and the training-time
ratio (:func:`bench_training_ratio`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

from fbsembook.verdicts import finite, training_time_ratio

__all__ = ["BENCH_NAMES", "bench_command", "bench_memory_sweeps", "bench_training_ratio", "load_bench_results"]

BENCH_NAMES = ("projector", "memory", "training", "simulation")


def bench_command(name: str) -> str:
    """The command that writes ``benchmarks/results/<name>.json``."""
    return f"fbsem bench {name}"


def bench_memory_sweeps(doc: Mapping | None) -> dict[str, dict]:
    """The rows of ``memory.json`` (``fbsem bench memory``) as one sweep dict per case, like
    those of :func:`fbsembook.memory.memory_sweep` (``{"device", "rows": [{"mode", "K",
    "status", "peak_bytes"}, ...]}``), so that :func:`~fbsembook.memory.sweep_value` and
    :func:`~fbsembook.memory.sweep_table` apply. Rows without a number (a case that ran out
    of memory, if the benchmark records one) get ``status`` ``"oom"``."""
    out: dict[str, dict] = {}
    for r in (doc or {}).get("rows", []):
        case = str(r.get("case", "?"))
        K = r.get("modules", r.get("K"))
        if K is None or r.get("mode") is None:
            continue
        sw = out.setdefault(case, {"device": r.get("device"), "image_shape": r.get("image_shape"), "rows": []})
        ok = finite(r.get("peak_bytes"))
        sw["rows"].append({"mode": r["mode"], "K": int(K), "status": r.get("status", "ok" if ok else "oom"),
                           **({"peak_bytes": float(r["peak_bytes"])} if ok else {})})
    for sw in out.values():
        sw["modes"] = list(dict.fromkeys(r["mode"] for r in sw["rows"]))
        sw["Ks"] = sorted({r["K"] for r in sw["rows"]})
    return out


def bench_training_ratio(doc: Mapping | None) -> float | None:
    """Sequential over end-to-end wall time in ``training.json`` (``fbsem bench training``,
    which trains both modes for the same number of epochs per module); None if missing."""
    rows = (doc or {}).get("rows", [])
    t = {r.get("mode"): r.get("time_s") for r in rows}
    e = {r.get("mode"): r.get("epochs_per_module", 1) or 1 for r in rows}
    if not (finite(t.get("sequential")) and finite(t.get("end-to-end"))) or t["end-to-end"] <= 0:
        return None
    return training_time_ratio(t["sequential"], e["sequential"], t["end-to-end"], e["end-to-end"])


def load_bench_results(directory: str | os.PathLike | None = None, names: Sequence[str] = BENCH_NAMES,
                       allow_quick: bool = False) -> dict[str, dict | None]:
    """``{name: document or None}`` for the ``fbsem bench`` results in ``directory``
    (default ``benchmarks/results``). A ``<name>_quick.json`` (tiny sizes, not meant for
    judging speed) is used only with ``allow_quick`` and when the full file is missing; the
    document then has ``"quick": True``. Unreadable files give None (and ``"error"`` is not
    raised)."""
    from fbsembook.bench import RESULTS_DIR

    d = Path(directory) if directory is not None else RESULTS_DIR
    out: dict[str, dict | None] = {}
    for name in names:
        doc = None
        for fname, quick in ((f"{name}.json", False), (f"{name}_quick.json", True)):
            if quick and not allow_quick:
                continue
            p = d / fname
            if not p.is_file():
                continue
            try:
                doc = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict):
                doc = None
                continue
            doc.setdefault("rows", [])
            doc["quick"] = quick
            doc["path"] = str(p)
            break
        out[name] = doc
    return out
