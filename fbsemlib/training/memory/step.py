"""The one training step whose memory is measured, in the three modes (:data:`MODES`).

``"end-to-end"``
    forward through modules ``0..K-1`` with autograd, the iteration-dependent loss
    ``sum_k w_k L(x_k, t_k)`` on all K outputs (:func:`fbsemlib.models.losses.unrolled_loss`),
    backward. Everything every module saved for backward is held at the end of the
    forward pass: memory grows linearly with K.
``"checkpointed"``
    the same with per-module gradient checkpointing (``net.run(..., checkpoint=True)``):
    only module inputs and the loss terms are kept; each module is recomputed during
    the backward pass. Memory still grows with K, with a much smaller slope.
``"sequential"``
    module ``k = K-1`` trained alone (Corda-D'incan et al. 2022): its input ``x_k`` is
    the cached, detached output of the frozen modules ``0..k-1`` (computed here without
    gradients, then held on the host like a training cache), the loss is
    ``L(x_{k+1}, t_k)`` against its own target, backward. Its memory does not depend
    on K.

One step is forward + backward: no optimiser state.
"""

from __future__ import annotations

import contextlib

import torch

from fbsemlib.models.fbsem import FBSEMNet
from fbsemlib.models.losses import relative_mse, unrolled_loss
from fbsemlib.training.memory.problem import MemoryProblem
from fbsemlib.training.memory.tracker import SavedTensorTracker

__all__ = ["MODES", "StepSetup"]

MODES = ("end-to-end", "checkpointed", "sequential")


class StepSetup:
    """Network, context and host batch of one measurement (everything before the step):
    ``host`` holds what the step copies to the device (the cached input ``x_k`` and its
    target in sequential mode; the K targets otherwise), ``batch_bytes`` its size."""

    def __init__(self, problem: MemoryProblem, K: int, mode: str):
        self.problem = problem
        self.K = K
        self.mode = mode
        self.net = problem.build_net(K)
        self.net.train()
        self.ctx = problem.prepare(self.net)
        self.k = K - 1 if mode == "sequential" else None
        if mode == "sequential":
            # the cache: output of the frozen modules 0..k-1, computed without gradients, on the host
            with torch.no_grad():
                self.net.eval()
                x = self.net.run(self.ctx, modules=range(self.k)) if self.k > 0 else self.ctx.x0
                self.net.train()
            self.host = {"x": x.detach().cpu().clone(), "target": problem.targets([self.k], self.ctx.x0)[:, 0]}
            del x
        else:
            self.host = {"targets": problem.targets(range(K), self.ctx.x0)}
        self.batch_bytes = sum(t.numel() * t.element_size() for t in self.host.values())
        self.net.zero_grad(set_to_none=True)

    def step(self, tracker: SavedTensorTracker | None) -> dict:
        """One training step: load the batch onto the device, forward, loss, backward."""
        net, ctx, dev = self.net, self.ctx, self.problem.device
        batch = {k: v.to(dev, copy=True) for k, v in self.host.items()}
        if tracker is not None:
            tracker.exclude(batch.values())
            net.step = tracker.wrap(FBSEMNet.step.__get__(net))
        hooks = tracker.hooks() if tracker is not None else contextlib.nullcontext()
        try:
            with hooks:
                if self.mode == "sequential":
                    out = net.step(self.k, batch["x"], ctx)
                    loss = relative_mse(out, batch["target"])
                    del out
                else:
                    outs = net.run(ctx, return_all=True, checkpoint=self.mode == "checkpointed",
                                   modules=range(self.K))
                    loss = unrolled_loss(outs, batch["targets"])
                    del outs
                loss.backward()
                loss_value = float(loss.detach())
                del loss
        finally:
            if tracker is not None:
                del net.step
        del batch
        return {"loss": loss_value}
