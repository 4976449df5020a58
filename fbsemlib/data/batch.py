"""The sample contract of a dataset, in one place: :class:`PETBatch`.

:class:`~fbsemlib.data.dataset.PETDataset` serves plain dicts with the keys of
:data:`SAMPLE_KEYS` (so PyTorch's default collate batches them); every consumer turns a
sample or a collated batch into a :class:`PETBatch` with :meth:`PETBatch.from_mapping`
and reads typed fields instead of string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = ["PETBatch", "SAMPLE_KEYS"]


@dataclass
class PETBatch:
    """One sample, or a batch of ``B`` samples (a leading ``B`` dimension on every field).

    ``y``, ``multiplicative``, ``additive``: ``(B, 1, P, V, R)`` measured sinogram and the
    factors of its expected value ``multiplicative * A x + additive``; ``mr``,
    ``target_final``, ``activity``, ``brain_mask``: ``(B, 1, Z, Y, X)``; ``targets``:
    ``(B, K, 1, Z, Y, X)`` the iteration-dependent targets; ``index``: ``(B,)`` sample
    indices in the split (without the ``B`` dimension for a single sample).
    """

    y: torch.Tensor
    multiplicative: torch.Tensor
    additive: torch.Tensor
    mr: torch.Tensor
    targets: torch.Tensor
    target_final: torch.Tensor
    activity: torch.Tensor
    brain_mask: torch.Tensor
    index: Any

    @classmethod
    def from_mapping(cls, sample: "Mapping[str, Any] | PETBatch") -> "PETBatch":
        """A :class:`PETBatch` from a dataset item or a collated batch (a dict with exactly
        the keys of :data:`SAMPLE_KEYS`); a :class:`PETBatch` is returned as it is."""
        if isinstance(sample, cls):
            return sample
        if not isinstance(sample, Mapping):
            raise TypeError(f"expected a mapping with the keys {SAMPLE_KEYS}, got {type(sample).__name__}")
        missing = [k for k in SAMPLE_KEYS if k not in sample]
        if missing:
            raise KeyError(f"sample lacks {missing}; a sample has the keys {SAMPLE_KEYS}")
        return cls(**{k: sample[k] for k in SAMPLE_KEYS})

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (the dataset's sample form)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PETBatch":
        """A copy of the same class with ``fn`` applied to every tensor field (``None`` and
        integer fields as they are)."""
        return type(self)(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.as_dict().items()})

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "PETBatch":
        """A copy with every tensor moved to ``device``; ``dtype`` converts the floating
        fields (the mask stays boolean, the indices integer)."""
        return self._map_tensors(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None,
                                                non_blocking=non_blocking))

    def pin_memory(self) -> "PETBatch":
        """A copy in pinned memory (what a CUDA :class:`~torch.utils.data.DataLoader` calls)."""
        return self._map_tensors(torch.Tensor.pin_memory)

    @property
    def batch_size(self) -> int:
        """``B`` (1 for an un-batched sample)."""
        return int(self.y.shape[0]) if self.y.dim() == 5 else 1

    @property
    def num_modules(self) -> int:
        """``K``: the number of iteration-dependent targets."""
        return int(self.targets.shape[-5])


#: the keys of every sample served by :class:`~fbsemlib.data.dataset.PETDataset`
SAMPLE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PETBatch))
