"""Looking inside trained runs (used by the book's chapters 7 and 8).

* :func:`stack_samples` -- a batch of dataset samples (:func:`collate`: the items of a
  :class:`~fbsemlib.data.PETDataset` as one :class:`~fbsemlib.data.PETBatch`, every field
  stacked along a new batch dimension);
* :func:`module_outputs` -- the output of every unrolled module of a trained FBSEM-Net;
* :func:`module_trace` -- per module ``k``, the NRMSE of its output against the true
  activity and against its own iteration-dependent target, and the NRMSE of that target
  (the noise-free OSEM iterate) against the truth;
* :func:`baseline_recon` -- OSEM (or another baseline) of the same batch;
* :func:`orthogonal_slices` -- axial / coronal / sagittal slices of a volume with their
  extents in mm (for ``imshow``);
* :func:`run_summary` -- training facts of a run (time, steps, epochs, parameters).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from fbsemlib.data import PETBatch
from fbsemlib.evaluation import metrics

__all__ = ["collate", "stack_samples", "module_outputs", "module_trace", "baseline_recon", "orthogonal_slices",
           "run_summary"]


def collate(items: Sequence[Mapping]) -> PETBatch:
    """Dataset items as one :class:`~fbsemlib.data.PETBatch` (PyTorch's ``default_collate``:
    every field stacked along a new leading batch dimension)."""
    from torch.utils.data import default_collate

    if not items:
        raise ValueError("collate needs at least one item")
    return PETBatch.from_mapping(default_collate([PETBatch.from_mapping(it).as_dict() for it in items]))


def stack_samples(ds, indices: Sequence[int]) -> PETBatch:
    """The samples ``indices`` of ``ds`` as one batch (``y``: ``(B, 1, P, V, R)``,
    ``targets``: ``(B, K, 1, Z, Y, X)``, ...)."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("stack_samples needs at least one index")
    return collate([ds[i] for i in indices])


@torch.no_grad()
def module_outputs(net, batch: Mapping, device=None) -> torch.Tensor:
    """Every module's output ``x_1..x_K`` of ``net`` (run in eval mode; its training mode
    is restored afterwards) on ``batch`` (a :class:`~fbsemlib.data.PETBatch` with a leading
    batch dimension: :func:`stack_samples`, or :func:`fbsembook.analysis.as_batch` of one
    dataset item), ``(K, B, 1, Z, Y, X)`` on the CPU (``net.prepare`` +
    ``net.run(ctx, return_all=True)``). For one item,
    ``module_outputs(net, as_batch(item))[:, 0, 0]`` is ``(K, Z, Y, X)``."""
    b = PETBatch.from_mapping(batch)
    dev = torch.device(device) if device is not None else net.projector.device
    was = net.training
    net.eval()
    try:
        mr = b.mr.to(dev) if net.config.use_mr else None
        ctx = net.prepare(b.y.to(dev), b.multiplicative.to(dev), b.additive.to(dev), mr)
        outs = net.run(ctx, return_all=True)
    finally:
        net.train(was)
    return torch.stack([o.detach().cpu() for o in outs])


def module_trace(outputs: torch.Tensor, batch: Mapping) -> dict:
    """NRMSE (%) per module ``k = 1..K`` and sample, inside the brain mask:

    ``to_truth``  output of module k vs the true activity;
    ``to_target`` output of module k vs its target t_k (the noise-free OSEM iterate k);
    ``target_to_truth`` t_k vs the true activity.

    ``outputs``: ``(K, B, 1, Z, Y, X)`` from :func:`module_outputs`; ``batch``: from
    :func:`stack_samples` (``targets``, ``activity``, ``brain_mask``). Arrays are
    ``(K, B)``; ``k`` is ``1..K``."""
    K = outputs.shape[0]
    b = PETBatch.from_mapping(batch)
    act = b.activity.float()
    mask = b.brain_mask.bool()
    tg = b.targets[:, :K].float().transpose(0, 1)  # (K, B, 1, Z, Y, X)
    if tg.shape[0] < K:
        raise ValueError(f"the batch has {tg.shape[0]} targets but the network {K} modules")
    to_truth = torch.stack([metrics.nrmse(outputs[k], act, mask) for k in range(K)])
    to_target = torch.stack([metrics.nrmse(outputs[k], tg[k], mask) for k in range(K)])
    target_to_truth = torch.stack([metrics.nrmse(tg[k], act, mask) for k in range(K)])
    f = lambda t: np.asarray(t.reshape(K, -1).cpu(), dtype=float)  # noqa: E731
    return {"k": np.arange(1, K + 1), "to_truth": f(to_truth), "to_target": f(to_target),
            "target_to_truth": f(target_to_truth)}


