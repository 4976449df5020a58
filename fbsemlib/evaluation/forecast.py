"""Forecast of an experiment's wall time, peak memory and disk (``fbsem plan``), from a
few real steps of each stage timed on this machine and device.

What is timed (:func:`measure`), on the experiment's own geometry, model and batch size:

* **simulate** -- a warm-up recipe (one subject, one image: projector matrices, the phantom
  template) and a mini recipe (one subject per split, at most :data:`MINI_IMAGES` images
  each) through :func:`fbsemlib.data.simulate_dataset`; the seconds per image and the
  bytes per image of each split's files are extrapolated to every subject and image.
* **training** -- on the synthetic batch of :mod:`fbsemlib.training.memory` (the
  experiment's projector, ``batch_size`` and CNN): a batch's context (``net.prepare``:
  the subset sensitivities), an end-to-end optimiser step (Adam) through
  ``min(K, 2)`` modules with and without gradient checkpointing, one sequential step of
  one module on its cached input, and a no-gradient forward pass per module. The runs'
  times are these costs times the experiment's counts (samples, batches, epochs,
  validations, K), as the trainers do the work: end-to-end ``epochs x batches x (context
  + K modules)``; sequential ``K x (epochs_per_module x batches x one module)`` plus the
  cache (one module forward and one subset sensitivity per sample and stage); both end
  with a forward pass of all K modules over the training and validation samples. Early
  stopping is not foreseen (an upper bound).
* **evaluate** -- the baseline sweep on the mini dataset's validation split and the
  evaluation of an untrained FBSEM-Net and the baselines on its test split
  (:func:`fbsemlib.evaluation.evaluator.evaluate`), per sample, times the samples.
* **book** -- the simulation plus the training runs and evaluations of the book's
  chapters 4-7 (:data:`BOOK_WORKLOADS`; chapter 8's 3D run, chapter 5's
  out-of-distribution test sets and the memory sweeps are not included).

Every stage's time includes the start of its ``fbsem`` process (Python, torch and fbsemlib
imported, timed once in a subprocess), as a user running it pays it.

Peak memory: the training step's on CUDA is ``torch.cuda.max_memory_allocated`` (parameters,
projector and batch included; K extrapolated linearly from K = 1, 2); on a CPU it is the
memory model of :func:`fbsemlib.training.memory.measure_training_memory` (autograd's saved
tensors and the batch) plus parameters, gradients and Adam's state. Host memory is
computed from the sizes: the splits loaded into memory, the sequential cache
(:func:`fbsemlib.training.stage_cache.cache_bytes`) and, for simulate,
:meth:`fbsemlib.data.DataConfig.memory_estimate_bytes`. Disk: the dataset from the mini
dataset's bytes per image, a run's model file and checkpoint from its parameters (Adam's
two moments and the best weights in the checkpoint), and the sequential cache when it goes
to disk. Every row says how its numbers were obtained.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from fbsemlib.config import ConfigError, from_dict
from fbsemlib.data import DataConfig, PETDataset, simulate_dataset
from fbsemlib.evaluation.baselines import METHODS as BASELINE_METHODS
from fbsemlib.evaluation.baselines import BaselineConfig, sweep
from fbsemlib.evaluation.evaluator import evaluate
from fbsemlib.models.fbsem import FBSEMNet
from fbsemlib.models.losses import relative_mse, unrolled_loss
from fbsemlib.outputs import atomic_write_text
from fbsemlib.physics import cache as projector_cache
from fbsemlib.training.config import TrainConfig, parse_model_section
from fbsemlib.training.memory import measure_training_memory, resolve_spec
from fbsemlib.training.memory.problem import build_problem
from fbsemlib.training.optim import make_optimizer
from fbsemlib.training.stage_cache import cache_bytes

__all__ = ["MINI_IMAGES", "BOOK_WORKLOADS", "BookWorkload", "Measurements", "Forecast",
           "write_experiment", "measure", "forecast", "forecast_experiment", "format_table"]

#: images per subject of the mini dataset that :func:`measure` simulates
MINI_IMAGES = 4


@dataclasses.dataclass(frozen=True)
class BookWorkload:
    """What the book's chapters 4-7 compute for one profile: the original FBSEM-Net (one
    end-to-end run), two end-to-end runs per seed of chapter 5 (final and
    iteration-dependent targets), one shared-network run per seed of chapter 6, and
    chapter 7's two sequential runs (warm and fresh starts); each run is evaluated on the
    test split, the baselines once (with their sweep)."""

    chapter5_seeds: int
    chapter6_seeds: int

    @property
    def end_to_end_runs(self) -> int:
        return 1 + 2 * self.chapter5_seeds + self.chapter6_seeds

    @property
    def sequential_runs(self) -> int:
        return 2

    @property
    def fbsem_evaluations(self) -> int:
        return self.end_to_end_runs + self.sequential_runs


#: the book's workload per profile (the seeds of chapters 5 and 6; tests/test_plan.py checks
#: them against the chapters' parameter cells)
BOOK_WORKLOADS: dict[str, BookWorkload] = {"smoke": BookWorkload(2, 1), "cpu": BookWorkload(10, 3),
                                           "paper": BookWorkload(10, 3)}


# ----------------------------------------------------------------------------------------
# experiment sections
# ----------------------------------------------------------------------------------------
def write_experiment(path: str | Path, sections: Mapping[str, Any]) -> Path:
    """Write sections as an experiment YAML file (atomically); returns the path."""
    return atomic_write_text(Path(path), yaml.safe_dump(dict(sections), sort_keys=False))


# ----------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurements:
    """Seconds, bytes and the settings they were measured with (:func:`measure`)."""

    device: str
    simulate_device: str
    simulate_setup_s: float  # one-off: projector matrices, phantom template
    simulate_s_per_image: float
    disk_bytes_per_image: dict  # split -> bytes of a subject file per image
    simulate_peak_bytes: int | None  # CUDA, per mini subject
    setup_s: float  # one-off per training / evaluation process: the projector and its subsets
    prepare_s: float  # one batch's context (subset sensitivities)
    module_train_s: float  # end-to-end, per module of a step (forward, backward, Adam)
    module_train_checkpointed_s: float
    sequential_step_s: float  # one module's step on its cached input
    module_forward_s: float  # no gradients, per module
    memory: dict  # mode -> {K: bytes}
    memory_method: str
    param_bytes_per_module: int
    sweep_s_per_sample: float
    evaluate_s_per_sample: float  # FBSEM-Net and the baselines
    evaluate_fbsem_s_per_sample: float
    evaluate_peak_bytes: int | None
    process_start_s: float = 0.0  # one ``fbsem`` process: Python, torch and fbsemlib imported
    measure_s: float = 0.0
    phase_s: dict = dataclasses.field(default_factory=dict)  # seconds of each measurement

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: a step is repeated until its timings add up to this many seconds (at most :data:`MAX_REPEATS`
#: times): steps of milliseconds are timed often enough that a busy machine's hiccups are outliers
MIN_TIMED_S = 0.5
MAX_REPEATS = 25


def _median_time(fn: Callable[[], object], repeats: int, dev: torch.device) -> float:
    """Median seconds of ``fn`` after one warm-up call: ``repeats`` calls, more for short ones."""
    fn()  # warm-up
    ts: list[float] = []
    while len(ts) < max(1, repeats) or (sum(ts) < MIN_TIMED_S and len(ts) < MAX_REPEATS):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _mini_recipe(recipe: DataConfig, images: int) -> tuple[DataConfig, DataConfig]:
    """The warm-up recipe (one training subject, one image) and the mini recipe (one subject
    per non-empty split, at most ``images`` images each) of ``recipe``."""
    counts = recipe.split_counts()
    per_rot = min(recipe.rotations_per_slice, images)
    slices = max(1, min(recipe.slices_per_subject, images // per_rot))
    split = {s: (1 if n else 0) for s, n in counts.items()}
    mini = dataclasses.replace(recipe, num_subjects=sum(split.values()), split=split, slices_per_subject=slices,
                               rotations_per_slice=per_rot)
    warm_split = {s: 0 for s in counts}
    warm_split[next(s for s, n in counts.items() if n)] = 1
    warm = dataclasses.replace(recipe, num_subjects=1, split=warm_split, slices_per_subject=1,
                               rotations_per_slice=1)
    return warm, mini


def _measure_simulation(recipe: DataConfig, root: Path, sim_device: str, say) -> dict:
    warm, mini = _mini_recipe(recipe, MINI_IMAGES)
    say("simulate: warm-up subject")
    projector_cache.clear()  # what a new `fbsem simulate` process pays once
    t = time.perf_counter()
    simulate_dataset(warm, root / "warm", progress=False, device=sim_device)
    t_warm = time.perf_counter() - t
    say(f"simulate: {mini.num_subjects} subjects of {mini.images_per_subject} image(s)")
    cuda = torch.device(sim_device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(sim_device)
    t = time.perf_counter()
    info = simulate_dataset(mini, root / "mini", progress=False, device=sim_device)
    t_mini = time.perf_counter() - t
    per_image = t_mini / (mini.num_subjects * mini.images_per_subject)
    disk = {s: sum(p.stat().st_size for p in info.files(s)) / mini.images_per_subject
            for s, n in mini.split.items() if n}
    return dict(simulate_setup_s=max(0.0, t_warm - per_image), simulate_s_per_image=per_image,
                disk_bytes_per_image=disk, data_dir=Path(info.path),
                simulate_peak_bytes=int(torch.cuda.max_memory_allocated(sim_device)) if cuda else None)


def _measure_training(sections: Mapping, dev: torch.device, repeats: int, K: int, say) -> dict:
    """Per-module costs of the training steps on the synthetic batch of the experiment."""
    spec = resolve_spec(dict(sections), threads=torch.get_num_threads())
    train_cfg = from_dict(TrainConfig, sections.get("train", {}), "train")
    Kx = min(K, 2)
    projector_cache.clear()  # what a new `fbsem train` process pays once: the projector and its subsets' matrices
    t = time.perf_counter()
    problem = build_problem(spec, dev)
    net = problem.build_net(Kx)
    net.train()
    targets = problem.targets(range(Kx), problem.prepare(net).x0).to(dev)
    setup_s = time.perf_counter() - t
    say(f"training: steps of {Kx} module(s), batch {problem.batch_size}, image {problem.image_shape}")

    def opt_for(n):
        return make_optimizer(train_cfg, [p for r in n.regularisers for p in r.parameters()], n.rho, 1)[0]

    opt = opt_for(net)
    prepare_s = _median_time(lambda: problem.prepare(net), repeats, dev)

    def e2e_step(checkpoint: bool):
        ctx = problem.prepare(net)
        outs = net.run(ctx, return_all=True, checkpoint=checkpoint, modules=range(Kx))
        unrolled_loss([o.float() for o in outs], targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_s = {cp: max(0.0, _median_time(lambda: e2e_step(cp), repeats, dev) - prepare_s) / Kx
               for cp in (False, True)}
    ctx = problem.prepare(net)
    k = Kx - 1
    with torch.no_grad():
        x_in = net.run(ctx, modules=range(k)) if k else ctx.x0

    def seq_step():
        relative_mse(net.step(k, x_in, ctx).float(), targets[:, k]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sequential_s = _median_time(seq_step, repeats, dev)
    net.eval()

    def forward():
        with torch.no_grad():
            net.run(ctx, modules=range(Kx))

    forward_s = _median_time(forward, repeats, dev) / Kx
    param_bytes = sum(p.numel() * p.element_size() for p in net.regularisers[0].parameters()) + 4
    say("training: peak memory of one step (K = 1, 2)")
    memory: dict[str, dict[int, int]] = {}
    cuda = dev.type == "cuda"
    for mode in ("end-to-end", "checkpointed", "sequential"):
        memory[mode] = {}
        for k_ in (1, 2):
            r = measure_training_memory(problem, k_, mode, device=dev)
            memory[mode][k_] = int(r.peak_total_bytes if cuda else r.peak_bytes)
    method = ("cuda max_memory_allocated (parameters, projector and batch included), linear in K" if cuda else
              "memory model (autograd's saved tensors + batch) + parameters, gradients and Adam, linear in K")
    return dict(setup_s=setup_s, prepare_s=prepare_s, module_train_s=train_s[False],
                module_train_checkpointed_s=train_s[True], sequential_step_s=sequential_s,
                module_forward_s=forward_s, memory=memory, memory_method=method,
                param_bytes_per_module=int(param_bytes))


def _measure_evaluation(sections: Mapping, data_dir: Path, dev: torch.device, say) -> dict:
    cfg = from_dict(BaselineConfig, sections.get("baselines") or {}, "baselines")
    model_cfg, _, _ = parse_model_section(sections.get("model"))
    test, val = PETDataset(data_dir, "test"), PETDataset(data_dir, "validation", checksums=False)
    P = test.make_projector(dev)
    net = FBSEMNet(P, test.num_iterations, test.num_subsets, model_cfg).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    # the sweep: every strength of a method costs the same; one strength per method is timed
    methods = [m for m in BASELINE_METHODS if m != "osem"]
    one_each = dataclasses.replace(cfg, **{f: getattr(cfg, f)[:1]
                                           for f in ("fwhm_mm", "beta_quadratic", "beta_bowsher")})
    say(f"evaluate: baseline sweep (one strength per method) on {len(val)} validation sample(s)")
    t = time.perf_counter()
    sw = sweep(val, P, one_each, methods)
    jobs, jobs_timed = sum(len(cfg.strengths(m)) for m in methods), len(methods)
    sweep_s = (time.perf_counter() - t) / len(val) * jobs / jobs_timed
    say(f"evaluate: {len(test)} test sample(s)")
    t = time.perf_counter()
    evaluate(None, data_dir, device=dev, baseline_config=cfg, net=net, sweep_result=sw)
    eval_s = (time.perf_counter() - t) / len(test)
    t = time.perf_counter()
    evaluate(None, data_dir, device=dev, baseline_config=cfg, net=net, methods=("fbsem",))
    fbsem_s = (time.perf_counter() - t) / len(test)
    return dict(sweep_s_per_sample=sweep_s, evaluate_s_per_sample=eval_s, evaluate_fbsem_s_per_sample=fbsem_s,
                evaluate_peak_bytes=int(torch.cuda.max_memory_allocated(dev)) if cuda else None)


def schedule_K(sections: Mapping) -> int:
    """The number of unrolled modules the experiment trains (the model's schedule, else the data's)."""
    recipe = from_dict(DataConfig, sections["data"], "data")
    _, n_it, n_sub = parse_model_section(sections.get("model"))
    return (n_it or recipe.num_iterations) * (n_sub or recipe.num_subsets)


def _measure_process_start() -> float:
    """Seconds for a new Python process to import what every ``fbsem`` command imports: each
    stage a user runs (``fbsem simulate``, ``train``, ``evaluate``) pays it once."""
    import subprocess
    import sys

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, h5py, fbsemlib.cli, fbsemlib.training"], check=True,
                   capture_output=True)
    return time.perf_counter() - t


def measure(sections: Mapping[str, Any], device: str | torch.device = "cpu", simulate_device: str = "cpu",
            repeats: int = 3, log: Callable[[str], None] | None = None) -> Measurements:
    """Time a few real steps of every stage of the experiment ``sections`` on ``device``
    (simulation on ``simulate_device``); see the module docstring. A minute or two on a
    CPU for the paper profile's sizes, seconds for the smoke profile."""
    say = log or (lambda m: None)
    if "data" not in sections:
        raise ConfigError("the experiment has no 'data' section: nothing to forecast")
    recipe = from_dict(DataConfig, sections["data"], "data")
    from_dict(TrainConfig, sections.get("train", {}), "train")  # a bad train section fails before any work
    dev = torch.device(device)
    t0 = time.perf_counter()
    phases = {}
    start = _measure_process_start()
    say(f"an fbsem process starts in {start:.2f} s")
    with tempfile.TemporaryDirectory(prefix="fbsem-plan-") as tmp:
        sim = _measure_simulation(recipe, Path(tmp), simulate_device, say)
        data_dir = sim.pop("data_dir")
        phases["simulate"] = time.perf_counter() - t0
        train = _measure_training(sections, dev, repeats, schedule_K(sections), say)
        phases["training"] = time.perf_counter() - t0 - phases["simulate"]
        ev = _measure_evaluation(sections, data_dir, dev, say)
    measure_s = time.perf_counter() - t0
    phases["evaluate"] = measure_s - phases["simulate"] - phases["training"]
    return Measurements(device=str(dev), simulate_device=str(simulate_device), **sim, **train, **ev,
                        process_start_s=start, measure_s=measure_s, phase_s=phases)


