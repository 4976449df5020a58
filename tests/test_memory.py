"""Memory accounting of one training step (fbsemlib.training.memory)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fbsemlib.cli import main
from fbsemlib.cli.memory import cmd_memory
from fbsemlib.errors import UserError
from fbsemlib.training.memory import (
    MemoryReport,
    SavedTensorTracker,
    measure_training_memory,
    memory_problem,
    resolve_spec,
)

REPO = Path(__file__).resolve().parent.parent
TINY = dict(width=4, depth=3, batch_size=1)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster (and immune to a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def p2d():
    return memory_problem(dims="2d", image_shape=(1, 32, 32), **TINY)


@pytest.fixture(scope="module")
def p3d():
    return memory_problem(dims="3d", **TINY)


def _linear_fit(ks, ys):
    ks, ys = np.asarray(ks, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(ks, ys, 1)
    pred = slope * ks + intercept
    r2 = 1 - ((ys - pred) ** 2).sum() / ((ys - ys.mean()) ** 2).sum()
    return slope, intercept, r2


# ----------------------------------------------------------------------------------------
# the saved-tensor tracker on graphs of known size
# ----------------------------------------------------------------------------------------
def test_tracker_counts_unique_storages_and_releases():
    n = 1000
    x = torch.rand(n, requires_grad=True)
    tr = SavedTensorTracker(exclude=[x])
    with tr.hooks():
        y = x * 2.0  # multiplication by a number saves nothing
        z = y.exp()  # saves its result z
        w = z.sin()  # saves its input z: the same storage, counted once
        u = y.cos()  # saves y: a second storage
        loss = (w + u).sum()
    assert tr.live_bytes == tr.peak_bytes == 2 * n * 4
    del y, z, w, u
    loss.backward()
    del loss
    assert tr.live_bytes == 0 and tr.peak_bytes == 2 * n * 4
    assert x.grad is not None


def test_tracker_sees_checkpoint_recomputation():
    n = 1000
    x = torch.rand(n, requires_grad=True)

    def f(t):
        return t.exp().sin()  # recomputation keeps exp's result (n floats)

    peaks = []
    for wrap in (False, True):
        tr = SavedTensorTracker(exclude=[x])
        with tr.hooks():
            out = checkpoint(tr.wrap(f) if wrap else f, x, use_reentrant=False)
            assert tr.live_bytes == 0  # the checkpoint keeps nothing during the forward pass
            out.sum().backward()
        del out
        assert tr.live_bytes == 0
        peaks.append(tr.peak_bytes)
    assert peaks == [0, n * 4]  # our hooks alone miss it; the wrapper counts it


# ----------------------------------------------------------------------------------------
# the three modes
# ----------------------------------------------------------------------------------------
def test_end_to_end_grows_linearly(p2d):
    ks = [1, 2, 4, 8]
    reps = [measure_training_memory(p2d, k, "end-to-end") for k in ks]
    for r, k in zip(reps, ks):
        assert isinstance(r, MemoryReport) and r.modules == k and r.mode == "end-to-end"
        assert r.device == "cpu" and r.dims == "2d" and r.image_shape == (1, 32, 32)
        assert r.peak_bytes == r.saved_tensor_bytes + r.batch_bytes > 0
        assert r.rss_peak_bytes is None and r.module_index is None
    slope, _, r2 = _linear_fit(ks, [r.peak_bytes for r in reps])
    assert slope > 0 and r2 > 0.99, (slope, r2)
    # one module of saved activations per module (the image is 1 x 32 x 32, width 4)
    assert slope > 10 * 32 * 32 * 4


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_sequential_flat_and_far_below_end_to_end(dims, p2d, p3d):
    p = p2d if dims == "2d" else p3d
    seq5 = measure_training_memory(p, 5, "sequential")
    seq60 = measure_training_memory(p, 60, "sequential")
    e2e60 = measure_training_memory(p, 60, "end-to-end")
    assert seq60.module_index == 59 and seq5.module_index == 4 and seq60.dims == dims
    assert abs(seq60.peak_bytes - seq5.peak_bytes) <= 0.10 * seq5.peak_bytes
    # the cached input batch and the target are part of the sequential number
    assert seq60.batch_bytes == 2 * 4 * int(np.prod(p.image_shape)) * p.batch_size
    assert seq60.peak_bytes <= 0.05 * e2e60.peak_bytes, (seq60.peak_bytes, e2e60.peak_bytes)
    assert e2e60.time_s < 30
    ck60 = measure_training_memory(p, 60, "checkpointed")
    assert seq60.peak_bytes < ck60.peak_bytes < e2e60.peak_bytes
    # the recomputed module is counted: at least one module's activations
    assert ck60.saved_tensor_bytes >= seq60.saved_tensor_bytes


def test_checkpointed_counts_the_recomputed_module(p2d):
    e2e1 = measure_training_memory(p2d, 1, "end-to-end")
    ck1 = measure_training_memory(p2d, 1, "checkpointed")
    ck8 = measure_training_memory(p2d, 8, "checkpointed")
    e2e8 = measure_training_memory(p2d, 8, "end-to-end")
    # K = 1: the recomputed module is everything (the loss term is freed before it runs)
    assert 0.9 * e2e1.saved_tensor_bytes <= ck1.saved_tensor_bytes <= e2e1.saved_tensor_bytes
    assert ck1.saved_tensor_bytes <= ck8.saved_tensor_bytes < 0.5 * e2e8.saved_tensor_bytes


def test_k_not_a_multiple_of_subsets():
    p = memory_problem(dims="2d", num_subsets=3, **TINY)
    r = measure_training_memory(p, 7, "end-to-end")
    r1 = measure_training_memory(p, 1, "end-to-end")
    assert r.modules == 7 and r.num_subsets == 3
    assert r.saved_tensor_bytes == pytest.approx(7 * r1.saved_tensor_bytes, rel=0.05)


def test_subprocess_rss():
    p = memory_problem(dims="2d", width=16, depth=3, batch_size=1)
    r = measure_training_memory(p, 24, "end-to-end", subprocess_rss=True)
    assert r.rss_peak_bytes is not None, r.rss_note
    # the RSS of the step includes the saved activations (plus gradients and temporaries)
    assert 0.8 * r.saved_tensor_bytes <= r.rss_peak_bytes <= 5 * r.peak_bytes + (64 << 20)


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
def test_config_sections(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "data:\n  scanner: small2d\n  image_shape: [1, 40, 40]\n  voxel_size_mm: [2.0, 4.0, 4.0]\n"
        "  num_subsets: 4\n  counts_range: [1.0e+6, 1.0e+7]\n"
        "model:\n  width: 6\n  depth: 4\n  num_iterations: 3\n"
        "train:\n  batch_size: 3\n"
        "memory:\n  batch_size: 1\n"
    )
    s = resolve_spec(cfg)
    assert s.dims == "2d" and s.num_subsets == 4 and s.batch_size == 1
    assert s.model == {"width": 6, "depth": 4}
    r = s.resolved()
    assert r["preset"] == "small2d" and r["image_shape"] == (1, 40, 40) and r["voxel_size_mm"] == (2.0, 4.0, 4.0)
    s3 = resolve_spec(cfg, dims="3d")  # the 2D grid and scanner do not apply
    assert s3.dims == "3d" and s3.resolved()["image_shape"][0] > 1 and s3.resolved()["preset"] == "small3d"
    assert resolve_spec(None).dims == "2d"  # defaults without any config
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory:\n  widht: 4\n")
    with pytest.raises(UserError, match="widht"):
        resolve_spec(bad)


def test_data_section_is_the_simulation_recipe():
    """The ``data:`` section is read as the recipe (DataConfig): its geometry, grid and
    subsets; keys that are not recipe fields are an error, as in ``fbsem train``."""
    data = {"scanner": "small3d", "num_rings": 3, "max_ring_difference": 5, "image_shape": [3, 24, 24],
            "voxel_size_mm": [4.0, 8.0, 8.0], "slices_per_subject": 1, "num_subsets": 4, "psf_fwhm_mm": 2.5}
    s = resolve_spec({"data": data, "model": {"width": 5, "num_iterations": 2}, "train": {"batch_size": "3"}})
    assert (s.dims, s.num_rings, s.max_ring_difference, s.num_subsets, s.batch_size) == ("3d", 3, 2, 4, 3)
    assert s.image_shape == (3, 24, 24) and s.voxel_size_mm == (4.0, 8.0, 8.0) and s.psf_fwhm_mm == 2.5
    assert s.model == {"width": 5} and s.resolved()["preset"] == "small3d"
    with pytest.raises(UserError, match="unknown key 'geometry' in section 'data'"):
        resolve_spec({"data": {"geometry": "small3d"}})
    with pytest.raises(UserError, match="data"):
        resolve_spec({"data": {"scanner": "small3d", "image_shape": [1, 24, 24]}})  # a 3D scanner, a 2D image


@pytest.mark.skipif(not (REPO / "data" / "smoke.yaml").exists(), reason="no data/smoke.yaml")
def test_project_profiles_parse():
    for name in ("smoke", "cpu", "paper"):
        f = REPO / "data" / f"{name}.yaml"
        if f.exists():
            s = resolve_spec(f)
            assert s.dims in ("2d", "3d")
    r = measure_training_memory(REPO / "data" / "smoke.yaml", 3, "sequential")
    assert r.peak_bytes > 0


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_cfg(tmp_path):
    cfg = tmp_path / "mem.yaml"
    cfg.write_text("memory:\n  dims: 2d\n  width: 4\n  depth: 3\n  batch_size: 1\n  subprocess_rss: false\n")
    return cfg


def test_cli_prints_json(tiny_cfg, capsys):
    rc = main(["memory", "--config", str(tiny_cfg), "--modules", "12", "--mode", "sequential", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(out)
    for key in ("peak_bytes", "mode", "modules", "device", "saved_tensor_bytes", "rss_peak_bytes"):
        assert key in d
    assert d["peak_bytes"] > 0 and d["mode"] == "sequential" and d["modules"] == 12 and d["device"] == "cpu"
    assert d["rss_peak_bytes"] is None
    rc = main(["memory", "--config", str(tiny_cfg), "--modules", "2", "--mode", "checkpointed", "--device", "cpu",
               "--dims", "3d"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["dims"] == "3d" and d["mode"] == "checkpointed" and d["peak_bytes"] > 0


def test_cli_subprocess_with_rss(tmp_path):
    cfg = tmp_path / "mem.yaml"
    cfg.write_text("memory:\n  width: 4\n  depth: 3\n  batch_size: 1\n")  # subprocess_rss defaults to true
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "fbsemlib", "memory", "--config", str(cfg), "--modules", "6",
                          "--mode", "end-to-end", "--device", "cpu"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["peak_bytes"] > 0 and d["modules"] == 6 and d["mode"] == "end-to-end"
    assert isinstance(d["rss_peak_bytes"], int) and d["rss_peak_bytes"] > 0


def test_cli_errors(tiny_cfg, tmp_path, capsys):
    base = ["memory", "--config", str(tiny_cfg), "--mode", "sequential", "--device", "cpu"]
    assert main(base + ["--modules", "0"]) == 2
    assert "--modules" in capsys.readouterr().err
    assert main(["memory", "--config", str(tmp_path / "nope.yaml"), "--modules", "3", "--mode", "sequential"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown mode
        main(["memory", "--config", str(tiny_cfg), "--modules", "3", "--mode", "greedy"])
    capsys.readouterr()
    ns = argparse.Namespace(config=str(tiny_cfg), modules=3, mode="greedy", device="cpu", dims=None)
    with pytest.raises(UserError, match="unknown --mode"):
        cmd_memory(ns)
    if not torch.cuda.is_available():
        assert main(base + ["--modules", "3", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(base + ["--modules", "3", "--device", "tpu"]) == 2
    capsys.readouterr()
    with pytest.raises(UserError, match="K"):
        measure_training_memory(None, 0, "end-to-end")
    with pytest.raises(UserError, match="unknown mode"):
        measure_training_memory(None, 2, "backwards")


# ----------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------
@cuda_only
def test_cuda_linear_flat_and_ordered():
    p = memory_problem(dims="2d", width=8, depth=3, batch_size=2, device="cuda")
    ks = [1, 2, 4, 8]
    e2e = [measure_training_memory(p, k, "end-to-end", device="cuda") for k in ks]
    for r in e2e:
        assert r.device.startswith("cuda") and r.baseline_bytes is not None
        assert r.peak_bytes == r.peak_total_bytes - r.baseline_bytes > 0
    slope, _, r2 = _linear_fit(ks, [r.peak_bytes for r in e2e])
    assert slope > 0 and r2 > 0.99, (slope, r2)
    seq5 = measure_training_memory(p, 5, "sequential", device="cuda")
    seq60 = measure_training_memory(p, 60, "sequential", device="cuda")
    assert abs(seq60.peak_bytes - seq5.peak_bytes) <= 0.10 * seq5.peak_bytes
    e2e60 = measure_training_memory(p, 60, "end-to-end", device="cuda")
    ck60 = measure_training_memory(p, 60, "checkpointed", device="cuda")
    assert seq60.peak_bytes < ck60.peak_bytes < e2e60.peak_bytes
    assert seq60.peak_bytes <= 0.10 * e2e60.peak_bytes


def test_proc_kib(tmp_path):
    from fbsemlib.training.memory import child as memory
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000 kB\nMemAvailable:    8000 kB\nVmHWMish: 3 kB\nBroken:\n")
    assert memory.proc_kib(str(f), "MemAvailable") == 8000 * 1024
    assert memory.proc_kib(str(f), "MemTotal") == 16000 * 1024
    assert memory.proc_kib(str(f), "VmHWM") is None  # a prefix of another field is not that field
    assert memory.proc_kib(str(f), "Broken") is None and memory.proc_kib(str(f), "Nope") is None
    assert memory.proc_kib(str(tmp_path / "missing"), "MemAvailable") is None
    if Path("/proc/meminfo").exists():
        assert memory.available_bytes() > 0 and memory._vm_hwm() > 0
