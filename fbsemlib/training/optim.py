"""Optimiser, learning-rate schedule and early stopping of a run (end-to-end) or a stage
(sequential; each stage has a fresh Adam and its own schedule).

Adam; the strengths ``rho`` (``g = softplus(rho)``) are in their own parameter group with
learning rate ``lr * rho_lr_factor`` and no weight decay (a choice: the paper does not
state it). Early stopping (``early_stopping_patience``, counted in validations) restores
the best weights (lowest validation loss) of the run / stage.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fbsemlib.training.config import TrainConfig

__all__ = ["LRFactor", "make_optimizer", "EarlyStop", "clone_state"]


class LRFactor:
    """Multiplicative LR factor of epoch ``e`` (a picklable ``LambdaLR`` function):
    ``constant`` 1; ``cosine`` from 1 to ``min_factor`` over ``total`` epochs; ``step``
    ``decay ** (e // step_epochs)``."""

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


def make_optimizer(c: TrainConfig, cnn_params: list, rho: torch.nn.Parameter, total_epochs: int):
    """``(Adam, LambdaLR)`` for the CNN parameters and the strengths ``rho`` over
    ``total_epochs`` epochs."""
    groups = [{"params": cnn_params, "weight_decay": c.weight_decay},
              {"params": [rho], "weight_decay": 0.0, "lr": c.lr * c.rho_lr_factor}]
    opt = torch.optim.Adam(groups, lr=c.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LRFactor(c.lr_schedule, total_epochs, c.lr_step_epochs, c.lr_decay, c.lr_min_factor))
    return opt, sched


def clone_state(sd: dict) -> dict:
    """A detached copy of a state dict."""
    return {k: v.detach().clone() for k, v in sd.items()}


class EarlyStop:
    """Best validation loss, best weights and patience (a plain dict in checkpoints)."""

    @staticmethod
    def new() -> dict:
        return {"best_val": None, "best_epoch": None, "best_state": None, "bad": 0, "stopped": False,
                "train_loss": None, "val_loss": None, "val_nrmse": None, "epochs_run": 0, "stage_time_s": 0.0}

    @staticmethod
    def update(st: dict, val_loss: float, epoch: int, state_fn: Callable[[], dict], patience: int | None,
               keep_best: bool = False) -> bool:
        """Record a validation (``val_loss``: the number validations are ranked by, lower
        is better); return True when it is the best so far. The best weights are kept
        with early stopping (``patience``) or ``keep_best`` (checkpoint selection)."""
        if st["best_val"] is None or val_loss < st["best_val"]:
            st["best_val"], st["best_epoch"], st["bad"] = val_loss, epoch, 0
            st["best_val_nrmse"] = st.get("val_nrmse")
            if patience is not None or keep_best:
                st["best_state"] = state_fn()
            return True
        st["bad"] += 1
        if patience is not None and st["bad"] >= patience:
            st["stopped"] = True
        return False
