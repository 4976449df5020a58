"""Experiments as cached, reusable results (what the book's chapters call).

Everything expensive is cached under :func:`fbsembook.profiles.cache_dir` by a hash of
exactly the configuration it depends on:

* :func:`dataset`   -- a simulated dataset (``data:`` recipe) in ``data/generated`` or
  ``$FBSEM_DATA_DIR`` (see :func:`fbsemlib.data.cached_dataset`);
* :func:`train`     -- a trained FBSEM-Net: key = recipe hash + ``model`` + ``train``
  (less its operational fields: checkpoint / log frequency, cache place, workers) + mode
  + seed; stored in ``<cache>/runs/<name>-<hash>/`` (the trainer's output folder);
* :func:`evaluate`  -- the evaluation of a run against the baselines: key = run +
  baseline config; stored next to the run;
* :func:`evaluate_fixed_strengths` -- baselines on another test split with given strengths;
* :func:`baseline_sweep` -- the baseline strength sweep of one split.

So rebuilding the book after a text edit retrains nothing, and changing a parameter
retrains only what depends on it. A run that was interrupted resumes from its checkpoint.
:func:`method_mean` and :func:`method_std` read an evaluation's summary.

Profiles are the experiment files ``data/{smoke,cpu,paper}.yaml``; :func:`load_profile`
reads one and applies dotted overrides (``{"train.epochs": 3, "model.shared": True}``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from fbsemlib.config import from_dict, load_experiment
from fbsemlib.evaluation import BaselineConfig
from fbsemlib.evaluation.baselines import SweepResult
from fbsemlib.evaluation.baselines import sweep as _sweep
from fbsemlib.outputs import atomic_write_json

__all__ = ["load_profile", "profile_path", "dataset", "train", "evaluate", "baseline_sweep", "config_hash",
           "named_run", "NAMED_RUNS", "baseline_config", "method_mean", "method_std", "evaluate_fixed_strengths",
           "write_json",
           "Run", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def profile_path(profile: str) -> Path:
    """``data/<profile>.yaml`` (or ``profile`` itself when it is a path)."""
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    path = REPO_ROOT / "data" / f"{profile}.yaml"
    if not path.exists():
        choices = sorted(x.stem for x in (REPO_ROOT / "data").glob("*.yaml"))
        raise ValueError(f"unknown profile {profile!r}; choose from {choices} or give a YAML path")
    return path


def load_profile(profile: str, overrides: dict[str, Any] | None = None) -> dict:
    """The sections of an experiment file with the reader's overrides
    (:func:`fbsembook.overrides.active_overrides`: ``fbsem book run -p section.field VALUE``),
    then the dotted-key ``overrides`` of the caller, applied."""
    from fbsembook.overrides import active_overrides, apply_overrides

    sections = load_experiment(profile_path(profile))
    return apply_overrides(apply_overrides(sections, active_overrides()), overrides)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename), so that
    an interrupted build never leaves a truncated cache entry, and chapters writing the same
    entry at once never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)  # a temporary file of its own per writer, fsync, rename


def _cache_root() -> Path:
    from fbsembook.profiles import cache_dir

    return Path(cache_dir())


@contextlib.contextmanager
def _locked(name: str):
    """An exclusive inter-process lock (``flock`` on ``<cache>/locks/<name>.lock``), so that
    chapters executed in parallel never simulate or train the same thing at once: the
    second waits and then reuses the first's result."""
    folder = _cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: no locking
            pass
        yield


def dataset(sections: dict, progress: bool = False) -> Path:
    """The dataset of the ``data:`` recipe (simulated once, then reused)."""
    from fbsemlib.data import DataConfig, cached_dataset, recipe_hash

    recipe = from_dict(DataConfig, sections["data"], "data")
    with _locked(f"data-{recipe_hash(recipe)[:16]}"):
        return Path(cached_dataset(recipe, progress=progress).path)


