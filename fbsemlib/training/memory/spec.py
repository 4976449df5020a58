"""Settings of the synthetic memory problem (:class:`MemorySpec`) and where they come from.

In increasing priority: the defaults; an experiment's ``data:`` section, read as the
simulation recipe (:class:`~fbsemlib.data.DataConfig`: its scanner, rings, ring
difference, image grid, PSF and number of subsets; the other recipe fields do not matter
here); its ``model:`` section (the :class:`~fbsemlib.models.fbsem.ModelConfig` fields and
``num_subsets``, via :func:`fbsemlib.training.config.parse_model_section`); its ``train:``
section (``batch_size``); its ``memory:`` section (every :class:`MemorySpec` field, and the
:class:`ModelConfig` fields such as ``width`` / ``depth``; unknown keys are an error); and
explicit keyword arguments. A ``dims`` different from the config's dimensionality drops
the config's grid and scanner where they do not fit (a 2D grid or one-ring preset for
``3d``: the 3D defaults, ``small3d`` with 4 rings and a ``4 x 24 x 24`` image; a 3D grid
for ``2d``: its in-plane size, one ring of its scanner).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from fbsemlib.config import from_dict, load_experiment
from fbsemlib.data import DataConfig
from fbsemlib.errors import UserError
from fbsemlib.models.fbsem import ModelConfig
from fbsemlib.physics.geometry import SCANNER_PRESETS
from fbsemlib.provenance import is_int
from fbsemlib.training.config import TrainConfig, parse_model_section

__all__ = ["MemorySpec", "resolve_spec", "MODEL_FIELDS"]

#: the :class:`ModelConfig` fields (keys of ``MemorySpec.model``)
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def check_positive_int(name: str, v) -> None:
    if not is_int(v) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


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
            check_positive_int(name, getattr(self, name))
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        if self.num_rings is not None:
            check_positive_int("num_rings", self.num_rings)
        if self.max_ring_difference is not None and (not is_int(self.max_ring_difference)
                                                     or self.max_ring_difference < 0):
            raise ValueError(f"max_ring_difference must be a non-negative integer, got {self.max_ring_difference!r}")
        if self.image_shape is not None:
            shp = tuple(self.image_shape)
            if len(shp) == 2:
                shp = (1,) + shp
            if len(shp) != 3:
                raise ValueError(f"image_shape must be [Z, Y, X] or [Y, X], got {self.image_shape!r}")
            for n in shp:
                check_positive_int("image_shape entries", n)
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
        unknown = [k for k in self.model if k not in MODEL_FIELDS]
        if unknown:
            raise ValueError(f"unknown model key {unknown[0]!r} (allowed: {', '.join(MODEL_FIELDS)})")
        self.model = dict(self.model)
        ModelConfig(**self.model)  # validate
        self.resolved()  # validate the geometry

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


def resolve_spec(config=None, **overrides: Any) -> MemorySpec:
    """The :class:`MemorySpec` of ``config`` (an experiment YAML path, a dict of its
    sections, a :class:`MemorySpec` or None) with ``overrides`` (:class:`MemorySpec` fields
    and :class:`ModelConfig` fields such as ``width``)."""
    if isinstance(config, MemorySpec):
        base = config.to_dict()
    else:
        base = _spec_from_sections(_load_sections(config), overrides.get("dims"))
    model = dict(base.pop("model", {}) or {})
    for k in list(overrides):
        if k in MODEL_FIELDS and k not in MemorySpec.__dataclass_fields__:
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
    return load_experiment(config)


def _from_recipe(data: Mapping) -> dict:
    """:class:`MemorySpec` fields of a ``data:`` section (a :class:`DataConfig`)."""
    recipe = from_dict(DataConfig, data, "data")
    out: dict[str, Any] = {"preset": recipe.scanner, "image_shape": tuple(recipe.image_shape),
                           "voxel_size_mm": tuple(recipe.voxel_size_mm), "num_subsets": recipe.num_subsets,
                           "dims": "3d" if recipe.image_shape[0] > 1 else "2d"}
    if out["dims"] == "3d":  # the recipe's rings and ring difference (2D: one ring)
        geometry = recipe.geometry()
        out["num_rings"] = geometry.scanner.num_rings
        out["max_ring_difference"] = geometry.max_ring_difference
    if recipe.psf_fwhm_mm is not None:
        out["psf_fwhm_mm"] = recipe.psf_fwhm_mm
    return out


def _spec_from_sections(sections: Mapping, dims_override: str | None = None) -> dict:
    """Translate the ``data`` / ``model`` / ``train`` / ``memory`` sections into
    :class:`MemorySpec` keyword arguments (see the module docstring)."""
    for name in ("data", "model", "train", "memory"):
        sec = sections.get(name)
        if sec is not None and not isinstance(sec, Mapping):
            raise UserError(f"section {name!r} must be a mapping, got {type(sec).__name__}")
    out: dict[str, Any] = _from_recipe(sections["data"]) if sections.get("data") else {}
    data_dims = out.get("dims", "2d")

    msec = sections.get("model") or {}
    model_cfg, _, num_subsets = parse_model_section(msec)
    model = {k: getattr(model_cfg, k) for k in msec if k in MODEL_FIELDS}
    if num_subsets is not None:
        out["num_subsets"] = num_subsets
    tsec = sections.get("train") or {}
    if tsec.get("batch_size") is not None:
        out["batch_size"] = from_dict(TrainConfig, {"batch_size": tsec["batch_size"]}, "train").batch_size

    mem = sections.get("memory") or {}
    fields_ = MemorySpec.__dataclass_fields__
    for k, v in mem.items():
        if k in ("width", "depth") or (k in MODEL_FIELDS and k not in fields_):
            model[k] = v
        elif k == "model":
            if not isinstance(v, Mapping):
                raise UserError("memory.model must be a mapping")
            model.update(v)
        elif k in fields_:
            out[k] = v
        else:
            allowed = sorted(set(fields_) | {"width", "depth"} | set(MODEL_FIELDS))
            raise UserError(f"unknown key {k!r} in section 'memory' (allowed keys: {', '.join(allowed)})")
    if "image_shape" in mem and mem["image_shape"] is not None and "dims" not in mem:
        shp = tuple(mem["image_shape"])
        out["dims"] = "3d" if len(shp) == 3 and shp[0] > 1 else "2d"
    if "dims" in out and isinstance(out["dims"], str):
        out["dims"] = out["dims"].lower()
    if out.get("dims", "2d") != data_dims and "image_shape" not in mem:
        out = _adapt_dims(out, out["dims"])
    # the model keys of the memory section, converted as in the model section (YAML reads
    # 1e-2 without a dot as a string)
    out["model"] = {k: getattr(from_dict(ModelConfig, {k: v}, "memory"), k) for k, v in model.items()}
    if dims_override is not None and out.get("dims", "2d") != dims_override:
        out = _adapt_dims(out, dims_override)
    return out
