"""Profile overrides: the scientific knobs of an experiment file, turned from the command line.

A chapter's own parameters (``-p seeds "[0, 1]"``) are display choices; the experiment itself
(counts, the unrolled schedule K, network width, epochs, subsets, lesion contrast) is the
profile's YAML (``data/<profile>.yaml``). A parameter whose name is dotted, ``section.field``
(or ``section.sub.field``, e.g. ``data.phantom.lesion_contrast``), overrides that field of the
profile for every chapter that runs::

    fbsem book run 7 -p data.counts_range "[1e5, 1e6]" -p model.width 32

The overrides are

* checked before anything runs (:func:`validate_overrides`): the profile with them applied
  must parse into the configuration dataclasses, so a misspelt section or key is a
  :class:`~fbsemlib.errors.UserError` with a "did you mean" hint, and a value of the wrong
  type or range is refused the same way;
* passed to the chapters in one place, the environment variable :data:`OVERRIDES_ENV` (JSON),
  which :func:`fbsembook.experiments.load_profile` applies on every call, under the
  chapter's own overrides (a named run's ``model.shared`` stays what the run is about). So
  every cache key (a hash of the configuration a result depends on) changes only for what
  depends on an override: ``train.epochs`` retrains but reuses the dataset;
  ``data.counts_range`` simulates a new one;
* listed in each chapter's parameters table (:class:`fbsembook.profiles.BookParams`, source
  "override") and in the executed notebook's metadata.

Setting ``FBSEM_OVERRIDES='{"train.epochs": 3}'`` in the environment does the same for a
chapter opened in Jupyter.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from fbsemlib.config import SECTIONS, did_you_mean, override_sections
from fbsemlib.errors import UserError

__all__ = ["OVERRIDES_ENV", "is_override", "split_overrides", "active_overrides", "apply_overrides",
           "validate_overrides"]

#: the environment variable that carries the overrides (a JSON object) to the chapter kernels
OVERRIDES_ENV = "FBSEM_OVERRIDES"


def is_override(name: str) -> bool:
    """Whether a ``-p`` name is a profile override (dotted) rather than a chapter parameter."""
    return "." in str(name)


def split_overrides(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(chapter parameters, profile overrides)`` of ``-p`` values (overrides: dotted names)."""
    params = {k: v for k, v in parameters.items() if not is_override(k)}
    overrides = {k: v for k, v in parameters.items() if is_override(k)}
    return params, overrides


def active_overrides() -> dict[str, Any]:
    """The overrides in :data:`OVERRIDES_ENV` (``{}`` when unset or empty)."""
    text = os.environ.get(OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"${OVERRIDES_ENV} is not valid JSON ({e.msg}); expected an object like "
                        '{"train.epochs": 3}') from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_override(k) for k in value):
        raise UserError(f"${OVERRIDES_ENV} must be a JSON object of dotted keys ('section.field'), got {text!r}")
    return value


def apply_overrides(sections: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
    """A copy of experiment ``sections`` with the dotted-key ``overrides`` applied
    (:func:`fbsemlib.config.override_sections`, the library's one override rule)."""
    return override_sections(sections, overrides)


def _validators() -> dict[str, Callable[[dict], Any]]:
    """Section name -> the function that parses it (raising a UserError when it is invalid)."""
    from fbsemlib.config import from_dict
    from fbsemlib.data import DataConfig
    from fbsemlib.evaluation import BaselineConfig
    from fbsemlib.training import TrainConfig, parse_model_section
    from fbsemlib.training.memory import resolve_spec

    return {
        "data": lambda s: from_dict(DataConfig, s.get("data") or {}, "data"),
        "model": lambda s: parse_model_section(s.get("model")),
        "train": lambda s: from_dict(TrainConfig, s.get("train") or {}, "train"),
        "baselines": lambda s: from_dict(BaselineConfig, s.get("baselines") or {}, "baselines"),
        "memory": lambda s: resolve_spec({k: s[k] for k in ("data", "model", "train", "memory") if k in s}),
    }


def validate_overrides(sections: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``overrides`` against a profile's ``sections``: every key names a section of
    :data:`fbsemlib.config.SECTIONS` and a field of its configuration dataclass, and the
    profile with the overrides applied parses. Returns the overrides; raises
    :class:`~fbsemlib.errors.UserError` naming the override at fault."""
    overrides = dict(overrides)
    validators = _validators()
    for key, value in overrides.items():
        section = str(key).split(".")[0]
        if section not in SECTIONS:
            raise UserError(f"-p {key}: unknown profile section {section!r}{did_you_mean(section, SECTIONS)} "
                            f"(sections: {', '.join(SECTIONS)}); a dotted name overrides 'section.field' of the "
                            "profile")
        try:
            validators[section](apply_overrides(sections, {key: value}))
        except (UserError, ValueError, TypeError) as e:
            raise UserError(f"-p {key} {json.dumps(value, default=str)}: {e}") from None
    merged = apply_overrides(sections, overrides)
    for section in sorted({str(k).split(".")[0] for k in overrides}):
        try:
            validators[section](merged)
        except (UserError, ValueError, TypeError) as e:
            raise UserError(f"the overrides of section {section!r} together: {e}") from None
    return overrides
