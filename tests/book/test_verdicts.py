"""fbsembook.verdicts: the verdicts of the performance targets (pure functions of numbers)
and the book's thresholds (the papers' claims are tests/book/test_rules.py's)."""

from __future__ import annotations

import math

import pytest

from fbsembook import verdicts as V


# ----------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------
def test_memory_reduction():
    assert V.memory_reduction(2.0, 100.0) == pytest.approx(0.98)
    assert V.memory_reduction(0.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        V.memory_reduction(1.0, 0.0)
    with pytest.raises(ValueError):
        V.memory_reduction(float("nan"), 1.0)


def test_flatness():
    Ks = [1, 2, 5, 10, 20, 40, 60]
    flat = [5, 10, 100, 100, 101, 102, 105]  # K < 5 ignored
    assert V.flatness(Ks, flat) == pytest.approx(0.05)
    assert V.flatness(Ks, flat, k_min=1) == pytest.approx(20.0)
    assert V.flatness(Ks, flat, k_min=5, k_max=20) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        V.flatness([1, 2], [1.0, 2.0], k_min=5)


def test_linear_fit_and_extrapolation():
    a, b = V.linear_fit([1, 2, 3], [3, 5, 7])
    assert (a, b) == (pytest.approx(1.0), pytest.approx(2.0))
    assert V.extrapolate_linear([1, 2, 3], [3, 5, 7], 60) == pytest.approx(121.0)
    assert V.linear_fit([2], [4]) == (0.0, 2.0)
    assert V.linear_fit([2, 2], [4, 6]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        V.linear_fit([], [])


# ----------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------
def test_verdict_memory_reduction():
    assert V.verdict_memory_reduction(0.983).verdict == V.REPRODUCED
    assert V.verdict_memory_reduction(0.976).verdict == V.REPRODUCED  # rounds to 98 %
    assert V.verdict_memory_reduction(0.95).verdict == V.PARTLY
    assert V.verdict_memory_reduction(0.5).verdict == V.NOT_REPRODUCED
    assert V.verdict_memory_reduction(None).verdict == V.NOT_TESTED
    assert "extrapolated" in V.verdict_memory_reduction(0.99, extrapolated=True).reason


def test_verdict_flat():
    Ks = [1, 5, 10, 60]
    assert V.verdict_flat(Ks, [1, 100, 100, 105]).verdict == V.REPRODUCED
    assert V.verdict_flat(Ks, [1, 100, 100, 130]).verdict == V.NOT_REPRODUCED
    assert V.verdict_flat([1, 2], [1, 2]).verdict == V.NOT_TESTED


def test_training_time_ratio():
    # same epochs per module: the plain time ratio
    assert V.training_time_ratio(120.0, 6, 100.0, 6) == pytest.approx(1.2)
    # sequential with 1 epoch per module vs 2 end-to-end epochs
    assert V.training_time_ratio(60.0, 1, 100.0, 2) == pytest.approx(1.2)
    assert V.verdict_time_ratio(1.1).verdict == V.REPRODUCED
    assert V.verdict_time_ratio(1.3).verdict == V.NOT_REPRODUCED
    assert V.verdict_time_ratio(None).verdict == V.NOT_TESTED
    with pytest.raises(ValueError):
        V.training_time_ratio(1.0, 0, 1.0, 1)


def test_verdict_rejects_unknown_label():
    with pytest.raises(ValueError):
        V.Verdict("maybe", "")


def test_projector_targets():
    case = "2D parallel 128x128, 180x185"
    rows = [
        dict(case=case, impl="astra-cpu-joseph", device="cpu", batch=1, s_per_image=0.03),
        dict(case=case, impl="fbsemlib-torch-matrix", device="cpu", batch=1, s_per_image=0.005),
        dict(case=case, impl="fbsemlib-torch-matrix", device="cpu", batch=16, s_per_image=0.002),
        dict(case=case, impl="fbsemlib-torch-matrix", device="cuda", batch=16, s_per_image=0.0001),
        dict(case="2D mMR", impl="fbsemlib-torch-matrix", device="cpu", batch=1, s_per_image=1.0),
    ]
    t = V.projector_targets(rows)
    assert t["speedup_batch1"] == pytest.approx(6.0) and t["met_batch1"] is True
    assert t["speedup_batchN"] == pytest.approx(15.0) and t["met_batchN"] is False and t["batchN"] == 16
    empty = V.projector_targets(rows[1:])
    assert empty["speedup_batch1"] is None and empty["met_batch1"] is None



def test_the_thresholds_are_the_defaults_of_the_verdicts():
    """One place for each threshold: the constants are what the verdicts use by default."""
    import inspect

    defaults = {
        V.verdict_memory_reduction: {"claimed": V.MEMORY_CLAIM, "rounding": V.MEMORY_ROUNDING,
                                     "partial": V.MEMORY_PARTIAL},
        V.verdict_flat: {"tol": V.FLAT_TOLERANCE, "k_min": V.FLAT_FROM_K},
        V.verdict_time_ratio: {"target": V.TIME_RATIO_TARGET},
        V.projector_targets: {"target_batch1": V.PROJECTOR_SPEEDUP_BATCH1, "target_batchN": V.PROJECTOR_SPEEDUP_BATCHN},
    }
    for fn, expected in defaults.items():
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in expected} == expected, fn.__name__
    assert V.verdict_memory_reduction(V.MEMORY_CLAIM - V.MEMORY_ROUNDING).ok  # rounds to the claim
    assert not V.verdict_time_ratio(V.TIME_RATIO_TARGET * 1.01).ok
