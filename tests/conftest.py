import os

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def _pp():
    try:
        import parallelproj  # noqa: F401

        return True
    except Exception:
        return False


requires_parallelproj = pytest.mark.skipif(not _pp(), reason="parallelproj not importable")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