@dataclasses.dataclass
class Run:
    """A trained model in the cache: its folder, configuration and final metrics."""

    path: Path
    mode: str
    key: dict
    metrics: dict

    def load(self, device=None):
        """``(net, configs)`` of :func:`fbsemlib.training.load_trained`: runs of the same
        geometry on the same device share one projector (and its subset system matrices),
        however often they are loaded."""
        from fbsemlib.training import load_trained

        return load_trained(self.path, device=device)

    def logs(self, kind: str = "epochs"):
        """Rows of ``log_<kind>.csv`` (steps, epochs, stages) as dicts of floats/str."""
        import csv

        path = self.path / f"log_{kind}.csv"
        if not path.exists():
            return []
        with open(path) as f:
            rows = list(csv.DictReader(f))
        out = []
        for r in rows:
            conv = {}
            for k, v in r.items():
                try:
                    conv[k] = float(v)
                except (TypeError, ValueError):
                    conv[k] = v
            out.append(conv)
        return out


def train(sections: dict, mode: str | None = None, seed: int | None = None, progress: bool = False,
          device: str | None = None, data_dir: Path | None = None, name: str | None = None) -> Run:
    """Train (or reuse) FBSEM-Net for ``sections`` (``model:``, ``train:``, ``data:``)."""
    from fbsemlib.data import DataConfig, recipe_hash
    from fbsemlib.training import MODEL_NAME, OPERATIONAL_FIELDS, TrainConfig, parse_model_section

    model_cfg, n_it, n_sub = parse_model_section(sections.get("model"))
    train_cfg = from_dict(TrainConfig, sections.get("train", {}), "train")
    mode = mode or train_cfg.mode
    if seed is not None:
        train_cfg = dataclasses.replace(train_cfg, seed=int(seed))
    train_cfg = dataclasses.replace(train_cfg, mode=mode)
    data_dir = Path(data_dir) if data_dir is not None else dataset(sections, progress=progress)
    recipe = from_dict(DataConfig, sections["data"], "data")
    trained = {k: v for k, v in train_cfg.to_dict().items() if k not in OPERATIONAL_FIELDS}  # what the weights depend on
    key = {"recipe": recipe_hash(recipe), "model": model_cfg.to_dict(), "train": trained, "mode": mode,
           "iterations": n_it, "subsets": n_sub, "device": str(device or "cpu")}
    h = config_hash(key)
    out = _cache_root() / "runs" / f"{name or recipe.name}-{mode}-{h}"
    with _locked(f"run-{h}"):
        if not (out / MODEL_NAME).exists():
            _train_into(out, key, data_dir, model_cfg, train_cfg, n_it, n_sub, mode, device, progress)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    return Run(out, mode, key, metrics)


def _train_into(out, key, data_dir, model_cfg, train_cfg, n_it, n_sub, mode, device, progress) -> None:
    """Train one run into ``out`` (resuming a checkpoint left by an interrupted build)."""
    from fbsemlib.data import PETDataset
    from fbsemlib.models import FBSEMNet
    from fbsemlib.training import make_trainer

    train_ds = PETDataset(data_dir, "train")
    try:
        val_ds = PETDataset(data_dir, "validation")
    except Exception:
        val_ds = None
    dev = torch.device(device or "cpu")
    projector = train_ds.make_projector(dev)
    torch.manual_seed(train_cfg.seed)
    net = FBSEMNet(projector, int(n_it or train_ds.num_iterations), int(n_sub or train_ds.num_subsets), model_cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "key.json").write_text(json.dumps(key, indent=2, default=str))
    trainer = make_trainer(mode, model=net, train_dataset=train_ds, val_dataset=val_ds, config=train_cfg,
                           out_dir=out, device=dev, progress=progress)
    trainer.fit(resume=(out / "checkpoint.pt").exists())


def baseline_config(profile_or_sections) -> BaselineConfig:
    """The ``baselines:`` section of a profile (name, path or loaded sections), or the
    defaults when it has none."""
    sections = profile_or_sections if isinstance(profile_or_sections, dict) else load_profile(str(profile_or_sections))
    return from_dict(BaselineConfig, sections.get("baselines") or {}, "baselines")


