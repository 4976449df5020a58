"""The papers' claims as data, and how the book assesses each from its runs.

:data:`PAPER_CLAIMS` lists the claims (a)-(g) of the 2022 paper (Corda-D'Incan et al.) and
the original FBSEM-Net paper (Mehranian & Reader 2021) that the results chapter checks:
what is claimed, where, the book's rule (its thresholds are the named constants of
:mod:`fbsembook.verdicts`, so the rule text and the verdict cannot disagree) and the
chapters that show it. Each ``assess_*`` function turns the results of the book's runs
into an :class:`Assessment`: this book's numbers as one line of text and the
:class:`~fbsembook.verdicts.Verdict`. The results chapter only calls these and shows the
rows (:func:`claims_table`) and the take-aways (:func:`takeaway_lines`); the chapters that
study one claim in depth summarise their own comparisons with :func:`consistency_summary`
(chapter 5, claim a), :func:`generalisation_summary` (chapter 5, claim b) and
:func:`networks_summary` (chapter 6, claim c).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from fbsembook import verdicts as V
from fbsembook.experiments import method_mean
from fbsembook.memory import sweep_value

__all__ = [
    "PAPER_2021_NRMSE",
    "PAPER_MODULES",
    "Claim",
    "PAPER_CLAIMS",
    "paper_claims",
    "Assessment",
    "assess_consistency",
    "assess_generalisation",
    "assess_networks",
    "assess_sequential_accuracy",
    "assess_memory",
    "assess_baselines",
    "assess_ranking",
    "claims_table",
    "verdict_counts",
    "takeaway_lines",
    "consistency_summary",
    "generalisation_summary",
    "networks_summary",
]

#: Test NRMSE (%) of the 2021 FBSEM-Net paper on its 2D BrainWeb data
PAPER_2021_NRMSE: dict[str, float] = {"FBSEM-Net": 14.4, "MAP-EM": 17.7, "OSEM": 20.7}
#: The 2022 paper's unrolled modules (10 iterations x 6 subsets), where it measures memory
PAPER_MODULES = 60


def _pct(x: float) -> str:
    """``0.1`` -> ``"10 %"``."""
    return f"{round(100 * x, 6):g} %"


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim of the papers: ``key`` ("a".."g"), the ``statement``, its ``source``, the
    book's ``rule`` for the verdict, the ``chapters`` that show it and whether its verdict
    ``needs_paper_scale``: an accuracy of trained networks, which the ``smoke`` and ``cpu``
    profiles test on a scale far below the paper's (not so a comparison of two trainings
    of the same networks, (d), nor the memory, (e))."""

    key: str
    statement: str
    source: str
    rule: str
    chapters: str
    needs_paper_scale: bool = True

    @property
    def title(self) -> str:
        return f"({self.key}) {self.statement}"


def paper_claims(accuracy_tolerance: float = V.ACCURACY_TOLERANCE) -> dict[str, Claim]:
    """The claims (a)-(g), keyed by letter; ``accuracy_tolerance``: the relative NRMSE loss
    of sequential training that claim (d) calls "not notable" (partly: twice that)."""
    paper_nrmse = " / ".join(f"{v:g}" for v in PAPER_2021_NRMSE.values())
    claims = [
        Claim("a", "iteration-dependent targets make training more consistent across runs", "abstract (2022)",
              f"lower std over seeds than the final target (within {_pct(V.CONSISTENCY_TIE)}: partly)", "5"),
        Claim("b", "iteration-dependent targets generalise better", "abstract (2022)",
              "lower NRMSE than the final target on every out-of-distribution set (some: partly)", "5"),
        Claim("c", "iteration-dependent networks reduce the error slightly", "abstract (2022)",
              f"lower NRMSE than the shared network (within {_pct(V.LOWER_ERROR_TIE)}: partly)", "6"),
        Claim("d", "sequential training does not notably hurt accuracy", "abstract (2022)",
              f"NRMSE at most {accuracy_tolerance:.0%} above end-to-end ({2 * accuracy_tolerance:.0%}: partly)",
              "7", needs_paper_scale=False),
        Claim("e", f"sequential training: up to {_pct(V.MEMORY_CLAIM)} less memory (3D)",
              f"abstract (2022): {_pct(V.MEMORY_CLAIM)}",
              f"reduction at K = {PAPER_MODULES} rounds to >= {_pct(V.MEMORY_CLAIM)} "
              f"(>= {_pct(V.MEMORY_PARTIAL)}: partly)", "8", needs_paper_scale=False),
        Claim("f", "FBSEM-Net beats MAP-EM (Bowsher) and post-filtered OSEM", "2021 and 2022 papers",
              "lower NRMSE than both (one: partly)", "3, 7"),
        Claim("g", "NRMSE ranking FBSEM-Net < MAP-EM < OSEM", f"2021 paper: {paper_nrmse} %",
              "same ranking (same best method: partly)", "3, 4, 7"),
    ]
    return {c.key: c for c in claims}


