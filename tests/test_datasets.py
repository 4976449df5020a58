"""Dataset folders: the PETDataset contract, stored masks, validation of corrupted,
truncated, missing or incompatible files."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fbsemlib.config import from_dict
from fbsemlib.data import SAMPLE_KEYS, DataConfig, DatasetError, PETDataset, open_dataset, simulate_dataset, validate_dataset
from fbsemlib.data.format import sha256_file
from fbsemlib.physics.geometry import ImageGrid, sinogram_preset
from fbsemlib.physics.projector import Projector

RECIPE = dict(
    name="tinyds", scanner="tiny2d", image_shape=[1, 24, 24], voxel_size_mm=[2.0, 9.0, 9.0],
    phantom={"template_resolution": 2, "num_lesions_2d": [3, 5], "lesion_radius_mm": [6.0, 10.0]},
    num_subjects=3, split={"train": 2, "validation": 0, "test": 1}, slices_per_subject=2,
    rotations_per_slice=2, counts_range=[2e5, 2e6], noise_realisations={"test": 2},
    num_iterations=2, num_subsets=3, compression="gzip", seed=3,
)


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "tinyds"
    simulate_dataset(from_dict(DataConfig, RECIPE, "data"), out, progress=False)
    return out


@pytest.fixture
def copy_dir(ds_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ds_dir, dst)
    return dst


# ----------------------------------------------------------------------------------------
# the contract
# ----------------------------------------------------------------------------------------
def test_sample_keys_shapes_dtypes(ds_dir):
    ds = PETDataset(ds_dir, "train")
    P, V, R = ds.geometry.shape
    Z, Y, X = ds.grid.shape
    K = ds.num_iterations * ds.num_subsets
    assert (ds.num_iterations, ds.num_subsets, ds.num_modules) == (2, 3, 6)
    assert len(ds) == 2 * 2 * 2  # subjects x slices x rotations x 1 realisation
    s = ds[0]
    assert set(s) == set(SAMPLE_KEYS)
    shapes = {"y": (1, P, V, R), "multiplicative": (1, P, V, R), "additive": (1, P, V, R), "mr": (1, Z, Y, X),
              "targets": (K, 1, Z, Y, X), "target_final": (1, Z, Y, X), "activity": (1, Z, Y, X),
              "brain_mask": (1, Z, Y, X)}
    for k, shp in shapes.items():
        assert tuple(s[k].shape) == shp, k
        assert s[k].dtype == (torch.bool if k == "brain_mask" else torch.float32), k
    assert s["index"] == 0 and isinstance(s["index"], int)
    assert ds[-1]["index"] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]
    # default collate: leading batch dimension
    b = next(iter(DataLoader(ds, batch_size=3, shuffle=False)))
    assert set(b) == set(SAMPLE_KEYS)
    assert tuple(b["targets"].shape) == (3, K, 1, Z, Y, X)
    assert tuple(b["y"].shape) == (3, 1, P, V, R)
    assert b["index"].tolist() == [0, 1, 2]
    # the expected data of the activity through make_projector is consistent with y's scale
    proj = ds.make_projector()
    assert isinstance(proj, Projector) and proj.out_shape == (P, V, R) and proj.in_shape == (Z, Y, X)
    ybar = s["multiplicative"] * proj(s["activity"]) + s["additive"]
    assert abs(float(ybar.sum()) - ds.info(0)["counts"]) < 1e-3 * ds.info(0)["counts"]
    assert abs(float(s["y"].sum()) - float(ybar.sum())) < 6 * float(ybar.sum()) ** 0.5
    # metadata
    assert isinstance(ds.recipe, DataConfig) and ds.recipe.name == "tinyds"
    assert ds.geometry == sinogram_preset("tiny2d")
    assert ds.grid == ImageGrid((1, 24, 24), (2.0, 9.0, 9.0))
    assert "tinyds" in ds.manifest["recipe"]["name"]


def test_sample_contract_is_petbatch(ds_dir):
    """One sample contract: the dataset serves the fields of PETBatch, in their order, and
    every sample or collated batch reads back as a PETBatch."""
    from fbsemlib.data import PETBatch, batch, dataset

    assert dataset.SAMPLE_KEYS is batch.SAMPLE_KEYS
    assert SAMPLE_KEYS == tuple(f.name for f in dataclasses.fields(PETBatch))
    ds = PETDataset(ds_dir, "train")
    assert tuple(ds[1]) == SAMPLE_KEYS
    s = PETBatch.from_mapping(ds[1])
    assert s.index == 1 and s.num_modules == ds.num_modules and s.batch_size == 1
    b = PETBatch.from_mapping(next(iter(DataLoader(ds, batch_size=2))))
    assert b.batch_size == 2 and torch.equal(b.targets[1], ds[1]["targets"])


def test_batch_to_and_pin_memory_keep_the_class_and_absent_fields(ds_dir, monkeypatch):
    """``to`` converts floating fields only; ``pin_memory`` (a CUDA DataLoader's call) pins
    every tensor; both keep a subclass such as the trainers' ``LoadedBatch`` and its ``None``s."""
    from fbsemlib.data import PETBatch
    from fbsemlib.training.loading import LoadedBatch

    s = PETBatch.from_mapping(PETDataset(ds_dir, "train")[0])
    d = s.to("cpu", torch.float64)
    assert d.y.dtype == torch.float64 and d.brain_mask.dtype == torch.bool and d.index == s.index
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self.clone())
    lb = LoadedBatch(**{**s.as_dict(), "activity": None, "brain_mask": None})
    p = lb.pin_memory()
    assert type(p) is LoadedBatch and p.activity is None and p.brain_mask is None
    assert len(pinned) == 6 and torch.equal(p.y, s.y) and p.y is not s.y


