"""Experiment configuration files (YAML), shared by the CLI, the notebooks and the tests.

An experiment file is a YAML mapping of *sections*::

    data:      # the simulation recipe -> fbsemlib.data.recipe.DataConfig
      scanner: small2d
      ...
    model:     # read by the model / training code
      ...
    train:
      ...

:func:`load_experiment` reads the file and returns the sections as a plain ``dict``; it
validates nothing inside them (every section belongs to the code that reads it), but a
section name outside :data:`SECTIONS` is an error with a "did you mean" hint (a misspelt
``Model:`` or ``trian:`` would otherwise leave the defaults in force). Each consumer turns its section into its own
dataclass with :func:`from_dict`, which

* rejects unknown keys with a message naming the key, the section and the closest
  allowed key (:func:`did_you_mean`),
* converts YAML values to the annotated field types (lists -> tuples, ``1e6`` written
  without a dot, which YAML reads as a string, -> float, nested dataclasses),
* rejects values of the wrong type (``num_subjects: "ten"``), and
* runs the dataclass's own ``__post_init__`` validation (ranges, consistency),
  re-raising its message prefixed with the section name.

:func:`to_dict` is the inverse (tuples -> lists), suitable for YAML / JSON.
:func:`diff` lists, readably, how two JSON-like values differ (a dataset against what
was expected, a checkpoint against the configuration now, ...).

Errors are :class:`ConfigError`, a ``ValueError`` that the CLI prints as
``error: ...`` with exit status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from fbsemlib.errors import UserError
from fbsemlib.provenance import is_number

__all__ = ["ConfigError", "override_sections", "SECTIONS", "LIMITS", "check_limit", "available_cores", "available_memory_bytes",
           "did_you_mean", "unknown_key_error", "load_experiment", "load_section", "from_dict", "to_dict", "diff"]


class ConfigError(UserError, ValueError):
    """A configuration file or section is invalid (printed by the CLI, exit status 2)."""


#: the sections of an experiment file and who reads them: ``data`` (the simulation recipe),
#: ``model`` and ``train`` (training), ``baselines`` (evaluation), ``memory`` (``fbsem memory``)
SECTIONS = ("data", "model", "train", "baselines", "memory")


#: upper bounds of sizes, counts and seeds: far above any experiment this library can run,
#: so that a typo (``num_workers: 1000000``) is refused before anything is allocated or
#: spawned; what fits *this* machine is checked against :func:`available_memory_bytes` and
#: :func:`available_cores` where the work starts
LIMITS = {"image_side": 4096, "num_subjects": 100_000, "per_subject": 10_000, "noise_realisations": 1_000,
          "num_modules": 10_000, "seed": 2**63 - 1, "num_workers": 256, "batch_size": 100_000,
          "epochs": 1_000_000}


def check_limit(where: str, value, limit: str) -> None:
    """:class:`ConfigError` when ``value`` exceeds ``LIMITS[limit]``."""
    if value > LIMITS[limit]:
        raise ConfigError(f"{where} = {value!r} is too large (at most {LIMITS[limit]:,})")


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def available_memory_bytes() -> int | None:
    """Memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``), or None
    where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``name`` (case-insensitively), or ``""``."""
    import difflib

    choices = [str(c) for c in choices]
    by_lower = {c.lower(): c for c in choices}
    if str(name).lower() in by_lower:
        return f" (did you mean {by_lower[str(name).lower()]!r}?)"
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def unknown_key_error(key, section: str, allowed) -> ConfigError:
    """The error for key ``key`` that section ``section`` does not have."""
    allowed = sorted(allowed)
    return ConfigError(f"unknown key {key!r} in section {section!r}{did_you_mean(key, allowed)} "
                       f"(allowed keys: {', '.join(allowed)})")


def load_experiment(path: str | os.PathLike) -> dict[str, Any]:
    """Read an experiment YAML file and return its sections ``{name: mapping}``.

    Every top-level value must be a mapping (or empty, which gives ``{}``) named in
    :data:`SECTIONS`; the sections are returned as they are."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.is_dir():
        raise ConfigError(f"config path {str(p)!r} is a directory, expected a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of sections (data:, model:, train:, ...), "
                          f"got {type(doc).__name__}")
    out: dict[str, Any] = {}
    for name, section in doc.items():
        if not isinstance(name, str):
            raise ConfigError(f"config file {str(p)!r}: section names must be strings, got {name!r}")
        if name not in SECTIONS:
            raise ConfigError(f"config file {str(p)!r}: unknown section {name!r}{did_you_mean(name, SECTIONS)} "
                              f"(sections: {', '.join(SECTIONS)})")
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"config file {str(p)!r}: section {name!r} must be a mapping, got "
                              f"{type(section).__name__}")
        out[name] = section
    return out


def override_sections(sections: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict:
    """A copy of an experiment's ``sections`` with the dotted-key ``overrides`` applied
    (``{"train.epochs": 3, "data.phantom.template_resolution": 2}``): the one override rule of
    ``fbsem plan --set``, the book's ``-p section.field`` and the tests' cut profiles."""
    out = copy.deepcopy(dict(sections))
    for key, value in (overrides or {}).items():
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override keys are 'section.field', got {key!r}")
        d = out
        for i, p in enumerate(parts[:-1]):
            if d.get(p) is None:
                d[p] = {}
            d = d[p]
            if not isinstance(d, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i + 1])!r} is {d!r}, not a section "
                                  "with fields")
        d[parts[-1]] = copy.deepcopy(value)
    return out


