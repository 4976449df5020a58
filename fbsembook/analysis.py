"""Analysis helpers for the book's chapters on FBSEM-Net's design choices.

Used by the chapters "The original FBSEM-Net", "Iteration-dependent targets" and
"Iteration-dependent vs shared networks"; the chapters only call these and plot.

* Inspecting a trained net: :func:`network_table`, :func:`parameter_counts`,
  :func:`strengths` (the learned ``g_k`` of every module) and :func:`trajectory_errors` (how
  far each module's output ``x_k`` -- :func:`fbsembook.runviews.module_outputs` -- is from
  the iteration-dependent target ``t_k``, the reference and the truth).
* Reconstructions of one sample by nets and baselines: :func:`reconstruct_sample`,
  :func:`osem_iterates`.
* Several training runs (seeds): :func:`run_means`, :func:`per_sample`,
  :func:`seed_spread` (the across-seed spread that chapter 5 shows),
  :func:`image_spread`, :func:`paired_comparison`, :func:`comparison_verdict`.
* Data outside the training distribution: :func:`variant_sections` builds the recipe of
  a second dataset of the SAME geometry and unrolled schedule (other counts, other
  lesions, other subjects), so that :func:`fbsembook.experiments.evaluate` can run a
  trained model on its test split; :func:`ood_sections` gives the three test sets of the
  book (low counts, high counts, new lesions; requested through
  :func:`fbsembook.requests.ood_test_sets`); :func:`generalisation_table` and
  :func:`generalisation_verdict` compare training settings across such test sets.

Conventions: images are ``(Z, Y, X)`` tensors on the CPU; NRMSE is
:func:`fbsemlib.evaluation.metrics.nrmse`, in per cent inside the brain mask; an
*evaluation* is the dict returned by :func:`fbsembook.experiments.evaluate` (``rows`` with
one entry per method and test sample).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from fbsemlib.data import PETBatch
from fbsemlib.evaluation import metrics
from fbsembook.runviews import collate, module_outputs

__all__ = [
    "as_batch",
    "network_table",
    "parameter_counts",
    "strengths",
    "trajectory_errors",
    "osem_iterates",
    "reconstruct_sample",
    "run_means",
    "per_sample",
    "seed_spread",
    "image_spread",
    "paired_comparison",
    "comparison_verdict",
    "generalisation_table",
    "generalisation_verdict",
    "variant_sections",
    "ood_sections",
    "GEOMETRY_KEYS",
]

#: ``data:`` fields that fix the geometry and the unrolled schedule: a trained FBSEM-Net
#: can only be evaluated on a dataset that has the same values.
GEOMETRY_KEYS = ("scanner", "num_rings", "max_ring_difference", "image_shape", "voxel_size_mm", "psf_fwhm_mm",
                 "num_iterations", "num_subsets", "num_modules")


# ----------------------------------------------------------------------------------------
# one trained network
# ----------------------------------------------------------------------------------------
def as_batch(item: Mapping[str, Any]) -> PETBatch:
    """One dataset item as a batch of one (a leading batch dimension on every tensor)."""
    return collate([item])


def network_table(net) -> list[dict]:
    """One row per layer of the (first) regulariser CNN of ``net``: index, layer type,
    input/output channels, kernel size and number of trainable parameters, plus a last
    row for the strength ``rho`` of one module."""
    cnn = net.regularisers[0]
    rows = []
    for i, layer in enumerate(cnn.body):
        kind = type(layer).__name__
        row = {"layer": i, "type": kind, "in": None, "out": None, "kernel": None,
               "parameters": sum(p.numel() for p in layer.parameters())}
        if hasattr(layer, "in_channels"):
            row.update({"in": layer.in_channels, "out": layer.out_channels,
                        "kernel": "x".join(str(k) for k in layer.kernel_size)})
        elif hasattr(layer, "num_features"):
            row.update({"in": layer.num_features, "out": layer.num_features})
        rows.append(row)
    rows.append({"layer": len(rows), "type": "residual: + x, then ReLU" if cnn.final_relu else "residual: + x",
                 "in": None, "out": 1, "kernel": None, "parameters": 0})
    rows.append({"layer": len(rows), "type": "strength rho (g = softplus(rho))", "in": None, "out": None,
                 "kernel": None, "parameters": 1})
    return rows


def parameter_counts(net) -> dict:
    """Trainable parameters: ``cnn`` (one regulariser), ``per_module`` (one CNN + its
    ``rho``), ``networks`` (how many distinct CNNs), ``total`` (whole net), ``modules``."""
    cnn = sum(p.numel() for p in net.regularisers[0].parameters())
    return {"cnn": int(cnn), "per_module": int(cnn + 1), "networks": len(net.regularisers),
            "total": int(sum(p.numel() for p in net.parameters())), "modules": int(net.num_modules)}


@torch.no_grad()
def strengths(net) -> np.ndarray:
    """The learned dimensionless strength ``g_k = softplus(rho_k)`` of every module
    ``k = 0..K-1`` (constant for a shared network)."""
    return np.array([float(net.gamma(k)) for k in range(net.num_modules)])


def trajectory_errors(outputs: torch.Tensor | Sequence[torch.Tensor], item: Mapping[str, Any]) -> dict:
    """NRMSE (%, in the brain) of each image ``outputs[k]`` (``(Z, Y, X)``, k = 0..K-1; e.g.
    ``runviews.module_outputs(net, as_batch(item))[:, 0, 0]``) to
    ``target`` (the iteration-dependent target ``t_k``, the noise-free OSEM iterate
    ``k + 1``), ``reference`` (the high-count reference) and ``truth`` (the phantom);
    arrays of length K."""
    b = PETBatch.from_mapping(item)
    mask = b.brain_mask[0].bool()
    tk = b.targets[:, 0]
    ref, truth = b.target_final[0], b.activity[0]
    out = {"target": [], "reference": [], "truth": []}
    for k, x in enumerate(outputs):
        x = x.cpu()
        out["target"].append(metrics.nrmse(x, tk[k], mask) if k < tk.shape[0] else float("nan"))
        out["reference"].append(metrics.nrmse(x, ref, mask))
        out["truth"].append(metrics.nrmse(x, truth, mask))
    return {k: np.array(v) for k, v in out.items()}


def osem_iterates(item: Mapping[str, Any], projector, num_iterations: int, num_subsets: int) -> torch.Tensor:
    """The OSEM sub-iterates ``1..K`` of one item's noisy data, ``(K, Z, Y, X)`` on the CPU."""
    from fbsemlib.physics import PETForwardModel
    from fbsemlib.recon import osem

    b = as_batch(item)
    dev = projector.device
    model = PETForwardModel(projector, b.multiplicative.to(dev), b.additive.to(dev))
    _, its = osem(model, b.y.to(dev), num_iterations, num_subsets, return_iterates=True)
    return torch.stack([x[0, 0] for x in its]).cpu()


