"""Peak memory of ONE training step of FBSEM-Net with K modules
(:func:`measure_training_memory`, :class:`MemoryReport`).

What is measured:

* ``saved_tensor_bytes`` (any device): the peak, over the step, of the bytes held by
  autograd for the backward pass (:class:`~fbsemlib.training.memory.tracker.SavedTensorTracker`).
  Tensors that exist before the step (parameters, buffers, the projector's matrices, data,
  sensitivities: everything in the :class:`~fbsemlib.models.fbsem.UnrollContext`) and the
  step's batch tensors (counted in ``batch_bytes``) are not counted. With gradient
  checkpointing the peak is the larger of (the inputs and loss terms of all K modules, at
  the end of the forward pass) and (the module inputs still held + one recomputed module,
  in the backward pass).
* ``peak_bytes``, the headline: on CUDA ``torch.cuda.max_memory_allocated() - baseline``
  over the step, where the baseline (``baseline_bytes``) is what is allocated before the
  step (parameters, projector, the batch's sinograms and factors); the batch tensors
  (cached input and targets) are copied from the host *inside* the window, so they are
  counted, and so are the gradients (``grad`` is reset to ``None``). On CPU
  ``saved_tensor_bytes + batch_bytes``.
* ``rss_peak_bytes`` (CPU, optional): the RSS of the step in a fresh process
  (:mod:`fbsemlib.training.memory.child`).

Not included anywhere: optimiser state; the resident parameters (``param_bytes``,
reported) except on CUDA where ``baseline_bytes`` contains them; the sequential trainer's
cache of the inputs of *all* training samples (host or disk, like the data set: only the
batch of the step is counted).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fbsemlib.errors import UserError
from fbsemlib.training.device import resolve_device
from fbsemlib.training.memory.child import fresh_process_rss
from fbsemlib.training.memory.problem import MemoryProblem, memory_problem
from fbsemlib.training.memory.spec import MemorySpec
from fbsemlib.training.memory.step import MODES, StepSetup
from fbsemlib.training.memory.tracker import SavedTensorTracker

__all__ = ["MemoryReport", "measure_training_memory", "memory_device"]


@dataclass
class MemoryReport:
    """Peak memory of one training step (the module docstring defines the fields)."""

    mode: str
    modules: int
    dims: str
    device: str
    peak_bytes: int
    saved_tensor_bytes: int
    batch_bytes: int
    rss_peak_bytes: int | None
    image_shape: tuple[int, int, int]
    batch_size: int
    width: int
    depth: int
    num_subsets: int
    time_s: float
    module_index: int | None = None  # the module trained (sequential)
    param_bytes: int = 0  # all K modules' parameters (resident)
    grad_bytes: int = 0  # gradients produced by the step
    baseline_bytes: int | None = None  # CUDA: allocated before the step
    peak_total_bytes: int | None = None  # CUDA: max_memory_allocated
    method: str = ""
    preset: str = ""
    sinogram_shape: tuple[int, int, int] | None = None
    num_packed: int = 0
    rss_note: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("image_shape", "sinogram_shape"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def _tensors_of(obj, out: list) -> list:
    """All tensors reachable through lists / tuples / dicts / dataclasses / objects with
    tensor attributes (for the exclusion set: the unroll context, forward models, projector)."""
    seen = set()

    def visit(o, depth):
        if depth > 12 or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            for v in o:
                visit(v, depth + 1)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v, depth + 1)
        elif isinstance(o, torch.nn.Module):
            out.extend(o.parameters())
            out.extend(o.buffers())
            visit(o.__dict__, depth + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            visit(vars(o), depth + 1)

    visit(obj, 0)
    return out


def memory_device(device) -> torch.device:
    """The device of a measurement (:func:`~fbsemlib.training.device.resolve_device`; only
    ``cpu`` and ``cuda`` are supported)."""
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {str(dev)!r} is not supported (use cpu or cuda)")
    return dev


def measure_training_memory(
    problem_or_config: MemoryProblem | MemorySpec | Mapping | str | os.PathLike | None = None,
    num_modules: int = 1,
    mode: str = "end-to-end",
    device: str | torch.device = "cpu",
    subprocess_rss: bool = False,
    **overrides: Any,
) -> MemoryReport:
    """Peak memory of one training step of FBSEM-Net with ``num_modules`` = K modules.

    ``problem_or_config``: a :class:`MemoryProblem` (used as is when on ``device``), or
    anything :func:`memory_problem` accepts (with ``overrides``). ``mode``:
    ``"end-to-end"`` | ``"checkpointed"`` | ``"sequential"``. ``subprocess_rss`` (CPU):
    also measure the peak RSS of the step in a fresh process (about 2 s more)."""
    if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 1:
        raise UserError(f"the number of modules K must be an integer >= 1, got {num_modules!r}")
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    dev = memory_device(device)
    if isinstance(problem_or_config, MemoryProblem) and not overrides and problem_or_config.device == dev:
        problem = problem_or_config
    else:
        spec = problem_or_config.spec if isinstance(problem_or_config, MemoryProblem) else problem_or_config
        problem = memory_problem(spec, device=dev, **overrides)
    spec = problem.spec
    K = num_modules
    threads0 = torch.get_num_threads()
    threads = spec.threads
    if threads is None and dev.type == "cpu":
        fmap = problem.batch_size * spec.model_config.width * math.prod(problem.image_shape) * 4
        threads = 1 if fmap < (4 << 20) else None
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(problem, spec, K, mode, dev, subprocess_rss)
    finally:
        torch.set_num_threads(threads0)


def _measure(problem: MemoryProblem, spec: MemorySpec, K: int, mode: str, dev: torch.device,
             subprocess_rss: bool) -> MemoryReport:
    setup = StepSetup(problem, K, mode)
    resident = _tensors_of([setup.net, setup.ctx, problem], [])
    tracker = SavedTensorTracker(exclude=resident)
    param_bytes = sum(p.numel() * p.element_size() for p in setup.net.parameters())

    baseline = peak_total = None
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    setup.step(tracker)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak_total = torch.cuda.max_memory_allocated(dev)
    elapsed = time.perf_counter() - t0
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in setup.net.parameters() if p.grad is not None)
    if tracker.live_bytes != 0:  # pragma: no cover - would mean a leak in the accounting
        warnings.warn(f"saved-tensor accounting: {tracker.live_bytes} bytes still held after backward")

    saved = int(tracker.peak_bytes)
    if dev.type == "cuda":
        peak = int(peak_total - baseline)
        method = "cuda max_memory_allocated - baseline"
    else:
        peak = saved + int(setup.batch_bytes)
        method = "saved-tensor hooks + batch"
    rss = note = None
    if subprocess_rss:
        if dev.type != "cpu":
            note = "rss is only measured on cpu"
        else:
            rss, note = fresh_process_rss(spec, K, mode)
    cfg = spec.model_config
    return MemoryReport(
        mode=mode, modules=K, dims=spec.dims, device=str(dev), peak_bytes=peak, saved_tensor_bytes=saved,
        batch_bytes=int(setup.batch_bytes), rss_peak_bytes=rss, image_shape=tuple(problem.image_shape),
        batch_size=problem.batch_size, width=cfg.width, depth=cfg.depth, num_subsets=spec.num_subsets,
        time_s=round(elapsed, 4), module_index=setup.k, param_bytes=int(param_bytes), grad_bytes=int(grad_bytes),
        baseline_bytes=None if baseline is None else int(baseline),
        peak_total_bytes=None if peak_total is None else int(peak_total), method=method,
        preset=spec.resolved()["preset"], sinogram_shape=tuple(problem.projector.out_shape),
        num_packed=tracker.num_packed + tracker.num_foreign, rss_note=note,
    )
