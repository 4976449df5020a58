"""End-to-end training: backpropagation through all ``K`` unrolled modules.

The loss is ``sum_k w_k relmse(x_k, t_k)`` with the iteration-dependent targets ``t_k``
(weights ``train.loss_weights``; the paper's method) or ``relmse(x_K, t_final)`` with the
single high-count reference (``targets: final``). Every module is initialised
independently. ``grad_checkpointing: true`` (a choice; the paper did not use it)
recomputes each module in the backward pass: memory of about one module's activations
plus the ``K`` module inputs, the middle ground between end-to-end and sequential
training. The gradients are the same; with BatchNorm the recomputation updates the
running statistics a second time. After training, the BatchNorm statistics are
recalibrated module by module on the training set (``bn_recalibration``, a choice;
:mod:`fbsemlib.training.batchnorm` says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from fbsemlib.training import distributed as _dist
from fbsemlib.training.base import Trainer
from fbsemlib.training.batchnorm import recalibrate_batch_norm
from fbsemlib.training.loading import epoch_permutation
from fbsemlib.training.optim import EarlyStop, clone_state

__all__ = ["EndToEndTrainer"]


@dataclass
class EndToEndTrainer(Trainer):
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
        st = EarlyStop.new()
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
            with tqdm(total=len(shares), desc=f"epoch {epoch + 1}/{c.epochs}", disable=not self.progress, leave=False,
                      dynamic_ncols=True) as bar:
                for sh, (idx, b) in zip(shares, self._device_batches(self.train_dataset, order,
                                                                     batch_indices=[s.indices for s in shares])):
                    ctx = self._prepare(b)
                    with self._autocast():
                        loss = step(ctx, b)
                    loss, mean_loss = _dist.batch_loss(loss, sh)  # one process: both are the loss
                    lv = self._update(opt, loss, mean_loss, f"epoch {epoch + 1}, step {self.global_step + 1}",
                                      net.parameters())
                    total += lv * sh.total
                    n += sh.total
                    self._log_step(0, epoch, lv, lr, float(np.mean(self.gammas())), bar)
            sched.step()
            _dist.sync_buffers(net)  # BatchNorm running statistics: rank 0's on every rank
            st["train_loss"], st["epochs_run"] = total / max(n, 1), epoch + 1
            rec = {"mode": self.mode, "stage": 0, "epoch": epoch, "step": self.global_step,
                   "train_loss": st["train_loss"], "lr": lr, "best": None}
            if self.val_dataset is not None and ((epoch + 1) % c.validation_every == 0 or epoch + 1 == c.epochs):
                v = self._validated(self.evaluate(self.val_dataset), "")
                rec.update(val_loss=v["loss"], val_nrmse=v["nrmse_last_target"], val_nrmse_final=v["nrmse_reference"],
                           val_nrmse_phantom=v["nrmse_phantom"])
                st["val_loss"], st["val_nrmse"] = v["loss"], v["nrmse_last_target"]
                rec["best"] = EarlyStop.update(st, self._selection_value(v), epoch,
                                               lambda: clone_state(net.state_dict()), c.early_stopping_patience,
                                               keep_best=c.checkpoint_selection == "validation")
            rec["epoch_time_s"] = time.perf_counter() - t_ep
            self._log_epoch(rec)
            if (epoch + 1) % c.checkpoint_every == 0 or epoch + 1 == c.epochs or st["stopped"]:
                self._save_checkpoint(self._checkpoint_payload({"stage": 0, "epoch": epoch + 1}, opt, sched, st))
        if st["best_state"] is not None and (c.early_stopping_patience is not None
                                             or c.checkpoint_selection == "validation"):
            net.load_state_dict(st["best_state"])
        if c.bn_recalibration and not st.get("recalibrated"):
            order = list(range(N))
            n_mod = recalibrate_batch_norm(net, [b for _, b in self._device_batches(self.train_dataset, order,
                                                                                    targets=None)])
            st["recalibrated"] = True
            self.history.append({"kind": "batch_norm_recalibration", "modules": n_mod})
            self._save_checkpoint(self._checkpoint_payload({"stage": 0, "epoch": c.epochs}, opt, sched, st))
