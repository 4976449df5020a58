"""Book profiles and chapter parameters: where the book and its cache are, which profile
runs (``smoke`` | ``cpu`` | ``paper``), and how a chapter resolves its parameters.

Parameters-cell convention (every chapter)
------------------------------------------
A setup cell imports what the chapter needs (``import os`` included). The next cell is
tagged ``parameters``; its first line reads the profile from the environment and every
other parameter defaults to ``None`` ("take the profile's value")::

    profile = os.environ.get("FBSEM_PROFILE", "cpu")  # smoke | cpu | paper
    image_size = None  # pixels per side
    device = None      # "cpu" | "cuda" | None (auto)

The cell after it resolves the values with :func:`profile_params` (papermill injects its
``injected-parameters`` cell between the two, so overrides win)::

    p = profile_params({"image_size": {"smoke": 48, "cpu": 128, "paper": 172},
                        "device": "auto"}, profile, globals())
    p   # displays a table of the values and where each came from

Expensive results (datasets, trained models) go under :func:`cache_dir`.

A profile is a shipped name or the path of one's own experiment YAML
(:func:`resolve_profile`; its chapter defaults are those of :func:`base_profile`). The
profile's own fields are overridden with dotted names, ``-p section.field VALUE``
(:mod:`fbsembook.overrides`); the table of :func:`profile_params` lists those overrides too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from fbsemlib.errors import UserError

__all__ = [
    "PROFILES",
    "DEFAULT_PROFILE",
    "PROFILE_ENV",
    "CACHE_ENV",
    "ROOT_ENV",
    "BookParams",
    "book_root",
    "cache_dir",
    "resolve_profile",
    "base_profile",
    "profile_params",
    "pick_device",
]

PROFILES: tuple[str, ...] = ("smoke", "cpu", "paper")
DEFAULT_PROFILE = "cpu"
PROFILE_ENV = "FBSEM_PROFILE"
CACHE_ENV = "FBSEM_CACHE"
ROOT_ENV = "FBSEM_BOOK_ROOT"

_PROFILE_HELP = {
    "smoke": "CI: tiny sizes, seconds per notebook",
    "cpu": "default: a 2-core laptop, minutes per notebook",
    "paper": "the paper's sizes, needs a GPU",
}


# ----------------------------------------------------------------------------------------
# locations
# ----------------------------------------------------------------------------------------
def book_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root holding ``_toc.yml`` and ``_config.yml``: ``$FBSEM_BOOK_ROOT``,
    else the first such folder from ``start`` (default: the current directory) upwards,
    else the folder above the ``fbsembook`` package (editable install)."""
    env = os.environ.get(ROOT_ENV)
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    here = Path(start or os.getcwd()).resolve()
    candidates += [here, *here.parents]
    candidates.append(Path(__file__).resolve().parents[1])
    for c in candidates:
        if (c / "_toc.yml").is_file() and (c / "_config.yml").is_file():
            return c
    raise UserError(
        "cannot find the book (a folder with _toc.yml and _config.yml) from "
        f"{here}; run from the repository or set {ROOT_ENV}"
    )


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Where expensive book results (datasets, trained models) are kept:
    ``$FBSEM_CACHE`` if set, else ``<repo>/.cache/fbsem`` (``~/.cache/fbsem`` outside a
    repository); ``parts`` name a sub-folder. Created unless ``create=False``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        base = Path(env).expanduser()
    else:
        try:
            base = book_root() / ".cache" / "fbsem"
        except Exception:
            base = Path.home() / ".cache" / "fbsem"
    path = base.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------