# ----------------------------------------------------------------------------------------
# extrapolation
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Forecast:
    """Forecast rows (stage -> wall time, peak memory, disk, how) of one experiment."""

    name: str
    device: str
    counts: dict
    rows: list[dict]
    measurements: Measurements
    notes: list[str]

    def row(self, stage: str) -> dict:
        return next(r for r in self.rows if r["stage"] == stage)

    def to_dict(self) -> dict:
        return {"experiment": self.name, "device": self.device, "counts": self.counts, "rows": self.rows,
                "measurements": self.measurements.to_dict(), "notes": self.notes}


def _validations(epochs: int, every: int) -> int:
    """Validations of a run / stage of ``epochs`` epochs (every ``every`` epochs and the last)."""
    return epochs // every + (1 if epochs % every else 0)


def _linear(points: Mapping[int, int], K: int) -> int:
    """Value at ``K`` of the line through the values at K = 1 and 2 (never below them)."""
    a, b = points[1], points[2]
    return int(max(a, b, b + (b - a) * (K - 2)))


def _counts(sections: Mapping) -> dict:
    recipe = from_dict(DataConfig, sections["data"], "data")
    train = from_dict(TrainConfig, sections.get("train", {}), "train")
    subjects = recipe.split_counts()
    samples = {s: subjects[s] * recipe.images_per_subject * recipe.noise_realisations[s] for s in subjects}
    bins = math.prod(recipe.geometry().shape)
    return dict(K=schedule_K(sections), data_K=recipe.K, subjects=subjects,
                images_per_subject=recipe.images_per_subject,
                samples=samples, batch_size=train.batch_size, epochs=train.epochs,
                epochs_per_module=train.epochs_per_module, validation_every=train.validation_every,
                voxels=math.prod(recipe.image_shape), sinogram_bins=bins, cache=train.cache,
                cache_memory_mb=train.cache_memory_mb, grad_checkpointing=train.grad_checkpointing,
                stage_init=train.stage_init, num_subsets=recipe.num_subsets,
                simulate_host_bytes=recipe.memory_estimate_bytes())


