"""fbsembook.stats: paired margins, the hierarchical bootstrap, TOST, the spread ratio, Holm
and the verdict rule, on synthetic data whose true margin is known (seeded: deterministic)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fbsembook import stats as S


def _row(method, sample, subject, image, realisation, nrmse, **extra):
    return {"method": method, "strength": None, "sample": sample, "subject": subject, "image": image,
            "realisation": realisation, "nrmse": nrmse, **extra}


def _margins(mean: float, rng, subjects: int = 20, images: int = 10, seeds: int = 0, sd_subject: float = 0.03,
             sd_image: float = 0.03, sd_seed: float = 0.02) -> np.ndarray:
    """Margins ``mean + subject + image (+ seed + seed x image)`` effects: the population mean
    margin is ``mean``."""
    m = mean + rng.normal(0, sd_subject, (subjects, 1)) + rng.normal(0, sd_image, (subjects, images))
    if seeds:
        m = m[None] + rng.normal(0, sd_seed, (seeds, 1, 1)) + rng.normal(0, sd_seed / 2, (seeds, subjects, images))
    return m


# ----------------------------------------------------------------------------------------
# margins
# ----------------------------------------------------------------------------------------
def test_relative_margin_is_positive_when_new_is_better():
    assert S.relative_margin(9.0, 10.0) == pytest.approx(0.1)
    assert S.relative_margin(11.0, 10.0) == pytest.approx(-0.1)
    assert S.relative_margin(0.9, 0.8, better="higher") == pytest.approx(0.125)
    np.testing.assert_allclose(S.relative_margin([8.0, 12.0], [10.0, 10.0]), [0.2, -0.2])
    with pytest.raises(ValueError):
        S.relative_margin(1.0, 2.0, better="smaller")


def test_metric_by_image_averages_realisations_and_skips_undefined_values():
    ev = {"rows": [_row("fbsem", 0, 3, 0, 0, 10.0), _row("fbsem", 1, 3, 0, 1, 12.0),
                   _row("fbsem", 2, 3, 1, 0, None), _row("fbsem", 3, 5, 0, 0, float("nan")),
                   _row("fbsem", 4, 5, 1, 0, 7.0), _row("osem", 0, 3, 0, 0, 99.0)]}
    assert S.metric_by_image(ev, "fbsem", "nrmse") == {(3, 0): 11.0, (5, 1): 7.0}
    with pytest.raises(ValueError, match="no rows"):
        S.metric_by_image(ev, "mapem_bowsher", "nrmse")
    with pytest.raises(ValueError, match="subject"):
        S.metric_by_image({"rows": [_row("fbsem", 0, None, 0, 0, 1.0)]}, "fbsem", "nrmse")


def test_paired_margins_pair_by_subject_and_image():
    # two subjects (2 and 1 images), two realisations each; new is 10 % better on subject 0,
    # 20 % on subject 1; the reference has a value the new method lacks (left out)
    rows = []
    for s, im, ref, rel in ((0, 0, 10.0, 0.1), (0, 1, 20.0, 0.1), (1, 0, 10.0, 0.2)):
        for r, noise in enumerate((-0.5, 0.5)):
            rows += [_row("osem", len(rows), s, im, r, ref + noise), _row("fbsem", len(rows), s, im, r,
                                                                          ref * (1 - rel) + noise * (1 - rel))]
    rows.append(_row("osem", 99, 1, 1, 0, 5.0))
    pm = S.paired_margins({"rows": rows}, {"rows": rows}, new_method="fbsem", ref_method="osem")
    assert (pm.n_seeds, pm.n_subjects, pm.n_images) == (1, 2, 3)
    assert pm.subjects == (0, 1) and pm.images == ((0, 1), (0,))
    np.testing.assert_allclose(pm.values[0], [[0.1, 0.1], [0.2, np.nan]])
    assert pm.mean == pytest.approx(0.4 / 3)
    assert pm.ref_mean == pytest.approx(40 / 3)
    # one evaluation of the reference is paired with every seed of the new side
    three = S.paired_margins([{"rows": rows}] * 3, {"rows": rows}, new_method="fbsem", ref_method="osem")
    assert three.values.shape == (3, 2, 2)
    with pytest.raises(ValueError, match="pair"):
        S.paired_margins([{"rows": rows}] * 3, [{"rows": rows}] * 2, new_method="fbsem", ref_method="osem")


# ----------------------------------------------------------------------------------------
# the hierarchical bootstrap
# ----------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_centred_on_the_mean():
    m = _margins(0.05, np.random.default_rng(0))
    a, b = S.hierarchical_bootstrap(m, 2000, seed=3), S.hierarchical_bootstrap(m, 2000, seed=3)
    assert (a.low, a.high) == (b.low, b.high)
    assert a.estimate == pytest.approx(m.mean())
    assert a.low < a.estimate < a.high and a.level == 0.95
    c = S.hierarchical_bootstrap(m, 2000, seed=np.random.default_rng(4))
    assert (c.low, c.high) != (a.low, a.high)
    assert S.hierarchical_bootstrap(m, 100, levels=()).low == pytest.approx(m.mean())
    with pytest.raises(ValueError):
        S.hierarchical_bootstrap(m, 100, levels=("patients",))


def test_bootstrap_of_unequal_subjects_weights_each_image_once():
    m = np.array([[0.1, np.nan, 0.3], [np.nan, 0.4, np.nan], [np.nan, np.nan, np.nan]])
    iv = S.hierarchical_bootstrap(m, 500, seed=0)
    assert iv.estimate == pytest.approx(0.8 / 3)
    assert 0.1 <= iv.low <= iv.high <= 0.4  # only values of the data
    with pytest.raises(ValueError, match="same images"):
        S.hierarchical_bootstrap(np.array([[[0.1, 0.2]], [[0.1, np.nan]]]), 100)


def test_bootstrap_is_fast():
    m = _margins(0.05, np.random.default_rng(1))
    best = min(_timed(lambda: S.hierarchical_bootstrap(m, 10_000, seed=0)) for _ in range(3))
    assert best < 1.0, best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


@pytest.mark.parametrize("seeds", [0, 8])
def test_bootstrap_interval_covers_the_true_margin_about_95_percent_of_the_time(seeds):
    true = 0.05
    hits = 0
    for e in range(200):
        rng = np.random.default_rng(1000 + e)
        m = _margins(true, rng, subjects=20 if not seeds else 12, images=10 if not seeds else 6, seeds=seeds)
        hits += S.hierarchical_bootstrap(m, 2000, seed=rng).contains(true)
    assert 0.90 <= hits / 200 <= 0.99, hits


# ----------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------
def test_verdict_rule_on_intervals():
    eff, tie = 0.05, 0.01
    assert S.verdict((0.06, 0.09), eff, tie) == S.REPRODUCED
    assert S.verdict((0.02, 0.09), eff, tie) == S.DIRECTION_ONLY
    assert S.verdict((-0.02, 0.09), eff, tie) == S.INCONCLUSIVE
    assert S.verdict((-0.09, -0.02), eff, tie) == S.NOT_REPRODUCED  # the opposite effect
    assert S.verdict((-0.005, 0.008), eff, tie) == S.NOT_REPRODUCED  # inside the tie band
    assert S.verdict((0.002, 0.008), eff, tie) == S.NOT_REPRODUCED  # real but too small to matter
    assert S.verdict((0.06, 0.06), eff, tie) == S.REPRODUCED  # a measurement
    with pytest.raises(ValueError):
        S.verdict((0.0, 0.1), 0.01, 0.02)  # tie band wider than the minimum effect
    with pytest.raises(ValueError):
        S.verdict((0.1, 0.0), 0.05, 0.01)


@pytest.mark.parametrize("true, expected", [(0.0, S.INCONCLUSIVE), (0.15, S.REPRODUCED), (-0.1, S.NOT_REPRODUCED),
                                            (0.04, S.DIRECTION_ONLY)])
def test_verdict_of_synthetic_experiments(true, expected):
    rng = np.random.default_rng(7)
    m = _margins(true, rng, subjects=8, images=6, sd_subject=0.02, sd_image=0.03)
    m += true - m.mean()  # the sample's mean is the true one: the verdict depends on the spread only
    iv = S.hierarchical_bootstrap(m, 4000, seed=rng)
    assert S.verdict(iv, 0.05, 0.01) == expected, iv


def test_an_effect_of_zero_is_never_reproduced():
    for e in range(20):
        rng = np.random.default_rng(e)
        iv = S.hierarchical_bootstrap(_margins(0.0, rng, subjects=6, images=4), 1000, seed=rng)
        assert S.verdict(iv, 0.05, 0.01) in (S.INCONCLUSIVE, S.NOT_REPRODUCED)
    # precise enough: shown to be inside the tie band
    rng = np.random.default_rng(99)
    iv = S.hierarchical_bootstrap(_margins(0.0, rng, 40, 20, sd_subject=0.002, sd_image=0.002), 2000, seed=rng)
    assert S.verdict(iv, 0.05, 0.01) == S.NOT_REPRODUCED


def test_weakest_verdict_of_a_claim():
    assert S.weakest([S.REPRODUCED, S.DIRECTION_ONLY]) == S.DIRECTION_ONLY
    assert S.weakest([S.REPRODUCED, S.NOT_REPRODUCED, S.INCONCLUSIVE]) == S.NOT_REPRODUCED
    with pytest.raises(ValueError):
        S.weakest(["partly"])


# ----------------------------------------------------------------------------------------
# TOST, the spread ratio, Holm
# ----------------------------------------------------------------------------------------
def test_tost_accepts_identical_methods_and_rejects_a_big_difference():
    rng = np.random.default_rng(5)
    truth = rng.uniform(15, 25, (20, 10))
    ref = truth * (1 + rng.normal(0, 0.02, truth.shape))
    same = truth * (1 + rng.normal(0, 0.02, truth.shape))  # the same method, other noise
    t = S.tost(S.relative_margin(same, ref), margin=0.05, seed=0)
    assert t.equivalent and t.noninferior and t.p_value < 0.05
    assert t.interval.level == pytest.approx(0.90)
    assert -0.05 < t.interval.low < t.interval.high < 0.05
    assert S.noninferiority_verdict(t.interval, 0.05) == S.REPRODUCED
    worse = S.tost(S.relative_margin(same * 1.2, ref), margin=0.05, seed=0)
    assert not worse.equivalent and not worse.noninferior and worse.p_lower > 0.5
    assert S.noninferiority_verdict(worse.interval, 0.05) == S.NOT_REPRODUCED
    better = S.tost(S.relative_margin(same * 0.8, ref), margin=0.05, seed=0)
    assert better.noninferior and not better.equivalent
    # the p-values are the duals of the 90 % interval
    iv = S.hierarchical_bootstrap(S.relative_margin(same * 1.04, ref), 4000, seed=1)
    t = S.tost(iv, 0.05)
    assert (t.p_lower < 0.05) == (t.interval.low > -0.05)
    assert S.noninferiority_verdict((-0.08, 0.01), 0.05) == S.INCONCLUSIVE
    with pytest.raises(ValueError):
        S.tost(iv, 0.0)


def test_bootstrap_p_values():
    reps = np.array([-1.0, 1.0, 2.0, 3.0])
    assert S.bootstrap_p_value(reps, 0.0) == pytest.approx(2 / 5)
    assert S.bootstrap_p_value(reps, 0.0, "less") == pytest.approx(4 / 5)
    assert S.bootstrap_p_value(reps, 0.0, "two-sided") == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        S.bootstrap_p_value(reps, 0.0, "both")


def test_spread_ratio_interval_covers_the_true_ratio():
    hits = 0
    for e in range(200):
        rng = np.random.default_rng(2000 + e)
        sr = S.spread_ratio(rng.normal(20, 0.5, 10), rng.normal(21, 1.0, 10), 2000, seed=rng)
        hits += sr.interval.contains(0.5)
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_spread_ratio_numbers():
    sr = S.spread_ratio([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, None], 500, seed=0)
    assert (sr.std_new, sr.std_ref, sr.n_new, sr.n_ref) == (1.0, 2.0, 3, 3)
    assert sr.ratio == pytest.approx(0.5)
    assert sr.interval.low <= 0.5 <= sr.interval.high
    with pytest.raises(ValueError):
        S.spread_ratio([1.0], [1.0, 2.0])


def test_holm_matches_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    adjusted, rejected = S.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert rejected == [True, False, False, True]
    adj, rej = S.holm({"a": 0.5, "c": 0.001}, alpha=0.01)
    assert adj == pytest.approx({"a": 0.5, "c": 0.002}) and rej == {"a": False, "c": True}
    assert S.holm([0.9, 0.8])[0] == [1.0, 1.0]  # 0.8 x 2 caps at 1, then monotone
    with pytest.raises(ValueError):
        S.holm([0.1, 1.5])
