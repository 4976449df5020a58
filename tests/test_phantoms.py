"""Tests of fbsemlib.data.phantoms (offline brain subjects, BrainWeb loader, simple objects)."""

import json
import socket
import time

import numpy as np
import pytest
import torch

from fbsemlib.physics.geometry import ImageGrid
from fbsemlib.data.phantoms import (
    TISSUES,
    Phantom,
    PhantomConfig,
    load_brainweb,
    make_subject,
    make_subjects,
    shepp_logan,
    simple_phantom,
)

GRID2D = ImageGrid((1, 128, 128), (2.031, 2.086, 2.086))
GRID3D = ImageGrid((24, 64, 64), (3.0, 3.2, 3.2))


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any attempt to open a network connection fails the tests of this module."""

    def refuse(*args, **kwargs):
        raise AssertionError("fbsemlib.data.phantoms tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def subjects2d():
    return make_subjects(GRID2D, range(6))


@pytest.fixture(scope="module")
def subject3d():
    return make_subject(GRID3D, 7)


def _tensors(ph: Phantom):
    return [ph.activity, ph.mu_map, ph.mr, ph.brain_mask, ph.lesion_masks_pet, ph.lesion_masks_mr,
            *ph.tissues.values()]


# --------------------------------------------------------------------------------------
# reproducibility, shapes, speed
# --------------------------------------------------------------------------------------
def test_same_seed_is_bit_identical(subjects2d):
    again = make_subject(GRID2D, 3)
    ref = subjects2d[3]
    for a, b in zip(_tensors(ref), _tensors(again)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert ref.lesion_info == again.lesion_info
    assert ref.params == again.params and ref.seed == again.seed == 3


def test_different_seeds_differ(subjects2d):
    a, b = subjects2d[0], subjects2d[1]
    assert not torch.equal(a.activity, b.activity)
    assert not torch.equal(a.mu_map, b.mu_map)
    assert a.params["rotation_deg"] != b.params["rotation_deg"]
    # the anatomy really moves: brain masks differ by more than a few voxels
    assert int((a.brain_mask ^ b.brain_mask).sum()) > 100


def test_shapes_dtypes_2d_3d(subjects2d, subject3d):
    for ph, grid in [(subjects2d[0], GRID2D), (subject3d, GRID3D)]:
        assert ph.grid == grid
        for t in (ph.activity, ph.mu_map, ph.mr):
            assert t.shape == grid.shape and t.dtype == torch.float32 and t.device.type == "cpu"
            assert torch.isfinite(t).all()
        assert ph.brain_mask.shape == grid.shape and ph.brain_mask.dtype == torch.bool
        L = len(ph.lesion_info)
        assert ph.lesion_masks_pet.shape == (L,) + grid.shape == ph.lesion_masks_mr.shape
        assert ph.lesion_masks_pet.dtype == torch.bool
        assert set(ph.tissues) == set(TISSUES)
        assert float(ph.activity.min()) >= 0.0 and float(ph.mr.min()) >= 0.0
        assert ph.brain_mask.sum() > 0.2 * grid.shape[1] * grid.shape[2]
    assert subjects2d[0].params["is_2d"] and not subject3d.params["is_2d"]
    assert subjects2d[0].params["slice_z_mm"] is not None
    assert "lesions=" in repr(subject3d)
    moved = subject3d.to("cpu")
    assert torch.equal(moved.activity, subject3d.activity)


def test_2d_subject_is_fast(subjects2d):
    t0 = time.perf_counter()
    make_subject(GRID2D, 123)
    assert time.perf_counter() - t0 < 1.0


def test_make_subjects_matches_make_subject(subjects2d):
    two = make_subjects(GRID2D, 2)
    assert [p.seed for p in two] == [0, 1]
    assert torch.equal(two[1].activity, subjects2d[1].activity)


# --------------------------------------------------------------------------------------
# tissue values
# --------------------------------------------------------------------------------------
def test_grey_white_ratio_is_three():
    cfg = PhantomConfig(pet_contrast_jitter=0.0)
    ph = make_subject(GRID2D, 11, cfg)
    pv = ph.params["pet_values"]
    assert pv["gm"] == 96.0 and pv["wm"] == 32.0 and pv["gm"] / pv["wm"] == 3.0
    scale = ph.params["activity_scale"]
    les = ph.lesion_union("pet")
    # the activity is the fraction-weighted tissue model outside lesions
    model = sum(ph.tissues[k] * pv[k] for k in TISSUES) * scale
    assert torch.allclose(ph.activity[~les], model[~les], rtol=1e-5, atol=1e-4)
    # near-pure grey and white matter voxels
    gm = (ph.tissues["gm"] > 0.98) & ~les
    wm = (ph.tissues["wm"] > 0.98) & ~les
    assert gm.sum() >= 5 and wm.sum() >= 50
    ratio = float(ph.activity[gm].mean() / ph.activity[wm].mean())
    assert abs(ratio - 3.0) < 0.1
    assert abs(float(ph.activity[wm].mean()) / scale - 32.0) < 1.0


def test_contrast_jitter_recorded(subjects2d):
    for ph in subjects2d:
        pv, cfg = ph.params["pet_values"], ph.params["config"]
        j = cfg["pet_contrast_jitter"]
        assert 96 * (1 - j) <= pv["gm"] <= 96 * (1 + j) and 32 * (1 - j) <= pv["wm"] <= 32 * (1 + j)
        lo, hi = cfg["activity_scale_range"]
        assert lo <= ph.params["activity_scale"] <= hi


def test_mu_map_values_and_skull(subjects2d, subject3d):
    soft, bone = 0.00975, 0.013
    for ph in [*subjects2d[:3], subject3d]:
        mu = ph.mu_map
        assert float(mu.min()) >= 0.0 and float(mu.max()) <= bone + 1e-7
        # inside the brain: soft tissue (up to partial volume at its edge); the skull lies outside
        assert torch.allclose(mu[ph.brain_mask], torch.tensor(soft), atol=3e-5)
        assert float(ph.tissues["bone"][ph.brain_mask].max()) < 0.01
        skull = mu > bone - 1e-5
        assert int(skull.sum()) > 100
        # air outside the head
        assert float(mu[0, 0, 0]) == 0.0
    # the skull surrounds the brain in the slice: bone on every ray from the brain centre
    ph = subjects2d[0]
    bone_frac = ph.tissues["bone"][0].numpy()
    cy, cx = np.argwhere(ph.brain_mask[0].numpy()).mean(0)
    for ang in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        r = np.arange(0, 100)
        yy = np.clip(np.rint(cy + r * np.sin(ang)).astype(int), 0, 127)
        xx = np.clip(np.rint(cx + r * np.cos(ang)).astype(int), 0, 127)
        assert bone_frac[yy, xx].max() > 0.5


def test_mr_t1_contrast(subjects2d):
    ph = subjects2d[0]
    les = ph.lesion_union("mr")
    wm = (ph.tissues["wm"] > 0.95) & ~les
    gm = (ph.tissues["gm"] > 0.95) & ~les
    assert float(ph.mr[wm].mean()) > 1.3 * float(ph.mr[gm].mean())  # WM 154 vs GM 106


# --------------------------------------------------------------------------------------
# lesions
# --------------------------------------------------------------------------------------
def test_lesions_inside_brain_and_consistent(subjects2d, subject3d):
    for ph in [*subjects2d, subject3d]:
        geo = ph.lesion_masks_pet | ph.lesion_masks_mr
        for i, d in enumerate(ph.lesion_info):
            m = geo[i]
            assert int(m.sum()) == d["num_voxels"] >= 1
            assert bool((m & ~ph.brain_mask).sum() == 0), "lesion voxels outside the brain mask"
            assert bool(ph.lesion_masks_pet[i].any()) == d["in_pet"]
            assert bool(ph.lesion_masks_mr[i].any()) == d["in_mr"]
            assert d["in_pet"] or d["in_mr"]
            if d["in_pet"]:
                pv, s = ph.params["pet_values"], ph.params["activity_scale"]
                expected = d["pet_contrast"] * pv["wm"] * s
                assert torch.allclose(ph.activity[m], torch.tensor(expected, dtype=torch.float32), rtol=1e-5)
                assert (d["pet_kind"] == "hot") == (d["pet_contrast"] > 1.0)
            else:
                assert d["pet_kind"] is None and d["pet_contrast"] is None
            # centres in white matter
            zi, yi, xi = (int(np.argmin(np.abs(ph.grid.axis_mm(a) - c))) for a, c in enumerate(d["centre_mm"]))
            assert float(ph.tissues["wm"][zi, yi, xi]) >= 0.5
        # lesions do not overlap
        if len(ph.lesion_info) > 1:
            assert int(geo.sum(0).max()) == 1
    lo, hi = PhantomConfig().num_lesions_3d
    assert lo <= subject3d.num_lesions <= hi


def test_pet_only_and_mr_only_lesions_exist(subjects2d):
    info = [d for ph in subjects2d for d in ph.lesion_info]
    kinds = {(d["in_pet"], d["in_mr"]) for d in info}
    assert (True, False) in kinds and (False, True) in kinds and (True, True) in kinds
    assert {d["pet_kind"] for d in info if d["in_pet"]} == {"hot", "cold"}
    assert {d["mr_kind"] for d in info if d["in_mr"]} == {"hot", "cold"}
    # a PET-only lesion is visible in PET but leaves the MR image untouched
    ph = next(p for p in subjects2d if any(d["in_pet"] and not d["in_mr"] for d in p.lesion_info))
    i = next(i for i, d in enumerate(ph.lesion_info) if d["in_pet"] and not d["in_mr"])
    assert not ph.lesion_masks_mr[i].any() and ph.lesion_masks_pet[i].any()


def test_lesion_settings_do_not_change_anatomy(subjects2d):
    ph = make_subject(GRID2D, 2, PhantomConfig(num_lesions_2d=(0, 0)))
    assert ph.num_lesions == 0 and ph.lesion_masks_pet.shape == (0,) + GRID2D.shape
    assert torch.equal(ph.mu_map, subjects2d[2].mu_map)
    assert ph.lesion_union("pet").shape == GRID2D.shape and not ph.lesion_union("mr").any()


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def test_config_roundtrip():
    cfg = PhantomConfig(num_lesions_2d=(1, 3), rotation_deg=5.0, pet_values={"csf": 2.0})
    d = json.loads(json.dumps(cfg.to_dict()))
    back = PhantomConfig.from_dict(d)
    assert back == cfg and back.num_lesions_2d == (1, 3) and back.pet_values["gm"] == 96.0
    assert PhantomConfig.from_dict({}) == PhantomConfig()
    ph = make_subject(GRID2D, 0, d)  # a dict is accepted as config
    assert ph.params["config"] == cfg.to_dict()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_lesions_2d=(-1, 3)), "num_lesions_2d"),
        (dict(num_lesions_3d=(5, 2)), "num_lesions_3d"),
        (dict(num_lesions_2d=(1.5, 3)), "num_lesions_2d"),
        (dict(lesion_radius_mm=(6.0, 2.0)), "lesion_radius_mm"),
        (dict(lesion_radius_mm=(0.0, 2.0)), "lesion_radius_mm"),
        (dict(p_pet_only=0.7, p_mr_only=0.6), "p_pet_only"),
        (dict(hot_fraction=1.5), "hot_fraction"),
        (dict(pet_hot_contrast=(0.5, 2.0)), "pet_hot_contrast"),
        (dict(mr_cold_contrast=(0.5, 1.5)), "mr_cold_contrast"),
        (dict(pet_values={"grey": 1.0}), "pet_values"),
        (dict(mr_values={"wm": -1.0}), "mr_values"),
        (dict(template_resolution=3), "template_resolution"),
        (dict(scale_range=-0.1), "scale_range"),
        (dict(activity_scale_range=(0.0, 1.0)), "activity_scale_range"),
        (dict(deform_amplitude_mm=float("nan")), "deform_amplitude_mm"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PhantomConfig(**kwargs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown PhantomConfig key"):
        PhantomConfig.from_dict({"num_lesion": 3})
    with pytest.raises(ValueError, match="grid"):
        make_subject((1, 64, 64), 0)
    with pytest.raises(ValueError, match="seed"):
        make_subject(GRID2D, -1)
    with pytest.raises(ValueError, match="seed"):
        make_subject(GRID2D, 1.5)
    with pytest.raises(ValueError, match="config"):
        make_subject(GRID2D, 0, config="default")
    with pytest.raises(ValueError, match="kind"):
        simple_phantom(GRID2D, kind="square")
    with pytest.raises(ValueError, match="grid"):
        shepp_logan(np.zeros((64, 64)))


def test_missing_template_data_gives_clear_error(monkeypatch):
    import nilearn.datasets

    from fbsemlib.data.phantoms import template

    def missing(*args, **kwargs):
        raise FileNotFoundError("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")

    monkeypatch.setattr(nilearn.datasets, "load_mni152_gm_template", missing)
    with pytest.raises(RuntimeError, match="nilearn"):
        template._load_nilearn_template(1)


def test_build_phantom_from_a_synthetic_source():
    """build_phantom resamples any TissueSource (here a sphere: white matter, a grey-matter
    shell, a skull) onto a grid; seed None is the identity draw without lesions."""
    from fbsemlib.data.phantoms.build import TissueSource, bbox_centre_ras, build_phantom

    n = 41
    i, j, k = np.mgrid[:n, :n, :n] - (n // 2)
    r = np.sqrt(i**2 + j**2 + k**2)  # 1 mm voxels
    counts = {t: np.zeros((n, n, n), np.uint8) for t in TISSUES}
    counts["wm"][r <= 10] = 255
    counts["gm"][(r > 10) & (r <= 14)] = 255
    counts["bone"][(r > 14) & (r <= 17)] = 255
    brain = (r <= 14).astype(np.uint8)
    affine = np.eye(4)
    affine[:3, 3] = -(n // 2)
    src = TissueSource(counts=counts, brain=brain, unit=1 / 255, affine=affine,
                       centre_ras=bbox_centre_ras(brain, affine), name="sphere")
    assert np.allclose(src.centre_ras, 0.0)
    grid = ImageGrid((1, 32, 32), (2.0, 2.0, 2.0))
    cfg = PhantomConfig(slice_z_mm=0.0)
    ph = build_phantom(src, grid, cfg, None, "cpu")
    assert ph.num_lesions == 0 and ph.seed is None and ph.params["source"] == "sphere"
    area = float(ph.brain_mask.sum()) * 4.0
    assert abs(area - np.pi * 14**2) < 0.1 * np.pi * 14**2
    centre = (0, 15, 15)
    assert float(ph.activity[centre]) == pytest.approx(cfg.pet_values["wm"])
    assert float(ph.mr[centre]) == pytest.approx(cfg.mr_values["wm"])
    assert float(ph.mu_map.max()) == pytest.approx(cfg.mu_bone_per_mm, rel=1e-5)
    assert torch.equal(build_phantom(src, grid, cfg, None, "cpu").activity, ph.activity)


# --------------------------------------------------------------------------------------
# simple objects
# --------------------------------------------------------------------------------------
def test_shepp_logan_and_simple_phantoms():
    sl = shepp_logan(GRID2D)
    assert sl.shape == GRID2D.shape and sl.dtype == torch.float32
    assert 0.9 < float(sl.max()) <= 1.0 and float(sl.min()) == 0.0
    g3 = ImageGrid((4, 48, 48), (2.0, 2.0, 2.0))
    sl3 = shepp_logan(g3)
    assert sl3.shape == g3.shape and torch.equal(sl3[0], sl3[3])
    disc = simple_phantom(GRID2D, "disc")
    assert disc.shape == GRID2D.shape and set(disc.unique().tolist()) == {0.0, 1.0}
    area = float(disc.sum()) * 2.086**2
    r = 0.6 * GRID2D.fov_radius_mm()
    assert abs(area / (np.pi * r**2) - 1) < 0.03
    hot = simple_phantom(g3, "hot_spots")
    assert hot.shape == g3.shape and set(hot.unique().tolist()) == {0.0, 1.0, 4.0}


# --------------------------------------------------------------------------------------
# BrainWeb loader (synthetic label volume)
# --------------------------------------------------------------------------------------
def _synthetic_labels(shape=(40, 52, 44), vox=2.0):
    """Nested ellipsoids with BrainWeb labels: skin 6, fat 4, skull 7, CSF 1, GM 2, WM 3."""
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * vox for n in shape], indexing="ij")
    rho = np.sqrt((z / 36.0) ** 2 + (y / 48.0) ** 2 + (x / 40.0) ** 2)  # 1 at the head surface
    lab = np.zeros(shape, dtype=np.uint8)
    for thr, label in [(1.0, 6), (0.95, 4), (0.9, 7), (0.78, 1), (0.72, 2), (0.5, 3)]:
        lab[rho <= thr] = label
    return lab


def test_brainweb_loader_synthetic(tmp_path):
    import nibabel as nib

    lab = _synthetic_labels()
    np.save(tmp_path / "subject_99.npy", lab)
    np.save(tmp_path / "subject_99_raw.npy", (lab.astype(np.uint16) << 4))  # BrainWeb raw encoding
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-(n - 1) for n in lab.shape[::-1]]  # centred, (x, y, z) order
    nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0).copy(), aff), str(tmp_path / "subject_99.nii.gz"))

    grid = ImageGrid((1, 64, 64), (2.0, 2.0, 2.0))
    ph = load_brainweb(tmp_path / "subject_99.npy", grid, voxel_size_mm=(2.0, 2.0, 2.0))
    assert isinstance(ph, Phantom) and ph.activity.shape == grid.shape and ph.seed is None
    assert ph.num_lesions == 0
    act = ph.activity[0]
    assert float(act[32, 32]) == pytest.approx(32.0, rel=1e-4)  # white-matter core
    assert float(act.max()) == pytest.approx(96.0, rel=1e-4)  # grey-matter shell
    assert float(ph.mu_map.max()) == pytest.approx(0.013, rel=1e-5)  # skull
    assert float(ph.mu_map[0, 32, 32]) == pytest.approx(0.00975, rel=1e-5)
    assert ph.brain_mask[0, 32, 32] and not ph.brain_mask[0, 0, 0]
    assert ph.params["source"] == "brainweb:subject_99.npy"

    for other in ("subject_99_raw.npy", "subject_99.nii.gz"):
        ph2 = load_brainweb(tmp_path / other, grid, voxel_size_mm=(2.0, 2.0, 2.0))
        assert torch.allclose(ph2.activity, ph.activity, atol=1e-4)
        assert torch.equal(ph2.brain_mask, ph.brain_mask)

    # with a seed: random augmentation and lesions, inside the brain
    cfg = PhantomConfig(num_lesions_2d=(3, 3), lesion_radius_mm=(2.0, 3.0))
    phs = load_brainweb(tmp_path / "subject_99.nii.gz", grid, seed=5, config=cfg)
    assert phs.seed == 5 and phs.num_lesions >= 1
    geo = phs.lesion_masks_pet | phs.lesion_masks_mr
    assert not (geo & ~phs.brain_mask).any()

    # a small 3D grid
    g3 = ImageGrid((8, 40, 40), (3.0, 3.0, 3.0))
    assert load_brainweb(tmp_path / "subject_99.npy", g3, voxel_size_mm=(2.0, 2.0, 2.0)).mr.shape == g3.shape


def test_brainweb_fuzzy_models(tmp_path):
    lab = _synthetic_labels()
    paths = {}
    for t, code in [("gm", 2), ("wm", 3), ("csf", 1), ("bone", 7), ("skin", 6), ("soft", 4)]:
        paths[t] = tmp_path / f"subject_99_{t}.npy"
        np.save(paths[t], (lab == code).astype(np.float32))
    grid = ImageGrid((1, 64, 64), (2.0, 2.0, 2.0))
    fz = load_brainweb(paths, grid, voxel_size_mm=(2.0, 2.0, 2.0))
    crisp_path = tmp_path / "crisp.npy"
    np.save(crisp_path, lab)
    crisp = load_brainweb(crisp_path, grid, voxel_size_mm=(2.0, 2.0, 2.0))
    assert torch.allclose(fz.activity, crisp.activity, atol=1e-3)


def test_brainweb_missing_and_bad_files(tmp_path):
    grid = ImageGrid((1, 32, 32), (2.0, 2.0, 2.0))
    missing = tmp_path / "subject_04_crisp_v.mnc.gz"
    with pytest.raises(FileNotFoundError, match="subject_04_crisp_v.mnc.gz"):
        load_brainweb(missing, grid)
    with pytest.raises(FileNotFoundError, match="nothere_gm.npy"):
        load_brainweb({"gm": tmp_path / "nothere_gm.npy"}, grid)
    bad = tmp_path / "labels.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported"):
        load_brainweb(bad, grid)
    lab = _synthetic_labels()
    lab[0, 0, 0] = 13
    np.save(tmp_path / "odd.npy", lab)
    with pytest.raises(ValueError, match="13"):
        load_brainweb(tmp_path / "odd.npy", grid, voxel_size_mm=(2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="label_map"):
        load_brainweb(tmp_path / "odd.npy", grid, label_map={13: "tumour"})