@torch.no_grad()
def reconstruct_sample(item: Mapping[str, Any], projector, num_iterations: int, num_subsets: int,
                       nets: Mapping[str, Any] | None = None, baselines: Mapping[str, float | None] | None = None,
                       bowsher_neighbours: int = 4) -> dict:
    """Reconstructions of one item, ``label -> (Z, Y, X)`` on the CPU: ``truth``, then the
    baselines (``method -> strength``, e.g. the validation-best strengths of an
    evaluation's ``sweep["best"]``), then the trained ``nets`` (``label -> FBSEMNet``)."""
    from fbsemlib.evaluation.baselines import reconstruct

    b = as_batch(item)
    out = {"truth": b.activity[0, 0].cpu()}
    for method, strength in (baselines or {}).items():
        x = reconstruct(method, strength, b, projector, num_iterations, num_subsets, bowsher_neighbours)
        out[method] = x[0, 0].cpu()
    for label, net in (nets or {}).items():
        out[label] = module_outputs(net, b)[-1, 0, 0]
    return out


# ----------------------------------------------------------------------------------------
# several runs
# ----------------------------------------------------------------------------------------
def _rows(evaluation: Mapping, method: str) -> list[dict]:
    rows = [r for r in evaluation["rows"] if r["method"] == method]
    if not rows:
        raise ValueError(f"the evaluation has no rows for method {method!r}")
    return sorted(rows, key=lambda r: r["sample"])


