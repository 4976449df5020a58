"""Linear operators on torch tensors (after parallelproj's ``LinearOperator``).

An operator maps tensors of shape ``(..., *in_shape)`` to ``(..., *out_shape)``; any
leading batch dimensions are carried through. ``A(x)`` is differentiable: the gradient
of the forward is the adjoint and vice versa (:class:`torch.autograd.Function`).
"""

from __future__ import annotations

import abc
from typing import Sequence

import torch

__all__ = ["LinearOperator", "CompositeOperator", "adjointness_error", "check_tensor"]


def check_tensor(
    x: torch.Tensor,
    name: str,
    trailing_shape: Sequence[int] | None = None,
    *,
    device: torch.device | str | None = None,
    nonnegative: bool = False,
    finite: bool = True,
) -> None:
    """Raise a clear ``TypeError`` / ``ValueError`` naming ``name`` when ``x`` is not a
    floating tensor of trailing shape ``trailing_shape`` on ``device`` (optionally
    finite and non-negative)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if trailing_shape is not None:
        t = tuple(trailing_shape)
        if x.ndim < len(t) or tuple(x.shape[x.ndim - len(t):]) != t:
            raise ValueError(f"{name} must have shape (..., {', '.join(map(str, t))}), got {tuple(x.shape)}")
    if device is not None and x.device != torch.device(device) and not (
        torch.device(device).type == x.device.type and torch.device(device).index is None
    ):
        raise ValueError(f"{name} is on {x.device} but the operator lives on {device}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    if nonnegative and bool((x < 0).any()):
        raise ValueError(f"{name} must be non-negative (found values down to {float(x.min()):.3g})")


class LinearOperator(abc.ABC):
    """Base class: subclasses implement ``_apply`` and ``_adjoint`` on tensors of shape
    ``(N, *in_shape)`` / ``(N, *out_shape)`` (one flattened batch dimension)."""

    @property
    @abc.abstractmethod
    def in_shape(self) -> tuple[int, ...]: ...

    @property
    @abc.abstractmethod
    def out_shape(self) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def _adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    # -- public API -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(..., *in_shape)``."""
        return _apply_batched(self, x, adjoint=False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for ``y`` of shape ``(..., *out_shape)``."""
        return _apply_batched(self, y, adjoint=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def __matmul__(self, other: "LinearOperator") -> "CompositeOperator":
        return CompositeOperator(self, other)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _check_input(self, x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        check_tensor(x, name, shape, device=self.device, finite=False)

    def adjointness_error(self, dtype=torch.float64, batch: int = 1, seed: int = 0) -> float:
        return adjointness_error(self, dtype=dtype, batch=batch, seed=seed)


class _LinearFn(torch.autograd.Function):
    """``A x`` (or ``A^T x`` with ``adjoint``) whose gradient is the other one: the
    vector-Jacobian product of a linear map is its adjoint applied to the incoming gradient."""

    @staticmethod
    def forward(ctx, x, op, adjoint: bool):
        ctx.op, ctx.adjoint = op, adjoint
        return op._adjoint(x) if adjoint else op._apply(x)

    @staticmethod
    def backward(ctx, g):
        return _LinearFn.apply(g.contiguous(), ctx.op, not ctx.adjoint), None, None


def _apply_batched(op: LinearOperator, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
    shape_in = op.out_shape if adjoint else op.in_shape
    shape_out = op.in_shape if adjoint else op.out_shape
    op._check_input(x, shape_in, "sinogram" if adjoint else "image")
    lead = x.shape[: x.ndim - len(shape_in)]
    xf = x.reshape((-1,) + tuple(shape_in))
    if not xf.is_contiguous():
        xf = xf.contiguous()
    out = _LinearFn.apply(xf, op, adjoint)
    return out.reshape(tuple(lead) + tuple(shape_out))


class CompositeOperator(LinearOperator):
    """``A @ B``: apply ``B`` then ``A`` (e.g. a projector after a PSF). The sinogram
    helpers of the outer operator ``A`` (:meth:`subset`, :meth:`lor_endpoints`) are those
    of the composite, so ``A @ G`` serves as the projector of a forward model."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if tuple(a.in_shape) != tuple(b.out_shape):
            raise ValueError(f"cannot compose: {a.in_shape} != {b.out_shape}")
        self.a, self.b = a, b

    @property
    def in_shape(self):
        return self.b.in_shape

    @property
    def out_shape(self):
        return self.a.out_shape

    @property
    def device(self):
        return self.a.device

    def _apply(self, x):
        return self.a._apply(self.b._apply(x))

    def _adjoint(self, y):
        return self.b._adjoint(self.a._adjoint(y))

    def subset(self, m: int, num_subsets: int) -> "CompositeOperator":
        """``A_m @ B``: the outer operator's ordered subset ``m`` (its views) after ``B``."""
        return CompositeOperator(self.a.subset(m, num_subsets), self.b)

    def subsets(self, num_subsets: int) -> list["CompositeOperator"]:
        return [self.subset(m, num_subsets) for m in range(num_subsets)]

    def lor_endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The outer operator's bin endpoints (see :meth:`Projector.lor_endpoints`)."""
        return self.a.lor_endpoints()


def adjointness_error(op: LinearOperator, dtype=torch.float64, batch: int = 1, seed: int = 0) -> float:
    """Relative error ``|<A x, y> - <x, A^T y>| / |<A x, y>|`` for random non-negative
    ``x`` and ``y`` (0 for an exact adjoint pair)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch,) + tuple(op.in_shape), generator=g, dtype=dtype).to(op.device)
    y = torch.rand((batch,) + tuple(op.out_shape), generator=g, dtype=dtype).to(op.device)
    lhs = (op.forward(x) * y).sum()
    rhs = (x * op.adjoint(y)).sum()
    return float((lhs - rhs).abs() / lhs.abs().clamp_min(torch.finfo(dtype).tiny))
