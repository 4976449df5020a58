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
