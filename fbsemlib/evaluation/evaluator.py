"""Evaluation of a trained FBSEM-Net against the baselines on a dataset's test split.

:func:`evaluate` reconstructs every test sample with the trained network and with OSEM,
post-filtered OSEM and MAP-EM (quadratic and Bowsher), whose strengths are picked on the
validation split (:mod:`fbsemlib.evaluation.baselines`), and computes per sample, inside the brain
mask and against the true activity:

* NRMSE (%), PSNR (dB), SSIM;
* NRMSE (%) against the last iteration-dependent target ``t_K`` (``nrmse_last_target``:
  how far from what the iteration-dependent targets teach) and the NRMSE of ``t_K``
  itself (``target_floor``: the error that reproducing the targets cannot remove);
* lesion contrast recovery (hot and cold PET lesions, mean over lesions; background = a
  2-voxel ring around each lesion inside the brain);
* background variability (%) in white matter (voxels whose true activity is within 5 %
  of the white-matter level, lesions excluded);
* bias and standard deviation (%) over the noise realisations of each test image.

``fbsem evaluate --model DIR --data DIR`` writes ``evaluation.json`` (per-sample rows, the
per-method summary and the baseline sweep) and ``evaluation.csv`` (one row per method and
sample) with :func:`write_evaluation`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from fbsemlib.data import PETBatch, PETDataset
from fbsemlib.errors import UserError
from fbsemlib.evaluation import metrics
from fbsemlib.evaluation.baselines import METHODS as BASELINE_METHODS
from fbsemlib.evaluation.baselines import BaselineConfig, reconstruct, sweep
from fbsemlib.training import load_trained
from fbsemlib.outputs import atomic_write_json, atomic_write_text, check_output_folder, ensure_writable
from fbsemlib.training.model_io import RUN_FILES

__all__ = ["evaluate", "lesion_metrics", "white_matter_mask", "summarise", "prepare_evaluation_folder",
           "write_evaluation", "print_summary"]

METRIC_KEYS = ("nrmse", "psnr", "ssim", "crc_hot", "crc_cold", "bv_wm", "nrmse_last_target", "target_floor")


def white_matter_mask(activity: torch.Tensor, brain: torch.Tensor, lesions: torch.Tensor | None = None) -> torch.Tensor:
    """Voxels of ``(..., Z, Y, X)`` images whose true activity is within 5 % of the white
    matter level (the median of the lower half of the brain's activities), lesions excluded."""
    out = torch.zeros_like(brain, dtype=torch.bool)
    for idx in np.ndindex(*activity.shape[:-3]):
        a, b = activity[idx], brain[idx].bool()
        vals = a[b]
        if vals.numel() == 0:
            continue
        low = vals[vals <= vals.mean()]
        level = low.median() if low.numel() else vals.median()
        m = b & ((a - level).abs() <= 0.05 * level)
        if lesions is not None:
            m &= lesions[idx] == 0
        out[idx] = m
    return out


def _ring(mask: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Voxels within ``width`` of ``mask`` (Z, Y, X) but not in it (2D dilation per slice)."""
    k = 2 * width + 1
    m = mask.float()[None]  # (1, Z, Y, X)
    if mask.shape[0] == 1:
        d = F.max_pool2d(m[:, 0][None], k, stride=1, padding=width)[0][:, None]
    else:
        d = F.max_pool3d(m[None], k, stride=1, padding=width)[0]
    return (d[0] > 0) & ~mask


def lesion_metrics(x: torch.Tensor, activity: torch.Tensor, brain: torch.Tensor, labels: torch.Tensor, info) -> dict:
    """Mean contrast recovery of the hot and of the cold PET lesions of one image
    ``(Z, Y, X)``; ``labels`` holds ``i + 1`` for lesion ``i`` of ``info``."""
    out = {"crc_hot": [], "crc_cold": []}
    for i, les in enumerate(info or []):
        if not les.get("in_pet", True):
            continue
        m = labels == (i + 1)
        if int(m.sum()) == 0:
            continue
        bg = _ring(m) & brain.bool() & (labels == 0)
        if int(bg.sum()) == 0:
            continue
        tl, tb = float(activity[m].mean()), float(activity[bg].mean())
        if tb <= 0 or abs(tl / tb - 1) < 1e-3:
            continue
        crc = float(metrics.contrast_recovery(x, m, bg, tl, tb))
        out["crc_hot" if tl > tb else "crc_cold"].append(crc)
    return {k: (float(np.mean(v)) if v else None) for k, v in out.items()}


def summarise(rows: list[dict]) -> dict:
    """Mean and standard deviation of every metric per method."""
    summary: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        s = {}
        for k in METRIC_KEYS:
            vals = [r[k] for r in sel if r.get(k) is not None and math.isfinite(r[k])]
            s[k] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None,
                    "n": len(vals)}
        summary[method] = s
    return summary


@torch.no_grad()
def _fbsem_recon(net, batch: PETBatch, device) -> torch.Tensor:
    net.eval()
    return net(batch.y.to(device), batch.multiplicative.to(device), batch.additive.to(device),
               batch.mr.to(device) if net.config.use_mr else None)


#: test samples reconstructed together by :func:`evaluate` (the results do not depend on it)
EVAL_BATCH_SIZE = 8


def evaluate(model_dir, data_dir, device=None, baseline_config: BaselineConfig | None = None,
             methods=("fbsem",) + BASELINE_METHODS, progress: bool = False, net=None, sweep_result=None,
             batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Evaluate a trained model (folder, or ``net``) and the baselines on the test split of
    ``data_dir``. Returns ``{"rows", "summary", "bias_std", "sweep", "config"}``. A
    precomputed validation ``sweep_result`` skips the baseline sweep. ``batch_size`` test
    samples are reconstructed at once (every method treats the samples of a batch
    independently: the results are those of one sample at a time, to float rounding)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.time()
    test = PETDataset(data_dir, "test")  # validates every file of the dataset, so:
    val = PETDataset(data_dir, "validation", checksums=False)
    P = test.make_projector(device or "cpu")
    if "fbsem" in methods and net is None:
        net, _ = load_trained(model_dir, device=P.device, projector=P)
    if net is not None:
        if net.num_iterations != test.num_iterations or net.num_subsets != test.num_subsets:
            raise UserError(f"the model unrolls {net.num_iterations} x {net.num_subsets} modules but the dataset's "
                            f"schedule is {test.num_iterations} x {test.num_subsets}")
        if tuple(net.projector.out_shape) != tuple(P.out_shape) or tuple(net.projector.in_shape) != tuple(P.in_shape):
            raise UserError("the model's geometry differs from the dataset's")
    cfg = baseline_config or BaselineConfig()
    base = [m for m in methods if m != "fbsem"]
    if sweep_result is not None:
        sw = sweep_result
    else:
        sw = sweep(val, P, cfg, [m for m in base if m != "osem"], progress=progress) if base else None
    best = dict(sw.best) if sw else {}
    best["osem"] = None

    rows: list[dict] = []
    recon_by_method: dict[str, list] = {m: [] for m in methods}
    n, bs = len(test), int(batch_size)
    for start in range(0, n, bs):
        idx = list(range(start, min(start + bs, n)))
        items = [test[i] for i in idx]
        batch = PETBatch.from_mapping(default_collate(items))
        recons = {}
        for method in methods:
            if method == "fbsem":
                recons[method] = _fbsem_recon(net, batch, P.device)
            else:
                recons[method] = reconstruct(method, best.get(method), batch, P, test.num_iterations,
                                             test.num_subsets, cfg.bowsher_neighbours)
        for j, (i, item) in enumerate(zip(idx, items)):
            extra = test.extra(i, ("lesion_mask_pet",))
            labels = extra["lesion_mask_pet"][0]
            info = test.lesion_info(i)
            meta = test.info(i)
            act, brain = item["activity"].to(P.device), item["brain_mask"].to(P.device)
            t_last = item["targets"][-1].to(P.device)
            floor = float(metrics.nrmse(t_last, act, brain))
            wm = white_matter_mask(act, brain, labels.to(P.device)[None])
            for method in methods:
                x = recons[method][j]
                recon_by_method[method].append(x.cpu())
                row = {"method": method, "strength": best.get(method) if method != "fbsem" else None, "sample": i,
                       "subject": meta.get("subject"), "image": meta.get("image_index", meta.get("image")),
                       "realisation": meta.get("realisation"),
                       "nrmse": float(metrics.nrmse(x, act, brain)), "psnr": float(metrics.psnr(x, act, brain)),
                       "ssim": float(metrics.ssim(x, act, brain)),
                       "nrmse_last_target": float(metrics.nrmse(x, t_last, brain)), "target_floor": floor}
                row.update(lesion_metrics(x[0], act[0], brain[0], labels.to(P.device), info))
                row["bv_wm"] = float(metrics.background_variability(x, wm)) if int(wm.sum()) > 1 else None
                rows.append(row)

    # bias / std over the noise realisations of each test image
    groups: dict[tuple, list[int]] = {}
    for i in range(len(test)):
        m = test.info(i)
        groups.setdefault((m.get("subject"), m.get("image_index", m.get("image"))), []).append(i)
    bias_std: dict[str, dict] = {}
    for method in methods:
        b, s = [], []
        for key, idx in groups.items():
            if len(idx) < 2:
                continue
            reals = torch.stack([recon_by_method[method][i] for i in idx])
            item = test[idx[0]]
            r = metrics.bias_std(reals, item["activity"], item["brain_mask"])
            b.append(float(r.bias))
            s.append(float(r.std))
        bias_std[method] = {"bias_percent": float(np.mean(b)) if b else None,
                            "std_percent": float(np.mean(s)) if s else None, "images": len(b)}
    return {"rows": rows, "summary": summarise(rows), "bias_std": bias_std,
            "sweep": sw.to_dict() if sw else None, "config": {"baselines": cfg.to_dict(), "methods": list(methods)},
            "time_s": time.time() - t0}


EVALUATION_FILES = ("evaluation.json", "evaluation.csv")


def prepare_evaluation_folder(out_dir, overwrite: bool = True) -> Path:
    """Check, before any work, that ``out_dir`` may receive an evaluation (the output-folder
    rule: new, empty, a training run or an evaluation), that it can be written and, unless
    ``overwrite``, that it holds no evaluation yet."""
    check_output_folder(out_dir, "training run or evaluation", RUN_FILES)
    found = [n for n in EVALUATION_FILES if (Path(out_dir) / n).exists()]
    if found and not overwrite:
        raise UserError(f"{str(out_dir)!r} already holds {' and '.join(found)}: refusing to overwrite "
                        "(give --overwrite or another --out)")
    return ensure_writable(out_dir, "the evaluation folder")


def write_evaluation(result: dict, out_dir) -> tuple[Path, Path]:
    """``evaluation.json`` and ``evaluation.csv`` in ``out_dir`` (atomic; the folder rule of
    :func:`prepare_evaluation_folder`)."""
    out = prepare_evaluation_folder(out_dir)
    jpath = atomic_write_json(out / EVALUATION_FILES[0], result)
    cols = ["method", "strength", "sample", "subject", "image", "realisation", *METRIC_KEYS]
    lines = [",".join(cols)]
    for r in result["rows"]:
        lines.append(",".join("" if r.get(c) is None else str(r.get(c)) for c in cols))
    cpath = atomic_write_text(out / EVALUATION_FILES[1], "\n".join(lines) + "\n")
    return jpath, cpath


def print_summary(result: dict) -> None:
    s = result["summary"]
    print(f"{'method':<18}" + "".join(f"{k:>14}" for k in METRIC_KEYS) + f"{'bias%':>10}{'std%':>10}")
    for m, d in s.items():
        cells = []
        for k in METRIC_KEYS:
            v = d[k]["mean"]
            cells.append(f"{v:>14.4g}" if v is not None else f"{'-':>14}")
        bs = result["bias_std"].get(m, {})
        b = bs.get("bias_percent")
        sd = bs.get("std_percent")
        print(f"{m:<18}" + "".join(cells) + (f"{b:>10.3g}" if b is not None else f"{'-':>10}")
              + (f"{sd:>10.3g}" if sd is not None else f"{'-':>10}"))
