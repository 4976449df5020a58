"""fbsembook.bench_results: reading the JSON files of ``fbsem bench``."""

from __future__ import annotations

import json

import pytest

from fbsembook import bench_results as BR
from fbsembook.memory import sweep_table, sweep_value


def test_load_bench_results(tmp_path):
    (tmp_path / "projector.json").write_text(json.dumps({"benchmark": "projector", "rows": [{"a": 1}]}))
    (tmp_path / "memory_quick.json").write_text(json.dumps({"benchmark": "memory"}))
    (tmp_path / "training.json").write_text("{not json")
    res = BR.load_bench_results(tmp_path)
    assert set(res) == set(BR.BENCH_NAMES)
    assert res["projector"]["rows"] == [{"a": 1}] and res["projector"]["quick"] is False
    assert res["memory"] is None and res["training"] is None and res["simulation"] is None
    res = BR.load_bench_results(tmp_path, allow_quick=True)
    assert res["memory"]["quick"] is True and res["memory"]["rows"] == []
    assert BR.bench_command("memory") == "fbsem bench memory"


def test_bench_memory_sweeps_and_training_ratio():
    doc = {"rows": [
        {"case": "3D", "device": "cpu", "modules": K, "mode": m, "peak_bytes": (K * 100.0 if m == "end-to-end" else 2.0)}
        for K in (1, 5, 60) for m in ("end-to-end", "sequential")] + [
        {"case": "big", "device": "cuda", "modules": 1, "mode": "end-to-end", "peak_bytes": 10.0},
        {"case": "big", "device": "cuda", "modules": 60, "mode": "end-to-end", "peak_bytes": None}]}
    sw = BR.bench_memory_sweeps(doc)
    assert set(sw) == {"3D", "big"} and sw["3D"]["Ks"] == [1, 5, 60]
    assert sweep_value(sw["3D"], "sequential", 60) == (2.0, False)
    assert sweep_table(sw["3D"])[-1]["reduction"] == pytest.approx(1 - 2 / 6000)
    assert sw["big"]["rows"][1]["status"] == "oom"
    assert BR.bench_memory_sweeps(None) == {}
    tr = {"rows": [{"mode": "end-to-end", "time_s": 100.0, "epochs_per_module": 2},
                   {"mode": "sequential", "time_s": 110.0, "epochs_per_module": 2}]}
    assert BR.bench_training_ratio(tr) == pytest.approx(1.1)
    assert BR.bench_training_ratio({"rows": tr["rows"][:1]}) is None
    assert BR.bench_training_ratio(None) is None
