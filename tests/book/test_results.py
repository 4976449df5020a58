"""fbsembook.results: the results chapter's metrics with intervals, the share of the
removable error, the claims' data and the forest plot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fbsembook import results as R
from fbsembook import rules as RU
from fbsembook import stats as S


def _evaluation(values: dict[str, np.ndarray], floor: np.ndarray, realisations: int = 2) -> dict:
    """Rows for ``values[method][subject, image]`` (the same in every realisation) and the
    target floor of each image."""
    rows, sample = [], 0
    subjects, images = floor.shape
    for s in range(subjects):
        for i in range(images):
            for r in range(realisations):
                for m, v in values.items():
                    rows.append({"method": m, "sample": sample, "subject": s, "image": i, "realisation": r,
                                 "nrmse": float(v[s, i]), "ssim": 0.8, "target_floor": float(floor[s, i]),
                                 "nrmse_last_target": float(abs(v[s, i] - floor[s, i])), "crc_hot": 0.5,
                                 "crc_cold": None, "bv_wm": 3.0})
                sample += 1
    return {"rows": rows}


def test_mean_interval_covers_the_mean_and_orders_images():
    rng = np.random.default_rng(0)
    v = 20 + rng.normal(0, 1, (12, 3))
    ev = _evaluation({"osem": v}, np.full((12, 3), 15.0))
    arr = R.per_image(ev, "osem", "nrmse")
    assert arr.shape == (1, 12, 3)
    np.testing.assert_allclose(np.sort(arr.ravel()), np.sort(v.ravel()))
    iv = R.mean_interval(ev, "osem", "nrmse", n_boot=2000)
    assert iv.estimate == pytest.approx(v.mean())
    assert iv.low < v.mean() < iv.high and iv.high - iv.low < 2.0
    # several seeds: stacked, the interval widens with the seed-to-seed spread
    ev2 = _evaluation({"osem": v + 3.0}, np.full((12, 3), 15.0))
    both = R.mean_interval([ev, ev2], "osem", "nrmse", n_boot=2000)
    assert both.estimate == pytest.approx(v.mean() + 1.5)
    assert both.high - both.low > iv.high - iv.low
    with pytest.raises(ValueError):
        R.mean_interval(ev, "mapem_bowsher", "nrmse")


def test_removable_share_is_the_ratio_of_means():
    rng = np.random.default_rng(1)
    osem = 21 + rng.normal(0, 0.5, (10, 4))
    floor = 15 + rng.normal(0, 0.5, (10, 4))
    half = (osem + floor) / 2  # removes half of the removable error, image by image
    ev = _evaluation({"osem": osem, "fbsem": half}, floor)
    iv = R.removable_share(ev, "fbsem", ev, n_boot=2000)
    assert iv.estimate == pytest.approx(0.5)
    assert iv.low == pytest.approx(0.5) and iv.high == pytest.approx(0.5)  # exact per image: no spread
    noisy = _evaluation({"osem": osem, "fbsem": half + rng.normal(0, 0.5, (10, 4))}, floor)
    iv2 = R.removable_share(noisy, "fbsem", noisy, n_boot=2000)
    assert iv2.low < iv2.estimate < iv2.high
    assert R.removable_share(ev, "osem", ev).estimate == pytest.approx(0.0)


def test_method_table_formats_every_metric():
    rng = np.random.default_rng(2)
    osem = 21 + rng.normal(0, 0.5, (6, 2))
    floor = np.full((6, 2), 15.0)
    ev = _evaluation({"osem": osem, "fbsem": osem - 2}, floor)
    rows = R.method_table([("OSEM", ev, "osem"), ("FBSEM-Net", ev, "fbsem")], ev, n_boot=500)
    assert [r["method"] for r in rows] == ["OSEM", "FBSEM-Net"]
    assert set(rows[0]) == {"method", "share of removable error (%)", *(c for c, _, _ in R.TABLE_METRICS.values())}
    assert rows[0]["CRC cold"] == "-"  # no cold lesion: no number
    assert rows[0]["SSIM"].startswith("0.800 [0.800, 0.800]")
    assert rows[1]["share of removable error (%)"].startswith("33 ")  # 2 of the ~6 points removable


def _claims() -> dict:
    rng = np.random.default_rng(3)
    floor = np.full((8, 3), 15.0)
    osem = 21 + rng.normal(0, 0.3, (8, 3))
    base = _evaluation({"osem": osem, "osem_postfilter": osem - 0.5, "mapem_bowsher": osem - 1.0,
                        "mapem_quadratic": osem - 0.7}, floor)
    fb = lambda shift, seed: _evaluation(  # noqa: E731
        {"fbsem": osem - 5.0 + shift + np.random.default_rng(seed).normal(0, 0.2, (8, 3))}, floor)
    return R.claims_data(
        targets={"itdep-end-to-end": [fb(0.0, s) for s in range(3)], "final-target": [fb(0.5, 10 + s) for s in range(3)]},
        networks={"itdep-end-to-end": [fb(0.0, s) for s in range(2)], "shared-itdep": [fb(0.3, 20 + s) for s in range(2)]},
        sequential=fb(0.0, 30), end_to_end=fb(0.1, 31), baselines=base,
        generalisation={"low counts": {"itdep-end-to-end": [fb(0.0, 40)], "final-target": [fb(0.4, 41)]}},
        memory={"sequential": 1.0e6, "end-to-end": 1.0e8})


def test_claims_data_is_what_the_rules_take():
    data = _claims()
    assert sorted(data) == list("abcdefg")
    verdicts = RU.assess_all(RU.load_rules(), data)
    assert sorted(verdicts) == list("abcdefg")
    assert verdicts["e"].verdict == S.REPRODUCED  # 99 % less memory
    assert verdicts["a"].verdict == S.INCONCLUSIVE  # 3 seeds per arm: fewer than the rule's 10
    assert verdicts["f"].verdict == S.REPRODUCED  # 4 points of 20: beyond half the paper's margin
    # missing data leave the claim out (the chapter reports it as not tested)
    partial = R.claims_data(targets={}, networks={}, sequential={}, end_to_end={}, baselines={},
                            memory={"sequential": None, "end-to-end": 1.0})
    assert "e" not in partial and "b" not in partial
    rows = R.verdict_table(verdicts)
    assert len(rows) == 7 and rows[4]["claim"].startswith("(e)")
    assert "[" in rows[5]["margin [95 % CI]"] and rows[4]["margin [95 % CI]"].endswith("%")


def test_forest_plot_draws_every_comparison():
    import matplotlib.pyplot as plt

    verdicts = RU.assess_all(RU.load_rules(), _claims())
    ax = R.forest_plot(verdicts)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    n = sum(1 for v in verdicts.values() for c in v.comparisons if c.estimate is not None)
    assert len(labels) == n and labels[-1].startswith("(a)") and labels[0].startswith("(g)")  # (a) on top
    plt.close(ax.figure)
