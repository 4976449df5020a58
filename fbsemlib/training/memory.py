"""Memory accounting: the peak memory of ONE training step of FBSEM-Net with K modules.

Three ways to train K unrolled modules (``mode``):

``"end-to-end"``
    forward through modules ``0..K-1`` with autograd, the iteration-dependent loss
    ``sum_k w_k L(x_k, t_k)`` on all K outputs (:func:`fbsemlib.models.fbsem.unrolled_loss`),
    backward. Everything every module saved for backward is held at the end of the
    forward pass: memory grows linearly with K.
``"checkpointed"``
    the same with per-module gradient checkpointing (``net.run(..., checkpoint=True)``):
    only module inputs and the loss terms are kept; each module is recomputed during
    the backward pass. Memory still grows with K, with a much smaller slope.
``"sequential"``
    module ``k = K-1`` trained alone (Corda-D'incan et al. 2022): its input ``x_k`` is
    the cached, detached output of the frozen modules ``0..k-1`` (computed here without
    gradients, then held on the host like a training cache), the loss is
    ``L(x_{k+1}, t_k)`` against its own target, backward. Its memory does not depend
    on K.

What is measured
----------------
* ``saved_tensor_bytes`` (any device): the peak, over the step, of the bytes held by
  autograd for the backward pass, measured exactly with
  :class:`torch.autograd.graph.saved_tensors_hooks`: every saved tensor is wrapped in a
  small holder whose destruction (when autograd frees the saved variable, i.e. while the
  backward pass runs) releases it; the live sum over *unique storages* (a tensor saved
  by several nodes, or several views of one buffer, count once) is updated at every
  pack / release and its maximum kept. Tensors that exist before the step (parameters,
  buffers, the projector's matrices, data, sensitivities: everything in the
  :class:`~fbsemlib.models.fbsem.UnrollContext`) and the step's batch tensors (counted in
  ``batch_bytes``) are not counted. **Gradient checkpointing**: inside a checkpointed
  module torch's own saved-tensor hooks take precedence over ours (the hooks do not
  nest), and they keep nothing during the forward pass; in the backward pass the module
  is recomputed and its saved tensors are stashed by torch until consumed. To count
  them, each module call is wrapped: when other hooks are on top of ours, our hooks are
  chained in front of them; a tensor for which those hooks return a tensor (i.e. keep
  it) is tracked with a weak reference to its storage until it is freed. The peak is
  thus the larger of (the inputs and loss terms of all K modules, at the end of the
  forward pass) and (the module inputs still held + one recomputed module, in the
  backward pass).
* ``peak_bytes``, the headline:
  on CUDA ``torch.cuda.max_memory_allocated() - baseline`` over the step, where the
  baseline (``baseline_bytes``) is what is allocated before the step (parameters,
  projector, the batch's sinograms and factors); the batch tensors (cached input and
  targets) are copied from the host *inside* the window, so they are counted; the
  gradients are allocated inside the window too (``grad`` is reset to ``None``).
  On CPU ``saved_tensor_bytes + batch_bytes`` (the cached input ``x_k`` and its target
  in sequential mode; the K targets in the other modes).
* ``rss_peak_bytes`` (CPU, optional, ``subprocess_rss=True``): a fresh Python process
  builds the same problem, runs one warm-up step (lazy initialisation), ``gc``,
  ``malloc_trim``, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``),
  records its RSS, runs the step and reports the high-water mark minus that RSS. The
  high-water mark is read as ``VmHWM``; ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  is the fallback where the reset is not possible (on Linux ``ru_maxrss`` of a forked +
  exec'd child starts at the parent's RSS at fork time, so with a large parent it hides
  the step). It includes everything (gradients, temporaries, allocator slack), so it is
  noisier than the hook count; the in-process RSS is not used because earlier work in
  the process pollutes it.

Not included anywhere: optimiser state (one step here is forward + backward, no
``optimizer.step``); the resident parameters (``param_bytes``, reported) except on
CUDA where ``baseline_bytes`` contains them; the sequential trainer's cache of the
inputs of *all* training samples (host or disk, like the data set: only the batch of the
step is counted).

K and the number of subsets
---------------------------
Module k uses subset ``k % num_subsets``. K need not be a multiple of ``num_subsets``:
the network is built with ``ceil(K / num_subsets)`` iterations and only modules
``0..K-1`` are run (a truncated last iteration), so any K >= 1 works with any number of
subsets.

The synthetic problem and its configuration
-------------------------------------------
:func:`memory_problem` needs no data set: a disc phantom with a hot spot (MR: a different
contrast of the same shape), random multiplicative factors ``1 + U(0, 1)``, a constant
background, Poisson data; targets are a synthetic sequence of images. Its settings
(:class:`MemorySpec`) come from, in increasing priority: the defaults; an experiment
YAML's ``data:`` section (``scanner`` / ``geometry`` / ``preset`` (a preset name, or
for ``geometry`` a mapping with ``preset``/``scanner``/``name``, ``num_rings``,
``max_ring_difference``), ``num_rings``, ``max_ring_difference``, ``image_shape``
(``[Z, Y, X]`` or ``[Y, X]``; ``Z > 1`` means 3D), ``voxel_size_mm``, ``grid`` (a
mapping with ``shape`` and ``voxel_size_mm``), ``image_size`` (an integer: square
in-plane), ``psf_fwhm_mm``, ``num_subsets``; the other keys of the simulation recipe are
ignored); its ``model:`` section
(every :class:`~fbsemlib.models.fbsem.ModelConfig` field: ``width``, ``depth``, ``shared``,
``use_mr``, ...; plus ``num_subsets``; other keys are ignored); its ``train:`` section
(``batch_size``); its ``memory:`` section (every :class:`MemorySpec` field, see there,
and the :class:`~fbsemlib.models.fbsem.ModelConfig` fields such as ``width`` / ``depth``;
unknown keys are an error); and the explicit keyword arguments. ``--dims`` (or
``dims=``) different from the config's dimensionality drops the config's grid and
scanner where they do not fit (a 2D grid or one-ring preset for ``3d``: the 3D defaults,
``small3d`` with 4 rings and a ``4 x 24 x 24`` image; a 3D grid for ``2d``: its in-plane
size, one ring of its scanner).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from fbsemlib.errors import UserError
from fbsemlib.models.fbsem import FBSEMNet, ModelConfig, UnrollContext, relative_mse, unrolled_loss
from fbsemlib.physics.geometry import SCANNER_PRESETS, ImageGrid, sinogram_preset
from fbsemlib.physics.projector import Projector

__all__ = [
    "MODES",
    "MemorySpec",
    "MemoryProblem",
    "MemoryReport",
    "SavedTensorTracker",
    "memory_problem",
    "measure_training_memory",
    "cmd_memory",
    "proc_kib",
    "available_bytes",
]

MODES = ("end-to-end", "checkpointed", "sequential")

_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


# ----------------------------------------------------------------------------------------
# the problem
# ----------------------------------------------------------------------------------------
@dataclass
class MemorySpec:
    """Settings of the synthetic problem (the ``memory:`` section of an experiment).

    ``dims``: ``"2d"`` or ``"3d"``. ``preset``: a scanner preset of
    :func:`fbsemlib.physics.geometry.sinogram_preset` (default ``tiny2d`` in 2D, ``small3d`` in
    3D). ``num_rings`` (2D: 1; 3D: the image's Z when ``image_shape`` is given, else the
    3D preset's ring count when a preset is given, else 4), ``max_ring_difference``
    (3D default 1). ``image_shape`` ``(Z, Y, X)`` (2D ``(1, 32, 32)``, 3D
    ``(num_rings, 24, 24)``); ``voxel_size_mm`` (default: z = ring spacing, in-plane =
    scanner radius / max(Y, X), i.e. the image spans the central half of the ring).
    ``batch_size`` (2), ``num_subsets`` (6), ``model`` (a :class:`ModelConfig` or its
    dict; default: the original architecture, width 32, depth 5, with an MR channel),
    ``seed``, ``projector_method`` (``auto`` | ``matrix`` | ``on-the-fly``),
    ``psf_fwhm_mm`` (projector PSF), ``subprocess_rss`` (whether ``fbsem memory``
    measures the RSS of a subprocess on CPU; default true) and ``threads`` (torch
    intra-op threads during a CPU measurement; default ``None``: 1 when one feature map
    of the batch, ``B x width x Z x Y x X`` floats, is below 4 MiB, where more threads
    only add overhead (and slow down badly on a busy CPU), else torch's setting; the
    memory does not depend on it)."""

    dims: str = "2d"
    preset: str | None = None
    num_rings: int | None = None
    max_ring_difference: int | None = None
    image_shape: tuple[int, int, int] | None = None
    voxel_size_mm: tuple[float, float, float] | None = None
    batch_size: int = 2
    num_subsets: int = 6
    model: dict = field(default_factory=dict)
    seed: int = 0
    projector_method: str = "auto"
    psf_fwhm_mm: float | None = None
    subprocess_rss: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dims not in ("2d", "3d"):
            raise ValueError(f"dims must be '2d' or '3d', got {self.dims!r}")
        if self.preset is not None and self.preset not in SCANNER_PRESETS:
            raise ValueError(f"unknown scanner preset {self.preset!r}; choose one of {sorted(SCANNER_PRESETS)}")
        for name in ("batch_size", "num_subsets"):
            _check_pos_int(name, getattr(self, name))
        if self.threads is not None:
            _check_pos_int("threads", self.threads)
        if self.num_rings is not None:
            _check_pos_int("num_rings", self.num_rings)
        if self.max_ring_difference is not None and (isinstance(self.max_ring_difference, bool)
                                                     or not isinstance(self.max_ring_difference, int)
                                                     or self.max_ring_difference < 0):
            raise ValueError(f"max_ring_difference must be a non-negative integer, got {self.max_ring_difference!r}")
        if self.image_shape is not None:
            shp = tuple(self.image_shape)
            if len(shp) == 2:
                shp = (1,) + shp
            if len(shp) != 3:
                raise ValueError(f"image_shape must be [Z, Y, X] or [Y, X], got {self.image_shape!r}")
            for n in shp:
                _check_pos_int("image_shape entries", n)
            if self.dims == "2d" and shp[0] != 1:
                raise ValueError(f"a 2d problem needs image_shape Z = 1, got {list(shp)}")
            self.image_shape = tuple(int(n) for n in shp)
        if self.voxel_size_mm is not None:
            v = tuple(float(a) for a in self.voxel_size_mm)
            if len(v) != 3 or not all(a > 0 for a in v):
                raise ValueError(f"voxel_size_mm must be three positive numbers (z, y, x), got {self.voxel_size_mm!r}")
            self.voxel_size_mm = v
        if self.psf_fwhm_mm is not None:
            if isinstance(self.psf_fwhm_mm, (list, tuple)):
                self.psf_fwhm_mm = tuple(float(v) for v in self.psf_fwhm_mm)
                ok = len(self.psf_fwhm_mm) == 3 and all(v >= 0 for v in self.psf_fwhm_mm)
            else:
                self.psf_fwhm_mm = float(self.psf_fwhm_mm)
                ok = self.psf_fwhm_mm >= 0
            if not ok:
                raise ValueError(f"psf_fwhm_mm must be a non-negative number or three of them, got {self.psf_fwhm_mm!r}")
        if self.projector_method not in ("auto", "matrix", "on-the-fly"):
            raise ValueError(f"projector_method must be 'auto', 'matrix' or 'on-the-fly', got {self.projector_method!r}")
        if isinstance(self.model, ModelConfig):
            self.model = self.model.to_dict()
        if not isinstance(self.model, Mapping):
            raise ValueError(f"model must be a mapping of ModelConfig fields, got {type(self.model).__name__}")
        unknown = [k for k in self.model if k not in _MODEL_FIELDS]
        if unknown:
            raise ValueError(f"unknown model key {unknown[0]!r} (allowed: {', '.join(_MODEL_FIELDS)})")
        self.model = dict(self.model)
        ModelConfig(**self.model)  # validate
        self.resolved()  # validate the geometry

    # -- resolved values ---------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def resolved(self) -> dict:
        """Preset, rings, ring difference, image shape and voxel size after defaults."""
        three_d = self.dims == "3d"
        preset = self.preset or ("small3d" if three_d else "tiny2d")
        preset_rings = SCANNER_PRESETS[preset]["scanner"]["num_rings"]
        if not three_d:
            rings = 1
        elif self.num_rings is not None:
            rings = self.num_rings
        elif self.image_shape is not None:
            rings = self.image_shape[0]
        elif self.preset is not None and preset_rings > 1:
            rings = preset_rings
        else:
            rings = 4
        if three_d and rings < 2:
            raise ValueError(f"a 3d problem needs at least 2 rings, got num_rings={rings}")
        mrd = self.max_ring_difference
        if three_d and mrd is None:
            mrd = 1 if self.preset is None else SCANNER_PRESETS[preset].get("max_ring_difference")
            if mrd is not None:
                mrd = min(mrd, rings - 1)
        if not three_d:
            mrd = None
        shape = self.image_shape or ((rings, 24, 24) if three_d else (1, 32, 32))
        if three_d and shape[0] < 2:
            raise ValueError(f"a 3d problem needs image_shape Z >= 2, got {list(shape)}")
        sc = SCANNER_PRESETS[preset]["scanner"]
        if self.voxel_size_mm is not None:
            vox = self.voxel_size_mm
        else:
            inplane = float(sc["radius_mm"]) / max(shape[1], shape[2])
            vox = (float(sc["ring_spacing_mm"]) * (rings / shape[0] if three_d else 0.5), inplane, inplane)
        return dict(preset=preset, num_rings=rings, max_ring_difference=mrd, image_shape=tuple(shape),
                    voxel_size_mm=tuple(vox))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("image_shape", "voxel_size_mm", "psf_fwhm_mm"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d


def _check_pos_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class MemoryProblem:
    """A synthetic batch: projector, images, factors and data (all on ``device``)."""

    spec: MemorySpec
    projector: Projector
    image: torch.Tensor  # (B, 1, Z, Y, X)
    mr: torch.Tensor
    multiplicative: torch.Tensor  # (B, 1, planes, views, radial)
    additive: torch.Tensor
    y: torch.Tensor
    device: torch.device

    @property
    def dims(self) -> str:
        return self.spec.dims

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.projector.grid.shape)

    @property
    def batch_size(self) -> int:
        return int(self.y.shape[0])

    def build_net(self, num_modules: int) -> FBSEMNet:
        """FBSEM-Net with ``ceil(K / num_subsets)`` iterations (modules ``0..K-1`` are used)."""
        _check_pos_int("num_modules", num_modules)
        M = self.spec.num_subsets
        torch.manual_seed(self.spec.seed + 1)
        return FBSEMNet(self.projector, math.ceil(num_modules / M), M, self.spec.model_config).to(self.device)

    def prepare(self, net: FBSEMNet) -> UnrollContext:
        return net.prepare(self.y, self.multiplicative, self.additive, self.mr if net.config.use_mr else None)

    def targets(self, modules, x0: torch.Tensor) -> torch.Tensor:
        """Synthetic iteration-dependent targets ``(B, len(modules), 1, Z, Y, X)`` on the
        host: ``t_k = x0 + (image - x0) * (1 - 0.8 ** (k + 1))`` (a converging sequence)."""
        img = self.image.detach().cpu()
        x0 = x0.detach().cpu()
        return torch.stack([x0 + (img - x0) * (1 - 0.8 ** (k + 1)) for k in modules], 1).contiguous()


def _disc_images(grid: ImageGrid, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A simple non-anatomical image: a disc (value 1) with a hot disc (3) and a cold disc
    (0.3); the MR image has the same outline with another contrast."""
    Z, Y, X = grid.shape
    yy = torch.linspace(-1, 1, Y).view(Y, 1)
    xx = torch.linspace(-1, 1, X).view(1, X)
    imgs, mrs = [], []
    for _ in range(batch):
        c = (torch.rand(4, generator=gen) - 0.5) * 0.2
        body = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2) <= 0.6**2
        hot = ((yy - 0.25 - c[2]) ** 2 + (xx + 0.2 - c[3]) ** 2) <= 0.15**2
        cold = ((yy + 0.25) ** 2 + (xx - 0.25) ** 2) <= 0.12**2
        img = body.float() + 2.0 * hot.float() - 0.7 * cold.float()
        mr = body.float() * 2.0 - 1.0 * hot.float() + 0.5 * cold.float()
        imgs.append(img.clamp_min(0).expand(Z, Y, X))
        mrs.append(mr.clamp_min(0).expand(Z, Y, X))
    return torch.stack(imgs)[:, None].contiguous(), torch.stack(mrs)[:, None].contiguous()