def test_projectors_are_the_shared_ones(ds_dir):
    """The simulation, the dataset's info and every split use the one projector of
    fbsemlib.physics.cache for the same geometry (its system matrices are built once)."""
    from fbsemlib.data.simulate import SimulationContext
    from fbsemlib.physics.cache import shared_projector

    info = open_dataset(ds_dir, checksums=False)
    train, test = PETDataset(ds_dir, "train", checksums=False), PETDataset(ds_dir, "test", checksums=False)
    P = info.make_projector()
    assert P is train.make_projector() is test.make_projector() is info.make_projector("cpu", backend="torch")
    assert P is shared_projector(info.geometry, info.grid, device="cpu", backend="torch", psf_fwhm_mm=info.psf_fwhm_mm)
    assert SimulationContext(info.recipe).projector is P


def test_lazy_equals_in_memory_and_device(ds_dir):
    a = PETDataset(ds_dir, "test")
    b = PETDataset(ds_dir, "test", load_into_memory=False, checksums=False)
    c = PETDataset(ds_dir, "test", device="cpu")
    assert len(a) == len(b) == 2 * 2 * 2  # 1 subject x 4 images x 2 realisations
    for i in range(len(a)):
        sa, sb, sc = a[i], b[i], c[i]
        for k in SAMPLE_KEYS:
            if k == "index":
                assert sa[k] == sb[k] == i
            else:
                assert torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]), k
    # realisations of one image share everything but y
    i0, i1 = a.info(0), a.info(1)
    assert (i0["image"], i0["realisation"]) == (0, 0) and (i1["image"], i1["realisation"]) == (0, 1)
    assert torch.equal(a[0]["targets"], a[1]["targets"]) and not torch.equal(a[0]["y"], a[1]["y"])
    b.close()


def test_lesion_masks_inside_brain_mask(ds_dir):
    n_pet = n_mr = 0
    for fp in sorted(ds_dir.glob("subject-*.h5")):
        with h5py.File(fp, "r") as f:
            brain = f["images/brain_mask"][()].astype(bool)
            pet = f["images/lesion_mask_pet"][()]
            mr = f["images/lesion_mask_mr"][()]
            info = json.loads(f["images"].attrs["lesion_info"])
        assert not np.any((pet > 0) & ~brain)
        assert not np.any((mr > 0) & ~brain)
        n_pet += int((pet > 0).sum())
        n_mr += int((mr > 0).sum())
        for im, lesions in enumerate(info):
            for les in lesions:  # labels link masks and lesion_info
                assert les["num_voxels_pet"] == int((pet[im] == les["label"]).sum())
                assert les["num_voxels_mr"] == int((mr[im] == les["label"]).sum())
                if not les["in_pet"]:
                    assert les["num_voxels_pet"] == 0
    assert n_pet > 0 and n_mr > 0  # not vacuous
    ds = PETDataset(ds_dir, "test")
    ex = ds.extra(0)
    assert set(ex) >= {"mu_map", "lesion_mask_pet", "lesion_mask_mr", "ybar", "attenuation", "normalisation"}
    assert isinstance(ds.lesion_info(0), list)


