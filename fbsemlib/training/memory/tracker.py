"""Exact accounting of the tensors autograd keeps for the backward pass
(:class:`SavedTensorTracker`).

Every saved tensor is wrapped (:class:`torch.autograd.graph.saved_tensors_hooks`) in a small
holder whose destruction (when autograd frees the saved variable, i.e. while the backward
pass runs) releases it; the live sum over *unique storages* (a tensor saved by several
nodes, or several views of one buffer, count once) is updated at every pack / release and
its maximum kept. Tensors resident before the step are excluded.

Gradient checkpointing: inside a checkpointed module torch's own saved-tensor hooks take
precedence over ours (the hooks do not nest), and they keep nothing during the forward
pass; in the backward pass the module is recomputed and its saved tensors are stashed by
torch until consumed. To count them, each module call is wrapped (:meth:`wrap`): when
other hooks are on top of ours, ours are chained in front of them, and a tensor those
hooks keep is tracked with a weak reference to its storage until it is freed.
"""

from __future__ import annotations

import torch

__all__ = ["SavedTensorTracker", "storage_key"]


def storage_key(t: torch.Tensor):
    """``(key, nbytes, storage)`` of the storage behind ``t`` (``(None, 0, None)`` for
    tensors without one)."""
    try:
        st = t.untyped_storage()
        return (t.device.type, t.device.index, st.data_ptr()), st.nbytes(), st
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, ...
        return None, 0, None


class _Packed:
    """What our pack hook returns: holds the tensor; releases it when autograd drops it."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor, key, tracker):
        self.tensor = tensor
        self.key = key
        self.tracker = tracker

    def __del__(self):
        tr = self.tracker
        if tr is not None:
            tr._release(self.key)


class SavedTensorTracker:
    """Live and peak bytes of the tensors autograd keeps for the backward pass.

    Use :meth:`hooks` as the context manager around forward + backward and
    :meth:`wrap` around each module call (only needed when other saved-tensor hooks, such
    as gradient checkpointing's, may be on top of ours). ``exclude``: tensors whose
    storages are not counted (resident before the step)."""

    def __init__(self, exclude=()):
        self._exclude = set()
        self.exclude(exclude)
        self._held: dict = {}  # key -> [nbytes, count]
        self._foreign: dict = {}  # key -> (StorageWeakRef, nbytes), kept by other hooks
        self.live_bytes = 0
        self.peak_bytes = 0
        self.num_packed = 0
        self.num_foreign = 0

    def exclude(self, tensors) -> None:
        """Do not count the storages of ``tensors``."""
        for t in tensors:
            key, _, _ = storage_key(t)
            if key is not None:
                self._exclude.add(key)

    # -- our hooks ---------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        key, nbytes, _ = storage_key(t)
        if key is None or key in self._exclude or nbytes == 0:
            return t
        self.num_packed += 1
        ent = self._held.get(key)
        if ent is None:
            self._held[key] = [nbytes, 1]
            self.live_bytes += nbytes
            self._foreign.pop(key, None)
            self._update()
        else:
            ent[1] += 1
        return _Packed(t, key, self)

    @staticmethod
    def unpack(p):
        return p.tensor if isinstance(p, _Packed) else p

    def _release(self, key) -> None:
        ent = self._held.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del self._held[key]
            self.live_bytes -= ent[0]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    # -- tensors kept by other hooks (checkpoint recomputation) --------------------------
    def _note_foreign(self, t: torch.Tensor) -> None:
        key, nbytes, st = storage_key(t)
        if key is None or nbytes == 0 or key in self._exclude or key in self._held or key in self._foreign:
            return
        from torch.multiprocessing.reductions import StorageWeakRef

        self._foreign[key] = (StorageWeakRef(st), nbytes)
        self.num_foreign += 1

    def _foreign_live(self) -> int:
        total = 0
        for key in list(self._foreign):
            ref, nbytes = self._foreign[key]
            if ref.expired():
                del self._foreign[key]
            else:
                total += nbytes
        return total

    def _update(self) -> None:
        cur = self.live_bytes + (self._foreign_live() if self._foreign else 0)
        if cur > self.peak_bytes:
            self.peak_bytes = cur

    def wrap(self, fn):
        """``fn`` with our hooks chained in front of any hooks pushed on top of ours
        (torch's checkpoint): a tensor those hooks keep (return as a tensor) is tracked
        with a weak reference to its storage until it is freed."""

        def tracked(*args, **kwargs):
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
            if top is None or getattr(top[0], "__self__", None) is self:
                return fn(*args, **kwargs)
            inner_pack, inner_unpack = top

            def pack(t):
                try:
                    packed = inner_pack(t)
                except BaseException:
                    # torch's checkpoint stops a recomputation early by raising from its
                    # pack hook after it has stashed the tensor
                    self._note_foreign(t)
                    raise
                if isinstance(packed, torch.Tensor):
                    self._note_foreign(t)
                return packed

            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
                    return fn(*args, **kwargs)
            finally:
                self._update()

        return tracked
