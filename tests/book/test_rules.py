"""fbsembook.rules: the verdict rules file (claims_rules.yaml), its validation, and
``assess`` on synthetic evaluation dicts shaped like ``fbsembook.experiments.evaluate``'s."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import yaml

from fbsembook import rules as R
from fbsembook import stats as S

RULES = R.load_rules()
METHODS = ("osem", "osem_postfilter", "mapem_quadratic", "mapem_bowsher")


def evaluation(nrmse: dict[str, float], seed: int = 0, subjects: int = 10, images: int = 4, realisations: int = 2,
               sd_subject: float = 0.03, sd_image: float = 0.03, shift: float = 0.0) -> dict:
    """An evaluation like ``experiments.evaluate``'s: ``rows`` per method and test sample
    (subject, image, realisation). ``nrmse``: method -> the population mean NRMSE (%); each
    image's NRMSE varies by subject and image (the same test images in every evaluation,
    plus a part of each method and ``seed``); ``shift`` (relative) is added to every NRMSE
    of this run (a training run's own level)."""
    test_set = np.random.default_rng(12345)
    base = np.exp(test_set.normal(0, 0.1, (subjects, 1)) + test_set.normal(0, 0.1, (subjects, images)))
    rng = np.random.default_rng(seed)
    rows, sample = [], 0
    own = {m: rng.normal(0, sd_subject, (subjects, 1)) + rng.normal(0, sd_image, (subjects, images)) for m in nrmse}
    for s in range(subjects):
        for i in range(images):
            for r in range(realisations):
                for m, level in nrmse.items():
                    v = level * base[s, i] * (1 + own[m][s, i] + shift + rng.normal(0, 0.005))
                    rows.append({"method": m, "strength": None, "sample": sample, "subject": 100 + s, "image": i,
                                 "realisation": r, "nrmse": float(v), "psnr": 30.0, "ssim": 0.9,
                                 "crc_hot": None if i == 0 else 0.5, "crc_cold": 0.7, "bv_wm": 5.0})
                sample += 1
    return {"rows": rows, "summary": {}, "bias_std": {}, "sweep": None, "config": {"methods": list(nrmse)}}


def seeds(level: float, n: int, spread: float, start: int = 0, **kw) -> list[dict]:
    """``n`` training runs of FBSEM-Net whose test-mean NRMSE varies by ``spread`` (relative)."""
    shifts = np.random.default_rng(start + 7).normal(0, spread, n)
    return [evaluation({"fbsem": level}, seed=start + k, shift=float(shifts[k]), **kw) for k in range(n)]


def baselines(seed: int = 50, **nrmse) -> dict:
    """OSEM, post-filtered OSEM and MAP-EM about as far apart as in the 2021 paper."""
    return evaluation({"osem": 20.7, "osem_postfilter": 19.5, "mapem_quadratic": 18.5, "mapem_bowsher": 17.7,
                       **nrmse}, seed=seed)


# ----------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------
def test_the_book_rules_cover_every_claim():
    assert list(RULES.claims) == list("abcdefg")
    assert RULES.alpha == 0.05 and RULES.n_boot >= 10_000
    assert {k: r.test for k, r in RULES.claims.items()} == {
        "a": "spread_ratio", "b": "bootstrap", "c": "bootstrap", "d": "tost", "e": "measurement", "f": "bootstrap",
        "g": "bootstrap"}
    assert {k for k, r in RULES.claims.items() if r.family == "holm"} == set("acdfg")
    assert RULES["b"].family == "exploratory" and RULES["b"].per_test_set
    assert RULES["a"].min_seeds >= 10
    assert RULES["d"].equivalence_margin == 0.05
    f = RULES["f"].comparisons[0]
    assert f.paper_margin == pytest.approx((17.7 - 14.4) / 17.7)
    assert f.minimum_effect == pytest.approx(0.5 * f.paper_margin)
    assert (f.new, f.ref) == (R.Side("sequential"), R.Side("baselines", "mapem_bowsher"))
    for r in RULES.claims.values():
        for c in r.comparisons:
            assert r.test == "tost" or 0 <= c.tie_band <= c.minimum_effect


def test_rules_table_has_one_row_per_claim():
    rows = R.rules_table(RULES)
    assert [r["claim"][:3] for r in rows] == [f"({k})" for k in "abcdefg"]
    assert {"claim", "metric", "comparison", "test", "counts / tie", "family", "basis"} <= set(rows[0])
    assert "9.3 %" in rows[5]["counts / tie"] and "18.6 %" in rows[5]["counts / tie"]
    assert "equivalence margin 5.0 %" in rows[3]["counts / tie"]


def _doc() -> dict:
    return yaml.safe_load(R.RULES_PATH.read_text(encoding="utf-8"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="blue"), "unknown key"),
    (lambda d: d["claims"]["c"].update(tie_bnd=0.01), "unknown key"),
    (lambda d: d["claims"]["f"]["comparisons"][0].update(nwe={"run": "x"}), "unknown key"),
    (lambda d: d["claims"]["f"]["comparisons"][0]["ref"].update(mehtod="osem"), "unknown key"),
    (lambda d: d["claims"]["c"].pop("metric"), "missing key"),
    (lambda d: d["claims"]["c"].update(test="anova"), "not one of"),
    (lambda d: d["claims"]["c"].update(better="smaller"), "not one of"),
    (lambda d: d["claims"]["c"].update(tie_band=0.5), "outside"),
    (lambda d: d["claims"]["c"].update(minimum_effect=-0.1), "outside"),
    (lambda d: d["claims"]["d"].update(minimum_effect=0.1), "equivalence_margin, not"),
    (lambda d: d["claims"]["d"].pop("equivalence_margin"), "equivalence_margin"),
    (lambda d: d["claims"]["e"].update(family="holm"), "measurement"),
    (lambda d: d["claims"]["c"].update(family="none"), "measurement"),
    (lambda d: d["claims"]["f"]["comparisons"][0].pop("paper"), "share_of_paper"),
    (lambda d: d["claims"]["c"].update(comparisons=[]), "non-empty list"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(alpha=0.7), "outside"),
])
def test_invalid_rules_are_errors(edit, message):
    doc = copy.deepcopy(_doc())
    edit(doc)
    with pytest.raises(R.RulesError, match=message):
        R.parse_rules(doc)