def test_empty_split_and_bad_split(ds_dir):
    with pytest.raises(DatasetError, match="empty"):
        PETDataset(ds_dir, "validation")
    with pytest.raises(ValueError, match="split"):
        PETDataset(ds_dir, "training")


# ----------------------------------------------------------------------------------------
# validation failures
# ----------------------------------------------------------------------------------------
def test_valid_dataset_validates(ds_dir):
    info = validate_dataset(ds_dir)
    assert info.num_modules == 6
    assert set(info.manifest["files"]) == {p.name for p in ds_dir.glob("subject-*.h5")}
    for name, e in info.manifest["files"].items():
        assert e["sha256"] == sha256_file(ds_dir / name)


def test_flipped_bytes_detected(copy_dir):
    fp = copy_dir / "subject-0001.h5"
    data = bytearray(fp.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 16):
        data[i] ^= 0xFF
    fp.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="subject-0001.h5.*checksum"):
        open_dataset(copy_dir)
    with pytest.raises(DatasetError):
        PETDataset(copy_dir, "train")


def test_truncated_file_detected(copy_dir):
    fp = copy_dir / "subject-0000.h5"
    data = fp.read_bytes()
    fp.write_bytes(data[: len(data) // 3])
    for checksums in (True, False):
        with pytest.raises(DatasetError, match="subject-0000.h5.*truncated"):
            validate_dataset(copy_dir, checksums=checksums)


def test_missing_file_and_manifest_detected(copy_dir):
    (copy_dir / "subject-0002.h5").unlink()
    with pytest.raises(DatasetError, match="subject-0002.h5.*missing"):
        open_dataset(copy_dir)
    (copy_dir / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        open_dataset(copy_dir)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(copy_dir / "nothing-here")


def test_corrupted_manifest_detected(copy_dir):
    mp = copy_dir / "manifest.json"
    mp.write_text(mp.read_text()[:100])
    with pytest.raises(DatasetError, match="corrupted"):
        open_dataset(copy_dir)


def test_version_mismatch_detected(copy_dir):
    mp = copy_dir / "manifest.json"
    m = json.loads(mp.read_text())
    m["format_version"] = 999
    mp.write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="version 999"):
        open_dataset(copy_dir)


def test_structure_checked_even_with_valid_checksum(copy_dir):
    """A file whose checksum matches the manifest but lacks an array is still rejected."""
    fp = copy_dir / "subject-0000.h5"
    with h5py.File(fp, "a") as f:
        del f["images/targets"]
    mp = copy_dir / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"][fp.name].update(sha256=sha256_file(fp), size=fp.stat().st_size)
    mp.write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="images/targets.*missing"):
        open_dataset(copy_dir)


def test_incompatible_geometry_reported(ds_dir):
    other = sinogram_preset("small2d")
    with pytest.raises(DatasetError) as e:
        open_dataset(ds_dir, geometry=other, num_subsets=6, checksums=False)
    msg = str(e.value)
    assert "num_sides" in msg and "num_subsets" in msg
    with pytest.raises(DatasetError, match="grid voxel_size_mm"):
        open_dataset(ds_dir, grid=ImageGrid((1, 24, 24), (2.0, 8.0, 8.0)), checksums=False)
    # the right expectations pass
    info = open_dataset(ds_dir, geometry=sinogram_preset("tiny2d"), grid=ImageGrid((1, 24, 24), (2.0, 9.0, 9.0)),
                        num_iterations=2, num_subsets=3, checksums=False)
    assert info.num_iterations == 2