def load_section(path: str | os.PathLike, section: str, cls: type | None = None, required: bool = True):
    """Section ``section`` of experiment file ``path``; converted with :func:`from_dict`
    when ``cls`` is given. A missing section is an error when ``required``, else ``{}``
    (or ``cls()``)."""
    sections = load_experiment(path)
    if section not in sections:
        if required:
            raise ConfigError(f"config file {str(path)!r} has no {section!r} section "
                              f"(sections: {sorted(sections) or 'none'})")
        d: dict = {}
    else:
        d = sections[section]
    return from_dict(cls, d, section) if cls is not None else d


# ----------------------------------------------------------------------------------------
# dataclass <-> dict
# ----------------------------------------------------------------------------------------
_NONE = type(None)


def _type_name(tp) -> str:
    if tp is _NONE:
        return "null"
    if isinstance(tp, type):
        return {"int": "integer", "float": "number", "str": "string", "bool": "boolean",
                "dict": "mapping", "list": "list", "tuple": "list"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        inner = args[0] if args else Any
        return f"list of {_type_name(inner)}"
    if origin is dict:
        return "mapping"
    return str(tp)


class _Mismatch(Exception):
    pass


def _convert(value, tp, where: str):
    """Convert a YAML value to type ``tp`` or raise ``_Mismatch``."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        errors = []
        # try the non-None alternatives in order; exact type matches first
        alts = [a for a in args if a is not _NONE]
        for a in sorted(alts, key=lambda a: 0 if (isinstance(a, type) and type(value) is a) else 1):
            try:
                return _convert(value, a, where)
            except _Mismatch as e:
                errors.append(str(e))
        raise _Mismatch(f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if tp is _NONE:
        if value is None:
            return None
        raise _Mismatch(f"expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(f) and f == int(f):
                    return int(f)
        raise _Mismatch(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(f"expected a string, got {value!r}")
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected {_type_name(tp)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch(f"expected {_type_name(tp)}, got {len(value)} values {list(value)!r}")
            conv = [_convert(v, a, where) for v, a in zip(value, args)]
        else:
            inner = args[0] if args else Any
            conv = [_convert(v, inner, where) for v in value]
        return tuple(conv) if (origin is tuple or tp is tuple) else list(conv)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"expected a mapping, got {value!r}")
        if args:
            kt, vt = args
            return {_convert(k, kt, where): _convert(v, vt, where) for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Mismatch(f"expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(f"expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, d: Mapping[str, Any] | None, section_name: str):
    """Build dataclass ``cls`` from mapping ``d`` (a config section).

    Raises :class:`ConfigError` naming the key and ``section_name`` for an unknown key, a
    value of the wrong type, or a value the dataclass's own validation rejects.
    Missing keys take the dataclass defaults (a missing required field is an error)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if d is None:
        d = {}
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"section {section_name!r} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise unknown_key_error(unknown[0], section_name, fields)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolved forward references
        hints = {n: f.type for n, f in fields.items()}
    kwargs = {}
    for k, v in d.items():
        where = f"{section_name}.{k}"
        try:
            kwargs[k] = _convert(v, hints.get(k, Any), where)
        except _Mismatch as e:
            raise ConfigError(f"invalid value for key {k!r} in section {section_name!r}: {e}") from None
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key {missing[0]!r} in section {section_name!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid section {section_name!r}: {e}") from None


def to_dict(obj) -> Any:
    """Dataclass (or nested containers of them) -> plain dicts / lists / scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return obj.item()
    return obj


def diff(a: Any, b: Any, names: tuple[str, str] = ("a", "b"), prefix: str = "", sep: str = ", ",
         rel_tol: float = 0.0, abs_tol: float = 0.0) -> list[str]:
    """Human-readable differences between two JSON-like values (dicts, lists, scalars).

    One line per difference, ``"<dotted.key>: <names[0]> <a>{sep}<names[1]> <b>"``
    (``absent`` for a key that one side lacks; lists are compared, and reported, as a
    whole). ``prefix`` starts every key (``"value"`` is used for a difference at the top
    level without one). Numbers are equal within ``rel_tol`` / ``abs_tol``
    (:func:`math.isclose`; default: exactly) and NaN equals NaN. E.g.
    ``diff(saved, now, ("checkpoint", "now"), "train")`` gives
    ``["train.lr: checkpoint 0.005, now 0.001"]`` and ``diff(found, expected, ("dataset",
    "expected"), sep=" vs ")`` gives ``["crystals_per_side: dataset 6 vs expected 7"]``."""
    na, nb = names

    def line(p: str, x: str, y: str) -> str:
        return f"{p or 'value'}: {na} {x}{sep}{nb} {y}"

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for k in sorted(set(a) | set(b), key=str):
                p = f"{prefix}.{k}" if prefix else str(k)
                if k not in a:
                    out.append(line(p, "absent", repr(b[k])))
                elif k not in b:
                    out.append(line(p, repr(a[k]), "absent"))
                else:
                    out.extend(walk(a[k], b[k], p))
            return out
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) == len(b) and not any(walk(x, y, prefix) for x, y in zip(a, b)):
                return []
            return [line(prefix, repr(list(a)), repr(list(b)))]
        if is_number(a) and is_number(b):
            fa, fb = float(a), float(b)
            if math.isclose(fa, fb, rel_tol=rel_tol, abs_tol=abs_tol) or (math.isnan(fa) and math.isnan(fb)):
                return []
        elif a == b:
            return []
        return [line(prefix, repr(a), repr(b))]

    return walk(a, b, prefix)