def test_load_rules_names_the_file(tmp_path):
    p = tmp_path / "rules.yaml"
    doc = _doc()
    doc["claims"]["a"]["colour"] = "blue"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(R.RulesError, match=r"rules.yaml: claims\.a: unknown key"):
        R.load_rules(p)
    p.write_text("claims: [")
    with pytest.raises(R.RulesError, match="YAML"):
        R.load_rules(p)


# ----------------------------------------------------------------------------------------
# assess
# ----------------------------------------------------------------------------------------
def test_beats_baselines_by_a_large_margin_is_reproduced():
    v = R.assess(RULES["f"], {"sequential": evaluation({"fbsem": 15.0}, seed=1), "baselines": baselines()})
    assert v.verdict == S.REPRODUCED and v.ok
    assert [c.label for c in v.comparisons] == ["FBSEM-Net vs MAP-EM (Bowsher)", "FBSEM-Net vs post-filtered OSEM"]
    c = v.comparisons[0]
    assert c.low < (17.7 - 15.0) / 17.7 < c.high and c.level == 0.95
    assert c.numbers["subjects"] == 10 and c.numbers["images"] == 40 and c.numbers["seeds"] == 1
    assert c.numbers["new_mean"] < c.numbers["ref_mean"]
    assert v.p_value == max(x.p_value for x in v.comparisons) and v.p_value < 0.01
    assert "margin +" in v.reason and "minimum effect 9.3 %" in v.reason
    assert R.assess(RULES["f"], {"sequential": evaluation({"fbsem": 15.0}, seed=1), "baselines": baselines()}) == v


