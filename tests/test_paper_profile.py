"""A dry run of the ``paper`` profile on the CPU (issue 16): its own code paths (the mMR
geometry, 172 x 172 images, width-32 CNNs, its training settings) through simulate ->
train (sequential and end-to-end) -> evaluate, cut to one image per subject, one
iteration (K = 6 modules) and a couple of optimiser steps; and the 3D variant that
``data/paper.yaml`` describes, at two rings. It proves the profile runs end to end; it
measures nothing. Only sizes are overridden (checked against the written configuration)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fbsemlib.cli import main
from fbsemlib.config import diff, load_experiment, override_sections
from fbsemlib.evaluation.forecast import write_experiment

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "data" / "paper.yaml"

#: the sizes cut for the dry run (everything else is the paper profile's)
DRY_RUN_2D = {
    "data.num_subjects": 3, "data.split": {"train": 1, "validation": 1, "test": 1},
    "data.slices_per_subject": 1, "data.rotations_per_slice": 1,
    "data.noise_realisations": {"train": 1, "validation": 1, "test": 2},
    "data.num_iterations": 1, "data.reference_iterations": 2,
    "train.epochs": 2, "train.epochs_per_module": 1,
}
#: the 3D variant of data/paper.yaml's header (mMR rings 2 voxels apart: R rings, 2R - 1 slices), two
#: rings; K = 1 x 2 modules and one epoch (a 3D step of the width-32 CNN is slow on a CPU); simulated
#: on the reconstruction grid (the 2x finer in-plane grid of the paper's 2D recipe, tested by the 2D
#: dry run, would build a 3 x 344 x 344 system matrix: minutes on 2 cores for a run that measures nothing)
DRY_RUN_3D = {
    **DRY_RUN_2D, "data.name": "paper3d", "data.scanner": "mmr", "data.num_rings": 2, "data.max_ring_difference": 1,
    "data.image_shape": [3, 172, 172], "data.counts_range": [9.0e+7, 1.2e+8], "data.simulation_oversampling": 1,
    "data.noise_realisations": {"train": 1, "validation": 1, "test": 1}, "data.num_subsets": 2,
    "train.batch_size": 1, "train.epochs": 1,
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _run(*argv: str) -> None:
    assert main([*argv]) == 0, argv


def _check_run(run: Path, mode: str, K: int, overrides: dict) -> dict:
    """The run finished with finite metrics, and its configuration is the paper profile's
    except for the overridden sizes."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["num_modules"] == K
    assert metrics["steps"] >= 1
    assert _finite(metrics["val_eval"]["nrmse_reference"]) and _finite(metrics["train_time_s"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    paper = load_experiment(PAPER)
    assert diff({k: saved["model"][k] for k in paper["model"]}, paper["model"]) == []
    changed = {k.split(".", 1)[1] for k in overrides if k.startswith("train.")} | {"mode"}
    expected = {k: v for k, v in paper["train"].items() if k not in changed and k in saved["train"]}
    assert diff({k: saved["train"][k] for k in expected}, expected, rel_tol=1e-12) == []
    return metrics


def _simulate_and_train(tmp_path: Path, overrides: dict, scanner: str, shape: list, K: int) -> Path:
    """Simulate the cut paper profile and train it both ways through the CLI; returns the
    dataset folder (the runs are ``tmp_path / mode``)."""
    cfg = write_experiment(tmp_path / "paper_dry.yaml", override_sections(load_experiment(PAPER), overrides))
    data = tmp_path / "data"
    _run("simulate", "--config", str(cfg), "--out", str(data), "--no-progress")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["recipe"]["scanner"] == scanner and manifest["recipe"]["image_shape"] == shape
    for mode in ("sequential", "end-to-end"):
        out = tmp_path / mode
        _run("train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--mode", mode, "--no-progress")
        _check_run(out, mode, K, overrides)
    return data


@pytest.mark.slow
def test_paper_profile_dry_run_2d(tmp_path):
    data = _simulate_and_train(tmp_path, DRY_RUN_2D, "mmr2d", [1, 172, 172], 6)
    _run("evaluate", "--model", str(tmp_path / "sequential"), "--data", str(data))
    ev = json.loads((tmp_path / "sequential" / "evaluation.json").read_text())
    for method in ("fbsem", "osem", "osem_postfilter", "mapem_quadratic", "mapem_bowsher"):
        assert _finite(ev["summary"][method]["nrmse"]["mean"]), method


@pytest.mark.slow
def test_paper_profile_dry_run_3d(tmp_path):
    _simulate_and_train(tmp_path, DRY_RUN_3D, "mmr", [3, 172, 172], 2)
