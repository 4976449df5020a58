import json

import numpy as np
import pytest
import torch

from fbsemlib.evaluation.baselines import METHODS, BaselineConfig, beta_scale, reconstruct, sweep
from fbsemlib.cli import main
from fbsemlib.data import PETDataset
from fbsemlib.evaluation.evaluator import evaluate, lesion_metrics, white_matter_mask
from fbsemlib.physics.forward_model import PETForwardModel
from fbsemlib.recon.algorithms import osem


def test_baseline_sweep_and_best(smoke_dataset):
    val = PETDataset(smoke_dataset, "validation")
    P = val.make_projector()
    cfg = BaselineConfig(fwhm_mm=[4.0, 12.0], beta_quadratic=[1e-3, 1.0], beta_bowsher=[1e-3, 1.0])
    res = sweep(val, P, cfg)
    assert set(res.curves) == set(METHODS)
    for m in ("osem_postfilter", "mapem_quadratic", "mapem_bowsher"):
        strengths = [s for s, _ in res.curves[m]]
        assert res.best[m] in strengths
        # a very strong prior / filter blurs the brain: worse NRMSE than a mild one
        errs = dict(res.curves[m])
        assert errs[strengths[1]] > errs[strengths[0]]
    d = res.to_dict()
    json.dumps(d)


def test_baselines_reconstruct_consistently(smoke_dataset):
    ds = PETDataset(smoke_dataset, "test")
    P = ds.make_projector()
    batch = {k: (v[None] if torch.is_tensor(v) else v) for k, v in ds[0].items()}
    x = reconstruct("osem", None, batch, P, ds.num_iterations, ds.num_subsets)
    model = PETForwardModel(P, batch["multiplicative"], batch["additive"])
    assert torch.allclose(x, osem(model, batch["y"], ds.num_iterations, ds.num_subsets))
    for m in ("osem_postfilter", "mapem_quadratic", "mapem_bowsher"):
        xm = reconstruct(m, 1e-3 if m != "osem_postfilter" else 4.0, batch, P, ds.num_iterations, ds.num_subsets)
        assert xm.shape == x.shape and float(xm.min()) >= 0
    with pytest.raises(ValueError, match="unknown baseline"):
        reconstruct("fbp", None, batch, P, 1, 1)
    # relative strengths: beta = rel * mean(s_m) / xbar keeps gamma / s_m * x (the balance in
    # the fusion) unchanged when the activity (data and background) or the sensitivity scale
    s1 = beta_scale(model, batch["y"], ds.num_subsets)
    assert torch.allclose(beta_scale(PETForwardModel(P, batch["multiplicative"], batch["additive"] * 10),
                                     batch["y"] * 10, ds.num_subsets), s1 / 10, rtol=1e-4)
    m2 = PETForwardModel(P, batch["multiplicative"] * 10, batch["additive"] * 10)
    assert torch.allclose(beta_scale(m2, batch["y"] * 10, ds.num_subsets), 10 * s1, rtol=1e-4)


def test_lesion_metrics_and_wm_mask():
    act = torch.full((1, 32, 32), 32.0)
    brain = torch.zeros(1, 32, 32, dtype=torch.bool)
    brain[0, 4:28, 4:28] = True
    act[0, 4:10, 4:28] = 96.0  # "grey matter"
    labels = torch.zeros(1, 32, 32, dtype=torch.uint8)
    labels[0, 14:18, 14:18] = 1
    labels[0, 20:23, 20:23] = 2
    act[labels == 1] = 64.0
    act[labels == 2] = 16.0
    info = [{"in_pet": True}, {"in_pet": True}]
    res = lesion_metrics(act, act, brain, labels, info)
    assert res["crc_hot"] == pytest.approx(1.0) and res["crc_cold"] == pytest.approx(1.0)
    flat = act.clone()
    flat[labels > 0] = 32.0
    res0 = lesion_metrics(flat, act, brain, labels, info)
    assert abs(res0["crc_hot"]) < 1e-6 and abs(res0["crc_cold"]) < 1e-6
    wm = white_matter_mask(act[None], brain[None], labels[None])
    assert bool((act[None][wm] == 32.0).all()) and int(wm.sum()) > 100


def test_evaluate_cli_and_reconstruct(smoke_model, smoke_dataset, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(smoke_model), "--data", str(smoke_dataset), "--out", str(out)]) == 0
    res = json.loads((out / "evaluation.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert methods == {"fbsem", *METHODS}
    n_test = len(PETDataset(smoke_dataset, "test"))
    assert len(res["rows"]) == n_test * len(methods)
    for r in res["rows"]:
        assert np.isfinite(r["nrmse"]) and 0 <= r["nrmse"] < 200 and -1 <= r["ssim"] <= 1
    assert res["bias_std"]["osem"]["images"] >= 1  # smoke test split has 2 realisations
    csv = (out / "evaluation.csv").read_text().splitlines()
    assert csv[0].startswith("method,") and len(csv) == 1 + len(res["rows"])

    # reconstruct a user's data from an HDF5 file
    import h5py

    ds = PETDataset(smoke_dataset, "test")
    item = ds[0]
    f = tmp_path / "scan.h5"
    with h5py.File(f, "w") as h:
        for k in ("y", "multiplicative", "additive", "mr"):
            h[k] = item[k].numpy()
    assert main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(f), "--out", str(tmp_path / "x.npy")]) == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (1,) + tuple(ds.grid.shape) and np.all(np.isfinite(x))
    # errors: missing file, wrong shape, missing MR
    assert main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "nope.h5")]) == 2
    np.save(tmp_path / "bad.npy", np.ones((3, 4, 5), np.float32))
    assert main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "bad.npy")]) == 2
    np.save(tmp_path / "y.npy", item["y"].numpy())
    assert main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "y.npy")]) == 2


def test_evaluate_refuses_mismatched_model(smoke_dataset, tmp_path):
    assert main(["evaluate", "--model", str(tmp_path / "none"), "--data", str(smoke_dataset)]) == 2


def test_evaluate_in_batches_matches_one_sample_at_a_time(smoke_model, smoke_dataset):
    from fbsemlib.evaluation.baselines import SweepResult

    given = SweepResult("given", {}, {"osem_postfilter": 4.0, "mapem_quadratic": 0.05, "mapem_bowsher": 0.05})
    methods = ("fbsem",) + METHODS
    n_test = len(PETDataset(smoke_dataset, "test"))
    assert n_test > 3  # so that batches of 3 leave a short last batch or several batches
    one = evaluate(smoke_model, smoke_dataset, methods=methods, sweep_result=given, batch_size=1)
    many = evaluate(smoke_model, smoke_dataset, methods=methods, sweep_result=given, batch_size=3)
    assert len(one["rows"]) == len(many["rows"]) == n_test * len(methods)
    for a, b in zip(one["rows"], many["rows"]):
        assert (a["method"], a["sample"], a["subject"], a["image"]) == (b["method"], b["sample"], b["subject"],
                                                                        b["image"])
        for k, v in a.items():
            if isinstance(v, float):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["method"], a["sample"], k)
            else:
                assert b[k] == v, (a["method"], a["sample"], k)
    for m in methods:
        for k in ("bias_percent", "std_percent"):
            if one["bias_std"][m][k] is None:
                assert many["bias_std"][m][k] is None
            else:
                assert many["bias_std"][m][k] == pytest.approx(one["bias_std"][m][k], rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(smoke_model, smoke_dataset, methods=("osem",), batch_size=0)