def per_sample(evaluation: Mapping, metric: str, method: str = "fbsem") -> np.ndarray:
    """``metric`` of every test sample of one evaluation (ordered by sample; NaN where
    the metric is undefined, e.g. no hot lesion)."""
    return np.array([np.nan if r.get(metric) is None else float(r[metric]) for r in _rows(evaluation, method)])


def run_means(evaluation: Mapping, metrics_: Iterable[str] = ("nrmse", "ssim"), method: str = "fbsem") -> dict:
    """Mean over the test samples of each metric for one evaluation (one trained run)."""
    out = {}
    for m in metrics_:
        v = per_sample(evaluation, m, method)
        v = v[np.isfinite(v)]
        out[m] = float(v.mean()) if v.size else float("nan")  # NaN: undefined for every sample
    return out


def seed_spread(evaluations: Mapping[str, Sequence[Mapping]], metrics_: Iterable[str] = ("nrmse", "ssim"),
                method: str = "fbsem") -> list[dict]:
    """How much the test results of repeated training runs (seeds) vary, per label and metric.

    ``evaluations`` maps a label (e.g. a run name) to the evaluations of its runs. Returns
    one row per label and metric: ``runs``; ``mean``, ``std`` (sample standard deviation,
    ``ddof=1``, NaN for one run), ``min``, ``max`` of the per-run test means; and
    ``sample_std``: the across-run standard deviation of the metric of each test sample,
    averaged over the samples (how differently the trained nets treat the same image)."""
    out = []
    for label, evs in evaluations.items():
        for m in metrics_:
            means = np.array([run_means(e, (m,), method)[m] for e in evs])
            n = len(means)
            per = np.stack([per_sample(e, m, method) for e in evs]) if n else np.zeros((0, 0))
            sample_std = float(np.nanmean(np.std(per, axis=0, ddof=1))) if n > 1 else float("nan")
            out.append({"label": label, "metric": m, "runs": n,
                        "mean": float(means.mean()) if n else float("nan"),
                        "std": float(means.std(ddof=1)) if n > 1 else float("nan"),
                        "min": float(means.min()) if n else float("nan"),
                        "max": float(means.max()) if n else float("nan"),
                        "sample_std": sample_std})
    return out


