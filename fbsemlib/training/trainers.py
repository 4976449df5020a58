"""Training FBSEM-Net: end-to-end (full backpropagation) and sequential (module by module).

Two trainers share one configuration (:class:`TrainConfig`, the ``train:`` section of an
experiment file) and one output folder layout:

* :class:`EndToEndTrainer` backpropagates through all ``K`` unrolled modules. The loss is
  ``sum_k w_k relmse(x_k, t_k)`` with the iteration-dependent targets ``t_k`` (weights
  ``loss_weights``) or ``relmse(x_K, t_final)`` with the single high-count reference
  (``targets: final``). ``grad_checkpointing: true`` recomputes each module in the backward
  pass (memory of ~one module's activations plus the K module inputs; the paper did not
  use it, it is the middle ground between the two modes). Gradients are the same; with
  BatchNorm the recomputation updates the running statistics a second time.
* :class:`SequentialTrainer` (Corda-D'incan, Schnabel & Reader 2022): stage ``k = 0..K-1``
  trains module ``k`` alone (its CNN and its ``rho``) against target ``k`` on inputs
  ``x_k`` produced by the frozen, already trained modules ``0..k-1``. Those inputs are
  CACHED for the whole training and validation sets (in memory, or as ``.npy`` memmaps on
  disk when larger than ``cache_memory_mb``), together with the per-sample part of the
  module context (the sensitivity image of subset ``k % M``, the FOV support, the mean
  subset sensitivities and the scaled MR channel, so a stage step runs no back-projection
  besides its own EM step); after stage ``k`` module ``k`` is applied once to every cached
  input to give ``x_{k+1}``. The whole training therefore costs ``O(K)`` module passes per
  sample and epoch-stage, not ``O(K^2)``, and its memory is that of one module whatever
  ``K``. (It is not faster than end-to-end training for the same number of updates per
  module: both run each module once per sample and epoch; its gain is memory.) No gradient crosses a module boundary: the cached inputs
  carry no graph, the parameters of the other modules have ``requires_grad=False`` and are
  not in the optimiser (each stage has a fresh Adam and its own LR schedule), and the
  entries of the shared ``rho`` vector that belong to other modules get zero gradient and
  are restored bit for bit after every optimiser step.

Choices (stated here, and in the book):

* **Final target in sequential mode** (``targets: final``): every stage is trained against
  the final high-count reference (each module is asked to jump to the reference, a greedy
  layer-wise scheme). It is an ablation; the paper's method is ``iteration-dependent``.
* **loss_weights** only weight the end-to-end loss; a sequential stage has a single loss.
* **Stage initialisation** (``stage_init``; iteration-dependent networks, sequential
  mode): ``"fresh"`` starts every module from its own random initialisation;
  ``"previous"`` starts module ``k`` from module ``k-1``'s trained CNN and ``rho`` (a warm
  start: neighbouring modules solve nearly the same problem, so a stage's few optimiser
  steps refine instead of starting over); ``"best"`` (the default) takes whichever of the
  two has the lower loss on the first batch of the stage's training inputs, because the previous module is
  not always the better start (module 0 sees the uniform ``x0``; in a tiny overfitting test
  module 1 learned far less from module 0's weights than from a fresh start). The chosen
  start is logged per stage (``init``). The modules still end up with their own weights.
  End-to-end training initialises every module independently.
* **Shared weights** (``model.shared: true``) in sequential mode: the network is shared, so
  at test time every module runs the *final* weights. Stage ``k`` fine-tunes the one shared
  CNN and ``rho`` against target ``k``, starting from the weights left by stage ``k-1``
  (Adam restarted). Because the weights change at every stage, a cache computed with old
  weights would be stale: after stage ``k`` the inputs of stage ``k+1`` are recomputed
  *from x0 through modules 0..k with the current shared weights*. Training (backward
  passes) stays ``O(K)``; these no-grad forward passes cost ``O(K^2)`` module passes in
  total (still one module of memory). With iteration-dependent networks (the paper's
  setting) the cache is propagated incrementally, ``O(K)``.
* **BatchNorm**: the module being trained is in train mode (batch statistics, running
  statistics updated); every frozen module, cache propagation and validation use eval mode
  (running statistics), so the cached inputs are exactly what inference produces.
* **Learning rates**: Adam; the strengths ``rho`` (``g = softplus(rho)``) are in their own
  parameter group with learning rate ``lr * rho_lr_factor`` and no weight decay.
* **Early stopping** (``early_stopping_patience``, counted in validations; per stage in
  sequential mode) restores the best weights (lowest validation loss) of the run / stage.
* **Determinism**: the data order of epoch ``e`` of stage ``k`` (stage 0 for end-to-end) is a
  permutation drawn from ``SeedSequence([seed, k, e])``; nothing else in training is
  random. A resumed run reproduces an uninterrupted one exactly on CPU.

Several processes (``torchrun``, DistributedDataParallel; :mod:`fbsemlib.training.distributed`):
``batch_size`` is per process, each rank takes its part of every global batch of the same
epoch order, gradients are averaged by DDP (rebuilt per sequential stage around the
stage's trainable parameters), the sequential cache is computed per shard and all-gathered,
validation runs on shards and is reduced, BatchNorm batch statistics are per rank, and only
rank 0 writes files. A W-process run with per-rank batch ``b`` equals (up to rounding) a
one-process run with batch ``W * b`` (without BatchNorm).

Output folder (``out_dir``)::

    config.yaml        the resolved model / train / data sections and the mode
    checkpoint.pt      last checkpoint (atomic; see below)
    model.pt           the trained model (written at the end; read by :func:`load_trained`)
    metrics.json       final losses, NRMSE, times, peak CUDA memory, gammas
    log_steps.csv      one row per optimiser step (every ``log_every`` steps)
    log_epochs.csv     one row per epoch (per stage and epoch in sequential mode)
    log_stages.csv     sequential mode: one row per stage
    log.jsonl          all of the above as JSON lines (with the full gamma vectors)
    tensorboard/       when ``tensorboard: true`` and TensorBoard is installed
    cache/             sequential mode with a disk cache (removed at the end)

Checkpoint (``torch.save`` of plain values and tensors; ``weights_only``-loadable)::

    format, format_version, mode, finished
    model_state, optimizer_state, scheduler_state     (optimizer/scheduler None between stages)
    configs: {model, train, data, structure, projector, dataset_sizes}
    versions: {fbsemlib, torch, numpy, python}
    rng: {python, numpy, torch, cuda, data_order}
    counters: {stage, epoch (next to run), global_step}
    stages_done, stage_state (best validation loss / weights, patience counter, stopped),
    stage_start_state (sequential + shared: the weights the stage's cache was built with),
    history (per-stage summaries), log_counts, elapsed_s

The sequential cache is not saved: on resume it is rebuilt by running the finished
(frozen) modules on the data, which reproduces it exactly.
"""

from __future__ import annotations

import collections
import copy
import csv
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fbsemlib.training.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from fbsemlib.training import distributed as _dist
from fbsemlib.errors import UserError
from fbsemlib.config import ConfigError, diff, from_dict, load_experiment, to_dict
from fbsemlib.models.fbsem import FBSEMNet, ModelConfig, relative_mse, target_weights, unrolled_loss

