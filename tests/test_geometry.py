import math

import numpy as np
import pytest
import torch

import fbsemlib as fb
from fbsemlib.physics.geometry import sinogram_geometry_from_dict


def test_mmr_preset_sizes():
    sc = fb.scanner_preset("mmr")
    assert sc.num_crystals_per_ring == 504 and sc.num_rings == 64
    sino = fb.sinogram_preset("mmr2d")
    assert sino.num_views == 252
    assert sino.num_radial == 345
    assert sino.shape == (1, 252, 345)
    # one gap position per block
    assert int(sc.crystal_is_gap().sum()) == 56


def test_crystals_on_polygon_and_clockwise():
    sc = fb.RingScanner(radius_mm=100.0, num_sides=8, crystals_per_side=4, crystal_spacing_mm=10.0)
    xy = sc.crystal_xy_mm()
    r = np.linalg.norm(xy, axis=1)
    assert r.min() >= 100.0 - 1e-9 and r.max() <= math.hypot(100.0, 15.0) + 1e-9
    # side 0 is centred on -y (parallelproj convention)
    assert np.allclose(xy[:4, 1], -100.0)
    # parallelproj's "clockwise" is seen with +y pointing down: crystal 0 -> 1 moves
    # towards +x, i.e. the polar angle increases in the usual x-right / y-up view
    assert xy[1, 0] > xy[0, 0]
    ang = np.unwrap(np.arctan2(xy[:, 1], xy[:, 0]))
    assert np.all(np.diff(ang) > 0)


def test_zigzag_crystal_pairs():
    sc = fb.RingScanner(radius_mm=100.0, num_sides=8, crystals_per_side=4, crystal_spacing_mm=10.0)
    g = fb.SinogramGeometry(sc, radial_trim=0)
    n = 32
    s, e = g.crystal_pairs()
    assert g.num_radial == n - 1 and g.num_views == n // 2
    assert list(zip(s[0, :5], e[0, :5])) == [(0, n - 1), (0, n - 2), (1, n - 2), (1, n - 3), (2, n - 3)]
    # view v shifts both crystals by -v
    assert np.all(s[3] == (s[0] - 3) % n) and np.all(e[3] == (e[0] - 3) % n)


def test_plane_order_span1():
    sc = fb.RingScanner(radius_mm=100.0, num_sides=8, crystals_per_side=4, crystal_spacing_mm=10.0, num_rings=3)
    g = fb.SinogramGeometry(sc, radial_trim=2)
    pairs = list(zip(g.start_ring, g.end_ring))
    assert pairs == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (1, 0), (2, 1), (0, 2), (2, 0)]
    g1 = fb.SinogramGeometry(sc, radial_trim=2, max_ring_difference=1)
    assert g1.num_planes == 7


def test_lor_endpoints_shape_and_z():
    g = fb.sinogram_preset("small3d")
    s, e = g.lor_endpoints()
    assert s.shape == g.shape + (3,) and e.shape == g.shape + (3,)
    z = g.scanner.ring_positions_mm
    assert torch.allclose(s[..., 2], torch.as_tensor(z[g.start_ring], dtype=s.dtype)[:, None, None].expand_as(s[..., 2]))


def test_subset_views_partition():
    g = fb.sinogram_preset("small2d")
    views = np.concatenate([g.subset(m, 4).view_indices for m in range(4)])
    assert sorted(views.tolist()) == list(range(g.num_views))
    with pytest.raises(ValueError, match="num_subsets"):
        g.subset(0, 0)
    with pytest.raises(ValueError, match="subset index"):
        g.subset(4, 4)


