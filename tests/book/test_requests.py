"""fbsembook.requests: the chapters that show the same results ask for them with the same
request, so that a cold book build computes each once (same cache keys, same paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fbsembook import experiments as ex
from fbsembook import requests as rq
from fbsembook.analysis import ood_sections
from fbsembook.chapters import chapter_defaults
from fbsembook.memory import memory_3d_kwargs

PROFILES = ("smoke", "cpu", "paper")


@pytest.fixture
def calls(monkeypatch, smoke_dataset):
    """Record the runs and evaluations asked for (nothing is trained or evaluated)."""
    log = {"runs": [], "evaluations": []}

    def named_run(profile, name, seed=None, overrides=None, progress=False, device=None):
        log["runs"].append((profile, name, seed, device))
        return ex.Run(Path(f"/runs/{profile}-{name}-{seed}"), "end-to-end", {}, {})

    def evaluate(run, data_dir, config=None, methods=None, device=None, progress=False):
        log["evaluations"].append((None if run is None else run.path, Path(data_dir), config, methods, device))
        return {"summary": {}}

    monkeypatch.setattr(ex, "named_run", named_run)
    monkeypatch.setattr(ex, "evaluate", evaluate)
    monkeypatch.setattr(ex, "dataset", lambda sections, progress=False: smoke_dataset)
    return log


def test_the_original_run_is_evaluated_as_in_chapter_4_and_9(calls, smoke_dataset):
    run, ev = rq.original_run_evaluation("smoke", "cpu")  # chapter 4
    rq.original_run_evaluation("smoke", "cpu", smoke_dataset)  # chapter 9 (its data folder at hand)
    assert calls["runs"] == [("smoke", "original", None, "cpu")] * 2
    assert calls["evaluations"] == [(run.path, smoke_dataset, None, ("fbsem",), "cpu")] * 2
    # the same request as a run of any seed (chapter 9's helper) and as chapter 7's evaluation of a run
    rq.named_run_evaluation("smoke", "original", "cpu", None, smoke_dataset)
    rq.fbsem_evaluation(run, smoke_dataset, "cpu")
    assert calls["evaluations"][2:] == calls["evaluations"][:2]


def test_seed_runs_and_their_evaluations(calls, smoke_dataset):
    runs = rq.seed_runs("smoke", rq.TARGET_RUNS, [0, 1], "cpu")  # chapter 5
    assert list(runs) == ["final target", "iteration-dependent targets"] and all(len(v) == 2 for v in runs.values())
    assert calls["runs"] == [("smoke", "final-target", 0, "cpu"), ("smoke", "final-target", 1, "cpu"),
                             ("smoke", "itdep-end-to-end", 0, "cpu"), ("smoke", "itdep-end-to-end", 1, "cpu")]
    evals = rq.fbsem_evaluations(runs, smoke_dataset, "cpu")
    assert [len(v) for v in evals.values()] == [2, 2]
    assert all(e[3] == ("fbsem",) and e[1] == smoke_dataset for e in calls["evaluations"])
    # chapter 9 asks for the same runs by name, with the same evaluation
    n = len(calls["evaluations"])
    for name in rq.TARGET_RUNS.values():
        for s in (0, 1):
            rq.named_run_evaluation("smoke", name, "cpu", s, smoke_dataset)
    assert calls["runs"][4:] == calls["runs"][:4] and calls["evaluations"][n:] == calls["evaluations"][:n]
    gen = rq.generalisation_evaluations(runs, {"in distribution": smoke_dataset, "other": Path("/x")}, "cpu")
    assert list(gen) == ["in distribution", "other"] and list(gen["other"]) == list(rq.TARGET_RUNS)
    assert calls["evaluations"][-1][1] == Path("/x")
    assert rq.NETWORK_RUNS["iteration-dependent"] == rq.TARGET_RUNS["iteration-dependent targets"]
    assert rq.SEQUENTIAL_RUNS["end-to-end"] == rq.TARGET_RUNS["iteration-dependent targets"]


def test_baseline_evaluation_is_the_default_of_every_chapter(monkeypatch, smoke_dataset):
    """``baseline_evaluation`` (the profile's ``baselines:`` section) is the evaluation that
    ``experiments.evaluate(None, data_dir)`` (the dataset's profile's section) caches."""
    paths = []
    monkeypatch.setattr(ex, "_cached_evaluation", lambda path, *a, **k: paths.append(path) or {})
    rq.baseline_evaluation(ex.load_profile("smoke"), smoke_dataset, "cpu")
    ex.evaluate(None, smoke_dataset, device="cpu")
    assert len(paths) == 2 and paths[0] == paths[1]


@pytest.mark.parametrize("profile", PROFILES)
def test_ood_test_sets_of_chapters_5_and_9(profile):
    """Chapter 9 reads chapter 5's parameters (``chapter_defaults``) and passes them to the
    same request: the same recipes, hence the same datasets."""
    p5 = chapter_defaults(5, profile)
    sets = rq.ood_test_sets(profile, p5)
    assert list(sets) == ["low counts", "high counts", "new lesions"]
    expected = ood_sections(profile, p5["low_counts"], p5["high_counts"], p5["new_lesions"], p5["ood_subjects"],
                            p5["ood_realisations"])
    assert sets == expected
    # chapter 9 resolves its own parameters from chapter 5's (nothing overridden)
    p9 = {k: p5.get(k) for k in ("ood_subjects", "low_counts", "high_counts", "new_lesions", "ood_realisations")}
    assert rq.ood_test_sets(profile, p9) == sets
    assert rq.ood_test_sets(profile, {**p9, "low_counts": []}) == {}  # not defined: not tested


def test_ood_datasets_are_the_datasets_of_the_test_sets(monkeypatch):
    monkeypatch.setattr(ex, "dataset", lambda sections, progress=False: Path("/data") / sections["data"]["name"])
    p5 = chapter_defaults(5, "smoke")
    dirs = rq.ood_datasets("smoke", p5)
    assert dirs == {"low counts": Path("/data/smoke-lowcounts"), "high counts": Path("/data/smoke-highcounts"),
                    "new lesions": Path("/data/smoke-newlesions")}


@pytest.mark.parametrize("profile", PROFILES)
def test_the_3d_memory_sweep_of_chapters_8_9_10(monkeypatch, profile):
    seen = []
    monkeypatch.setattr(rq, "memory_sweep", lambda config, **kw: seen.append((config, kw)) or {})
    Ks = chapter_defaults(8, profile)["mem_modules"]  # what chapters 9 and 10 read
    rq.memory_sweep_3d(profile, Ks, "cpu")  # chapters 9 and 10
    rq.memory_sweep_3d(profile, Ks, "cpu", memory_3d_kwargs(profile))  # chapter 8 (its default mem_problem)
    assert seen[0] == seen[1] == (None, {"Ks": Ks, "device": "cpu", **memory_3d_kwargs(profile)})
