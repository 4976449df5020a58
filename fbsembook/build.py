"""The book machinery: execute the chapters with papermill, build the HTML with Jupyter Book.

Layout (all paths relative to the repository root, which holds ``_config.yml`` and
``_toc.yml``)::

    book/intro.md               plain MyST pages (not executed)
    book/NN_slug.md             chapters: MyST-markdown notebooks (jupytext ``format_name: myst``)
    book/_executed/NN_slug.ipynb  the executed chapters (git-ignored); ``_toc.yml`` lists these
    book/_build/html/           the HTML book (git-ignored)

``_toc.yml`` refers to a chapter by its executed notebook, ``book/_executed/NN_slug``; its
source is ``book/NN_slug.md``. ``fbsem book execute`` converts every such source with
jupytext and runs it with papermill, injecting ``profile`` and the ``-p NAME VALUE``
overrides; ``fbsem book html`` runs ``jupyter-book build -W -n --keep-going`` with
``execute_notebooks: off``, so the HTML shows exactly what was executed.

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
"""

from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "PROFILES",
    "DEFAULT_PROFILE",
    "PROFILE_ENV",
    "CACHE_ENV",
    "BookParams",
    "Chapter",
    "book_root",
    "cache_dir",
    "resolve_profile",
    "profile_params",
    "pick_device",
    "toc_files",
    "chapters",
    "find_chapter",
    "parse_parameter_values",
    "notebook_parameters",
    "convert",
    "execute",
    "check_executed",
    "html",
    "nbval_notebook",
    "cmd_book",
]

PROFILES: tuple[str, ...] = ("smoke", "cpu", "paper")
DEFAULT_PROFILE = "cpu"
PROFILE_ENV = "FBSEM_PROFILE"
CACHE_ENV = "FBSEM_CACHE"
ROOT_ENV = "FBSEM_BOOK_ROOT"
KERNEL_NAME = "python3"
BOOK_DIR = "book"
EXECUTED_DIR = "book/_executed"
BUILD_PARENT = "book"  # jupyter-book --path-output: HTML lands in book/_build/html

_PROFILE_HELP = {
    "smoke": "CI: tiny sizes, seconds per notebook",
    "cpu": "default: a 2-core laptop, minutes per notebook",
    "paper": "the paper's sizes, needs a GPU",
}


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _user_error(msg: str) -> Exception:
    from fbsemlib.errors import UserError

    return UserError(msg)


# ----------------------------------------------------------------------------------------
# locations
# ----------------------------------------------------------------------------------------
def book_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root holding ``_toc.yml`` and ``_config.yml``: ``$FBSEM_BOOK_ROOT``,
    else the first such folder from ``start`` (default: the current directory) upwards,
    else the folder above the ``fbsemlib`` package (editable install)."""
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
    raise _user_error(
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
    """``profile``, else ``$FBSEM_PROFILE``, else ``"cpu"``; checked against :data:`PROFILES`."""
    p = profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if p not in PROFILES:
        raise ValueError(f"unknown profile {p!r}; choose one of {', '.join(PROFILES)}")
    return p


def _per_profile(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and set(value) <= set(PROFILES) | {"default"}


class BookParams(dict):
    """The resolved parameters of a chapter: a dict with attribute access. ``sources[name]``
    says where each value came from (``"profile"`` or ``"override"``)."""

    def __init__(self, values: Mapping, profile: str, sources: Mapping[str, str]):
        super().__init__(values)
        self.profile = profile
        self.sources = dict(sources)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _rows(self) -> list[tuple[str, str, str]]:
        rows = [("profile", repr(self.profile), _PROFILE_HELP.get(self.profile, ""))]
        for k, v in self.items():
            rows.append((k, repr(v), "override" if self.sources.get(k) == "override" else f"{self.profile} default"))
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
    profile = resolve_profile(profile)
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
            if profile in d:
                v = d[profile]
            elif "default" in d:
                v = d["default"]
            else:
                raise KeyError(f"parameter {name!r} has no value for profile {profile!r} (nor a 'default')")
        else:
            v = d
        values[name], sources[name] = v, "profile"
    return BookParams(values, profile, sources)


def pick_device(device: str | None = None) -> str:
    """``"cuda"`` when ``device`` is ``None``/``"auto"`` and CUDA is available, else ``"cpu"``;
    any other value is returned unchanged."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


