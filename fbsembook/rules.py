"""The verdict rules of the papers' claims: the rules file, its loader and its application.

The rules are data, fixed before the runs, in ``fbsembook/claims_rules.yaml`` (its header
says what a margin, a verdict and the multiplicity correction are): per claim (a)-(g) the
statement, the metric and which way it is better, the comparisons (which two runs /
methods), the test (``bootstrap``: hierarchical bootstrap interval of the relative margin;
``tost``: equivalence / non-inferiority; ``spread_ratio``: the ratio of spreads across
training seeds; ``measurement``: a number without sampling error), the minimum effect that
counts, the tie band, and whether the claim is in the Holm family or exploratory.

* :func:`load_rules` reads and validates the file (unknown or missing keys are errors) into
  :class:`Rules` of :class:`Rule` s;
* :func:`assess` applies one rule to the data of its claim with :mod:`fbsembook.stats` and
  returns a :class:`ClaimVerdict`; :func:`assess_all` does every claim given and applies
  Holm's correction (:func:`apply_holm`);
* :func:`rules_table` is the rules as the results chapter prints them.

The data of a claim map each run label of its comparisons (e.g. ``"sequential"``,
``"baselines"``) to an evaluation (:func:`fbsembook.experiments.evaluate`), a list of
evaluations (one per training seed, the i-th of two runs paired) or, for a measurement, a
number; a ``per_test_set`` rule takes ``{test set: {run: ...}}``. A run given as None, or
fewer than 2 seeds for a spread, makes the claim **not tested**.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fbsembook import stats as S

__all__ = [
    "RULES_PATH",
    "TESTS",
    "FAMILIES",
    "NOT_TESTED",
    "RulesError",
    "Side",
    "Comparison",
    "Rule",
    "Rules",
    "load_rules",
    "parse_rules",
    "ComparisonResult",
    "ClaimVerdict",
    "assess",
    "apply_holm",
    "assess_all",
    "rules_table",
]

#: the book's verdict rules
RULES_PATH = Path(__file__).with_name("claims_rules.yaml")
TESTS = ("bootstrap", "tost", "spread_ratio", "measurement")
#: ``holm``: in the corrected family; ``exploratory``: unadjusted; ``none``: a measurement
FAMILIES = ("holm", "exploratory", "none")
#: the data cannot test the claim (a run missing, fewer than 2 seeds for a spread)
NOT_TESTED = "not tested"

_TOP_KEYS = {"version": True, "alpha": True, "n_boot": True, "seed": True, "min_subjects": False, "claims": True}
_CLAIM_KEYS = {"claim": True, "source": True, "metric": True, "better": True, "test": True, "family": True,
               "basis": True, "comparisons": True, "minimum_effect": False, "tie_band": False,
               "equivalence_margin": False, "min_seeds": False, "per_test_set": False}
_COMPARISON_KEYS = {"new": True, "ref": True, "label": False, "paper": False, "minimum_effect": False,
                    "tie_band": False}


class RulesError(ValueError):
    """The rules file is not valid (the message says where)."""


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a comparison: a run label of the data and a method of its evaluations."""

    run: str
    method: str = "fbsem"

    def __str__(self) -> str:
        return self.run if self.method == "fbsem" else f"{self.run}: {self.method}"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``new`` against ``ref``; ``minimum_effect`` and ``tie_band`` resolved (None for a TOST
    rule); ``paper_margin``: the paper's relative margin when the file gives its numbers."""

    label: str
    new: Side
    ref: Side
    minimum_effect: float | None
    tie_band: float | None
    paper_margin: float | None = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """The rule of one claim (see the module docstring); ``alpha``, ``n_boot``, ``seed`` and
    ``min_subjects`` are the file's."""

    key: str
    claim: str
    source: str
    metric: str
    better: str
    test: str
    family: str
    basis: str
    comparisons: tuple[Comparison, ...]
    equivalence_margin: float | None = None
    min_seeds: int = 2
    per_test_set: bool = False
    alpha: float = 0.05
    n_boot: int = 10_000
    seed: int = 0
    min_subjects: int = 1

    @property
    def title(self) -> str:
        return f"({self.key}) {self.claim}"