def _default_baselines(info) -> BaselineConfig:
    """The ``baselines:`` section of the profile the dataset's recipe is named after."""
    name = (info.recipe_dict or {}).get("name")
    try:
        return baseline_config(name) if name else BaselineConfig()
    except (ValueError, OSError):
        return BaselineConfig()


def baseline_sweep(data_dir: Path, config: BaselineConfig | None = None, split: str = "validation",
                   device: str | None = None, progress: bool = False) -> SweepResult:
    """Cached :func:`fbsemlib.evaluation.baselines.sweep` of one split (default config: the
    ``baselines:`` section of the dataset's profile)."""
    from fbsemlib.data import PETDataset, open_dataset

    info = open_dataset(data_dir, checksums=False)
    cfg = config or _default_baselines(info)
    h = config_hash({"data": info.recipe_hash, "split": split, "config": cfg.to_dict()})
    path = _cache_root() / "sweeps" / f"sweep-{split}-{h}.json"
    if path.exists():
        d = json.loads(path.read_text())
        curves = {k: [tuple(p) for p in v] for k, v in d["curves"].items()}
        return SweepResult(d["split"], curves, d["best"])
    ds = PETDataset(data_dir, split)
    res = _sweep(ds, ds.make_projector(device or "cpu"), cfg, progress=progress)
    write_json(path, res.to_dict())
    return res


def _cached_evaluation(path: Path, run_path: Path | None, data_dir: Path, cfg: BaselineConfig,
                       methods: tuple[str, ...], device, progress: bool, sweep_result) -> dict:
    """The evaluation stored at ``path``; else :func:`fbsemlib.evaluation.evaluate` with the
    baselines' strengths of ``sweep_result()`` (a function: the sweep runs only when the
    evaluation is not cached), stored with its ``time_s``."""
    from fbsemlib.evaluation import evaluate as _evaluate

    if path.exists():
        return json.loads(path.read_text())
    t = time.time()
    res = _evaluate(run_path, data_dir, device=device, baseline_config=cfg, methods=methods, progress=progress,
                    sweep_result=sweep_result())
    res["time_s"] = time.time() - t
    write_json(path, res)
    return res


def evaluate(run: Run | Path | None, data_dir: Path, config: BaselineConfig | None = None,
             methods: tuple[str, ...] | None = None, device: str | None = None, progress: bool = False) -> dict:
    """Cached :func:`fbsemlib.evaluation.evaluator.evaluate` of a run (or of the baselines only when
    ``run`` is None) on the test split (default baseline config: the ``baselines:``
    section of the dataset's profile)."""
    from fbsemlib.data import open_dataset
    from fbsemlib.evaluation.baselines import METHODS
    from fbsemlib.evaluation.evaluator import METRIC_KEYS

    info = open_dataset(data_dir, checksums=False)
    cfg = config or _default_baselines(info)
    run_path = Path(run.path if isinstance(run, Run) else run) if run is not None else None
    methods = tuple(methods or ((("fbsem",) if run_path else ()) + METHODS))
    h = config_hash({"data": info.recipe_hash, "run": str(run_path), "baselines": cfg.to_dict(), "methods": methods,
                     "metrics": METRIC_KEYS})  # a new metric re-evaluates
    path = (run_path if run_path else _cache_root() / "evaluations") / f"evaluation-{h}.json"
    needs_sweep = len(methods) > 1 or "fbsem" not in methods
    return _cached_evaluation(path, run_path, data_dir, cfg, methods, device, progress,
                              lambda: baseline_sweep(data_dir, cfg, device=device, progress=progress)
                              if needs_sweep else None)


