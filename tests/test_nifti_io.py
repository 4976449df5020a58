"""NIfTI input and output (fbsemlib.evaluation.nifti, `fbsem reconstruct`): the grid's affine,
round trips, flipped axes, mismatched grids, and reconstruct with NIfTI MR and mu-map."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import torch
import pytest

import fbsemlib as fb
from fbsemlib.cli import main
from fbsemlib.errors import UserError
from fbsemlib.evaluation import nifti
from fbsemlib.physics.geometry import ImageGrid

nib = pytest.importorskip("nibabel")

GRID = ImageGrid((3, 4, 5), voxel_size_mm=(2.5, 2.0, 1.5), origin_mm=(-2.5, -3.0, 10.0))


def test_affine_maps_voxels_to_scanner_mm():
    a = nifti.grid_affine(GRID)
    # NIfTI (i, j, k) = our (x, y, z): voxel [z=2, y=1, x=4] is at x = 10 + 4 * 1.5, y = -3 + 2, z = -2.5 + 5
    assert np.allclose(a @ [4, 1, 2, 1], [16.0, -1.0, 2.5, 1])
    assert nifti.grid_from_affine(a, (5, 4, 3)) == GRID
    # the default (centred) grid: the centre of the volume is the scanner centre
    g = ImageGrid((1, 32, 32), (2.0, 7.0, 7.0))
    assert np.allclose(nifti.grid_affine(g) @ [15.5, 15.5, 0, 1], [0, 0, 0, 1])


@pytest.mark.parametrize("name", ["img.nii", "img.nii.gz"])
def test_round_trip(tmp_path, name):
    x = np.random.default_rng(0).random(GRID.shape, dtype=np.float32)
    path = nifti.write_nifti(tmp_path / name, x, GRID)
    back, grid = nifti.read_nifti(path)
    assert grid == GRID and np.array_equal(back, x)
    img = nib.load(str(path))
    assert img.shape == (5, 4, 3) and img.header.get_xyzt_units()[0] == "mm"
    assert int(img.header["sform_code"]) == 1 and np.allclose(img.affine, nifti.grid_affine(GRID))
    batch = np.stack([x, 2 * x])
    back, grid = nifti.read_nifti(nifti.write_nifti(tmp_path / ("b" + name), batch, GRID))
    assert back.shape == (2,) + GRID.shape and np.array_equal(back, batch) and grid == GRID
    sino = np.arange(2 * 3 * 7, dtype=np.float32).reshape(2, 3, 7)
    assert np.array_equal(nifti.read_sinogram_nifti(nifti.write_sinogram_nifti(tmp_path / ("s" + name), sino)), sino)


def test_flipped_axis_is_flipped_back(tmp_path):
    """A radiological file (x stored right to left, negative step) reads as the same image."""
    x = np.random.default_rng(1).random(GRID.shape, dtype=np.float32)
    a = nifti.grid_affine(GRID)
    flipped = a.copy()
    flipped[0, 0] = -a[0, 0]
    flipped[0, 3] = a[0, 3] + a[0, 0] * (GRID.shape[2] - 1)
    nib.save(nib.Nifti1Image(x.transpose(2, 1, 0)[::-1].copy(), flipped), str(tmp_path / "lr.nii"))
    back, grid = nifti.read_nifti(tmp_path / "lr.nii")
    assert np.allclose(grid.origin_mm, GRID.origin_mm) and grid.voxel_size_mm == GRID.voxel_size_mm
    assert np.array_equal(back, x)


def test_mismatched_grids_name_both(tmp_path):
    x = np.zeros(GRID.shape, np.float32)
    nifti.write_nifti(tmp_path / "ok.nii", x, GRID)
    assert nifti.read_image_on_grid(tmp_path / "ok.nii", GRID, "MR image").shape == GRID.shape
    other = ImageGrid((3, 4, 6), (2.5, 2.0, 1.2), GRID.origin_mm)
    nifti.write_nifti(tmp_path / "bad.nii", np.zeros(other.shape, np.float32), other)
    with pytest.raises(UserError) as e:
        nifti.read_image_on_grid(tmp_path / "bad.nii", GRID, "MR image")
    msg = str(e.value)
    assert "MR image" in msg and "(3, 4, 6)" in msg and "(3, 4, 5)" in msg
    assert "(2.5, 2, 1.2) mm" in msg and "(2.5, 2, 1.5) mm" in msg
    shifted = ImageGrid(GRID.shape, GRID.voxel_size_mm, (0.0, -3.0, 10.0))
    nifti.write_nifti(tmp_path / "shifted.nii", x, shifted)
    with pytest.raises(UserError, match=r"origin \(z, y, x\) \(0, -3, 10\) mm vs the model's \(-2.5, -3, 10\) mm"):
        nifti.read_image_on_grid(tmp_path / "shifted.nii", GRID, "mu-map")
    oblique = nifti.grid_affine(GRID)
    oblique[0, 1] = 0.3
    nib.save(nib.Nifti1Image(x.transpose(2, 1, 0), oblique), str(tmp_path / "oblique.nii"))
    with pytest.raises(UserError, match="rotated or oblique"):
        nifti.read_nifti(tmp_path / "oblique.nii")
    (tmp_path / "junk.nii").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read MR image file"):
        nifti.read_image_on_grid(tmp_path / "junk.nii", GRID, "MR image")


def test_import_fbsemlib_does_not_import_nibabel():
    code = "import sys, fbsemlib, fbsemlib.evaluation.user_data; print('nibabel' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_reconstruct_writes_nifti_and_reads_nifti_mr_and_mu_map(smoke_model, smoke_dataset, tmp_path, capsys):
    ds = fb.PETDataset(smoke_dataset, "test")
    item, extra = ds[0], ds.extra(0, ("mu_map", "attenuation"))
    grid = ds.make_projector("cpu").grid
    with h5py.File(tmp_path / "scan.h5", "w") as h:
        for k in ("y", "multiplicative", "additive", "mr"):
            h[k] = item[k].numpy()
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "scan.h5")])
    out = capsys.readouterr().out
    npy, nii = tmp_path / "scan_fbsem.npy", tmp_path / "scan_fbsem.nii.gz"
    assert rc == 0 and f"wrote {npy} and {nii}" in out
    image, g = nifti.read_nifti(nii)
    assert g == grid and np.allclose(image, np.load(npy)[0])

    # a scanner with detector gaps: zero multiplicative (and no counts) in some bins is data too
    with h5py.File(tmp_path / "gaps.h5", "w") as h:
        gap = torch.zeros_like(item["y"], dtype=torch.bool)
        gap[..., ::7] = True
        h["y"] = item["y"].masked_fill(gap, 0).numpy()
        h["multiplicative"] = item["multiplicative"].masked_fill(gap, 0).numpy()
        h["additive"] = item["additive"].masked_fill(gap, 0).numpy()
        h["mr"] = item["mr"].numpy()
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "gaps.h5")])
    assert rc == 0 and np.isfinite(np.load(tmp_path / "gaps_fbsem.npy")).all(), capsys.readouterr().err

    # the same data with the MR and the mu-map as NIfTI files, the attenuation left out of the factors
    with h5py.File(tmp_path / "noatt.h5", "w") as h:
        h["y"] = item["y"].numpy()
        h["additive"] = item["additive"].numpy()
        h["multiplicative"] = (item["multiplicative"] / extra["attenuation"].clamp_min(1e-12)).numpy()
    nifti.write_nifti(tmp_path / "mr.nii.gz", item["mr"], grid)
    nifti.write_nifti(tmp_path / "mu.nii.gz", extra["mu_map"] * 10, grid)  # in 1/cm
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "noatt.h5"),
               "--mr", str(tmp_path / "mr.nii.gz"), "--mu-map", str(tmp_path / "mu.nii.gz"), "--mu-unit", "per_cm",
               "--out", str(tmp_path / "b.nii.gz")])
    assert rc == 0, capsys.readouterr().err
    with_mu = np.load(tmp_path / "b.npy")
    assert np.isfinite(with_mu).all() and with_mu.shape == np.load(npy).shape
    rel = np.linalg.norm(with_mu - np.load(npy)) / np.linalg.norm(np.load(npy))
    assert rel < 0.2  # the attenuation from the coarse mu-map approximates the simulated one

    # a mu-map in 1/cm declared as 1/mm, and an MR image on another grid: clear errors, nothing written
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "noatt.h5"),
               "--mr", str(tmp_path / "mr.nii.gz"), "--mu-map", str(tmp_path / "mu.nii.gz"),
               "--out", str(tmp_path / "c.npy")])
    assert rc == 2 and "--mu-unit per_cm" in capsys.readouterr().err
    small = ImageGrid((1, 16, 16), (2.0, 14.0, 14.0))
    nifti.write_nifti(tmp_path / "mr_small.nii", np.zeros(small.shape, np.float32), small)
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(tmp_path / "noatt.h5"),
               "--mr", str(tmp_path / "mr_small.nii"), "--unit-factors", "--out", str(tmp_path / "d.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "(1, 16, 16)" in err and f"{tuple(grid.shape)}" in err and "(2, 14, 14) mm" in err
    assert not any((tmp_path / n).exists() for n in ("c.npy", "c.nii.gz", "d.npy", "d.nii.gz"))
