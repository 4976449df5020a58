"""``benchmarks/gpu_check.sh`` (issue 16) on a machine without CUDA: bad arguments give the
usage and exit status 2; a run writes ``gpu_check.json`` with the machine info and every CUDA
part skipped with its reason; a CUDA part that fails is recorded as failed with the reason."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ("pytest_cuda", "projector", "memory", "plan_paper", "paper_first_stages")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA available: the check would run for real")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})


@pytest.mark.parametrize("args", [["--bogus"], ["--budget-s", "0"], ["--budget-s", "soon"], ["--out"]])
def test_bad_arguments_give_the_usage_and_exit_2(args):
    r = _run(*args)
    assert r.returncode == 2, r
    assert r.stderr.startswith("usage: gpu_check.sh") and "error:" in r.stderr


def test_help_exits_0():
    r = _run("--help")
    assert r.returncode == 0 and "--skip-pytest" in r.stdout and "--quick" in r.stdout


@no_cuda
def test_without_cuda_every_cuda_part_is_skipped_saying_so(tmp_path):
    r = _run("--out", str(tmp_path / "gc"), "--quick", "--skip-pytest")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert doc["check"] == "gpu_check" and doc["args"]["quick"] is True and doc["total_s"] > 0
    m = doc["machine"]
    assert m["torch"] == torch.__version__ and m["cuda"] is False and m["fbsemlib"]
    assert list(doc["parts"]) == list(PARTS)
    assert doc["parts"]["pytest_cuda"] == {"status": "skipped", "reason": "--skip-pytest"}
    for name in PARTS[1:]:
        assert doc["parts"][name] == {"status": "skipped", "reason": "CUDA not available"}, name
    assert "projector: skipped (CUDA not available)" in r.stdout


@no_cuda
def test_pytest_part_without_skip_flag_is_skipped_for_want_of_cuda(tmp_path):
    r = _run("--out", str(tmp_path), "--quick")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["parts"]["pytest_cuda"] == {"status": "skipped", "reason": "CUDA not available"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@no_cuda
def test_a_failing_cuda_part_is_recorded_as_failed_with_its_reason(tmp_path):
    gc = _module()
    check = gc.Check(gc.parse_args(["--out", str(tmp_path), "--quick", "--budget-s", "120"]))
    check.cuda = True  # as if: `fbsem plan --device cuda` then fails on this machine
    gc.part_plan_paper(check)
    gc.part_first_stages(check)
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    plan = doc["parts"]["plan_paper"]
    assert plan["status"] == "failed" and plan["reason"] == "exit status 2" and plan["rc"] == 2
    assert "CUDA is not available" in plan["output_tail"]
    first = doc["parts"]["paper_first_stages"]
    assert first["status"] == "failed" and first["reason"] == "fbsem plan: exit status 2"
    assert (tmp_path / "paper_first_stages" / "paper_cut.yaml").is_file()


def test_a_part_without_time_left_is_skipped(tmp_path):
    gc = _module()
    check = gc.Check(gc.parse_args(["--out", str(tmp_path), "--budget-s", "1"]))
    res = check.run("projector", [sys.executable, "-c", "pass"], limit=1)
    assert res == {"status": "skipped", "reason": "no time left in --budget-s"}
