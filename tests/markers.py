"""Skip markers shared by the test modules (imported as ``from markers import ...``: a module
of its own, since ``conftest`` names two files of this test tree)."""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def _pp():
    try:
        import parallelproj  # noqa: F401

        return True
    except Exception:
        return False


requires_parallelproj = pytest.mark.skipif(not _pp(), reason="parallelproj not importable")
