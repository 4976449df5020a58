"""Faults: hard kills at random points, incompatible files, NaN/Inf during training.

(a) ``fbsem train`` killed with SIGKILL at a random (seeded) moment after its first
    checkpoint resumes with ``--resume`` to EXACTLY the weights of an uninterrupted run
    (both modes; CPU, one thread, fixed seeds).
(b) ``fbsem simulate`` killed with SIGKILL mid-way leaves nothing that validates; the rerun
    completes a dataset that validates.
(c) checkpoints / model files / datasets of another format version or geometry are
    refused with a message saying what differs.
(d) NaN/Inf in training stops the run with a clear message, the last good checkpoint
    byte-for-byte intact.

The exception-based crash variants (resume from a callback-raised interruption, simulation
crash, dataset corruption) are in test_training.py, test_simulation.py, test_datasets.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fbsemlib.training.checkpoint import load_checkpoint
from fbsemlib.cli import main
from fbsemlib.data.format import DatasetError, validate_dataset

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FBSEM_TEST_FAULT"):
        env.pop(k, None)
    return env


def _config(tmp_path: Path, **train) -> Path:
    d = yaml.safe_load((REPO / "data" / "smoke.yaml").read_text())
    d["model"].update(num_iterations=1, width=4)  # K = 4 modules
    d["train"].update(epochs=3, epochs_per_module=2, lr_schedule="cosine", **train)
    p = tmp_path / "faults.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _train_cmd(cfg: Path, data: Path, out: Path, mode: str) -> list[str]:
    return [PY, "-m", "fbsemlib", "train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--mode",
            mode, "--no-progress"]


def _timed_run(cmd: list[str], watch: Path) -> tuple[float, float]:
    """Run ``cmd``; return (seconds until ``watch`` appeared, total seconds)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    while p.poll() is None:
        if seen is None and watch.exists():
            seen = time.monotonic() - t0
        time.sleep(0.02)
    out, err = p.communicate()
    assert p.returncode == 0, err[-3000:]
    total = time.monotonic() - t0
    return (total if seen is None else seen), total


def _kill_when(cmd: list[str], ready, delay: float, timeout: float = 300, what: str = "ready") -> int:
    """Start ``cmd``, wait until ``ready()`` is true (the process must still be running),
    wait ``delay`` s more, SIGKILL it. Returns the exit status (``-SIGKILL`` when the kill
    landed)."""
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while not ready():
            if p.poll() is not None:
                raise AssertionError(f"exited before {what}: {p.stderr.read()[-3000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"never {what}")
            time.sleep(0.002)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
    return p.returncode


def _kill_at_random(cmd: list[str], watch: Path, delay: float, timeout: float = 300) -> int:
    """:func:`_kill_when` ``watch`` exists."""
    return _kill_when(cmd, watch.exists, delay, timeout, f"{watch.name} appeared")


def _model_state(out: Path) -> dict:
    return load_checkpoint(out / "model.pt")["state_dict"]


# ----------------------------------------------------------------------------------------
# (a) SIGKILL during training, then --resume
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_runs(smoke_dataset, tmp_path_factory):
    """Uninterrupted runs of both modes (subprocesses, like the killed ones), with the
    time from start to the first checkpoint and to the end."""
    root = tmp_path_factory.mktemp("faults_ref")
    cfg = _config(root)
    runs = {}
    for mode in ("sequential", "end-to-end"):
        out = root / mode
        first, total = _timed_run(_train_cmd(cfg, smoke_dataset, out, mode), out / "checkpoint.pt")
        runs[mode] = {"out": out, "first_checkpoint_s": first, "total_s": total, "config": cfg}
    return runs


@pytest.mark.parametrize("mode,seed", [("sequential", 11), ("end-to-end", 12)])
def test_sigkill_at_a_random_point_then_resume_gives_the_same_weights(reference_runs, smoke_dataset, tmp_path,
                                                                        mode, seed):
    ref = reference_runs[mode]
    rng = random.Random(seed)
    span = max(0.2, ref["total_s"] - ref["first_checkpoint_s"])
    delay = rng.uniform(0.0, 0.6 * span)
    for attempt in range(4):  # on a much faster machine the run may end before the kill: retry sooner
        out = tmp_path / f"run{attempt}"
        cmd = _train_cmd(ref["config"], smoke_dataset, out, mode)
        rc = _kill_at_random(cmd, out / "checkpoint.pt", delay)
        if rc == -signal.SIGKILL:
            break
        delay /= 4
    assert rc == -signal.SIGKILL, "the run always finished before the kill"
    load_checkpoint(out / "checkpoint.pt")  # the last checkpoint is complete (atomic writes)
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _model_state(ref["out"]), _model_state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, delay)
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (ref["out"], out))
    assert ma["steps"] == mb["steps"]
    for name in ("log_steps.csv", "log_epochs.csv"):  # the logs were truncated to the checkpoint, then continued
        la = (ref["out"] / name).read_text().splitlines()
        lb = (out / name).read_text().splitlines()
        assert len(la) == len(lb)
        assert [row.split(",")[:4] for row in la] == [row.split(",")[:4] for row in lb]


