"""fbsembook.verdicts: the verdicts of the papers' claims and of the performance targets
(pure functions of numbers) and the book's thresholds."""

from __future__ import annotations

import math

import pytest

from fbsembook import verdicts as V


# ----------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------
def test_relative_difference_and_reduction():
    assert V.relative_difference(11.0, 10.0) == pytest.approx(0.1)
    assert V.relative_difference(9.0, 10.0) == pytest.approx(-0.1)
    assert V.memory_reduction(2.0, 100.0) == pytest.approx(0.98)
    assert V.memory_reduction(0.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        V.relative_difference(1.0, 0.0)
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


def test_seed_std():
    assert V.seed_std([1.0]) is None
    assert V.seed_std([]) is None
    assert V.seed_std([1.0, 3.0]) == pytest.approx(math.sqrt(2.0))
    assert V.seed_std([2.0, 2.0, 2.0]) == 0.0


# ----------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------
def test_verdict_consistency():
    assert V.verdict_consistency(None, None, 1).verdict == V.NOT_TESTED
    assert V.verdict_consistency(0.1, 0.5, 1).verdict == V.NOT_TESTED  # one seed: no std
    assert V.verdict_consistency(0.1, 0.5, 2).verdict == V.REPRODUCED
    assert V.verdict_consistency(0.48, 0.5, 2).verdict == V.PARTLY  # lower, within 10 %
    assert V.verdict_consistency(0.52, 0.5, 5).verdict == V.PARTLY  # higher, within 10 %
    assert V.verdict_consistency(0.8, 0.5, 5).verdict == V.NOT_REPRODUCED
    assert V.verdict_consistency(0.0, 0.0, 3).verdict == V.PARTLY
    assert V.verdict_consistency(float("nan"), 0.5, 3).verdict == V.NOT_TESTED  # seed_spread's NaN std
    v = V.verdict_consistency(0.1, 0.5, 2, sample_stds=(0.2, 0.4))
    assert v.numbers["ratio"] == pytest.approx(0.2) and v.numbers["sample_ratio"] == pytest.approx(0.5)
    assert "per-sample std ratio 0.50" in v.reason
    assert "sample_ratio" not in V.verdict_consistency(0.1, 0.5, 2).numbers


def test_verdict_lower_error():
    assert V.verdict_lower_error(10.0, 10.5).verdict == V.REPRODUCED
    assert V.verdict_lower_error(10.05, 10.0).verdict == V.PARTLY
    assert V.verdict_lower_error(11.0, 10.0).verdict == V.NOT_REPRODUCED
    assert V.verdict_lower_error(None, 10.0).verdict == V.NOT_TESTED
    v = V.verdict_lower_error(9.0, 10.0)
    assert v.numbers["relative"] == pytest.approx(-0.1) and v.ok


def test_verdict_no_notable_loss():
    assert V.verdict_no_notable_loss(10.4, 10.0).verdict == V.REPRODUCED
    assert V.verdict_no_notable_loss(9.0, 10.0).verdict == V.REPRODUCED  # better is fine
    assert V.verdict_no_notable_loss(10.8, 10.0).verdict == V.PARTLY
    assert V.verdict_no_notable_loss(12.0, 10.0).verdict == V.NOT_REPRODUCED
    assert V.verdict_no_notable_loss(12.0, 10.0, tol=0.25).verdict == V.REPRODUCED
    assert V.verdict_no_notable_loss(float("nan"), 10.0).verdict == V.NOT_TESTED


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


def test_verdict_count():
    assert V.verdict_count(3, 3).verdict == V.REPRODUCED
    assert V.verdict_count(1, 3).verdict == V.PARTLY
    assert V.verdict_count(0, 3).verdict == V.NOT_REPRODUCED
    assert V.verdict_count(0, 0).verdict == V.NOT_TESTED
    assert V.verdict_count(None, 3).verdict == V.NOT_TESTED
    with pytest.raises(ValueError):
        V.verdict_count(4, 3)


def test_verdict_beats_and_ranking():
    assert V.verdict_beats(10.0, {"MAP-EM": 12.0, "PF-OSEM": 11.0}).verdict == V.REPRODUCED
    assert V.verdict_beats(11.5, {"MAP-EM": 12.0, "PF-OSEM": 11.0}).verdict == V.PARTLY
    assert V.verdict_beats(13.0, {"MAP-EM": 12.0, "PF-OSEM": 11.0}).verdict == V.NOT_REPRODUCED
    assert V.verdict_beats(None, {"MAP-EM": 12.0}).verdict == V.NOT_TESTED
    paper = {"FBSEM": 14.4, "MAP-EM": 17.7, "OSEM": 20.7}
    assert V.ranking(paper) == ["FBSEM", "MAP-EM", "OSEM"]
    assert V.verdict_ranking({"FBSEM": 5, "MAP-EM": 6, "OSEM": 7}, paper).verdict == V.REPRODUCED
    assert V.verdict_ranking({"FBSEM": 5, "MAP-EM": 8, "OSEM": 7}, paper).verdict == V.PARTLY
    assert V.verdict_ranking({"FBSEM": 9, "MAP-EM": 8, "OSEM": 7}, paper).verdict == V.NOT_REPRODUCED
    assert V.verdict_ranking({"FBSEM": 9}, paper).verdict == V.NOT_TESTED


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
        V.verdict_consistency: {"tie": V.CONSISTENCY_TIE},
        V.verdict_lower_error: {"tie": V.LOWER_ERROR_TIE},
        V.verdict_no_notable_loss: {"tol": V.ACCURACY_TOLERANCE, "partial": V.ACCURACY_PARTIAL},
        V.verdict_memory_reduction: {"claimed": V.MEMORY_CLAIM, "rounding": V.MEMORY_ROUNDING,
                                     "partial": V.MEMORY_PARTIAL},
        V.verdict_flat: {"tol": V.FLAT_TOLERANCE, "k_min": V.FLAT_FROM_K},
        V.verdict_time_ratio: {"target": V.TIME_RATIO_TARGET},
        V.projector_targets: {"target_batch1": V.PROJECTOR_SPEEDUP_BATCH1, "target_batchN": V.PROJECTOR_SPEEDUP_BATCHN},
    }
    for fn, expected in defaults.items():
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in expected} == expected, fn.__name__
    assert V.ACCURACY_PARTIAL == 2 * V.ACCURACY_TOLERANCE  # "twice the tolerance: partly" (chapters 7 and 9)
    assert V.verdict_memory_reduction(V.MEMORY_CLAIM - V.MEMORY_ROUNDING).ok  # rounds to the claim
    assert not V.verdict_time_ratio(V.TIME_RATIO_TARGET * 1.01).ok