def test_one_subset_rule_for_views_and_sinograms():
    """Subset m of M is views m, m + M, ...: the same views for the geometry's indices, a
    sinogram-shaped tensor, the forward model's factors and FBSEM-Net's data index."""
    from fbsemlib.models.fbsem import FBSEMNet, ModelConfig
    from fbsemlib.physics.subsets import sinogram_subset, sinogram_subset_index, subset_slice, subset_views

    g = fb.sinogram_preset("tiny2d")
    V = g.num_views
    assert subset_slice(2, 5, V) == slice(2, None, 5)
    t = torch.arange(V, dtype=torch.float32)[None, None, None, :, None].expand(2, 1, 1, V, 3)  # value: the view
    for m, M in ((0, 1), (0, 3), (2, 3), (4, 5)):
        views = subset_views(np.arange(V), m, M)
        assert views.tolist() == list(range(m, V, M)) == g.subset(m, M).view_indices.tolist()
        sub = sinogram_subset(t, m, M)
        assert sub.data_ptr() == t[..., m, :].data_ptr()  # a view, not a copy
        assert sub[0, 0, 0, :, 0].tolist() == views.tolist()
        assert torch.equal(t[sinogram_subset_index(m, M, V)], sub)
    assert sinogram_subset(None, 1, 3) is None
    P = fb.Projector(g, fb.ImageGrid((1, 8, 8), (2.0, 12.0, 12.0)), backend="torch")
    model = fb.PETForwardModel(P, t[..., :1].expand(2, 1, 1, V, P.out_shape[2]).contiguous())
    net = FBSEMNet(P, 1, 3, ModelConfig(width=2, depth=2, use_mr=False))
    for m in range(3):
        expect = torch.tensor(list(range(m, V, 3)), dtype=torch.float32)
        assert torch.equal(model.subset(m, 3).multiplicative[0, 0, 0, :, 0], expect)
        assert torch.equal(net.subset_model(m, model.multiplicative).multiplicative[0, 0, 0, :, 0], expect)
        assert torch.equal(model.multiplicative[net.subset_slice(m)][0, 0, 0, :, 0], expect)
        assert net.subset_model(m).projector is model.subset(m, 3).projector is P.subset(m, 3)
    assert model.subset(0, 1).projector is P
    for bad in ((3, 3), (-1, 3), (0, 0), (0, V + 1), (0.0, 2)):
        with pytest.raises(ValueError, match="subset|num_subsets"):
            subset_slice(*bad, V)
        with pytest.raises(ValueError, match="subset|num_subsets"):
            model.subset(*bad)


def test_roundtrip_dict():
    g = fb.sinogram_preset("small3d")
    assert sinogram_geometry_from_dict(g.to_dict()) == g
    grid = fb.ImageGrid((4, 8, 8), (2.0, 3.0, 3.0))
    assert fb.ImageGrid.from_dict(grid.to_dict()) == grid


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(radius_mm=-1, num_sides=8, crystals_per_side=4, crystal_spacing_mm=1.0), "radius_mm"),
        (dict(radius_mm=100, num_sides=0, crystals_per_side=4, crystal_spacing_mm=1.0), "num_sides"),
        (dict(radius_mm=100, num_sides=8, crystals_per_side=4, crystal_spacing_mm=float("nan")), "crystal_spacing_mm"),
        (dict(radius_mm=100, num_sides=8, crystals_per_side=4, crystal_spacing_mm=1.0, gap_positions=(9,)), "gap"),
        (dict(radius_mm=100, num_sides=7, crystals_per_side=3, crystal_spacing_mm=1.0), "must be even"),
    ],
)
def test_bad_scanner(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fb.RingScanner(**kwargs)


def test_bad_grid_and_preset():
    with pytest.raises(ValueError, match="shape"):
        fb.ImageGrid((8, 8))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        fb.ImageGrid((1, 8, 8), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="unknown scanner preset"):
        fb.scanner_preset("nope")
    with pytest.raises(ValueError, match="radial_trim"):
        fb.SinogramGeometry(fb.scanner_preset("tiny2d"), radial_trim=1000)


def test_grid_centred():
    grid = fb.ImageGrid((1, 4, 6), (2.0, 1.0, 3.0))
    assert np.allclose(grid.axis_mm(2), [-7.5, -4.5, -1.5, 1.5, 4.5, 7.5])
    assert np.allclose(grid.axis_mm(0), [0.0])
