"""fbsembook.claims: the papers' claims as data (rules written from the verdicts' thresholds)
and the assessment of each claim from the book's results."""

from __future__ import annotations

import pytest

from fbsembook import claims as CL
from fbsembook import verdicts as V


def _ev(nrmse: float, method: str = "fbsem", **others: float) -> dict:
    """An evaluation (the summary part of ``experiments.evaluate``) with test-mean NRMSEs."""
    summary = {method: {"nrmse": {"mean": nrmse, "std": 0.1, "n": 4}}}
    summary.update({m: {"nrmse": {"mean": v, "std": 0.1, "n": 4}} for m, v in others.items()})
    return {"summary": summary}


def test_the_claims_as_data():
    c = CL.PAPER_CLAIMS
    assert list(c) == ["a", "b", "c", "d", "e", "f", "g"]
    # the rules print the verdicts' thresholds (the texts of the results chapter)
    assert c["a"].rule == "lower std over seeds than the final target (within 10 %: partly)"
    assert c["c"].rule == "lower NRMSE than the shared network (within 1 %: partly)"
    assert c["d"].rule == "NRMSE at most 5% above end-to-end (10%: partly)"
    assert c["e"].rule == "reduction at K = 60 rounds to >= 98 % (>= 90 %: partly)"
    assert c["e"].title == "(e) sequential training: up to 98 % less memory (3D)"
    assert c["e"].source == "abstract (2022): 98 %"
    assert c["g"].source == "2021 paper: 14.4 / 17.7 / 20.7 %"
    assert [k for k, v in c.items() if v.needs_paper_scale] == ["a", "b", "c", "f", "g"]
    assert CL.paper_claims(0.1)["d"].rule == "NRMSE at most 10% above end-to-end (20%: partly)"
    assert f"{100 * V.CONSISTENCY_TIE:g} %" in c["a"].rule and f"{100 * V.LOWER_ERROR_TIE:g} %" in c["c"].rule


def test_assess_consistency():
    itdep = [_ev(10.0), _ev(10.2), _ev(10.1)]
    final = [_ev(10.0), _ev(11.0), _ev(12.0)]
    a = CL.assess_consistency(itdep, final)
    assert a.claim.key == "a" and a.verdict.verdict == V.REPRODUCED
    assert a.verdict.numbers["std_itdep"] == pytest.approx(0.1) and a.verdict.numbers["std_final"] == pytest.approx(1.0)
    assert a.ours == ("std of test NRMSE over 3 seed(s): it-dep targets 0.100, final target 1.000 "
                      "(percentage points)")
    one = CL.assess_consistency([_ev(10.0)], [_ev(11.0)])
    assert one.verdict.verdict == V.NOT_TESTED and "it-dep targets -, final target -" in one.ours


def test_assess_generalisation():
    a = CL.assess_generalisation(None)
    assert a.verdict.verdict == V.NOT_TESTED and a.ours == "see chapter 5"
    cmp = {"sets": {"low counts": {"candidate": 10.0, "baseline": 11.0},
                    "high counts": {"candidate": 9.0, "baseline": 8.5}}, "better": 1, "n_sets": 2}
    a = CL.assess_generalisation(cmp)
    assert a.verdict.verdict == V.PARTLY
    assert a.ours == "low counts: it-dep 10.00 vs final 11.00; high counts: it-dep 9.00 vs final 8.50"


def test_assess_networks_sequential_memory_baselines_ranking():
    a = CL.assess_networks([_ev(10.0), _ev(10.2)], [_ev(10.5), _ev(10.5)])
    assert a.verdict.verdict == V.REPRODUCED and a.verdict.numbers["new"] == pytest.approx(10.1)
    assert a.ours == "test NRMSE it-dep 10.10 % vs shared 10.50 % (mean over 2 seed(s))"

    d = CL.assess_sequential_accuracy(_ev(10.7), _ev(10.0))
    assert d.verdict.verdict == V.PARTLY and d.ours == "test NRMSE sequential 10.70 % vs end-to-end 10.00 %"
    assert CL.assess_sequential_accuracy(_ev(10.7), _ev(10.0), tolerance=0.1).verdict.verdict == V.REPRODUCED
    assert CL.assess_sequential_accuracy(_ev(10.7), _ev(10.0), tolerance=0.1).claim.rule.startswith(
        "NRMSE at most 10% above")

    sweep = {"resolved": {"image_shape": [4, 8, 8]},
             "rows": [{"mode": "end-to-end", "K": K, "status": "ok", "peak_bytes": 2.0**20 * K} for K in (1, 2)]
             + [{"mode": "end-to-end", "K": 60, "status": "oom"}]
             + [{"mode": "sequential", "K": K, "status": "ok", "peak_bytes": 2.0**19} for K in (1, 2, 60)]}
    e = CL.assess_memory(sweep, 60)
    assert e.verdict.numbers["extrapolated"] and e.verdict.numbers["end_to_end"] == pytest.approx(60 * 2.0**20)
    assert e.verdict.numbers["reduction"] == pytest.approx(1 - 0.5 / 60) and e.verdict.verdict == V.REPRODUCED
    assert e.ours == ("K = 60, (4, 8, 8) volume: end-to-end 60.0 MiB (extrapolated), sequential 0.50 MiB: "
                      "99.2 % less")

    baselines = _ev(20.0, "osem", osem_postfilter=17.0, mapem_bowsher=16.0)
    f = CL.assess_baselines(_ev(15.0), baselines)
    assert f.verdict.verdict == V.REPRODUCED
    assert f.ours == "FBSEM-Net 15.00 %, MAP-EM (Bowsher) 16.00 %, post-filtered OSEM 17.00 %"
    g = CL.assess_ranking(_ev(15.0), baselines)
    assert g.verdict.verdict == V.REPRODUCED and g.ours == "FBSEM-Net 15.00 %, MAP-EM 16.00 %, OSEM 20.00 %"
    assert CL.assess_ranking(_ev(16.5), baselines).verdict.verdict == V.NOT_REPRODUCED


