"""The scripts in examples/ run as a researcher would run them, and give sane numbers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_reconstruct_phantom_map_em_beats_osem(capsys):
    scores = _load("reconstruct_phantom").main(["--counts", "3e5"])
    assert set(scores) == {"OSEM", "MAP-EM (Bowsher)"}
    assert all(np.isfinite(v) and 0 < v < 100 for v in scores.values())
    assert scores["MAP-EM (Bowsher)"] < scores["OSEM"]  # the MR-guided prior removes noise
    assert "NRMSE" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_example(tmp_path_factory):
    out = tmp_path_factory.mktemp("example")
    res = _load("train_sequential").main(["--out", str(out), "--subjects", "4", "--size", "32"])
    return out, res


def test_train_sequential_trains_every_module_and_evaluates(trained_example):
    out, res = trained_example
    assert (out / "run" / "model.pt").is_file()
    summary = res["evaluation"]["summary"]
    assert set(summary) == {"fbsem", "osem"}
    assert all(np.isfinite(summary[m]["nrmse"]["mean"]) for m in summary)
    assert res["metrics"]  # the trainer's final metrics


def test_reconstruct_sinogram_on_a_written_user_file(trained_example, tmp_path):
    out, _ = trained_example
    sino, recon = tmp_path / "scan.h5", tmp_path / "recon.npy"
    images = _load("reconstruct_sinogram").main(["--model", str(out / "run"), "--demo", str(out / "dataset"),
                                                 "--sinogram", str(sino), "--out", str(recon)])
    saved = np.load(recon)
    assert saved.shape == images["fbsem"].shape == images["osem"].shape
    assert np.isfinite(saved).all() and saved.max() > 0
    np.testing.assert_array_equal(saved, images["fbsem"])