def memory_problem(
    config: str | os.PathLike | Mapping | MemorySpec | None = None,
    *,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> MemoryProblem:
    """Build the synthetic problem of a memory measurement.

    ``config``: an experiment YAML path, a dict of its sections (``{"memory": ...,
    "model": ..., "data": ...}``), a :class:`MemorySpec`, or None (defaults).
    ``overrides``: :class:`MemorySpec` fields (``dims``, ``preset``, ``image_shape``,
    ``batch_size``, ``num_subsets``, ...) and the shortcuts ``width`` / ``depth`` (and
    any other :class:`ModelConfig` field), which win over the config."""
    spec = resolve_spec(config, **overrides)
    return _build_problem(spec, torch.device(device))


def resolve_spec(config=None, **overrides: Any) -> MemorySpec:
    """The :class:`MemorySpec` of ``config`` (see :func:`memory_problem`) with ``overrides``."""
    if isinstance(config, MemorySpec):
        base = config.to_dict()
    else:
        base = _spec_dict_from_sections(_load_sections(config), overrides.get("dims"))
    model = dict(base.pop("model", {}) or {})
    for k in list(overrides):
        if k in _MODEL_FIELDS and k not in MemorySpec.__dataclass_fields__:
            v = overrides.pop(k)
            if v is not None:
                model[k] = v
    if isinstance(overrides.get("model"), (Mapping, ModelConfig)):
        m = overrides.pop("model")
        model.update(m.to_dict() if isinstance(m, ModelConfig) else dict(m))
    dims = overrides.pop("dims", None)
    if dims is not None:
        if dims != base.get("dims", "2d"):
            # switching 2d <-> 3d: geometry keys of the other dimensionality do not apply
            base = _adapt_dims(base, dims)
        base["dims"] = dims
    for k, v in overrides.items():
        if k not in MemorySpec.__dataclass_fields__:
            raise TypeError(f"unknown memory_problem option {k!r}")
        if v is not None:
            base[k] = v
    base["model"] = model
    try:
        return MemorySpec(**base)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid memory settings: {e}") from None


def _adapt_dims(base: dict, dims: str) -> dict:
    base = dict(base)
    shp = base.get("image_shape")
    if dims == "2d":
        if shp is not None:
            base["image_shape"] = (1,) + tuple(shp)[-2:]
        vox = base.get("voxel_size_mm")
        base["num_rings"] = None
        base["max_ring_difference"] = None
        if vox is not None:
            base["voxel_size_mm"] = tuple(vox)
    else:
        if shp is not None and tuple(shp)[0] == 1:
            base["image_shape"] = None  # a 2D grid: use the 3D default
            base["voxel_size_mm"] = None
        p = base.get("preset")
        if p is not None and SCANNER_PRESETS[p]["scanner"]["num_rings"] == 1:
            base["preset"] = None
    return base


def _load_sections(config) -> dict:
    """The sections of ``config``: a mapping as it is, or an experiment YAML file
    (:func:`fbsemlib.config.load_experiment`); ``None`` gives ``{}``."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    from fbsemlib.config import load_experiment

    return load_experiment(config)


def _as_int(v, where: str) -> int:
    if isinstance(v, bool):
        raise UserError(f"{where} must be an integer, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"{where} must be an integer, got {v!r}")
    return int(f)


def _spec_dict_from_sections(sections: Mapping, dims_override: str | None = None) -> dict:
    """Translate the ``data`` / ``model`` / ``train`` / ``memory`` sections into
    :class:`MemorySpec` keyword arguments (see the module docstring for the keys)."""
    out: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for name in ("data", "model", "train", "memory"):
        sec = sections.get(name)
        if sec is not None and not isinstance(sec, Mapping):
            raise UserError(f"section {name!r} must be a mapping, got {type(sec).__name__}")

    data = sections.get("data") or {}
    geo = data.get("geometry")
    preset = data.get("preset", data.get("scanner"))
    if isinstance(geo, str):
        preset = geo
    elif isinstance(geo, Mapping):
        preset = geo.get("preset", geo.get("scanner", geo.get("name", preset)))
        for k in ("num_rings", "max_ring_difference"):
            if geo.get(k) is not None:
                out[k] = _as_int(geo[k], f"data.geometry.{k}")
    if isinstance(preset, Mapping):  # e.g. scanner: {preset: mmr, num_rings: 8}
        for k in ("num_rings", "max_ring_difference"):
            if preset.get(k) is not None:
                out[k] = _as_int(preset[k], f"data.scanner.{k}")
        preset = preset.get("preset", preset.get("name"))
    if preset is not None:
        if not isinstance(preset, str) or preset not in SCANNER_PRESETS:
            raise UserError(f"data: unknown scanner preset {preset!r}; choose one of {sorted(SCANNER_PRESETS)}")
        out["preset"] = preset
    for k in ("num_rings", "max_ring_difference", "num_subsets"):
        if data.get(k) is not None:
            out[k] = _as_int(data[k], f"data.{k}")
    grid = data.get("grid")
    if isinstance(grid, Mapping):
        if grid.get("shape") is not None:
            out["image_shape"] = tuple(_as_int(n, "data.grid.shape") for n in grid["shape"])
        if grid.get("voxel_size_mm") is not None:
            out["voxel_size_mm"] = tuple(float(v) for v in grid["voxel_size_mm"])
    if data.get("voxel_size_mm") is not None:
        out["voxel_size_mm"] = tuple(data["voxel_size_mm"])
    if data.get("psf_fwhm_mm") is not None:
        out["psf_fwhm_mm"] = data["psf_fwhm_mm"]
    if data.get("image_shape") is not None:
        out["image_shape"] = tuple(_as_int(n, "data.image_shape") for n in data["image_shape"])
    elif data.get("image_size") is not None and "image_shape" not in out:
        s = data["image_size"]
        if isinstance(s, (list, tuple)):
            out["image_shape"] = tuple(_as_int(n, "data.image_size") for n in s)
        else:
            n = _as_int(s, "data.image_size")
            out["image_shape"] = (1, n, n)
    if "image_shape" in out and len(out["image_shape"]) == 2:
        out["image_shape"] = (1,) + tuple(out["image_shape"])

    msec = sections.get("model") or {}
    for k, v in msec.items():
        if k in _MODEL_FIELDS:
            model[k] = v
    if msec.get("num_subsets") is not None:
        out["num_subsets"] = _as_int(msec["num_subsets"], "model.num_subsets")
    tsec = sections.get("train") or {}
    if tsec.get("batch_size") is not None:
        out["batch_size"] = _as_int(tsec["batch_size"], "train.batch_size")

    # dimensionality implied by data: a grid with Z > 1 or a preset with several rings
    if "image_shape" in out:
        out["dims"] = "3d" if out["image_shape"][0] > 1 else "2d"
    elif "preset" in out:
        out["dims"] = "3d" if (SCANNER_PRESETS[out["preset"]]["scanner"]["num_rings"] > 1
                               and out.get("num_rings", 2) > 1) else "2d"
    data_dims = out.get("dims", "2d")

    mem = sections.get("memory") or {}
    fields_ = MemorySpec.__dataclass_fields__
    for k, v in mem.items():
        if k in ("width", "depth") or (k in _MODEL_FIELDS and k not in fields_):
            model[k] = v
        elif k == "model":
            if not isinstance(v, Mapping):
                raise UserError("memory.model must be a mapping")
            model.update(v)
        elif k in fields_:
            out[k] = v
        else:
            allowed = sorted(set(fields_) | {"width", "depth"} | set(_MODEL_FIELDS))
            raise UserError(f"unknown key {k!r} in section 'memory' (allowed keys: {', '.join(allowed)})")
    if "image_shape" in mem and mem["image_shape"] is not None and "dims" not in mem:
        shp = tuple(mem["image_shape"])
        out["dims"] = "3d" if len(shp) == 3 and shp[0] > 1 else "2d"
    if "dims" in out and isinstance(out["dims"], str):
        out["dims"] = out["dims"].lower()
    if out.get("dims", "2d") != data_dims and "image_shape" not in mem:
        out = _adapt_dims(out, out["dims"])
    # model values from YAML (1e-2 written without a dot is a string, ints as floats)
    for k, v in list(model.items()):
        ftype = ModelConfig.__dataclass_fields__[k].type if k in _MODEL_FIELDS else None
        if ftype in ("int", int) and not isinstance(v, bool):
            model[k] = _as_int(v, f"model.{k}")
        elif ftype in ("float", float) and isinstance(v, (str, int)) and not isinstance(v, bool):
            try:
                model[k] = float(v)
            except ValueError:
                raise UserError(f"model.{k} must be a number, got {v!r}") from None
    out["model"] = model
    if dims_override is not None and out.get("dims", "2d") != dims_override:
        out = _adapt_dims(out, dims_override)
    return out


def _build_problem(spec: MemorySpec, device: torch.device) -> MemoryProblem:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    r = spec.resolved()
    try:
        sino = sinogram_preset(r["preset"], num_rings=r["num_rings"], max_ring_difference=r["max_ring_difference"])
        grid = ImageGrid(r["image_shape"], r["voxel_size_mm"])
        P = Projector(sino, grid, backend="torch", device=device, method=spec.projector_method,
                      psf_fwhm_mm=spec.psf_fwhm_mm or None)
    except ValueError as e:
        raise UserError(f"invalid memory problem geometry: {e}") from None
    gen = torch.Generator().manual_seed(spec.seed)
    B = spec.batch_size
    img, mr = _disc_images(grid, B, gen)
    img, mr = img.to(device), mr.to(device)
    mult = (1.0 + torch.rand((B, 1) + tuple(P.out_shape), generator=gen)).to(device)
    with torch.no_grad():
        lin = P(img) * mult
        counts = 2e5 if spec.dims == "2d" else 2e6
        scale = counts / lin.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1, 1)
        img, lin = img * scale, lin * scale
        add = (0.2 * lin.flatten(1).mean(1)).view(-1, 1, 1, 1, 1).expand_as(lin).contiguous()
        ybar = lin + add
        y = torch.poisson(ybar.cpu(), generator=gen).to(device)
    return MemoryProblem(spec, P, img, mr, mult, add, y, device)


# ----------------------------------------------------------------------------------------
# saved-tensor accounting
# ----------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    """``(key, nbytes)`` of the storage behind ``t`` (None for tensors without one)."""
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
        for t in exclude:
            key, _, _ = _storage_key(t)
            if key is not None:
                self._exclude.add(key)
        self._held: dict = {}  # key -> [nbytes, count]
        self._foreign: dict = {}  # key -> (StorageWeakRef, nbytes), kept by other hooks
        self.live_bytes = 0
        self.peak_bytes = 0
        self.num_packed = 0
        self.num_foreign = 0

    # -- our hooks ---------------------------------------------------------------------
    def pack(self, t: torch.Tensor):
        key, nbytes, _ = _storage_key(t)
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
        key, nbytes, st = _storage_key(t)
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


# ----------------------------------------------------------------------------------------
# the measurement
# ----------------------------------------------------------------------------------------
@dataclass
class MemoryReport:
    """Peak memory of one training step (see the module docstring for the definitions)."""

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


def _normalise_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"invalid device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(dev)!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {str(dev)!r} is not supported (use cpu or cuda)")
    return dev


class _Setup:
    """Network, context and host batch of one measurement (everything before the step)."""

    def __init__(self, problem: MemoryProblem, K: int, mode: str):
        self.problem = problem
        self.K = K
        self.mode = mode
        self.net = problem.build_net(K)
        self.net.train()
        self.ctx = problem.prepare(self.net)
        self.k = K - 1 if mode == "sequential" else None
        if mode == "sequential":
            # the cache: output of the frozen modules 0..k-1, computed without gradients, on the host
            with torch.no_grad():
                self.net.eval()
                x = self.net.run(self.ctx, modules=range(self.k)) if self.k > 0 else self.ctx.x0
                self.net.train()
            self.host = {"x": x.detach().cpu().clone(), "target": problem.targets([self.k], self.ctx.x0)[:, 0]}
            del x
        else:
            self.host = {"targets": problem.targets(range(K), self.ctx.x0)}
        self.batch_bytes = sum(t.numel() * t.element_size() for t in self.host.values())
        self.net.zero_grad(set_to_none=True)

    def step(self, tracker: SavedTensorTracker | None) -> dict:
        """One training step: load the batch onto the device, forward, loss, backward."""
        net, ctx, dev = self.net, self.ctx, self.problem.device
        batch = {k: v.to(dev, copy=True) for k, v in self.host.items()}
        if tracker is not None:
            tracker._exclude.update(k for k, _, _ in map(_storage_key, batch.values()) if k is not None)
        hooks = tracker.hooks() if tracker is not None else _null()
        if tracker is not None:
            net.step = tracker.wrap(FBSEMNet.step.__get__(net))
        try:
            with hooks:
                if self.mode == "sequential":
                    out = net.step(self.k, batch["x"], ctx)
                    loss = relative_mse(out, batch["target"])
                    del out
                else:
                    outs = net.run(ctx, return_all=True, checkpoint=self.mode == "checkpointed",
                                   modules=range(self.K))
                    loss = unrolled_loss(outs, batch["targets"])
                    del outs
                loss.backward()
                loss_value = float(loss.detach())
                del loss
        finally:
            if tracker is not None:
                del net.step
        del batch
        return {"loss": loss_value}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


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
    dev = _normalise_device(device)
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
    setup = _Setup(problem, K, mode)
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
            rss, note = _subprocess_rss(spec, K, mode)
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


# ----------------------------------------------------------------------------------------
# RSS of a fresh process
# ----------------------------------------------------------------------------------------
def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proc_kib(path: str, field: str) -> int | None:
    """The ``field:`` line of a ``/proc`` file of ``key: value kB`` lines
    (``/proc/meminfo``, ``/proc/self/status``) in bytes, or None where the file or the
    field is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _vm_hwm() -> int | None:
    """This process's RSS high-water mark (``VmHWM``), or None where /proc lacks it."""
    return proc_kib("/proc/self/status", "VmHWM")


def available_bytes() -> int | None:
    """Memory available for new allocations (``MemAvailable``), or None where /proc lacks it."""
    return proc_kib("/proc/meminfo", "MemAvailable")


def _child_main() -> None:  # pragma: no cover - runs in the subprocess
    """Entry point of the RSS subprocess: read ``{"spec", "K", "mode", "threads"}`` JSON
    from stdin, run one step, print ``{"rss_peak_bytes", "rss_before", ...}`` JSON.

    ``ru_maxrss`` of a process started by fork + exec starts at the parent's RSS at the
    time of the fork on Linux (exec keeps the larger of the two), so a large parent would
    swamp a small step. The kernel's per-process high-water mark is therefore reset
    (``/proc/self/clear_refs``) before the step and read back as ``VmHWM``; the
    ``ru_maxrss`` difference is used only where that is not possible."""
    req = json.loads(sys.stdin.read())
    torch.set_num_threads(int(req.get("threads", 1)))
    spec = MemorySpec(**req["spec"])
    problem = _build_problem(spec, torch.device("cpu"))
    setup = _Setup(problem, int(req["K"]), req["mode"])
    setup.step(None)  # warm-up: lazy initialisation (kernels, thread pools) is not the step's memory
    setup.net.zero_grad(set_to_none=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    rss0 = _current_rss()
    hwm0 = _vm_hwm()
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    setup.step(None)
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm1 = _vm_hwm()
    if reset and hwm1 is not None:
        peak, source = max(0, hwm1 - rss0), "VmHWM"
    else:
        peak, source = max(0, max1 - rss0), "ru_maxrss"
    print(json.dumps({"rss_peak_bytes": peak, "source": source, "rss_before": rss0, "vmhwm_before": hwm0,
                      "vmhwm_after": hwm1, "maxrss_before": max0, "maxrss_after": max1, "hwm_reset": reset}))


def _subprocess_rss(spec: MemorySpec, K: int, mode: str) -> tuple[int | None, str | None]:
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    req = json.dumps({"spec": spec.to_dict(), "K": K, "mode": mode, "threads": torch.get_num_threads()})
    cmd = [sys.executable, "-c", "from fbsemlib.training.memory import _child_main; _child_main()"]
    try:
        res = subprocess.run(cmd, input=req, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"rss subprocess failed: {e}"
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] or ["?"]
        return None, f"rss subprocess failed (exit {res.returncode}): {tail[0]}"
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, "rss subprocess printed no result"
    note = None
    if out.get("source") != "VmHWM" and out["maxrss_after"] <= out["maxrss_before"]:
        note = "the RSS high-water mark could not be reset and the step did not raise it: value is a lower bound"
    return int(out["rss_peak_bytes"]), note


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def cmd_memory(args) -> int:
    """``fbsem memory --config FILE --modules K --mode MODE [--device D] [--dims 2d|3d]``:
    print the :class:`MemoryReport` as JSON. The device defaults to ``cuda`` when
    available, else ``cpu``; on CPU the RSS of a subprocess is measured unless the
    config's ``memory.subprocess_rss`` is false."""
    K = getattr(args, "modules", None)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise UserError(f"--modules must be an integer >= 1, got {K!r}")
    mode = getattr(args, "mode", None)
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    config = getattr(args, "config", None)
    if config is None:
        raise UserError("--config is required")
    p = Path(config)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist" if not p.exists()
                        else f"config path {str(p)!r} is not a file")
    dims = getattr(args, "dims", None)
    if dims is not None and dims not in ("2d", "3d"):
        raise UserError(f"--dims must be 2d or 3d, got {dims!r}")
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = _normalise_device(device)
    spec = resolve_spec(p, dims=dims)
    report = measure_training_memory(spec, K, mode, device=dev,
                                     subprocess_rss=spec.subprocess_rss and dev.type == "cpu")
    print(json.dumps(report.to_dict(), indent=2))
    return 0
