"""Table-driven checks: every way a user can hand the library or the CLI bad input gives a
clear error (exception type + a message naming the parameter; exit status 2 on the CLI),
and none of them corrupts existing data."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fbsemlib as fb
from fbsemlib.cli import main
from fbsemlib.models.fbsem import FBSEMNet, ModelConfig
from fbsemlib.physics.forward_model import PETForwardModel

ROOT = Path(__file__).resolve().parent.parent
SINO = fb.sinogram_preset("tiny2d")
GRID = fb.ImageGrid((1, 16, 16), (2.0, 10.0, 10.0))
P = fb.Projector(SINO, GRID, backend="torch")
Y = torch.ones((1, 1) + P.out_shape)
MODEL = PETForwardModel(P)


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


API_CASES = [
    # (id, callable, exception, message regex)
    ("projector wrong image shape", lambda: P(torch.ones(1, 1, 5, 5)), ValueError, r"image must have shape"),
    ("projector int image", lambda: P(torch.ones((1,) + P.in_shape, dtype=torch.int32)), TypeError, "floating-point"),
    ("projector numpy image", lambda: P(np.ones(P.in_shape)), TypeError, "torch.Tensor"),
    ("projector wrong sinogram shape", lambda: P.adjoint(torch.ones(1, 1, 2, 3)), ValueError, "sinogram must have shape"),
    ("projector device mismatch", lambda: P(torch.ones((1,) + P.in_shape, device="meta")), ValueError, "is on meta"),
    ("projector unknown backend", lambda: fb.Projector(SINO, GRID, backend="gpu"), ValueError, "backend"),
    ("projector 2D grid, 3D scanner", lambda: fb.Projector(fb.sinogram_preset("small3d"), GRID), ValueError, "2D image grid"),
    ("grid zero voxel", lambda: fb.ImageGrid((1, 4, 4), (1.0, 0.0, 1.0)), ValueError, "voxel_size_mm"),
    ("grid bad shape", lambda: fb.ImageGrid((4, 4)), ValueError, "shape"),
    ("scanner negative radius", lambda: fb.RingScanner(-1.0, 8, 4, 4.0), ValueError, "radius_mm"),
    ("unknown preset", lambda: fb.scanner_preset("biograph"), ValueError, "unknown scanner preset"),
    ("zero subsets", lambda: fb.osem(MODEL, Y, 1, 0), ValueError, "num_subsets"),
    ("too many subsets", lambda: fb.osem(MODEL, Y, 1, 1000), ValueError, "num_subsets"),
    ("zero iterations", lambda: fb.osem(MODEL, Y, 0, 1), ValueError, "num_iterations"),
    ("negative sinogram", lambda: fb.osem(MODEL, -Y, 1, 1), ValueError, "non-negative"),
    ("NaN sinogram", lambda: fb.osem(MODEL, _nan(Y), 1, 1), ValueError, "NaN"),
    ("Inf sinogram", lambda: fb.osem(MODEL, _inf(Y), 1, 1), ValueError, "NaN or Inf"),
    ("sinogram wrong shape", lambda: fb.osem(MODEL, Y[..., :3], 1, 1), ValueError, "shape"),
    ("sinogram int dtype", lambda: fb.osem(MODEL, Y.long(), 1, 1), TypeError, "floating"),
    ("negative x0", lambda: fb.osem(MODEL, Y, 1, 1, x0=-torch.ones((1, 1) + P.in_shape)), ValueError, "x0"),
    ("negative beta", lambda: fb.map_em(MODEL, Y, fb.QuadraticPrior(), -1.0, 1), ValueError, "beta"),
    ("NaN beta", lambda: fb.map_em(MODEL, Y, fb.QuadraticPrior(), float("nan"), 1), ValueError, "beta"),
    ("negative attenuation", lambda: PETForwardModel(P, -torch.ones(P.out_shape)), ValueError, "multiplicative"),
    ("negative mu-map", lambda: fb.attenuation_factors(P, -torch.ones(P.in_shape)), ValueError, "mu_map_per_mm"),
    ("bad crystal efficiencies", lambda: fb.normalisation_factors(SINO, np.ones(3)), ValueError, "crystal_efficiencies"),
    ("model depth", lambda: ModelConfig(depth=1), ValueError, "model.depth"),
    ("model width", lambda: ModelConfig(width=0), ValueError, "model.width"),
    ("net zero subsets", lambda: FBSEMNet(P, 1, 0), ValueError, "num_subsets"),
    ("net NaN data", lambda: FBSEMNet(P, 1, 2, ModelConfig(use_mr=False, width=2, depth=2))(_nan(Y)), ValueError, "NaN"),
    ("net negative data", lambda: FBSEMNet(P, 1, 2, ModelConfig(use_mr=False, width=2, depth=2))(-Y), ValueError,
     "non-negative"),
    ("net missing MR", lambda: FBSEMNet(P, 1, 2, ModelConfig(width=2, depth=2))(Y), ValueError, "mr is None"),
    ("metrics shape mismatch", lambda: fb.metrics.nrmse(torch.ones(4, 4, 4), torch.ones(4, 4, 5)), ValueError, "shape"),
    ("metrics NaN", lambda: fb.metrics.nrmse(_nan(torch.ones(4, 4, 4)), torch.ones(4, 4, 4)), ValueError, "NaN"),
    ("phantom bad grid", lambda: fb.make_subject((1, 8, 8), 0), (TypeError, ValueError), "grid"),
    ("brainweb missing file", lambda: fb.load_brainweb("/nonexistent/subject04.mnc", GRID), FileNotFoundError,
     "subject04"),
    ("dataset missing folder", lambda: fb.PETDataset("/nonexistent/ds", "train"), ValueError, "nonexistent"),
    ("train config unknown key", lambda: __import__("fbsemlib.config", fromlist=["from_dict"]).from_dict(
        fb.TrainConfig, {"epochz": 1}, "train"), ValueError, "epochz"),
    ("train config zero epochs", lambda: fb.TrainConfig(epochs=0), ValueError, "epochs"),
    ("train config negative lr", lambda: fb.TrainConfig(lr=-1.0), ValueError, "lr"),
    ("data config unknown key", lambda: __import__("fbsemlib.config", fromlist=["from_dict"]).from_dict(
        fb.DataConfig, {"countz": 1}, "data"), ValueError, "countz"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


def _recipe(tmp_path, rename: dict | None = None, **changes):
    """The smoke experiment with sections renamed (``{old: new}``) and ``section.key`` values changed."""
    sections = yaml.safe_load((ROOT / "data" / "smoke.yaml").read_text())
    for old, new in (rename or {}).items():
        sections[new] = sections.pop(old)
    for k, v in changes.items():
        sec, key = k.split(".")
        sections[sec][key] = v
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(sections))
    return str(p)


CLI_CASES = [
    # (id, argv builder, message regex)
    ("simulate unknown key", lambda t: ["simulate", "--config", _recipe(t, **{"data.countz": 3}), "--out", str(t / "o")],
     "countz"),
    ("simulate negative counts", lambda t: ["simulate", "--config", _recipe(t, **{"data.counts_range": [-1, 10]}),
                                            "--out", str(t / "o")], "counts"),
    ("simulate zero subsets", lambda t: ["simulate", "--config", _recipe(t, **{"data.num_subsets": 0}),
                                         "--out", str(t / "o")], "num_subsets"),
    ("simulate K not multiple of subsets", lambda t: ["simulate", "--config", _recipe(t, **{"data.num_modules": 7}),
                                                      "--out", str(t / "o")], "multiple"),
    ("simulate unknown preset", lambda t: ["simulate", "--config", _recipe(t, **{"data.scanner": "nope"}),
                                           "--out", str(t / "o")], "nope"),
    ("simulate missing config", lambda t: ["simulate", "--config", str(t / "missing.yaml"), "--out", str(t / "o")],
     "missing.yaml"),
    ("train missing data", lambda t: ["train", "--config", str(ROOT / "data" / "smoke.yaml"), "--data", str(t / "none"),
                                      "--out", str(t / "run")], "none"),
    ("train unknown key", lambda t: ["train", "--config", _recipe(t, **{"train.epochz": 1}), "--data", str(t),
                                     "--out", str(t / "run")], "epochz"),
    ("train zero epochs", lambda t: ["train", "--config", _recipe(t, **{"train.epochs_per_module": 0}), "--data", str(t),
                                     "--out", str(t / "run")], "epochs_per_module"),
    ("evaluate missing model", lambda t: ["evaluate", "--model", str(t / "nomodel"), "--data", str(t)], "nomodel"),
    ("reconstruct missing model", lambda t: ["reconstruct", "--model", str(t / "nomodel"), "--sinogram", str(t / "s.h5")],
     "nomodel"),
    ("memory zero modules", lambda t: ["memory", "--config", str(ROOT / "data" / "smoke.yaml"), "--modules", "0",
                                       "--mode", "sequential"], "modules"),
    ("memory cuda without cuda", lambda t: ["memory", "--config", str(ROOT / "data" / "smoke.yaml"), "--modules", "1",
                                            "--mode", "sequential", "--device", "cuda"], "CUDA|cuda"),
    ("bench unknown", lambda t: ["bench", "nope", "--quick"], "unknown benchmark"),
    ("book unknown chapter", lambda t: ["book", "run", "99", "--profile", "smoke"], "99"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, tmp_path, capsys):
    if case[0] == "memory cuda without cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    _, argv, match = case
    rc = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err
    import re

    assert re.search(match, err), err
    assert "Traceback" not in err


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_bad_input_never_corrupts_existing_data(smoke_dataset, tmp_path, capsys):
    # a copy of a good dataset and a non-dataset folder with user files
    ds = tmp_path / "ds"
    shutil.copytree(smoke_dataset, ds)
    before = _tree_digest(ds)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    # simulating a bad recipe onto them, or a good recipe onto a folder that is not a dataset
    assert main(["simulate", "--config", _recipe(tmp_path, **{"data.countz": 3}), "--out", str(ds)]) == 2
    assert main(["simulate", "--config", str(ROOT / "data" / "smoke.yaml"), "--out", str(user)]) == 2
    assert (user / "notes.txt").read_text() == "precious"
    # training with a bad config onto the dataset folder as output
    assert main(["train", "--config", _recipe(tmp_path, **{"train.lr": -1}), "--data", str(ds), "--out", str(ds)]) == 2
    assert _tree_digest(ds) == before
    fb.validate_dataset(ds)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(tmp_path, capsys):  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = main(["simulate", "--config", str(ROOT / "data" / "smoke.yaml"), "--out", str(ro / "ds")])
        assert rc == 2
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------------------
# issue 13, class 2: nothing silent (a misspelt section, missing factors, a damaged model,
# a non-finite image, an output name that is not what is written)
# ----------------------------------------------------------------------------------------
SILENT_CONFIG_CASES = [
    ("capitalised section", {"model": "Model"}, {}, r"unknown section 'Model' \(did you mean 'model'\?\)"),
    ("misspelt section", {"train": "trian"}, {}, r"unknown section 'trian' \(did you mean 'train'\?\)"),
    ("misspelt train key", None, {"train.epochz": 3},
     r"unknown key 'epochz' in section 'train' \(did you mean 'epochs'\?\)"),
    ("misspelt model key", None, {"model.widht": 3},
     r"unknown key 'widht' in section 'model' \(did you mean 'width'\?\)"),
    ("misspelt data key", None, {"data.num_subject": 3}, r"did you mean 'num_subjects'\?"),
]


@pytest.mark.parametrize("case", SILENT_CONFIG_CASES, ids=[c[0] for c in SILENT_CONFIG_CASES])
def test_misspelt_config_is_an_error_with_a_hint(case, tmp_path, capsys):
    import re

    _, rename, changes, match = case
    out = tmp_path / "run"
    rc = main(["train", "--config", _recipe(tmp_path, rename, **changes), "--data", str(tmp_path / "nodata"),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and re.search(match, err), err
    assert "Traceback" not in err and not out.exists()


def _scan_file(smoke_dataset, path: Path, keys=("y", "multiplicative", "additive", "mr"), **replace) -> Path:
    import h5py

    item = PETDataset_item(smoke_dataset)
    with h5py.File(path, "w") as h:
        for k in keys:
            h[k] = replace.get(k, item[k].numpy())
    return path


def PETDataset_item(smoke_dataset):
    return fb.PETDataset(smoke_dataset, "test")[0]


def test_reconstruct_requires_the_factors_or_an_explicit_flag(smoke_model, smoke_dataset, tmp_path, capsys):
    scan = _scan_file(smoke_dataset, tmp_path / "scan.h5", keys=("y", "additive", "mr"))
    out = tmp_path / "x.npy"
    assert main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(scan), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'multiplicative' missing" in err and "--unit-factors" in err and not out.exists()
    assert main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(scan), "--out", str(out),
                 "--unit-factors"]) == 0
    assert np.isfinite(np.load(out)).all()


def _flip_tensor_bytes(model_file: Path) -> None:
    """Flip bytes inside the largest tensor record of a torch zip file (not its metadata)."""
    import struct
    import zipfile

    with zipfile.ZipFile(model_file) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(model_file.read_bytes())
    n, m = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + n + m + info.file_size // 2
    for i in range(start, start + 8):
        raw[i] ^= 0xFF
    model_file.write_bytes(bytes(raw))


def test_a_model_file_with_flipped_bytes_is_refused(smoke_model, smoke_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_model, run)
    _flip_tensor_bytes(run / "model.pt")
    scan = _scan_file(smoke_dataset, tmp_path / "scan.h5")
    out = tmp_path / "x.npy"
    rc = main(["reconstruct", "--model", str(run), "--sinogram", str(scan), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupted" in err and "Traceback" not in err, err
    assert not out.exists()
    rc = main(["evaluate", "--model", str(run), "--data", str(smoke_dataset), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupted" in err


def test_a_non_finite_reconstruction_is_not_written(smoke_model, smoke_dataset, tmp_path, capsys, monkeypatch):
    scan = _scan_file(smoke_dataset, tmp_path / "scan.h5")
    out = tmp_path / "x.npy"
    out_before = tmp_path / "keep.npy"
    np.save(out_before, np.zeros(3))
    monkeypatch.setattr(FBSEMNet, "forward", lambda self, y, *a, **k: torch.full(
        (y.shape[0], 1) + tuple(self.projector.in_shape), float("nan")))
    for target, flags in ((out, []), (out_before, ["--overwrite"])):
        rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(scan), "--out", str(target), *flags])
        err = capsys.readouterr().err
        assert rc == 2 and "not finite" in err and "nothing was written" in err
    assert not out.exists() and np.array_equal(np.load(out_before), np.zeros(3))


def test_reconstruct_out_names_exactly_the_file_written(smoke_model, smoke_dataset, tmp_path, capsys):
    scan = _scan_file(smoke_dataset, tmp_path / "scan.h5")
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(scan), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "must end in .npy" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.npy").exists()
    rc = main(["reconstruct", "--model", str(smoke_model), "--sinogram", str(scan), "--out", str(tmp_path / "x.npy")])
    assert rc == 0 and f"wrote {tmp_path / 'x.npy'}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# issue 13, class 6: malformed files and outputs end in `error: ...` with exit 2, never a
# traceback, and change nothing that existed (the model and dataset used are digested)
# ----------------------------------------------------------------------------------------
def _copy_run(t, smoke_model) -> Path:
    run = t / "run"
    if not run.exists():
        shutil.copytree(smoke_model, run)
    return run


def _model_file(t, smoke_model, payload) -> str:
    run = _copy_run(t, smoke_model)
    if isinstance(payload, bytes):
        (run / "model.pt").write_bytes(payload)
    else:
        torch.save(payload, run / "model.pt")
    return str(run)


def _truncated(src: Path, dst: Path) -> str:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return str(dst)


def _good_scan(t, ds, **replace) -> str:
    return str(_scan_file(ds, t / "scan.h5", **replace))


def _copy_ds(t, ds, edit=None) -> str:
    out = t / "ds"
    if not out.exists():
        shutil.copytree(ds, out)
    if edit is not None:
        edit(out)
    return str(out)


def _edit_manifest(fn):
    def edit(folder: Path) -> None:
        p = folder / "manifest.json"
        m = json.loads(p.read_text())
        p.write_text(json.dumps(fn(m)))
    return edit


def _item_array(ds, key, fn):
    return fn(PETDataset_item(ds)[key].numpy())


def _rec(model, sino, *extra):
    return ["reconstruct", "--model", str(model), "--sinogram", str(sino), "--out", "OUT/x.npy", *extra]


HOSTILE_CASES = [
    # (id, argv builder (tmp_path, dataset, model) -> argv, message regex)
    ("sinogram not HDF5", lambda t, d, m: _rec(m, (t / "s.h5").write_text("not hdf5") and t / "s.h5"),
     "cannot read sinogram file"),
    ("sinogram truncated HDF5", lambda t, d, m: _rec(m, _truncated(Path(_good_scan(t, d)), t / "cut.h5")),
     "cannot read sinogram file"),
    ("sinogram truncated npy", lambda t, d, m: _rec(m, (np.save(t / "y.npy", np.ones((1, 2, 64, 64), np.float32)),
                                                        _truncated(t / "y.npy", t / "cut.npy"))[1]),
     "cannot read sinogram file"),
    ("sinogram pickle in npy", lambda t, d, m: _rec(m, (np.save(t / "o.npy", np.array([{"a": 1}], dtype=object),
                                                                allow_pickle=True), t / "o.npy")[1]),
     "cannot read sinogram file"),
    ("sinogram .pt of a list", lambda t, d, m: _rec(m, (torch.save([1, 2], t / "l.pt"), t / "l.pt")[1]),
     "expected a tensor or a dict"),
    ("sinogram strings", lambda t, d, m: _rec(m, (np.save(t / "s.npy", np.array(["a", "b"])), t / "s.npy")[1]),
     "numeric array"),
    ("sinogram a folder", lambda t, d, m: _rec(m, t), "not a file"),
    ("sinogram unknown suffix", lambda t, d, m: _rec(m, (t / "s.txt").write_text("1") and t / "s.txt"), "unsupported"),
    ("NaN multiplicative", lambda t, d, m: _rec(m, _good_scan(t, d, multiplicative=_item_array(
        d, "multiplicative", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a)))),
     "multiplicative holds NaN"),
    ("negative multiplicative", lambda t, d, m: _rec(m, _good_scan(t, d, multiplicative=_item_array(
        d, "multiplicative", lambda a: -a))), "multiplicative must be non-negative"),
    ("negative additive", lambda t, d, m: _rec(m, _good_scan(t, d, additive=_item_array(
        d, "additive", lambda a: a - 1e3))), "additive must be non-negative"),
    ("counts where the model expects none", lambda t, d, m: _rec(m, _good_scan(
        t, d, multiplicative=_item_array(d, "multiplicative", lambda a: np.where(np.arange(a.size).reshape(a.shape) < 5, 0, a)),
        additive=_item_array(d, "additive", lambda a: np.where(np.arange(a.size).reshape(a.shape) < 5, 0, a)),
        y=_item_array(d, "y", lambda a: np.where(np.arange(a.size).reshape(a.shape) < 5, 3.0, a)))),
     "counts where multiplicative and additive are both 0"),
    ("Inf y", lambda t, d, m: _rec(m, _good_scan(t, d, y=_item_array(d, "y", lambda a: a * np.inf))),
     "y holds NaN or Inf"),
    ("mismatched batch sizes", lambda t, d, m: _rec(m, _good_scan(t, d, y=_item_array(
        d, "y", lambda a: np.stack([a, a])),
        multiplicative=_item_array(d, "multiplicative", lambda a: np.stack([a] * 3)))),
     "batch of 3 but y has 2"),
    ("y of another geometry", lambda t, d, m: _rec(m, _good_scan(t, d, y=np.ones((1, 3, 5, 7), np.float32))),
     "y has shape"),
    ("model file not a zip", lambda t, d, m: _rec(_model_file(t, m, b"garbage" * 100), _good_scan(t, d)), "corrupted"),
    ("model file truncated", lambda t, d, m: _rec(_model_file(t, m, (m / "model.pt").read_bytes()[:5000]),
                                                  _good_scan(t, d)), "corrupted"),
    ("model file a tensor", lambda t, d, m: _rec(_model_file(t, m, torch.ones(3)), _good_scan(t, d)),
     "not an fbsemlib model file"),
    ("model file without weights", lambda t, d, m: _rec(_model_file(t, m, {"format": "fbsemlib-fbsem-model",
                                                                            "format_version": 1}), _good_scan(t, d)),
     "corrupted"),
    ("model file with a bad config", lambda t, d, m: _rec(_model_file(t, m, {
        "format": "fbsemlib-fbsem-model", "format_version": 1, "state_dict": {}, "configs": {"model": 3}}),
        _good_scan(t, d)), "corrupted"),
    ("reconstruct --out a folder", lambda t, d, m: _rec(m, _good_scan(t, d))[:-1] + [str(t)], "is a folder"),
    ("reconstruct --out under a file", lambda t, d, m: _rec(m, _good_scan(t, d))[:-1] + [str(
        (t / "f").write_text("x") and t / "f" / "x.npy")], "cannot write the output folder"),
    ("evaluate corrupted manifest", lambda t, d, m: ["evaluate", "--model", str(m), "--data", _copy_ds(
        t, d, lambda f: (f / "manifest.json").write_text("{not json")), "--out", str(t / "ev")], "corrupted"),
    ("evaluate manifest a list", lambda t, d, m: ["evaluate", "--model", str(m), "--data", _copy_ds(
        t, d, lambda f: (f / "manifest.json").write_text("[1, 2]")), "--out", str(t / "ev")], "not a JSON object"),
    ("evaluate manifest without files", lambda t, d, m: ["evaluate", "--model", str(m), "--data", _copy_ds(
        t, d, _edit_manifest(lambda x: {k: v for k, v in x.items() if k != "files"})), "--out", str(t / "ev")],
     "key 'files' is missing"),
    ("evaluate truncated subject file", lambda t, d, m: ["evaluate", "--model", str(m), "--data", _copy_ds(
        t, d, lambda f: _truncated(sorted(f.glob("subject-*.h5"))[-1], sorted(f.glob("subject-*.h5"))[-1])),
        "--out", str(t / "ev")], "subject-"),
    ("evaluate --out a file", lambda t, d, m: ["evaluate", "--model", str(m), "--data", str(d), "--out", str(
        (t / "f").write_text("x") and t / "f")], "not a folder"),
    ("train --out a file", lambda t, d, m: ["train", "--config", str(ROOT / "data" / "smoke.yaml"), "--data", str(d),
                                            "--out", str((t / "f").write_text("x") and t / "f")], "not a folder"),
    ("train --data a file", lambda t, d, m: ["train", "--config", str(ROOT / "data" / "smoke.yaml"), "--data", str(
        (t / "f").write_text("x") and t / "f"), "--out", str(t / "run")], "not a folder"),
    ("simulate --out a file", lambda t, d, m: ["simulate", "--config", str(ROOT / "data" / "smoke.yaml"), "--out", str(
        (t / "f").write_text("x") and t / "f")], "not a folder"),
    ("config not UTF-8", lambda t, d, m: ["train", "--config", str((t / "c.yaml").write_bytes(b"\xff\xfe\x00bad") and
                                                                   t / "c.yaml"), "--data", str(d),
                                          "--out", str(t / "r")],
     "c.yaml"),
    ("config a YAML list", lambda t, d, m: ["simulate", "--config", str((t / "c.yaml").write_text("- 1\n- 2\n") and
                                                                        t / "c.yaml"), "--out", str(t / "o")],
     "mapping of sections"),
]


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c[0] for c in HOSTILE_CASES])
def test_malformed_files_give_one_error_line(case, smoke_dataset, smoke_model, tmp_path, capsys):
    import re

    _, build, match = case
    before = (_tree_digest(smoke_dataset), _tree_digest(smoke_model))
    (tmp_path / "OUT").mkdir()
    argv = [a.replace("OUT/", str(tmp_path / "OUT") + "/") for a in build(tmp_path, smoke_dataset, smoke_model)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert "Traceback" not in err
    assert list((tmp_path / "OUT").iterdir()) == []  # no partial output
    assert (_tree_digest(smoke_dataset), _tree_digest(smoke_model)) == before


# ----------------------------------------------------------------------------------------
# issue 13, class 5: paths stay inside their folders
# ----------------------------------------------------------------------------------------
def _manifest_naming(name: str):
    def fn(m: dict) -> dict:
        files = dict(m["files"])
        first = sorted(files)[0]
        files[name] = files.pop(first)
        return dict(m, files=files)
    return _edit_manifest(fn)


PATH_CASES = [
    ("manifest names ../", lambda t, d: ["evaluate", "--model", "MODEL", "--data", _copy_ds(
        t, d, _manifest_naming("../subject-0000.h5")), "--out", str(t / "ev")], "outside the dataset folder"),
    ("manifest names an absolute path", lambda t, d: ["evaluate", "--model", "MODEL", "--data", _copy_ds(
        t, d, _manifest_naming("/etc/passwd")), "--out", str(t / "ev")], "outside the dataset folder"),
    ("manifest names a sub-folder", lambda t, d: ["train", "--config", str(ROOT / "data" / "smoke.yaml"), "--data",
                                                  _copy_ds(t, d, _manifest_naming("sub/subject-0000.h5")),
                                                  "--out", str(t / "run")], "outside the dataset folder"),
    ("data.name ../../x", lambda t, d: ["simulate", "--config", _recipe(t, **{"data.name": "../../x"}),
                                        "--out", str(t / "o")], "plain name"),
    ("data.name absolute", lambda t, d: ["train", "--config", _recipe(t, **{"data.name": "/tmp/x"}),
                                         "--out", str(t / "run")], "plain name"),
]


@pytest.mark.parametrize("case", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_paths_outside_their_folder_are_refused(case, smoke_dataset, smoke_model, tmp_path, capsys):
    import re

    _, build, match = case
    before = _tree_digest(smoke_dataset)
    around = sorted(p.name for p in tmp_path.parent.iterdir())
    argv = [str(smoke_model) if a == "MODEL" else a for a in build(tmp_path, smoke_dataset)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and re.search(match, err), err
    assert "Traceback" not in err
    assert _tree_digest(smoke_dataset) == before
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == around  # nothing written beside the test folder
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------
# issue 13, class 3: sizes, counts, seeds and workers are bounded before anything is
# allocated or spawned
# ----------------------------------------------------------------------------------------
RESOURCE_CASES = [
    ("a million workers", lambda t: ["train", "--config", _recipe(t, **{"train.num_workers": 1000000}),
                                     "--data", str(t), "--out", str(t / "run")],
     r"train.num_workers = 1000000 is too large"),
    ("more workers than cores", lambda t: ["train", "--config", _recipe(t, **{"train.num_workers": os.cpu_count() + 1}),
                                           "--data", "DATA", "--out", str(t / "run")], r"exceeds the \d+ CPU cores"),
    ("huge image", lambda t: ["simulate", "--config", _recipe(t, **{"data.image_shape": [1, 10**6, 10**6]}),
                              "--out", str(t / "o")], r"data.image_shape = 1000000 is too large"),
    ("image past the memory", lambda t: ["simulate", "--config", _recipe(t, **{
        "data.image_shape": [1, 4000, 4000], "data.voxel_size_mm": [2.0, 0.01, 0.01], "data.num_iterations": 2000}),
        "--out", str(t / "o")], r"GiB per subject and [\d.]+ GiB are available"),
    ("huge seed", lambda t: ["simulate", "--config", _recipe(t), "--seed", str(2**70), "--out", str(t / "o")],
     "seed = .* is too large"),
    ("huge train seed", lambda t: ["train", "--config", _recipe(t), "--seed", str(2**64), "--data", str(t),
                                   "--out", str(t / "run")], "train.seed = .* is too large"),
    ("huge module count", lambda t: ["train", "--config", _recipe(t, **{"model.num_iterations": 10**9}),
                                     "--data", str(t), "--out", str(t / "run")], "model.num_iterations = .* too large"),
    ("huge subject count", lambda t: ["simulate", "--config", _recipe(t, **{"data.num_subjects": 10**9,
                                                                           "data.split": {"train": 1.0}}),
                                      "--out", str(t / "o")], "num_subjects = .* too large"),
    ("memory: huge --modules", lambda t: ["memory", "--config", str(ROOT / "data" / "smoke.yaml"), "--modules",
                                          str(10**9), "--mode", "sequential"], "--modules = .* too large"),
    ("huge batch", lambda t: ["train", "--config", _recipe(t, **{"train.batch_size": 10**9}), "--data", str(t),
                              "--out", str(t / "run")], "train.batch_size = .* too large"),
]


@pytest.mark.parametrize("case", RESOURCE_CASES, ids=[c[0] for c in RESOURCE_CASES])
def test_sizes_are_bounded_before_allocating(case, smoke_dataset, tmp_path, capsys):
    import re
    import resource

    _, build, match = case
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    argv = [str(smoke_dataset) if a == "DATA" else a for a in build(tmp_path)]
    t0 = __import__("time").monotonic()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and re.search(match, err), err
    assert "Traceback" not in err
    assert __import__("time").monotonic() - t0 < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 512 * 1024  # KiB: refused, not allocated
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()