#: The claims with the default thresholds
PAPER_CLAIMS: dict[str, Claim] = paper_claims()


@dataclasses.dataclass
class Assessment:
    """A claim, this book's numbers (``ours``, one line) and the verdict."""

    claim: Claim
    ours: str
    verdict: V.Verdict

    def row(self) -> dict:
        """The claim's row of the results table."""
        c = self.claim
        return {"claim": c.title, "verdict": self.verdict.verdict, "this book": self.ours, "paper": c.source,
                "rule (this book's choice)": c.rule, "chapter": c.chapters}


def _claim(key: str, claims: Mapping[str, Claim] | None) -> Claim:
    return (claims or PAPER_CLAIMS)[key]


# ----------------------------------------------------------------------------------------
# one function per claim
# ----------------------------------------------------------------------------------------
def assess_consistency(itdep: Sequence[Mapping], final: Sequence[Mapping],
                       claims: Mapping[str, Claim] | None = None) -> Assessment:
    """(a) From the evaluations of the runs (one per training seed) with iteration-dependent
    targets and with the final target: the standard deviation over seeds of the test-mean
    NRMSE (:func:`~fbsembook.verdicts.verdict_consistency`)."""
    n = min(len(itdep), len(final))
    std_itdep, std_final = (V.seed_std([method_mean(ev) for ev in evs]) for evs in (itdep, final))
    fmt = lambda s: "-" if s is None else f"{s:.3f}"  # noqa: E731
    ours = (f"std of test NRMSE over {n} seed(s): it-dep targets {fmt(std_itdep)}, "
            f"final target {fmt(std_final)} (percentage points)")
    return Assessment(_claim("a", claims), ours, V.verdict_consistency(std_itdep, std_final, n))


def assess_generalisation(comparison: Mapping | None, claims: Mapping[str, Claim] | None = None) -> Assessment:
    """(b) From :func:`fbsembook.analysis.generalisation_verdict` of iteration-dependent
    targets (candidate) against the final target (baseline) on the out-of-distribution
    test sets; None when the test sets are not defined."""
    claim = _claim("b", claims)
    if comparison is None:
        return Assessment(claim, "see chapter 5",
                          V.Verdict(V.NOT_TESTED, "see chapter 5 (its out-of-distribution settings were not found)"))
    ours = "; ".join(f"{s}: it-dep {d['candidate']:.2f} vs final {d['baseline']:.2f}"
                     for s, d in comparison["sets"].items())
    return Assessment(claim, ours, V.verdict_count(comparison["better"], comparison["n_sets"],
                                                   "out-of-distribution test sets"))


def assess_networks(itdep: Sequence[Mapping], shared: Sequence[Mapping],
                    claims: Mapping[str, Claim] | None = None) -> Assessment:
    """(c) Iteration-dependent against shared networks: the test NRMSE averaged over the
    runs (seeds) of each."""
    nr_i, nr_s = (float(np.mean([method_mean(ev) for ev in evs])) for evs in (itdep, shared))
    ours = f"test NRMSE it-dep {nr_i:.2f} % vs shared {nr_s:.2f} % (mean over {len(itdep)} seed(s))"
    return Assessment(_claim("c", claims), ours,
                      V.verdict_lower_error(nr_i, nr_s, what="it-dep networks", ref="shared network"))


