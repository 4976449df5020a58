"""Nothing lost: the output-folder rule, the writer lock and immutable finished artefacts
(issue 13, class 1). Every case asserts the exit status, the message, and that what
existed before is byte-for-byte intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fbsemlib.cli import main
from fbsemlib.data import PETDataset
from fbsemlib.errors import UserError
from fbsemlib.outputs import FolderLock, check_output_folder

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "data" / "smoke.yaml")


def digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's names and contents."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != ".lock":
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# ----------------------------------------------------------------------------------------
# the rule itself
# ----------------------------------------------------------------------------------------
def test_check_output_folder_states(tmp_path):
    assert check_output_folder(tmp_path / "new", "dataset", ("manifest.json",)) == "new"
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", "dataset", ("manifest.json",)) == "empty"
    own = tmp_path / "own"
    own.mkdir()
    (own / "manifest.json").write_text("{}")
    (own / ".lock").write_text("1\n")
    (own / ".manifest.json.tmp-abc").write_text("")
    assert check_output_folder(own, "dataset", ("manifest.json",)) == "own"
    (own / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"not a dataset \(it holds 'notes.txt'\)"):
        check_output_folder(own, "dataset", ("manifest.json",))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        check_output_folder(f, "dataset", ())


_HOLD = ("import sys, time; from fbsemlib.outputs import FolderLock; FolderLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)")


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_names_the_owner_and_a_killed_owner_leaves_no_stale_lock(tmp_path):
    p = _holder(tmp_path / "run")
    try:
        with pytest.raises(UserError, match=rf"in use by another process \(pid {p.pid}\)"):
            FolderLock(tmp_path / "run", "training folder").acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with FolderLock(tmp_path / "run"):  # the kernel released the killed owner's lock
        assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------------------
# simulate
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_simulate_never_replaces_a_folder_that_only_looks_like_a_dataset(tmp_path, capsys, overwrite):
    out = tmp_path / "project"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my web app", "version": 3}))
    before = digest(out)
    rc, err = run_cli(["simulate", "--config", SMOKE, "--out", out, "--no-progress"]
                      + (["--overwrite"] if overwrite else []), capsys)
    assert rc == 2
    assert "is not an fbsemlib dataset" in err and "--overwrite included" in err
    assert digest(out) == before


def test_simulate_refuses_a_folder_of_other_files_without_recommending_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    rc, err = run_cli(["simulate", "--config", SMOKE, "--out", out, "--overwrite"], capsys)
    assert rc == 2 and "'thesis.tex'" in err and "use --overwrite" not in err
    assert (out / "thesis.tex").read_text() == "precious"


# ----------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------
def _train_argv(data, out, *extra):
    return ["train", "--config", SMOKE, "--data", data, "--out", out, "--mode", "sequential", "--no-progress", *extra]


def test_resume_of_a_finished_model_without_checkpoint_is_refused(smoke_model, smoke_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_model, run)
    (run / "checkpoint.pt").unlink()
    before = digest(run)
    rc, err = run_cli(_train_argv(smoke_dataset, run, "--resume"), capsys)
    assert rc == 2
    assert "finished model (model.pt) but no checkpoint.pt" in err
    assert digest(run) == before


def test_train_refuses_a_folder_of_unrelated_files(smoke_dataset, tmp_path, capsys):
    out = tmp_path / "docs"
    out.mkdir()
    (out / "notes.md").write_text("precious")
    (out / "config.yaml").write_text("mine: 1\n")
    before = digest(out)
    rc, err = run_cli(_train_argv(smoke_dataset, out), capsys)
    assert rc == 2 and "is not a training run (it holds 'notes.md')" in err
    assert digest(out) == before


def test_train_into_a_folder_locked_by_another_process_is_refused(smoke_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        rc, err = run_cli(_train_argv(smoke_dataset, out), capsys)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert rc == 2 and f"in use by another process (pid {p.pid})" in err
    assert sorted(x.name for x in out.iterdir()) == [".lock"]


def test_two_concurrent_trainers_on_one_folder_one_wins_one_is_refused(smoke_dataset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fbsemlib", *map(str, _train_argv(smoke_dataset, out))]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.05)
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in loser
    assert "in use by another process" in loser or "already holds a training run" in loser
    # one run's files, whole: the log has one header and the model loads
    assert (out / "log_stages.csv").read_text().count("mode,stage") == 1
    from fbsemlib.training import load_trained

    load_trained(out)


# ----------------------------------------------------------------------------------------
# evaluate / reconstruct
# ----------------------------------------------------------------------------------------
def _scan(smoke_dataset, path: Path) -> Path:
    item = PETDataset(smoke_dataset, "test")[0]
    with h5py.File(path, "w") as h:
        for k in ("y", "multiplicative", "additive", "mr"):
            h[k] = item[k].numpy()
    return path


def test_reconstruct_never_overwrites_its_output_unless_asked(smoke_model, smoke_dataset, tmp_path, capsys):
    scan = _scan(smoke_dataset, tmp_path / "scan.h5")
    default = tmp_path / "scan_fbsem.npy"
    default.write_bytes(b"an earlier result")
    rc, err = run_cli(["reconstruct", "--model", smoke_model, "--sinogram", scan], capsys)
    assert rc == 2 and "exists: refusing to overwrite it (give --overwrite" in err
    assert default.read_bytes() == b"an earlier result"
    rc, err = run_cli(["reconstruct", "--model", smoke_model, "--sinogram", scan, "--overwrite"], capsys)
    assert rc == 0
    assert np.isfinite(np.load(default)).all()


def test_evaluate_refuses_an_unrelated_out_folder_before_any_work(smoke_model, smoke_dataset, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    t0 = time.monotonic()
    rc, err = run_cli(["evaluate", "--model", smoke_model, "--data", smoke_dataset, "--out", out], capsys)
    assert rc == 2 and "'holiday.jpg'" in err
    assert time.monotonic() - t0 < 30
    assert sorted(x.name for x in out.iterdir()) == ["holiday.jpg"]


# ----------------------------------------------------------------------------------------
# issue 13, class 7: files get the user's umask (collaborators can read a shared run)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_files_follow_the_umask(tmp_path, mask):
    from fbsemlib.outputs import atomic_write_json

    old = os.umask(mask)
    try:
        p = atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    assert json.loads(p.read_text()) == {"x": 1}


def test_run_and_dataset_files_are_readable_as_the_umask_allows(smoke_model, smoke_dataset):
    from fbsemlib.outputs import umask

    want = 0o666 & ~umask()
    for folder in (smoke_model, smoke_dataset):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
        assert modes and set(modes.values()) == {oct(want)}, modes


def test_a_read_only_file_system_is_one_error_line_and_changes_nothing(smoke_model, smoke_dataset, tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "x.npy").write_bytes(b"an earlier result")
        shutil.copytree(smoke_model, mnt / "run")
        before = digest(mnt)
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode == 0
        scan = _scan(smoke_dataset, tmp_path / "scan.h5")
        for argv in (["reconstruct", "--model", smoke_model, "--sinogram", scan, "--out", mnt / "x.npy", "--overwrite"],
                     ["evaluate", "--model", smoke_model, "--data", smoke_dataset, "--out", mnt / "run"],
                     ["simulate", "--config", SMOKE, "--out", mnt / "ds", "--no-progress"],
                     _train_argv(smoke_dataset, mnt / "run2")):
            rc, err = run_cli(argv, capsys)
            assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
            assert "read-only file system" in err.lower() or "is not writable" in err, (argv, err)
        assert digest(mnt) == before
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_evaluate_never_replaces_an_evaluation_unless_asked(smoke_model, smoke_dataset, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "evaluation.json").write_text('{"an": "earlier evaluation"}')
    t0 = time.monotonic()
    rc, err = run_cli(["evaluate", "--model", smoke_model, "--data", smoke_dataset, "--out", out], capsys)
    assert rc == 2 and "already holds evaluation.json: refusing to overwrite (give --overwrite" in err
    assert time.monotonic() - t0 < 30  # refused before the work
    assert (out / "evaluation.json").read_text() == '{"an": "earlier evaluation"}'


def test_a_second_simulate_of_the_same_dataset_is_refused_while_the_first_runs(tmp_path, capsys):
    from fbsemlib.data import load_data_config, recipe_hash

    out = tmp_path / "ds"
    tmp = tmp_path / f"ds.tmp-{recipe_hash(load_data_config(SMOKE))[:12]}"
    p = _holder(tmp)  # what a running simulation holds
    try:
        rc, err = run_cli(["simulate", "--config", SMOKE, "--out", out, "--no-progress"], capsys)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert rc == 2 and f"in use by another process (pid {p.pid})" in err
    assert not out.exists() and sorted(x.name for x in tmp.iterdir()) == [".lock"]
    rc, err = run_cli(["simulate", "--config", SMOKE, "--out", out, "--no-progress"], capsys)  # the owner was killed
    assert rc == 0 and not tmp.exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("exc", [MemoryError(), __import__("torch").OutOfMemoryError("CUDA out of memory. Tried 9 GiB")])
def test_running_out_of_memory_is_one_error_line(exc, smoke_dataset, tmp_path, capsys, monkeypatch):
    import fbsemlib.cli.train as cli_train

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(cli_train, "make_trainer", boom)
    rc, err = run_cli(_train_argv(smoke_dataset, tmp_path / "run"), capsys)
    assert rc == 2 and err.startswith("error: out of memory: reduce the sizes") and err.count("\n") == 1, err
