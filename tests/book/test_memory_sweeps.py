"""fbsembook.memory: the cached peak-memory sweeps against K (tiny problems)."""

from __future__ import annotations

import json

import pytest

from fbsembook import memory as M


def test_memory_sweep_cached_and_table(tmp_path, monkeypatch):
    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    kw = dict(image_shape=(1, 16, 16), width=4, depth=2, batch_size=1, num_subsets=2, subprocess_rss=False)
    sw = M.memory_sweep(None, Ks=(1, 2, 4), modes=("end-to-end", "sequential"), **kw)
    assert [(r["mode"], r["K"], r["status"]) for r in sw["rows"]] == [
        ("end-to-end", 1, "ok"), ("end-to-end", 2, "ok"), ("end-to-end", 4, "ok"),
        ("sequential", 1, "ok"), ("sequential", 2, "ok"), ("sequential", 4, "ok")]
    e = [M.sweep_value(sw, "end-to-end", K)[0] for K in (1, 2, 4)]
    s = [M.sweep_value(sw, "sequential", K)[0] for K in (1, 2, 4)]
    assert e[0] < e[1] < e[2]  # grows with K
    assert s[0] == s[1] == s[2]  # one module
    # extrapolation of a K that was not measured
    v, extra = M.sweep_value(sw, "end-to-end", 60)
    assert extra and v > e[2]
    assert M.sweep_value(sw, "end-to-end", 60, extrapolate=False) == (None, False)
    table = M.sweep_table(sw)
    assert [r["K"] for r in table] == [1, 2, 4]
    assert table[-1]["reduction"] == pytest.approx(1 - s[2] / e[2])
    # cached: the same call reads the JSON file
    files = list((tmp_path / "cache" / "memory").glob("sweep-2d-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    doc["rows"][0]["peak_bytes"] = -1
    files[0].write_text(json.dumps(doc))
    again = M.memory_sweep(None, Ks=(1, 2, 4), modes=("end-to-end", "sequential"), **kw)
    assert again["rows"][0]["peak_bytes"] == -1


def test_memory_sweep_out_of_memory(tmp_path, monkeypatch):
    """A mode that runs out of memory at some K: that K is 'oom', the larger ones 'skipped',
    and the value at the largest K is extrapolated from the measured ones."""
    import fbsemlib.training.memory as training_memory

    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    real = training_memory.measure_training_memory

    def fake(problem, K, mode, device="cpu", **kw):
        if mode == "end-to-end" and K >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(problem, K, mode, device=device, **kw)

    monkeypatch.setattr(training_memory, "measure_training_memory", fake)
    kw = dict(image_shape=(1, 16, 16), width=4, depth=2, batch_size=1, num_subsets=2, subprocess_rss=False)
    sw = M.memory_sweep(None, Ks=(1, 2, 4, 8), modes=("end-to-end", "sequential"), cache=False, **kw)
    st = {(r["mode"], r["K"]): r["status"] for r in sw["rows"]}
    assert st[("end-to-end", 4)] == "oom" and st[("end-to-end", 8)] == "skipped"
    assert st[("sequential", 8)] == "ok"
    v, extra = M.sweep_value(sw, "end-to-end", 8)
    assert extra and v > M.sweep_value(sw, "end-to-end", 2)[0]
    table = M.sweep_table(sw)
    assert table[-1]["end-to-end"] is None and table[-1]["reduction"] is None

    def broken(problem, K, mode, device="cpu", **kw):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(training_memory, "measure_training_memory", broken)
    with pytest.raises(ValueError):
        M.memory_sweep(None, Ks=(1,), modes=("sequential",), cache=False, **kw)



def test_memory_3d_kwargs_are_copies():
    kw = M.memory_3d_kwargs("cpu")
    assert kw == M.MEMORY_3D["cpu"] and kw["dims"] == "3d"
    kw["width"] = -1
    assert M.MEMORY_3D["cpu"]["width"] != -1
    with pytest.raises(ValueError):
        M.memory_3d_kwargs("gpu")
