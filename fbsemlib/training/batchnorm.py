"""BatchNorm statistics of an end-to-end trained FBSEM-Net, recalibrated module by module.

During end-to-end training, module ``k``'s BatchNorm layers accumulate running statistics
(momentum 0.1) of inputs produced by modules ``0..k-1`` *while those were changing* and in
train mode (normalised with batch statistics). At test time every module runs in eval mode,
so module ``k`` sees inputs its running statistics were never estimated on, and the error
compounds over ``K`` chained modules. Sequential training does not have this problem:
module ``k`` is trained on the outputs of the frozen, eval-mode modules before it.

:func:`recalibrate_batch_norm` re-estimates them the way sequential training gets them
(a choice of this implementation; the paper does not say): for ``k = 0..K-1``, module
``k``'s BatchNorm statistics are reset and re-estimated over the whole training set
(cumulative average, ``momentum=None``) on the eval-mode outputs of the already
recalibrated modules ``0..k-1``; then those outputs are advanced through module ``k`` in
eval mode. No weight changes. A shared network (one set of statistics for every module)
is left as trained.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["batch_norm_layers", "recalibrate_batch_norm"]


def batch_norm_layers(module: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batch_norm(net, batches: Iterable) -> int:
    """Recalibrate the BatchNorm statistics of an iteration-dependent ``net``
    (:class:`~fbsemlib.models.fbsem.FBSEMNet`) on ``batches`` (each a batch with ``y``,
    ``multiplicative``, ``additive``, ``mr``, on the network's device), module by module
    (see the module docstring). Returns the number of modules recalibrated (0 for a shared
    network or one without BatchNorm). Leaves ``net`` in eval mode."""
    net.eval()
    if net.config.shared or not batch_norm_layers(net):
        return 0
    # every batch's unrolling context and current image (the inputs of module k)
    ctxs = [net.prepare(b.y, b.multiplicative, b.additive, b.mr) for b in batches]
    xs = [c.x0 for c in ctxs]
    done = 0
    for k in range(net.num_modules):
        layers = batch_norm_layers(net.regularisers[net.net_index(k)])
        saved = [(m, m.momentum) for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the training set
            m.train()
        for c, x in zip(ctxs, xs):
            net.step(k, x, c)
        for m, mom in saved:
            m.momentum = mom
            m.eval()
        xs = [net.step(k, x, c) for c, x in zip(ctxs, xs)]
        done += bool(layers)
    return done
