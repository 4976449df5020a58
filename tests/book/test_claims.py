"""fbsembook.claims: the verdicts of the paper's claims (pure functions) and the cached memory sweep."""

from __future__ import annotations

import json
import math

import pytest

from fbsembook import claims as C
# ----------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------
def test_relative_difference_and_reduction():
    assert C.relative_difference(11.0, 10.0) == pytest.approx(0.1)
    assert C.relative_difference(9.0, 10.0) == pytest.approx(-0.1)
    assert C.memory_reduction(2.0, 100.0) == pytest.approx(0.98)
    assert C.memory_reduction(0.0, 1.0) == 1.0
    with pytest.raises(ValueError):
        C.relative_difference(1.0, 0.0)
    with pytest.raises(ValueError):
        C.memory_reduction(1.0, 0.0)
    with pytest.raises(ValueError):
        C.memory_reduction(float("nan"), 1.0)


def test_flatness():
    Ks = [1, 2, 5, 10, 20, 40, 60]
    flat = [5, 10, 100, 100, 101, 102, 105]  # K < 5 ignored
    assert C.flatness(Ks, flat) == pytest.approx(0.05)
    assert C.flatness(Ks, flat, k_min=1) == pytest.approx(20.0)
    assert C.flatness(Ks, flat, k_min=5, k_max=20) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        C.flatness([1, 2], [1.0, 2.0], k_min=5)