@dataclasses.dataclass(frozen=True)
class Rules:
    """The rules file: ``claims`` by key, in the file's order."""

    version: int
    alpha: float
    n_boot: int
    seed: int
    min_subjects: int
    claims: dict[str, Rule]

    def __getitem__(self, key: str) -> Rule:
        return self.claims[key]


# ----------------------------------------------------------------------------------------
# loading and validating
# ----------------------------------------------------------------------------------------
def _keys(obj: Any, spec: Mapping[str, bool], where: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise RulesError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(spec))
    if unknown:
        raise RulesError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(spec)}")
    missing = sorted(k for k, required in spec.items() if required and k not in obj)
    if missing:
        raise RulesError(f"{where}: missing key(s) {missing}")
    return obj


def _number(x: Any, where: str, low: float = -math.inf, high: float = math.inf, open_low: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise RulesError(f"{where}: expected a number, got {x!r}")
    if x < low or x > high or (open_low and x == low):
        raise RulesError(f"{where}: {x!r} is outside {'(' if open_low else '['}{low}, {high}]")
    return float(x)


def _integer(x: Any, where: str, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise RulesError(f"{where}: expected an integer >= {low}, got {x!r}")
    return x


def _text(x: Any, where: str) -> str:
    if not isinstance(x, str) or not x.strip():
        raise RulesError(f"{where}: expected a non-empty text, got {x!r}")
    return " ".join(x.split())


def _choice(x: Any, choices: Sequence[str], where: str) -> str:
    if x not in choices:
        raise RulesError(f"{where}: {x!r} is not one of {list(choices)}")
    return x


def _side(obj: Any, where: str) -> Side:
    obj = _keys(obj, {"run": True, "method": False}, where)
    return Side(_text(obj["run"], f"{where}.run"), _text(obj.get("method", "fbsem"), f"{where}.method"))


def _comparison(obj: Any, where: str, claim: Mapping, better: str, test: str) -> Comparison:
    obj = _keys(obj, _COMPARISON_KEYS, where)
    new, ref = _side(obj["new"], f"{where}.new"), _side(obj["ref"], f"{where}.ref")
    label = _text(obj.get("label", f"{new} vs {ref}"), f"{where}.label")
    paper_margin = None
    if "paper" in obj:
        paper = _keys(obj["paper"], {"new": True, "ref": True}, f"{where}.paper")
        pn, pr = (_number(paper[k], f"{where}.paper.{k}", 0, open_low=True) for k in ("new", "ref"))
        paper_margin = S.relative_margin(pn, pr, better)
    if test == "tost":
        for k in ("minimum_effect", "tie_band"):
            if k in obj or k in claim:
                raise RulesError(f"{where}: a tost rule has an equivalence_margin, not a {k}")
        return Comparison(label, new, ref, None, None, paper_margin)
    eff = obj.get("minimum_effect", claim.get("minimum_effect"))
    if eff is None:
        raise RulesError(f"{where}: no minimum_effect (in the comparison or the claim)")
    if isinstance(eff, Mapping):
        share = _number(_keys(eff, {"share_of_paper": True}, f"{where}.minimum_effect")["share_of_paper"],
                        f"{where}.minimum_effect.share_of_paper", 0, 1, open_low=True)
        if paper_margin is None or paper_margin <= 0:
            raise RulesError(f"{where}: share_of_paper needs the paper's numbers with an effect in its direction")
        eff = share * paper_margin
    eff = _number(eff, f"{where}.minimum_effect", 0, open_low=True)
    if "tie_band" not in obj and "tie_band" not in claim:
        raise RulesError(f"{where}: no tie_band (in the comparison or the claim)")
    tie = _number(obj.get("tie_band", claim.get("tie_band")), f"{where}.tie_band", 0, eff)
    return Comparison(label, new, ref, eff, tie, paper_margin)


def parse_rules(doc: Any) -> Rules:
    """Validate a parsed rules document (see ``claims_rules.yaml``) into :class:`Rules`."""
    top = _keys(doc, _TOP_KEYS, "rules")
    if top["version"] != 1:
        raise RulesError(f"rules.version: only version 1 is known, got {top['version']!r}")
    alpha = _number(top["alpha"], "rules.alpha", 0, 0.5, open_low=True)
    n_boot = _integer(top["n_boot"], "rules.n_boot", 100)
    seed = _integer(top["seed"], "rules.seed", 0)
    min_subjects = _integer(top.get("min_subjects", 1), "rules.min_subjects", 1)
    if not isinstance(top["claims"], Mapping) or not top["claims"]:
        raise RulesError("rules.claims: expected a non-empty mapping of claims")
    claims = {}
    for key, c in top["claims"].items():
        where = f"claims.{key}"
        c = _keys(c, _CLAIM_KEYS, where)
        test = _choice(c["test"], TESTS, f"{where}.test")
        family = _choice(c["family"], FAMILIES, f"{where}.family")
        if (test == "measurement") != (family == "none"):
            raise RulesError(f"{where}.family: 'none' is for a measurement and a measurement's family is 'none'")
        better = _choice(c["better"], S.BETTER, f"{where}.better")
        margin = None
        if test == "tost":
            if "equivalence_margin" not in c:
                raise RulesError(f"{where}: a tost rule needs an equivalence_margin")
            margin = _number(c["equivalence_margin"], f"{where}.equivalence_margin", 0, open_low=True)
        elif "equivalence_margin" in c:
            raise RulesError(f"{where}.equivalence_margin: only a tost rule has one")
        comps = c["comparisons"]
        if not isinstance(comps, list) or not comps:
            raise RulesError(f"{where}.comparisons: expected a non-empty list")
        per_set = c.get("per_test_set", False)
        if not isinstance(per_set, bool):
            raise RulesError(f"{where}.per_test_set: expected true or false, got {per_set!r}")
        claims[str(key)] = Rule(
            key=str(key), claim=_text(c["claim"], f"{where}.claim"), source=_text(c["source"], f"{where}.source"),
            metric=_text(c["metric"], f"{where}.metric"), better=better, test=test, family=family,
            basis=_text(c["basis"], f"{where}.basis"),
            comparisons=tuple(_comparison(x, f"{where}.comparisons[{i}]", c, better, test)
                              for i, x in enumerate(comps)),
            equivalence_margin=margin, min_seeds=_integer(c.get("min_seeds", 2), f"{where}.min_seeds", 2),
            per_test_set=per_set, alpha=alpha, n_boot=n_boot, seed=seed, min_subjects=min_subjects)
    return Rules(1, alpha, n_boot, seed, min_subjects, claims)


def load_rules(path: str | Path | None = None) -> Rules:
    """The rules of ``path`` (default: the book's, :data:`RULES_PATH`), validated."""
    import yaml

    p = Path(path) if path is not None else RULES_PATH
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RulesError(f"{p}: not valid YAML: {e}") from e
    try:
        return parse_rules(doc)
    except RulesError as e:
        raise RulesError(f"{p}: {e}") from None


# ----------------------------------------------------------------------------------------
# applying the rules
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ComparisonResult:
    """One comparison of a claim: its verdict, the estimate of the margin (positive in the
    paper's direction) with its ``level`` interval ``[low, high]``, the p-value of the
    claim's test (None for a measurement) and the numbers behind them."""

    label: str
    verdict: str
    reason: str
    estimate: float | None = None
    low: float | None = None
    high: float | None = None
    level: float | None = None
    p_value: float | None = None
    numbers: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ClaimVerdict:
    """The verdict of one claim (one of :data:`fbsembook.stats.VERDICTS` or
    :data:`NOT_TESTED`) with its comparisons, its p-value (the largest of its comparisons')
    and, after :func:`apply_holm`, the Holm-adjusted one."""

    rule: Rule
    verdict: str
    reason: str
    comparisons: tuple[ComparisonResult, ...] = ()
    p_value: float | None = None
    p_holm: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.verdict == S.REPRODUCED

    @property
    def family_label(self) -> str:
        return {"holm": "Holm-corrected", "exploratory": "exploratory", "none": "measurement"}[self.rule.family]

    def __str__(self) -> str:
        return f"{self.verdict}: {self.reason}"

    def row(self) -> dict:
        """The claim's row of the results table."""
        fmt = lambda p: "-" if p is None else f"{p:.3g}"  # noqa: E731
        return {"claim": self.rule.title, "verdict": self.verdict, "reason": self.reason,
                "p": fmt(self.p_value), "p (Holm)": fmt(self.p_holm), "family": self.family_label}


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.1f} %" if sign else f"{100 * x:.1f} %"


def _level(level: float) -> str:
    return f"{100 * level:g} %"


def _interval_text(est: float, low: float, high: float, level: float) -> str:
    return f"margin {_pct(est, True)} [{_level(level)} CI {_pct(low, True)}, {_pct(high, True)}]"


def _effect_text(comp: Comparison) -> str:
    paper = "" if comp.paper_margin is None else f" (paper {_pct(comp.paper_margin)})"
    return f"minimum effect {_pct(comp.minimum_effect)}{paper}, tie band {_pct(comp.tie_band)}"


def _margins(rule: Rule, comp: Comparison, new, ref) -> S.PairedMargins:
    return S.paired_margins(new, ref, rule.metric, comp.new.method, comp.ref.method, rule.better)


def _sample_numbers(pm: S.PairedMargins) -> dict:
    return {"new_mean": pm.new_mean, "ref_mean": pm.ref_mean, "seeds": pm.n_seeds, "subjects": pm.n_subjects,
            "images": pm.n_images}


def _sample_text(rule: Rule, pm: S.PairedMargins) -> str:
    return (f"{rule.metric} {pm.new_mean:.4g} vs {pm.ref_mean:.4g}; {pm.n_subjects} subjects, {pm.n_images} images, "
            f"{pm.n_seeds} seed(s)")


def _test_bootstrap(rule: Rule, comp: Comparison, label: str, new, ref, rng) -> ComparisonResult:
    pm = _margins(rule, comp, new, ref)
    iv = S.hierarchical_bootstrap(pm, rule.n_boot, 1 - rule.alpha, rng)
    v = S.verdict(iv, comp.minimum_effect, comp.tie_band)
    p = min(1.0, 2 * S.bootstrap_p_value(iv.replicates, 0.0, "greater"))
    reason = f"{_interval_text(iv.estimate, iv.low, iv.high, iv.level)}; {_effect_text(comp)}; {_sample_text(rule, pm)}"
    return ComparisonResult(label, v, reason, iv.estimate, iv.low, iv.high, iv.level, p,
                            {**_sample_numbers(pm), "minimum_effect": comp.minimum_effect, "tie_band": comp.tie_band})


def _test_tost(rule: Rule, comp: Comparison, label: str, new, ref, rng) -> ComparisonResult:
    pm = _margins(rule, comp, new, ref)
    t = S.tost(pm, rule.equivalence_margin, rule.alpha, rule.n_boot, rng)
    iv = t.interval
    v = S.noninferiority_verdict(iv, t.margin)
    reason = (f"{_interval_text(iv.estimate, iv.low, iv.high, iv.level)}; equivalence margin {_pct(t.margin)}: "
              f"p(worse by >= {_pct(t.margin)}) = {t.p_lower:.3g}, p(better by >= {_pct(t.margin)}) = "
              f"{t.p_upper:.3g}{' (equivalent)' if t.equivalent else ''}; {_sample_text(rule, pm)}")
    return ComparisonResult(label, v, reason, iv.estimate, iv.low, iv.high, iv.level, t.p_lower,
                            {**_sample_numbers(pm), "p_lower": t.p_lower, "p_upper": t.p_upper,
                             "equivalence_margin": t.margin, "equivalent": t.equivalent})


def _run_values(runs, method: str, metric: str) -> list[float]:
    """Per run: a number as given, or the mean of ``metric`` over an evaluation's test images."""
    runs = [runs] if isinstance(runs, Mapping) else list(runs)
    return [float(r) if isinstance(r, numbers.Real) else float(np.mean(list(S.metric_by_image(r, method, metric)
                                                                              .values()))) for r in runs]


def _test_spread_ratio(rule: Rule, comp: Comparison, label: str, new, ref, rng) -> ComparisonResult:
    a, b = _run_values(new, comp.new.method, rule.metric), _run_values(ref, comp.ref.method, rule.metric)
    if min(len(a), len(b)) < 2:
        return ComparisonResult(label, NOT_TESTED, f"a spread needs at least 2 training seeds per arm "
                                                   f"(got {len(a)} and {len(b)})")
    sr = S.spread_ratio(a, b, rule.n_boot, 1 - rule.alpha, rng)
    iv = sr.interval
    est, low, high = 1 - iv.estimate, 1 - iv.high, 1 - iv.low
    v = S.verdict((low, high), comp.minimum_effect, comp.tie_band)
    p = min(1.0, 2 * S.bootstrap_p_value(1 - iv.replicates, 0.0, "greater"))
    reason = (f"std over seeds {sr.std_new:.3g} vs {sr.std_ref:.3g} ({len(a)} and {len(b)} seeds): ratio "
              f"{iv.estimate:.2f} [{_level(iv.level)} CI {iv.low:.2f}, {iv.high:.2f}], "
              f"{_interval_text(est, low, high, iv.level)}; {_effect_text(comp)}")
    if min(len(a), len(b)) < rule.min_seeds:
        reason += f"; the rule asks for {rule.min_seeds} seeds per arm" + ("" if v == S.INCONCLUSIVE else
                                                                          f" (the interval alone: {v})")
        v = S.INCONCLUSIVE
    return ComparisonResult(label, v, reason, est, low, high, iv.level, p,
                            {"std_new": sr.std_new, "std_ref": sr.std_ref, "ratio": iv.estimate,
                             "ratio_low": iv.low, "ratio_high": iv.high, "seeds_new": len(a), "seeds_ref": len(b),
                             "minimum_effect": comp.minimum_effect, "tie_band": comp.tie_band})


def _test_measurement(rule: Rule, comp: Comparison, label: str, new, ref, rng) -> ComparisonResult:
    m = S.relative_margin(float(new), float(ref), rule.better)
    v = S.verdict((m, m), comp.minimum_effect, comp.tie_band)
    reason = f"{rule.metric} {float(new):.4g} vs {float(ref):.4g}: margin {_pct(m, True)}; {_effect_text(comp)}"
    return ComparisonResult(label, v, reason, m, m, m, None, None,
                            {"new": float(new), "ref": float(ref), "minimum_effect": comp.minimum_effect,
                             "tie_band": comp.tie_band})


_TEST_FUNCTIONS = {"bootstrap": _test_bootstrap, "tost": _test_tost, "spread_ratio": _test_spread_ratio,
                   "measurement": _test_measurement}


def assess(rule: Rule, data: Mapping[str, Any]) -> ClaimVerdict:
    """Apply ``rule`` to the ``data`` of its claim (see the module docstring): each comparison
    (on each test set for a ``per_test_set`` rule) with the rule's test, then the claim's
    verdict (the weakest of its comparisons, :func:`fbsembook.stats.weakest`; not tested
    when one of them is) and p-value (the largest). The bootstrap's random numbers depend
    on the file's ``seed``, the claim and the comparison only."""
    if rule.per_test_set:
        jobs = [(f"{c.label} ({name})", c, sets, (i, j)) for j, (name, sets) in enumerate(data.items())
                for i, c in enumerate(rule.comparisons)]
        if not jobs:
            return ClaimVerdict(rule, NOT_TESTED, "no test set given")
    else:
        jobs = [(c.label, c, data, (i,)) for i, c in enumerate(rule.comparisons)]
    results = []
    for label, comp, d, ids in jobs:
        missing = [s.run for s in (comp.new, comp.ref) if s.run not in d]
        if missing:
            raise KeyError(f"claim ({rule.key}), {label}: no data for run(s) {missing}; given: {sorted(d)}")
        new, ref = d[comp.new.run], d[comp.ref.run]
        if new is None or ref is None:
            results.append(ComparisonResult(label, NOT_TESTED, "no data"))
            continue
        rng = np.random.default_rng([rule.seed, *(ord(ch) for ch in rule.key), *ids])
        results.append(_TEST_FUNCTIONS[rule.test](rule, comp, label, new, ref, rng))
    verdicts = [r.verdict for r in results]
    verdict = NOT_TESTED if NOT_TESTED in verdicts else S.weakest(verdicts)
    ps = [r.p_value for r in results]
    p = None if verdict == NOT_TESTED or None in ps else max(ps)
    notes = []
    few = sorted({r.numbers["subjects"] for r in results if r.numbers.get("subjects", math.inf) < rule.min_subjects})
    if few:
        notes.append(f"only {', '.join(map(str, few))} test subject(s), fewer than {rule.min_subjects}: "
                     "the interval is likely too narrow")
    if rule.family == "exploratory":
        notes.append("exploratory: not corrected for the number of claims")
    reason = "; ".join(f"{r.label}: {r.verdict} ({r.reason})" for r in results) if len(results) > 1 \
        else results[0].reason
    return ClaimVerdict(rule, verdict, reason, tuple(results), p, None, tuple(notes))


def apply_holm(verdicts: Mapping[str, ClaimVerdict], alpha: float | None = None) -> dict[str, ClaimVerdict]:
    """Holm's correction over the claims of the ``holm`` family that have a p-value: each
    gets ``p_holm``, and a "reproduced" or "direction only" whose adjusted p-value is not
    below ``alpha`` (default: the rules') becomes "inconclusive". Other claims unchanged."""
    family = {k: v.p_value for k, v in verdicts.items() if v.rule.family == "holm" and v.p_value is not None}
    out = dict(verdicts)
    if not family:
        return out
    a = alpha if alpha is not None else next(iter(verdicts.values())).rule.alpha
    adjusted, _ = S.holm(family, a)
    for k, p in adjusted.items():
        v = verdicts[k]
        verdict, notes = v.verdict, v.notes
        if verdict in (S.REPRODUCED, S.DIRECTION_ONLY) and p >= a:
            notes += (f"{verdict} alone, but p = {v.p_value:.3g} is {p:.3g} after Holm's correction over "
                      f"{len(family)} claims (>= {a:g})",)
            verdict = S.INCONCLUSIVE
        out[k] = dataclasses.replace(v, verdict=verdict, p_holm=p, notes=notes)
    return out


def assess_all(rules: Rules, data: Mapping[str, Mapping[str, Any]]) -> dict[str, ClaimVerdict]:
    """:func:`assess` every claim of ``rules`` that ``data`` (claim key -> its data) has,
    in the rules' order, then :func:`apply_holm`."""
    unknown = sorted(set(data) - set(rules.claims))
    if unknown:
        raise KeyError(f"no rule for claim(s) {unknown}")
    return apply_holm({k: assess(r, data[k]) for k, r in rules.claims.items() if k in data}, rules.alpha)


def rules_table(rules: Rules) -> list[dict]:
    """The rules as the results chapter prints them: one row per claim."""
    rows = []
    for r in rules.claims.values():
        if r.test == "tost":
            threshold = f"equivalence margin {_pct(r.equivalence_margin)} (alpha {r.alpha:g}, " \
                        f"{_level(1 - 2 * r.alpha)} interval)"
        else:
            threshold = "; ".join(_effect_text(c) for c in r.comparisons)
        test = {"bootstrap": f"hierarchical bootstrap, {_level(1 - r.alpha)} interval",
                "tost": "TOST (non-inferiority decides)",
                "spread_ratio": f"ratio of spreads over seeds (>= {r.min_seeds} per arm), {_level(1 - r.alpha)} interval",
                "measurement": "measurement"}[r.test]
        rows.append({"claim": r.title, "source": r.source, "metric": f"{r.metric} ({r.better} is better)",
                     "comparison": "; ".join(f"{c.new} vs {c.ref}" for c in r.comparisons)
                     + (" (each test set)" if r.per_test_set else ""),
                     "test": test, "counts / tie": threshold,
                     "family": {"holm": "Holm", "exploratory": "exploratory", "none": "-"}[r.family],
                     "basis": r.basis})
    return rows
