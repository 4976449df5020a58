import json
import subprocess
import sys
from pathlib import Path

from fbsemlib.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_projector_benchmark_quick_writes_json(tmp_path):
    assert main(["bench", "projector", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "projector_quick.json").read_text())
    assert doc["benchmark"] == "projector_quick"
    assert {"cpu", "cores", "torch"} <= set(doc["machine"])
    impls = {r["impl"] for r in doc["rows"]}
    assert {"fbsemlib-torch-matrix", "fbsemlib-torch-on-the-fly", "scipy-csr"} <= impls
    assert all(r["s_per_image"] > 0 for r in doc["rows"])
    seg = [r for r in doc["rows"] if r["impl"] == "fbsemlib-torch-segments" and r["device"] == "cpu"]
    assert len(seg) == 2  # the slab (side by side with on-the-fly) and the full scanner
    assert seg[0]["speedup_vs_on_the_fly"] > 0 and seg[0]["case"].startswith("3D mMR slab")
    assert seg[1]["case"].startswith("3D mMR full") and seg[1]["planes"] > seg[0]["planes"]
    assert all(r["matrix_bytes"] > 0 and r["forward_s"] > 0 and r["adjoint_s"] > 0 for r in seg)


def test_benchmark_script_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "projector.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fbsemlib-torch-matrix" in r.stdout


def test_unknown_benchmark_is_an_error(capsys):
    assert main(["bench", "nope", "--quick"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_memory_training_simulation_benchmarks_quick(tmp_path):
    for name in ("memory", "training", "simulation"):
        assert main(["bench", name, "--quick", "--out", str(tmp_path)]) == 0
        doc = json.loads((tmp_path / f"{name}_quick.json").read_text())
        assert doc["rows"] and doc["machine"]["cores"]
    mem = json.loads((tmp_path / "memory_quick.json").read_text())
    modes = {r["mode"] for r in mem["rows"]}
    assert modes == {"end-to-end", "checkpointed", "sequential"}
    for case, t in mem["targets"].items():
        assert t["flat_within_10pct"]  # sequential memory does not grow with K
    tr = json.loads((tmp_path / "training_quick.json").read_text())
    assert {r["mode"] for r in tr["rows"]} == {"end-to-end", "sequential"}
    assert tr["targets"]["sequential_over_end_to_end"] > 0


def test_memory_benchmark_survives_out_of_memory(monkeypatch):
    """End-to-end running out of (GPU) memory at large K is recorded, not fatal."""
    import torch

    import fbsemlib.training.memory as mem
    from fbsembook.bench import bench_memory, memory_targets

    real = mem.measure_training_memory

    def fake(prob, K, mode, device="cpu"):
        if mode == "end-to-end" and K >= 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(prob, K, mode, device=device)

    monkeypatch.setattr(mem, "measure_training_memory", fake)
    rows = bench_memory(quick=True)
    oom = [r for r in rows if r.get("out_of_memory")]
    assert oom and all(r["mode"] == "end-to-end" and r["modules"] >= 5 for r in oom)
    t = memory_targets(rows)
    for case in t.values():
        assert case["end_to_end_out_of_memory_from_K"] == 5 and case["reduction_at_K"] == 2
        assert case["flat_within_10pct"]