# ----------------------------------------------------------------------------------------
# chapters
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chapter:
    """A chapter notebook: ``source`` (``book/NN_slug.md``) executes to ``executed``
    (``book/_executed/NN_slug.ipynb``)."""

    name: str
    source: Path
    executed: Path

    @property
    def number(self) -> int | None:
        m = re.match(r"(\d+)_", self.name)
        return int(m.group(1)) if m else None

    @property
    def slug(self) -> str:
        return re.sub(r"^\d+_", "", self.name)

    @property
    def failed(self) -> Path:
        return self.executed.with_name(self.name + ".failed.ipynb")

    @property
    def html(self) -> str:
        return f"{EXECUTED_DIR}/{self.name}.html"


def _toc_files(entry: Any) -> Iterable[str]:
    if isinstance(entry, Mapping):
        for k in ("root", "file"):
            if isinstance(entry.get(k), str):
                yield entry[k]
        for k in ("parts", "chapters", "sections"):
            for e in entry.get(k) or []:
                yield from _toc_files(e)
    elif isinstance(entry, list):
        for e in entry:
            yield from _toc_files(e)


def toc_files(root: Path) -> list[str]:
    """Every ``file`` (and the ``root``) of ``_toc.yml``, in order, without extension."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in _toc_files(toc)]


def chapters(root: Path | None = None) -> list[Chapter]:
    """The executed chapters listed in ``_toc.yml`` (entries ``book/_executed/NAME``)."""
    root = Path(root) if root is not None else book_root()
    out = []
    prefix = EXECUTED_DIR + "/"
    for f in toc_files(root):
        if f.startswith(prefix):
            name = f[len(prefix):]
            out.append(Chapter(name, root / BOOK_DIR / f"{name}.md", root / EXECUTED_DIR / f"{name}.ipynb"))
    return out


def find_chapter(key: str, root: Path | None = None) -> Chapter:
    """A chapter by number (``"5"``, ``"05"``), slug (``"forward_model"``), name
    (``"01_forward_model"``) or path (``book/01_forward_model.md``)."""
    chs = chapters(root)
    k = Path(str(key)).name
    k = re.sub(r"\.(md|ipynb)$", "", k)
    for c in chs:
        if k == c.name or k == c.slug or (k.isdigit() and c.number == int(k)):
            return c
    names = ", ".join(c.name for c in chs) or "(none)"
    raise _user_error(f"no chapter {key!r} in _toc.yml; chapters: {names}")


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_parameter_values(pairs: Iterable[Iterable[str]]) -> dict[str, Any]:
    """``[("image_size", "64"), ("scanner", "tiny2d")]`` -> values parsed as YAML
    (``64`` an int, ``1e-3`` a float, ``true`` a bool, ``null`` None, ``[1, 2]`` a list,
    ``'64'`` the string, anything else a string)."""
    import yaml

    out: dict[str, Any] = {}
    for name, value in pairs:
        if not name.isidentifier():
            raise _user_error(f"parameter name {name!r} is not a Python identifier")
        try:
            v = yaml.safe_load(value) if value.strip() != "" else ""
        except yaml.YAMLError:
            v = value
        if isinstance(v, str) and _FLOAT.fullmatch(value.strip()):
            v = float(value)  # YAML 1.1 reads `1e-3` as a string
        out[name] = v
    return out


def notebook_parameters(nb) -> list[str]:
    """Names assigned in the cell tagged ``parameters`` (the chapter's parameters)."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            names = []
            for node in ast.parse(src).body:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                for t in targets:
                    if isinstance(t, ast.Name):
                        names.append(t.id)
            return names
    return []


def convert(chapter: Chapter):
    """The chapter's MyST source as an nbformat notebook (jupytext)."""
    import jupytext

    if not chapter.source.is_file():
        raise _user_error(f"chapter source {chapter.source} is missing (listed in _toc.yml as {EXECUTED_DIR}/{chapter.name})")
    nb = jupytext.read(chapter.source)
    if "parameters" not in [t for c in nb.cells for t in c.get("metadata", {}).get("tags", [])]:
        raise _user_error(f"{chapter.source}: no cell tagged `parameters`")
    return nb


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------
# execution (one chapter per worker process)
# ----------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _kernel_env(profile: str, jobs: int, spec_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[PROFILE_ENV] = profile
    # the inline backend must draw the figures (a test runner may have set Agg)
    env.pop("MPLBACKEND", None)
    # `python3` is this interpreter's kernel, whatever kernels the user has installed
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(spec_dir), env.get("JUPYTER_PATH", "")) if p)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, threads)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