def assess_sequential_accuracy(sequential: Mapping, end_to_end: Mapping,
                               tolerance: float = V.ACCURACY_TOLERANCE) -> Assessment:
    """(d) Sequential against end-to-end training (same networks, targets and data): the
    test NRMSE may be ``tolerance`` worse (relative), twice that: partly."""
    nr_seq, nr_e2e = method_mean(sequential), method_mean(end_to_end)
    return Assessment(paper_claims(tolerance)["d"],
                      f"test NRMSE sequential {nr_seq:.2f} % vs end-to-end {nr_e2e:.2f} %",
                      V.verdict_no_notable_loss(nr_seq, nr_e2e, tol=tolerance, partial=2 * tolerance))


def assess_memory(sweep: Mapping, K: int, claims: Mapping[str, Claim] | None = None) -> Assessment:
    """(e) The memory reduction of sequential vs end-to-end training at ``K`` modules in a
    :func:`fbsembook.memory.memory_sweep` (end-to-end extrapolated where it did not fit).
    ``verdict.numbers`` also hold ``end_to_end`` and ``sequential`` (bytes)."""
    e2e, extra = sweep_value(sweep, "end-to-end", K)
    seq, _ = sweep_value(sweep, "sequential", K)
    red = V.memory_reduction(seq, e2e) if (e2e and seq is not None) else None
    verdict = V.verdict_memory_reduction(red, extrapolated=extra)
    verdict.numbers.update(end_to_end=e2e, sequential=seq, K=K)
    mib = lambda b, d: "-" if b is None else f"{b / 2**20:.{d}f}"  # noqa: E731
    ours = (f"K = {K}, {tuple(sweep['resolved']['image_shape'])} volume: end-to-end {mib(e2e, 1)} MiB"
            f"{' (extrapolated)' if extra else ''}, sequential {mib(seq, 2)} MiB: "
            + ("-" if red is None else f"{100 * red:.1f} % less"))
    return Assessment(_claim("e", claims), ours, verdict)


def _baseline_nrmse(baselines: Mapping) -> dict[str, float | None]:
    return {m: method_mean(baselines, m) for m in ("osem", "osem_postfilter", "mapem_bowsher")}


def assess_baselines(fbsem: Mapping, baselines: Mapping, claims: Mapping[str, Claim] | None = None) -> Assessment:
    """(f) FBSEM-Net (the evaluation ``fbsem`` of a run) against MAP-EM (Bowsher) and
    post-filtered OSEM (the evaluation ``baselines``)."""
    nr, b = method_mean(fbsem), _baseline_nrmse(baselines)
    ours = (f"FBSEM-Net {nr:.2f} %, MAP-EM (Bowsher) {b['mapem_bowsher']:.2f} %, "
            f"post-filtered OSEM {b['osem_postfilter']:.2f} %")
    return Assessment(_claim("f", claims), ours, V.verdict_beats(
        nr, {"MAP-EM (Bowsher)": b["mapem_bowsher"], "post-filtered OSEM": b["osem_postfilter"]}))


def assess_ranking(fbsem: Mapping, baselines: Mapping, claims: Mapping[str, Claim] | None = None) -> Assessment:
    """(g) The NRMSE ranking of FBSEM-Net, MAP-EM (Bowsher) and OSEM against the 2021
    paper's (:data:`PAPER_2021_NRMSE`)."""
    b = _baseline_nrmse(baselines)
    ours = {"FBSEM-Net": method_mean(fbsem), "MAP-EM": b["mapem_bowsher"], "OSEM": b["osem"]}
    return Assessment(_claim("g", claims), ", ".join(f"{k} {v:.2f} %" for k, v in ours.items()),
                      V.verdict_ranking(ours, PAPER_2021_NRMSE))


# ----------------------------------------------------------------------------------------
# what the results chapter shows
# ----------------------------------------------------------------------------------------
def claims_table(assessments: Sequence[Assessment]) -> list[dict]:
    """One row per claim: claim, verdict, this book's numbers, the paper, the rule, chapter."""
    return [a.row() for a in assessments]