def test_linear_fit_and_extrapolation():
    a, b = C.linear_fit([1, 2, 3], [3, 5, 7])
    assert (a, b) == (pytest.approx(1.0), pytest.approx(2.0))
    assert C.extrapolate_linear([1, 2, 3], [3, 5, 7], 60) == pytest.approx(121.0)
    assert C.linear_fit([2], [4]) == (0.0, 2.0)
    assert C.linear_fit([2, 2], [4, 6]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        C.linear_fit([], [])


def test_seed_std():
    assert C.seed_std([1.0]) is None
    assert C.seed_std([]) is None
    assert C.seed_std([1.0, 3.0]) == pytest.approx(math.sqrt(2.0))
    assert C.seed_std([2.0, 2.0, 2.0]) == 0.0


# ----------------------------------------------------------------------------------------
# verdicts
# ----------------------------------------------------------------------------------------
def test_verdict_consistency():
    assert C.verdict_consistency(None, None, 1).verdict == C.NOT_TESTED
    assert C.verdict_consistency(0.1, 0.5, 1).verdict == C.NOT_TESTED  # one seed: no std
    assert C.verdict_consistency(0.1, 0.5, 2).verdict == C.REPRODUCED
    assert C.verdict_consistency(0.48, 0.5, 2).verdict == C.PARTLY  # lower, within 10 %
    assert C.verdict_consistency(0.52, 0.5, 5).verdict == C.PARTLY  # higher, within 10 %
    assert C.verdict_consistency(0.8, 0.5, 5).verdict == C.NOT_REPRODUCED
    assert C.verdict_consistency(0.0, 0.0, 3).verdict == C.PARTLY
    assert C.verdict_consistency(float("nan"), 0.5, 3).verdict == C.NOT_TESTED  # seed_spread's NaN std
    v = C.verdict_consistency(0.1, 0.5, 2, sample_stds=(0.2, 0.4))
    assert v.numbers["ratio"] == pytest.approx(0.2) and v.numbers["sample_ratio"] == pytest.approx(0.5)
    assert "per-sample std ratio 0.50" in v.reason
    assert "sample_ratio" not in C.verdict_consistency(0.1, 0.5, 2).numbers


def test_verdict_lower_error():
    assert C.verdict_lower_error(10.0, 10.5).verdict == C.REPRODUCED
    assert C.verdict_lower_error(10.05, 10.0).verdict == C.PARTLY
    assert C.verdict_lower_error(11.0, 10.0).verdict == C.NOT_REPRODUCED
    assert C.verdict_lower_error(None, 10.0).verdict == C.NOT_TESTED
    v = C.verdict_lower_error(9.0, 10.0)
    assert v.numbers["relative"] == pytest.approx(-0.1) and v.ok


def test_verdict_no_notable_loss():
    assert C.verdict_no_notable_loss(10.4, 10.0).verdict == C.REPRODUCED
    assert C.verdict_no_notable_loss(9.0, 10.0).verdict == C.REPRODUCED  # better is fine
    assert C.verdict_no_notable_loss(10.8, 10.0).verdict == C.PARTLY
    assert C.verdict_no_notable_loss(12.0, 10.0).verdict == C.NOT_REPRODUCED
    assert C.verdict_no_notable_loss(12.0, 10.0, tol=0.25).verdict == C.REPRODUCED
    assert C.verdict_no_notable_loss(float("nan"), 10.0).verdict == C.NOT_TESTED


def test_verdict_memory_reduction():
    assert C.verdict_memory_reduction(0.983).verdict == C.REPRODUCED
    assert C.verdict_memory_reduction(0.976).verdict == C.REPRODUCED  # rounds to 98 %
    assert C.verdict_memory_reduction(0.95).verdict == C.PARTLY
    assert C.verdict_memory_reduction(0.5).verdict == C.NOT_REPRODUCED
    assert C.verdict_memory_reduction(None).verdict == C.NOT_TESTED
    assert "extrapolated" in C.verdict_memory_reduction(0.99, extrapolated=True).reason


def test_verdict_flat():
    Ks = [1, 5, 10, 60]
    assert C.verdict_flat(Ks, [1, 100, 100, 105]).verdict == C.REPRODUCED
    assert C.verdict_flat(Ks, [1, 100, 100, 130]).verdict == C.NOT_REPRODUCED
    assert C.verdict_flat([1, 2], [1, 2]).verdict == C.NOT_TESTED


def test_verdict_count():
    assert C.verdict_count(3, 3).verdict == C.REPRODUCED
    assert C.verdict_count(1, 3).verdict == C.PARTLY
    assert C.verdict_count(0, 3).verdict == C.NOT_REPRODUCED
    assert C.verdict_count(0, 0).verdict == C.NOT_TESTED
    assert C.verdict_count(None, 3).verdict == C.NOT_TESTED
    with pytest.raises(ValueError):
        C.verdict_count(4, 3)


def test_verdict_beats_and_ranking():
    assert C.verdict_beats(10.0, {"MAP-EM": 12.0, "PF-OSEM": 11.0}).verdict == C.REPRODUCED
    assert C.verdict_beats(11.5, {"MAP-EM": 12.0, "PF-OSEM": 11.0}).verdict == C.PARTLY
    assert C.verdict_beats(13.0, {"MAP-EM": 12.0, "PF-OSEM": 11.0}).verdict == C.NOT_REPRODUCED
    assert C.verdict_beats(None, {"MAP-EM": 12.0}).verdict == C.NOT_TESTED
    paper = {"FBSEM": 14.4, "MAP-EM": 17.7, "OSEM": 20.7}
    assert C.ranking(paper) == ["FBSEM", "MAP-EM", "OSEM"]
    assert C.verdict_ranking({"FBSEM": 5, "MAP-EM": 6, "OSEM": 7}, paper).verdict == C.REPRODUCED
    assert C.verdict_ranking({"FBSEM": 5, "MAP-EM": 8, "OSEM": 7}, paper).verdict == C.PARTLY
    assert C.verdict_ranking({"FBSEM": 9, "MAP-EM": 8, "OSEM": 7}, paper).verdict == C.NOT_REPRODUCED
    assert C.verdict_ranking({"FBSEM": 9}, paper).verdict == C.NOT_TESTED


def test_training_time_ratio():
    # same epochs per module: the plain time ratio
    assert C.training_time_ratio(120.0, 6, 100.0, 6) == pytest.approx(1.2)
    # sequential with 1 epoch per module vs 2 end-to-end epochs
    assert C.training_time_ratio(60.0, 1, 100.0, 2) == pytest.approx(1.2)
    assert C.verdict_time_ratio(1.1).verdict == C.REPRODUCED
    assert C.verdict_time_ratio(1.3).verdict == C.NOT_REPRODUCED
    assert C.verdict_time_ratio(None).verdict == C.NOT_TESTED
    with pytest.raises(ValueError):
        C.training_time_ratio(1.0, 0, 1.0, 1)


def test_verdict_rejects_unknown_label():
    with pytest.raises(ValueError):
        C.Verdict("maybe", "")


def test_projector_targets():
    case = "2D parallel 128x128, 180x185"
    rows = [
        dict(case=case, impl="astra-cpu-joseph", device="cpu", batch=1, s_per_image=0.03),
        dict(case=case, impl="fbsemlib-torch-matrix", device="cpu", batch=1, s_per_image=0.005),
        dict(case=case, impl="fbsemlib-torch-matrix", device="cpu", batch=16, s_per_image=0.002),
        dict(case=case, impl="fbsemlib-torch-matrix", device="cuda", batch=16, s_per_image=0.0001),
        dict(case="2D mMR", impl="fbsemlib-torch-matrix", device="cpu", batch=1, s_per_image=1.0),
    ]
    t = C.projector_targets(rows)
    assert t["speedup_batch1"] == pytest.approx(6.0) and t["met_batch1"] is True
    assert t["speedup_batchN"] == pytest.approx(15.0) and t["met_batchN"] is False and t["batchN"] == 16
    empty = C.projector_targets(rows[1:])
    assert empty["speedup_batch1"] is None and empty["met_batch1"] is None


def test_method_readers():
    ev = {"summary": {"fbsem": {"nrmse": {"mean": 12.0, "std": 1.0}}}}
    assert C.method_mean(ev) == 12.0 and C.method_std(ev) == 1.0
    assert C.method_mean(ev, "osem") is None


# ----------------------------------------------------------------------------------------
# benchmark files
# ----------------------------------------------------------------------------------------
def test_load_bench_results(tmp_path):
    (tmp_path / "projector.json").write_text(json.dumps({"benchmark": "projector", "rows": [{"a": 1}]}))
    (tmp_path / "memory_quick.json").write_text(json.dumps({"benchmark": "memory"}))
    (tmp_path / "training.json").write_text("{not json")
    res = C.load_bench_results(tmp_path)
    assert set(res) == set(C.BENCH_NAMES)
    assert res["projector"]["rows"] == [{"a": 1}] and res["projector"]["quick"] is False
    assert res["memory"] is None and res["training"] is None and res["simulation"] is None
    res = C.load_bench_results(tmp_path, allow_quick=True)
    assert res["memory"]["quick"] is True and res["memory"]["rows"] == []
    assert C.bench_command("memory") == "fbsem bench memory"


def test_bench_memory_sweeps_and_training_ratio():
    doc = {"rows": [
        {"case": "3D", "device": "cpu", "modules": K, "mode": m, "peak_bytes": (K * 100.0 if m == "end-to-end" else 2.0)}
        for K in (1, 5, 60) for m in ("end-to-end", "sequential")] + [
        {"case": "big", "device": "cuda", "modules": 1, "mode": "end-to-end", "peak_bytes": 10.0},
        {"case": "big", "device": "cuda", "modules": 60, "mode": "end-to-end", "peak_bytes": None}]}
    sw = C.bench_memory_sweeps(doc)
    assert set(sw) == {"3D", "big"} and sw["3D"]["Ks"] == [1, 5, 60]
    assert C.sweep_value(sw["3D"], "sequential", 60) == (2.0, False)
    assert C.sweep_table(sw["3D"])[-1]["reduction"] == pytest.approx(1 - 2 / 6000)
    assert sw["big"]["rows"][1]["status"] == "oom"
    assert C.bench_memory_sweeps(None) == {}
    tr = {"rows": [{"mode": "end-to-end", "time_s": 100.0, "epochs_per_module": 2},
                   {"mode": "sequential", "time_s": 110.0, "epochs_per_module": 2}]}
    assert C.bench_training_ratio(tr) == pytest.approx(1.1)
    assert C.bench_training_ratio({"rows": tr["rows"][:1]}) is None
    assert C.bench_training_ratio(None) is None


# ----------------------------------------------------------------------------------------
# memory sweep (tiny problem, cached)
# ----------------------------------------------------------------------------------------
def test_memory_sweep_cached_and_table(tmp_path, monkeypatch):
    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    kw = dict(image_shape=(1, 16, 16), width=4, depth=2, batch_size=1, num_subsets=2, subprocess_rss=False)
    sw = C.memory_sweep(None, Ks=(1, 2, 4), modes=("end-to-end", "sequential"), **kw)
    assert [(r["mode"], r["K"], r["status"]) for r in sw["rows"]] == [
        ("end-to-end", 1, "ok"), ("end-to-end", 2, "ok"), ("end-to-end", 4, "ok"),
        ("sequential", 1, "ok"), ("sequential", 2, "ok"), ("sequential", 4, "ok")]
    e = [C.sweep_value(sw, "end-to-end", K)[0] for K in (1, 2, 4)]
    s = [C.sweep_value(sw, "sequential", K)[0] for K in (1, 2, 4)]
    assert e[0] < e[1] < e[2]  # grows with K
    assert s[0] == s[1] == s[2]  # one module
    # extrapolation of a K that was not measured
    v, extra = C.sweep_value(sw, "end-to-end", 60)
    assert extra and v > e[2]
    assert C.sweep_value(sw, "end-to-end", 60, extrapolate=False) == (None, False)
    table = C.sweep_table(sw)
    assert [r["K"] for r in table] == [1, 2, 4]
    assert table[-1]["reduction"] == pytest.approx(1 - s[2] / e[2])
    # cached: the same call reads the JSON file
    files = list((tmp_path / "cache" / "memory").glob("sweep-2d-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    doc["rows"][0]["peak_bytes"] = -1
    files[0].write_text(json.dumps(doc))
    again = C.memory_sweep(None, Ks=(1, 2, 4), modes=("end-to-end", "sequential"), **kw)
    assert again["rows"][0]["peak_bytes"] == -1


def test_memory_sweep_out_of_memory(tmp_path, monkeypatch):
    """A mode that runs out of memory at some K: that K is 'oom', the larger ones 'skipped',
    and the value at the largest K is extrapolated from the measured ones."""
    import fbsemlib.training.memory as M

    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    real = M.measure_training_memory

    def fake(problem, K, mode, device="cpu", **kw):
        if mode == "end-to-end" and K >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(problem, K, mode, device=device, **kw)

    monkeypatch.setattr(M, "measure_training_memory", fake)
    kw = dict(image_shape=(1, 16, 16), width=4, depth=2, batch_size=1, num_subsets=2, subprocess_rss=False)
    sw = C.memory_sweep(None, Ks=(1, 2, 4, 8), modes=("end-to-end", "sequential"), cache=False, **kw)
    st = {(r["mode"], r["K"]): r["status"] for r in sw["rows"]}
    assert st[("end-to-end", 4)] == "oom" and st[("end-to-end", 8)] == "skipped"
    assert st[("sequential", 8)] == "ok"
    v, extra = C.sweep_value(sw, "end-to-end", 8)
    assert extra and v > C.sweep_value(sw, "end-to-end", 2)[0]
    table = C.sweep_table(sw)
    assert table[-1]["end-to-end"] is None and table[-1]["reduction"] is None

    def broken(problem, K, mode, device="cpu", **kw):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(M, "measure_training_memory", broken)
    with pytest.raises(ValueError):
        C.memory_sweep(None, Ks=(1,), modes=("sequential",), cache=False, **kw)


# ----------------------------------------------------------------------------------------
# another chapter's parameters
# ----------------------------------------------------------------------------------------
CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A chapter

```{code-cell} ipython3
import os
%matplotlib inline
```

```{code-cell} ipython3
:tags: [parameters]

profile = os.environ.get("FBSEM_PROFILE", "cpu")
seeds = None
```

```{code-cell} ipython3
p = profile_params(
    {
        "seeds": {"smoke": [0], "cpu": [0, 1], "paper": [0, 1, 2, 3, 4]},
        "counts": {"smoke": [5.0e4, 1.0e5], "default": [2.0e5, 5.0e5]},
        "width": 8,
        "computed": C.memory_3d_kwargs("cpu"),
    },
    profile,
    globals(),
)
```
"""


def test_chapter_defaults(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "05_some_chapter.md").write_text(CHAPTER)
    d = C.chapter_defaults(5, "cpu", root=tmp_path)
    assert d == {"seeds": [0, 1], "counts": [2.0e5, 5.0e5], "width": 8}
    assert C.chapter_defaults(5, "smoke", root=tmp_path)["counts"] == [5.0e4, 1.0e5]
    assert C.chapter_defaults(5, "paper", root=tmp_path)["seeds"] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        C.chapter_defaults(6, "cpu", root=tmp_path)
    (tmp_path / "book" / "06_other.md").write_text(CHAPTER.replace("profile_params(", "other("))
    with pytest.raises(ValueError):
        C.chapter_defaults(6, "cpu", root=tmp_path)


def test_chapter_defaults_of_the_book_chapters():
    """The results chapter reads the seeds of chapters 5 and 6 this way."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for n in (5, 6):
        if not list((root / "book").glob(f"{n:02d}_*.md")):
            pytest.skip(f"chapter {n} is not written yet")
        for profile in ("smoke", "cpu", "paper"):
            d = C.chapter_defaults(n, profile, root=root)
            assert isinstance(d["seeds"], list) and all(isinstance(s, int) for s in d["seeds"])
