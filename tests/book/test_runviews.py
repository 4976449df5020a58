"""fbsembook.runviews: module outputs and traces of a trained FBSEM-Net, orthogonal slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbsemlib.evaluation import metrics
from fbsembook import runviews as RV
def test_orthogonal_slices_shapes_and_extents():
    v = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 4, 6, 8)
    s = RV.orthogonal_slices(v, (2.0, 3.0, 1.0))
    ax, ext_ax = s["axial"]
    co, ext_co = s["coronal"]
    sa, ext_sa = s["sagittal"]
    assert ax.shape == (6, 8) and co.shape == (4, 8) and sa.shape == (4, 6)
    assert ext_ax == (-4.0, 4.0, -9.0, 9.0)
    assert ext_co == (-4.0, 4.0, -4.0, 4.0)
    assert ext_sa == (-9.0, 9.0, -4.0, 4.0)
    vv = v[0].numpy()
    np.testing.assert_array_equal(ax, vv[2])
    np.testing.assert_array_equal(co, vv[:, 3, :])
    np.testing.assert_array_equal(sa, vv[:, :, 4])
    s2 = RV.orthogonal_slices(vv, (1, 1, 1), centre=(0, 1, 2))
    np.testing.assert_array_equal(s2["sagittal"][0], vv[:, :, 2])
    with pytest.raises(ValueError):
        RV.orthogonal_slices(vv, (1, 1, 1), centre=(4, 0, 0))
    with pytest.raises(ValueError):
        RV.orthogonal_slices(np.zeros((3, 3)), (1, 1, 1))


def test_module_trace_of_a_trained_model(smoke_dataset, smoke_model):
    from fbsemlib.data import PETDataset
    from fbsemlib.training import load_trained

    ds = PETDataset(smoke_dataset, "test")
    net, _ = load_trained(smoke_model)
    batch = RV.stack_samples(ds, [0, 1])
    assert batch.y.shape[0] == 2 and batch.targets.shape[:2] == (2, ds.num_modules) and batch.batch_size == 2
    outs = RV.module_outputs(net, batch)
    K = net.num_modules
    assert outs.shape == (K, 2, 1) + tuple(ds.grid.shape)
    # the last output is the network's reconstruction
    with torch.no_grad():
        net.eval()
        last = net(batch.y, batch.multiplicative, batch.additive, batch.mr)
    torch.testing.assert_close(outs[-1], last)
    tr = RV.module_trace(outs, batch)
    assert list(tr["k"]) == list(range(1, K + 1))
    for key in ("to_truth", "to_target", "target_to_truth"):
        assert tr[key].shape == (K, 2) and np.isfinite(tr[key]).all()
    ref = metrics.nrmse(outs[-1], batch.activity, batch.brain_mask.bool())
    np.testing.assert_allclose(tr["to_truth"][-1], np.asarray(ref).reshape(-1), rtol=1e-5)
    osem = RV.baseline_recon(ds, batch)
    assert osem.shape == batch.activity.shape
    with pytest.raises(ValueError):
        RV.stack_samples(ds, [])


def test_run_summary():
    from fbsembook.experiments import Run

    run = Run(path=None, mode="sequential", key={"train": {"epochs": 2, "epochs_per_module": 3, "stage_init": "best"}},
              metrics={"num_modules": 4, "steps": 12, "train_time_s": 10.0,
                       "stages": [{"cache_time_s": 1.0, "init": "fresh"}, {"cache_time_s": 0.5, "init": "previous"}]})
    s = RV.run_summary(run)
    assert s["epochs"] == 3 and s["epochs_kind"] == "per module" and s["cache_time_s"] == 1.5
    assert s["stage_init"] == "best" and s["warm_started_stages"] == 1
    run.mode = "end-to-end"
    s = RV.run_summary(run)
    assert s["epochs"] == 2 and s["cache_time_s"] is None and s["warm_started_stages"] is None


def test_module_outputs_of_one_item_match_forward_and_keep_the_mode(smoke_dataset):
    from fbsembook.analysis import as_batch
    from fbsemlib.data import PETDataset
    from fbsemlib.models import FBSEMNet, ModelConfig

    ds = PETDataset(smoke_dataset, "test")
    torch.manual_seed(0)
    net = FBSEMNet(ds.make_projector("cpu"), ds.num_iterations, ds.num_subsets,
                   ModelConfig(shared=False, depth=3, width=4, gamma_init=0.5))
    assert net.training
    b = as_batch(ds[0])
    outs = RV.module_outputs(net, b)
    assert outs.shape == (ds.num_modules, 1, 1) + tuple(ds.grid.shape)
    assert net.training  # run in eval mode, the mode is restored
    with torch.no_grad():
        net.eval()
        last = net(b.y, b.multiplicative, b.additive, b.mr)
    torch.testing.assert_close(outs[-1], last)
    assert not net.training
    assert RV.module_outputs(net, b)[:, 0, 0].shape == (ds.num_modules,) + tuple(ds.grid.shape)  # one item