def _training_rows(c: dict, m: Measurements) -> list[dict]:
    K, B = c["K"], c["batch_size"]
    n_tr, n_val = c["samples"]["train"], c["samples"]["validation"]
    spe, vb = math.ceil(n_tr / B), math.ceil(n_val / B) if n_val else 0
    final_eval = (spe + vb) * (m.prepare_s + K * m.module_forward_s)
    # host: the training and validation splits in memory (3 sinograms, K + 3 images, a mask per sample)
    per_sample = 4 * (3 * c["sinogram_bins"] + (c["data_K"] + 3) * c["voxels"]) + c["voxels"]
    data_host = (n_tr + n_val) * per_sample
    params = m.param_bytes_per_module * K
    run_disk = params + 4 * params  # model.pt; checkpoint.pt: weights, Adam's two moments, best weights
    cuda = m.device.startswith("cuda")
    state = 0 if cuda else 4 * params  # CPU: parameters, gradients, Adam (on CUDA inside max_memory_allocated)
    rows = []
    validate = _validations(c["epochs"], c["validation_every"]) * vb * (m.prepare_s + K * m.module_forward_s)
    for stage, key, per_module in (("train end-to-end", "end-to-end", m.module_train_s),
                                   ("train end-to-end (checkpointed)", "checkpointed",
                                    m.module_train_checkpointed_s)):
        t = m.process_start_s + m.setup_s + c["epochs"] * spe * (m.prepare_s + K * per_module) + validate + final_eval
        rows.append(dict(stage=stage, wall_s=t, peak_device_bytes=_linear(m.memory[key], K) + state,
                         host_bytes=data_host, disk_bytes=run_disk,
                         how=f"{c['epochs']} epochs x {spe} steps of K = {K} modules + validations"))
    cache_need = cache_bytes(n_tr + n_val, c["voxels"])
    in_memory = c["cache"] == "memory" or (c["cache"] == "auto" and cache_need <= c["cache_memory_mb"] * 2**20)
    E = c["epochs_per_module"]
    stage_s = E * spe * m.sequential_step_s + _validations(E, c["validation_every"]) * vb * m.module_forward_s \
        + (spe + vb) * (m.module_forward_s + m.prepare_s / c["num_subsets"])
    if c["stage_init"] == "best":
        stage_s += 2 * m.module_forward_s
    t = m.process_start_s + m.setup_s + (spe + vb) * m.prepare_s + K * stage_s + final_eval
    seq_state = 0 if cuda else 4 * m.param_bytes_per_module + params
    rows.append(dict(stage="train sequential", wall_s=t,
                     peak_device_bytes=_linear(m.memory["sequential"], 2) + seq_state,
                     host_bytes=data_host + (cache_need if in_memory else 0),
                     disk_bytes=run_disk + (0 if in_memory else cache_need),
                     how=f"K = {K} stages x {E} epochs x {spe} steps of one module; cache "
                         f"{'in memory' if in_memory else 'on disk'}"))
    return rows


