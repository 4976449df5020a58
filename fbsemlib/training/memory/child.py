"""The peak RSS of one training step, measured in a fresh Python process
(``subprocess_rss=True``, CPU).

The child builds the same problem, runs one warm-up step (lazy initialisation: kernels,
thread pools), ``gc``, ``malloc_trim``, resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), records its RSS, runs the step and reports the high-water mark
(``VmHWM``) minus that RSS. ``ru_maxrss`` is the fallback where the reset is not possible;
on Linux ``ru_maxrss`` of a forked + exec'd child starts at the parent's RSS at fork
time, so with a large parent it hides the step. The RSS includes everything (gradients,
temporaries, allocator slack), so it is noisier than the saved-tensor count; the RSS of
the calling process is not used because earlier work pollutes it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from fbsemlib.training.memory.problem import build_problem
from fbsemlib.training.memory.spec import MemorySpec
from fbsemlib.training.memory.step import StepSetup

__all__ = ["fresh_process_rss", "proc_kib", "available_bytes", "main"]


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proc_kib(path: str, field: str) -> int | None:
    """The ``field:`` line of a ``/proc`` file of ``key: value kB`` lines
    (``/proc/meminfo``, ``/proc/self/status``) in bytes, or None where the file or the
    field is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _vm_hwm() -> int | None:
    """This process's RSS high-water mark (``VmHWM``), or None where /proc lacks it."""
    return proc_kib("/proc/self/status", "VmHWM")


def available_bytes() -> int | None:
    """Memory available for new allocations (``MemAvailable``), or None where /proc lacks it."""
    return proc_kib("/proc/meminfo", "MemAvailable")


def main() -> None:  # pragma: no cover - runs in the subprocess
    """Entry point of the RSS subprocess: read ``{"spec", "K", "mode", "threads"}`` JSON
    from stdin, run one step, print ``{"rss_peak_bytes", "rss_before", ...}`` JSON."""
    req = json.loads(sys.stdin.read())
    torch.set_num_threads(int(req.get("threads", 1)))
    spec = MemorySpec(**req["spec"])
    setup = StepSetup(build_problem(spec, torch.device("cpu")), int(req["K"]), req["mode"])
    setup.step(None)  # warm-up: lazy initialisation (kernels, thread pools) is not the step's memory
    setup.net.zero_grad(set_to_none=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
    reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        pass
    rss0 = _current_rss()
    hwm0 = _vm_hwm()
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    setup.step(None)
    max1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm1 = _vm_hwm()
    if reset and hwm1 is not None:
        peak, source = max(0, hwm1 - rss0), "VmHWM"
    else:
        peak, source = max(0, max1 - rss0), "ru_maxrss"
    print(json.dumps({"rss_peak_bytes": peak, "source": source, "rss_before": rss0, "vmhwm_before": hwm0,
                      "vmhwm_after": hwm1, "maxrss_before": max0, "maxrss_after": max1, "hwm_reset": reset}))


def fresh_process_rss(spec: MemorySpec, K: int, mode: str) -> tuple[int | None, str | None]:
    """``(peak RSS of the step in bytes, note)`` measured by :func:`main` in a fresh
    process; ``(None, why)`` when that failed."""
    pkg_parent = str(Path(__file__).resolve().parents[3])  # the folder holding fbsemlib/
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    req = json.dumps({"spec": spec.to_dict(), "K": K, "mode": mode, "threads": torch.get_num_threads()})
    cmd = [sys.executable, "-c", "from fbsemlib.training.memory.child import main; main()"]
    try:
        res = subprocess.run(cmd, input=req, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"rss subprocess failed: {e}"
    if res.returncode != 0:
        tail = (res.stderr or "").strip().splitlines()[-1:] or ["?"]
        return None, f"rss subprocess failed (exit {res.returncode}): {tail[0]}"
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, "rss subprocess printed no result"
    note = None
    if out.get("source") != "VmHWM" and out["maxrss_after"] <= out["maxrss_before"]:
        note = "the RSS high-water mark could not be reset and the step did not raise it: value is a lower bound"
    return int(out["rss_peak_bytes"]), note