# ----------------------------------------------------------------------------------------
# (b) SIGKILL during simulation
# ----------------------------------------------------------------------------------------
SIM = dict(name="faults", scanner="tiny2d", image_shape=[1, 24, 24], voxel_size_mm=[2.0, 9.0, 9.0],
           phantom={"template_resolution": 2}, num_subjects=32, split={"train": 30, "validation": 1, "test": 1},
           slices_per_subject=2, rotations_per_slice=1, counts_range=[2e5, 2e6], num_iterations=1, num_subsets=2,
           compression="none", seed=7)


@pytest.fixture(scope="module")
def sim_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("faults_sim") / "sim.yaml"
    p.write_text(yaml.safe_dump({"data": SIM}))
    return p


def test_sigkill_during_simulate_leaves_no_valid_dataset_and_rerun_completes(sim_config, tmp_path):
    out = tmp_path / "ds"
    cmd = [PY, "-m", "fbsemlib", "simulate", "--config", str(sim_config), "--out", str(out), "--no-progress"]
    rng = random.Random(5)
    delay = rng.uniform(0.0, 0.1)  # subjects are written ~10 ms apart after a ~2 s set-up
    for attempt in range(4):
        rc = _kill_when(cmd, lambda: bool(list(tmp_path.glob("ds.tmp-*/subject-*.h5"))),  # one subject finished
                        delay, timeout=120, what="a subject was written")
        if not out.exists():  # killed before the final rename (else: complete, remove it and retry sooner)
            break
        validate_dataset(out)
        shutil.rmtree(out)
        delay /= 4
    assert rc == -signal.SIGKILL and not out.exists()
    with pytest.raises(DatasetError):
        validate_dataset(out)
    tmps = list(tmp_path.glob("ds.tmp-*"))
    assert len(tmps) == 1
    with pytest.raises(DatasetError):
        validate_dataset(tmps[0])
    done_before = {f.name for f in tmps[0].glob("subject-*.h5")}
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = validate_dataset(out)
    assert len(info.manifest["files"]) == SIM["num_subjects"]
    assert done_before and done_before <= set(info.manifest["files"])
    assert not list(tmp_path.glob("ds.tmp-*"))


# ----------------------------------------------------------------------------------------
# (c) incompatible versions / geometries
# ----------------------------------------------------------------------------------------
def _resume_args(ref: dict, data: Path, out: Path, mode: str) -> list[str]:
    return ["train", "--config", str(ref["config"]), "--data", str(data), "--out", str(out), "--mode", mode,
            "--resume", "--no-progress"]


def _refused_resume(ref: dict, data: Path, out: Path, capsys) -> str:
    """``fbsem train --resume`` of ``out`` on ``data`` must be refused (exit status 2);
    returns what it printed on stderr."""
    assert main(_resume_args(ref, data, out, "sequential")) == 2
    return capsys.readouterr().err


def _edited_run(ref: dict, tmp_path: Path, edit) -> Path:
    """A copy of a finished run whose checkpoint is edited and marked unfinished."""
    out = tmp_path / "edited"
    shutil.copytree(ref["out"], out)
    ck = load_checkpoint(out / "checkpoint.pt")
    ck["finished"] = False
    edit(ck)
    torch.save(ck, out / "checkpoint.pt")
    (out / "model.pt").unlink()
    return out


def test_checkpoint_of_another_format_version_or_geometry_is_refused(reference_runs, smoke_dataset, tmp_path,
                                                                      capsys):
    ref = reference_runs["sequential"]
    out = _edited_run(ref, tmp_path / "v", lambda ck: ck.update(format_version=999))
    before = (out / "checkpoint.pt").read_bytes()
    err = _refused_resume(ref, smoke_dataset, out, capsys)
    assert "format version 999" in err and "reads version 1" in err, err
    assert (out / "checkpoint.pt").read_bytes() == before  # refused, not overwritten

    def other_geometry(ck):
        ck["configs"]["data"]["geometry"]["scanner"]["crystals_per_side"] = 7
        ck["configs"]["projector"]["grid"]["voxel_size_mm"] = [2.0, 8.0, 8.0]

    out = _edited_run(ref, tmp_path / "g", other_geometry)
    err = _refused_resume(ref, smoke_dataset, out, capsys)
    assert "data.geometry.scanner.crystals_per_side: checkpoint 7, now 6" in err, err
    assert "projector.grid.voxel_size_mm: checkpoint [2.0, 8.0, 8.0], now [2.0, 7.0, 7.0]" in err, err


