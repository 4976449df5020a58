"""Distributed training (``torchrun``, gloo on the CPU, 2 processes).

* a 2-process run with per-rank batch 1 gives the weights of a 1-process run with batch 2
  (end-to-end and sequential), records the world size, and only rank 0 writes files (an
  audit hook installed through ``sitecustomize`` logs every file each rank opens for
  writing);
* a worker that dies or hangs mid-training makes the survivors stop with a message naming
  it, within a bounded time (no hang);
* the pure sharding helpers (global batches, uneven last batch).

Runs take a few seconds each: the smoke data, K = 4 modules, ``batch_norm: false`` (BatchNorm
statistics are per rank, see :mod:`fbsemlib.training.distributed`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fbsemlib.training.distributed import EXIT_WORKER_LOST, Share, shard, shard_batches

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

# installed in every process of a run through PYTHONPATH: records, per rank, the paths under
# FBSEM_AUDIT_ROOT that the process opens for writing, renames, removes or creates
AUDIT = r'''
import os, sys
_root = os.environ.get("FBSEM_AUDIT_ROOT")
_rank = os.environ.get("RANK")
if _root and _rank is not None:
    import atexit
    _seen, _busy = [], [False]
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if _busy[0] or event not in ("open", "os.rename", "os.replace", "os.remove", "os.mkdir", "shutil.rmtree"):
            return
        path = args[0]
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, str) or not os.path.abspath(path).startswith(_root):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _W)
            if not writing:
                return
        _seen.append(f"{event} {path}")

    def _dump():
        _busy[0] = True
        with open(os.path.join(os.environ["FBSEM_AUDIT_OUT"], f"rank-{_rank}.json"), "w") as f:
            f.write(__import__("json").dumps(_seen))

    atexit.register(_dump)
    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, batch_size: int, name: str) -> Path:
    d = yaml.safe_load((REPO / "data" / "smoke.yaml").read_text())
    d["model"].update(batch_norm=False, num_iterations=1, width=4)  # K = 4 modules, no BatchNorm
    d["train"].update(batch_size=batch_size, epochs=2, epochs_per_module=1, seed=3)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FBSEM_TEST_FAULT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train_args(cfg: Path, data: Path, out: Path, mode: str) -> list[str]:
    return ["-m", "fbsemlib", "train", "--config", str(cfg), "--data", str(data), "--out", str(out), "--mode", mode,
            "--no-progress"]


def _state(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("mode", ["sequential", "end-to-end"])
def test_two_processes_equal_one_process_with_the_global_batch(smoke_dataset, tmp_path, mode):
    ref_out, dist_out = tmp_path / "one", tmp_path / "two"
    # one process, batch 2
    r = subprocess.run([PY] + _train_args(_config(tmp_path, 2, "one.yaml"), smoke_dataset, ref_out, mode),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # two processes, batch 1 each, every file write audited
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    audit = tmp_path / "audit"
    audit.mkdir()
    env = _env(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), FBSEM_AUDIT_ROOT=str(tmp_path),
               FBSEM_AUDIT_OUT=str(audit))
    cmd = [TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] + \
        _train_args(_config(tmp_path, 1, "two.yaml"), smoke_dataset, dist_out, mode)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert r.stdout.count("training of K = 4 modules done") == 1  # rank 0 reports

    a, b = _state(ref_out), _state(dist_out)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], rtol=1e-4, atol=1e-6), k
    assert b["configs"]["distributed"] == {"world_size": 2, "global_batch_size": 2}
    assert "distributed" not in a["configs"]
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (ref_out, dist_out))
    assert ma["steps"] == mb["steps"] > 0
    assert mb["val_eval"]["nrmse_reference"] == pytest.approx(ma["val_eval"]["nrmse_reference"], rel=1e-3)
    # only rank 0 wrote files
    w0 = json.loads((audit / "rank-0.json").read_text())
    w1 = json.loads((audit / "rank-1.json").read_text())
    assert w1 == [], w1
    assert any("model.pt" in p for p in w0) and any("checkpoint.pt" in p for p in w0), w0
    assert sorted(p.name for p in dist_out.iterdir()) == sorted(p.name for p in ref_out.iterdir())


def _plain_launch(args: list[str], fault: str, timeout_s: int) -> tuple[list[subprocess.Popen], float]:
    """Two workers started like torchrun's (same variables) but without its agent, so the
    survivor must notice the failure itself."""
    port = _free_port()
    procs = []
    t0 = time.monotonic()
    for r in (0, 1):
        env = _env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   FBSEM_TEST_FAULT=fault, FBSEM_DIST_TIMEOUT_S=timeout_s)
        procs.append(subprocess.Popen([PY] + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs, t0


def test_dead_worker_stops_the_survivor_with_a_message(smoke_dataset, tmp_path):
    args = _train_args(_config(tmp_path, 1, "c.yaml"), smoke_dataset, tmp_path / "out", "end-to-end")
    procs, t0 = _plain_launch(args, "exit:1:3", 60)
    try:
        out0, err0 = procs[0].communicate(timeout=120)
        procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 1
    assert procs[0].returncode == EXIT_WORKER_LOST, err0[-3000:]
    assert time.monotonic() - t0 < 60  # well before the 60 s timeout: gloo reports the dead peer
    assert "rank 0 of 2: lost contact" in err0 and "rank 1 (pid" in err0 and "has died" in err0, err0[-3000:]
    # the last good checkpoint (written by rank 0 after epoch 1) is intact; nothing else
    out = tmp_path / "out"
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


def test_hung_worker_times_out_under_torchrun(smoke_dataset, tmp_path):
    args = _train_args(_config(tmp_path, 1, "c.yaml"), smoke_dataset, tmp_path / "out", "sequential")
    cmd = [TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] + args
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=_env(FBSEM_TEST_FAULT="hang:1:2", FBSEM_DIST_TIMEOUT_S=15), capture_output=True,
                       text=True, timeout=240)
    elapsed = time.monotonic() - t0
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert "rank 1 hangs at step 2" in text
    assert "rank 0 of 2: lost contact with the other training processes" in text, text[-4000:]
    assert "15 s timeout" in text
    assert elapsed < 200


# ----------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------
def test_shard_batches_cover_the_global_batches():
    order = [7, 3, 9, 0, 4, 1, 8, 2, 6, 5]
    for w in (1, 2, 3, 4):
        for b in (1, 2, 3):
            parts = [shard_batches(order, b, r, w) for r in range(w)]
            B = w * b
            glob = [order[i:i + B] for i in range(0, len(order), B)]
            assert all(len(p) == len(glob) for p in parts)  # every rank takes part in every step
            for j, g in enumerate(glob):
                real = [parts[r][j] for r in range(w)]
                got = sorted(i for s in real if s.count for i in s.indices)
                assert got == sorted(g) and sum(s.count for s in real) == len(g)
                assert sum(s.weight for s in real) == pytest.approx(1.0)
                for s in real:
                    assert s.total == len(g) and len(s.indices) >= 1 and s.count <= b
                    if s.count == 0:  # a stand-in item of the batch, weighted 0
                        assert s.indices[0] in g and s.weight == 0
    assert shard_batches(order, 4, 0, 1) == [Share(order[0:4], 4, 4), Share(order[4:8], 4, 4), Share(order[8:], 2, 2)]
    assert shard(range(5), 1, 2) == [1, 3] and shard(range(5), 0, 1) == list(range(5))
