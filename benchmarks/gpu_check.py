"""The device check of a CUDA machine (issue 16), run by ``benchmarks/gpu_check.sh``.

In one go, in under 10 minutes on one GPU: the CUDA tests (``pytest -m cuda``), the
projector and memory benchmarks on CUDA (``benchmarks/projector.py``, ``benchmarks/memory.py``;
the memory one includes the paper-sized 3D curve: end-to-end / checkpointed / sequential
peak memory against K up to what fits), ``fbsem plan`` on the paper profile, and the first
stages of a cut paper profile (simulate, both trainings, evaluate) timed against the
forecast ``fbsem plan`` makes for the same configuration. Every part runs in its own process
with a time limit; ``<out>/gpu_check.json`` holds the machine (torch, CUDA, GPU, memory,
driver) and per part ``status`` (``ran`` | ``failed`` | ``skipped``), the ``reason`` of a
skip or failure, seconds, files and results. It is rewritten after every part, so an
interrupted check keeps what it measured. Without CUDA every CUDA part is skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check"
#: seconds each part may take at most (full, quick); the total is also bounded by --budget-s
LIMITS = {"pytest_cuda": (120, 60), "projector": (120, 60), "memory": (150, 60), "plan_paper": (60, 60),
          "paper_first_stages": (240, 150)}
#: the cut paper profile of the first stages: full K = 60 and the paper's CNN and training
#: settings; three subjects, one epoch (quick: one iteration, K = 6)
FIRST_STAGES = {"data.num_subjects": 3, "data.split": {"train": 1, "validation": 1, "test": 1},
                "data.slices_per_subject": 2, "train.epochs": 1, "train.epochs_per_module": 1}
FIRST_STAGES_QUICK = {**FIRST_STAGES, "data.slices_per_subject": 1, "data.rotations_per_slice": 1,
                      "data.num_iterations": 1, "data.reference_iterations": 2}
#: forecast / measured within this factor counts as agreeing
AGREEMENT_FACTOR = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default benchmarks/results/gpu_check)")
    p.add_argument("--quick", action="store_true", help="tiny benchmark sizes and a smaller paper cut (a smoke test)")
    p.add_argument("--skip-pytest", action="store_true", help="do not run pytest -m cuda")
    p.add_argument("--budget-s", type=float, default=570.0, help="total seconds for all parts (default 570)")
    args = p.parse_args(argv)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    return args


def machine() -> dict:
    """Versions, CPU, memory, and the GPU (name, memory, driver) when CUDA is available."""
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        from fbsemlib import __version__

        info["fbsemlib"] = __version__
    except ImportError:  # pragma: no cover
        info["fbsemlib"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), gpu_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}")
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        info["driver"] = r.stdout.split(",")[0].strip() if r.returncode == 0 and r.stdout else None
    return info


class Check:
    """The parts, their results and the JSON file."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.doc = {"check": "gpu_check", "args": {k: v for k, v in vars(args).items()}, "machine": machine(),
                    "parts": {}}
        self.cuda = bool(self.doc["machine"]["cuda"])
        self.write()

    def write(self) -> Path:
        from fbsemlib.outputs import atomic_write_json

        self.doc["total_s"] = time.perf_counter() - self.t0
        return atomic_write_json(self.out / "gpu_check.json", self.doc)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def limit(self, name: str) -> float:
        return min(LIMITS[name][1 if self.args.quick else 0], self.left_s())

    def record(self, name: str, **result) -> dict:
        self.doc["parts"][name] = result
        self.write()
        print(f"== {name}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else ""),
              flush=True)
        return result

    def skip(self, name: str, reason: str) -> dict:
        return self.record(name, status="skipped", reason=reason)

    def run(self, name: str, cmd: list[str], env: dict | None = None, limit: float | None = None) -> dict:
        """Run ``cmd`` in its own process within the part's time limit; returns (and records
        nothing) ``{status, reason, seconds, rc, output_tail}``."""
        limit = self.limit(name) if limit is None else limit
        if limit < 5:
            return {"status": "skipped", "reason": "no time left in --budget-s"}
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                               timeout=limit)
            out, rc = r.stdout + r.stderr, r.returncode
            status = "ran" if rc == 0 else "failed"
            reason = None if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, status, reason = None, "failed", f"timed out after {limit:.0f} s"
        return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - t, 2), "rc": rc,
                "command": " ".join(cmd), "output_tail": out[-3000:]}