def test_model_file_of_another_format_version_is_refused(reference_runs, tmp_path):
    from fbsemlib.errors import UserError
    from fbsemlib.training import load_trained

    out = tmp_path / "m"
    shutil.copytree(reference_runs["end-to-end"]["out"], out)
    m = load_checkpoint(out / "model.pt")
    m["format_version"] = 0
    torch.save(m, out / "model.pt")
    with pytest.raises(UserError, match=r"format version 0.*reads version 1"):
        load_trained(out)


def test_dataset_of_another_geometry_or_version_is_refused(reference_runs, smoke_dataset, sim_config, tmp_path,
                                                           capsys):
    ref = reference_runs["sequential"]
    # resuming the smoke run on data of another geometry (24 x 24 images, 9 mm voxels)
    other = tmp_path / "other"
    assert main(["simulate", "--config", str(sim_config), "--out", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    out = _edited_run(ref, tmp_path / "r", lambda ck: None)
    err = _refused_resume(ref, other, out, capsys)
    assert "cannot resume" in err and "data.grid" in err and "voxel_size_mm" in err, err
    # a dataset whose manifest says another format version or geometry
    bad = tmp_path / "bad"
    shutil.copytree(smoke_dataset, bad)
    mp = bad / "manifest.json"
    m = json.loads(mp.read_text())
    m["geometry"]["scanner"]["crystals_per_side"] = 7
    mp.write_text(json.dumps(m))
    err = _refused_resume(ref, bad, out, capsys)
    assert "crystals_per_side: dataset 6 vs expected 7" in err, err
    m["format_version"] = 999
    mp.write_text(json.dumps(m))
    assert "version 999" in _refused_resume(ref, bad, out, capsys)


# ----------------------------------------------------------------------------------------
# (d) NaN / Inf during training
# ----------------------------------------------------------------------------------------
def _checkpoint_spy(monkeypatch, on_save=None) -> list[bytes]:
    """Record the bytes of every checkpoint.pt written by the trainer."""
    import fbsemlib.training.base as tr

    saved: list[bytes] = []
    real = tr.atomic_torch_save

    def spy(obj, path):
        out = real(obj, path)
        if Path(path).name == "checkpoint.pt":
            saved.append(Path(path).read_bytes())
            if on_save is not None:
                on_save(len(saved))
        return out

    monkeypatch.setattr(tr, "atomic_torch_save", spy)
    return saved


def test_inf_gamma_stops_cli_training_and_keeps_the_last_good_checkpoint(smoke_dataset, tmp_path, monkeypatch,
                                                                          capsys):
    from fbsemlib.models.fbsem import FBSEMNet

    poisoned = {"on": False}
    real_gamma = FBSEMNet.gamma

    def gamma(self, k):
        g = real_gamma(self, k)
        return g * float("inf") if poisoned["on"] else g

    monkeypatch.setattr(FBSEMNet, "gamma", gamma)
    saved = _checkpoint_spy(monkeypatch, on_save=lambda n: poisoned.update(on=True))  # after the epoch-1 checkpoint
    out = tmp_path / "run"
    rc = main(["train", "--config", str(_config(tmp_path)), "--data", str(smoke_dataset), "--out", str(out), "--mode",
               "end-to-end", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "epoch 2, step 3: the loss is" in err and "training stopped" in err and "last good checkpoint" in err, err
    assert len(saved) == 1 and (out / "checkpoint.pt").read_bytes() == saved[0]
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["counters"]["epoch"] == 1 and all(bool(torch.isfinite(v).all()) for v in ck["model_state"].values())
    assert not (out / "model.pt").exists()


def test_inf_in_cached_inputs_stops_sequential_training(smoke_dataset, tmp_path, monkeypatch):
    from fbsemlib.data import PETDataset
    from fbsemlib.training import SequentialTrainer, TrainingDiverged, parse_model_section

    saved = _checkpoint_spy(monkeypatch)
    d = yaml.safe_load(_config(tmp_path).read_text())
    model_cfg, its, _ = parse_model_section(d["model"])
    train = PETDataset(smoke_dataset, "train", checksums=False)
    val = PETDataset(smoke_dataset, "validation", checksums=False)
    from fbsemlib.models.fbsem import FBSEMNet

    torch.manual_seed(0)
    net = FBSEMNet(train.make_projector("cpu"), its, train.num_subsets, model_cfg)
    trainer = SequentialTrainer(net, train, val, {k: v for k, v in d["train"].items() if k != "mode"}, tmp_path / "s",
                                progress=False)

    def corrupt(event, rec):  # stage 2, after its first checkpoint: one cached input becomes Inf
        if event == "checkpoint" and rec["stage"] == 1 and rec["epoch"] == 1:
            c = trainer._caches["train"].x
            c.set(torch.tensor([0, 1, 2, 3]), torch.full((4,) + c.shape, float("inf")))

    trainer.callbacks.append(corrupt)
    with pytest.raises(TrainingDiverged, match=r"module 2, epoch 2, step \d+: the loss is (nan|inf)"):
        trainer.fit()
    assert saved and (tmp_path / "s" / "checkpoint.pt").read_bytes() == saved[-1]
    ck = load_checkpoint(tmp_path / "s" / "checkpoint.pt")
    assert ck["counters"] == {"stage": 1, "epoch": 1, "global_step": ck["counters"]["global_step"]}
    assert not (tmp_path / "s" / "model.pt").exists()


# ----------------------------------------------------------------------------------------
# (e) a full disk (a small tmpfs; issue 13, class 4): one error line, no crash, nothing that
#     existed is lost, no partial output
# ----------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A mounted tmpfs; ``fill()`` takes every free byte (a file ``filler``)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size: str) -> Path:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
        return mnt

    yield mount
    subprocess.run(["umount", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    try:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    except OSError:  # already full
        return
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "fbsemlib", *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=600)


def _one_error_line(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])  # not 139 (a crash) nor 1 (a traceback)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and match.lower() in lines[-1].lower(), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr


def test_full_disk_during_simulate_is_one_error_and_keeps_the_previous_dataset(smoke_dataset, small_disk):
    size = sum(p.stat().st_size for p in smoke_dataset.iterdir())
    disk = small_disk(f"{size + 128 * 1024}")
    (disk / "notes.txt").write_text("precious")
    shutil.copytree(smoke_dataset, disk / "ds")
    before = _tree(disk / "ds")
    argv = ["simulate", "--config", REPO / "data" / "smoke.yaml", "--out", disk / "ds", "--seed", "5", "--overwrite",
            "--no-progress"]
    r = _cli(argv)  # the disk fills while the subject files of the new recipe are written
    _one_error_line(r, "no space left")
    assert _tree(disk / "ds") == before and (disk / "notes.txt").read_text() == "precious"
    validate_dataset(disk / "ds")
    assert not [p for tmp in disk.glob("ds.tmp-*") for p in tmp.iterdir() if ".tmp-" in p.name]  # no partial file
    _fill(disk)  # and with no byte free at all
    _one_error_line(_cli(argv), "no space left")
    assert _tree(disk / "ds") == before
    validate_dataset(disk / "ds")


def test_full_disk_during_reconstruct_leaves_no_partial_file_and_the_old_one_intact(smoke_dataset, small_disk,
                                                                                    tmp_path):
    import h5py

    from fbsemlib.data import PETDataset

    model = tmp_path / "model"
    assert main(["train", "--config", str(REPO / "data" / "smoke.yaml"), "--data", str(smoke_dataset), "--out",
                 str(model), "--mode", "sequential", "--no-progress"]) == 0
    item = PETDataset(smoke_dataset, "test")[0]
    scan = tmp_path / "scan.h5"
    with h5py.File(scan, "w") as h:
        for k in ("y", "multiplicative", "additive", "mr"):
            h[k] = item[k].numpy()
    disk = small_disk("64k")
    (disk / "x.npy").write_bytes(b"an earlier result")
    _fill(disk)
    listing = sorted(p.name for p in disk.iterdir())
    for out, extra in ((disk / "y.npy", []), (disk / "x.npy", ["--overwrite"])):
        r = _cli(["reconstruct", "--model", model, "--sinogram", scan, "--out", out, *extra])
        _one_error_line(r, "no space left")
        assert sorted(p.name for p in disk.iterdir()) == listing  # no partial .npy, no temporary file
    assert (disk / "x.npy").read_bytes() == b"an earlier result"
    # evaluate: refused before the work (the folder cannot take the results)
    t0 = time.monotonic()
    r = _cli(["evaluate", "--model", model, "--data", smoke_dataset, "--out", disk / "ev"])
    _one_error_line(r, "no space left")
    assert time.monotonic() - t0 < 60