def test_a_small_margin_is_direction_only_and_no_margin_is_not_reproduced():
    small = R.assess(RULES["f"], {"sequential": evaluation({"fbsem": 16.7}, seed=1), "baselines": baselines()})
    assert small.verdict == S.DIRECTION_ONLY  # about 6 %: beyond 0, short of 9.3 %
    none = R.assess(RULES["f"], {"sequential": evaluation({"fbsem": 17.7}, seed=1, subjects=4),
                                 "baselines": baselines()})
    assert none.verdict in (S.INCONCLUSIVE, S.NOT_REPRODUCED)
    assert any("fewer than 8" in n for n in none.notes)
    worse = R.assess(RULES["f"], {"sequential": evaluation({"fbsem": 25.0}, seed=1), "baselines": baselines()})
    assert worse.verdict == S.NOT_REPRODUCED


def test_ranking_needs_every_step():
    ok = R.assess(RULES["g"], {"sequential": evaluation({"fbsem": 15.0}, seed=2), "baselines": baselines()})
    assert ok.verdict == S.REPRODUCED
    # MAP-EM no better than OSEM: the second step fails, so does the claim
    tied = R.assess(RULES["g"], {"sequential": evaluation({"fbsem": 15.0}, seed=2),
                                 "baselines": baselines(mapem_bowsher=20.7)})
    assert tied.comparisons[0].verdict == S.REPRODUCED
    assert tied.verdict == tied.comparisons[1].verdict != S.REPRODUCED


def test_networks_claim_resamples_training_seeds():
    v = R.assess(RULES["c"], {"itdep-end-to-end": seeds(18.0, 5, 0.01), "shared-itdep": seeds(20.0, 5, 0.01, 10)})
    assert v.verdict == S.REPRODUCED
    assert v.comparisons[0].numbers["seeds"] == 5
    with pytest.raises(ValueError, match="pair"):
        R.assess(RULES["c"], {"itdep-end-to-end": seeds(18.0, 3, 0.01), "shared-itdep": seeds(20.0, 2, 0.01)})


def test_sequential_accuracy_by_tost():
    kw = {"sd_subject": 0.01, "sd_image": 0.01}
    e2e = seeds(20.0, 1, 0.0, 30, **kw)
    same = R.assess(RULES["d"], {"sequential": seeds(20.0, 1, 0.0, 40, **kw), "itdep-end-to-end": e2e})
    assert same.verdict == S.REPRODUCED
    c = same.comparisons[0]
    assert c.level == pytest.approx(0.90) and c.p_value == c.numbers["p_lower"] < 0.05
    assert c.numbers["equivalent"]
    worse = R.assess(RULES["d"], {"sequential": seeds(24.0, 1, 0.0, 40), "itdep-end-to-end": e2e})
    assert worse.verdict == S.NOT_REPRODUCED
    better = R.assess(RULES["d"], {"sequential": seeds(16.0, 1, 0.0, 40), "itdep-end-to-end": e2e})
    assert better.verdict == S.REPRODUCED and not better.comparisons[0].numbers["equivalent"]


def test_consistency_by_spread_ratio_needs_enough_seeds():
    kw = {"subjects": 3, "images": 2, "realisations": 1, "sd_subject": 0.0, "sd_image": 0.0}
    data = {"itdep-end-to-end": seeds(20.0, 10, 0.002, **kw), "final-target": seeds(20.0, 10, 0.03, 100, **kw)}
    v = R.assess(RULES["a"], data)
    assert v.verdict == S.REPRODUCED, v
    n = v.comparisons[0].numbers
    assert n["ratio"] < 0.3 and n["ratio_low"] <= n["ratio"] <= n["ratio_high"]
    assert (n["seeds_new"], n["seeds_ref"]) == (10, 10)
    few = R.assess(RULES["a"], {k: evs[:5] for k, evs in data.items()})
    assert few.verdict == S.INCONCLUSIVE and "asks for 10 seeds" in few.reason
    one = R.assess(RULES["a"], {k: evs[:1] for k, evs in data.items()})
    assert one.verdict == R.NOT_TESTED and one.p_value is None
    # numbers per run are taken as they are
    nums = R.assess(RULES["a"], {"itdep-end-to-end": list(np.linspace(20, 20.1, 10)),
                                 "final-target": list(np.linspace(19, 21, 10))})
    assert nums.comparisons[0].numbers["ratio"] == pytest.approx(0.05)