def part_pytest(c: Check) -> None:
    if c.args.skip_pytest:
        c.skip("pytest_cuda", "--skip-pytest")
    elif not c.cuda:
        c.skip("pytest_cuda", "CUDA not available")
    else:
        c.record("pytest_cuda", **c.run("pytest_cuda", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests"]))


def part_benchmarks(c: Check) -> None:
    for name in ("projector", "memory"):
        if not c.cuda:
            c.skip(name, "CUDA not available")
            continue
        cmd = [sys.executable, f"benchmarks/{name}.py", "--device", "cuda", "--out", str(c.out)]
        res = c.run(name, cmd + (["--quick"] if c.args.quick else []))
        path = c.out / f"{name}{'_quick' if c.args.quick else ''}.json"
        if path.exists():
            doc = json.loads(path.read_text())
            res.update(file=str(path), targets=doc.get("targets"), cuda_rows=[r for r in doc.get("rows", [])
                                                                           if r.get("device") == "cuda"])
        c.record(name, **res)


def _plan(c: Check, name: str, config: Path, limit: float | None = None) -> tuple[dict, dict | None]:
    res = c.run(name, [sys.executable, "-m", "fbsemlib", "plan", "--config", str(config), "--device", "cuda",
                       "--json", "--repeats", "2"], env={"FBSEM_SIMULATE_DEVICE": "cuda"}, limit=limit)
    plan = None
    if res["status"] == "ran":
        text = res.pop("output_tail")
        plan = json.loads(text[text.index("{"):]) if "{" in text else None
    return res, plan


def part_plan_paper(c: Check) -> None:
    if not c.cuda:
        c.skip("plan_paper", "CUDA not available")
        return
    res, plan = _plan(c, "plan_paper", ROOT / "data" / "paper.yaml")
    if plan is not None:
        from fbsemlib.outputs import atomic_write_json

        res["file"] = str(atomic_write_json(c.out / "plan_paper.json", plan))
        res["forecast"] = {r["stage"]: {k: r[k] for k in ("wall_s", "peak_device_bytes", "host_bytes", "disk_bytes")}
                           for r in plan["rows"]}
    c.record("plan_paper", **res)


def part_first_stages(c: Check) -> None:
    """A cut paper profile: its forecast, then its stages timed, each in a new process."""
    if not c.cuda:
        c.skip("paper_first_stages", "CUDA not available")
        return
    from fbsemlib.config import load_experiment, override_sections
    from fbsemlib.evaluation.forecast import write_experiment

    work = c.out / "paper_first_stages"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cut = FIRST_STAGES_QUICK if c.args.quick else FIRST_STAGES
    paper = load_experiment(ROOT / "data" / "paper.yaml")
    cfg = write_experiment(work / "paper_cut.yaml", override_sections(paper, cut))
    deadline = time.perf_counter() + c.limit("paper_first_stages")
    res, plan = _plan(c, "paper_first_stages", cfg, limit=deadline - time.perf_counter())
    result = {"status": "ran", "config": str(cfg), "overrides": cut, "plan": res, "stages": {}}
    if plan is None:
        result.update(status="failed", reason=f"fbsem plan: {res.get('reason')}")
        c.record("paper_first_stages", **result)
        return
    forecast = {r["stage"]: r for r in plan["rows"]}
    fb = [sys.executable, "-m", "fbsemlib"]
    data = str(work / "data")
    stages = [("simulate", fb + ["simulate", "--config", str(cfg), "--out", data, "--no-progress"]),
              ("train sequential", fb + ["train", "--config", str(cfg), "--data", data, "--out", str(work / "seq"),
                                         "--mode", "sequential", "--device", "cuda", "--no-progress"]),
              ("train end-to-end", fb + ["train", "--config", str(cfg), "--data", data, "--out", str(work / "e2e"),
                                         "--mode", "end-to-end", "--device", "cuda", "--no-progress"]),
              ("evaluate", fb + ["evaluate", "--model", str(work / "seq"), "--data", data, "--device", "cuda"])]
    for stage, cmd in stages:
        r = c.run("paper_first_stages", cmd, env={"FBSEM_SIMULATE_DEVICE": "cuda"},
                  limit=deadline - time.perf_counter())
        f = forecast.get(stage, {})
        r["forecast_s"] = f.get("wall_s")
        if r["status"] == "ran" and f.get("wall_s"):
            r["forecast_over_measured"] = f["wall_s"] / r["seconds"]
            r["agrees_within_factor"] = 1 / AGREEMENT_FACTOR <= r["forecast_over_measured"] <= AGREEMENT_FACTOR
        metrics = work / {"train sequential": "seq", "train end-to-end": "e2e"}.get(stage, "-") / "metrics.json"
        if metrics.exists():
            m = json.loads(metrics.read_text())
            r.update(train_time_s=m.get("train_time_s"), peak_memory_mb=m.get("peak_memory_mb"),
                     forecast_peak_device_bytes=f.get("peak_device_bytes"))
        result["stages"][stage] = r
        if r["status"] != "ran":
            result.update(status="failed", reason=f"{stage}: {r['reason']}")
            break
        c.record("paper_first_stages", **result)
    c.record("paper_first_stages", **result)


def main(argv=None) -> int:
    args = parse_args(argv)
    c = Check(args)
    m = c.doc["machine"]
    print(f"gpu_check: torch {m['torch']}, CUDA {'available: ' + str(m.get('gpu')) if c.cuda else 'not available'}; "
          f"results in {c.out}", flush=True)
    for part in (part_pytest, part_benchmarks, part_plan_paper, part_first_stages):
        part(c)
    path = c.write()
    failed = [n for n, p in c.doc["parts"].items() if p["status"] == "failed"]
    print(f"wrote {path} ({c.doc['total_s']:.0f} s); "
          + (f"failed: {', '.join(failed)}" if failed else "no failures"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
