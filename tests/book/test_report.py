"""fbsembook.report: the book's plotting and table helpers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only (never in book notebooks)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fbsembook import report  # noqa: E402


def test_as_slice_shapes():
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    s = report.as_slice(vol)
    assert s.shape == (4, 5)
    np.testing.assert_array_equal(s, vol[0, 0, 1].numpy())  # first item, middle slice
    np.testing.assert_array_equal(report.as_slice(vol, z=2), vol[0, 0, 2].numpy())
    np.testing.assert_array_equal(report.as_slice(np.ones((4, 5))), np.ones((4, 5)))
    with pytest.raises(ValueError):
        report.as_slice(np.ones(3))


def test_show_images_grid_and_scales():
    imgs = [np.ones((1, 4, 4)), 2 * np.ones((1, 4, 4)), 3 * np.ones((4, 4))]
    fig, axes = report.show_images(imgs, ["a", "b", "c"], ncols=2)
    assert len(axes) == 4 and not axes[3].axison
    assert [ax.get_title() for ax in axes[:3]] == ["a", "b", "c"]
    assert axes[0].images[0].get_clim() == (0.0, 3.0)  # shared scale
    plt.close(fig)
    fig, axes = report.show_images(imgs, vmax=None, vmin=None, colorbar=False, cmap=["gray", "magma", "viridis"])
    assert axes[1].images[0].get_clim()[1] == pytest.approx(2.0)
    assert axes[0].images[0].get_cmap().name == "gray"
    plt.close(fig)
    with pytest.raises(ValueError):
        report.show_images(imgs, cmap=["gray"])
    with pytest.raises(ValueError):
        report.show_images(imgs, ["a"])
    with pytest.raises(ValueError):
        report.show_images([])


def test_lesion_row():
    lab = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    assert report.lesion_row(lab) == 4  # no lesion: the middle row
    lab[0, 0, 2, 1:3] = 1
    lab[0, 0, 5, 1:6] = 2
    assert report.lesion_row(lab) == 5
    assert report.lesion_row(torch.as_tensor(lab).bool()) == 5


def test_plot_profiles_and_sweep():
    fig, ax = plt.subplots()
    img = np.arange(16.0).reshape(1, 4, 4)
    report.plot_profiles(ax, {"a": img, "b": 2 * img}, row=1, x_mm=[0, 1, 2, 3])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [4, 5, 6, 7])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [8, 10, 12, 14])
    ax.clear()
    report.plot_sweep(ax, [(1e-3, 5.0), (1e-2, 3.0), (1e-1, 4.0)], 1e-2, label="m")
    assert ax.get_xscale() == "log"
    star = ax.lines[1]
    assert star.get_xdata()[0] == pytest.approx(1e-2) and star.get_ydata()[0] == pytest.approx(3.0)
    with pytest.raises(ValueError):
        report.plot_sweep(ax, [(None, 3.0)], None)
    plt.close(fig)


def test_batch_mean_of_a_per_sample_metric():
    from fbsemlib.evaluation import metrics

    ref = torch.ones(1, 4, 4)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    batch = torch.stack([ref, 2 * ref, 1.5 * ref])  # (3, 1, 4, 4): 0 %, 100 %, 50 %
    v = metrics.nrmse(batch, ref, mask)
    assert report.batch_mean(v) == pytest.approx(50.0) and isinstance(report.batch_mean(v), float)
    assert report.batch_mean(v) == float(np.mean(v.numpy()))  # NumPy's mean, bit for bit
    assert report.batch_mean(metrics.nrmse(ref, ref, mask)) == 0.0  # one image: a float
    assert report.batch_mean(np.array([1.0, 2.0])) == 1.5


def test_summary_and_recipe_tables():
    summary = {"osem": {"nrmse": {"mean": 20.123, "std": 1.5, "n": 3}, "ssim": {"mean": None, "std": None, "n": 0}},
               "mapem_bowsher": {"nrmse": {"mean": 15.0, "std": 0.25, "n": 3}}}
    t = report.summary_table(summary)
    assert list(t.index) == ["OSEM", "MAP-EM (Bowsher)"]
    assert t.loc["OSEM", "nrmse"] == "20.1 ± 1.5"
    assert t.loc["OSEM", "ssim"] == "n/a" and t.loc["MAP-EM (Bowsher)", "ssim"] == "n/a"
    r = report.recipe_table({"name": "x", "image_shape": [1, 32, 32], "phantom": {"template_resolution": 2},
                             "empty": {}, "psf": None, "flag": True, "counts": 3.0e5})
    d = dict(zip(r["parameter"], r["value"]))
    assert d == {"name": "x", "image_shape": "[1, 32, 32]", "phantom.template_resolution": "2", "empty": "{}",
                 "psf": "None", "flag": "True", "counts": "300000"}
