"""fbsembook.analysis: helpers of the chapters on the original FBSEM-Net, iteration-dependent
targets and iteration-dependent networks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fbsembook import analysis as an
from fbsembook import runviews as RV
from fbsemlib.data import PETDataset
from fbsemlib.models import FBSEMNet, ModelConfig


@pytest.fixture(scope="module")
def test_split(smoke_dataset):
    return PETDataset(smoke_dataset, "test")


def _net(ds, shared: bool, seed: int = 0) -> FBSEMNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(shared=shared, depth=3, width=4, gamma_init=0.5)
    return FBSEMNet(ds.make_projector("cpu"), ds.num_iterations, ds.num_subsets, cfg).eval()


# ----------------------------------------------------------------------------------------
# one network
# ----------------------------------------------------------------------------------------
def test_network_table_and_parameter_counts(test_split):
    shared, itdep = _net(test_split, True), _net(test_split, False)
    rows = an.network_table(shared)
    convs = [r for r in rows if r["type"] == "Conv2d"]
    assert len(convs) == 3
    assert (convs[0]["in"], convs[0]["out"], convs[0]["kernel"]) == (2, 4, "3x3")  # PET + MR channels
    assert convs[-1]["out"] == 1
    pc_s, pc_i = an.parameter_counts(shared), an.parameter_counts(itdep)
    assert sum(r["parameters"] for r in rows) == pc_s["per_module"] == pc_s["cnn"] + 1
    K = test_split.num_modules
    assert pc_s["networks"] == 1 and pc_i["networks"] == K and pc_s["modules"] == pc_i["modules"] == K
    assert pc_s["total"] == pc_s["cnn"] + 1
    assert pc_i["total"] == K * pc_i["per_module"] == K * pc_s["per_module"]


def test_strengths(test_split):
    shared, itdep = _net(test_split, True), _net(test_split, False)
    g = an.strengths(shared)
    assert g.shape == (test_split.num_modules,) and np.allclose(g, 0.5, rtol=1e-5)
    with torch.no_grad():
        itdep.rho.copy_(torch.arange(itdep.num_modules, dtype=torch.float32) - 2)
    gi = an.strengths(itdep)
    assert np.allclose(gi, np.log1p(np.exp(np.arange(itdep.num_modules) - 2.0)), rtol=1e-5)


def test_trajectory_errors(test_split):
    item = test_split[0]
    K = test_split.num_modules
    targets = item["targets"][:, 0]
    err = an.trajectory_errors(targets, item)
    assert set(err) == {"target", "reference", "truth"} and all(v.shape == (K,) for v in err.values())
    assert np.allclose(err["target"], 0, atol=1e-4)  # the targets are their own trajectory
    assert np.all(err["truth"] > 0)
    twice = an.trajectory_errors(2 * targets, item)
    assert np.allclose(twice["target"], 100, rtol=1e-4)  # ||2t - t|| / ||t|| = 100 %
    # metrics.nrmse of the (Z, Y, X) images: bit for bit the value of the same images as batches of one
    from fbsemlib.evaluation import metrics

    mask = item["brain_mask"][0].bool()
    assert err["truth"][-1] == float(metrics.nrmse(targets[-1][None], item["activity"][0][None], mask[None]))


def test_as_batch_is_a_batch_of_one(test_split):
    from fbsemlib.data import PETBatch

    item = test_split[0]
    b = an.as_batch(item)
    assert isinstance(b, PETBatch) and b.batch_size == 1
    assert b.y.shape == (1,) + tuple(item["y"].shape) and b.targets.shape == (1,) + tuple(item["targets"].shape)
    assert torch.equal(b.activity[0], item["activity"]) and int(b.index[0]) == int(item["index"])


def test_osem_iterates_of_noise_free_data_are_the_targets(test_split):
    item = dict(test_split[0])
    item["y"] = test_split.extra(0, ("ybar",))["ybar"].float()
    its = an.osem_iterates(item, test_split.make_projector("cpu"), test_split.num_iterations, test_split.num_subsets)
    assert its.shape == (test_split.num_modules,) + tuple(test_split.grid.shape)
    err = an.trajectory_errors(its, item)["target"]
    assert np.all(err < 1.0), err  # the targets are OSEM of the noise-free data (stored in float32)


def test_reconstruct_sample(test_split):
    net = _net(test_split, True)
    P = test_split.make_projector("cpu")
    rec = an.reconstruct_sample(test_split[0], P, test_split.num_iterations, test_split.num_subsets,
                                nets={"fbsem": net}, baselines={"osem": None, "osem_postfilter": 4.0})
    assert list(rec) == ["truth", "osem", "osem_postfilter", "fbsem"]
    assert all(tuple(v.shape) == tuple(test_split.grid.shape) for v in rec.values())
    assert rec["osem"].min() >= 0


# ----------------------------------------------------------------------------------------
# several runs (synthetic evaluations)
# ----------------------------------------------------------------------------------------
def _evaluation(nrmse, ssim=None, method="fbsem"):
    ssim = ssim if ssim is not None else [0.9] * len(nrmse)
    rows = [{"method": method, "sample": i, "nrmse": v, "ssim": s, "crc_hot": None}
            for i, (v, s) in reversed(list(enumerate(zip(nrmse, ssim))))]
    other = "osem" if method != "osem" else "fbsem"  # a row of another method, to be ignored
    return {"rows": rows + [{"method": other, "sample": 0, "nrmse": 99.0, "ssim": 0.1}]}


def test_per_sample_and_run_means():
    ev = _evaluation([10.0, 12.0, 14.0], [0.8, 0.9, 1.0])
    assert np.allclose(an.per_sample(ev, "nrmse"), [10, 12, 14])  # ordered by sample
    assert np.isnan(an.per_sample(ev, "crc_hot")).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        assert math.isnan(an.run_means(ev, ("crc_hot",))["crc_hot"])
    m = an.run_means(ev)
    assert m == pytest.approx({"nrmse": 12.0, "ssim": 0.9})
    assert an.run_means(ev, ("nrmse",), method="osem") == {"nrmse": 99.0}
    with pytest.raises(ValueError, match="no rows"):
        an.per_sample(ev, "nrmse", method="mapem_bowsher")


def test_seed_spread():
    evs = {"stable": [_evaluation([10.0, 12.0]), _evaluation([10.2, 12.2])],
           "erratic": [_evaluation([10.0, 12.0]), _evaluation([14.0, 12.0])]}
    sp = an.seed_spread(evs, ("nrmse",))
    rows = {r["label"]: r for r in sp}
    assert rows["stable"]["runs"] == 2
    assert rows["stable"]["mean"] == pytest.approx(11.1)
    assert rows["stable"]["std"] == pytest.approx(np.std([11.0, 11.2], ddof=1))
    assert rows["erratic"]["sample_std"] == pytest.approx(np.mean([np.std([10, 14], ddof=1), 0.0]))
    assert rows["erratic"]["std"] > rows["stable"]["std"]
    one = an.seed_spread({"a": [_evaluation([1.0])], "b": [_evaluation([2.0])]}, ("nrmse",))
    assert math.isnan(one[0]["std"])


def test_image_spread():
    a, b = torch.ones(1, 4, 4), torch.full((1, 4, 4), 3.0)
    sd, rel = an.image_spread([a, b])
    assert torch.allclose(sd, torch.full((1, 4, 4), math.sqrt(2.0)))
    assert rel == pytest.approx(math.sqrt(2.0) / 2 * 100)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    assert an.image_spread([a, a, a], mask)[1] == 0.0
    with pytest.raises(ValueError):
        an.image_spread([a])


def test_paired_comparison_and_verdict():
    a, b = _evaluation([10.0, 11.0, 12.0, 13.0]), _evaluation([11.0, 12.1, 12.9, 14.2])
    c = an.paired_comparison(a, b, "nrmse")
    assert c["n"] == 4 and c["a_better"] == 4 and c["mean_diff"] < 0
    v = an.comparison_verdict(c, "A", "B")
    assert v["a_better"] and v["clear"] and "A is better" in v["text"]
    s = an.paired_comparison(_evaluation([1.0, 2.0], [0.5, 0.6]), _evaluation([1.0, 2.0], [0.6, 0.5]), "ssim",
                             lower_is_better=False)
    assert s["a_better"] == 1 and s["mean_diff"] == pytest.approx(0.0)
    assert not an.comparison_verdict(s, "A", "B")["clear"]
    with pytest.raises(ValueError, match="same test split"):
        an.paired_comparison(a, _evaluation([1.0]), "nrmse")


# ----------------------------------------------------------------------------------------
# datasets outside the training distribution
# ----------------------------------------------------------------------------------------
def test_generalisation_table_and_verdict():
    osem = {"in": _evaluation([20.0, 20.0], method="osem"), "low": _evaluation([40.0, 40.0], method="osem")}
    evs = {"in": {"A": [_evaluation([10.0, 10.0]), _evaluation([10.0, 12.0])], "B": [_evaluation([9.0, 9.0])] * 2},
           "low": {"A": [_evaluation([20.0, 20.0]), _evaluation([22.0, 22.0])], "B": [_evaluation([30.0, 30.0])] * 2}}
    rows = an.generalisation_table(evs, "nrmse", reference=osem)
    r = {(x["test_set"], x["label"]): x for x in rows}
    assert r[("in", "A")]["mean"] == pytest.approx(10.5) and r[("in", "A")]["std"] == pytest.approx(np.std([10, 11], ddof=1))
    assert r[("in", "A")]["ref"] == 20.0 and r[("low", "B")]["rel_mean"] == pytest.approx(0.75)
    assert r[("low", "B")]["std"] == 0.0
    v = an.generalisation_verdict(rows, "A", "B", "in")
    assert v["n_sets"] == 1 and v["better"] == 1 and v["less_degraded"] == 1 and v["better_beyond_spread"] == 1
    st = v["sets"]["low"]
    assert st["difference"] == pytest.approx(-9.0) and st["degradation_candidate"] == pytest.approx(10.5)
    assert st["degradation_baseline"] == pytest.approx(21.0) and st["beyond_seed_spread"]
    assert "A better" in v["text"]
    w = an.generalisation_verdict(rows, "B", "A", "in")
    assert w["better"] == 0 and w["less_degraded"] == 0
    with pytest.raises(ValueError, match="no 'nope' row"):
        an.generalisation_verdict(rows, "A", "B", "nope")
    hi = an.generalisation_verdict(an.generalisation_table(evs, "nrmse"), "B", "A", "in", lower_is_better=False)
    assert hi["better"] == 1


def test_variant_sections():
    s = an.variant_sections("smoke", "lowcounts", {"counts_range": [1e4, 2e4], "phantom.lesion_radius_mm": [6, 9]},
                            seed=7, num_subjects=3)
    d = s["data"]
    assert d["name"] == "smoke-lowcounts" and d["seed"] == 7 and d["counts_range"] == [1e4, 2e4]
    assert d["phantom"]["lesion_radius_mm"] == [6, 9] and d["phantom"]["template_resolution"] == 2  # merged
    assert d["num_subjects"] == 3 and d["split"] == {"train": 0, "validation": 1, "test": 2}
    from fbsembook.experiments import load_profile

    base = load_profile("smoke")["data"]
    for k in ("scanner", "image_shape", "voxel_size_mm", "num_iterations", "num_subsets"):
        assert d[k] == base[k]
    with pytest.raises(ValueError, match="geometry"):
        an.variant_sections("smoke", "x", {"image_shape": [1, 16, 16]})
    with pytest.raises(ValueError, match="num_subjects"):
        an.variant_sections("smoke", "x", num_subjects=1)


def test_ood_sections():
    o = an.ood_sections("smoke", [1e4, 2e4], [1e8, 2e8], {"lesion_radius_mm": [6.0, 9.0]}, num_subjects=3,
                        realisations=1)
    assert list(o) == ["low counts", "high counts", "new lesions"]
    assert [s["data"]["name"] for s in o.values()] == ["smoke-lowcounts", "smoke-highcounts", "smoke-newlesions"]
    assert o["low counts"]["data"]["counts_range"] == [1e4, 2e4] and o["high counts"]["data"]["counts_range"] == [1e8, 2e8]
    assert o["new lesions"]["data"]["phantom"]["lesion_radius_mm"] == [6.0, 9.0]
    from fbsembook.experiments import load_profile

    base = load_profile("smoke")["data"]
    assert o["new lesions"]["data"]["counts_range"] == base["counts_range"]  # the training counts
    assert all(s["data"]["noise_realisations"]["test"] == 1 and s["data"]["num_subjects"] == 3 for s in o.values())
    keep = an.ood_sections("smoke", [1e4, 2e4], [1e8, 2e8], {}, num_subjects=2)
    assert keep["low counts"]["data"]["noise_realisations"] == load_profile("smoke")["data"]["noise_realisations"]


def test_variant_dataset_evaluates_a_trained_model(smoke_dataset, smoke_model, tmp_path, monkeypatch):
    """A trained model runs on the test split of a dataset of the same geometry but other
    counts and subjects (what the generalisation experiment of the book does)."""
    from fbsembook import experiments as ex
    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBSEM_DATA_DIR", str(tmp_path / "data"))
    s = an.variant_sections("smoke", "low", {"counts_range": [3e4, 6e4], "slices_per_subject": 1}, num_subjects=2)
    d = ex.dataset(s)
    test = PETDataset(d, "test")
    assert max(test.info(i)["total_counts"] for i in range(len(test))) < 1.5e5
    ev = ex.evaluate(smoke_model, d, methods=("fbsem",))
    assert len(an.per_sample(ev, "nrmse")) == len(test)
    assert np.isfinite(an.run_means(ev)["nrmse"])


def test_evaluate_fixed_strengths(smoke_dataset, tmp_path, monkeypatch):
    from fbsembook import experiments as ex

    monkeypatch.setenv("FBSEM_CACHE", str(tmp_path / "cache"))
    ev = ex.evaluate_fixed_strengths(smoke_dataset, {"mapem_bowsher": 1e-3, "osem_postfilter": 4.0},
                                     methods=("osem", "mapem_bowsher"))
    assert set(ev["summary"]) == {"osem", "mapem_bowsher"}
    assert ev["sweep"]["best"] == {"osem": None, "mapem_bowsher": 1e-3}
    assert {r["strength"] for r in ev["rows"] if r["method"] == "mapem_bowsher"} == {1e-3}
    files = list((tmp_path / "cache" / "evaluations").glob("evaluation-fixed-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = ex.evaluate_fixed_strengths(smoke_dataset, {"mapem_bowsher": 1e-3}, methods=("osem", "mapem_bowsher"))
    assert files[0].stat().st_mtime_ns == mtime and again["summary"] == ev["summary"]  # cached
    with pytest.raises(ValueError, match="no strength"):
        ex.evaluate_fixed_strengths(smoke_dataset, {}, methods=("mapem_bowsher",))
    with pytest.raises(ValueError, match="baselines only"):
        ex.evaluate_fixed_strengths(smoke_dataset, {}, methods=("fbsem",))
