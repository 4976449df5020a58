import pytest

from fbsemlib import experiments as ex


def test_load_profile_overrides():
    s = ex.load_profile("smoke", {"train.epochs": 7, "model.shared": True})
    assert s["train"]["epochs"] == 7 and s["model"]["shared"] is True
    assert s["data"]["name"] == "smoke"
    with pytest.raises(ValueError, match="unknown profile"):
        ex.load_profile("nope")
    with pytest.raises(ValueError, match="section.field"):
        ex.load_profile("smoke", {"epochs": 1})


def test_train_and_evaluate_are_cached(smoke_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    s = ex.load_profile("smoke", {"train.epochs_per_module": 1})
    run = ex.train(s, "sequential", data_dir=smoke_dataset)
    model = run.path / "model.pt"
    mtime = model.stat().st_mtime_ns
    again = ex.train(s, "sequential", data_dir=smoke_dataset)
    assert again.path == run.path and model.stat().st_mtime_ns == mtime  # reused, not retrained
    other = ex.train(ex.load_profile("smoke", {"train.epochs_per_module": 1, "train.seed": 1}), "sequential",
                     data_dir=smoke_dataset)
    assert other.path != run.path  # a changed parameter retrains
    assert run.logs("stages") and run.metrics["num_modules"] == 8
    ev = ex.evaluate(run, smoke_dataset, methods=("fbsem", "osem"))
    assert set(ev["summary"]) == {"fbsem", "osem"}
    files = list(run.path.glob("evaluation-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    ex.evaluate(run, smoke_dataset, methods=("fbsem", "osem"))
    assert files[0].stat().st_mtime_ns == mtime


def test_parallel_requests_train_once(smoke_dataset, tmp_path, monkeypatch):
    """Two processes asking for the same run at once: one trains, the other waits and reuses it."""
    import subprocess
    import sys

    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    code = ("import sys; from fbsemlib import experiments as ex; "
            "s = ex.load_profile('smoke', {'train.epochs_per_module': 1, 'train.seed': 7}); "
            f"r = ex.train(s, 'sequential', data_dir=r'{smoke_dataset}'); print(r.path)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    import json
    from pathlib import Path

    lines = (Path(outs[0]) / "log_stages.csv").read_text().splitlines()
    assert len(lines) == 1 + 8  # header + one row per stage: trained exactly once
