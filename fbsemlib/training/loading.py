"""What a trainer loads: the data order of every epoch, and batches of the sample fields
it needs as :class:`~fbsemlib.data.batch.PETBatch` objects.

Determinism: the data order of epoch ``e`` of stage ``k`` (stage 0 in end-to-end mode) is
a permutation drawn from ``SeedSequence([seed, k, e])``; nothing else in training is
random, so a resumed run sees the same order (and reproduces an uninterrupted run exactly
on CPU). With several processes the same order is cut into global batches
(:func:`fbsemlib.training.distributed.shard_batches`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from fbsemlib.config import to_dict
from fbsemlib.data.batch import PETBatch

__all__ = ["epoch_permutation", "batches", "TrainingSamples", "LoadedBatch", "collate", "dataset_info"]


def epoch_permutation(seed: int, stage: int, epoch: int, n: int) -> list[int]:
    """The data order of ``epoch`` of ``stage`` (stage 0 in end-to-end mode): a function of
    ``(seed, stage, epoch)`` only, so a resumed run sees the same order."""
    s = int(np.random.SeedSequence([int(seed), int(stage), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)
    g = torch.Generator().manual_seed(s)
    return torch.randperm(n, generator=g).tolist()


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    order = list(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class LoadedBatch(PETBatch):
    """A :class:`PETBatch` as a trainer loads it: the fields it does not read
    (``activity``, ``brain_mask``; ``targets`` when a stage does not need them) are
    ``None``, ``targets`` may hold only the target of one stage (``K' = 1``), and
    ``index`` is the position of each sample in its dataset (the row of the sequential
    cache)."""


class TrainingSamples(Dataset):
    """The samples of a dataset as :class:`LoadedBatch` items. ``targets``: ``"all"`` keeps
    the ``(K, 1, Z, Y, X)`` targets, an integer ``k`` only target ``k`` (``(1, 1, Z, Y, X)``:
    less copying in sequential stages), ``None`` none. ``truth``: keep ``activity`` and
    ``brain_mask`` too (validation by the NRMSE to the phantom)."""

    def __init__(self, ds: Dataset, targets: int | str | None = "all", truth: bool = False):
        self.ds, self.targets, self.truth = ds, targets, truth

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> LoadedBatch:
        s = PETBatch.from_mapping(self.ds[i])
        if self.targets == "all":
            targets = s.targets
        elif self.targets is None:
            targets = None
        else:
            targets = s.targets[self.targets:self.targets + 1]
        return LoadedBatch(y=s.y, multiplicative=s.multiplicative, additive=s.additive, mr=s.mr, targets=targets,
                           target_final=s.target_final, activity=s.activity if self.truth else None,
                           brain_mask=s.brain_mask if self.truth else None, index=i)


def collate(items: list[LoadedBatch]) -> LoadedBatch:
    """Stack the items of :class:`TrainingSamples` into one batch (``None`` fields stay
    ``None``; ``index`` becomes a ``(B,)`` int64 tensor)."""
    fields = {}
    for f in dataclasses.fields(LoadedBatch):
        values = [getattr(it, f.name) for it in items]
        fields[f.name] = None if values[0] is None else default_collate(values)
    return LoadedBatch(**fields)


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