def forecast(sections: Mapping[str, Any], measurements: Measurements, name: str | None = None) -> Forecast:
    """Extrapolate ``measurements`` to the counts of the experiment ``sections`` (see the
    module docstring); the book's row when :data:`BOOK_WORKLOADS` knows the recipe's name."""
    c = _counts(sections)
    m = measurements
    name = name or str(sections["data"].get("name", "experiment"))
    images = sum(c["subjects"].values()) * c["images_per_subject"]
    sim_disk = sum(c["subjects"][s] * c["images_per_subject"] * m.disk_bytes_per_image.get(s, 0.0)
                   for s in c["subjects"])
    sim_peak = m.simulate_peak_bytes  # CUDA: of a mini subject, scaled to a subject's images
    if sim_peak is not None:
        sim_peak = int(sim_peak * c["images_per_subject"] / max(1, min(c["images_per_subject"], MINI_IMAGES)))
    rows = [dict(stage="simulate", wall_s=m.process_start_s + m.simulate_setup_s + images * m.simulate_s_per_image,
                 peak_device_bytes=sim_peak,
                 host_bytes=c["simulate_host_bytes"], disk_bytes=int(sim_disk),
                 how=f"{images} images x {m.simulate_s_per_image:.3g} s on {m.simulate_device}")]
    rows += _training_rows(c, m)
    n_val, n_test = c["samples"]["validation"], c["samples"]["test"]
    ev = m.process_start_s + m.setup_s + n_val * m.sweep_s_per_sample + n_test * m.evaluate_s_per_sample
    rows.append(dict(stage="evaluate", wall_s=ev, peak_device_bytes=m.evaluate_peak_bytes, host_bytes=None,
                     disk_bytes=None, how=f"sweep on {n_val} + {n_test} test samples, FBSEM-Net and 4 baselines"))
    notes = ["no early stopping assumed: training times are upper bounds",
             f"peak device memory: {m.memory_method}"]
    book = BOOK_WORKLOADS.get(name)
    if book is not None:
        e2e = next(r for r in rows if r["stage"] == ("train end-to-end (checkpointed)" if c["grad_checkpointing"]
                                                     else "train end-to-end"))
        seq = next(r for r in rows if r["stage"] == "train sequential")
        t = rows[0]["wall_s"] + book.end_to_end_runs * e2e["wall_s"] + book.sequential_runs * seq["wall_s"] \
            + ev + book.fbsem_evaluations * n_test * m.evaluate_fbsem_s_per_sample
        rows.append(dict(stage="book", wall_s=t,
                         peak_device_bytes=max(r["peak_device_bytes"] or 0 for r in rows) or None,
                         host_bytes=max(r["host_bytes"] or 0 for r in rows) or None,
                         disk_bytes=rows[0]["disk_bytes"] + book.end_to_end_runs * e2e["disk_bytes"]
                         + book.sequential_runs * seq["disk_bytes"],
                         how=f"simulate + {book.end_to_end_runs} end-to-end and {book.sequential_runs} sequential "
                             f"runs + {book.fbsem_evaluations + 1} evaluations (chapters 4-7)"))
        notes.append("book: chapter 8's 3D run, chapter 5's out-of-distribution test sets and the memory sweeps "
                     "are not included")
    else:
        notes.append(f"book: no workload known for experiment {name!r} (known: {', '.join(BOOK_WORKLOADS)})")
    return Forecast(name, m.device, c, rows, m, notes)


def forecast_experiment(sections: Mapping[str, Any], device: str | torch.device = "cpu",
                        simulate_device: str = "cpu", repeats: int = 3, log=None) -> Forecast:
    """:func:`measure` then :func:`forecast`."""
    return forecast(sections, measure(sections, device, simulate_device, repeats, log))


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _fmt_b(n: float | None) -> str:
    if not n:
        return "-"
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or u == "TiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_table(fc: Forecast) -> str:
    """The forecast as a readable table (with its notes)."""
    head = ("stage", "wall time", f"peak {fc.device.split(':')[0]} memory", "host memory", "disk", "from")
    body = [(r["stage"], _fmt_s(r["wall_s"]), _fmt_b(r["peak_device_bytes"]), _fmt_b(r["host_bytes"]),
             _fmt_b(r["disk_bytes"]), r["how"]) for r in fc.rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = [f"forecast for {fc.name!r} on {fc.device} (measured in {fc.measurements.measure_s:.0f} s)",
             "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in body]
    lines += [f"note: {n}" for n in fc.notes]
    return "\n".join(lines)