def test_table_counts_and_takeaways():
    baselines = _ev(20.0, "osem", osem_postfilter=17.0, mapem_bowsher=16.0)
    assessments = [CL.assess_consistency([_ev(10.0)], [_ev(11.0)]), CL.assess_generalisation(None),
                   CL.assess_baselines(_ev(15.0), baselines), CL.assess_ranking(_ev(16.5), baselines)]
    rows = CL.claims_table(assessments)
    assert list(rows[0]) == ["claim", "verdict", "this book", "paper", "rule (this book's choice)", "chapter"]
    assert rows[2]["claim"] == CL.PAPER_CLAIMS["f"].title and rows[2]["chapter"] == "3, 7"
    counts = CL.verdict_counts(assessments)
    assert counts == {V.REPRODUCED: 1, V.PARTLY: 0, V.NOT_REPRODUCED: 1, V.NOT_TESTED: 2}
    machine = {"cpu": "Some CPU", "cores": 2, "gpu": None, "torch": "2.x"}
    lines = CL.takeaway_lines(assessments, "cpu", machine, n_seeds=1)
    assert lines[0] == ("- cpu profile on Some CPU (2 cores), torch 2.x: **1 reproduced**, **1 not reproduced**, "
                        "**2 not tested** of 4 claims.")
    assert lines[3] == f"- {CL.PAPER_CLAIMS['f'].title}: **reproduced** ({assessments[2].verdict.reason})."
    assert "accuracy claims (a, b, f, g)" in lines[5]
    assert lines[-1] == "- Claim (a) needs at least two training runs per setting; this profile trains 1."
    assert len(CL.takeaway_lines(assessments, "paper", machine, n_seeds=5)) == 5


def test_the_summaries_of_chapters_5_and_6():
    ok, partly, no = (V.Verdict(k, "") for k in (V.REPRODUCED, V.PARTLY, V.NOT_REPRODUCED))
    assert CL.consistency_summary({"nrmse": ok, "ssim": ok}) == \
        "reproduced (smaller across-run spread for NRMSE and SSIM)"
    assert CL.consistency_summary({"nrmse": no, "ssim": no}) == "not reproduced"
    assert CL.consistency_summary({"nrmse": ok, "ssim": partly}) == \
        "partly reproduced (nrmse: reproduced, ssim: partly)"
    assert CL.consistency_summary({"nrmse": ok, "ssim": V.Verdict(V.NOT_TESTED, "")}).startswith("cannot be assessed")

    assert CL.generalisation_summary({"better": 3, "n_sets": 3, "better_beyond_spread": 1}) == (
        "reproduced (lower error on every out-of-distribution set, on 1 of them by more than the across-run std)")
    assert CL.generalisation_summary({"better": 1, "n_sets": 3}) == (
        "partly reproduced (lower error on 1 of 3 out-of-distribution sets)")
    assert CL.generalisation_summary({"better": 0, "n_sets": 3}) == "not reproduced"
    assert CL.generalisation_summary({"better": 0, "n_sets": 0}) == "not reproduced"

    seeds = [{"a_better": True, "clear": True}, {"a_better": True, "clear": False}]
    assert CL.networks_summary(10.0, 10.5, seeds) == "reproduced (but within 2 standard errors for 1 of 2 seed(s))"
    assert CL.networks_summary(10.0, 10.5, seeds[:1]) == "reproduced"
    assert CL.networks_summary(10.0, 10.5, [seeds[0], {"a_better": False, "clear": False}]) == (
        "partly reproduced (lower mean NRMSE, but better for only 1 of 2 seeds)")
    assert CL.networks_summary(11.0, 10.5, seeds) == "not reproduced"
