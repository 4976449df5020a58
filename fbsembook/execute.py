"""Executing the chapters: each MyST source is converted with jupytext and run with
papermill (one chapter per worker process, ``jobs`` at a time) into
``book/_executed/NN_slug.ipynb``, with ``profile`` and the ``-p NAME VALUE`` overrides
injected into the chapters that declare them. Dotted names (``-p section.field VALUE``) are
overrides of the profile (:mod:`fbsembook.overrides`): checked here, then passed to every
chapter in ``$FBSEM_OVERRIDES``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from fbsemlib.errors import UserError
from fbsembook.chapters import BOOK_DIR, EXECUTED_DIR, Chapter, chapters, convert, notebook_parameters, source_sha256
from fbsembook.figures import apply_alt_text
from fbsembook.overrides import OVERRIDES_ENV, active_overrides, split_overrides, validate_overrides
from fbsembook.presentation import present
from fbsembook.profiles import PROFILE_ENV, book_root, resolve_profile

__all__ = ["KERNEL_NAME", "parse_parameter_values", "execute"]

KERNEL_NAME = "python3"


def _echo(msg: str) -> None:
    print(msg, flush=True)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_parameter_values(pairs: Iterable[Iterable[str]]) -> dict[str, Any]:
    """``[("image_size", "64"), ("scanner", "tiny2d")]`` -> values parsed as YAML
    (``64`` an int, ``1e-3`` a float, ``true`` a bool, ``null`` None, ``[1, 2]`` a list,
    ``'64'`` the string, anything else a string). A dotted name (``data.counts_range``) is an
    override of the profile (:mod:`fbsembook.overrides`)."""
    import yaml

    out: dict[str, Any] = {}
    for name, value in pairs:
        if not all(part.isidentifier() for part in name.split(".")):
            raise UserError(f"parameter name {name!r} is neither a Python identifier (a chapter parameter) nor "
                            "dotted identifiers (a profile override, 'section.field')")
        try:
            v = yaml.safe_load(value) if value.strip() != "" else ""
        except yaml.YAMLError:
            v = value
        if isinstance(v, str):  # a quoted '1e5' stays a string
            out[name] = float(value) if _FLOAT.fullmatch(value.strip()) else v
        else:
            out[name] = _floats(v)
    return out


def _floats(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: such strings, also inside lists and
    mappings (``[1e5, 1e6]``), as floats."""
    if isinstance(v, str) and _FLOAT.fullmatch(v.strip()):
        return float(v)
    if isinstance(v, list):
        return [_floats(x) for x in v]
    if isinstance(v, dict):
        return {k: _floats(x) for k, x in v.items()}
    return v


# ----------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _kernel_env(profile: str, jobs: int, spec_dir: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env[PROFILE_ENV] = profile
    env.pop(OVERRIDES_ENV, None)
    if overrides:
        env[OVERRIDES_ENV] = json.dumps(dict(overrides))
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
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 # the book's figure style and alt text on every figure (fbsembook.figures)
                 "--IPKernelApp.exec_lines=__import__('fbsembook.figures').figures.install()"],
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


# ----------------------------------------------------------------------------------------
# execution (one chapter per worker process)
# ----------------------------------------------------------------------------------------
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
        apply_alt_text(nbx, f"chapter {job['name']}")
        nbx.metadata["fbsem"] = {
            "profile": job["profile"],
            "parameters": {**{k: v for k, v in job["parameters"].items() if k != "profile"}, **job["overrides"]},
            "overrides": job["overrides"],
            "source": f"{BOOK_DIR}/{src.name}",
            "source_sha256": job["sha256"],
            "executed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2),
        }
        # fold the plumbing, put the rerun box under the title (fbsembook.presentation)
        present(nbx, job["name"], job["profile"], nbx.metadata["fbsem"]["parameters"], seconds,
                notation=(src.parent / "notation.md").is_file())
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


def _declared_parameters(chs: list[Chapter], parameters: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each chapter's declared parameters; a parameter that no chapter declares is an error."""
    declared: dict[str, list[str]] = {}
    for c in chs:
        known = notebook_parameters(convert(c))
        if known[:1] != ["profile"]:
            raise UserError(f"{c.source}: the parameters cell must start with `profile = os.environ.get(\"{PROFILE_ENV}\", ...)`")
        declared[c.name] = known
    unknown = sorted(k for k in parameters if not any(k in known for known in declared.values()))
    if unknown:
        known_all = sorted({k for known in declared.values() for k in known[1:]})
        where = chs[0].name if len(chs) == 1 else "any chapter"
        raise UserError(f"unknown parameter(s) {', '.join(unknown)} for {where}; known: {', '.join(known_all)}")
    return declared


def _summary(results: list[dict], profile: str, wall: float, echo: Callable[[str], None]) -> None:
    w = max([len("total (wall)")] + [len(r["name"]) for r in results])
    echo("")
    echo(f"{'chapter':<{w}}  {'profile':<7}  {'status':<7}  {'time':>8}")
    for r in results:
        echo(f"{r['name']:<{w}}  {profile:<7}  {r['status']:<7}  {r['seconds']:>6.1f} s")
    echo(f"{'total (wall)':<{w}}  {'':<7}  {'':<7}  {wall:>6.1f} s")


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
    ``parameters`` cell declares it (a name that none declares is an error); dotted names
    are overrides of the profile, checked against it and given to every chapter (with those
    of ``$FBSEM_OVERRIDES``). Returns one result dict per chapter."""
    from fbsemlib.config import load_experiment
    from fbsembook.experiments import profile_path

    root = Path(root) if root is not None else book_root()
    try:
        profile = resolve_profile(profile)
    except ValueError as e:
        raise UserError(str(e)) from None
    parameters, overrides = split_overrides(dict(parameters or {}))
    parameters.pop("profile", None)
    overrides = validate_overrides(load_experiment(profile_path(profile)), {**active_overrides(), **overrides})
    chs = chapters(root) if chapter_list is None else chapter_list
    if not chs:
        echo("no chapters to execute (none listed under book/_executed/ in _toc.yml)")
        return []
    declared = _declared_parameters(chs, parameters)
    (root / EXECUTED_DIR).mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(int(jobs or 1), len(chs)))
    echo(f"executing {len(chs)} chapter(s), profile {profile}, {jobs} at a time"
         + (f", parameters {parameters}" if parameters else "")
         + (f", profile overrides {overrides}" if overrides else ""))
    results: list[dict] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fbsem-kernel-") as spec_dir:
        _write_kernel_spec(Path(spec_dir))
        env = _kernel_env(profile, jobs, Path(spec_dir), overrides)
        job_list = [
            dict(name=c.name, source=str(c.source), executed=str(c.executed), profile=profile,
                 parameters={"profile": profile, **{k: v for k, v in parameters.items() if k in declared[c.name]}},
                 overrides=overrides, sha256=source_sha256(c.source), env=env)
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
    order = {c.name: i for i, c in enumerate(chs)}
    results.sort(key=lambda r: order[r["name"]])
    _summary(results, profile, time.perf_counter() - t_all, echo)
    return results
