"""The log files of a training run (in its output folder ``out_dir``)::

    config.yaml        the resolved model / train / data sections and the mode
    log_steps.csv      one row per optimiser step (every ``log_every`` steps)
    log_epochs.csv     one row per epoch (per stage and epoch in sequential mode)
    log_stages.csv     sequential mode: one row per stage
    log.jsonl          all of the above as JSON lines (with the full gamma vectors)
    tensorboard/       when ``tensorboard: true`` and TensorBoard is installed

Every row is flushed as it is written, so a killed run leaves whole lines; the line counts
are stored in the checkpoints, and a resumed run first truncates what was logged after
its checkpoint.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from fbsemlib.training.checkpoint import atomic_write_text

__all__ = ["RunLog", "CSV_COLUMNS", "LOG_FILES", "yaml_text"]

CSV_COLUMNS = {
    "step": ["mode", "stage", "epoch", "step", "loss", "lr", "gamma", "time_s"],
    "epoch": ["mode", "stage", "epoch", "step", "train_loss", "val_loss", "val_nrmse", "val_nrmse_final", "lr",
              "gamma_mean", "gamma_min", "gamma_max", "best", "epoch_time_s", "time_s", "peak_memory_mb"],
    "stage": ["mode", "stage", "epochs_run", "best_epoch", "step", "train_loss", "val_loss", "val_nrmse", "gamma",
              "init", "stage_time_s", "cache_time_s", "cache", "time_s", "peak_memory_mb"],
}
LOG_FILES = {"step": "log_steps.csv", "epoch": "log_epochs.csv", "stage": "log_stages.csv", "json": "log.jsonl"}


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def yaml_text(d: dict) -> str:
    """``d`` (JSON-like) as YAML, in key order (``config.yaml``)."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)


class RunLog:
    """CSV + JSON-lines logs (and optional TensorBoard) of the record kinds ``kinds``
    (``"step"``, ``"epoch"``, ``"stage"``); ``enabled=False`` writes nothing (ranks other
    than 0)."""

    def __init__(self, out: Path, kinds: tuple[str, ...], tensorboard: bool, purge_step: int | None = None,
                 enabled: bool = True):
        self.out = out
        self.kinds = kinds
        self.enabled = enabled
        self.counts = {k: 0 for k in kinds + ("json",)}
        self._files: dict = {}
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                warnings.warn("train.tensorboard is true but TensorBoard is not installed (pip install tensorboard); "
                              "logging to CSV / JSON only", stacklevel=4)
            else:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def start(self, counts: dict | None) -> None:
        """Fresh logs (``counts`` None) or logs truncated to ``counts`` lines."""
        if not self.enabled:
            return
        self._close_files()
        for kind in self.kinds + ("json",):
            path = self.out / LOG_FILES[kind]
            n = 0 if counts is None else int(counts.get(kind, 0))
            header = kind != "json"
            lines: list[str] = []
            if counts is not None and path.exists():
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                lines = lines[: n + (1 if header else 0)]
            if header and not lines:
                lines = [",".join(CSV_COLUMNS[kind]) + "\n"]
            atomic_write_text(path, "".join(lines))
            self.counts[kind] = max(0, len(lines) - (1 if header else 0))

    def _file(self, kind: str):
        """The append handle of a log file (opened once; every write is flushed, so a killed
        run leaves whole lines and :meth:`start` can truncate to a checkpoint's counts)."""
        f = self._files.get(kind)
        if f is None:
            f = self._files[kind] = open(self.out / LOG_FILES[kind], "a", newline="", encoding="utf-8")
        return f

    def write(self, kind: str, rec: dict, tb_step: int | None = None) -> None:
        if not self.enabled:
            return
        f = self._file(kind)
        csv.writer(f).writerow([_csv_value(rec.get(c)) for c in CSV_COLUMNS[kind]])
        f.flush()
        f = self._file("json")
        f.write(json.dumps({"kind": kind, **rec}, allow_nan=True) + "\n")
        f.flush()
        self.counts[kind] += 1
        self.counts["json"] += 1
        if self.tb is not None and tb_step is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("stage", "epoch", "step"):
                    tag = f"{kind}/{k}" if kind != "stage" else f"stage/{k}"
                    self.tb.add_scalar(tag, v, tb_step)

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def close(self) -> None:
        self._close_files()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
