"""Simulation: recipe validation, Poisson statistics, count levels, iteration-dependent
targets, splits, reproducibility, atomic/resumable writing and the ``fbsem simulate`` CLI.

All tests use tiny in-test recipes (the ``tiny2d`` scanner, 24 x 24 images) or the smoke
recipe, so they run in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

import fbsemlib.data.simulate as sim
from fbsemlib.cli import main
from fbsemlib.config import ConfigError, from_dict, load_experiment, to_dict
from fbsemlib.data import (
    DataConfig,
    DatasetError,
    PETDataset,
    load_data_config,
    open_dataset,
    recipe_hash,
    validate_dataset,
)
from fbsemlib.physics.forward_model import PETForwardModel
from fbsemlib.recon.algorithms import osem
from fbsemlib.data.simulate import SimulationContext, simulate_dataset, simulate_subject

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    name="tiny", scanner="tiny2d", image_shape=[1, 24, 24], voxel_size_mm=[2.0, 9.0, 9.0],
    phantom={"template_resolution": 2}, num_subjects=3, split={"train": 1, "validation": 1, "test": 1},
    slices_per_subject=2, rotations_per_slice=2, counts_range=[2e5, 2e6],
    noise_realisations={"test": 2}, num_iterations=2, num_subsets=3, compression="none", seed=7,
)


def tiny(**changes) -> DataConfig:
    d = dict(TINY)
    d.update(changes)
    return from_dict(DataConfig, d, "data")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "tiny"
    simulate_dataset(tiny(), out, progress=False)
    return out


def _arrays(path: Path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
    return out


# ----------------------------------------------------------------------------------------
# recipe / config
# ----------------------------------------------------------------------------------------
def test_recipe_files_load():
    for name, K in (("smoke", None), ("cpu", None), ("paper", 60)):
        sections = load_experiment(REPO / "data" / f"{name}.yaml")
        cfg = from_dict(DataConfig, sections["data"], "data")
        assert cfg.name == name
        assert cfg.num_modules == cfg.num_iterations * cfg.num_subsets
        if K:
            assert cfg.K == K
    paper = load_data_config(REPO / "data" / "paper.yaml")
    assert paper.scanner == "mmr2d" and paper.image_shape == (1, 172, 172)
    assert paper.num_subjects == 20 and paper.slices_per_subject == 10 and paper.rotations_per_slice == 5


#: the recipe hashes of the committed recipes: the keys of every cached dataset and of
#: everything computed from one. A refactor must leave them as they are; change them only
#: with a deliberate change of a recipe or of the dataset format.
RECIPE_HASHES = {
    "smoke": "83997eba399d3d4ec8f280c79c1f00d637a49b04cc3d67557a92ee202ecc6e64",
    "cpu": "d693bb7400dfcf77d11512e3be98f90d5e8dc4a84d9590482b533951f21c3477",
    "paper": "e521c7f2e1da2b2f1c7ef1a670f1f63a399f74e97d22fe2d47bbdf820fc5cbf0",
}


@pytest.mark.parametrize("name", sorted(RECIPE_HASHES))
def test_recipe_hash_unchanged(name):
    assert recipe_hash(load_data_config(REPO / "data" / f"{name}.yaml")) == RECIPE_HASHES[name]


def test_load_experiment_keeps_other_sections(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text(yaml.safe_dump({"data": {"num_subjects": 4, "split": {"train": 4}}, "model": {"x": 1},
                                 "train": {"epochs": 3}}))
    s = load_experiment(p)
    assert s["model"] == {"x": 1} and s["train"] == {"epochs": 3}
    cfg = from_dict(DataConfig, s["data"], "data")
    assert cfg.split_counts() == {"train": 4, "validation": 0, "test": 0}
    # round trip
    assert from_dict(DataConfig, to_dict(cfg), "data") == cfg
    # YAML reads 1e6 (no dot) as a string: converted
    c2 = from_dict(DataConfig, {"counts_range": ["1e6", "2e6"]}, "data")
    assert c2.counts_range == (1e6, 2e6)


@pytest.mark.parametrize("bad, words", [
    ({"nonsense": 1}, ["nonsense", "data"]),
    ({"phantom": {"nonsense": 1}}, ["nonsense", "data.phantom"]),
    ({"counts_range": [-1, 10]}, ["counts_range"]),
    ({"counts_range": [10, 1]}, ["counts_range"]),
    ({"num_subsets": 0}, ["num_subsets"]),
    ({"num_modules": 7, "num_subsets": 4, "num_iterations": None}, ["multiple", "num_subsets"]),
    ({"num_modules": 8, "num_subsets": 4, "num_iterations": 3}, ["num_modules"]),
    ({"scanner": "nope"}, ["nope", "preset"]),
    ({"num_subjects": "ten"}, ["num_subjects"]),
    ({"split": {"train": 2, "validation": 0, "test": 0}}, ["split"]),
    ({"split": {"training": 3}}, ["training"]),
    ({"num_subsets": 1000}, ["num_subsets", "views"]),
    ({"image_shape": [1, 200, 200], "voxel_size_mm": [2, 2, 2]}, ["field of view"]),
    ({"image_shape": [4, 24, 24]}, ["3D"]),
    ({"high_count": 10.0}, ["high_count"]),
    ({"scatter_fraction": 1.5}, ["scatter_fraction"]),
])
def test_bad_recipe_rejected(bad, words):
    with pytest.raises(ConfigError) as e:
        tiny(**bad)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg


def test_split_fractions():
    c = tiny(num_subjects=10, split={"train": 0.7, "validation": 0.15, "test": 0.15})
    counts = c.split_counts()
    assert sum(counts.values()) == 10 and counts["train"] == 7
    ids = sim.split_subjects(c)
    allids = ids["train"] + ids["validation"] + ids["test"]
    assert sorted(allids) == list(range(10))


# ----------------------------------------------------------------------------------------
# physics
# ----------------------------------------------------------------------------------------
def test_poisson_statistics():
    """Mean and variance of the noisy data match the expected data over many realisations."""
    cfg = tiny(slices_per_subject=1, rotations_per_slice=1, noise_realisations={"test": 200},
               counts_range=[3e5, 3e5], psf_fwhm_mm=8.0)
    ctx = SimulationContext(cfg)
    assert ctx.projector.psf is not None
    res = simulate_subject(ctx, 0, "test")
    ybar = res["sinograms"]["ybar"][0].astype(np.float64)
    # the noise-free data is m * A G x + b (PSF in the projector)
    x = torch.from_numpy(res["images"]["activity"][0])
    model = PETForwardModel(ctx.projector, torch.from_numpy(res["sinograms"]["multiplicative"][0]),
                            torch.from_numpy(res["sinograms"]["additive"][0]))
    np.testing.assert_allclose(model.expected(x).numpy(), ybar, rtol=1e-5, atol=1e-4 * ybar.max())
    assert abs(ybar.sum() / 3e5 - 1) < 1e-4
    y = res["samples"]["y"].astype(np.float64)
    R = y.shape[0]
    assert R == 200
    assert np.all(y >= 0) and np.all(y == np.round(y))
    assert not np.array_equal(y[0], y[1])
    sel = ybar > 5
    assert sel.sum() > 100
    mean, var = y.mean(0), y.var(0, ddof=1)
    z = (mean[sel] - ybar[sel]) / np.sqrt(ybar[sel] / R)
    # z ~ N(0, 1) per bin: chi-square / dof close to 1, no bias
    assert abs(np.mean(z ** 2) - 1) < 0.15, np.mean(z ** 2)
    assert abs(np.mean(z)) < 0.15
    # variance / mean ~ 1 (Poisson), averaged over bins
    ratio = var[sel] / ybar[sel]
    assert abs(ratio.mean() - 1) < 0.03, ratio.mean()
    # bins with zero expectation (block gaps / outside) stay zero
    assert np.all(y[:, ybar == 0] == 0)


def test_count_levels_and_background(tiny_dir):
    cfg = tiny()
    seen = []
    for fp in sorted(tiny_dir.glob("subject-*.h5")):
        with h5py.File(fp, "r") as f:
            ybar = f["sinograms/ybar"][()].astype(np.float64)
            add = f["sinograms/additive"][()].astype(np.float64)
            counts = f["images/counts"][()]
            trues = f["images/trues"][()]
            y = f["samples/y"][()]
            ii = f["samples/image_index"][()]
        tot = ybar.sum(axis=(1, 2, 3))
        np.testing.assert_allclose(tot, counts, rtol=1e-2)  # requested count level honoured (1 %)
        np.testing.assert_allclose(tot, counts, rtol=1e-4)  # in fact up to float32 rounding
        assert np.all((counts >= cfg.counts_range[0]) & (counts <= cfg.counts_range[1]))
        # trues fraction (1 - SF)(1 - RF); background = the rest
        np.testing.assert_allclose(trues / counts, (1 - cfg.scatter_fraction) * (1 - cfg.randoms_fraction), rtol=1e-6)
        np.testing.assert_allclose(add.sum(axis=(1, 2, 3)), counts - trues, rtol=1e-4)
        # measured totals are Poisson around the expectation
        assert np.all(np.abs(y.sum(axis=(1, 2, 3)) - counts[ii]) < 6 * np.sqrt(counts[ii]))
        seen.extend(counts.tolist())
    assert len(set(seen)) == len(seen)  # drawn per image


def test_targets_equal_fresh_osem(tiny_dir):
    """Stored iteration-dependent targets = a fresh OSEM run on the stored noise-free data."""
    ds = PETDataset(tiny_dir, "test")
    P = ds.make_projector()
    for i in (0, len(ds) - 1):
        s = ds[i]
        ybar = ds.extra(i, ["ybar"])["ybar"][0]
        model = PETForwardModel(P, s["multiplicative"][0], s["additive"][0])
        # the stored noise-free data is the model's expectation of the phantom
        torch.testing.assert_close(model.expected(s["activity"][0]), ybar, rtol=1e-5, atol=1e-3)
        _, its = osem(model, ybar, ds.num_iterations, ds.num_subsets, return_iterates=True)
        fresh = torch.stack(its)[:, None]
        assert fresh.shape == s["targets"].shape == (ds.num_modules, 1) + ds.grid.shape
        scale = float(fresh.abs().max())
        torch.testing.assert_close(s["targets"], fresh, rtol=1e-5, atol=1e-5 * scale)
        # the high-count reference is close to the last target (same schedule, 1e10 counts)
        last, ref, m = s["targets"][-1], s["target_final"], s["brain_mask"]
        assert float((ref - last)[m].abs().mean()) < 0.02 * float(last[m].mean())


def test_no_inverse_crime(tmp_path):
    """simulation_oversampling 2, background estimated: the data come from a phantom twice as
    fine in-plane, projected with its own projector; the reconstruction is told the block
    averages, a mu-map-on-its-grid attenuation and an estimated background, so its model does
    not reproduce the noise-free data exactly (as with a real scanner), but comes close; the
    targets are OSEM of the true noise-free data with the told model."""
    cfg = tiny(simulation_oversampling=2, background="estimated", noise_realisations={"test": 1},
               rotations_per_slice=1, slices_per_subject=1)
    r = simulate_subject(SimulationContext(cfg), 0, "test")
    assert r["images"]["activity"].shape[-2:] == (24, 24)
    ctx = SimulationContext(cfg)
    P = ctx.projector
    mult = torch.from_numpy(r["sinograms"]["multiplicative"])
    add = torch.from_numpy(r["sinograms"]["additive"])
    x = torch.from_numpy(r["images"]["activity"])
    ybar = torch.from_numpy(r["sinograms"]["ybar"])
    told = PETForwardModel(P, mult, add).expected(x)
    rel = float((told - ybar).norm() / ybar.norm())
    assert 1e-3 < rel < 0.15, rel
    # the counts asked for are the true data's; the told background has the true total
    np.testing.assert_allclose(ybar.double().sum((-3, -2, -1)).numpy(), r["images"]["counts"], rtol=1e-4)
    np.testing.assert_allclose(add.double().sum().item(), (r["images"]["counts"] - r["images"]["trues"]).sum(),
                               rtol=1e-4)
    _, its = osem(PETForwardModel(P, mult, add), ybar, cfg.num_iterations, cfg.num_subsets, return_iterates=True)
    scale = float(its[-1].abs().max())
    torch.testing.assert_close(torch.from_numpy(r["images"]["targets"]), torch.stack(its, 1), rtol=1e-5,
                               atol=1e-5 * scale)
    # the inverse-crime recipe (oversampling 1, exact background) reproduces its data exactly
    crime = tiny(noise_realisations={"test": 1}, rotations_per_slice=1, slices_per_subject=1)
    r1 = simulate_subject(SimulationContext(crime), 0, "test")
    m1 = PETForwardModel(P, torch.from_numpy(r1["sinograms"]["multiplicative"]),
                         torch.from_numpy(r1["sinograms"]["additive"]))
    torch.testing.assert_close(m1.expected(torch.from_numpy(r1["images"]["activity"])),
                               torch.from_numpy(r1["sinograms"]["ybar"]), rtol=1e-5, atol=1e-3)


def test_block_averages():
    from fbsemlib.data.resolution import block_labels, block_mask, block_mean

    a = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.testing.assert_allclose(block_mean(a, 2)[0, 0], [[2.5, 4.5], [10.5, 12.5]])
    m = np.zeros((1, 4, 4), np.uint8)
    m[0, :2, :1] = 1  # half of the first block
    m[0, 2:, 2:] = 1  # all of the last
    assert block_mask(m, 2)[0].tolist() == [[1, 0], [0, 1]]
    lab = np.zeros((1, 4, 4), np.uint8)
    lab[0, :2, :2] = 3
    lab[0, 2, 2] = 5  # a quarter of a block: lost
    assert block_labels(lab, 2)[0].tolist() == [[3, 0], [0, 0]]
    with pytest.raises(ValueError, match="multiple"):
        block_mean(np.zeros((1, 3, 3)), 2)


def test_split_disjoint_by_subject(tiny_dir):
    info = open_dataset(tiny_dir)
    sp = info.manifest["splits"]
    sets = [set(sp[s]) for s in ("train", "validation", "test")]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(range(3))
    for split in ("train", "validation", "test"):
        ds = PETDataset(tiny_dir, split)
        subjects = {ds.info(i)["subject"] for i in range(len(ds))}
        assert subjects == set(sp[split])
        for fp in info.files(split):
            with h5py.File(fp, "r") as f:
                assert f.attrs["split"] == split
    # realisations: the test split has 2 per image, others 1
    assert len(PETDataset(tiny_dir, "test")) == 2 * len(PETDataset(tiny_dir, "train"))


def test_files_record_provenance(tiny_dir):
    """Every subject file and the manifest record the format, the recipe and its hash and
    the versions of fbsemlib.provenance; nothing half-written is left behind."""
    import fbsemlib
    from fbsemlib.provenance import versions

    expected = versions("scipy", "h5py", "hdf5", "nilearn")
    info = open_dataset(tiny_dir)
    m = info.manifest
    assert list(m)[:5] == ["format", "format_version", "fbsemlib_version", "recipe_hash", "recipe"]
    # no time stamp in the content (byte-identical datasets); the run's log is apart
    assert "created" not in m and "seconds" not in m["summary"]
    assert info.summary()["seconds"] > 0 and "created" in json.loads((tiny_dir / "simulation.json").read_text())
    assert m["library_versions"] == expected and m["fbsemlib_version"] == fbsemlib.__version__
    assert m["recipe_hash"] == recipe_hash(tiny()) and m["recipe"] == to_dict(tiny())
    for fp in info.files():
        with h5py.File(fp, "r") as f:
            assert json.loads(f.attrs["library_versions"]) == expected
            assert f.attrs["fbsemlib_version"] == fbsemlib.__version__
            assert f.attrs["recipe_hash"] == m["recipe_hash"] and json.loads(f.attrs["recipe"]) == m["recipe"]
            assert "created" not in f.attrs
            assert int(f.attrs["complete"]) == 1
            assert isinstance(json.loads(f["images"].attrs["phantom_params"]), list)
    assert not list(tiny_dir.glob("*.part")) and not (tiny_dir / "recipe.json").exists()


# ----------------------------------------------------------------------------------------
# reproducibility, atomic writing, resuming
# ----------------------------------------------------------------------------------------
def test_bit_identical_by_seed(tiny_dir, tmp_path):
    out = tmp_path / "again"
    simulate_dataset(tiny(), out, progress=False)
    names = sorted(p.name for p in tiny_dir.glob("subject-*.h5"))
    assert names == sorted(p.name for p in out.glob("subject-*.h5")) and names
    for n in names:
        a, b = _arrays(tiny_dir / n), _arrays(out / n)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        # ... and the files themselves are byte-identical (no time stamps), as is the manifest
        assert (tiny_dir / n).read_bytes() == (out / n).read_bytes(), n
    assert (tiny_dir / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert open_dataset(tiny_dir).content_hash == open_dataset(out).content_hash
    # another seed gives other data (one subject is enough)
    other = SimulationContext(tiny(seed=8))
    r = simulate_subject(other, 0, "train")
    assert not np.array_equal(r["images"]["activity"], _arrays(tiny_dir / names[0])["images/activity"])


def test_interrupted_simulate_leaves_no_dataset_and_resumes(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    real = sim.simulate_subject
    calls = []

    def crashing(ctx, subject, split):
        if subject == 1:
            raise RuntimeError("simulated crash")
        calls.append(subject)
        return real(ctx, subject, split)

    monkeypatch.setattr(sim, "simulate_subject", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate_dataset(tiny(), out, progress=False)
    assert not out.exists()
    with pytest.raises(DatasetError):
        validate_dataset(out)
    tmps = list(tmp_path.glob("crash.tmp-*"))
    assert len(tmps) == 1 and (tmps[0] / "subject-0000.h5").exists()
    assert not (tmps[0] / "manifest.json").exists()
    with pytest.raises(DatasetError):
        validate_dataset(tmps[0])

    # rerun: completes, reusing the finished subject
    calls.clear()

    def counting(ctx, subject, split):
        calls.append(subject)
        return real(ctx, subject, split)

    monkeypatch.setattr(sim, "simulate_subject", counting)
    info = simulate_dataset(tiny(), out, progress=False)
    assert calls == [1, 2]
    assert info.summary()["resumed_subjects"] == 1
    assert not list(tmp_path.glob("crash.tmp-*"))
    validate_dataset(out)
    for n in ("subject-0000.h5", "subject-0001.h5"):
        a, b = _arrays(tiny_dir / n), _arrays(out / n)
        for k in a:
            assert np.array_equal(a[k], b[k]), k

    # a complete dataset of the same recipe is reused ...
    calls.clear()
    info = simulate_dataset(tiny(), out, progress=False)
    assert calls == [] and info.summary()["reused"]
    # ... unless overwrite
    info = simulate_dataset(tiny(), out, progress=False, overwrite=True)
    assert calls == [0, 1, 2]
    validate_dataset(out)


def test_existing_other_recipe_or_foreign_folder_refused(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="another recipe"):
        simulate_dataset(tiny(seed=99), tiny_dir, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a dataset"):
        simulate_dataset(tiny(), foreign, progress=False, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def _write_cfg(tmp_path, data: dict, name="cfg.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"data": data, "model": {"anything": 1}}))
    return str(p)


def test_cli_simulate_smoke_recipe(tmp_path, capsys):
    out = tmp_path / "smoke"
    rc = main(["simulate", "--config", str(REPO / "data" / "smoke.yaml"), "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for w in ("train", "validation", "test", "subjects", "samples", "counts", "disk", "time"):
        assert w in text
    info = validate_dataset(out)
    assert info.recipe.name == "smoke"
    # --seed overrides the recipe's seed (another recipe hash): refused without --overwrite
    rc = main(["simulate", "--config", str(REPO / "data" / "smoke.yaml"), "--out", str(out), "--seed", "3",
               "--no-progress"])
    assert rc == 2
    assert "another recipe" in capsys.readouterr().err


@pytest.mark.parametrize("change, words", [
    ({"bogus_key": 1}, ["bogus_key", "data"]),
    ({"counts_range": [-5, 100]}, ["counts_range"]),
    ({"num_subsets": 0}, ["num_subsets"]),
    ({"num_modules": 5, "num_subsets": 3, "num_iterations": None}, ["multiple"]),
    ({"scanner": "petscanner9000"}, ["petscanner9000"]),
])
def test_cli_bad_recipe_exit_2(tmp_path, capsys, change, words):
    d = dict(TINY)
    d.update(change)
    rc = main(["simulate", "--config", _write_cfg(tmp_path, d), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    for w in words:
        assert w in err, err
    assert not (tmp_path / "o").exists()


def test_cli_missing_config_and_section(tmp_path, capsys):
    assert main(["simulate", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    p = tmp_path / "nodata.yaml"
    p.write_text("model: {a: 1}\n")
    assert main(["simulate", "--config", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "data" in capsys.readouterr().err


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["simulate", "--config", _write_cfg(tmp_path, TINY), "--out", str(blocker / "sub" / "o"),
               "--no-progress"])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_cli_read_only_output(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root ignores permissions: pretend
        monkeypatch.setattr(os, "access", lambda *a, **k: False)
    try:
        rc = main(["simulate", "--config", _write_cfg(tmp_path, TINY), "--out", str(ro / "o"), "--no-progress"])
    finally:
        ro.chmod(0o700)
    assert rc == 2
    assert "not writable" in capsys.readouterr().err
    assert not (ro / "o").exists()


@pytest.mark.slow
def test_3d_recipe(tmp_path):
    """A (very small) 3D recipe: several rings, oblique planes."""
    cfg = from_dict(DataConfig, dict(
        name="t3d", scanner="small3d", num_rings=2, image_shape=[2, 24, 24], voxel_size_mm=[4.0, 9.0, 9.0],
        phantom={"template_resolution": 2, "num_lesions_3d": [0, 0]}, num_subjects=1, split={"test": 1},
        counts_range=[9e7, 1.2e8], num_iterations=2, num_subsets=1, compression="lzf"), "data")
    simulate_dataset(cfg, tmp_path / "t3d", progress=False)
    ds = PETDataset(tmp_path / "t3d", "test")
    s = ds[0]
    assert tuple(s["y"].shape) == (1, 4, 96, 111) and tuple(s["targets"].shape) == (2, 1, 2, 24, 24)
    P = ds.make_projector()
    ybar = s["multiplicative"] * P(s["activity"]) + s["additive"]
    assert abs(float(ybar.sum()) / ds.info(0)["counts"] - 1) < 1e-3