def _write_kernel_spec(spec_dir: Path) -> None:
    kdir = spec_dir / "kernels" / KERNEL_NAME
    kdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fbsemlib)",
        "language": "python",
        "metadata": {"debugger": True, "supported_encryption": ["curve"]},
        "kernel_protocol_version": "5.5",
    }
    (kdir / "kernel.json").write_text(json.dumps(spec, indent=1))


def _kernel_manager_config() -> dict:
    """Encrypt the kernel's local sockets (CurveZMQ) where jupyter_client and zmq can."""
    try:
        import zmq
        from jupyter_client.manager import KernelManager
        from traitlets.config import Config
    except ImportError:  # pragma: no cover
        return {}
    if not zmq.has("curve") or not KernelManager.class_traits().get("transport_encryption"):
        return {}
    return {"config": Config({"KernelManager": {"transport_encryption": "auto"}})}


def _execute_one(job: dict) -> dict:
    """Worker: run one chapter with papermill. Returns a result dict (never raises)."""
    import nbformat
    import papermill as pm

    os.environ.clear()
    os.environ.update(job["env"])
    src, out = Path(job["source"]), Path(job["executed"])
    tmp = out.with_name(f".{job['name']}.running.ipynb")
    failed = out.with_name(job["name"] + ".failed.ipynb")
    t0 = time.perf_counter()
    result = {"name": job["name"], "status": "ok", "error": "", "seconds": 0.0, "output": str(out)}
    try:
        import jupytext

        nb = jupytext.read(src)
        pm.execute_notebook(
            nb,
            str(tmp),
            parameters=job["parameters"],
            kernel_name=KERNEL_NAME,
            language="python",
            progress_bar=False,
            log_output=False,
            start_timeout=180,
            cwd=str(src.parent),
            **_kernel_manager_config(),
        )
        seconds = time.perf_counter() - t0
        nbx = nbformat.read(tmp, as_version=4)
        nbx.metadata["fbsem"] = {
            "profile": job["profile"],
            "parameters": {k: v for k, v in job["parameters"].items() if k != "profile"},
            "source": f"{BOOK_DIR}/{src.name}",
            "source_sha256": job["sha256"],
            "executed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2),
        }
        nbformat.write(nbx, tmp)
        os.replace(tmp, out)
        if failed.exists():
            failed.unlink()
        result["seconds"] = seconds
    except pm.PapermillExecutionError as e:
        tb = _ANSI.sub("", "\n".join(e.traceback or []))
        tail = "\n".join(tb.strip().splitlines()[-12:])
        result.update(status="FAILED", error=f"cell In [{e.exec_count}] raised {e.ename}: {e.evalue}\n{tail}")
    except Exception as e:  # kernel died, bad notebook, ...
        result.update(status="FAILED", error=f"{type(e).__name__}: {_ANSI.sub('', str(e)).strip()}")
    if result["status"] != "ok":
        result["seconds"] = time.perf_counter() - t0
        if tmp.exists():
            os.replace(tmp, failed)
            result["output"] = str(failed)
    return result


