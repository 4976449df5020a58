"""The device of a training run or a memory measurement, from what the user typed."""

from __future__ import annotations

import torch

from fbsemlib.errors import UserError
from fbsemlib.physics.projector import resolved_device

__all__ = ["resolve_device", "same_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else the CPU; otherwise ``device``,
    checked (a :class:`~fbsemlib.errors.UserError` for a malformed name or a CUDA device
    without CUDA)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return dev


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` and ``b`` are one device (``cuda`` means the current CUDA device)."""
    return resolved_device(a) == resolved_device(b)
