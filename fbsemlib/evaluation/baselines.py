"""Baseline reconstructions and the strength sweeps that pick their best settings.

Methods (all with the unrolled schedule ``num_iterations x num_subsets`` of the dataset,
from ``x0 = 1`` in the field of view, exactly as FBSEM-Net):

* ``osem``:               plain OSEM;
* ``osem_postfilter``:    OSEM followed by a Gaussian filter of FWHM ``fwhm_mm`` (0 mm: none, so the
  sweep can pick plain OSEM);
* ``mapem_quadratic``:    De Pierro MAP-EM with a quadratic (inverse-distance 3x3[x3]) prior;
* ``mapem_bowsher``:      De Pierro MAP-EM with the MR-guided Bowsher prior.

MAP-EM strengths are *relative* (:func:`beta_scale`): the same value means the same
balance between data and prior at any count level, so sweep ranges carry over between
recipes.

The strength (FWHM or beta) of each regularised method is chosen on the *validation*
split by the lowest mean NRMSE against the true activity inside the brain mask, and then
applied unchanged to the test split (:func:`sweep`, :func:`best_settings`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fbsemlib.data.batch import PETBatch
from fbsemlib.evaluation.metrics import nrmse
from fbsemlib.physics.forward_model import PETForwardModel
from fbsemlib.recon.algorithms import map_em, osem, postfilter
from fbsemlib.recon.priors import BowsherPrior, QuadraticPrior

__all__ = ["BaselineConfig", "METHODS", "reconstruct", "reconstruct_measured", "sweep", "best_settings", "SweepResult"]

METHODS = ("osem", "osem_postfilter", "mapem_quadratic", "mapem_bowsher")


@dataclass
class BaselineConfig:
    """Sweep ranges (the ``baselines:`` section of an experiment)."""

    fwhm_mm: list[float] = field(default_factory=lambda: [2.0, 4.0, 6.0, 8.0, 10.0])
    beta_quadratic: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    beta_bowsher: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    bowsher_neighbours: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        for name in ("fwhm_mm", "beta_quadratic", "beta_bowsher"):
            vals = getattr(self, name)
            low_ok = (lambda v: float(v) >= 0) if name == "fwhm_mm" else (lambda v: float(v) > 0)
            if not isinstance(vals, (list, tuple)) or len(vals) == 0 or any(not low_ok(v) for v in vals):
                what = "non-negative (0: no filter)" if name == "fwhm_mm" else "positive"
                raise ValueError(f"baselines.{name} must be a non-empty list of {what} numbers, got {vals!r}")
            setattr(self, name, [float(v) for v in vals])
        if not isinstance(self.bowsher_neighbours, int) or not 1 <= self.bowsher_neighbours <= 26:
            raise ValueError(f"baselines.bowsher_neighbours must be in 1..26, got {self.bowsher_neighbours!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"baselines.batch_size must be a positive integer, got {self.batch_size!r}")

    def strengths(self, method: str) -> list[float | None]:
        return {"osem": [None], "osem_postfilter": self.fwhm_mm, "mapem_quadratic": self.beta_quadratic,
                "mapem_bowsher": self.beta_bowsher}[method]

    def to_dict(self) -> dict:
        return asdict(self)


def reconstruct(
    method: str,
    strength: float | None,
    batch: PETBatch | Mapping,
    projector,
    num_iterations: int,
    num_subsets: int,
    bowsher_neighbours: int = 4,
) -> torch.Tensor:
    """Reconstruct a batch (:class:`~fbsemlib.data.batch.PETBatch` or a collated dataset
    batch, ``(B, 1, ...)``) with one baseline; returns ``(B, 1, Z, Y, X)``."""
    b = PETBatch.from_mapping(batch)
    return reconstruct_measured(method, strength, projector, b.y, b.multiplicative, b.additive, b.mr,
                                num_iterations, num_subsets, bowsher_neighbours)


def reconstruct_measured(method: str, strength: float | None, projector, y: torch.Tensor,
                         multiplicative: torch.Tensor | None, additive: torch.Tensor | None, mr: torch.Tensor | None,
                         num_iterations: int, num_subsets: int, bowsher_neighbours: int = 4) -> torch.Tensor:
    """:func:`reconstruct` of measured data given as tensors (``(B, 1, ...)``; ``mr`` is
    needed by ``mapem_bowsher`` only; ``None`` factors are 1 and 0), e.g. a user's
    (:func:`fbsemlib.evaluation.user_data.load_user_data`)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    if method == "mapem_bowsher" and mr is None:
        raise ValueError("mapem_bowsher needs an MR image")
    dev = projector.device
    model = PETForwardModel(projector, None if multiplicative is None else multiplicative.to(dev),
                            None if additive is None else additive.to(dev))
    y = y.to(dev)
    if method == "osem":
        return osem(model, y, num_iterations, num_subsets)
    if method == "osem_postfilter":
        x = osem(model, y, num_iterations, num_subsets)
        return postfilter(x, float(strength), projector.grid.voxel_size_mm)
    if method == "mapem_quadratic":
        prior = QuadraticPrior()
    else:
        prior = BowsherPrior(mr.to(dev), num_neighbours=bowsher_neighbours)
    beta = float(strength) * beta_scale(model, y, num_subsets)
    return map_em(model, y, prior, beta, num_iterations, num_subsets)