def image_spread(images: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Voxel-wise standard deviation (``ddof=1``) of the reconstructions of the SAME data
    by several trained nets, and its mean inside ``mask`` relative to the mean image
    there (per cent). Needs at least two images."""
    if len(images) < 2:
        raise ValueError("image_spread needs at least two images")
    st = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in images])
    sd, mean = st.std(0), st.mean(0)
    m = torch.ones_like(sd, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().reshape(sd.shape)
    level = float(mean[m].mean())
    rel = float(sd[m].mean()) / level * 100 if level > 0 else float("nan")
    return sd.float(), rel


def paired_comparison(eval_a: Mapping, eval_b: Mapping, metric: str = "nrmse", method_a: str = "fbsem",
                      method_b: str = "fbsem", lower_is_better: bool = True) -> dict:
    """Per-test-sample comparison of two evaluations on the same test split: ``a - b``.

    Returns ``mean_a``, ``mean_b``, ``mean_diff`` (a - b), ``se_diff`` (standard error of the
    mean difference), ``a_better`` (samples where a is better), ``n``."""
    a, b = per_sample(eval_a, metric, method_a), per_sample(eval_b, metric, method_b)
    if a.shape != b.shape:
        raise ValueError(f"the evaluations have {a.size} and {b.size} samples: not the same test split")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = a - b
    n = int(d.size)
    better = (d < 0) if lower_is_better else (d > 0)
    return {"metric": metric, "n": n, "mean_a": float(a.mean()) if n else float("nan"),
            "mean_b": float(b.mean()) if n else float("nan"),
            "mean_diff": float(d.mean()) if n else float("nan"),
            "se_diff": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
            "a_better": int(better.sum()), "lower_is_better": lower_is_better}


def comparison_verdict(cmp: Mapping, label_a: str, label_b: str) -> dict:
    """Does ``a`` beat ``b`` on average (from :func:`paired_comparison`)? ``"a_better"``:
    True/False; ``"clear"``: the mean difference exceeds two standard errors; ``"text"``."""
    d, se, m = cmp["mean_diff"], cmp["se_diff"], cmp["metric"]
    a_better = bool(d < 0) if cmp["lower_is_better"] else bool(d > 0)
    clear = bool(math.isfinite(se) and abs(d) > 2 * se)
    text = (f"{m}: {label_a} {cmp['mean_a']:.4g} vs {label_b} {cmp['mean_b']:.4g} (mean difference "
            f"{d:+.3g} +- {se:.2g} s.e.; {label_a} better on {cmp['a_better']} of {cmp['n']} test samples): "
            f"{label_a} is {'better' if a_better else 'NOT better'}"
            f"{' (more than 2 s.e.)' if clear else ' (within 2 s.e.)'}")
    return {"a_better": a_better, "clear": clear, "text": text}


# ----------------------------------------------------------------------------------------
# datasets outside the training distribution
# ----------------------------------------------------------------------------------------
def generalisation_table(evaluations: Mapping[str, Mapping[str, Sequence[Mapping]]], metric: str = "nrmse",
                         reference: Mapping[str, Mapping] | None = None, reference_method: str = "osem") -> list[dict]:
    """Per test set and training setting: the across-run mean and std of the test mean of
    ``metric``.

    ``evaluations[test_set][label]`` is the list of evaluations (one per trained run) of
    setting ``label`` on ``test_set``. With ``reference[test_set]`` (an evaluation holding
    ``reference_method`` rows, e.g. OSEM on the same test split) each row also has ``ref``
    (the reference's mean) and ``rel_mean`` / ``rel_std``: the across-run mean and std of
    ``run mean / ref`` (below 1: better than the reference for an error metric)."""
    rows = []
    for test_set, by_label in evaluations.items():
        ref = None
        if reference is not None and test_set in reference:
            ref = run_means(reference[test_set], (metric,), reference_method)[metric]
        for label, evs in by_label.items():
            means = np.array([run_means(e, (metric,))[metric] for e in evs])
            n = len(means)
            row = {"test_set": test_set, "label": label, "metric": metric, "runs": n,
                   "mean": float(means.mean()) if n else float("nan"),
                   "std": float(means.std(ddof=1)) if n > 1 else float("nan"), "ref": ref}
            if ref is not None and n:
                rel = means / ref
                row["rel_mean"] = float(rel.mean())
                row["rel_std"] = float(rel.std(ddof=1)) if n > 1 else float("nan")
            rows.append(row)
    return rows


def generalisation_verdict(rows: Sequence[Mapping], candidate: str, baseline: str, in_distribution: str,
                           lower_is_better: bool = True) -> dict:
    """Does setting ``candidate`` generalise better than ``baseline``? From the rows of
    :func:`generalisation_table` (one metric): for every test set other than
    ``in_distribution``, whether the candidate's mean is better, the difference
    (candidate - baseline) and each setting's *degradation* (test-set mean minus its
    in-distribution mean; positive = worse for an error metric). Returns ``{"sets": {...},
    "better": number of out-of-distribution sets where the candidate is better,
    "better_beyond_spread": where it is better by more than the larger across-run std,
    "less_degraded": where its degradation is smaller, "n_sets", "text"}``."""
    by = {(r["test_set"], r["label"]): r for r in rows}
    sets = list(dict.fromkeys(r["test_set"] for r in rows if r["test_set"] != in_distribution))
    for lab in (candidate, baseline):
        if (in_distribution, lab) not in by:
            raise ValueError(f"no {in_distribution!r} row for {lab!r}")
    sign = 1.0 if lower_is_better else -1.0
    out: dict[str, Any] = {"sets": {}}
    lines = []
    for s in sets:
        c, b = by[(s, candidate)], by[(s, baseline)]
        dc = c["mean"] - by[(in_distribution, candidate)]["mean"]
        db = b["mean"] - by[(in_distribution, baseline)]["mean"]
        better = bool(sign * (c["mean"] - b["mean"]) < 0)
        less = bool(sign * (dc - db) < 0)
        spread = max([x for x in (c["std"], b["std"]) if math.isfinite(x)], default=float("nan"))
        beyond = bool(math.isfinite(spread) and abs(c["mean"] - b["mean"]) > spread)
        out["sets"][s] = {"candidate": c["mean"], "baseline": b["mean"], "difference": c["mean"] - b["mean"],
                          "candidate_better": better, "degradation_candidate": dc, "degradation_baseline": db,
                          "less_degraded": less, "beyond_seed_spread": beyond}
        lines.append(f"{s}: {candidate} {c['mean']:.4g} vs {baseline} {b['mean']:.4g} -> "
                     f"{candidate if better else baseline} better"
                     f"{' (by more than the across-run std)' if beyond else ' (within the across-run std)' if math.isfinite(spread) else ' (one run per setting: no spread estimate)'}; "
                     f"change from in-distribution {dc:+.3g} vs {db:+.3g}")
    out["better"] = sum(v["candidate_better"] for v in out["sets"].values())
    out["less_degraded"] = sum(v["less_degraded"] for v in out["sets"].values())
    out["better_beyond_spread"] = sum(v["candidate_better"] and v["beyond_seed_spread"] for v in out["sets"].values())
    out["n_sets"] = len(sets)
    out["text"] = "\n".join(lines)
    return out


def variant_sections(profile: str, suffix: str, data_overrides: Mapping[str, Any] | None = None,
                     seed: int = 1000, num_subjects: int | None = None,
                     split: Mapping[str, int] | None = None) -> dict:
    """The experiment sections of ``profile`` with a modified ``data:`` recipe, for a test
    set outside the training distribution: ``data.name`` gets ``-suffix``, the master seed
    becomes ``seed`` (so the subjects differ from the training ones), and optionally fewer
    subjects (``num_subjects`` with ``split``, default: no training subject, one validation
    subject, the rest test). ``data_overrides`` are dotted keys inside ``data``
    (``{"counts_range": [...], "phantom.lesion_radius_mm": [...]}``). Raises ``ValueError``
    if an override changes the geometry or the unrolled schedule (:data:`GEOMETRY_KEYS`):
    a trained network could not be evaluated on such data."""
    from fbsembook.experiments import load_profile

    base = load_profile(profile)
    ov = {f"data.{k}": v for k, v in (data_overrides or {}).items()}
    for k in data_overrides or {}:
        if k.split(".")[0] in GEOMETRY_KEYS:
            raise ValueError(f"data.{k} changes the geometry or the schedule: a trained model could not be "
                             "evaluated on that dataset")
    ov["data.name"] = f"{base['data'].get('name', profile)}-{suffix}"
    ov["data.seed"] = int(seed)
    if num_subjects is not None:
        n = int(num_subjects)
        if n < 2:
            raise ValueError("num_subjects must be >= 2 (one validation and at least one test subject)")
        ov["data.num_subjects"] = n
        ov["data.split"] = dict(split) if split is not None else {"train": 0, "validation": 1, "test": n - 1}
    elif split is not None:
        ov["data.split"] = dict(split)
    return load_profile(profile, ov)


def ood_sections(profile: str, low_counts: Sequence[float], high_counts: Sequence[float],
                 new_lesions: Mapping[str, Any], num_subjects: int, realisations: int | None = None,
                 seed: int = 1000) -> dict[str, dict]:
    """The book's out-of-distribution test sets of ``profile`` (chapter "Iteration-dependent
    targets"; the results chapter asks for the same ones): ``{"low counts", "high counts",
    "new lesions"} -> experiment sections`` (:func:`variant_sections`), each with
    ``num_subjects`` new subjects (one validation, the rest test): counts per sample in
    ``low_counts`` / ``high_counts``, or lesions drawn with the
    :class:`~fbsemlib.data.phantoms.PhantomConfig` overrides ``new_lesions``. ``realisations``:
    noise realisations per test image (None: the profile's)."""
    noise = {} if realisations is None else {
        "noise_realisations": {"train": 1, "validation": 1, "test": int(realisations)}}
    lesions = {f"phantom.{k}": v for k, v in dict(new_lesions).items()}
    return {
        "low counts": variant_sections(profile, "lowcounts", {"counts_range": list(low_counts), **noise},
                                       seed=seed, num_subjects=num_subjects),
        "high counts": variant_sections(profile, "highcounts", {"counts_range": list(high_counts), **noise},
                                        seed=seed, num_subjects=num_subjects),
        "new lesions": variant_sections(profile, "newlesions", {**lesions, **noise}, seed=seed,
                                        num_subjects=num_subjects),
    }