__all__ = [
    "TrainConfig",
    "TrainingError",
    "TrainingDiverged",
    "EndToEndTrainer",
    "SequentialTrainer",
    "make_trainer",
    "parse_model_section",
    "load_trained",
    "epoch_permutation",
    "cmd_train",
    "CHECKPOINT_NAME",
    "MODEL_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
CHECKPOINT_FORMAT = "fbsemlib-train-checkpoint"
MODEL_FORMAT = "fbsemlib-fbsem-model"
FORMAT_VERSION = 1
MODES = ("end-to-end", "sequential")
BATCH_KEYS = ("y", "multiplicative", "additive", "mr", "targets", "target_final")
# train-config fields that may change between a run and its resumption (they do not
# change the result)
#: ``train:`` fields that do not change the trained weights (how often to checkpoint and
#: log, where to cache, loader workers): a run may resume with other values, and the
#: experiment cache (:func:`fbsembook.experiments.train`) leaves them out of its key.
OPERATIONAL_FIELDS = ("tensorboard", "num_workers", "cache", "cache_memory_mb", "checkpoint_every", "log_every")
_RESUME_FREE = OPERATIONAL_FIELDS


class TrainingError(UserError):
    """A training run cannot start or resume (incompatible checkpoint, dataset, ...)."""


class TrainingDiverged(RuntimeError):
    """NaN / Inf in the loss or in gamma; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
def _err(name: str, msg: str) -> ConfigError:
    return ConfigError(f"train.{name} {msg}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass
class TrainConfig:
    """The ``train:`` section of an experiment file (see the module docstring).

    Epoch-based quantities (``validation_every``, ``checkpoint_every``, ``lr_step_epochs``,
    the LR schedule) count epochs of the run in end-to-end mode and epochs of the stage in
    sequential mode."""

    mode: str = "sequential"  # default mode of `fbsem train` ("end-to-end" | "sequential"); --mode overrides
    targets: str = "iteration-dependent"  # | "final"
    loss_weights: str | list[float] = "uniform"  # "uniform" | "linear" | "last" | [w_0, ..., w_{K-1}] (end-to-end)
    epochs: int = 20  # end-to-end
    epochs_per_module: int = 5  # sequential: epochs of each stage
    stage_init: str = "best"  # sequential, iteration-dependent networks: start of module k: "fresh" | "previous" | "best"
    batch_size: int = 4
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "constant" | "cosine" | "step"
    lr_step_epochs: int = 10  # step schedule: multiply by lr_decay every lr_step_epochs epochs
    lr_decay: float = 0.5
    lr_min_factor: float = 0.0  # cosine schedule: final lr = lr * lr_min_factor
    weight_decay: float = 0.0  # L2 on the CNN weights (never on rho)
    rho_lr_factor: float = 1.0  # learning rate of the strengths rho = lr * rho_lr_factor
    grad_clip: float | None = None  # max global gradient norm
    seed: int = 0
    grad_checkpointing: bool = False  # end-to-end only: recompute each module in the backward pass
    validation_every: int = 1  # epochs
    early_stopping_patience: int | None = None  # validations without improvement (per stage); None = off
    cache: str = "auto"  # sequential inputs: "auto" | "memory" | "disk"
    cache_memory_mb: float = 2048.0  # auto: in memory when two generations of the cache fit in this
    checkpoint_every: int = 1  # epochs (and at the end of every stage)
    amp: bool = False  # bfloat16 autocast (CUDA only)
    tensorboard: bool = False
    num_workers: int = 0  # DataLoader workers
    log_every: int = 1  # optimiser steps between rows of log_steps.csv

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _err("mode", f"must be 'end-to-end' or 'sequential', got {self.mode!r}")
        if self.targets not in ("iteration-dependent", "final"):
            raise _err("targets", f"must be 'iteration-dependent' or 'final', got {self.targets!r}")
        lw = self.loss_weights
        if isinstance(lw, str):
            if lw not in ("uniform", "linear", "last"):
                raise _err("loss_weights", f"must be 'uniform', 'linear', 'last' or a list of numbers, got {lw!r}")
        elif isinstance(lw, (list, tuple)):
            if not lw or not all(_is_num(w) and math.isfinite(w) and w >= 0 for w in lw) or sum(lw) <= 0:
                raise _err("loss_weights", f"must be non-negative finite numbers with a positive sum, got {list(lw)!r}")
            self.loss_weights = [float(w) for w in lw]
        else:
            raise _err("loss_weights", f"must be a string or a list of numbers, got {lw!r}")
        for name in ("epochs", "epochs_per_module", "batch_size", "lr_step_epochs", "validation_every",
                     "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise _err(name, f"must be a positive integer, got {v!r}")
        for name in ("seed", "num_workers"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise _err(name, f"must be a non-negative integer, got {v!r}")
        if self.early_stopping_patience is not None and (not _is_int(self.early_stopping_patience)
                                                          or self.early_stopping_patience < 1):
            raise _err("early_stopping_patience", f"must be a positive integer or null, got {self.early_stopping_patience!r}")
        if not _is_num(self.lr) or not math.isfinite(self.lr) or self.lr <= 0:
            raise _err("lr", f"must be a positive number, got {self.lr!r}")
        if not _is_num(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise _err("weight_decay", f"must be a non-negative number, got {self.weight_decay!r}")
        if not _is_num(self.rho_lr_factor) or not math.isfinite(self.rho_lr_factor) or self.rho_lr_factor <= 0:
            raise _err("rho_lr_factor", f"must be a positive number, got {self.rho_lr_factor!r}")
        if self.lr_schedule not in ("constant", "cosine", "step"):
            raise _err("lr_schedule", f"must be 'constant', 'cosine' or 'step', got {self.lr_schedule!r}")
        if not _is_num(self.lr_decay) or not (0 < self.lr_decay <= 1):
            raise _err("lr_decay", f"must be in (0, 1], got {self.lr_decay!r}")
        if not _is_num(self.lr_min_factor) or not (0 <= self.lr_min_factor <= 1):
            raise _err("lr_min_factor", f"must be in [0, 1], got {self.lr_min_factor!r}")
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or not math.isfinite(self.grad_clip)
                                           or self.grad_clip <= 0):
            raise _err("grad_clip", f"must be a positive number or null, got {self.grad_clip!r}")
        if self.cache not in ("auto", "memory", "disk"):
            raise _err("cache", f"must be 'auto', 'memory' or 'disk', got {self.cache!r}")
        if not _is_num(self.cache_memory_mb) or self.cache_memory_mb < 0:
            raise _err("cache_memory_mb", f"must be a non-negative number, got {self.cache_memory_mb!r}")
        if self.stage_init not in ("fresh", "previous", "best"):
            raise _err("stage_init", f"must be 'fresh', 'previous' or 'best', got {self.stage_init!r}")
        for name in ("grad_checkpointing", "amp", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, f"must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return to_dict(self)


_MODEL_EXTRA = ("num_iterations", "num_subsets")


def parse_model_section(d: dict | None) -> tuple[ModelConfig, int | None, int | None]:
    """The ``model:`` section: the fields of :class:`~fbsemlib.models.fbsem.ModelConfig`, plus
    optional ``num_iterations`` / ``num_subsets`` (default: the dataset's schedule; with
    iteration-dependent targets ``num_subsets`` must equal the data's and
    ``num_iterations`` may be at most the data's, which then trains on the first targets).
    Returns ``(config, num_iterations, num_subsets)``."""
    d = dict(d or {})
    extra = {}
    for k in _MODEL_EXTRA:
        if k in d:
            v = d.pop(k)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigError(f"model.{k} must be a positive integer or null, got {v!r}")
            extra[k] = v
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in section 'model' (allowed keys: "
                          f"{', '.join(sorted(fields + list(_MODEL_EXTRA)))})")
    return from_dict(ModelConfig, d, "model"), extra.get("num_iterations"), extra.get("num_subsets")


# ----------------------------------------------------------------------------------------
# data order, batches
# ----------------------------------------------------------------------------------------
def epoch_permutation(seed: int, stage: int, epoch: int, n: int) -> list[int]:
    """The data order of ``epoch`` of ``stage`` (stage 0 in end-to-end mode): a function of
    ``(seed, stage, epoch)`` only, so a resumed run sees the same order."""
    s = int(np.random.SeedSequence([int(seed), int(stage), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)
    g = torch.Generator().manual_seed(s)
    return torch.randperm(n, generator=g).tolist()


class _Indexed(Dataset):
    """``(i, batch-dict)`` items; ``targets``: ``"all"`` keeps the ``(K, 1, Z, Y, X)``
    targets, an integer ``k`` keeps only target ``k`` as ``"target"`` ``(1, Z, Y, X)`` (less
    copying in sequential stages), ``None`` drops them."""

    def __init__(self, ds, targets="all"):
        self.ds, self.targets = ds, targets

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        missing = [k for k in BATCH_KEYS if k not in item]
        if missing:
            raise KeyError(f"dataset item {i} lacks the key(s) {missing} (needed: {list(BATCH_KEYS)})")
        out = {k: item[k] for k in ("y", "multiplicative", "additive", "mr", "target_final")}
        if self.targets == "all":
            out["targets"] = item["targets"]
        elif self.targets is not None:
            out["target"] = item["targets"][self.targets]
        return i, out


def _collate(items):
    from torch.utils.data import default_collate

    idx = torch.tensor([i for i, _ in items], dtype=torch.long)
    return idx, default_collate([b for _, b in items])


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------
# sequential input cache
# ----------------------------------------------------------------------------------------
class _ImageCache:
    """``N`` arrays of shape ``shape`` (float32 or bool), in memory (a CPU tensor) or on disk
    (an ``.npy`` memmap)."""

    def __init__(self, n: int, shape: tuple[int, ...], where: str, path: Path | None = None, dtype=torch.float32):
        self.n, self.shape, self.where, self.path, self.dtype = n, tuple(shape), where, path, dtype
        if where == "memory":
            self._t = torch.zeros((n,) + self.shape, dtype=dtype)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            npd = np.bool_ if dtype == torch.bool else np.float32
            self._mm = np.lib.format.open_memmap(str(path), mode="w+", dtype=npd, shape=(n,) + self.shape)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if self.where == "memory":
            return self._t[idx]
        return torch.from_numpy(np.ascontiguousarray(self._mm[idx.numpy()]))

    def set(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        v = values.detach().to("cpu", self.dtype)
        if self.where == "memory":
            self._t[idx] = v
        else:
            self._mm[idx.numpy()] = v.numpy()

    def all(self) -> torch.Tensor:
        return self.get(torch.arange(self.n))

    def flush(self) -> None:
        if self.where == "disk":
            self._mm.flush()

    def delete(self) -> None:
        if self.where == "disk":
            if hasattr(self, "_mm"):
                del self._mm
            try:
                self.path.unlink()
            except OSError:
                pass
        else:
            self._t = None


@dataclass
class _SplitCache:
    """What stage ``k`` needs of every sample of a split, besides the measured data: the
    input ``x_k`` and the per-sample context of :meth:`FBSEMNet.prepare` (sensitivity of
    subset ``k % M``, FOV support, mean subset sensitivities, scaled MR), so that a stage
    step needs no back-projection for the sensitivities."""

    x: _ImageCache
    sens: _ImageCache
    support: _ImageCache
    sens_mean: torch.Tensor  # (N, M)
    mr: _ImageCache | None

    def delete(self) -> None:
        for c in (self.x, self.sens, self.support, self.mr):
            if c is not None:
                c.delete()


# ----------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------
_CSV_COLUMNS = {
    "step": ["mode", "stage", "epoch", "step", "loss", "lr", "gamma", "time_s"],
    "epoch": ["mode", "stage", "epoch", "step", "train_loss", "val_loss", "val_nrmse", "val_nrmse_final", "lr",
              "gamma_mean", "gamma_min", "gamma_max", "best", "epoch_time_s", "time_s", "peak_memory_mb"],
    "stage": ["mode", "stage", "epochs_run", "best_epoch", "step", "train_loss", "val_loss", "val_nrmse", "gamma",
              "init", "stage_time_s", "cache_time_s", "cache", "time_s", "peak_memory_mb"],
}
_LOG_FILES = {"step": "log_steps.csv", "epoch": "log_epochs.csv", "stage": "log_stages.csv", "json": "log.jsonl"}


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


class _RunLog:
    """CSV + JSON-lines logs (and optional TensorBoard); line counts are stored in the
    checkpoints so that a resumed run first truncates what was logged after it."""

    def __init__(self, out: Path, kinds: tuple[str, ...], tensorboard: bool, purge_step: int | None = None,
                 enabled: bool = True):
        self.out = out
        self.kinds = kinds
        self.enabled = enabled  # False: write nothing (ranks other than 0)
        self.counts = {k: 0 for k in kinds + ("json",)}
        self._files: dict = {}
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed
                warnings.warn("train.tensorboard is true but TensorBoard is not installed (pip install tensorboard); "
                              "logging to CSV / JSON only", stacklevel=3)
            else:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def start(self, counts: dict | None) -> None:
        """Fresh logs (``counts`` None) or logs truncated to ``counts`` lines."""
        if not self.enabled:
            return
        self._close_files()
        for kind in self.kinds + ("json",):
            path = self.out / _LOG_FILES[kind]
            n = 0 if counts is None else int(counts.get(kind, 0))
            header = kind != "json"
            lines: list[str] = []
            if counts is not None and path.exists():
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                lines = lines[: n + (1 if header else 0)]
            if header and not lines:
                lines = [",".join(_CSV_COLUMNS[kind]) + "\n"]
            atomic_write_text(path, "".join(lines))
            self.counts[kind] = max(0, len(lines) - (1 if header else 0))

    def _file(self, kind: str):
        """The append handle of a log file (opened once; every write is flushed, so a killed
        run leaves whole lines and :meth:`start` can truncate to a checkpoint's counts)."""
        f = self._files.get(kind)
        if f is None:
            f = self._files[kind] = open(self.out / _LOG_FILES[kind], "a", newline="", encoding="utf-8")
        return f

    def write(self, kind: str, rec: dict, tb_step: int | None = None) -> None:
        if not self.enabled:
            return
        f = self._file(kind)
        csv.writer(f).writerow([_fmt(rec.get(c)) for c in _CSV_COLUMNS[kind]])
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


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _versions() -> dict:
    from fbsemlib import __version__

    return {"fbsemlib": str(__version__), "torch": str(torch.__version__), "numpy": str(np.__version__),
            "python": platform.python_version()}


def projector_spec(projector) -> dict:
    """What is needed to rebuild a :class:`~fbsemlib.physics.projector.Projector`."""
    return {
        "sinogram": projector.sinogram.to_dict(),
        "grid": projector.grid.to_dict(),
        "backend": projector.backend,
        "psf_fwhm_mm": None if projector.psf is None else list(projector.psf.fwhm_mm),
    }


def dataset_info(ds) -> dict:
    """The recipe / geometry / schedule of a dataset (stored in checkpoints and compared on
    resume); ``{}`` for datasets without them (e.g. in-memory test datasets)."""
    info: dict = {}
    manifest = getattr(ds, "manifest", None)
    if isinstance(manifest, dict):
        for k in ("recipe", "recipe_hash", "geometry", "grid", "num_iterations", "num_subsets", "psf_fwhm_mm"):
            if k in manifest:
                info[k] = manifest[k]
        return json.loads(json.dumps(info))
    for k in ("num_iterations", "num_subsets"):
        if hasattr(ds, k):
            info[k] = int(getattr(ds, k))
    for k in ("geometry", "grid"):
        v = getattr(ds, k, None)
        if hasattr(v, "to_dict"):
            info[k] = v.to_dict()
    rec = getattr(ds, "recipe", None)
    if rec is not None:
        info["recipe"] = to_dict(rec) if dataclasses.is_dataclass(rec) else rec
    return json.loads(json.dumps(info, default=str))


#: how :func:`fbsemlib.config.diff` words a checkpoint's configuration against today's
_CHECKPOINT_VS_NOW = ("checkpoint", "now")


def _nrmse(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||x - t|| / ||t||`` (B,)."""
    d = (x - t).flatten(1).pow(2).sum(1)
    n = t.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return (d / n).sqrt()


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = torch.cuda.current_device() if a.index is None else a.index
        ib = torch.cuda.current_device() if b.index is None else b.index
        return ia == ib
    return True


class _LRFactor:
    """Multiplicative LR factor of epoch ``e`` (a picklable ``LambdaLR`` function)."""

    def __init__(self, schedule: str, total: int, step_epochs: int, decay: float, min_factor: float):
        self.schedule, self.total, self.step_epochs, self.decay, self.min_factor = \
            schedule, total, step_epochs, decay, min_factor

    def __call__(self, e: int) -> float:
        if self.schedule == "cosine":
            t = min(e, self.total) / max(1, self.total)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.schedule == "step":
            return self.decay ** (e // self.step_epochs)
        return 1.0


def _clone_state(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------
@dataclass
class _Trainer:
    """Common machinery of both trainers (data order, optimiser, logs, checkpoints)."""

    model: FBSEMNet
    train_dataset: Dataset
    val_dataset: Dataset | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str | os.PathLike = "runs/fbsem"
    device: str | torch.device | None = None  # default: the projector's device
    progress: bool = True
    data_info: dict | None = None  # recipe / geometry stored in checkpoints (default: from the dataset)
    callbacks: list[Callable[[str, dict], None]] = field(default_factory=list)

    mode: ClassVar[str] = ""

    # -- set-up ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if not isinstance(self.model, FBSEMNet):
            raise TypeError(f"model must be an FBSEMNet, got {type(self.model).__name__}")
        if isinstance(self.config, dict):
            self.config = from_dict(TrainConfig, self.config, "train")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        if self.config.mode != self.mode:
            self.config = dataclasses.replace(self.config, mode=self.mode)
        self.out_dir = Path(self.out_dir)
        self._rank0 = _dist.is_rank0()  # several processes: only rank 0 writes files and shows progress
        if not self._rank0:
            self.progress = False
        pdev = self.model.projector.device
        if self.device is not None and not _same_device(torch.device(self.device), pdev):
            raise TrainingError(f"device {str(self.device)!r} differs from the projector's device {str(pdev)!r}: "
                                "build the projector on the training device")
        self.dev = pdev
        self.model.to(self.dev)
        if self.config.amp and self.dev.type != "cuda":
            raise ConfigError("train.amp=true needs a CUDA device (mixed precision is not supported on CPU); "
                              "set train.amp: false")
        if len(self.train_dataset) == 0:
            raise TrainingError("the training dataset is empty")
        if self.val_dataset is not None and len(self.val_dataset) == 0:
            self.val_dataset = None
        self._check_data(self.train_dataset, "training")
        if self.val_dataset is not None:
            self._check_data(self.val_dataset, "validation")
        K = self.model.num_modules
        if not isinstance(self.config.loss_weights, str) and len(self.config.loss_weights) != K:
            raise ConfigError(f"train.loss_weights has {len(self.config.loss_weights)} values but the model has "
                              f"K = {K} modules")
        self.weights = target_weights(K, self.config.loss_weights)
        if self.data_info is None:
            self.data_info = dataset_info(self.train_dataset)
        self._log: _RunLog | None = None
        self._outer = tqdm(disable=True)
        self._elapsed0 = 0.0
        self._t0 = time.perf_counter()
        self.global_step = 0
        self.history: list[dict] = []

    def _check_data(self, ds, name: str) -> None:
        item = ds[0]
        missing = [k for k in BATCH_KEYS if k not in item]
        if missing:
            raise TrainingError(f"the {name} dataset's items lack the key(s) {missing}")
        P = self.model.projector
        y = item["y"]
        if tuple(y.shape) != (1,) + tuple(P.out_shape):
            raise TrainingError(f"{name} data: sinograms have shape {tuple(y.shape)}, the projector expects "
                                f"{(1,) + tuple(P.out_shape)} (dataset and model geometry differ)")
        if tuple(item["mr"].shape) != (1,) + tuple(P.in_shape):
            raise TrainingError(f"{name} data: images have shape {tuple(item['mr'].shape)}, the projector expects "
                                f"{(1,) + tuple(P.in_shape)}")
        K, Kd = self.model.num_modules, int(item["targets"].shape[0])
        if self.config.targets == "iteration-dependent":
            ds_sub = getattr(ds, "num_subsets", None)
            if ds_sub is not None and int(ds_sub) != self.model.num_subsets:
                raise ConfigError(f"the model has {self.model.num_subsets} subsets but the {name} data's targets were "
                                  f"made with {ds_sub} subsets (model.num_subsets must match the data)")
            if K > Kd:
                raise ConfigError(f"the model has K = {K} modules ({self.model.num_iterations} iterations x "
                                  f"{self.model.num_subsets} subsets) but the {name} data has only {Kd} "
                                  "iteration-dependent targets")

    @property
    def K(self) -> int:
        return self.model.num_modules

    def _elapsed(self) -> float:
        return self._elapsed0 + (time.perf_counter() - self._t0)

    def _emit(self, event: str, rec: dict) -> None:
        for cb in self.callbacks:
            cb(event, rec)

    def _loader(self, ds, order: list[int], targets="all", batches: list[list[int]] | None = None) -> DataLoader:
        if batches is None:
            batches = _batches(order, self.config.batch_size)
        return DataLoader(_Indexed(ds, targets), batch_sampler=batches,
                          num_workers=self.config.num_workers, collate_fn=_collate,
                          pin_memory=self.dev.type == "cuda")

    def _to_dev(self, batch: dict) -> dict:
        return {k: v.to(self.dev, non_blocking=True) for k, v in batch.items()}

    def _prepare(self, b: dict):
        return self.model.prepare(b["y"], b["multiplicative"], b["additive"], b["mr"])

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.config.amp)

    def _optimizer(self, cnn_params: list, rho: torch.nn.Parameter):
        c = self.config
        groups = [{"params": cnn_params, "weight_decay": c.weight_decay},
                  {"params": [rho], "weight_decay": 0.0, "lr": c.lr * c.rho_lr_factor}]
        opt = torch.optim.Adam(groups, lr=c.lr)
        total = c.epochs if self.mode == "end-to-end" else c.epochs_per_module
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _LRFactor(c.lr_schedule, total, c.lr_step_epochs, c.lr_decay, c.lr_min_factor))
        return opt, sched

    def gammas(self) -> list[float]:
        with torch.no_grad():
            return [float(v) for v in torch.nn.functional.softplus(self.model.rho.detach()).cpu()]

    def _check_finite_loss(self, loss: torch.Tensor, where: str) -> None:
        if not bool(torch.isfinite(loss.detach())):
            raise TrainingDiverged(f"{where}: the loss is {float(loss.detach())}; training stopped. The last good checkpoint "
                                   f"{str(self.out_dir / CHECKPOINT_NAME)!r} is kept (lower train.lr, set "
                                   "train.grad_clip, or check the data)")

    def _check_finite_gamma(self, where: str) -> None:
        if not bool(torch.isfinite(self.model.rho.detach()).all()):
            raise TrainingDiverged(f"{where}: gamma became NaN/Inf (rho = {self.model.rho.detach().cpu().tolist()}); "
                                   f"training stopped. The last good checkpoint {str(self.out_dir / CHECKPOINT_NAME)!r} "
                                   "is kept (lower train.lr or set train.grad_clip)")

    def _peak_mb(self) -> float | None:
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dev) / 2**20
        return None

    def _stage_targets(self, k: int):
        """What a sequential stage ``k`` loads: target ``k`` only (or none for the final target)."""
        return None if self.config.targets == "final" else k

    def _step_targets(self, b: dict) -> torch.Tensor:
        return b["target_final"] if self.config.targets == "final" else b["target"]

    # -- configs / checkpoints -----------------------------------------------------------
    def configs(self) -> dict:
        cfg = {
            "mode": self.mode,
            "model": self.model.config.to_dict(),
            "train": self.config.to_dict(),
            "structure": {"num_iterations": self.model.num_iterations, "num_subsets": self.model.num_subsets,
                          "num_modules": self.K},
            "projector": projector_spec(self.model.projector),
            "data": self.data_info or {},
            "dataset_sizes": {"train": len(self.train_dataset),
                              "validation": 0 if self.val_dataset is None else len(self.val_dataset)},
        }
        if _dist.is_distributed():  # absent in one process (older checkpoints stay resumable)
            cfg["distributed"] = {"world_size": _dist.world_size(),
                                  "global_batch_size": _dist.world_size() * self.config.batch_size}
        return cfg

    def _compatibility(self, saved: dict) -> list[str]:
        now = self.configs()
        saved = copy.deepcopy(saved)
        for d in (saved.get("train", {}), now["train"]):
            for k in _RESUME_FREE:
                d.pop(k, None)
        diffs = []
        for key in ("mode", "model", "train", "structure", "data", "dataset_sizes"):
            diffs += diff(saved.get(key), now.get(key), _CHECKPOINT_VS_NOW, key)
        one = lambda c: {"world_size": 1, "global_batch_size": (c.get("train") or {}).get("batch_size")}  # noqa: E731
        diffs += diff(saved.get("distributed") or one(saved), now.get("distributed") or one(now), _CHECKPOINT_VS_NOW,
                      "distributed")
        pa, pb = dict(saved.get("projector", {})), dict(now["projector"])
        pa.pop("backend", None), pb.pop("backend", None)
        diffs += diff(pa, pb, _CHECKPOINT_VS_NOW, "projector")
        return diffs

    def _checkpoint_payload(self, counters: dict, opt=None, sched=None, stage_state=None, extra=None,
                            finished: bool = False) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "finished": finished,
            "model_state": self.model.state_dict(),
            "optimizer_state": None if opt is None else opt.state_dict(),
            "scheduler_state": None if sched is None else sched.state_dict(),
            "configs": self.configs(),
            "versions": _versions(),
            "rng": {**rng_state(), "data_order": {"scheme": "SeedSequence([seed, stage, epoch])",
                                                   "seed": self.config.seed}},
            "counters": {**counters, "global_step": self.global_step},
            "stage_state": stage_state,
            "history": self.history,
            "log_counts": dict(self._log.counts) if self._log is not None else {},
            "elapsed_s": self._elapsed(),
            **(extra or {}),
        }

    def _save_checkpoint(self, payload: dict) -> None:
        if not self._rank0:
            return
        path = atomic_torch_save(payload, self.out_dir / CHECKPOINT_NAME)
        self._emit("checkpoint", {"path": str(path), **payload["counters"]})

    def _load_resume(self) -> dict:
        path = self.out_dir / CHECKPOINT_NAME
        try:
            ck = load_checkpoint(path, map_location="cpu")
        except Exception as e:
            raise TrainingError(f"cannot read checkpoint {str(path)!r}: {e}") from None
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{str(path)!r} is not an fbsemlib training checkpoint (format {ck.get('format')!r})")
        if ck.get("format_version") != FORMAT_VERSION:
            raise TrainingError(f"cannot resume from {str(path)!r}: checkpoint format version "
                                f"{ck.get('format_version')!r} (written by fbsemlib "
                                f"{(ck.get('versions') or {}).get('fbsemlib', '?')}), this fbsemlib reads version "
                                f"{FORMAT_VERSION}: resume with the version that wrote it or start a new run")
        diffs = self._compatibility(ck["configs"])
        if diffs:
            raise TrainingError(f"cannot resume from {str(path)!r}: the configuration differs from the checkpoint's: "
                                + "; ".join(diffs))
        return ck

    # -- entry point ----------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train (or, with ``resume``, continue from ``out_dir/checkpoint.pt`` when it exists)
        and return the final metrics (also written to ``out_dir/metrics.json``)."""
        out = self.out_dir
        ck, done = _dist.rank0_call(lambda: self._resume_point(resume))  # several processes: rank 0's, broadcast
        if done is not None:
            self.model.load_state_dict(ck["model_state"])
            return done
        kinds = ("step", "epoch", "stage") if self.mode == "sequential" else ("step", "epoch")
        self._log = _RunLog(out, kinds, self.config.tensorboard, purge_step=None if ck is None
                            else ck["counters"]["global_step"], enabled=self._rank0)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self._t0 = time.perf_counter()
        if ck is None:
            self._log.start(None)
            if self._rank0:
                atomic_write_text(out / "config.yaml", _yaml_dump(self.configs()))
            import random

            random.seed(self.config.seed)
            np.random.seed(self.config.seed)
            torch.manual_seed(self.config.seed)
        else:
            self._log.start(ck["log_counts"])
            self.model.load_state_dict(ck["model_state"])
            set_rng_state(ck["rng"])
            self.global_step = int(ck["counters"]["global_step"])
            self.history = list(ck.get("history") or [])
            self._elapsed0 = float(ck.get("elapsed_s", 0.0))
        if self.mode == "sequential":
            total, done = self.K, 0 if ck is None else min(self.K, int(ck["counters"]["stage"]))
        else:
            total, done = self.config.epochs, 0 if ck is None else max(0, int(ck["counters"]["epoch"]))
        unit = "modules" if self.mode == "sequential" else "epochs"
        self._outer = tqdm(total=total, initial=min(done, total), desc=f"{self.mode} ({unit})",
                           disable=not self.progress, dynamic_ncols=True)
        try:
            if ck is None or not ck.get("finished"):
                self._run(ck)
            metrics = self._finish()
        finally:
            self._outer.close()
            self._log.close()
            self._release()
        return metrics

    def _resume_point(self, resume: bool) -> tuple[dict | None, dict | None]:
        """``(checkpoint to resume from or None, metrics of an already finished run or
        None)``; creates the output folder. Run by rank 0 only in a multi-process run."""
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path = out / CHECKPOINT_NAME
        ck = None
        if resume and ckpt_path.exists():
            ck = self._load_resume()
            if ck.get("finished") and (out / "metrics.json").exists() and (out / MODEL_NAME).exists():
                return ck, json.loads((out / "metrics.json").read_text())
        elif not resume and (ckpt_path.exists() or (out / MODEL_NAME).exists()):
            raise TrainingError(f"{str(out)!r} already holds a training run; resume it (--resume / fit(resume=True)) "
                                "or choose another output folder")
        return ck, None

    def _release(self) -> None:
        pass

    def _run(self, ck: dict | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- final evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, ds) -> dict:
        """Run the whole network (eval mode) on ``ds``: the end-to-end loss (with this
        config's targets and weights), NRMSE of the last output vs the last
        iteration-dependent target and vs the high-count reference."""
        was = self.model.training
        self.model.eval()
        tot = {"loss": 0.0, "nrmse_last_target": 0.0, "nrmse_reference": 0.0}
        n = 0
        for idx, b in self._loader(ds, _dist.shard(range(len(ds)))):  # this rank's shard (all in one process)
            b = self._to_dev(b)
            ctx = self._prepare(b)
            with self._autocast():
                outs = self.model.run(ctx, return_all=True)
            outs = [o.float() for o in outs]
            B = len(idx)
            tot["loss"] += float(self._e2e_loss(outs, b)) * B
            tot["nrmse_last_target"] += float(_nrmse(outs[-1], b["targets"][:, self.K - 1]).sum()) \
                if b["targets"].shape[1] >= self.K else float("nan")
            tot["nrmse_reference"] += float(_nrmse(outs[-1], b["target_final"]).sum())
            n += B
        self.model.train(was)
        if _dist.is_distributed():
            s = _dist.all_reduce_sums([tot["loss"], tot["nrmse_last_target"], tot["nrmse_reference"], n]).tolist()
            tot = {"loss": s[0], "nrmse_last_target": s[1], "nrmse_reference": s[2]}
            n = int(round(s[3]))
        return {k: v / max(n, 1) for k, v in tot.items()}

    def _e2e_loss(self, outs: list[torch.Tensor], b: dict) -> torch.Tensor:
        if self.config.targets == "final":
            return unrolled_loss(outs, target_final=b["target_final"])
        return unrolled_loss(outs, targets=b["targets"][:, : self.K], weights=self.weights)

    def _finish(self) -> dict:
        out = self.out_dir
        self.model.eval()
        ev_train = self.evaluate(self.train_dataset)
        ev_val = self.evaluate(self.val_dataset) if self.val_dataset is not None else None
        last_epoch = next((h for h in reversed(self.history) if h.get("kind") == "epoch"), {})
        metrics = {
            "mode": self.mode,
            "num_modules": self.K,
            "num_iterations": self.model.num_iterations,
            "num_subsets": self.model.num_subsets,
            "shared": self.model.config.shared,
            "targets": self.config.targets,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "num_parameters_per_module": sum(p.numel() for p in self.model.regularisers[0].parameters()) + 1,
            "steps": self.global_step,
            "final_train_loss": last_epoch.get("train_loss"),
            "final_val_loss": last_epoch.get("val_loss"),
            "final_val_nrmse": last_epoch.get("val_nrmse"),
            "train_eval": ev_train,
            "val_eval": ev_val,
            "gammas": self.gammas(),
            "train_time_s": self._elapsed(),
            "device": str(self.dev),
            "peak_memory_mb": self._peak_mb(),
            "versions": _versions(),
        }
        if self.mode == "sequential":
            stages = [h for h in self.history if h.get("kind") == "stage"]
            metrics["stages"] = [{k: s.get(k) for k in ("stage", "epochs_run", "best_epoch", "train_loss", "val_loss",
                                                        "val_nrmse", "gamma", "init", "stage_time_s", "cache_time_s",
                                                        "peak_memory_mb")} for s in stages]
            metrics["cache"] = stages[-1].get("cache") if stages else None
            peaks = [s.get("peak_memory_mb") for s in stages if s.get("peak_memory_mb") is not None]
            metrics["peak_memory_mb_per_stage_max"] = max(peaks) if peaks else None
        state = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "state_dict": self.model.state_dict(),
                 "configs": self.configs(), "versions": _versions(), "metrics": json.loads(json.dumps(metrics))}
        if self._rank0:
            atomic_torch_save(state, out / MODEL_NAME)
            atomic_write_json(out / "metrics.json", metrics)
        self._save_checkpoint(self._checkpoint_payload({"stage": self.K if self.mode == "sequential" else 0,
                                                        "epoch": -1}, finished=True))
        _dist.barrier()  # every rank returns once rank 0 wrote the files
        self._emit("end", metrics)
        return metrics

    # -- one logged step ------------------------------------------------------------------
    def _log_step(self, stage: int, epoch: int, loss: float, lr: float, gamma: float, bar) -> None:
        self.global_step += 1
        rec = {"mode": self.mode, "stage": stage, "epoch": epoch, "step": self.global_step, "loss": loss, "lr": lr,
               "gamma": gamma, "time_s": self._elapsed()}
        if self.global_step % self.config.log_every == 0:
            self._log.write("step", rec, tb_step=self.global_step)
        bar.set_postfix(loss=f"{loss:.4g}", gamma=f"{gamma:.3g}")
        bar.update()
        self._emit("step", rec)

    def _log_epoch(self, rec: dict) -> None:
        g = self.gammas()
        rec.update({"gamma_mean": float(np.mean(g)), "gamma_min": float(np.min(g)), "gamma_max": float(np.max(g)),
                    "time_s": self._elapsed(), "peak_memory_mb": self._peak_mb()})
        self._log.write("epoch", {**rec, "gammas": g}, tb_step=self.global_step)
        self.history.append({"kind": "epoch", **rec})
        post = {"train": f"{rec['train_loss']:.4g}"}
        if rec.get("val_loss") is not None:
            post["val"] = f"{rec['val_loss']:.4g}"
        if self.mode == "sequential":
            post["epoch"] = rec["epoch"] + 1
        else:
            self._outer.update()
        self._outer.set_postfix(post)
        self._emit("epoch", rec)


def _yaml_dump(d: dict) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)


class _EarlyStop:
    """Best validation loss, best weights and patience (a plain dict in checkpoints)."""

    @staticmethod
    def new() -> dict:
        return {"best_val": None, "best_epoch": None, "best_state": None, "bad": 0, "stopped": False,
                "train_loss": None, "val_loss": None, "val_nrmse": None, "epochs_run": 0, "stage_time_s": 0.0}

    @staticmethod
    def update(st: dict, val_loss: float, epoch: int, state_fn: Callable[[], dict], patience: int | None) -> bool:
        """Record a validation; return True when it is the best so far."""
        if st["best_val"] is None or val_loss < st["best_val"]:
            st["best_val"], st["best_epoch"], st["bad"] = val_loss, epoch, 0
            st["best_val_nrmse"] = st.get("val_nrmse")
            if patience is not None:
                st["best_state"] = state_fn()
            return True
        st["bad"] += 1
        if patience is not None and st["bad"] >= patience:
            st["stopped"] = True
        return False


@dataclass
class EndToEndTrainer(_Trainer):
    """Backpropagation through all ``K`` modules (see the module docstring).

    ``EndToEndTrainer(model, train_dataset, val_dataset, config, out_dir, device, progress).fit()``"""

    mode: ClassVar[str] = "end-to-end"

    def _run(self, ck: dict | None) -> None:
        c, net = self.config, self.model
        for p in net.parameters():
            p.requires_grad_(True)
        cnn = [p for r in net.regularisers for p in r.parameters()]
        opt, sched = self._optimizer(cnn, net.rho)

        def loss_fn(ctx, b):  # one step's loss; wrapped in DDP when there are several processes
            outs = net.run(ctx, return_all=True, checkpoint=c.grad_checkpointing)
            return self._e2e_loss([o.float() for o in outs], b)

        step = _dist.ddp_step(net, loss_fn)
        st = _EarlyStop.new()
        e0 = 0
        if ck is not None:
            e0 = int(ck["counters"]["epoch"])
            if ck.get("optimizer_state") is not None:
                opt.load_state_dict(ck["optimizer_state"])
                sched.load_state_dict(ck["scheduler_state"])
            st = ck["stage_state"] or st
        N = len(self.train_dataset)
        for epoch in range(e0, c.epochs):
            if st["stopped"]:
                break
            t_ep = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            net.train()
            total, n = 0.0, 0
            order = epoch_permutation(c.seed, 0, epoch, N)
            shares = _dist.shard_batches(order, c.batch_size)  # this rank's part of each global batch
            nb = len(shares)
            with tqdm(total=nb, desc=f"epoch {epoch + 1}/{c.epochs}", disable=not self.progress, leave=False,
                      dynamic_ncols=True) as bar:
                for sh, (idx, b) in zip(shares, self._loader(self.train_dataset, order,
                                                             batches=[s.indices for s in shares])):
                    b = self._to_dev(b)
                    ctx = self._prepare(b)
                    with self._autocast():
                        loss = step(ctx, b)
                    loss, mean_loss = _dist.batch_loss(loss, sh)  # one process: both are the loss
                    self._check_finite_loss(mean_loss, f"epoch {epoch + 1}, step {self.global_step + 1}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if c.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(net.parameters(), c.grad_clip)
                    opt.step()
                    self._check_finite_gamma(f"epoch {epoch + 1}, step {self.global_step + 1}")
                    lv = float(mean_loss.detach())
                    total += lv * sh.total
                    n += sh.total
                    self._log_step(0, epoch, lv, lr, float(np.mean(self.gammas())), bar)
            sched.step()
            _dist.sync_buffers(net)  # BatchNorm running statistics: rank 0's on every rank
            st["train_loss"], st["epochs_run"] = total / max(n, 1), epoch + 1
            rec = {"mode": self.mode, "stage": 0, "epoch": epoch, "step": self.global_step,
                   "train_loss": st["train_loss"], "lr": lr, "best": None}
            if self.val_dataset is not None and ((epoch + 1) % c.validation_every == 0 or epoch + 1 == c.epochs):
                v = self._validate()
                rec.update(val_loss=v["loss"], val_nrmse=v["nrmse_last_target"], val_nrmse_final=v["nrmse_reference"])
                st["val_loss"], st["val_nrmse"] = v["loss"], v["nrmse_last_target"]
                rec["best"] = _EarlyStop.update(st, v["loss"], epoch, lambda: _clone_state(net.state_dict()),
                                                c.early_stopping_patience)
            rec["epoch_time_s"] = time.perf_counter() - t_ep
            self._log_epoch(rec)
            if (epoch + 1) % c.checkpoint_every == 0 or epoch + 1 == c.epochs or st["stopped"]:
                self._save_checkpoint(self._checkpoint_payload({"stage": 0, "epoch": epoch + 1}, opt, sched, st))
        if c.early_stopping_patience is not None and st["best_state"] is not None:
            net.load_state_dict(st["best_state"])

    def _validate(self) -> dict:
        v = self.evaluate(self.val_dataset)
        if not math.isfinite(v["loss"]):
            raise TrainingDiverged(f"validation loss is {v['loss']}; the last good checkpoint is kept")
        return v


@dataclass
class SequentialTrainer(_Trainer):
    """Module-by-module training with cached inputs (see the module docstring).

    ``SequentialTrainer(model, train_dataset, val_dataset, config, out_dir, device, progress).fit()``;
    after a stage, :meth:`cached_inputs` gives the cached inputs of the next stage."""

    mode: ClassVar[str] = "sequential"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._caches: dict[str, _ImageCache] = {}
        self._cache_stage: int | None = None
        self._cache_where: str | None = None

    # -- cache -----------------------------------------------------------------------------
    def _splits(self) -> dict:
        d = {"train": self.train_dataset}
        if self.val_dataset is not None:
            d["validation"] = self.val_dataset
        return d

    def _where(self) -> str:
        if self._cache_where is None:
            c = self.config
            if c.cache != "auto":
                self._cache_where = c.cache
            else:
                vox = int(np.prod(self.model.projector.in_shape))
                n = sum(len(d) for d in self._splits().values())
                # x and the subset sensitivity, two generations each during propagation,
                # the MR channel and the (bool) support
                need = n * vox * (4 * 4 + 4 + 1)
                self._cache_where = "memory" if need <= c.cache_memory_mb * 2**20 else "disk"
        return self._cache_where

    def _new_cache(self, split: str, n: int, name: str, dtype=torch.float32) -> _ImageCache:
        shape = (1,) + tuple(self.model.projector.in_shape)
        d = self.out_dir / "cache"
        if _dist.is_distributed():
            d = d / f"rank-{_dist.rank()}"
        path = d / f"{split}_{name}.npy"
        return _ImageCache(n, shape, self._where(), path, dtype)

    def _context(self, b: dict, idx: torch.Tensor, k: int, split: str):
        """The :class:`~fbsemlib.models.fbsem.UnrollContext` of module ``k`` for a batch, from the
        cache: only subset ``m = k % M`` is filled in (all that :meth:`FBSEMNet.step`
        reads), so no sensitivity is recomputed. Equal to ``net.prepare(...)`` for module ``k``
        (tested)."""
        from fbsemlib.models.fbsem import UnrollContext

        net, c = self.model, self._caches[split]
        M = net.num_subsets
        m = k % M
        models, ys, sens, smean = [None] * M, [None] * M, [None] * M, [None] * M
        models[m], ys[m] = net.subset_model(m, b["multiplicative"], b["additive"]), b["y"][net.subset_slice(m)]
        sens[m] = c.sens.get(idx).to(self.dev)
        smean[m] = c.sens_mean[idx, m].to(self.dev).view(-1, 1, 1, 1, 1)
        support = c.support.get(idx).to(self.dev)
        mr = None if c.mr is None else c.mr.get(idx).to(self.dev)
        return UnrollContext(models, ys, sens, smean, mr, support, support.to(b["y"].dtype))

    @torch.no_grad()
    def _build_caches(self, k: int) -> None:
        """Inputs ``x_k`` of every sample (modules ``0..k-1``, eval mode, from ``x0``) and
        the per-sample context of module ``k``."""
        self._drop_caches()
        net = self.model
        net.eval()
        M = net.num_subsets
        for split, ds in self._splits().items():
            n = len(ds)
            sc = _SplitCache(self._new_cache(split, n, f"x{k:03d}"), self._new_cache(split, n, f"sens{k:03d}"),
                             self._new_cache(split, n, "support", torch.bool), torch.zeros(n, M),
                             self._new_cache(split, n, "mr") if net.config.use_mr else None)
            order = _dist.shard(range(n))  # this rank's shard; gathered below
            with tqdm(total=len(_batches(order, self.config.batch_size)), desc=f"inputs of module {k + 1} ({split})",
                      disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
                for idx, b in self._loader(ds, order, targets=None):
                    b = self._to_dev(b)
                    ctx = self._prepare(b)
                    with self._autocast():
                        x = net.run(ctx, modules=range(k))
                    sc.x.set(idx, x.float())
                    sc.sens.set(idx, ctx.sens[k % M])
                    sc.support.set(idx, ctx.support)
                    sc.sens_mean[idx] = torch.cat([s.reshape(-1, 1) for s in ctx.sens_mean], 1).cpu()
                    if sc.mr is not None:
                        sc.mr.set(idx, ctx.mr)
                    bar.update()
            _dist.allgather_shards(n, sc.x, sc.sens, sc.support, sc.mr, sc.sens_mean)
            for cache in (sc.x, sc.sens, sc.support, sc.mr):
                if cache is not None:
                    cache.flush()
            self._caches[split] = sc
        self._cache_stage = k

    @torch.no_grad()
    def _propagate(self, k: int) -> None:
        """After stage ``k``: the inputs of stage ``k + 1``. Iteration-dependent networks:
        ``x_{k+1} = module_k(x_k)`` from the cache; shared network: recomputed from ``x0``
        through modules ``0..k`` with the current weights (no stale inputs)."""
        if self.model.config.shared:
            self._build_caches(k + 1)
            return
        net = self.model
        net.eval()
        M = net.num_subsets
        m_next = (k + 1) % M
        for split, ds in self._splits().items():
            sc = self._caches[split]
            n = len(ds)
            x_new = self._new_cache(split, n, f"x{k + 1:03d}")
            s_new = sc.sens if m_next == k % M else self._new_cache(split, n, f"sens{k + 1:03d}")
            order = _dist.shard(range(n))  # this rank's shard; gathered below
            with tqdm(total=len(_batches(order, self.config.batch_size)), desc=f"inputs of module {k + 2} ({split})",
                      disable=not self.progress, leave=False, dynamic_ncols=True) as bar:
                for idx, b in self._loader(ds, order, targets=None):
                    b = self._to_dev(b)
                    ctx = self._context(b, idx, k, split)  # module k's context, from the cache
                    with self._autocast():
                        x = net.step(k, sc.x.get(idx).to(self.dev), ctx)
                    x_new.set(idx, x.float())
                    if s_new is not sc.sens:  # only the next subset's sensitivity
                        s_new.set(idx, net.subset_sensitivity(m_next, b["y"], b["multiplicative"], b["additive"]))
                    bar.update()
            _dist.allgather_shards(n, x_new, s_new if s_new is not sc.sens else None)
            x_new.flush()
            sc.x.delete()
            sc.x = x_new
            if s_new is not sc.sens:
                s_new.flush()
                sc.sens.delete()
                sc.sens = s_new
        self._cache_stage = k + 1

    def _drop_caches(self) -> None:
        for c in self._caches.values():
            c.delete()
        self._caches = {}
        self._cache_stage = None

    def _release(self) -> None:
        self._drop_caches()
        d = self.out_dir / "cache"
        if not self._rank0:
            d = d / f"rank-{_dist.rank()}"
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)

    def cached_inputs(self, split: str = "train") -> tuple[int | None, torch.Tensor | None]:
        """``(k, x_k)``: the stage whose inputs are cached and the cached images ``(N, 1, Z, Y, X)``
        (``(None, None)`` when nothing is cached). Caches are dropped at the end of
        :meth:`fit`; use a ``"stage"`` callback to look at them during training."""
        if split not in self._caches:
            return None, None
        return self._cache_stage, self._caches[split].x.all()

    # -- stage pieces ----------------------------------------------------------------------------
    def _freeze_for(self, k: int) -> list:
        net = self.model
        for p in net.parameters():
            p.requires_grad_(False)
        cnn = list(net.regularisers[net.net_index(k)].parameters())
        for p in cnn:
            p.requires_grad_(True)
        net.rho.requires_grad_(True)
        return cnn

    def _module_state(self, k: int) -> dict:
        net = self.model
        i = net.net_index(k)
        sd = {f"reg.{n}": v.detach().clone() for n, v in net.regularisers[i].state_dict().items()}
        sd["rho"] = net.rho.detach()[i].clone()
        return sd

    def _load_module_state(self, k: int, sd: dict) -> None:
        net = self.model
        i = net.net_index(k)
        net.regularisers[i].load_state_dict({n[4:]: v for n, v in sd.items() if n.startswith("reg.")})
        with torch.no_grad():
            net.rho[i] = sd["rho"].to(net.rho.device)

    @torch.no_grad()
    def _init_stage(self, k: int, how: str) -> str:
        """Start of module ``k >= 1`` (``train.stage_init``): ``"previous"`` copies module
        ``k-1``'s trained CNN and strength; ``"best"`` keeps whichever of that and the fresh
        initialisation has the lower loss on the stage's training inputs. Consecutive
        modules solve nearly the same problem (target ``k`` is one EM sub-iterate further
        than target ``k-1``), so the previous module is usually the better start for the
        few optimiser steps a stage gets; not always (module 0 sees the uniform ``x0`` and
        can be a poor start for module 1), hence ``"best"``. Returns ``"previous"`` or
        ``"fresh"``."""
        prev = self._module_state(k - 1)
        if how == "previous":
            self._load_module_state(k, prev)
            return "previous"
        fresh = self._module_state(k)
        self._load_module_state(k, prev)
        loss_prev = self._start_loss(k)
        self._load_module_state(k, fresh)
        loss_fresh = self._start_loss(k)
        if loss_prev < loss_fresh:
            self._load_module_state(k, prev)
            return "previous"
        return "fresh"

    @torch.no_grad()
    def _start_loss(self, k: int) -> float:
        """Mean stage-``k`` loss over the first ``_START_LOSS_BATCHES`` batches of training
        inputs (a cheap, deterministic comparison of two starts) with the module in training mode
        (BatchNorm batch statistics, as its first optimiser steps see it); BatchNorm running
        statistics are restored afterwards, so nothing changes."""
        net = self.model
        reg = net.regularisers[net.net_index(k)]
        saved = {n: v.clone() for n, v in reg.state_dict().items()}
        self._train_mode(k)
        first = range(min(len(self.train_dataset), _START_LOSS_BATCHES * self.config.batch_size * _dist.world_size()))
        tl, n = 0.0, 0
        for out, b in self._stage_outputs(k, "train", first):
            tl += float(relative_mse(out, self._step_targets(b))) * len(out)
            n += len(out)
        if _dist.is_distributed():
            tl, n = _dist.all_reduce_sums([tl, n]).tolist()
        reg.load_state_dict(saved)
        net.eval()
        return tl / max(n, 1)

    def _train_mode(self, k: int) -> None:
        """Module ``k``'s CNN in training mode, every other module in eval mode (the whole
        network is put in eval mode only when needed: that walks every submodule)."""
        net = self.model
        i = net.net_index(k)
        if net.training or any(r.training for j, r in enumerate(net.regularisers) if j != i):
            net.eval()
        net.regularisers[i].train()

    @torch.no_grad()
    def _stage_outputs(self, k: int, split: str, indices):
        """``(module k's output, batch)`` for this rank's share of ``indices`` of a split,
        from the cached inputs (no gradient; the caller sets the modules' modes)."""
        ds = self.train_dataset if split == "train" else self.val_dataset
        cache = self._caches[split]
        for idx, b in self._loader(ds, _dist.shard(indices), targets=self._stage_targets(k)):
            b = self._to_dev(b)
            ctx = self._context(b, idx, k, split)
            with self._autocast():
                out = self.model.step(k, cache.x.get(idx).to(self.dev), ctx).float()
            yield out, b

    @torch.no_grad()
    def _validate_stage(self, k: int) -> dict:
        self.model.eval()
        tl, tn, tf, n = 0.0, 0.0, 0.0, 0
        for out, b in self._stage_outputs(k, "validation", range(len(self.val_dataset))):
            t = self._step_targets(b)
            B = len(out)
            tl += float(relative_mse(out, t)) * B
            tn += float(_nrmse(out, t).sum())
            tf += float(_nrmse(out, b["target_final"]).sum())
            n += B
        if _dist.is_distributed():
            tl, tn, tf, n = _dist.all_reduce_sums([tl, tn, tf, n]).tolist()
        v = {"loss": tl / n, "nrmse": tn / n, "nrmse_final": tf / n}
        if not math.isfinite(v["loss"]):
            raise TrainingDiverged(f"stage {k + 1}: validation loss is {v['loss']}; the last good checkpoint is kept")
        return v

    # -- the stages ------------------------------------------------------------------------------
    def _run(self, ck: dict | None) -> None:
        k0 = 0 if ck is None else int(ck["counters"]["stage"])
        for k in range(k0, self.K):
            self._stage(k, ck if (ck is not None and k == k0) else None)

    def _stage(self, k: int, ck: dict | None) -> None:
        c, net, K = self.config, self.model, self.K
        shared = net.config.shared
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        st = _EarlyStop.new()
        e0 = 0
        cache_time = 0.0
        # inputs of this stage
        if self._cache_stage != k:
            t = time.perf_counter()
            start_sd = ck.get("stage_start_state") if ck is not None else None
            if shared and start_sd is not None:  # the weights this stage's cache was built with
                now = _clone_state(net.state_dict())
                net.load_state_dict(start_sd)
                self._build_caches(k)
                net.load_state_dict(now)
            else:
                self._build_caches(k)
            cache_time += time.perf_counter() - t
        init = "fresh"
        if c.stage_init != "fresh" and not shared and k >= 1 and (ck is None or int(ck["counters"]["epoch"]) == 0):
            init = self._init_stage(k, c.stage_init)
        elif ck is not None:
            init = ck.get("stage_init", "fresh")
        stage_start = _clone_state(net.state_dict()) if shared else None
        if ck is not None and ck.get("stage_start_state") is not None:
            stage_start = ck["stage_start_state"]
        net.zero_grad(set_to_none=True)
        cnn = self._freeze_for(k)
        opt, sched = self._optimizer(cnn, net.rho)
        # one step's loss; several processes: DDP over the stage's trainable parameters only
        step = _dist.ddp_step(net, lambda x, ctx, t: relative_mse(net.step(k, x, ctx).float(), t))
        if ck is not None:
            e0 = int(ck["counters"]["epoch"])
            if ck.get("optimizer_state") is not None:
                opt.load_state_dict(ck["optimizer_state"])
                sched.load_state_dict(ck["scheduler_state"])
            if ck.get("stage_state") is not None:
                st = ck["stage_state"]
        i_rho = net.net_index(k)
        keep = torch.ones_like(net.rho, dtype=torch.bool)
        keep[i_rho] = False
        N = len(self.train_dataset)
        train_cache = self._caches["train"]
        E = c.epochs_per_module
        for epoch in range(e0, E):
            if st["stopped"]:
                break
            t_ep = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            self._train_mode(k)
            total, n = 0.0, 0
            order = epoch_permutation(c.seed, k, epoch, N)
            shares = _dist.shard_batches(order, c.batch_size)  # this rank's part of each global batch
            nb = len(shares)
            with tqdm(total=nb, desc=f"module {k + 1}/{K} epoch {epoch + 1}/{E}", disable=not self.progress,
                      leave=False, dynamic_ncols=True) as bar:
                for sh, (idx, b) in zip(shares, self._loader(self.train_dataset, order, targets=self._stage_targets(k),
                                                             batches=[s.indices for s in shares])):
                    b = self._to_dev(b)
                    ctx = self._context(b, idx, k, "train")
                    x = train_cache.x.get(idx).to(self.dev)  # no graph: nothing flows into earlier modules
                    frozen_rho = net.rho.detach().clone()
                    with self._autocast():
                        loss = step(x, ctx, self._step_targets(b))
                    loss, mean_loss = _dist.batch_loss(loss, sh)  # one process: both are the loss
                    where = f"module {k + 1}, epoch {epoch + 1}, step {self.global_step + 1}"
                    self._check_finite_loss(mean_loss, where)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if net.rho.grad is not None:
                        net.rho.grad[keep] = 0.0
                    if c.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(cnn + [net.rho], c.grad_clip)
                    opt.step()
                    with torch.no_grad():
                        net.rho[keep] = frozen_rho[keep]  # other modules' strengths stay exactly as they were
                    self._check_finite_gamma(where)
                    lv = float(mean_loss.detach())
                    total += lv * sh.total
                    n += sh.total
                    self._log_step(k, epoch, lv, lr, float(self.gammas()[i_rho]), bar)
            sched.step()
            _dist.sync_buffers(net)  # BatchNorm running statistics: rank 0's on every rank
            st["train_loss"], st["epochs_run"] = total / max(n, 1), epoch + 1
            rec = {"mode": self.mode, "stage": k, "epoch": epoch, "step": self.global_step,
                   "train_loss": st["train_loss"], "lr": lr, "best": None}
            if self.val_dataset is not None and ((epoch + 1) % c.validation_every == 0 or epoch + 1 == E):
                v = self._validate_stage(k)
                rec.update(val_loss=v["loss"], val_nrmse=v["nrmse"], val_nrmse_final=v["nrmse_final"])
                st["val_loss"], st["val_nrmse"] = v["loss"], v["nrmse"]
                rec["best"] = _EarlyStop.update(st, v["loss"], epoch, lambda: self._module_state(k),
                                                c.early_stopping_patience)
            rec["epoch_time_s"] = time.perf_counter() - t_ep
            st["stage_time_s"] = float(st.get("stage_time_s", 0.0)) + rec["epoch_time_s"]
            self._log_epoch(rec)
            # the stage's last epoch needs none: the end-of-stage checkpoint follows
            if (epoch + 1) % c.checkpoint_every == 0 and epoch + 1 < E and not st["stopped"]:
                self._save_checkpoint(self._checkpoint_payload(
                    {"stage": k, "epoch": epoch + 1}, opt, sched, st,
                    extra={"stages_done": list(range(k)), "stage_start_state": stage_start, "stage_init": init}))
        # end of the stage
        if c.early_stopping_patience is not None and st["best_state"] is not None:
            self._load_module_state(k, st["best_state"])
        net.zero_grad(set_to_none=True)
        for p in net.parameters():
            p.requires_grad_(False)
        if k + 1 < K:
            t = time.perf_counter()
            self._propagate(k)
            cache_time += time.perf_counter() - t
        else:
            self._drop_caches()
        for p in net.parameters():
            p.requires_grad_(True)
        restored = c.early_stopping_patience is not None and st["best_val"] is not None
        rec = {"mode": self.mode, "stage": k, "epochs_run": st["epochs_run"], "best_epoch": st["best_epoch"],
               "step": self.global_step, "train_loss": st["train_loss"],
               "val_loss": st["best_val"] if restored else st["val_loss"],
               "val_nrmse": st.get("best_val_nrmse") if restored else st["val_nrmse"],
               "gamma": self.gammas()[net.net_index(k)], "init": init,
               "stage_time_s": float(st.get("stage_time_s", 0.0)) + cache_time, "cache_time_s": cache_time,
               "cache": self._where(), "time_s": self._elapsed(), "peak_memory_mb": self._peak_mb()}
        self._log.write("stage", rec, tb_step=self.global_step)
        self.history.append({"kind": "stage", **rec})
        self._outer.update()
        self._emit("stage", rec)
        self._save_checkpoint(self._checkpoint_payload({"stage": k + 1, "epoch": 0}, stage_state=None,
                                                       extra={"stages_done": list(range(k + 1)),
                                                              "stage_start_state": None}))


#: batches of training inputs on which ``stage_init: best`` compares the two starts of a stage
_START_LOSS_BATCHES = 1


def make_trainer(mode: str, *args, **kwargs) -> _Trainer:
    """``EndToEndTrainer`` or ``SequentialTrainer`` by name."""
    if mode == "end-to-end":
        return EndToEndTrainer(*args, **kwargs)
    if mode == "sequential":
        return SequentialTrainer(*args, **kwargs)
    raise ConfigError(f"unknown training mode {mode!r}; use 'end-to-end' or 'sequential'")


# ----------------------------------------------------------------------------------------
# loading a trained model
# ----------------------------------------------------------------------------------------
def build_projector(spec: dict, device="cpu"):
    """Rebuild the projector from :func:`projector_spec` (falls back to the torch backend
    when the saved backend is not available here)."""
    from fbsemlib.physics.geometry import ImageGrid, sinogram_geometry_from_dict
    from fbsemlib.physics.projector import Projector, parallelproj_available

    backend = spec.get("backend", "torch")
    if backend == "parallelproj" and not parallelproj_available():
        warnings.warn("the model was trained with the parallelproj projector, which is not installed here; "
                      "using the torch projector (same geometry conventions)", stacklevel=2)
        backend = "torch"
    psf = spec.get("psf_fwhm_mm")
    return Projector(sinogram_geometry_from_dict(spec["sinogram"]), ImageGrid.from_dict(spec["grid"]),
                     backend=backend, device=device, psf_fwhm_mm=None if psf is None else tuple(psf))


#: how many projectors :func:`shared_projector` keeps (least recently used dropped first)
PROJECTOR_CACHE_SIZE = 4
_projectors: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_projectors_lock = threading.Lock()


def shared_projector(spec: dict, device="cpu"):
    """:func:`build_projector`, one projector per geometry: models of the same geometry
    (:func:`projector_spec`) on the same device get the SAME projector object, so its
    ordered-subset projectors and their system matrices (built lazily, one per dtype) are
    built once, not for every loaded model. Keeps the :data:`PROJECTOR_CACHE_SIZE` most
    recently used projectors."""
    dev = torch.device(device)
    key = json.dumps({"spec": spec, "device": str(dev)}, sort_keys=True, default=str)
    with _projectors_lock:
        P = _projectors.get(key)
        if P is not None:
            _projectors.move_to_end(key)
            return P
    P = build_projector(spec, dev)
    with _projectors_lock:
        P = _projectors.setdefault(key, P)  # another thread may have built it meanwhile
        _projectors.move_to_end(key)
        while len(_projectors) > PROJECTOR_CACHE_SIZE:
            _projectors.popitem(last=False)
    return P


def load_trained(out_dir: str | os.PathLike, device=None, allow_partial: bool = False, projector=None):
    """Load a trained model from a training folder.

    Returns ``(net, configs)``: the :class:`~fbsemlib.models.fbsem.FBSEMNet` (eval mode, on
    ``device``) and a dict with ``model`` (:class:`ModelConfig`), ``train``
    (:class:`TrainConfig`), ``mode``, ``data`` (recipe / geometry dicts), ``projector``,
    ``structure``, ``metrics`` and ``versions``. Reads ``model.pt``; with
    ``allow_partial`` an unfinished run's ``checkpoint.pt`` is used when there is no
    ``model.pt``. The projector is :func:`shared_projector` (models of one geometry share
    it); ``projector`` replaces it (it must have the same geometry)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"model folder {str(out)!r} does not exist")
    dev = _resolve_device(device)
    mpath, cpath = out / MODEL_NAME, out / CHECKPOINT_NAME
    if mpath.exists():
        data = load_checkpoint(mpath)
        if data.get("format") != MODEL_FORMAT:
            raise UserError(f"{str(mpath)!r} is not an fbsemlib model file (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{str(mpath)!r} has model format version {data.get('format_version')!r} (written by "
                            f"fbsemlib {(data.get('versions') or {}).get('fbsemlib', '?')}); this fbsemlib reads "
                            f"version {FORMAT_VERSION}")
        sd, cfgs, metrics = data["state_dict"], data["configs"], data.get("metrics")
    elif allow_partial and cpath.exists():
        data = load_checkpoint(cpath)
        sd, cfgs, metrics = data["model_state"], data["configs"], None
    else:
        hint = " (training has not finished: resume it with `fbsem train ... --resume`)" if cpath.exists() else ""
        raise UserError(f"no trained model in {str(out)!r}: {MODEL_NAME} is missing{hint}")
    model_cfg = from_dict(ModelConfig, cfgs["model"], "model")
    train_cfg = from_dict(TrainConfig, cfgs["train"], "train")
    P = projector if projector is not None else shared_projector(cfgs["projector"], dev)
    if projector is not None:
        spec = projector_spec(projector)
        diffs = [d for d in diff(cfgs["projector"], spec, _CHECKPOINT_VS_NOW, "projector") if not d.startswith("projector.backend")]
        if diffs:
            raise UserError("the given projector differs from the model's: " + "; ".join(diffs))
    s = cfgs["structure"]
    net = FBSEMNet(P, int(s["num_iterations"]), int(s["num_subsets"]), model_cfg)
    net.load_state_dict(sd)
    net.to(P.device)
    net.eval()
    configs = {"model": model_cfg, "train": train_cfg, "mode": cfgs.get("mode"), "data": cfgs.get("data", {}),
               "projector": cfgs["projector"], "structure": s, "dataset_sizes": cfgs.get("dataset_sizes"),
               "metrics": metrics, "versions": data.get("versions")}
    return net, configs


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def _open_datasets(data_dir: Path):
    from fbsemlib.data import DatasetError, PETDataset, open_dataset

    try:
        info = open_dataset(data_dir)
    except DatasetError as e:
        raise UserError(str(e)) from None
    train = PETDataset(data_dir, "train", checksums=False)
    val = PETDataset(data_dir, "validation", checksums=False) if info.subjects("validation") else None
    return train, val


def _dataset_for(sections: dict, config_path: str, progress: bool) -> Path:
    """Simulate the experiment's ``data:`` recipe, or reuse the dataset cached under
    ``data/generated/<name>-<recipe hash>`` (:func:`fbsemlib.data.simulate.cached_dataset`)."""
    if "data" not in sections:
        raise ConfigError(f"{config_path!r} has no 'data' section: give --data DIR or add a data recipe")
    try:
        from fbsemlib.data import DataConfig, cached_dataset
    except ImportError as e:  # pragma: no cover
        raise UserError(f"cannot simulate the data (fbsemlib.data.simulate unavailable: {e}); give --data DIR") from None
    recipe = from_dict(DataConfig, sections["data"], "data")
    info = cached_dataset(recipe, progress=progress, log=lambda m: print(m, file=sys.stderr))
    print(f"dataset: {info.path}", file=sys.stderr)
    return Path(info.path)


def cmd_train(args) -> int:
    """``fbsem train --config FILE --mode {end-to-end,sequential} [--data DIR] --out DIR
    [--seed N] [--device D] [--resume] [--no-progress]``; under ``torchrun`` one process per
    rank (:mod:`fbsemlib.training.distributed`)."""
    if _dist.launched() and not _dist.in_group():
        args.device = _dist.device_for(args.device)  # cuda -> cuda:LOCAL_RANK
        return _dist.run(cmd_train, args, device=args.device)
    sections = load_experiment(args.config)
    model_cfg, n_it, n_sub = parse_model_section(sections.get("model"))
    train_cfg = from_dict(TrainConfig, sections.get("train", {}), "train")
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        train_cfg = dataclasses.replace(train_cfg, seed=int(args.seed))
    mode = args.mode or train_cfg.mode
    train_cfg = dataclasses.replace(train_cfg, mode=mode)
    dev = _resolve_device(args.device)
    progress = not args.no_progress
    if args.data is not None:
        data_dir = Path(args.data)
        if not data_dir.exists():
            raise UserError(f"data folder {str(data_dir)!r} does not exist")
    else:
        data_dir = _dist.rank0_call(lambda: _dataset_for(sections, args.config, progress), long=True)
    train_ds, val_ds = _open_datasets(data_dir)
    its = n_it if n_it is not None else train_ds.num_iterations
    subs = n_sub if n_sub is not None else train_ds.num_subsets
    if train_cfg.targets == "iteration-dependent":
        if subs != train_ds.num_subsets:
            raise ConfigError(f"model.num_subsets = {subs} but the data's targets use {train_ds.num_subsets} subsets")
        if its > train_ds.num_iterations:
            raise ConfigError(f"model.num_iterations = {its} but the data has targets for only "
                              f"{train_ds.num_iterations} iterations")
    projector = train_ds.make_projector(dev)
    torch.manual_seed(train_cfg.seed)
    net = FBSEMNet(projector, int(its), int(subs), model_cfg)
    out = Path(args.out)
    if args.resume and not (out / CHECKPOINT_NAME).exists() and _dist.is_rank0():
        print(f"no checkpoint in {str(out)!r}: starting a new run", file=sys.stderr)
    trainer = make_trainer(mode, model=net, train_dataset=train_ds, val_dataset=val_ds, config=train_cfg,
                           out_dir=out, device=dev, progress=progress, callbacks=_dist.fault_callbacks())
    try:
        metrics = trainer.fit(resume=bool(args.resume))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not _dist.is_rank0():
        return 0
    ev = metrics.get("val_eval") or metrics.get("train_eval") or {}
    print(f"{mode} training of K = {metrics['num_modules']} modules done in {metrics['train_time_s']:.1f} s; "
          f"final NRMSE vs reference {ev.get('nrmse_reference', float('nan')):.4f} "
          f"({'validation' if metrics.get('val_eval') else 'training'} set); results in {str(out)!r}")
    return 0
