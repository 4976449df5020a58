"""fbsemlib.config.diff: the readable JSON diff shared by datasets and training."""

from __future__ import annotations

import math

from fbsemlib.config import diff


def test_diff_wording_and_nesting():
    a = {"x": 1, "l": [1, 2], "n": {"v": 1.0}, "only_a": "s"}
    b = {"x": 2, "l": [1, 3], "n": {"v": 1.0}, "only_b": True}
    assert diff(a, b, ("checkpoint", "now"), "cfg") == [
        "cfg.l: checkpoint [1, 2], now [1, 3]",
        "cfg.only_a: checkpoint 's', now absent",
        "cfg.only_b: checkpoint absent, now True",
        "cfg.x: checkpoint 1, now 2",
    ]
    assert diff({"s": {"n": 6}}, {"s": {"n": 7}}, ("dataset", "expected"), sep=" vs ") == \
        ["s.n: dataset 6 vs expected 7"]
    assert diff(3, 4) == ["value: a 3, b 4"]
    assert diff([1, 2], (1, 2)) == [] and diff({"a": [1.0]}, {"a": [1]}) == []


def test_diff_numbers():
    assert diff(1.0, 1.0 + 1e-12) != []  # exact by default
    assert diff(1.0, 1.0 + 1e-12, rel_tol=1e-9) == []
    assert diff(0.0, 1e-13, abs_tol=1e-12) == []
    assert diff(math.nan, float("nan")) == []
    assert diff("1.0", 1.0) == ["value: a '1.0', b 1.0"]
