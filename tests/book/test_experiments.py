"""fbsembook.experiments: profiles, cached datasets, runs and evaluations."""

import json

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
    import collections
    import copy
    import json
    from pathlib import Path

    import torch

    from fbsemlib.physics import cache
    from fbsemlib.physics.geometry import ImageGrid, sinogram_geometry_from_dict
    from fbsemlib.physics.projector import Projector
    from fbsemlib.training import load_trained
    monkeypatch.setattr(cache, "_cache", collections.OrderedDict())
    run = ex.Run(Path(smoke_model), "sequential", {}, {})
    a, cfgs = run.load(device="cpu")
    b, _ = run.load(device="cpu")
    assert a is not b and a.projector is b.projector
    assert all(a.subset_model(m).projector is b.subset_model(m).projector for m in range(a.num_subsets))
    assert cache.cached_count() == 1
    c, _ = load_trained(smoke_model, device=torch.device("cpu"))
    assert c.projector is a.projector
    assert not a.training and not b.training
    # a model can still be given its own projector
    own = Projector(sinogram_geometry_from_dict(cfgs["projector"]["sinogram"]), ImageGrid.from_dict(cfgs["projector"]["grid"]))
    d, _ = load_trained(smoke_model, device="cpu", projector=own)
    assert d.projector is own and d.projector is not a.projector
    # bounded: the least recently used geometry is dropped
    monkeypatch.setattr(cache, "CACHE_SIZE", 1)
    spec = json.loads(json.dumps(cfgs["projector"]))
    other = copy.deepcopy(spec)
    other["psf_fwhm_mm"] = [1.0, 1.0, 1.0] if spec.get("psf_fwhm_mm") is None else None
    p_other = cache.projector_from_spec(other, "cpu")
    assert p_other is not a.projector and cache.cached_count() == 1
    assert cache.projector_from_spec(other, "cpu") is p_other
    assert cache.projector_from_spec(spec, "cpu") is not a.projector  # evicted, rebuilt


def test_method_readers():
    ev = {"summary": {"fbsem": {"nrmse": {"mean": 12.0, "std": 1.0}}}}
    assert ex.method_mean(ev) == 12.0 and ex.method_std(ev) == 1.0
    assert ex.method_mean(ev, "osem") is None


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "x.json"
    ex.write_json(path, {"a": 1, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 1, "b": [1.5]}
    assert not list(path.parent.glob("*.tmp"))
