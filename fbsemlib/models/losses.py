"""The training losses of an unrolled network: the relative squared error of a module's
output and the (weighted) sum over modules for iteration-dependent targets.

Iteration-dependent targets (one per module, the OSEM iterates of the noise-free data) are
the 2022 paper's; the scale-free relative error and the weighting schemes are this package's
choices.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["relative_mse", "target_weights", "unrolled_loss"]


def relative_mse(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``||x - t||^2 / ||t||^2`` per batch item, averaged over the batch (scale-free)."""
    d = (x - target) ** 2
    t = target**2
    if mask is not None:
        d, t = d * mask, t * mask
    return (d.flatten(1).sum(1) / t.flatten(1).sum(1).clamp_min(1e-12)).mean()


def target_weights(num_modules: int, scheme: str | Sequence[float] = "uniform") -> torch.Tensor:
    """Weights of the per-module losses (normalised to sum 1): ``"uniform"``,
    ``"linear"`` (w_k proportional to k+1), ``"last"`` (final module only) or an explicit list."""
    if isinstance(scheme, str):
        if scheme == "uniform":
            w = torch.ones(num_modules)
        elif scheme == "linear":
            w = torch.arange(1, num_modules + 1, dtype=torch.float32)
        elif scheme == "last":
            w = torch.zeros(num_modules)
            w[-1] = 1
        else:
            raise ValueError(f"unknown loss weighting {scheme!r}; use 'uniform', 'linear', 'last' or a list")
    else:
        w = torch.as_tensor(list(scheme), dtype=torch.float32)
        if w.numel() != num_modules or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"loss weights must be {num_modules} non-negative numbers with a positive sum")
    return w / w.sum()


def unrolled_loss(
    outputs: Sequence[torch.Tensor],
    targets: torch.Tensor | None = None,
    target_final: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Iteration-dependent targets (``targets``: ``(B, K, 1, Z, Y, X)``): ``sum_k w_k
    L(x_k, t_k)``; single final target (``target_final``: ``(B, 1, Z, Y, X)``):
    ``L(x_K, t)``. ``L`` is :func:`relative_mse`."""
    if targets is not None:
        K = len(outputs)
        if targets.shape[1] != K:
            raise ValueError(f"got {targets.shape[1]} targets for {K} module outputs")
        w = target_weights(K) if weights is None else weights
        total = 0.0
        for k in range(K):
            if float(w[k]) > 0:
                total = total + float(w[k]) * relative_mse(outputs[k], targets[:, k], mask)
        return total
    if target_final is None:
        raise ValueError("give iteration-dependent targets or a final target")
    return relative_mse(outputs[-1], target_final, mask)
