"""Checks every linear operator of the package must pass (after mrpro's ``tests/helper.py``).

An operator here is anything with ``op(x)``, ``op.adjoint(y)``, ``in_shape``, ``out_shape``
and ``device``: a :class:`~fbsemlib.physics.operators.LinearOperator` (projectors, PSF,
composites, subsets) or the linear part of a forward model. ``tests/test_operators.py``
runs all of them over every projector path; other test files may call them too.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["random_input", "dotproduct_adjointness_test", "autodiff_test", "batching_test", "dtype_test",
           "device_test"]


def random_input(op, *, adjoint: bool = False, batch: tuple[int, ...] = (1,), dtype=torch.float64, seed: int = 0,
                 device=None) -> torch.Tensor:
    """A random non-negative image (or sinogram with ``adjoint``) of shape ``(*batch, *shape)``."""
    shape = tuple(op.out_shape if adjoint else op.in_shape)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tuple(batch) + shape, generator=g, dtype=dtype)
    return x.to(op.device if device is None else device)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{what}: max |difference| {err:.3g} > {rtol:g} x {scale:.3g}"


def dotproduct_adjointness_test(op, x: torch.Tensor, y: torch.Tensor, rtol: float = 1e-10) -> None:
    """``<A x, y> = <x, A^T y>`` and the shapes of ``A x`` / ``A^T y`` are those of ``y`` / ``x``."""
    ax, aty = op(x), op.adjoint(y)
    assert ax.shape == y.shape, f"A x has shape {tuple(ax.shape)}, expected {tuple(y.shape)}"
    assert aty.shape == x.shape, f"A^T y has shape {tuple(aty.shape)}, expected {tuple(x.shape)}"
    lhs = (ax.double() * y.double()).sum()
    rhs = (x.double() * aty.double()).sum()
    rel = float((lhs - rhs).abs() / lhs.abs().clamp_min(1e-300))
    assert rel <= rtol, f"<A x, y> = {float(lhs):.10g} but <x, A^T y> = {float(rhs):.10g} (relative error {rel:.3g})"


def autodiff_test(op, x: torch.Tensor, y: torch.Tensor | None = None, rtol: float = 1e-10,
                  gradcheck: bool = True) -> None:
    """The gradient of ``<A x, v>`` in ``x`` is ``A^T v`` and that of ``<A^T u, x>`` in ``u``
    is ``A x`` (backward of the forward is the adjoint and vice versa); with ``gradcheck``
    (float64 inputs) also torch's finite-difference check of both directions."""
    v = random_input(op, adjoint=True, batch=x.shape[: x.ndim - len(op.in_shape)], dtype=x.dtype, seed=7,
                     device=x.device)
    xg = x.detach().clone().requires_grad_(True)
    (op(xg) * v).sum().backward()
    _close(xg.grad, op.adjoint(v), rtol, "gradient of the forward vs the adjoint")
    u = random_input(op, adjoint=True, batch=x.shape[: x.ndim - len(op.in_shape)], dtype=x.dtype, seed=8,
                     device=x.device) if y is None else y.detach().clone()
    ug = u.requires_grad_(True)
    (op.adjoint(ug) * x).sum().backward()
    _close(ug.grad, op(x), rtol, "gradient of the adjoint vs the forward")
    if gradcheck:  # fast mode: finite differences along random directions (not every column)
        assert x.dtype == torch.float64, "gradcheck needs float64 inputs"
        for f, t in ((op, x), (op.adjoint, u)):
            assert torch.autograd.gradcheck(f, (t.detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-6,
                                            fast_mode=True)


def batching_test(op, x: torch.Tensor, rtol: float = 1e-10) -> None:
    """Leading batch dimensions are carried through (``(2, 3, *in_shape)`` -> ``(2, 3, *out_shape)``,
    and none at all) and every item is the operator applied to that item alone, for the
    forward and the adjoint. ``x`` gives the dtype and device."""
    xb = random_input(op, batch=(2, 3), dtype=x.dtype, seed=3, device=x.device)
    yb = op(xb)
    assert yb.shape == (2, 3) + tuple(op.out_shape), f"batched forward shape {tuple(yb.shape)}"
    for i in range(2):
        for j in range(3):
            _close(yb[i, j], op(xb[i, j][None])[0], rtol, f"batched forward item {(i, j)}")
    _close(op(xb[1, 2]), yb[1, 2], rtol, "unbatched forward")
    bb = op.adjoint(yb)
    assert bb.shape == xb.shape, f"batched adjoint shape {tuple(bb.shape)}"
    for i, j in ((0, 0), (1, 2)):
        _close(bb[i, j], op.adjoint(yb[i, j][None])[0], rtol, f"batched adjoint item {(i, j)}")
    _close(op.adjoint(yb[0, 1]), bb[0, 1], rtol, "unbatched adjoint")


def dtype_test(op, x: torch.Tensor, rtol: float = 1e-5) -> None:
    """float32 and float64 inputs give outputs of the same dtype that agree (to float32
    precision); integer inputs are refused with a clear error."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        y = op(xd)
        b = op.adjoint(y)
        assert y.dtype == dtype and b.dtype == dtype, (dtype, y.dtype, b.dtype)
        out[dtype] = (y, b)
    _close(out[torch.float32][0].double(), out[torch.float64][0], rtol, "float32 vs float64 forward")
    _close(out[torch.float32][1].double(), out[torch.float64][1], rtol, "float32 vs float64 adjoint")
    try:
        op(x.to(torch.int64))
    except TypeError as e:
        assert "floating-point" in str(e)
    else:
        raise AssertionError("an integer input was accepted")


def device_test(make_op: Callable[[torch.device], object], x: torch.Tensor, device, rtol: float = 1e-5) -> None:
    """The operator built on ``device`` gives the CPU operator's results (forward and adjoint)
    on tensors that stay on ``device``, and refuses tensors on another device."""
    cpu, dev = make_op(torch.device("cpu")), make_op(torch.device(device))
    xc = x.cpu()
    yc, yd = cpu(xc), dev(xc.to(device))
    assert yd.device.type == torch.device(device).type
    _close(yd.cpu(), yc, rtol, f"forward on {device} vs cpu")
    bc, bd = cpu.adjoint(yc), dev.adjoint(yc.to(device))
    assert bd.device.type == torch.device(device).type
    _close(bd.cpu(), bc, rtol, f"adjoint on {device} vs cpu")
    if torch.device(device).type != "cpu":
        try:
            dev(xc)
        except ValueError as e:
            assert "is on cpu" in str(e)
        else:
            raise AssertionError(f"an operator on {device} accepted a CPU tensor")