# profiles and chapter parameters
# ----------------------------------------------------------------------------------------
def resolve_profile(profile: str | None = None) -> str:
    """``profile``, else ``$FBSEM_PROFILE``, else ``"cpu"``: one of :data:`PROFILES`, or the
    path of one's own experiment file (a ``.yaml`` / ``.yml`` copy of a shipped profile),
    returned absolute so that the chapters, which run in ``book/``, find it."""
    p = str(profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    if p in PROFILES:
        return p
    if Path(p).suffix.lower() in (".yaml", ".yml"):
        path = Path(p).expanduser()
        if not path.is_file():
            raise ValueError(f"profile file {p!r} does not exist (a profile is {', '.join(PROFILES)} or the path "
                             "of an experiment YAML, e.g. a copy of data/smoke.yaml)")
        return str(path.resolve())
    raise ValueError(f"unknown profile {p!r}; choose one of {', '.join(PROFILES)} or give the path of an "
                     "experiment YAML (a copy of data/<profile>.yaml)")


def base_profile(profile: str) -> str:
    """The shipped profile whose chapter defaults (sizes, seeds, which samples) apply to
    ``profile``: itself for a shipped one; for one's own experiment file, the shipped profile
    named by its ``data.name`` (a copy of ``data/smoke.yaml`` keeps ``name: smoke``), else
    ``"cpu"``."""
    if profile in PROFILES:
        return profile
    from fbsemlib.config import load_experiment

    name = (load_experiment(resolve_profile(profile)).get("data") or {}).get("name")
    return name if name in PROFILES else DEFAULT_PROFILE


def _per_profile(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and set(value) <= set(PROFILES) | {"default"}


class BookParams(dict):
    """The resolved parameters of a chapter: a dict with attribute access. ``sources[name]``
    says where each value came from (``"profile"`` or ``"override"``). ``profile_overrides``
    are the dotted ``section.field`` overrides of the profile in force
    (:mod:`fbsembook.overrides`): shown in the table, not items of the dict."""

    def __init__(self, values: Mapping, profile: str, sources: Mapping[str, str],
                 profile_overrides: Mapping[str, Any] | None = None):
        super().__init__(values)
        self.profile = profile
        self.sources = dict(sources)
        self.profile_overrides = dict(profile_overrides or {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _rows(self) -> list[tuple[str, str, str]]:
        base = self.profile if self.profile in PROFILES else base_profile(self.profile)
        help_ = _PROFILE_HELP.get(self.profile) or f"your experiment file (chapter defaults of {base})"
        rows = [("profile", repr(self.profile), help_)]
        for k, v in self.items():
            rows.append((k, repr(v), "override" if self.sources.get(k) == "override" else f"{base} default"))
        for k, v in self.profile_overrides.items():
            rows.append((k, repr(v), "override (of the profile)"))
        return rows

    def __repr__(self) -> str:
        rows = self._rows()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)

    def _repr_html_(self) -> str:
        import html as _html

        body = "".join(
            f"<tr><td><code>{_html.escape(a)}</code></td><td><code>{_html.escape(b)}</code></td>"
            f"<td>{_html.escape(c)}</td></tr>"
            for a, b, c in self._rows()
        )
        return ("<table><thead><tr><th>parameter</th><th>value</th><th>source</th></tr></thead>"
                f"<tbody>{body}</tbody></table>")


def profile_params(
    defaults: Mapping[str, Any], profile: str | None = None, overrides: Mapping[str, Any] | None = None
) -> BookParams:
    """Resolve a chapter's parameters for ``profile``.

    ``defaults`` maps each parameter name to its default: either one value for all
    profiles, or a dict keyed by profile (``{"smoke": 48, "cpu": 128, "paper": 172}``;
    a ``"default"`` key covers the profiles not named). ``overrides`` is usually
    ``globals()`` of the notebook: a parameter whose variable there is not ``None`` (set
    by papermill's injected cell or edited by hand) wins over the profile's value. Every
    name of ``defaults`` must exist in ``overrides`` (declare it ``= None`` in the
    ``parameters`` cell), so that papermill and ``fbsem book run -p`` know it."""
    from fbsembook.overrides import active_overrides

    profile = resolve_profile(profile)
    base = base_profile(profile)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, d in defaults.items():
        if overrides is not None and name not in overrides:
            raise KeyError(
                f"parameter {name!r} is not declared in the parameters cell; add `{name} = None` there"
            )
        o = None if overrides is None else overrides.get(name)
        if o is not None:
            values[name], sources[name] = o, "override"
            continue
        if _per_profile(d):
            if base in d:
                v = d[base]
            elif "default" in d:
                v = d["default"]
            else:
                raise KeyError(f"parameter {name!r} has no value for profile {base!r} (nor a 'default')")
        else:
            v = d
        values[name], sources[name] = v, "profile"
    return BookParams(values, profile, sources, active_overrides())


def pick_device(device: str | None = None) -> str:
    """``"cuda"`` when ``device`` is ``None``/``"auto"`` and CUDA is available, else ``"cpu"``;
    any other value is returned unchanged."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)