def beta_scale(model: PETForwardModel, y: torch.Tensor, num_subsets: int) -> torch.Tensor:
    """``mean(s_m) / xbar`` per batch item, so that a *relative* strength ``beta_rel``
    (``beta = beta_rel * mean(s_m) / xbar``) means the same pull at any count level:
    ``s_m ~ s / num_subsets`` is the subset sensitivity and ``xbar = sum(y - b) / sum(s)``
    the mean activity level implied by the data (trues over sensitivity)."""
    s = model.sensitivity(y)
    lead = y.shape[:-3]
    s = s.expand(tuple(torch.broadcast_shapes(lead, s.shape[:-3])) + tuple(s.shape[-3:]))
    trues = (y - (model.additive if model.additive is not None else 0)).clamp_min(0)
    support = (s > 0).to(s.dtype)
    s_sum = s.flatten(-3).sum(-1)
    xbar = trues.flatten(-3).sum(-1) / s_sum.clamp_min(1e-12)
    s_mean = s_sum / support.flatten(-3).sum(-1).clamp_min(1) / num_subsets
    return (s_mean / xbar.clamp_min(1e-12))[..., None, None, None]


@dataclass
class SweepResult:
    """Mean NRMSE (%) per method and strength on one split, and the best strengths."""

    split: str
    curves: dict[str, list[tuple[float | None, float]]]
    best: dict[str, float | None]

    def to_dict(self) -> dict:
        return {"split": self.split, "curves": {k: [list(p) for p in v] for k, v in self.curves.items()}, "best": self.best}


def _iterate(dataset, batch_size: int) -> Iterable[PETBatch]:
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        yield PETBatch.from_mapping(batch)


def sweep(
    dataset,
    projector,
    config: BaselineConfig | None = None,
    methods: Iterable[str] = METHODS,
    progress: bool = False,
) -> SweepResult:
    """NRMSE (against ``activity`` in ``brain_mask``) of every method and strength on
    ``dataset`` (a :class:`~fbsemlib.data.dataset.PETDataset` split)."""
    cfg = config or BaselineConfig()
    if len(dataset) == 0:
        raise ValueError("the dataset split is empty")
    its, subs = dataset.num_iterations, dataset.num_subsets
    curves: dict[str, list] = {}
    jobs = [(m, s) for m in methods for s in cfg.strengths(m)]
    bar = tqdm(total=len(jobs), desc="baseline sweep", disable=not progress, leave=False)
    for method, strength in jobs:
        vals = []
        for batch in _iterate(dataset, cfg.batch_size):
            x = reconstruct(method, strength, batch, projector, its, subs, cfg.bowsher_neighbours)
            ref, mask = batch.activity.to(x.device), batch.brain_mask.to(x.device)
            e = nrmse(x, ref, mask)
            vals.extend(torch.as_tensor(e).flatten().tolist())
        curves.setdefault(method, []).append((strength, sum(vals) / len(vals)))
        bar.update()
    bar.close()
    best = {m: min(c, key=lambda p: p[1])[0] for m, c in curves.items()}
    return SweepResult(getattr(dataset, "split", "?"), curves, best)


def best_settings(result: SweepResult) -> dict[str, float | None]:
    """Best strength per method, warning when it sits at the edge of the swept range."""
    import warnings

    for m, c in result.curves.items():
        strengths = [s for s, _ in c]
        if len(strengths) > 2 and result.best[m] in (strengths[0], strengths[-1]):
            warnings.warn(f"best {m} strength {result.best[m]} is at the edge of the swept range {strengths}")
    return dict(result.best)
