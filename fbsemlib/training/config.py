"""The ``train:`` and ``model:`` sections of an experiment: :class:`TrainConfig`,
:func:`parse_model_section`, and the errors of a training run.

Two trainers share this configuration (``mode``):

* ``end-to-end`` (:class:`~fbsemlib.training.end_to_end.EndToEndTrainer`): backpropagation
  through all ``K`` unrolled modules, loss ``sum_k w_k relmse(x_k, t_k)`` (the paper's
  iteration-dependent targets) or ``relmse(x_K, t_final)``.
* ``sequential`` (:class:`~fbsemlib.training.sequential.SequentialTrainer`; Corda-D'incan,
  Schnabel & Reader 2022): stage ``k`` trains module ``k`` alone against target ``k`` on
  the cached outputs of the frozen modules ``0..k-1``; memory of one module whatever ``K``.

What is the paper and what is a choice of this implementation (each is a field below):
the paper trains against iteration-dependent targets; ``targets: final`` (every module
against the high-count reference), ``loss_weights`` other than uniform, ``stage_init``
(warm starts), ``grad_checkpointing``, the separate learning rate of the strengths
``rho`` (``g = softplus(rho)``, never weight-decayed), the LR schedules and early stopping
(restoring the best validated weights of the run / stage) and ``checkpoint_selection``
(``validation``: keep the validated weights, of the run in end-to-end mode or of the last
stage in sequential mode, whose final image has the lowest NRMSE to the true activity
inside the brain, the criterion by which the baselines' strengths are chosen) are choices. Epoch-based
quantities count epochs of the run in end-to-end mode and epochs of the stage in
sequential mode. The modules' pages say how each is implemented.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fbsemlib.config import ConfigError, check_limit, from_dict, to_dict, unknown_key_error
from fbsemlib.errors import UserError
from fbsemlib.models.fbsem import ModelConfig
from fbsemlib.provenance import is_int, is_number

__all__ = ["MODES", "OPERATIONAL_FIELDS", "TrainConfig", "TrainingError", "TrainingDiverged", "parse_model_section"]

MODES = ("end-to-end", "sequential")

#: ``train:`` fields that do not change the trained weights (how often to checkpoint and
#: log, where to cache, loader workers): a run may resume with other values, and the
#: experiment cache (:func:`fbsembook.experiments.train`) leaves them out of its key.
OPERATIONAL_FIELDS = ("tensorboard", "num_workers", "cache", "cache_memory_mb", "checkpoint_every", "log_every")


class TrainingError(UserError):
    """A training run cannot start or resume (incompatible checkpoint, dataset, ...)."""


class TrainingDiverged(RuntimeError):
    """NaN / Inf in the loss or in gamma; the last good checkpoint is kept."""


def _err(name: str, msg: str) -> ConfigError:
    return ConfigError(f"train.{name} {msg}")


def _positive_number(v) -> bool:
    return is_number(v) and math.isfinite(v) and v > 0


@dataclass
class TrainConfig:
    """The ``train:`` section of an experiment file (see the module docstring)."""

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
    bn_recalibration: bool = True  # end-to-end only: re-estimate BatchNorm statistics module by module after training
    checkpoint_selection: str = "last"  # "last" | "validation": the validated weights with the lowest NRMSE of the final image to the phantom
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
        choices = {"mode": MODES, "targets": ("iteration-dependent", "final"),
                   "lr_schedule": ("constant", "cosine", "step"), "cache": ("auto", "memory", "disk"),
                   "stage_init": ("fresh", "previous", "best"), "checkpoint_selection": ("last", "validation")}
        for name in ("mode", "targets"):
            self._check_choice(name, choices[name])
        lw = self.loss_weights
        if isinstance(lw, str):
            if lw not in ("uniform", "linear", "last"):
                raise _err("loss_weights", f"must be 'uniform', 'linear', 'last' or a list of numbers, got {lw!r}")
        elif isinstance(lw, (list, tuple)):
            if not lw or not all(is_number(w) and math.isfinite(w) and w >= 0 for w in lw) or sum(lw) <= 0:
                raise _err("loss_weights", f"must be non-negative finite numbers with a positive sum, got {list(lw)!r}")
            self.loss_weights = [float(w) for w in lw]
        else:
            raise _err("loss_weights", f"must be a string or a list of numbers, got {lw!r}")
        for name in ("epochs", "epochs_per_module", "batch_size", "lr_step_epochs", "validation_every",
                     "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise _err(name, f"must be a positive integer, got {v!r}")
        for name in ("seed", "num_workers"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise _err(name, f"must be a non-negative integer, got {v!r}")
        for name, limit in (("seed", "seed"), ("num_workers", "num_workers"), ("batch_size", "batch_size"),
                            ("epochs", "epochs"), ("epochs_per_module", "epochs")):
            check_limit(f"train.{name}", getattr(self, name), limit)
        if self.early_stopping_patience is not None and (not is_int(self.early_stopping_patience)
                                                          or self.early_stopping_patience < 1):
            raise _err("early_stopping_patience", f"must be a positive integer or null, got {self.early_stopping_patience!r}")
        if not _positive_number(self.lr):
            raise _err("lr", f"must be a positive number, got {self.lr!r}")
        if not is_number(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise _err("weight_decay", f"must be a non-negative number, got {self.weight_decay!r}")
        if not _positive_number(self.rho_lr_factor):
            raise _err("rho_lr_factor", f"must be a positive number, got {self.rho_lr_factor!r}")
        self._check_choice("lr_schedule", choices["lr_schedule"])
        if not is_number(self.lr_decay) or not (0 < self.lr_decay <= 1):
            raise _err("lr_decay", f"must be in (0, 1], got {self.lr_decay!r}")
        if not is_number(self.lr_min_factor) or not (0 <= self.lr_min_factor <= 1):
            raise _err("lr_min_factor", f"must be in [0, 1], got {self.lr_min_factor!r}")
        if self.grad_clip is not None and not _positive_number(self.grad_clip):
            raise _err("grad_clip", f"must be a positive number or null, got {self.grad_clip!r}")
        self._check_choice("cache", choices["cache"])
        if not is_number(self.cache_memory_mb) or self.cache_memory_mb < 0:
            raise _err("cache_memory_mb", f"must be a non-negative number, got {self.cache_memory_mb!r}")
        self._check_choice("stage_init", choices["stage_init"])
        self._check_choice("checkpoint_selection", choices["checkpoint_selection"])
        for name in ("grad_checkpointing", "bn_recalibration", "amp", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, f"must be true or false, got {getattr(self, name)!r}")

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        v = getattr(self, name)
        if v not in allowed:
            words = ", ".join(f"'{a}'" for a in allowed[:-1]) + f" or '{allowed[-1]}'"
            raise _err(name, f"must be {words}, got {v!r}")

    def to_dict(self) -> dict:
        return to_dict(self)


#: keys of the ``model:`` section besides the :class:`ModelConfig` fields
_MODEL_SCHEDULE_KEYS = ("num_iterations", "num_subsets")


def parse_model_section(d: dict | None) -> tuple[ModelConfig, int | None, int | None]:
    """The ``model:`` section: the fields of :class:`~fbsemlib.models.fbsem.ModelConfig`, plus
    optional ``num_iterations`` / ``num_subsets`` (default: the dataset's schedule; with
    iteration-dependent targets ``num_subsets`` must equal the data's and
    ``num_iterations`` may be at most the data's, which then trains on the first targets).
    Returns ``(config, num_iterations, num_subsets)``."""
    d = dict(d or {})
    schedule = {}
    for k in _MODEL_SCHEDULE_KEYS:
        if k in d:
            v = d.pop(k)
            if v is not None and (not is_int(v) or v < 1):
                raise ConfigError(f"model.{k} must be a positive integer or null, got {v!r}")
            if v is not None:
                check_limit(f"model.{k}", v, "num_modules")
            schedule[k] = v
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise unknown_key_error(unknown[0], "model", fields + list(_MODEL_SCHEDULE_KEYS))
    return from_dict(ModelConfig, d, "model"), schedule.get("num_iterations"), schedule.get("num_subsets")