def evaluate_fixed_strengths(data_dir: Path, strengths: dict[str, float | None],
                             methods: tuple[str, ...] = ("osem", "mapem_bowsher"), device: str | None = None,
                             config: BaselineConfig | None = None, progress: bool = False) -> dict:
    """Cached evaluation of baselines on the test split of ``data_dir`` with GIVEN strengths
    (``method -> strength``, e.g. ``evaluation["sweep"]["best"]`` of the training
    distribution), without a validation sweep on ``data_dir``: the baselines, like the
    trained networks, are tuned on the training distribution and applied unchanged.
    Same result format as :func:`evaluate`; cached under ``<cache>/evaluations`` by the
    dataset, strengths, methods and baseline config."""
    from fbsemlib.data import open_dataset
    from fbsemlib.evaluation.evaluator import METRIC_KEYS

    methods = tuple(methods)
    if "fbsem" in methods:
        raise ValueError("evaluate_fixed_strengths evaluates baselines only; use experiments.evaluate for a run")
    missing = [m for m in methods if m != "osem" and strengths.get(m) is None]
    if missing:
        raise ValueError(f"no strength given for {missing}")
    cfg = config or BaselineConfig()
    best = {m: (None if m == "osem" else float(strengths[m])) for m in methods}
    info = open_dataset(data_dir, checksums=False)
    h = config_hash({"data": info.recipe_hash, "best": best, "methods": methods, "baselines": cfg.to_dict(),
                     "metrics": METRIC_KEYS})
    path = Path(_cache_root() / "evaluations") / f"evaluation-fixed-{h}.json"
    return _cached_evaluation(path, None, data_dir, cfg, methods, device, progress,
                              lambda: SweepResult("given", {}, best))


def method_mean(evaluation: dict, method: str = "fbsem", metric: str = "nrmse") -> float | None:
    """Mean of ``metric`` of ``method`` over the test samples of an :func:`evaluate` result."""
    s = (evaluation.get("summary") or {}).get(method, {}).get(metric) or {}
    return s.get("mean")


def method_std(evaluation: dict, method: str = "fbsem", metric: str = "nrmse") -> float | None:
    """Standard deviation of ``metric`` of ``method`` over the test samples."""
    s = (evaluation.get("summary") or {}).get(method, {}).get(metric) or {}
    return s.get("std")


# ----------------------------------------------------------------------------------------
# the runs of the paper's experiments (shared by the chapters and the results chapter)
# ----------------------------------------------------------------------------------------
#: name -> (mode, overrides of the profile); every chapter that needs one of these runs
#: asks for it by name, so a run is trained once and reused by every chapter.
NAMED_RUNS: dict[str, tuple[str, dict]] = {
    # the original FBSEM-Net: one shared network, single final target, end-to-end
    "original": ("end-to-end", {"model.shared": True, "train.targets": "final"}),
    # iteration-dependent networks, single final target, end-to-end
    "final-target": ("end-to-end", {"model.shared": False, "train.targets": "final"}),
    # iteration-dependent networks and targets, end-to-end (full backpropagation)
    "itdep-end-to-end": ("end-to-end", {"model.shared": False, "train.targets": "iteration-dependent"}),
    # shared network with iteration-dependent targets, end-to-end
    "shared-itdep": ("end-to-end", {"model.shared": True, "train.targets": "iteration-dependent"}),
    # the 2022 paper's method: iteration-dependent networks and targets, sequential training
    "sequential": ("sequential", {"model.shared": False, "train.targets": "iteration-dependent"}),
}


def named_run(profile: str, name: str, seed: int | None = None, overrides: dict | None = None,
              progress: bool = False, device: str | None = None) -> Run:
    """Train (or reuse) one of :data:`NAMED_RUNS` in ``profile`` (with extra ``overrides``)."""
    if name not in NAMED_RUNS:
        raise ValueError(f"unknown run {name!r}; choose from {sorted(NAMED_RUNS)}")
    mode, ov = NAMED_RUNS[name]
    sections = load_profile(profile, {**ov, **(overrides or {})})
    return train(sections, mode, seed=seed, progress=progress, device=device, name=f"{sections['data']['name']}-{name}")