def execute(
    chapter_list: list[Chapter] | None = None,
    profile: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    jobs: int = 1,
    root: Path | None = None,
    echo: Callable[[str], None] = _echo,
) -> list[dict]:
    """Execute chapters (default: all of ``_toc.yml``) with papermill, ``jobs`` at a time,
    into ``book/_executed/``. Each of ``parameters`` is injected into the chapters whose
    ``parameters`` cell declares it (a name that none declares is an error). Returns one
    result dict per chapter."""
    root = Path(root) if root is not None else book_root()
    profile = resolve_profile(profile)
    parameters = dict(parameters or {})
    parameters.pop("profile", None)
    chs = chapters(root) if chapter_list is None else chapter_list
    if not chs:
        echo("no chapters to execute (none listed under book/_executed/ in _toc.yml)")
        return []
    declared: dict[str, list[str]] = {}
    for c in chs:
        known = notebook_parameters(convert(c))
        if known[:1] != ["profile"]:
            raise _user_error(f"{c.source}: the parameters cell must start with `profile = os.environ.get(\"{PROFILE_ENV}\", ...)`")
        declared[c.name] = known
    # a parameter goes to the chapters that declare it; one that no chapter declares is an error
    unknown = sorted(k for k in parameters if not any(k in known for known in declared.values()))
    if unknown:
        known_all = sorted({k for known in declared.values() for k in known[1:]})
        where = chs[0].name if len(chs) == 1 else "any chapter"
        raise _user_error(f"unknown parameter(s) {', '.join(unknown)} for {where}; known: {', '.join(known_all)}")
    (root / EXECUTED_DIR).mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(int(jobs or 1), len(chs)))
    echo(f"executing {len(chs)} chapter(s), profile {profile}, {jobs} at a time"
         + (f", parameters {parameters}" if parameters else ""))
    results: list[dict] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fbsem-kernel-") as spec_dir:
        _write_kernel_spec(Path(spec_dir))
        env = _kernel_env(profile, jobs, Path(spec_dir))
        job_list = [
            dict(name=c.name, source=str(c.source), executed=str(c.executed), profile=profile,
                 parameters={"profile": profile, **{k: v for k, v in parameters.items() if k in declared[c.name]}},
                 sha256=_sha256(c.source), env=env)
            for c in chs
        ]
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {}
            for j in job_list:
                futures[pool.submit(_execute_one, j)] = j
                echo(f"  queued  {j['name']}")
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                echo(f"  {r['status']:<7} {r['name']}  {r['seconds']:.1f} s")
                if r["error"]:
                    echo("    " + r["error"].replace("\n", "\n    "))
                    echo(f"    notebook: {r['output']}")
    wall = time.perf_counter() - t_all
    order = {c.name: i for i, c in enumerate(chs)}
    results.sort(key=lambda r: order[r["name"]])
    w = max([len("total (wall)")] + [len(r["name"]) for r in results])
    echo("")
    echo(f"{'chapter':<{w}}  {'profile':<7}  {'status':<7}  {'time':>8}")
    for r in results:
        echo(f"{r['name']:<{w}}  {profile:<7}  {r['status']:<7}  {r['seconds']:>6.1f} s")
    echo(f"{'total (wall)':<{w}}  {'':<7}  {'':<7}  {wall:>6.1f} s")
    return results


# ----------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------
def _has_error_output(path: Path) -> bool:
    nb = json.loads(path.read_text())
    return any(o.get("output_type") == "error" for c in nb.get("cells", []) for o in c.get("outputs", []) or [])


def check_executed(root: Path, echo: Callable[[str], None] = _echo) -> list[str]:
    """Problems that stop the HTML build (missing / failed chapters); prints a table of
    what will be published and warns about chapters executed from an older source."""
    problems = []
    rows = []
    for c in chapters(root):
        if c.failed.exists() and (not c.executed.exists() or c.failed.stat().st_mtime >= c.executed.stat().st_mtime):
            problems.append(f"{c.name}: its last execution failed ({c.failed.relative_to(root)}); fix it and rerun `fbsem book run {c.number or c.name}`")
            continue
        if not c.executed.exists():
            problems.append(f"{c.name}: not executed yet; run `fbsem book execute` (or `fbsem book run {c.number or c.name}`)")
            continue
        if _has_error_output(c.executed):
            problems.append(f"{c.name}: the executed notebook contains an error output")
            continue
        meta = json.loads(c.executed.read_text()).get("metadata", {}).get("fbsem", {})
        stale = c.source.exists() and meta.get("source_sha256") not in (None, _sha256(c.source))
        rows.append((c.name, meta.get("profile", "?"), meta.get("parameters") or {}, stale))
    if rows:
        w = max(len(r[0]) for r in rows)
        echo("publishing executed notebooks:")
        for name, prof, params, stale in rows:
            extra = f"  parameters {params}" if params else ""
            echo(f"  {name:<{w}}  profile {prof}{extra}" + ("  (STALE: source changed since execution)" if stale else ""))
    return problems


