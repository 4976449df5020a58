import pytest

from fbsembook import experiments as ex
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
    ops = ex.train(ex.load_profile("smoke", {"train.epochs_per_module": 1, "train.checkpoint_every": 3,
                                             "train.log_every": 2}), "sequential", data_dir=smoke_dataset)
    assert ops.path == run.path and model.stat().st_mtime_ns == mtime  # operational fields: reused
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
    code = ("import sys; from fbsembook import experiments as ex; "
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


def test_runs_share_one_projector_per_geometry(smoke_model, monkeypatch):
    """Run.load reuses the projector (and its subset system matrices) of a geometry instead
    of rebuilding it for every loaded model; the cache is bounded."""
    import copy
    import json
    from pathlib import Path

    import torch

    from fbsemlib.training import trainers as training
    monkeypatch.setattr(training, "_projectors", type(training._projectors)())
    run = ex.Run(Path(smoke_model), "sequential", {}, {})
    a, cfgs = run.load(device="cpu")
    b, _ = run.load(device="cpu")
    assert a is not b and a.projector is b.projector
    assert all(p is q for p, q in zip(a.subset_projectors, b.subset_projectors))
    assert len(training._projectors) == 1
    c, _ = training.load_trained(smoke_model, device=torch.device("cpu"))
    assert c.projector is a.projector
    assert not a.training and not b.training
    # a model can still be given its own projector
    own = training.build_projector(cfgs["projector"], "cpu")
    d, _ = training.load_trained(smoke_model, device="cpu", projector=own)
    assert d.projector is own and d.projector is not a.projector
    # bounded: the least recently used geometry is dropped
    monkeypatch.setattr(training, "PROJECTOR_CACHE_SIZE", 1)
    spec = json.loads(json.dumps(cfgs["projector"]))
    other = copy.deepcopy(spec)
    other["psf_fwhm_mm"] = [1.0, 1.0, 1.0] if spec.get("psf_fwhm_mm") is None else None
    p_other = training.shared_projector(other, "cpu")
    assert p_other is not a.projector and len(training._projectors) == 1
    assert training.shared_projector(other, "cpu") is p_other
    assert training.shared_projector(spec, "cpu") is not a.projector  # evicted, rebuilt
