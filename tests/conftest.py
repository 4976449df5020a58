import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from markers import requires_cuda, requires_parallelproj  # noqa: F401  (re-exported)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def smoke_dataset(tmp_path_factory):
    """The `smoke` recipe simulated once per test session (about 5 s)."""
    from pathlib import Path

    from fbsemlib.data import load_data_config, simulate_dataset

    root = Path(__file__).resolve().parent.parent
    cfg = load_data_config(root / "data" / "smoke.yaml")
    out = tmp_path_factory.mktemp("smoke") / "dataset"
    simulate_dataset(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_model(smoke_dataset, tmp_path_factory):
    """A sequentially trained smoke-profile FBSEM-Net (seconds)."""
    from pathlib import Path

    from fbsemlib.cli import main

    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("smoke_model") / "model"
    rc = main(["train", "--config", str(root / "data" / "smoke.yaml"), "--data", str(smoke_dataset), "--out", str(out),
               "--mode", "sequential", "--no-progress"])
    assert rc == 0
    return out
