"""The chapters ask for the same cached results (datasets, evaluations), so that a cold
book build simulates and evaluates each of them once."""

from __future__ import annotations

import re
from pathlib import Path

BOOK = Path(__file__).resolve().parent.parent / "book"


def _src(name: str) -> str:
    return (BOOK / name).read_text(encoding="utf-8")


def test_results_chapter_uses_chapter_5s_ood_test_sets():
    ch5, ch9 = _src("05_iteration_dependent_targets.md"), _src("09_results.md")
    call = re.compile(r"an\.ood_sections\(profile, p\.low_counts, p\.high_counts, p\.new_lesions, p\.ood_subjects,"
                      r"\s*p\.ood_realisations\)")
    assert call.search(ch5) and call.search(ch9)
    assert "variant_sections" not in ch9  # no hand-made copy of the recipes
    assert '"ood_realisations": ch5.get("ood_realisations")' in ch9  # chapter 5's values


def test_original_run_is_evaluated_as_in_chapter_4():
    ch4, ch9 = _src("04_original_fbsem.md"), _src("09_results.md")
    assert 'ex.evaluate(run, data_dir, methods=("fbsem",), device=device)' in ch4
    assert 'return run, ex.evaluate(run, data_dir, methods=("fbsem",), device=device)' in ch9
    assert 'orig_run, orig_eval = fbsem_eval("original")' in ch9