@torch.no_grad()
def baseline_recon(ds, batch: Mapping, method: str = "osem", strength: float | None = None, projector=None,
                   bowsher_neighbours: int = 4) -> torch.Tensor:
    """A baseline reconstruction (:func:`fbsemlib.evaluation.baselines.reconstruct`) of ``batch`` with
    the dataset's unrolled schedule; ``(B, 1, Z, Y, X)`` on the CPU."""
    from fbsemlib.evaluation.baselines import reconstruct

    P = projector if projector is not None else ds.make_projector()
    x = reconstruct(method, strength, batch, P, ds.num_iterations, ds.num_subsets, bowsher_neighbours)
    return x.detach().cpu()


def orthogonal_slices(volume, voxel_size_mm: Sequence[float], centre: Sequence[int] | None = None) -> dict:
    """Axial (``z``), coronal (``y``) and sagittal (``x``) slices through ``centre``
    (default: the middle voxel) of a ``(Z, Y, X)`` volume (leading singleton dimensions are
    dropped). Returns ``{"axial" | "coronal" | "sagittal": (image, extent)}`` where
    ``extent = (left, right, bottom, top)`` in mm for ``imshow(..., origin="lower")``:
    axial is ``(Y, X)`` over ``x, y``; coronal ``(Z, X)`` over ``x, z``; sagittal
    ``(Z, Y)`` over ``y, z``."""
    v = volume.detach().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume)
    while v.ndim > 3 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"orthogonal_slices needs a (Z, Y, X) volume, got shape {v.shape}")
    Z, Y, X = v.shape
    dz, dy, dx = (float(a) for a in voxel_size_mm)
    cz, cy, cx = (Z // 2, Y // 2, X // 2) if centre is None else (int(c) for c in centre)
    for c, n, name in ((cz, Z, "z"), (cy, Y, "y"), (cx, X, "x")):
        if not 0 <= c < n:
            raise ValueError(f"centre {name}={c} outside 0..{n - 1}")
    ext = lambda n, d: (-n * d / 2, n * d / 2)  # noqa: E731
    return {
        "axial": (v[cz], (*ext(X, dx), *ext(Y, dy))),
        "coronal": (v[:, cy, :], (*ext(X, dx), *ext(Z, dz))),
        "sagittal": (v[:, :, cx], (*ext(Y, dy), *ext(Z, dz))),
    }


def run_summary(run) -> dict:
    """Training facts of a :class:`fbsembook.experiments.Run`: mode, modules, parameters,
    optimiser steps, epochs (end-to-end) or epochs per module (sequential), training time
    and, for sequential runs, the time spent building / propagating the input cache and
    how many stages started from the previous module's weights (``train.stage_init``)."""
    m = run.metrics or {}
    tr = (run.key or {}).get("train", {})
    seq = run.mode == "sequential"
    stages = m.get("stages") or []
    return {
        "mode": run.mode,
        "modules": m.get("num_modules"),
        "shared": m.get("shared"),
        "targets": m.get("targets"),
        "parameters": m.get("num_parameters"),
        "steps": m.get("steps"),
        "epochs": tr.get("epochs_per_module") if seq else tr.get("epochs"),
        "epochs_kind": "per module" if seq else "through all modules",
        "train_time_s": m.get("train_time_s"),
        "cache_time_s": float(sum(s.get("cache_time_s") or 0.0 for s in stages)) if seq else None,
        "peak_memory_mb": m.get("peak_memory_mb_per_stage_max") if seq else m.get("peak_memory_mb"),
        "stage_init": tr.get("stage_init") if seq else None,
        "warm_started_stages": sum(s.get("init") == "previous" for s in stages) if seq else None,
    }