def test_memory_is_a_measurement():
    def verdict(seq):
        return R.assess(RULES["e"], {"sequential": seq, "end-to-end": 100.0})

    assert verdict(1.7).verdict == S.REPRODUCED
    assert verdict(50.0).verdict == S.DIRECTION_ONLY
    assert verdict(95.0).verdict == S.NOT_REPRODUCED
    assert verdict(1.7).p_value is None and verdict(1.7).family_label == "measurement"


def test_generalisation_on_every_test_set():
    def sets(levels):
        return {name: {"itdep-end-to-end": seeds(lvl, 2, 0.005, 10 * k),
                       "final-target": seeds(20.0, 2, 0.005, 10 * k + 5)}
                for k, (name, lvl) in enumerate(levels.items())}

    v = R.assess(RULES["b"], sets({"low counts": 18.0, "high counts": 18.5, "new lesions": 18.0}))
    assert v.verdict == S.REPRODUCED
    assert [c.label.split("(")[-1] for c in v.comparisons] == ["low counts)", "high counts)", "new lesions)"]
    assert any("exploratory" in n for n in v.notes)
    mixed = R.assess(RULES["b"], sets({"low counts": 18.0, "high counts": 22.0}))
    assert mixed.verdict == S.NOT_REPRODUCED
    assert R.assess(RULES["b"], {}).verdict == R.NOT_TESTED


def test_missing_and_absent_data():
    with pytest.raises(KeyError, match="baselines"):
        R.assess(RULES["f"], {"sequential": evaluation({"fbsem": 15.0})})
    v = R.assess(RULES["f"], {"sequential": None, "baselines": baselines()})
    assert v.verdict == R.NOT_TESTED


def _claim(key: str, verdict: str, p: float | None) -> R.ClaimVerdict:
    return R.ClaimVerdict(RULES[key], verdict, "synthetic", (), p)


def test_holm_correction_over_the_family():
    got = R.apply_holm({"a": _claim("a", S.REPRODUCED, 0.001), "c": _claim("c", S.DIRECTION_ONLY, 0.03),
                        "d": _claim("d", S.REPRODUCED, 0.02), "b": _claim("b", S.DIRECTION_ONLY, 0.04),
                        "e": _claim("e", S.REPRODUCED, None)})
    # family a, c, d: 0.001 x 3, 0.02 x 2, 0.03 x 1 -> 0.003, 0.04, 0.04
    assert got["a"].p_holm == pytest.approx(0.003) and got["a"].verdict == S.REPRODUCED
    assert got["d"].p_holm == pytest.approx(0.04) and got["d"].verdict == S.REPRODUCED
    assert got["c"].p_holm == pytest.approx(0.04) and got["c"].verdict == S.DIRECTION_ONLY
    assert got["b"].p_holm is None and got["b"].verdict == S.DIRECTION_ONLY  # exploratory: unadjusted
    assert got["e"].p_holm is None
    strict = R.apply_holm({"a": _claim("a", S.REPRODUCED, 0.001), "c": _claim("c", S.DIRECTION_ONLY, 0.03),
                           "f": _claim("f", S.NOT_REPRODUCED, 0.9)})
    # 0.001 x 3, 0.03 x 2 = 0.06: c loses its direction
    assert strict["c"].verdict == S.INCONCLUSIVE and "Holm" in strict["c"].notes[-1]
    assert strict["f"].verdict == S.NOT_REPRODUCED and strict["f"].p_holm == 0.9
    assert strict["c"].row()["p (Holm)"] == "0.06"


def test_assess_all_in_the_rules_order():
    data = {"g": {"sequential": evaluation({"fbsem": 15.0}, seed=2), "baselines": baselines()},
            "e": {"sequential": 1.0, "end-to-end": 100.0},
            "f": {"sequential": evaluation({"fbsem": 15.0}, seed=2), "baselines": baselines()}}
    got = R.assess_all(RULES, data)
    assert list(got) == ["e", "f", "g"]
    assert all(v.verdict == S.REPRODUCED for v in got.values())
    assert got["f"].p_holm is not None and got["e"].p_holm is None
    with pytest.raises(KeyError):
        R.assess_all(RULES, {"z": {}})
    assert dataclasses.asdict(got["e"].comparisons[0])["verdict"] == S.REPRODUCED