def verdict_counts(assessments: Sequence[Assessment]) -> dict[str, int]:
    """How many claims got each verdict (all of :data:`~fbsembook.verdicts.VERDICTS`)."""
    return {k: sum(a.verdict.verdict == k for a in assessments) for k in V.VERDICTS}


def takeaway_lines(assessments: Sequence[Assessment], profile: str, machine: Mapping[str, Any],
                   n_seeds: int) -> list[str]:
    """The results chapter's take-aways (Markdown list items): the verdict counts on this
    machine, each claim's verdict with its reason, and what the profile cannot test."""
    counts = verdict_counts(assessments)
    lines = [f"- {profile} profile on {machine.get('cpu')} ({machine.get('cores')} cores"
             + (f", {machine.get('gpu')}" if machine.get("gpu") else "") + f"), torch {machine.get('torch')}: "
             + ", ".join(f"**{n} {k}**" for k, n in counts.items() if n) + f" of {len(assessments)} claims."]
    for a in assessments:
        lines.append(f"- {a.claim.title}: **{a.verdict.verdict}** ({a.verdict.reason}).")
    if profile != "paper":
        keys = ", ".join(a.claim.key for a in assessments if a.claim.needs_paper_scale)
        lines.append(f"- The `smoke` and `cpu` profiles train small networks on small data for few epochs: the accuracy "
                     f"claims ({keys}) are tested on a scale far below the paper's; the `paper` profile (GPU) "
                     "trains the paper-sized setting.")
    if n_seeds < 2:
        lines.append(f"- Claim (a) needs at least two training runs per setting; this profile trains {n_seeds}.")
    return lines


# ----------------------------------------------------------------------------------------
# the summaries of the chapters that study one claim
# ----------------------------------------------------------------------------------------
def consistency_summary(verdicts: Mapping[str, V.Verdict]) -> str:
    """Claim (a) over several metrics (``metric -> verdict_consistency``), in words:
    reproduced only when it is for every metric, not reproduced when for none."""
    kinds = [v.verdict for v in verdicts.values()]
    if V.NOT_TESTED in kinds:
        return "cannot be assessed (fewer than two runs per setting)"
    if all(k == V.REPRODUCED for k in kinds):
        return f"reproduced (smaller across-run spread for {' and '.join(m.upper() for m in verdicts)})"
    if all(k == V.NOT_REPRODUCED for k in kinds):
        return "not reproduced"
    return "partly reproduced (" + ", ".join(f"{m}: {v.verdict}" for m, v in verdicts.items()) + ")"


def generalisation_summary(comparison: Mapping) -> str:
    """Claim (b) from :func:`fbsembook.analysis.generalisation_verdict`, in words: lower error
    on every out-of-distribution set (and on how many by more than the across-run spread),
    on some, or on none."""
    better, n = comparison["better"], comparison["n_sets"]
    if better == n and n > 0:
        return ("reproduced (lower error on every out-of-distribution set, on "
                f"{comparison['better_beyond_spread']} of them by more than the across-run std)")
    if better > 0:
        return f"partly reproduced (lower error on {better} of {n} out-of-distribution sets)"
    return "not reproduced"


def networks_summary(nrmse_itdep: float, nrmse_shared: float, per_seed: Sequence[Mapping]) -> str:
    """Claim (c) from the mean test NRMSE of iteration-dependent and shared networks and the
    paired comparison of each seed (:func:`fbsembook.analysis.comparison_verdict`, ``a`` the
    iteration-dependent network): reproduced when the mean is lower and every seed is better
    (noting the seeds within 2 standard errors), partly when only the mean is lower."""
    n = len(per_seed)
    wins = sum(v["a_better"] for v in per_seed)
    clear = sum(v["a_better"] and v["clear"] for v in per_seed)
    if nrmse_itdep < nrmse_shared and wins == n:
        return "reproduced" + ("" if clear == n else f" (but within 2 standard errors for {n - clear} of {n} seed(s))")
    if nrmse_itdep < nrmse_shared:
        return f"partly reproduced (lower mean NRMSE, but better for only {wins} of {n} seeds)"
    return "not reproduced"
