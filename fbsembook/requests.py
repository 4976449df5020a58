"""The cached results that several chapters ask for, each requested in one place.

A result is computed once and then served from the cache only when every chapter asks
for it with the same arguments (same profile, seeds, methods, test sets). Chapters 4, 5,
6, 7 and 9 share trained runs and their FBSEM-only evaluations, the baselines'
evaluation and the out-of-distribution test sets; chapters 8, 9 and 10 share the 3D
memory sweep. The chapters call these functions instead of spelling the requests out,
so that the requests cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from fbsembook import experiments as ex
from fbsembook.analysis import ood_sections
from fbsembook.memory import memory_3d_kwargs, memory_sweep

__all__ = [
    "TARGET_RUNS",
    "NETWORK_RUNS",
    "SEQUENTIAL_RUNS",
    "profile_dataset",
    "baseline_evaluation",
    "fbsem_evaluation",
    "named_run_evaluation",
    "original_run_evaluation",
    "seed_runs",
    "fbsem_evaluations",
    "ood_test_sets",
    "ood_datasets",
    "generalisation_evaluations",
    "memory_sweep_3d",
]

#: chapter 5 (and claims a, b): label -> named run; the two differ only in the targets
TARGET_RUNS: dict[str, str] = {"final target": "final-target", "iteration-dependent targets": "itdep-end-to-end"}
#: chapter 6 (and claim c): shared vs iteration-dependent networks, iteration-dependent targets
NETWORK_RUNS: dict[str, str] = {"shared": "shared-itdep", "iteration-dependent": "itdep-end-to-end"}
#: chapter 7 (and claim d): the same networks and targets, trained sequentially or end-to-end
SEQUENTIAL_RUNS: dict[str, str] = {"sequential": "sequential", "end-to-end": "itdep-end-to-end"}

_OOD_PARAMETERS = ("low_counts", "high_counts", "new_lesions", "ood_subjects", "ood_realisations")


def profile_dataset(profile: str) -> tuple[dict, Path]:
    """``(sections, data_dir)``: the profile's experiment sections and its (cached) dataset."""
    sections = ex.load_profile(profile)
    return sections, ex.dataset(sections)


def baseline_evaluation(sections: dict, data_dir: Path, device: str | None = None) -> dict:
    """The baselines (OSEM, post-filtered OSEM, MAP-EM) on the test split of ``data_dir``,
    strengths chosen on its validation split with the profile's ``baselines:`` section."""
    return ex.evaluate(None, data_dir, ex.baseline_config(sections), device=device)


def fbsem_evaluation(run: ex.Run, data_dir: Path, device: str | None = None) -> dict:
    """A trained run on the test split of ``data_dir``, FBSEM-Net only (the baselines are
    :func:`baseline_evaluation`)."""
    return ex.evaluate(run, data_dir, methods=("fbsem",), device=device)


def named_run_evaluation(profile: str, name: str, device: str | None = None, seed: int | None = None,
                         data_dir: Path | None = None) -> tuple[ex.Run, dict]:
    """``(run, evaluation)`` of the named run ``name`` (:data:`fbsembook.experiments.NAMED_RUNS`)
    with training ``seed`` (None: the profile's) on the profile's test split
    (:func:`fbsem_evaluation`)."""
    if data_dir is None:
        data_dir = profile_dataset(profile)[1]
    run = ex.named_run(profile, name, seed=seed, device=device)
    return run, fbsem_evaluation(run, data_dir, device)


def original_run_evaluation(profile: str, device: str | None = None,
                            data_dir: Path | None = None) -> tuple[ex.Run, dict]:
    """``(run, evaluation)`` of the original FBSEM-Net (chapter 4; claim g of chapter 9)."""
    return named_run_evaluation(profile, "original", device, data_dir=data_dir)


def seed_runs(profile: str, settings: Mapping[str, str], seeds: Sequence[int],
              device: str | None = None) -> dict[str, list[ex.Run]]:
    """``label -> [one run per seed]`` for ``settings`` (label -> named run, e.g.
    :data:`TARGET_RUNS`)."""
    return {label: [ex.named_run(profile, name, seed=s, device=device) for s in seeds]
            for label, name in settings.items()}


def fbsem_evaluations(runs: Mapping[str, Sequence[ex.Run]], data_dir: Path,
                      device: str | None = None) -> dict[str, list[dict]]:
    """:func:`fbsem_evaluation` of every run of :func:`seed_runs`, with the same labels."""
    return {label: [fbsem_evaluation(r, data_dir, device) for r in rs] for label, rs in runs.items()}


def ood_test_sets(profile: str, params: Mapping[str, Any]) -> dict[str, dict]:
    """The out-of-distribution test sets of chapter 5 (``"low counts"``, ``"high counts"``,
    ``"new lesions"`` -> experiment sections; :func:`fbsembook.analysis.ood_sections`) from
    its parameters ``low_counts``, ``high_counts``, ``new_lesions``, ``ood_subjects`` and
    ``ood_realisations``; empty when one of the first four is not set."""
    if not all(params.get(k) for k in _OOD_PARAMETERS[:4]):
        return {}
    return ood_sections(profile, *(params.get(k) for k in _OOD_PARAMETERS))


def ood_datasets(profile: str, params: Mapping[str, Any]) -> dict[str, Path]:
    """The (cached) datasets of :func:`ood_test_sets`."""
    return {name: ex.dataset(s) for name, s in ood_test_sets(profile, params).items()}


def generalisation_evaluations(runs: Mapping[str, Sequence[ex.Run]], data_dirs: Mapping[str, Path],
                               device: str | None = None) -> dict[str, dict[str, list[dict]]]:
    """``test set -> label -> [evaluation per run]``: every run of :func:`seed_runs` on the
    test split of every dataset of ``data_dirs`` (test set -> folder)."""
    return {name: fbsem_evaluations(runs, d, device) for name, d in data_dirs.items()}


def memory_sweep_3d(profile: str, Ks: Sequence[int], device: str | None = None,
                    problem: Mapping[str, Any] | None = None) -> dict:
    """The 3D memory sweep of chapter 8 (also shown by chapters 9 and 10):
    :func:`fbsembook.memory.memory_sweep` over ``Ks`` on ``problem`` (default: the profile's
    :data:`~fbsembook.memory.MEMORY_3D` problem)."""
    kwargs = dict(problem) if problem is not None else memory_3d_kwargs(profile)
    return memory_sweep(None, Ks=Ks, device=device, **kwargs)