def html(root: Path | None = None, echo: Callable[[str], None] = _echo) -> int:
    """``jupyter-book build -W -n --keep-going`` of the executed notebooks into
    ``book/_build/html``. Returns the exit status."""
    root = Path(root) if root is not None else book_root()
    problems = check_executed(root, echo)
    if problems:
        for p in problems:
            echo(f"error: {p}")
        return 1
    cmd = [
        sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
        "build", str(root), "--path-output", str(root / BUILD_PARENT), "--builder", "html",
        "--all", "-W", "-n", "--keep-going",
    ]
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    t0 = time.perf_counter()
    echo("building HTML: jupyter-book build -W -n --keep-going (notebooks are not re-executed)")
    proc = subprocess.run(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_dir = root / BUILD_PARENT / "_build" / "html"
    if proc.returncode != 0:
        echo(proc.stdout[-8000:])
        echo(f"error: jupyter-book build failed (exit {proc.returncode}) after {time.perf_counter() - t0:.1f} s")
        return proc.returncode or 1
    missing = [c.html for c in chapters(root) if not (out_dir / c.html).is_file()]
    if missing:
        echo(f"error: no HTML page for {', '.join(missing)}")
        return 1
    (out_dir / ".nojekyll").touch()
    echo(f"HTML built in {time.perf_counter() - t0:.1f} s: {out_dir / 'index.html'}")
    return 0


# ----------------------------------------------------------------------------------------
# nbval helper
# ----------------------------------------------------------------------------------------
def nbval_notebook(chapter: Chapter, reference: Path | None = None):
    """The jupytext-converted chapter with, as reference outputs for the cells marked
    ``# NBVAL_CHECK_OUTPUT``, the outputs of the executed notebook ``reference`` (default:
    ``chapter.executed``). Run it with ``FBSEM_PROFILE`` set to that notebook's profile and
    ``pytest --nbval-lax``: it checks that no cell fails and that the marked cells print
    the same thing when the profile comes from the environment."""
    import nbformat

    nb = convert(chapter)
    ref = nbformat.read(reference or chapter.executed, as_version=4)
    by_source = {c.source: c for c in ref.cells if c.cell_type == "code"}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs, cell.execution_count = [], None
        if "NBVAL_CHECK_OUTPUT" in cell.source:
            r = by_source.get(cell.source)
            if r is None:
                raise ValueError(f"{chapter.name}: a NBVAL_CHECK_OUTPUT cell is not in {reference or chapter.executed} (re-execute it)")
            cell.outputs = r.outputs
            cell.execution_count = r.execution_count
    return nb


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def cmd_book(args) -> int:
    """``fbsem book {build,execute,run,html}``."""
    root = book_root()
    params = parse_parameter_values(args.parameter or [])
    p_profile = params.pop("profile", None)
    if p_profile is not None and args.profile and str(p_profile) != args.profile:
        raise _user_error(f"--profile {args.profile} contradicts -p profile {p_profile}")
    try:
        profile = resolve_profile(args.profile or (str(p_profile) if p_profile is not None else None))
    except ValueError as e:
        raise _user_error(str(e)) from None
    action = args.action
    if action == "run":
        if not args.chapter:
            raise _user_error("fbsem book run needs a chapter (number or name), e.g. `fbsem book run 1 -p image_size 64`")
        results = execute([find_chapter(args.chapter, root)], profile, params, 1, root)
        bad = [r for r in results if r["status"] != "ok"]
        if bad:
            return 1
        _echo(f"wrote {Path(results[0]['output']).relative_to(root)}; `fbsem book html` publishes it")
        return 0
    if args.chapter:
        raise _user_error(f"fbsem book {action} takes no chapter (use `fbsem book run {args.chapter}`)")
    if action in ("execute", "build"):
        t0 = time.perf_counter()
        results = execute(None, profile, params, args.jobs, root)
        bad = [r["name"] for r in results if r["status"] != "ok"]
        if bad:
            print(f"error: {len(bad)} chapter(s) failed: {', '.join(bad)}", file=sys.stderr)
            return 1
        if action == "execute":
            return 0
        rc = html(root)
        if rc == 0:
            _echo(f"book built in {time.perf_counter() - t0:.1f} s (profile {profile})")
        return rc
    if action == "html":
        if params:
            raise _user_error("parameters (-p) apply to execution, not to `fbsem book html`")
        return html(root)
    raise _user_error(f"unknown book action {action!r}")  # pragma: no cover
